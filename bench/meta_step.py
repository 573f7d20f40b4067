"""Meta-training outer-step throughput and peak memory: our batched core vs a plain MAML loop.

DESIGN §7: one outer step = 3 second-order MetaSGD inner steps on 8 items + outer loss +
backward + Adam step, 2 threads. Compared on the same config and the same numbers:

* ``coinpp``        COIN++'s own code (``coinpp/models.py`` ModulatedSiren with shift
                    modulations, ``coinpp/metalearning.py`` ``outer_step``), imported from a
                    checkout given by ``--coinpp PATH`` or ``COINPP_DIR`` (never vendored;
                    without one the row is skipped and says why). COIN++ ``num_layers``
                    counts the output layer (config A: 5). Its inner loop uses one fixed
                    rate (``inner_lr``) where ours learns one per shift (MetaSGD): the same
                    work to a few thousand multiplies; the check child verifies that with our
                    rates set to that constant both compute the same loss and meta-gradient.
* ``ours``          mscn_core: ``adapt(..., training=True)`` batched over items, backward, Adam,
                    with the fused SIREN path (mscn_core/siren.py: oneDNN products on
                    feature-major activations, sin/cos computed once per layer and forward)
* ``ours_plain``    the same with the fused path off (the code path before it: ATen/MKL)
* ``ours_ckpt``     ``ours`` with per-step gradient checkpointing (``checkpoint_steps=True``)
* ``grad-bmm`` / ``grad-vmap``  mscn-grad (§3.3.1) with per-item gradients batched by
                    one grad over (B, out, in) weights vs torch.func vmap(grad(functional_call))
* ``baseline_loop`` a straightforward PyTorch MAML written here (COIN++-style per-item loop:
                    for each item 3 inner steps on its modulations with ``create_graph=True``,
                    sum the losses, backward, Adam), with the same MetaSGD per-shift rates

A further child alternates them step by step (paired timings under the same load:
on a shared machine the per-item loop, with its many tiny ops, suffers far more from
stolen cores than the batched step, so unpaired medians can mislead).

Every configuration runs in a fresh child process; peak memory is ``ru_maxrss`` at the
end minus ``ru_maxrss`` after imports and setup (so it is the training step's own peak).
A check child first verifies that the baseline computes the same loss and meta-gradient
as ours (so the comparison is of implementations, not of different maths).

Every child runs under the same allocator: tcmalloc by default (what ``mscn`` itself uses,
mscn_core/allocator.py), ``--allocator glibc`` for the system default.

Roofline: the GEMM FLOPs of one outer step (``torch.utils.flop_counter``'s formulas on the
plain path, whose products are the fused path's; equal to the closed form 21·F − 13·F₀,
F = forward FLOPs of all layers, F₀ of the first) over the machine's measured peak (best
of ten 4096³ float32 products at 2 threads, ATen/MKL and oneDNN, the higher one), timed in
the same run. Elementwise work is not counted. On a shared machine the peak is measured
under whatever load there is, so the fraction is only as good as that moment.

Usage: ``python bench/meta_step.py [--coinpp PATH] [--large] [--steps N] [--allocator glibc]``;
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

# DESIGN §7/§8: COIN++'s own code as quoted earlier. Only a label for when no checkout is
# given: the measured ``coinpp`` row (same run, same allocator) is what counts.
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


def _ours_step_fn(rep, coords, targets, checkpoint_steps: bool, fused: bool = True):
    import torch

    from mscn_core import siren
    from mscn_core.meta import adapt, item_losses
    from mscn_core.modality import Modality
    from mscn_core.signals import Batch

    params = [p for p in rep.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-6)
    batch = Batch(coords, targets, torch.ones(coords.shape[:2]))
    pointwise = Modality()  # the contract's default: pointwise masked MSE

    def step() -> float:
        with siren.fused(fused):
            state, ctx = adapt(rep, batch, pointwise, training=True,
                               checkpoint_steps=checkpoint_steps)
            loss = item_losses(rep, pointwise, state, ctx, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step, params


# -- COIN++'s own code -------------------------------------------------------------------

COINPP_INNER_LR = 1e-2  # COIN++'s default --inner_lr (main.py)


def coinpp_dir(path: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """The COIN++ checkout to import (``path``, else ``$COINPP_DIR``) or None and why not."""
    raw = path if path is not None else os.environ.get("COINPP_DIR")
    if not raw:
        return None, ("no COIN++ checkout given (--coinpp PATH or COINPP_DIR; e.g. "
                      "git clone https://github.com/EmilienDupont/coinpp): COIN++ is never "
                      "vendored, so its row is skipped")
    root = Path(raw).expanduser().resolve()
    missing = [f for f in ("coinpp/models.py", "coinpp/metalearning.py", "coinpp/losses.py")
               if not (root / f).is_file()]
    if missing:
        return None, f"{root} is not a COIN++ checkout (missing {', '.join(missing)})"
    return root, "ok"


def _import_coinpp(root: str):
    """COIN++'s ``models`` and ``metalearning`` modules, from the checkout itself."""
    sys.path.insert(0, root)
    from coinpp import metalearning, models  # noqa: PLC0415 - only with a checkout

    src = Path(models.__file__).resolve()
    if Path(root).resolve() not in src.parents:
        raise RuntimeError(f"imported coinpp from {src}, not from {root}")
    return models, metalearning


