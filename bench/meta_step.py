"""Meta-training outer-step throughput and peak memory: our batched core vs a plain MAML loop.

DESIGN §7: one outer step = 3 second-order MetaSGD inner steps on 8 items + outer loss +
backward + Adam step, 2 threads. Compared on the same config and the same numbers:

* ``ours``          mscn_core: ``adapt(..., training=True)`` batched over items, backward, Adam
* ``ours_ckpt``     the same with per-step gradient checkpointing (``checkpoint_steps=True``)
* ``grad-bmm`` / ``grad-vmap``  mscn-grad (§3.3.1) with per-item gradients batched by
                    one grad over (B, out, in) weights vs torch.func vmap(grad(functional_call))
* ``baseline_loop`` a straightforward PyTorch MAML written here (COIN++-style per-item loop:
                    for each item 3 inner steps on its modulations with ``create_graph=True``,
                    sum the losses, backward, Adam), with the same MetaSGD per-shift rates

A further child alternates the three step by step (paired timings under the same load:
on a shared machine the per-item loop, with its many tiny ops, suffers far more from
stolen cores than the batched step, so unpaired medians can mislead).

Every configuration runs in a fresh child process; peak memory is ``ru_maxrss`` at the
end minus ``ru_maxrss`` after imports and setup (so it is the training step's own peak).
A check child first verifies that the baseline computes the same loss and meta-gradient
as ours (so the comparison is of implementations, not of different maths).

Every child runs under the same allocator: tcmalloc by default (what ``mscn`` itself uses,
mscn_core/allocator.py), ``--allocator glibc`` for the system default.

Usage: ``python bench/meta_step.py [--large] [--steps N] [--allocator glibc]``;
writes bench/results/meta_step.json.
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

from mscn_core.allocator import active_allocator, preload_env, tcmalloc_path
from mscn_core.atomic import write_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "meta_step.json"

# DESIGN §7: COIN++'s own (batched) PyTorch code on this machine, quoted, not re-measured.
COINPP_REFERENCE = {
    "small": {"seconds_per_step": 1.05, "peak_gb": [2.8, 3.3]},
    "large": {"seconds_per_step": 11.0, "peak_gb": 5.2, "peak_gb_checkpointed": [1.7, 1.85]},
}

CONFIGS = {
    # 4 sine layers × 128 + linear output, per-unit shifts, 4096 points on the sphere
    "small": {"depth": 5, "width": 128, "method": "metasgd-dense", "points": "sphere4096",
              "latent_dim": None},
    # 9 sine layers × 256, 46×90 grid, Functa with a 64-d latent
    "large": {"depth": 10, "width": 256, "method": "functa", "points": "grid46x90",
              "latent_dim": 64},
    # §3.3.1 (mscn-grad: every weight's inner update gated, per-item weights) with the two
    # ways of batching per-item gradients: one autograd.grad over (B, out, in) weights
    # (batched matmuls) vs torch.func vmap(grad(functional_call)).
    **{f"grad-{impl}": {"depth": 5, "width": 128, "method": "mscn-grad", "points": "sphere4096",
                        "latent_dim": None, "grad_impl": impl} for impl in ("bmm", "vmap")},
}
BATCH, INNER_STEPS, W0 = 8, 3, 30.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# -- child side --------------------------------------------------------------------------


def _data(cfg: dict, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    if cfg["points"] == "sphere4096":
        v = torch.randn(BATCH, 4096, 3, generator=g)
        coords = v / v.norm(dim=-1, keepdim=True)
    else:  # 46×90 lat/lon grid as sphere points, the same for every item
        lat = torch.linspace(-90, 90, 46).deg2rad()[:, None]
        lon = torch.linspace(0, 360 - 4, 90).deg2rad()[None, :]
        xyz = torch.stack(torch.broadcast_tensors(lat.cos() * lon.cos(), lat.cos() * lon.sin(),
                                                  lat.sin() + 0 * lon), -1).reshape(-1, 3)
        coords = xyz.expand(BATCH, -1, -1).contiguous()
    a = torch.rand(BATCH, 1, 3, generator=g) * 3 + 1
    ph = torch.rand(BATCH, 1, 3, generator=g) * 6.28
    targets = 0.5 + 0.15 * torch.sin(a * coords + ph).sum(-1, keepdim=True)  # smooth, in (0, 1)
    return coords, targets


def _build(cfg: dict):
    import torch

    from mscn_core.methods import MethodConfig, build_representation
    from mscn_core.siren import SirenConfig

    siren = SirenConfig(in_dim=3, out_dim=1, width=cfg["width"], depth=cfg["depth"], w0=W0,
                        w0_first=W0)
    mcfg = MethodConfig(method=cfg["method"], inner_steps=INNER_STEPS, budget=None,
                        latent_dim=cfg["latent_dim"] or 256,
                        grad_impl=cfg.get("grad_impl", "bmm"))
    return build_representation(siren, mcfg, torch.Generator().manual_seed(0))


def _ours_step_fn(rep, coords, targets, checkpoint_steps: bool):
    import torch

    from mscn_core.meta import adapt, item_losses
    from mscn_core.modality import Modality
    from mscn_core.signals import Batch

    params = [p for p in rep.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-6)
    batch = Batch(coords, targets, torch.ones(coords.shape[:2]))
    pointwise = Modality()  # the contract's default: pointwise masked MSE

    def step() -> float:
        state, ctx = adapt(rep, batch, pointwise, training=True,
                           checkpoint_steps=checkpoint_steps)
        loss = item_losses(rep, pointwise, state, ctx, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step, params


class LoopMAML:
    """Plain PyTorch MAML with a per-item Python loop (what one writes first)."""

    def __init__(self, rep):
        import torch

        self.cfg = rep.siren_cfg
        self.weights = [p.detach().clone().requires_grad_(True) for p in rep.net.params]
        self.functa = hasattr(rep, "latent_to_shifts")
        if self.functa:
            self.map_w = rep.latent_to_shifts.weight.detach().clone().requires_grad_(True)
            self.map_b = rep.latent_to_shifts.bias.detach().clone().requires_grad_(True)
            self.rates = rep.latent_rates.detach().clone().requires_grad_(True)
            self.mod_shape = (rep.cfg.latent_dim,)
            self.params = [*self.weights, self.map_w, self.map_b, self.rates]
        else:
            self.rates = rep.shift_rates.detach().clone().requires_grad_(True)
            self.mod_shape = (self.cfg.depth - 1, self.cfg.width)
            self.params = [*self.weights, self.rates]
        self.torch = torch

    def forward(self, x, mod):
        f = self.torch.nn.functional
        shifts = mod
        if self.functa:
            shifts = f.linear(mod, self.map_w, self.map_b).reshape(self.cfg.depth - 1, -1)
        h = x
        for i in range(self.cfg.depth - 1):
            w0 = self.cfg.w0_first if i == 0 else self.cfg.w0
            h = self.torch.sin(w0 * (f.linear(h, self.weights[2 * i], self.weights[2 * i + 1])
                                     + shifts[i]))
        return f.linear(h, self.weights[-2], self.weights[-1]) + self.cfg.output_offset

    def outer_loss(self, coords, targets):
        torch = self.torch
        total = 0.0
        rates = self.rates.clamp(1e-6, 1.0)
        for i in range(coords.shape[0]):  # the per-item loop
            mod = torch.zeros(self.mod_shape, requires_grad=True)
            for _ in range(INNER_STEPS):
                loss = ((self.forward(coords[i], mod) - targets[i]) ** 2).mean()
                (g,) = torch.autograd.grad(loss, mod, create_graph=True)
                mod = mod - rates * g
            total = total + ((self.forward(coords[i], mod) - targets[i]) ** 2).mean()
        return total / coords.shape[0]


def _baseline_step_fn(rep, coords, targets):
    import torch

    maml = LoopMAML(rep)
    opt = torch.optim.Adam(maml.params, lr=1e-6)

    def step() -> float:
        loss = maml.outer_loss(coords, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(maml.params, 1.0)
        opt.step()
        return float(loss.detach())

    return step, maml


def child_check(cfg: dict) -> dict:
    """Same loss and meta-gradient from both implementations (on 512 points)."""
    import torch

    from mscn_core.meta import adapt, item_losses
    from mscn_core.modality import Modality
    from mscn_core.signals import Batch

    torch.set_num_threads(2)
    rep = _build(cfg)
    coords, targets = _data(cfg)
    coords, targets = coords[:, :512].contiguous(), targets[:, :512].contiguous()
    batch = Batch(coords, targets, torch.ones(coords.shape[:2]))
    pointwise = Modality()  # the contract's default: pointwise masked MSE
    state, ctx = adapt(rep, batch, pointwise, training=True)
    ours = item_losses(rep, pointwise, state, ctx, batch).mean()
    ours_params = list(rep.net.params) + (
        [rep.latent_to_shifts.weight, rep.latent_to_shifts.bias, rep.latent_rates]
        if maml_is_functa(rep) else [rep.shift_rates])
    g_ours = torch.autograd.grad(ours, ours_params)
    maml = LoopMAML(rep)
    base = maml.outer_loss(coords, targets)
    g_base = torch.autograd.grad(base, maml.params)
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-12))
              for a, b in zip(g_ours, g_base, strict=True))
    return {"loss_ours": float(ours.detach()), "loss_baseline": float(base.detach()),
            "max_rel_grad_diff": rel}


def maml_is_functa(rep) -> bool:
    return hasattr(rep, "latent_to_shifts")


def child_run(cfg: dict, impl: str, warmup: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rep = _build(cfg)
    coords, targets = _data(cfg)
    if impl == "baseline_loop":
        step, _ = _baseline_step_fn(rep, coords, targets)
    else:
        step, _ = _ours_step_fn(rep, coords, targets, checkpoint_steps=impl == "ours_ckpt")
    base_rss = _rss_mb()
    losses = [step() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "allocator": active_allocator(),
            "median_s": statistics.median(times), "min_s": min(times),
            "times_s": [round(t, 4) for t in times], "peak_mb_over_baseline": _rss_mb() - base_rss,
            "baseline_rss_mb": base_rss, "final_loss": losses[-1],
            "all_finite": all(math.isfinite(v) for v in losses)}


def child_interleaved(cfg: dict, warmup: int, rounds: int) -> dict:
    """ours / loop / ours_ckpt steps alternated in one process: paired under the same load."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rep = _build(cfg)
    coords, targets = _data(cfg)
    fns = {"baseline_loop": _baseline_step_fn(rep, coords, targets)[0],
           "ours": _ours_step_fn(rep, coords, targets, checkpoint_steps=False)[0]}
    rep_ck = _build(cfg)
    fns["ours_ckpt"] = _ours_step_fn(rep_ck, coords, targets, checkpoint_steps=True)[0]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    ratios = [b / o for b, o in zip(times["baseline_loop"], times["ours"], strict=True)]
    ck = [c / o for c, o in zip(times["ours_ckpt"], times["ours"], strict=True)]
    return {"median_s": {k: statistics.median(v) for k, v in times.items()},
            "min_s": {k: min(v) for k, v in times.items()},
            "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "median_paired_ratio_loop_over_ours": statistics.median(ratios),
            "median_paired_ratio_ckpt_over_ours": statistics.median(ck)}


