"""NeRF: rendering / inner-step throughput and memory, and novel-view quality vs baselines.

Part 1, throughput (each measurement in a fresh child process, 1 thread, so its peak
memory is its own: ``ru_maxrss`` after the step minus after setup; each row records the
machine's 1-minute load average before and after, since on a shared machine the seconds
depend on what else runs, the memory does not):

* ``render``: rays per second of a no-grad render (what ``fit``/``decode`` do per view);
* ``inner``:  rays per second of one encode-time inner step (forward, gradient w.r.t. the
  modulations, update) on one scene's V×R rays;
* ``outer``:  rays per second of one meta-training step (B scenes × V×R rays, 3
  second-order MetaSGD steps, outer backward), shipped config only.

at the shipped CPU config and at the paper's (15×512 SIREN, 32 samples, 8 views × 1024
rays). The paper's inner step at 8 × 1024 = 8192 rays (262k points through 15 layers of
512 units, activations kept for the backward pass) is **measured** like the others; it
needs ~16 GB of memory (linear in rays: ~1.9 MB per ray, as the 512- and 1024-ray steps
predict). Before running it the bench projects its peak linearly from those two steps
and reads ``MemAvailable`` from ``/proc/meminfo``: if less than the projection plus a
2 GB margin is free (a shared machine), it waits up to ``--memory-wait`` seconds, then
keeps the **projection** instead, marked ``"projected": true`` with the reason. The
measured row keeps the projection beside it (``projection_from_512_1024``).

Part 2, quality on the vendored held-out test scenes (``datasets/data/scenes/test``:
renders of real meshes, not SRN Cars; other meshes than training): mean per-view PSNR /
SSIM of functa's novel views 23, 55, 82, 119 after adapting on view 63, for

* the shipped checkpoint: 0 (the meta-learned init), 3 (its training) and 10 inner steps,
  and 3 steps quantised to 6 bits (the real stream; bits per context pixel);
* baselines: an all-white image; the mean training view (mean over every view of the
  checkpoint's training scenes); COIN-style fitting from scratch on the context view with
  the shipped architecture (Adam; 3 steps = "the same steps", and 300 steps).

Usage: ``python bench/nerf_render.py`` (both parts, one invocation: how
``bench/results/nerf_render.json`` is made) → that JSON and a markdown table on stdout.
``--skip-throughput`` / ``--skip-quality`` leave a part out; with ``--merge`` the part
left out is kept from the existing JSON (each part records the ``command`` and ``when``
that produced it, so a merged file says it took two invocations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENES = ROOT / "datasets" / "data" / "scenes"
CKPT = ROOT / "plugins" / "checkpoints" / "nerf_scenes.safetensors"
TRAIN_SCENES = ROOT / "out" / "nerf_scenes" / "train"  # build_nerf.py renders them here
RESULTS = C.RESULTS / "nerf_render.json"
CONTEXT, NOVEL = [63], [23, 55, 82, 119]

PAPER = {"depth": 15, "width": 512, "samples": 32, "views": 8, "rays": 8192, "batch": 32}
MEMORY_MARGIN_MB = 2048.0  # beyond the projected peak: the child's own baseline, others' jobs


def shipped_config() -> dict:
    """The shipped checkpoint's recipe, from plugins/checkpoints/build_nerf.py."""
    sys.path.insert(0, str(ROOT / "plugins" / "checkpoints"))
    import build_nerf as B

    return {"depth": B.DEPTH, "width": B.WIDTH, "samples": B.SAMPLES, "views": B.VIEWS,
            "rays": B.RAYS_PER_ITEM, "batch": B.BATCH, "encode_rays": B.RAYS_PER_STEP}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- part 1: children ------------------------------------------------------------------------