def _coinpp_model(root: str, cfg: dict):
    """ModulatedSiren as config A: shift modulations used directly (no latent network)."""
    import torch

    models, metalearning = _import_coinpp(root)
    torch.manual_seed(0)
    latent = cfg["latent_dim"] is not None  # Functa config: linear latent -> shifts
    net = models.ModulatedSiren(dim_in=3, dim_hidden=cfg["width"], dim_out=1,
                                num_layers=cfg["depth"],  # counts the output layer
                                w0=W0, w0_initial=W0, modulate_scale=False,
                                modulate_shift=True, use_latent=latent,
                                latent_dim=cfg["latent_dim"] or 64,
                                modulation_net_num_layers=1)
    return net, metalearning


def _coinpp_step_fn(root: str, cfg: dict, coords, targets):
    """What coinpp/training.py's Trainer.train_epoch does per batch (minus logging)."""
    import torch

    net, metalearning = _coinpp_model(root, cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-6)

    def step() -> float:
        out = metalearning.outer_step(net, coords, targets, inner_steps=INNER_STEPS,
                                      inner_lr=COINPP_INNER_LR, is_train=True,
                                      return_reconstructions=False,
                                      gradient_checkpointing=False)
        opt.zero_grad()
        out["loss"].backward(create_graph=False)
        opt.step()
        return float(out["loss"].detach())

    return step, net