# -- parent side -------------------------------------------------------------------------


ALLOCATOR = {"name": "tcmalloc"}  # set by main(); every child of one run uses the same


def _spawn(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    if ALLOCATOR["name"] == "tcmalloc":
        env = preload_env(env)
    else:
        env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_config(name: str, warmup: int, steps: int, timeout: float,
                 interleave: bool = True) -> dict:
    cfg = CONFIGS[name]
    print(f"[{name}] {cfg}", flush=True)
    res: dict = {"config": {**cfg, "items": BATCH, "inner_steps": INNER_STEPS, "w0": W0,
                            "second_order": True, "threads": 2, "warmup_steps": warmup,
                            "timed_steps": steps},
                 "check": _spawn(["--child-check", name], timeout)}
    print(f"  check: {res['check']}", flush=True)
    for impl in ("ours", "baseline_loop", "ours_ckpt"):
        r = _spawn(["--child", name, impl, str(warmup), str(steps)], timeout)
        res[impl] = r
        print(f"  {impl:<14} median {r['median_s']:.3f} s/step  (min {r['min_s']:.3f})  "
              f"peak +{r['peak_mb_over_baseline']:.0f} MB", flush=True)
    res["speedup_baseline_over_ours"] = res["baseline_loop"]["median_s"] / res["ours"]["median_s"]
    if interleave:
        il = _spawn(["--child-interleaved", name, str(warmup), str(steps)], timeout)
        res["interleaved"] = il
        print(f"  interleaved medians {il['median_s']}, paired loop/ours "
              f"{il['median_paired_ratio_loop_over_ours']:.2f}x, ckpt/ours "
              f"{il['median_paired_ratio_ckpt_over_ours']:.2f}x", flush=True)
    res["memory_ratio_ckpt_over_ours"] = (res["ours_ckpt"]["peak_mb_over_baseline"]
                                          / res["ours"]["peak_mb_over_baseline"])
    res["time_ratio_ckpt_over_ours"] = res["ours_ckpt"]["median_s"] / res["ours"]["median_s"]
    res["coinpp_reference_design_s7"] = COINPP_REFERENCE[name]
    res["speedup_coinpp_reference_over_ours"] = (COINPP_REFERENCE[name]["seconds_per_step"]
                                                 / res["ours"]["median_s"])
    print(f"  speedup (loop/ours) {res['speedup_baseline_over_ours']:.2f}x, checkpointing "
          f"memory x{res['memory_ratio_ckpt_over_ours']:.2f}, "
          f"time x{res['time_ratio_ckpt_over_ours']:.2f}", flush=True)
    return res


def bench_grad_impls(warmup: int, steps: int, timeout: float) -> dict:
    """mscn-grad outer step: batched-matmul per-item gradients vs torch.func vmap."""
    res: dict = {}
    for name in ("grad-bmm", "grad-vmap"):
        r = _spawn(["--child", name, "ours", str(warmup), str(steps)], timeout)
        res[name] = {"config": CONFIGS[name], **r}
        print(f"  {name:<10} median {r['median_s']:.3f} s/step  (min {r['min_s']:.3f})  "
              f"peak +{r['peak_mb_over_baseline']:.0f} MB", flush=True)
    res["time_ratio_vmap_over_bmm"] = res["grad-vmap"]["median_s"] / res["grad-bmm"]["median_s"]
    res["memory_ratio_vmap_over_bmm"] = (res["grad-vmap"]["peak_mb_over_baseline"]
                                         / res["grad-bmm"]["peak_mb_over_baseline"])
    print(f"  mscn-grad vmap/bmm: time x{res['time_ratio_vmap_over_bmm']:.2f}, memory "
          f"x{res['memory_ratio_vmap_over_bmm']:.2f}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-check":
        print(json.dumps(child_check(CONFIGS[argv[1]])))
        return 0
    if argv and argv[0] == "--child-interleaved":
        print(json.dumps(child_interleaved(CONFIGS[argv[1]], int(argv[2]), int(argv[3]))))
        return 0
    if argv and argv[0] == "--child":
        name, impl, warmup, steps = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(child_run(CONFIGS[name], impl, warmup, steps)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed outer steps (>= 10)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--large", action="store_true",
                    help="also run DESIGN §7's 9×256 Functa config on the 46×90 grid")
    ap.add_argument("--large-steps", type=int, default=None,
                    help="timed steps for the large config (default: --steps)")
    ap.add_argument("--no-interleave", action="store_true",
                    help="skip the paired (alternating) timing child")
    ap.add_argument("--no-grad-impls", action="store_true",
                    help="skip the mscn-grad bmm vs torch.func vmap comparison")
    ap.add_argument("--allocator", choices=("tcmalloc", "glibc"), default="tcmalloc",
                    help="allocator of every child (tcmalloc is what `mscn` uses when the "
                         "system has it; see mscn_core/allocator.py)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    if args.allocator == "tcmalloc" and tcmalloc_path() is None:
        ap.error("tcmalloc is not installed (Debian: libtcmalloc-minimal4); use --allocator glibc")
    ALLOCATOR["name"] = args.allocator

    t0 = time.perf_counter()
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
              "allocator": args.allocator,
              "peak_memory": "ru_maxrss of a fresh child at the end minus after imports/setup",
              "results": {}}
    report["results"]["small"] = bench_config("small", args.warmup, args.steps, 1800,
                                              interleave=not args.no_interleave)
    if not args.no_grad_impls:
        print("[mscn-grad per-item gradients: bmm vs torch.func vmap]", flush=True)
        report["results"]["mscn_grad_impls"] = bench_grad_impls(args.warmup, args.steps, 1800)
    if args.large:
        report["results"]["large"] = bench_config("large", args.warmup,
                                                  args.large_steps or args.steps, 3600,
                                                  interleave=not args.no_interleave)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    write_atomic(args.out, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
