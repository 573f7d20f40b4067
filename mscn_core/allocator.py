"""Run the CLI under tcmalloc when the system has it: meta-training is allocator-bound on CPU.

Second-order inner loops allocate and free many activation-sized tensors per step. glibc
serves every block above its 32 MiB mmap ceiling with a fresh ``mmap`` and gives it back
on free, so each step page-faults its whole working set again: on the 9×256 benchmark
config (bench/meta_step.py) one outer step took 14 s under glibc and 5 s under tcmalloc,
at the same peak memory. ``mscn`` therefore re-executes itself once with tcmalloc
preloaded (Debian ``libtcmalloc-minimal4``, installed by ``scripts/setup.sh``). Set
``MSCN_ALLOCATOR=glibc`` to opt out; a missing library simply means glibc.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_CANDIDATES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
             "/usr/lib", "/usr/local/lib")
_REEXEC_MARK = "MSCN_ALLOCATOR_REEXEC"


def tcmalloc_path() -> str | None:
    """Path of a tcmalloc shared library on this system, or None."""
    for d in _LIB_DIRS:
        for name in _CANDIDATES:
            p = Path(d) / name
            if p.is_file():
                return str(p)
    return None


def active_allocator() -> str:
    """``"tcmalloc"`` when it is mapped into this process, else ``"glibc"``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "tcmalloc" if "libtcmalloc" in maps else "glibc"


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: os.environ) with tcmalloc preloaded, when available."""
    env = dict(os.environ if env is None else env)
    lib = tcmalloc_path()
    if lib and env.get("MSCN_ALLOCATOR", "tcmalloc") != "glibc":
        current = env.get("LD_PRELOAD", "")
        if lib not in current.split():
            env["LD_PRELOAD"] = f"{lib} {current}".strip()
    return env


def reexec_with_tcmalloc(python_args: list[str]) -> None:
    """Replace this process by ``python python_args…`` under tcmalloc (at most once).

    ``python_args`` is what follows the interpreter: ``["-m", "mscn_core", …]`` for the
    CLI, ``[script, *sys.argv[1:]]`` for a benchmark script.

    Returns normally (nothing to do) when tcmalloc is absent, already active, opted out,
    or a previous re-exec did not take.
    """
    if (os.environ.get(_REEXEC_MARK) or active_allocator() == "tcmalloc"
            or not sys.platform.startswith("linux")):
        return
    env = preload_env()
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return  # no library, or opted out with MSCN_ALLOCATOR=glibc
    env[_REEXEC_MARK] = "1"
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *python_args], env)
    except OSError:
        return  # could not exec: carry on under glibc