def child_check_coinpp(cfg: dict, root: str) -> dict:
    """COIN++'s step and ours compute the same loss and meta-gradient (same weights, our
    per-shift rates all set to COIN++'s fixed inner rate, 512 points)."""
    import torch

    from mscn_core.meta import adapt, item_losses
    from mscn_core.modality import Modality
    from mscn_core.signals import Batch

    torch.set_num_threads(2)
    rep = _build(cfg)
    with torch.no_grad():
        rep.shift_rates.fill_(COINPP_INNER_LR)
    net, metalearning = _coinpp_model(root, cfg)
    layers = [*net.net, net.last_layer]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.linear.weight.copy_(rep.net.params[2 * i])
            layer.linear.bias.copy_(rep.net.params[2 * i + 1])
    coords, targets = _data(cfg)
    coords, targets = coords[:, :512].contiguous(), targets[:, :512].contiguous()
    batch = Batch(coords, targets, torch.ones(coords.shape[:2]))
    state, ctx = adapt(rep, batch, Modality(), training=True)
    ours = item_losses(rep, Modality(), state, ctx, batch).mean()
    g_ours = torch.autograd.grad(ours, list(rep.net.params))
    out = metalearning.outer_step(net, coords, targets, inner_steps=INNER_STEPS,
                                  inner_lr=COINPP_INNER_LR, is_train=True)
    g_coin = torch.autograd.grad(out["loss"], [t for layer in layers
                                               for t in (layer.linear.weight, layer.linear.bias)])
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-12))
              for a, b in zip(g_ours, g_coin, strict=True))
    return {"loss_ours": float(ours.detach()), "loss_coinpp": float(out["loss"].detach()),
            "max_rel_grad_diff": rel, "inner_lr": COINPP_INNER_LR,
            "note": "COIN++ adapts with one fixed inner rate; ours learns one per shift "
                    "(MetaSGD); set equal here, the two steps are the same computation"}


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
    elif impl == "coinpp":
        step, _ = _coinpp_step_fn(os.environ["COINPP_DIR"], cfg, coords, targets)
    else:
        step, _ = _ours_step_fn(rep, coords, targets, checkpoint_steps=impl == "ours_ckpt",
                                fused=impl != "ours_plain")
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
    """coinpp / ours / ours_plain / loop / ours_ckpt steps alternated in one process:
    paired under the same load (the machine may be shared)."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rep = _build(cfg)
    coords, targets = _data(cfg)
    fns = {}
    if os.environ.get("COINPP_DIR"):
        fns["coinpp"] = _coinpp_step_fn(os.environ["COINPP_DIR"], cfg, coords, targets)[0]
    fns["ours"] = _ours_step_fn(rep, coords, targets, checkpoint_steps=False)[0]
    fns["ours_plain"] = _ours_step_fn(_build(cfg), coords, targets, checkpoint_steps=False,
                                      fused=False)[0]
    fns["baseline_loop"] = _baseline_step_fn(_build(cfg), coords, targets)[0]
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
    def paired(k: str) -> float:
        return statistics.median(a / o for a, o in zip(times[k], times["ours"], strict=True))

    out = {"median_s": {k: statistics.median(v) for k, v in times.items()},
           "min_s": {k: min(v) for k, v in times.items()},
           "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
           "median_paired_ratio_loop_over_ours": paired("baseline_loop"),
           "median_paired_ratio_plain_over_ours": paired("ours_plain"),
           "median_paired_ratio_ckpt_over_ours": paired("ours_ckpt")}
    if "coinpp" in times:
        out["median_paired_ratio_coinpp_over_ours"] = paired("coinpp")
        out["median_paired_ratio_coinpp_over_ours_plain"] = statistics.median(
            c / p for c, p in zip(times["coinpp"], times["ours_plain"], strict=True))
    return out


def analytic_gemm_flops(cfg: dict, points: int) -> float:
    """GEMM FLOPs of one outer step: 21·F − 13·F₀ (F: one forward of all layers, F₀: the
    first layer). K+1 = 4 forwards (4F); 3 inner backwards, input grads of layers 1.. (3(F−F₀));
    the outer backward through every forward (weights F + inputs F−F₀, four times) and
    through every inner backward product (both operands: 2(F−F₀), three times)."""
    dims = [3] + [cfg["width"]] * (cfg["depth"] - 1) + [1]
    per = [2 * BATCH * points * a * b for a, b in zip(dims[:-1], dims[1:], strict=True)]
    f, f0 = sum(per), per[0]
    k = INNER_STEPS
    return (k + 1) * f + k * (f - f0) + (k + 1) * (2 * f - f0) + k * 2 * (f - f0)


def child_roofline(cfg: dict) -> dict:
    """Measured GEMM FLOPs of one outer step and the machine's float32 peak, 2 threads."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    from mscn_core import siren

    class Flops(TorchDispatchMode):
        """FlopCounterMode's per-op formulas without its module tracker (whose hooks
        fail inside ``autograd.grad``)."""

        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            rule = flop_registry.get(func._overloadpacket)
            if rule is not None:
                self.total += rule(*args, **(kwargs or {}), out_val=out)
            return out

    torch.set_num_threads(2)
    rep = _build(cfg)
    coords, targets = _data(cfg)
    step, _ = _ours_step_fn(rep, coords, targets, checkpoint_steps=False, fused=False)
    step()
    counter = Flops()
    with counter:
        step()  # plain path: ATen products the counter sees (the fused path's are the same)
    measured = counter.total

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    onednn = siren._LINEAR

    def best_of(fn, reps: int = 10) -> float:
        fn()
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return 2 * 4096 ** 3 / best / 1e9

    peaks = {"aten_mm_mkl": best_of(lambda: torch.mm(a, b))}
    if onednn is not None:
        peaks["onednn"] = best_of(lambda: onednn(a, b, None, "none", [], ""))
    return {"gemm_flops_per_step_measured": measured,
            "gemm_flops_per_step_analytic": analytic_gemm_flops(cfg, 4096),
            "peak_gflops": peaks, "peak_gflops_best": max(peaks.values()),
            "peak_method": "best of 10 float32 4096x4096 @ 4096x4096 products, 2 threads"}


