"""Start-up time of the ``mscn`` command line: ``mscn --help`` and ``mscn modalities``.

Target (issue 13): both under one second. Each command runs ``--repeats`` times in a fresh
subprocess, interleaved with the baseline ``python -c pass`` in the same run, so a loaded
machine slows all of them alike; medians, minima and the ratio to the baseline are saved.
Commands run the installed ``mscn`` script next to this interpreter (what a user types,
tcmalloc re-exec included) with the allocator variables of this process removed.
``--overlay LABEL=DIR`` times other code in the same run (DIR holds ``mscn_core/`` and
``mscn_plugins/``, e.g. the code before a change): same machine, same load.

A last child lists the modalities in-process and reports which heavy libraries the listing
imported (torch, trimesh, xarray, ...): the usual reason for a slow ``mscn modalities``.

Usage: ``python bench/cli_startup.py [--repeats 10] [--overlay before=DIR]``
→ bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HEAVY = ("torch", "trimesh", "open3d", "xarray", "pandas", "scipy", "matplotlib", "cartopy",
         "netCDF4", "skimage", "igl")
PROBE = f"""
import json, sys
from mscn_core import registry
rows = registry.list_modalities()
print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules],
                  "status": {{r.name: r.status for r in rows}}}}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first")
    ap.add_argument("--overlay", action="append", default=[], metavar="LABEL=DIR",
                    help="also time the CLI with DIR first on PYTHONPATH (a copy of mscn_core/ "
                         "and mscn_plugins/, e.g. the code before a change), in the same run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.out = Path(args.out or C.RESULTS / "cli_startup.json")
    return args


def child_env(pythonpath: str | None) -> dict[str, str]:
    """This environment without what a tcmalloc re-exec of the bench itself would add."""
    env = dict(os.environ)
    for k in ("LD_PRELOAD", "MSCN_ALLOCATOR_REEXEC", "PYTHONPATH"):
        env.pop(k, None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def mscn_command() -> list[str]:
    script = Path(sys.executable).parent / "mscn"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mscn_core"]


def time_once(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): "
                         f"{done.stderr.decode(errors='replace').strip()[-300:]}")
    return dt


def main(argv=None) -> int:
    args = parse_args(argv)
    # Children run outside the checkout: ``python -m`` (the tcmalloc re-exec) puts the
    # current directory first on sys.path, which would hide an overlay.
    cwd = tempfile.gettempdir()
    mscn = mscn_command()
    variants = {"working tree": None}
    for item in args.overlay:
        label, _, path = item.partition("=")
        variants[label] = str(Path(path).resolve())
    jobs = {("baseline", "python -c pass"): ([sys.executable, "-c", "pass"], child_env(None))}
    for label, path in variants.items():
        for name, extra in (("mscn --help", ["--help"]), ("mscn modalities", ["modalities"])):
            jobs[(label, name)] = ([*mscn, *extra], child_env(path))
    for cmd, env in jobs.values():
        for _ in range(args.warmup):
            time_once(cmd, env, cwd)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in jobs}
    for _ in range(args.repeats):  # interleaved: load changes hit every command alike
        for key, (cmd, env) in jobs.items():
            times[key].append(time_once(cmd, env, cwd))
    base = statistics.median(times[("baseline", "python -c pass")])
    rows = {}
    for (label, name), ts in times.items():
        med = statistics.median(ts)
        rows.setdefault(label, {})[name] = {
            "median_s": med, "min_s": min(ts), "max_s": max(ts), "ratio_to_python": med / base,
            "over_python_s": med - base, "under_1s": med < 1.0, "times_s": ts}
    imports = {}
    for label, path in variants.items():
        probe = subprocess.run([sys.executable, "-c", PROBE], env=child_env(path), cwd=cwd,
                               capture_output=True, text=True, check=True)
        imports[label] = json.loads(probe.stdout.strip().splitlines()[-1])
    result = {"benchmark": "cli_startup", "repeats": args.repeats, "warmup": args.warmup,
              "command": mscn, "overlays": {k: v for k, v in variants.items() if v},
              "results": rows, "listing_imports": imports,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform(),
                          "load_average": list(os.getloadavg())}}
    C.write_json(args.out, result)
    table = [[label, name, r["median_s"], r["min_s"], r["ratio_to_python"], r["under_1s"]]
             for label, group in rows.items() for name, r in group.items()]
    print(C.markdown_table(["code", "command", "median s", "min s", "× python", "< 1 s"], table))
    for label, got in imports.items():
        print(f"{label}: listing imported {', '.join(got['heavy']) or 'nothing heavy'}")
    print(f"→ {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
