"""Peak memory of ``mscn meta-train`` on an archive of K files and of 10·K files: streamed
(``scan``/``load``, mscn_core/streaming.py) against eager reading (issue 11).

The archives are written here, into a temporary folder, from real fields: the vendored
ERA5 file (10 members × 4 analysis times × 850/500 hPa, t and z, 3° grid) is split into
one NetCDF file per (member, time), 4 fields each, and the 10× archive repeats those
files re-dated by 2, 4, … 18 days (the same values under new times, so every field has
its own label). Nothing else is synthetic.

Each configuration runs the real command (``mscn_core.cli.main``, ``meta-train --data
'DIR/*.nc'``) in a fresh child process; the child wraps the core's ``meta_train`` and
``fit_codec`` to note ``ru_maxrss`` (high-water marks, MB) after imports, after reading
(the listing, for streamed data), after the meta-training steps, and at the end (after
the codec fit, on at most 1,024 training items, loaded a window at a time), and the time
of each outer step. The reader's
items/s: loading and converting 64 random items through the lazy sequence (streamed) or
reading every item (eager). ``flat_through_steps`` / ``flat_to_end`` hold when the streamed
peak through the steps / through the codec fit at 10·K is within ``MARGIN`` of the one at K.

Usage: ``python bench/streaming_rss.py [--files 40] [--scale 10] [--steps 15]``; writes
bench/results/streaming_rss.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from _common import ERA5, RESULTS, log, write_json  # noqa: E402

from mscn_core.allocator import active_allocator, preload_env, tcmalloc_path  # noqa: E402

OUT = RESULTS / "streaming_rss.json"
MARGIN = 1.2  # streamed peak at 10·K over the one at K
CODEC_NOTE = ("pipeline.train_checkpoint fits the codec on streaming.bounded(tr) (at most "
              "CODEC_ITEMS = 1024 training items, seeded) and adapt_codes loads them "
              "ADAPT_WINDOW batches at a time, so that phase is bounded too")
READER_ITEMS = 64  # random items timed through the lazy sequence
TRAIN_ARGS = ["--depth", "3", "--width", "32", "--budget", "32", "--batch-size", "8",
              "--points-per-item", "1024", "--outer-lr", "3e-4", "--val-every", "1000",
              "--progress", "false"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# -- archives ------------------------------------------------------------------------------


def build_archive(folder: Path, n_files: int) -> dict:
    """``n_files`` NetCDF files of real ERA5 fields (see the module docstring)."""
    import numpy as np
    import xarray as xr

    folder.mkdir(parents=True, exist_ok=True)
    with xr.open_dataset(ERA5) as ds:
        ds = ds.load()
    slices = [(m, t) for m in range(ds.sizes["number"]) for t in range(ds.sizes["time"])]
    written = 0
    for copy in range(-(-n_files // len(slices))):
        shift = np.timedelta64(2 * copy, "D")
        for m, t in slices:
            if written == n_files:
                break
            part = ds.isel(number=[m], time=[t])
            part = part.assign_coords(time=part.time + shift,
                                      valid_time=part.valid_time + shift)
            stamp = str(part.time.values[0])[:13].replace("-", "").replace("T", "")
            part.to_netcdf(folder / f"era5_m{m}_{stamp}.nc")
            written += 1
    size = sum(p.stat().st_size for p in folder.glob("*.nc"))
    return {"folder": str(folder), "files": written, "fields": written * 4,
            "megabytes_on_disk": size / 2**20}


# -- child ---------------------------------------------------------------------------------


def child(mode: str, pattern: str, steps: int, out: str, codec: bool) -> dict:
    """One ``meta-train`` run; ``mode`` = stream (the default path) or eager; ``codec``:
    run the codec fit (else skipped: the checkpoint has no codec tables)."""
    import mscn_core.pipeline as pipeline
    import mscn_core.streaming as streaming
    from mscn_core import cli
    from mscn_core.registry import get_modality

    get_modality("sphere")  # the plugin and xarray imported: part of the baseline
    rec: dict = {"mode": mode, "rss_mb": {"after_imports": _rss_mb()}, "allocator":
                 active_allocator()}
    if mode == "eager":
        streaming.offers_streaming = lambda modality: False  # cli._read_items asks this
    read_items = cli._read_items

    def timed_read(modality, paths, options, lazy=False):
        t0 = time.perf_counter()
        items = read_items(modality, paths, options, lazy=lazy)
        rec.setdefault("read_seconds", time.perf_counter() - t0)
        rec.setdefault("items", len(items))
        rec["rss_mb"].setdefault("after_read", _rss_mb())
        return items

    cli._read_items = timed_read
    real_meta_train, real_fit_codec = pipeline.meta_train, pipeline.fit_codec
    stamps: list[tuple[float, dict]] = []

    def meta_train(rep, tr, va, cfg, modality, on_log=None, **more):
        rec["rss_mb"]["after_fit_state"] = _rss_mb()
        rec["n_train"], rec["n_val"] = len(tr), len(va)
        if streaming.is_lazy(tr):  # the reader alone: random items, cold, item -> Signal
            pick = random.Random(1).sample(range(len(tr)), min(READER_ITEMS, len(tr)))
            probe = tr.subset(pick)
            t0 = time.perf_counter()
            for i in range(len(probe)):
                probe[i]  # noqa: B018
            rec["reader_items_per_s"] = len(probe) / (time.perf_counter() - t0)
        def noted(r: dict) -> None:
            stamps.append((time.perf_counter(), r))
            if on_log is not None:
                on_log(r)

        result = real_meta_train(rep, tr, va, cfg, modality, on_log=noted, **more)
        rec["rss_mb"]["after_steps"] = _rss_mb()
        if streaming.is_lazy(tr):
            rec["train_items_loaded_by_steps"] = tr.loads
        return result

    def fit_codec(ck, modality, signals, *a, **k):
        if codec:
            t0 = time.perf_counter()
            real_fit_codec(ck, modality, signals, *a, **k)
            rec["codec_fit_seconds"] = time.perf_counter() - t0

    pipeline.meta_train, pipeline.fit_codec = meta_train, fit_codec
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = cli.main(["meta-train", "--modality", "sphere", "--data", pattern,
                         "--outer-steps", str(steps), *TRAIN_ARGS, "-o", out,
                         "--overwrite"])
    if code != 0:
        raise SystemExit(f"meta-train failed ({code})")
    rec["command_seconds"] = time.perf_counter() - t0
    rec["rss_mb"]["end"] = _rss_mb()
    rec["train_summary"] = json.loads(printed.getvalue())
    steps_t = [t for t, r in stamps if "loss" in r and "val_loss" not in r]
    firsts = [t for t, r in stamps if r.get("step") == 0]
    times = [b - a for a, b in zip(firsts[:1] + steps_t, steps_t, strict=False)]
    times = times[1:]  # the first step pays for warming up
    rec["step_seconds_median"] = sorted(times)[len(times) // 2] if times else None
    rec["step_seconds_min"] = min(times) if times else None  # the least disturbed step
    rec["loadavg"] = os.getloadavg()  # shared machine: step times move with it
    if mode == "eager" and rec.get("read_seconds"):
        rec["reader_items_per_s"] = rec["items"] / rec["read_seconds"]
    batch = int(TRAIN_ARGS[TRAIN_ARGS.index("--batch-size") + 1])
    if rec.get("reader_items_per_s"):  # streamed: paid inside every step; eager: up front
        rec["reader_seconds_per_step_batch"] = batch / rec["reader_items_per_s"]
    return rec


# -- parent --------------------------------------------------------------------------------


def _spawn(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", TQDM_DISABLE="1")
    if tcmalloc_path():
        env = preload_env(env)  # what `mscn` itself runs under
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        print(json.dumps(child(argv[1], argv[2], int(argv[3]), argv[4], argv[5] == "codec")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=40, help="files of the small archive (K)")
    ap.add_argument("--scale", type=int, default=10, help="the large archive has K·scale")
    ap.add_argument("--steps", type=int, default=15, help="outer meta-training steps")
    ap.add_argument("--no-codec-fit", dest="codec_fit", action="store_false",
                    help="skip the codec fit at the end of meta-training (see codec_fit_note)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    report: dict = {
        "what": __doc__.split("\n\n")[0], "data": __doc__.split("\n\n")[1],
        "command": ["mscn", "meta-train", "--modality", "sphere", "--data", "'DIR/*.nc'",
                    "--outer-steps", str(args.steps), *TRAIN_ARGS],
        "codec_fit": args.codec_fit, "codec_fit_note": CODEC_NOTE,
        "margin": MARGIN, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "archives": {}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="mscn-streaming-") as tmp:
        sizes = {"K": args.files, f"{args.scale}K": args.files * args.scale}
        for name, n in sizes.items():
            report["archives"][name] = build_archive(Path(tmp) / name, n)
            log(f"archive {name}: {report['archives'][name]}")
        for mode in ("stream", "eager"):
            for name in sizes:
                pattern = str(Path(tmp) / name / "*.nc")
                r = _spawn(["--child", mode, pattern, str(args.steps),
                            str(Path(tmp) / f"{mode}_{name}.safetensors"),
                            "codec" if args.codec_fit else "no-codec"], 3600)
                report["runs"][f"{mode}_{name}"] = r
                log(f"{mode} {name}: rss {r['rss_mb']}, step {r['step_seconds_median']}, "
                    f"reader {r.get('reader_items_per_s')} items/s")
    big = f"{args.scale}K"
    ratio = {}
    for mode in ("stream", "eager"):
        a, b = report["runs"][f"{mode}_K"]["rss_mb"], report["runs"][f"{mode}_{big}"]["rss_mb"]
        ratio[mode] = {phase: b[phase] / a[phase] for phase in ("after_steps", "end")}
    report["peak_ratio_large_over_small"] = ratio
    report["flat_through_steps"] = ratio["stream"]["after_steps"] <= MARGIN
    report["flat_to_end"] = ratio["stream"]["end"] <= MARGIN
    report["loadavg_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - t0
    path = write_json(args.out, report)
    print(json.dumps(report["peak_ratio_large_over_small"], indent=1))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