# -- parent side -------------------------------------------------------------------------


ALLOCATOR = {"name": "tcmalloc"}  # set by main(); every child of one run uses the same
COINPP = {"dir": None, "why": ""}  # set by main(): the checkout the children import


def _spawn(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    env.pop("COINPP_DIR", None)
    env.pop("MSCN_FUSED_SIREN", None)  # each impl picks its path itself
    if COINPP["dir"]:
        env["COINPP_DIR"] = str(COINPP["dir"])
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
    impls = ["ours", "ours_plain", "baseline_loop", "ours_ckpt"]
    if COINPP["dir"]:
        impls.insert(0, "coinpp")
        if cfg["latent_dim"] is None:
            res["check_coinpp"] = _spawn(["--child-check-coinpp", name], timeout)
            print(f"  check vs COIN++: {res['check_coinpp']}", flush=True)
    else:
        res["coinpp"] = {"skipped": COINPP["why"]}
        print(f"  coinpp: skipped ({COINPP['why']})", flush=True)
    for impl in impls:
        r = _spawn(["--child", name, impl, str(warmup), str(steps)], timeout)
        res[impl] = r
        print(f"  {impl:<14} median {r['median_s']:.3f} s/step  (min {r['min_s']:.3f})  "
              f"peak +{r['peak_mb_over_baseline']:.0f} MB", flush=True)
    res["speedup_baseline_over_ours"] = res["baseline_loop"]["median_s"] / res["ours"]["median_s"]
    res["speedup_plain_over_ours"] = res["ours_plain"]["median_s"] / res["ours"]["median_s"]
    if COINPP["dir"]:
        res["speedup_coinpp_over_ours"] = res["coinpp"]["median_s"] / res["ours"]["median_s"]
        res["speedup_coinpp_over_ours_plain"] = (res["coinpp"]["median_s"]
                                                 / res["ours_plain"]["median_s"])
        res["memory_ratio_ours_over_coinpp"] = (res["ours"]["peak_mb_over_baseline"]
                                                / res["coinpp"]["peak_mb_over_baseline"])
    if interleave:
        il = _spawn(["--child-interleaved", name, str(warmup), str(steps)], timeout)
        res["interleaved"] = il
        coin = (f", COIN++/ours {il['median_paired_ratio_coinpp_over_ours']:.2f}x "
                f"(COIN++/plain {il['median_paired_ratio_coinpp_over_ours_plain']:.2f}x)"
                if "median_paired_ratio_coinpp_over_ours" in il else "")
        print(f"  interleaved medians {il['median_s']}, paired loop/ours "
              f"{il['median_paired_ratio_loop_over_ours']:.2f}x, plain/ours "
              f"{il['median_paired_ratio_plain_over_ours']:.2f}x, ckpt/ours "
              f"{il['median_paired_ratio_ckpt_over_ours']:.2f}x{coin}", flush=True)
    roof = _spawn(["--child-roofline", name], timeout)
    res["roofline"] = roof
    res["summary"] = _summary(res, roof)
    print(f"  summary: {json.dumps(res['summary'])}", flush=True)
    res["memory_ratio_ckpt_over_ours"] = (res["ours_ckpt"]["peak_mb_over_baseline"]
                                          / res["ours"]["peak_mb_over_baseline"])
    res["time_ratio_ckpt_over_ours"] = res["ours_ckpt"]["median_s"] / res["ours"]["median_s"]
    if not COINPP["dir"]:  # fallback label only: not measured in this run
        res["coinpp_reference_design_s7_not_measured"] = COINPP_REFERENCE[name]
    print(f"  speedup (loop/ours) {res['speedup_baseline_over_ours']:.2f}x, checkpointing "
          f"memory x{res['memory_ratio_ckpt_over_ours']:.2f}, "
          f"time x{res['time_ratio_ckpt_over_ours']:.2f}", flush=True)
    return res


def _summary(res: dict, roof: dict) -> dict:
    """The headline table. Times: the paired (interleaved) child when it ran, which sees
    every implementation under the same load; ``min`` is the least-loaded step of each,
    comparable with the best-of peak. Memory: each implementation's own fresh child."""
    flops, peak = roof["gemm_flops_per_step_measured"], roof["peak_gflops_best"]
    il = res.get("interleaved")
    out: dict = {"timing_source": "interleaved (paired)" if il else "separate children"}
    for impl in ("coinpp", "ours_plain", "ours"):
        if "median_s" not in res.get(impl, {}):
            continue
        med = il["median_s"][impl] if il else res[impl]["median_s"]
        best = il["min_s"][impl] if il else res[impl]["min_s"]
        out[impl] = {"median_s": med, "min_s": best,
                     "peak_mb_over_baseline": res[impl]["peak_mb_over_baseline"],
                     "roofline_fraction_median": flops / med / 1e9 / peak,
                     "roofline_fraction_min": flops / best / 1e9 / peak}
    if "coinpp" in out:
        out["speedup_coinpp_over_ours"] = (il["median_paired_ratio_coinpp_over_ours"] if il
                                           else out["coinpp"]["median_s"]
                                           / out["ours"]["median_s"])
        out["speedup_coinpp_over_ours_plain"] = (
            il["median_paired_ratio_coinpp_over_ours_plain"] if il
            else out["coinpp"]["median_s"] / out["ours_plain"]["median_s"])
        out["speedup_coinpp_over_ours_min"] = out["coinpp"]["min_s"] / out["ours"]["min_s"]
        out["memory_ours_over_coinpp"] = (out["ours"]["peak_mb_over_baseline"]
                                          / out["coinpp"]["peak_mb_over_baseline"])
        out["goal"] = ">= 1.5x COIN++ at equal or lower memory (DESIGN §7)"
    out["speedup_plain_over_ours"] = (il["median_paired_ratio_plain_over_ours"] if il
                                      else res["ours_plain"]["median_s"]
                                      / res["ours"]["median_s"])
    out["gemm_gflop_per_step"] = flops / 1e9
    out["peak_gflops"] = peak
    return out


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


def _git_head(root: Path | None) -> str | None:
    if root is None:
        return None
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                         text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-check":
        print(json.dumps(child_check(CONFIGS[argv[1]])))
        return 0
    if argv and argv[0] == "--child-check-coinpp":
        print(json.dumps(child_check_coinpp(CONFIGS[argv[1]], os.environ["COINPP_DIR"])))
        return 0
    if argv and argv[0] == "--child-roofline":
        print(json.dumps(child_roofline(CONFIGS[argv[1]])))
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
    ap.add_argument("--coinpp", type=Path, default=None,
                    help="COIN++ checkout to time beside ours (default: $COINPP_DIR); "
                         "never vendored: without one its row is skipped")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    if args.allocator == "tcmalloc" and tcmalloc_path() is None:
        ap.error("tcmalloc is not installed (Debian: libtcmalloc-minimal4); use --allocator glibc")
    ALLOCATOR["name"] = args.allocator
    COINPP["dir"], COINPP["why"] = coinpp_dir(args.coinpp)

    t0 = time.perf_counter()
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
              "allocator": args.allocator,
              "coinpp": {"dir": str(COINPP["dir"]) if COINPP["dir"] else None,
                         "status": COINPP["why"], "commit": _git_head(COINPP["dir"])},
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
