"""Run the real ``mscn`` command in a child process, as a user would (shared by the CLI tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# One thread per child: the test machine has two cores and pytest holds one.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def mscn(*args: object, timeout: float = 600, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    """``mscn ARGS...`` with captured text output."""
    return subprocess.run([sys.executable, "-m", "mscn_core", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})})


def ok(r: subprocess.CompletedProcess) -> dict:
    """The JSON report of a command that must have succeeded."""
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def refused(r: subprocess.CompletedProcess) -> str:
    """The one-line error of a command that must have been refused (exit 2)."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]