def child(spec: dict) -> dict:
    import torch

    from mscn_core.meta import adapt, item_losses
    from mscn_core.methods import MethodConfig, build_representation
    from mscn_core.signals import sample_batch
    from mscn_core.siren import SirenConfig
    from mscn_plugins.nerf import NerfModality, NerfOptions

    torch.set_num_threads(1)
    m = NerfModality()
    opts = NerfOptions(samples=spec["samples"], views_per_step=spec["views"])
    (scene,) = m.read(SCENES / "test" / "jeep1", opts)
    sig = m.to_signal(scene, opts)
    rep = build_representation(
        SirenConfig(in_dim=3, out_dim=4, width=spec["width"], depth=spec["depth"], w0=30.0,
                    w0_first=30.0), MethodConfig(method="mscn", budget=256),
        torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    rays, kind = spec["rays_measured"], spec["kind"]
    base = _rss_mb()
    load_before = os.getloadavg()[0]
    times = []
    if kind == "render":
        rep.eval()
        state, ctx = rep.init_state(1), rep.context(1, False)
        coords = sig.coords[:rays][None]
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            with torch.no_grad():
                m.render(lambda p: rep.predict(state, ctx, p), coords)
            times.append(time.perf_counter() - t)
    elif kind == "inner":
        rep.eval()
        batch = sample_batch(m, [sig], rays, gen)
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            adapt(rep, batch, m, steps=1)
            times.append(time.perf_counter() - t)
    else:  # one meta-training step, B scenes
        b = spec["batch"]
        batch = sample_batch(m, [sig] * b, rays, gen)
        params = [p for p in rep.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-6)
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            state, ctx = adapt(rep, batch, m, training=True)
            loss = item_losses(rep, m, state, ctx, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        rays *= b
    sec = statistics.median(times)
    return {**spec, "seconds": sec, "rays_per_second": rays / sec,
            "peak_mb": _rss_mb() - base, "all_seconds": times,
            "load_average_1min": [load_before, os.getloadavg()[0]]}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        return {**spec, "error": last or f"exit status {r.returncode} (killed: out of memory?)"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def mem_available_mb() -> float | None:
    """``MemAvailable`` of ``/proc/meminfo`` in MB (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _spec(name: str, cfg: dict, kind: str, rays: int, repeats: int) -> dict:
    return {"config": name, "kind": kind, "depth": cfg["depth"], "width": cfg["width"],
            "samples": cfg["samples"], "views": cfg["views"], "batch": cfg["batch"],
            "rays_measured": rays, "repeats": repeats}


def _measure(spec: dict) -> dict:
    C.log(f"throughput {spec['config']} {spec['kind']} {spec['rays_measured']} rays")
    row = run_child(spec)
    C.log(f"  -> {row.get('rays_per_second', row.get('error'))}")
    return row


def throughput(memory_wait: float = 0.0) -> list[dict]:
    ship = shipped_config()
    plan = [
        ("shipped", ship, "render", 4096, 3),
        ("shipped", ship, "inner", ship["encode_rays"], 3),
        ("shipped", ship, "outer", ship["rays"], 2),
        ("paper", PAPER, "render", 1024, 1),
        ("paper", PAPER, "inner", 512, 1),
        ("paper", PAPER, "inner", 1024, 1),
    ]
    rows = [_measure(_spec(*p)) for p in plan]
    # the paper's inner step at its full 8 × 1024 rays: measured when memory allows,
    # else projected linearly from 512 and 1024 rays (time and memory are linear in rays)
    n = PAPER["rays"]
    p = [r for r in rows if r["config"] == "paper" and r["kind"] == "inner" and "error" not in r]
    proj = None
    if len(p) == 2:
        (a, b) = sorted(p, key=lambda r: r["rays_measured"])
        slope_mb = (b["peak_mb"] - a["peak_mb"]) / (b["rays_measured"] - a["rays_measured"])
        slope_s = (b["seconds"] - a["seconds"]) / (b["rays_measured"] - a["rays_measured"])
        sec = b["seconds"] + slope_s * (n - b["rays_measured"])
        proj = {"seconds": sec, "rays_per_second": n / sec,
                "peak_mb": b["peak_mb"] + slope_mb * (n - b["rays_measured"])}
    need = (proj["peak_mb"] if proj else 20000.0) + MEMORY_MARGIN_MB
    deadline = time.monotonic() + memory_wait
    while True:
        free = mem_available_mb()
        if free is None or free >= need or time.monotonic() >= deadline:
            break
        C.log(f"paper inner {n} rays: {free:.0f} MB available, need {need:.0f}; waiting")
        time.sleep(min(60.0, max(1.0, deadline - time.monotonic())))
    if free is None or free >= need:
        row = _measure(_spec("paper", PAPER, "inner", n, 1))
        row["mem_available_mb_before"] = free
        if proj is not None:
            row["projection_from_512_1024"] = proj
        if "error" not in row or proj is None:
            rows.append(row)
            return rows
        why = f"the measurement failed ({row['error']})"
    else:
        why = (f"MemAvailable {free:.0f} MB < projected peak {need - MEMORY_MARGIN_MB:.0f} MB "
               f"+ {MEMORY_MARGIN_MB:.0f} MB margin (shared machine), after waiting "
               f"{memory_wait:.0f} s")
    if proj is not None:
        C.log(f"paper inner {n} rays: projected, not measured: {why}")
        rows.append({"config": "paper", "kind": "inner", "rays_measured": None,
                     "projected_rays": n, "projected": True, "projected_because": why,
                     **proj})
    return rows


# -- part 2: quality ---------------------------------------------------------------------------
def _mean_view(train_dir: Path, size: int) -> tuple[np.ndarray, str]:
    from mscn_datasets import scenes

    where = train_dir if train_dir.is_dir() else SCENES / "train"
    imgs = [s.images.mean(0) for s in scenes.read_scenes(where, size=size)]
    return np.mean(imgs, 0), str(where.relative_to(ROOT))


def _scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    p = np.clip(pred, 0, 1).astype(np.float64)
    t = truth.astype(np.float64)
    psnr = -10 * math.log10(max(float(np.mean((p - t) ** 2)), 1e-20))
    return psnr, float(structural_similarity(t, p, channel_axis=2, data_range=1.0))


def quality(ckpt: Path) -> dict:
    import torch

    from mscn_core import pipeline as P
    from mscn_core.checkpoint import Checkpoint, load_checkpoint
    from mscn_core.methods import MethodConfig, build_representation
    from mscn_core.registry import get_modality
    from mscn_core.siren import SirenConfig
    from mscn_plugins.nerf import NerfOptions

    torch.set_num_threads(1)
    ck = load_checkpoint(ckpt)
    m = get_modality("nerf")
    m.load_state(ck.modality_state)
    opts = NerfOptions(orbit_views=0)
    items = m.read(SCENES / "test", opts)
    signals = [m.to_signal(s, opts) for s in items]
    size = items[0].intrinsics.height
    truth = {s.name: np.stack([s.images[s.index(v)] for v in NOVEL]) for s in items}
    rows: dict[str, dict] = {}

    def add(name: str, preds: dict[str, np.ndarray], extra: dict | None = None) -> None:
        per = {}
        for s in items:
            sc = [_scores(p, t) for p, t in zip(preds[s.name], truth[s.name], strict=True)]
            per[s.name] = {"psnr": float(np.mean([a for a, _ in sc])),
                           "ssim": float(np.mean([b for _, b in sc]))}
        rows[name] = {"psnr": float(np.mean([v["psnr"] for v in per.values()])),
                      "ssim": float(np.mean([v["ssim"] for v in per.values()])),
                      "per_scene": per, **(extra or {})}
        C.log(f"{name}: {rows[name]['psnr']:.2f} dB, SSIM {rows[name]['ssim']:.3f}")

    add("all-white image", {s.name: np.ones_like(truth[s.name]) for s in items})
    mean, where = _mean_view(TRAIN_SCENES, size)
    add("mean training view", {s.name: np.stack([mean] * len(NOVEL)) for s in items},
        {"from": where})

    def novel_views(ckp, codes) -> dict[str, np.ndarray]:
        out = {}
        for s, c in zip(items, codes, strict=True):
            pred = P.predictor(ckp, m, c)
            poses = s.poses[[s.index(v) for v in NOVEL]]
            out[s.name] = m.render_views(pred, poses, s.intrinsics)[0]
        return out

    for steps in (0, 3, 10):
        t = time.perf_counter()
        codes = P.adapt_codes(ck, m, signals, steps=steps)
        sec = (time.perf_counter() - t) / len(signals)
        add(f"MSCN shipped, {steps} inner steps", novel_views(ck, codes),
            {"adapt_seconds_per_scene": sec})
    codes = P.adapt_codes(ck, m, signals)
    _, deq = P.quantize_codes(ck, codes, 6)
    data, rep = P.encode_items(ck, m, items, bits=6, with_metrics=False, options=opts)
    add("MSCN shipped, 3 steps, 6-bit stream", novel_views(ck, deq),
        {"bits_per_context_pixel": rep.bits_per_value,
         "payload_bits_per_context_pixel": rep.payload_bits_per_value,
         "stream_bytes_per_scene": rep.n_bytes / len(items)})
    a = ck.rep.siren_cfg
    for steps, lr in ((3, 1e-3), (300, 1e-4), (300, 1e-3)):
        arch = SirenConfig(in_dim=3, out_dim=4, width=a.width, depth=a.depth, w0=a.w0,
                           w0_first=a.w0_first)
        crep = build_representation(arch, MethodConfig(method="coin", coin_steps=steps,
                                                       coin_lr=lr))
        cck = Checkpoint(crep, "nerf", m.state(), info={"from_scratch": True})
        torch.manual_seed(0)
        t = time.perf_counter()
        ccodes = P.adapt_codes(cck, m, signals, steps=steps)
        sec = (time.perf_counter() - t) / len(signals)
        add(f"COIN from scratch, {steps} Adam steps (lr {lr:g})", novel_views(cck, ccodes),
            {"fit_seconds_per_scene": sec, "values_per_scene": crep.code_size()})
    return {"checkpoint": str(ckpt.relative_to(ROOT)), "checkpoint_sha256": ck.sha256,
            "scenes": [s.name for s in items], "size": size, "context_views": CONTEXT,
            "novel_views": NOVEL, "rows": rows}


# -- report ----------------------------------------------------------------------------------
def table(result: dict) -> str:
    lines = []
    if "throughput" in result:
        lines += ["| config | net | samples | what | rays | rays/s | peak MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["throughput"]:
            if "error" in r:
                lines.append(f"| {r['config']} | | | {r['kind']} | {r['rays_measured']} | "
                             f"error: {r['error']} | |")
                continue
            net = f"{r.get('depth', PAPER['depth'])}×{r.get('width', PAPER['width'])}"
            rays = (f"{r['projected_rays']} (projected)" if r.get("projected")
                    else str(r["rays_measured"] * (r["batch"] if r["kind"] == "outer" else 1)))
            lines.append(f"| {r['config']} | {net} | {r.get('samples', PAPER['samples'])} | "
                         f"{r['kind']} | {rays} | {r['rays_per_second']:.0f} | "
                         f"{r['peak_mb']:.0f} |")
        lines.append("")
    if "quality" in result:
        q = result["quality"]
        lines += [f"Novel views {q['novel_views']} after context {q['context_views']}, "
                  f"{len(q['scenes'])} held-out scenes at {q['size']}×{q['size']}:", "",
                  "| method | PSNR dB | SSIM | notes |", "|---|---|---|---|"]
        for name, r in q["rows"].items():
            note = ""
            if "bits_per_context_pixel" in r:
                note = (f"{r['bits_per_context_pixel']:.3f} bits/context pixel "
                        f"({r['stream_bytes_per_scene']:.0f} B/scene)")
            elif "fit_seconds_per_scene" in r:
                note = f"{r['fit_seconds_per_scene']:.1f} s/scene"
            elif "adapt_seconds_per_scene" in r:
                note = f"{r['adapt_seconds_per_scene']:.2f} s/scene"
            elif "from" in r:
                note = f"mean of {r['from']}"
            lines.append(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=str(CKPT))
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="keep the part left out (--skip-…) from the existing --out JSON")
    ap.add_argument("--memory-wait", type=float, default=600.0,
                    help="seconds to wait for enough free memory for the paper's 8192-ray "
                         "inner step before falling back to the projection (default 600)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    result: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "threads": 1, "platform": platform.platform()},
                    "when": time.strftime("%Y-%m-%d %H:%M")}
    command = "python bench/nerf_render.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    stamp = {"command": command, "when": result["when"]}
    if not args.skip_throughput:
        result["throughput"] = throughput(args.memory_wait)
        result["throughput_run"] = stamp
    if not args.skip_quality:
        result["quality"] = {**quality(Path(args.checkpoint)), **stamp}
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        for part in ("throughput", "quality"):
            if part not in result and part in old:
                result[part] = old[part]
                if part == "quality":
                    result[part].setdefault("command", "unknown (not recorded)")
                if part == "throughput":
                    result["throughput_run"] = old.get("throughput_run", {
                        "command": old.get("command", "unknown"), "when": old.get("when")})
    result["command"] = " && ".join(dict.fromkeys(
        r["command"] for r in (result.get("throughput_run"), result.get("quality"))
        if r and "command" in r))
    C.write_json(args.out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
