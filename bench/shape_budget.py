"""Modulation budget sweep on held-out meshes (SDF): MSCN vs Functa vs COIN from scratch.

One run. Data (datasets/data/meshes/split.json): meta-train on "train" (29 meshes),
keep-best on "val" (3), report on "test" (bunny00, cow, elk, pinion, knot1: never seen).

* **MSCN** (method ``mscn``, exactly ``budget`` non-zero shift modulations) and **Functa**
  (method ``functa``, ``latent_dim = budget``) at budgets 64 / 256 / 1024, the SAME SIREN
  (depth 6, width 256, w0 30: 5 × 256 = 1280 shift units, so 1024 fits; width 128 has only
  640) and the SAME meta-training (outer steps, Adam rate, batch, points per item, seed,
  initial MetaSGD rates, validation schedule). Meta-training is ``train_checkpoint``'s
  recipe without ``fit_codec`` (no bitstream is written here, so no entropy model).
  Budget: 80 outer steps of 8 meshes × 1,024 points each took 1.8 s a step (6×256, one
  torch thread on the shared 2-core machine), i.e. ~15 of the ~22 minutes of the run;
  that is far too little meta-training to separate the methods (see the JSON). w0 = 30
  is the paper's; the shipped shape checkpoints now use 10 (``--w0 10``).
* **COIN** from scratch (a fresh SIREN of the same shape per mesh, Adam): 3 steps (the
  same number of steps MSCN/Functa take at encode time, on the same 16,384 points per step
  drawn the same way) and, for reference, 100 and 500 steps (one run, 1,024 fresh points
  per mesh and step: 16,384 would take ~16× longer). Its code is the whole network.

Held-out metrics after 3 inner steps (``adapt_codes``, the encoder's own path: 16,384
samples per inner step, seeded), unquantised, from the sdf plugin's ``metrics``: Chamfer-L1,
F-score at 1 % and normal consistency of the marching-cubes mesh of the predicted SDF on
the 64³ metric lattice (unit cube, 100k samples each way), IoU of inside/outside on that
lattice, and mean |SDF error| on 20,000 near-surface samples. Mean over the test meshes and
per mesh. The exact-SDF marching-cubes 64³ floor is recorded too.

Usage (every number in the JSON comes from this one command)::

    .venv/bin/python bench/shape_budget.py [--quick]

→ bench/results/shape_budget[_quick].json and .png. ``--quick``: a 4×64 SIREN, budget 64
only, 6 train meshes, 2 test meshes, 10 outer steps, COIN 3 and 20 steps (smoke test).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

KEYS = ("chamfer_l1", "iou", "fscore", "normal_consistency", "sdf_l1_near", "empty")
EVAL_NEAR = 20_000  # near-surface samples kept for the sdf_l1_near metric
ENCODE_POINTS = 16_384  # what adapt_codes draws per inner step (the sdf plugin's budget)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="64,256,1024")
    ap.add_argument("--methods", default="mscn,functa")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--w0", type=float, default=30.0)
    ap.add_argument("--lr-init", default="0.05,0.5",
                    help="initial MetaSGD rates U(low, high), as the shipped shape checkpoints")
    ap.add_argument("--outer-steps", type=int, default=80)
    ap.add_argument("--outer-lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--points-per-item", type=int, default=1024)
    ap.add_argument("--val-every", type=int, default=20)
    ap.add_argument("--val-points", type=int, default=4096)
    ap.add_argument("--inner-steps", type=int, default=3)
    ap.add_argument("--coin-steps", default="100,500",
                    help="reference COIN run: record at these steps (empty: skip)")
    ap.add_argument("--coin-points", type=int, default=1024,
                    help="fresh samples per mesh and step of the reference COIN run")
    ap.add_argument("--coin-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replot", action="store_true",
                    help="rebuild the table and plot from the existing JSON (no computing)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.budgets, args.depth, args.width = "64", 4, 64
        args.outer_steps, args.batch_size, args.points_per_item = 10, 4, 512
        args.val_every, args.val_points, args.coin_steps = 5, 1024, "20"
    tag = "_quick" if args.quick else ""
    args.out = Path(args.out or C.RESULTS / f"shape_budget{tag}.json")
    args.png = args.out.with_suffix(".png")
    return args


# -- data -----------------------------------------------------------------------------------
def load_items(args):
    from mscn_datasets.meshes import load_split, read_shapes, vendored_mesh

    split = load_split()
    names = {"train": split["train"], "val": split["val"], "test": split["test"]}
    if args.quick:
        names = {"train": split["train"][:6], "val": split["val"][:1],
                 "test": split["test"][:2]}
    return {k: [read_shapes(vendored_mesh(n))[0] for n in v] for k, v in names.items()}


def eval_signal(signal, seed: int = 0):
    """The metric lattice and ``EVAL_NEAR`` of the near-surface samples (seeded choice)."""
    import torch

    from mscn_plugins.sdf import ShapeSignal

    n_lat = signal.n_lattice
    n_near = signal.n_points - n_lat
    pick = np.sort(np.random.default_rng(seed).choice(n_near, min(EVAL_NEAR, n_near),
                                                      replace=False)) + n_lat
    idx = torch.from_numpy(np.concatenate([np.arange(n_lat), pick]))
    return ShapeSignal(signal.coords[idx], signal.targets[idx], None, dict(signal.meta),
                       truth=signal.truth, metric_grid=signal.metric_grid,
                       n_vertices=signal.n_vertices)


def num(x) -> float:
    """A metric as a float; NaN for the JSON's null (an empty mesh's distances)."""
    return math.nan if x is None else float(x)


def summary(per_mesh: dict) -> dict:
    """Means over meshes; None where a mesh decoded to nothing (NaN distances), with the
    mean over the non-empty ones and the count of empty ones beside it."""
    out = {}
    for k in KEYS:
        vals = [num(v[k]) for v in per_mesh.values()]
        finite = [x for x in vals if math.isfinite(x)]
        out[k] = float(np.mean(vals)) if len(finite) == len(vals) else None
        if len(finite) < len(vals):
            out[f"{k}_nonempty_mean"] = float(np.mean(finite)) if finite else None
    out["n_empty"] = int(sum(num(v["empty"]) > 0 for v in per_mesh.values()))
    return out


def pick(metrics: dict) -> dict:
    return {k: float(metrics[k]) for k in KEYS}


# -- MSCN / Functa ------------------------------------------------------------------------------
def meta_train(m, method: str, budget: int, signals: dict, args):
    """``train_checkpoint`` without ``fit_codec``: the same representation and outer loop."""
    import torch

    from mscn_core.checkpoint import Checkpoint
    from mscn_core.meta import TrainConfig
    from mscn_core.meta import meta_train as core_meta_train
    from mscn_core.methods import MethodConfig, build_representation
    from mscn_core.siren import SirenConfig

    lo, hi = (float(v) for v in args.lr_init.split(","))
    siren = SirenConfig(depth=args.depth, width=args.width, w0=args.w0, w0_first=args.w0,
                        in_dim=m.in_dim, out_dim=m.out_dim)
    method_cfg = MethodConfig(method=method, budget=budget, latent_dim=budget,
                              inner_steps=args.inner_steps, lr_init_low=lo, lr_init_high=hi)
    train_cfg = TrainConfig(outer_steps=args.outer_steps, outer_lr=args.outer_lr,
                            batch_size=args.batch_size, points_per_item=args.points_per_item,
                            val_every=args.val_every, val_points=args.val_points, seed=0,
                            progress=False)
    rep = build_representation(siren, method_cfg, torch.Generator().manual_seed(train_cfg.seed))
    res = core_meta_train(rep, signals["train"], signals["val"], train_cfg, m)
    rep.eval()
    ck = Checkpoint(rep, m.name, m.state(), info={})
    info = {"best_val_loss": res.best_val_loss, "best_step": res.best_step,
            "steps_run": res.steps_run, "rollbacks": res.rollbacks,
            "train_seconds": res.seconds, "seconds_per_step": res.seconds / max(res.steps_run, 1),
            "code_size": rep.code_size(),
            "val_curve": [(h["step"], h["val_loss"]) for h in res.history if "val_loss" in h]}
    return ck, info


def evaluate(ck, m, signals: dict, evals: list, steps: int) -> dict:
    from mscn_core.pipeline import adapt_codes, predictor

    codes = adapt_codes(ck, m, signals["test"], steps=steps)
    out = {}
    for s, e, code in zip(signals["test"], evals, codes, strict=True):
        out[s.meta["name"]] = pick(m.metrics(e, predictor(ck, m, code)(e.coords)))
    return out


# -- COIN ---------------------------------------------------------------------------------------
def coin(m, signals: dict, evals: list, args, steps: int, points: int,
         record: list[int]) -> tuple[dict, float]:
    """Adam from scratch on every test mesh at once (one optimiser: exactly one per item)."""
    import torch

    from mscn_core.meta import fit_from_scratch
    from mscn_core.methods import MethodConfig, build_representation
    from mscn_core.signals import sample_batch
    from mscn_core.siren import SirenConfig

    siren = SirenConfig(depth=args.depth, width=args.width, w0=args.w0, w0_first=args.w0,
                        in_dim=m.in_dim, out_dim=m.out_dim)
    rep = build_representation(siren, MethodConfig(method="coin", coin_steps=steps,
                                                   coin_lr=args.coin_lr))
    test = signals["test"]
    gens = [torch.Generator().manual_seed(0) for _ in test]  # as adapt_codes draws

    def draw(k: int = 0):
        return sample_batch(m, test, points, gens)

    results, eval_s = {}, 0.0

    def callback(step: int, state) -> bool:
        nonlocal eval_s
        if step in record:
            t = time.perf_counter()
            per = {}
            with torch.no_grad():
                for j, (s, e) in enumerate(zip(test, evals, strict=True)):
                    st = {k: v[j:j + 1] for k, v in state.items()}
                    pred = torch.cat([m.render(lambda p, st=st: rep.predict(st, {}, p),
                                               e.coords[None, i:i + 65536])[0]
                                      for i in range(0, e.n_points, 65536)])
                    per[s.meta["name"]] = pick(m.metrics(e, pred))
            results[step] = per
            eval_s += time.perf_counter() - t
        return False

    t0 = time.perf_counter()
    fit_from_scratch(rep, draw(), m, steps, callback=callback, resample=draw)
    info = {"fit_seconds": time.perf_counter() - t0 - eval_s, "code_size": rep.code_size(),
            "points_per_step": points, "lr": args.coin_lr}
    return results, info


# -- plot -----------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("chamfer_l1", "Chamfer-L1 (unit cube, log; lower is better)", True),
              ("iou", "IoU on the 64³ lattice (higher is better)", False),
              ("fscore", "F-score @ 1 % (higher is better)", False)]
    budgets = result["config"]["budgets"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
    styles = {"mscn": ("tab:red", "o", "MSCN (sparse shifts)"),
              "functa": ("tab:blue", "s", "Functa (latent → shifts)")}
    coin_styles = {"3": ":", "100": "--", "500": "-."}
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for method, (colour, marker, name) in styles.items():
            runs = [result["runs"].get(f"{method}-{b}") for b in budgets]
            if not any(runs):
                continue
            xs = [b for b, r in zip(budgets, runs, strict=True) if r]
            ys = [r["mean"][key] if r["mean"][key] is not None
                  else r["mean"][f"{key}_nonempty_mean"] for r in runs if r]
            ax.plot(xs, ys, marker=marker, color=colour, label=f"{name}, mean", lw=2)
            for x, y, r in zip(xs, ys, [r for r in runs if r], strict=True):
                if r["mean"]["n_empty"]:
                    ax.annotate(f"{r['mean']['n_empty']} empty mesh(es)"
                                + (": mean of the rest" if key == "chamfer_l1" else ""),
                                (x, y), fontsize=7, color=colour, xytext=(4, 6),
                                textcoords="offset points")
            for b, r in zip(budgets, runs, strict=True):
                if r:
                    v = [num(x[key]) for x in r["per_mesh"].values()]
                    ax.scatter([b * (0.93 if method == "mscn" else 1.07)] * len(v), v, s=10,
                               color=colour, alpha=0.35, marker=marker)
        for steps, r in result["coin"]["runs"].items():
            ax.axhline(r["mean"][key], color="tab:green", ls=coin_styles.get(steps, "-"),
                       lw=1.2, label=f"COIN from scratch, {steps} Adam steps "
                                     f"({result['coin']['code_size']} weights)")
        floor = result["mc_floor_64"]["mean"][key]
        if floor is not None:
            ax.axhline(floor, color="k", ls=":", lw=0.8, label="exact SDF → marching cubes 64³")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.04)
        ax.set_xlabel("modulations per mesh (MSCN budget = Functa latent size)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    c = result["config"]
    fig.suptitle(f"held-out meshes ({', '.join(result['data']['test'])}) after "
                 f"{c['inner_steps']} inner steps; {c['depth']}×{c['width']} SIREN, "
                 f"{c['outer_steps']} outer steps each (batch {c['batch_size']} × "
                 f"{c['points_per_item']} points); small dots: single meshes", fontsize=10)
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    from mscn_core.registry import get_modality

    args = parse_args(argv)
    if args.replot:
        import json

        return report(json.loads(args.out.read_text()), args)
    C.setup_torch(args.threads)
    t_start = time.perf_counter()
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = [x for x in args.methods.split(",") if x]
    coin_record = [int(s) for s in args.coin_steps.split(",") if s]
    m = get_modality("sdf")
    items = load_items(args)
    C.log(f"signals of {sum(map(len, items.values()))} meshes")
    t0 = time.perf_counter()
    signals = {k: [m.to_signal(i) for i in v] for k, v in items.items()}
    evals = [eval_signal(s) for s in signals["test"]]
    signal_s = time.perf_counter() - t0
    C.log(f"  {signal_s:.0f} s")
    cfg = {k: v for k, v in vars(args).items() if k not in ("out", "png")}
    cfg.update(budgets=budgets, methods=methods, coin_steps=coin_record)
    result: dict = {
        "benchmark": "shape_budget", "quick": args.quick, "machine": C.machine_info(),
        "command": " ".join([".venv/bin/python bench/shape_budget.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "config": cfg,
        "data": {k: [i.name for i in v] for k, v in items.items()},
        "metrics": "sdf plugin metrics after the inner loop, unquantised: Chamfer-L1/F-score "
                   "(1 %)/normal consistency of the marching-cubes 64³ mesh vs the truth "
                   "(unit cube, 100k samples each way, seed 0), IoU of sign on the 64³ "
                   "lattice over [-0.55, 0.55]³, sdf_l1_near on 20k near-surface samples "
                   "(unit-cube units)",
        "seconds": {"signals": signal_s}, "runs": {}, "coin": {"runs": {}},
    }

    def save() -> None:
        C.write_json(args.out, result)

    # the floor: the exact SDF on the same lattice
    floor = {}
    for it in items["test"]:
        mm = C.exact_sdf_floor(it.mesh, 64)
        floor[it.name] = {**{k: float(mm[k]) for k in ("chamfer_l1", "fscore",
                                                        "normal_consistency", "empty")},
                          "iou": 1.0, "sdf_l1_near": 0.0}  # exact signs on the lattice
    result["mc_floor_64"] = {"per_mesh": floor, "mean": summary(floor)}

    for budget in budgets:
        for method in methods:
            label = f"{method}-{budget}"
            C.log(f"meta-training {label}: {args.depth}×{args.width}, {args.outer_steps} steps")
            ck, info = meta_train(m, method, budget, signals, args)
            C.log(f"  {info['train_seconds']:.0f} s ({info['seconds_per_step']:.2f} s/step), "
                  f"best val {info['best_val_loss']:.4g} at step {info['best_step']}, "
                  f"{info['rollbacks']} rollbacks")
            t0 = time.perf_counter()
            per = evaluate(ck, m, signals, evals, args.inner_steps)
            info["eval_seconds"] = time.perf_counter() - t0
            result["runs"][label] = {"method": method, "budget": budget, **info,
                                     "per_mesh": per, "mean": summary(per)}
            mean = result["runs"][label]["mean"]
            C.log(f"  held-out Chamfer {mean['chamfer_l1']}, IoU {mean['iou']:.3f}, "
                  f"F {mean['fscore']:.3f} ({info['eval_seconds']:.0f} s eval)")
            save()

    C.log(f"COIN from scratch, {args.inner_steps} steps on {ENCODE_POINTS} points/step")
    res, info3 = coin(m, signals, evals, args, args.inner_steps, ENCODE_POINTS,
                      [args.inner_steps])
    result["coin"]["code_size"] = info3["code_size"]
    result["coin"]["runs"][str(args.inner_steps)] = {
        **info3, "steps": args.inner_steps, "per_mesh": res[args.inner_steps],
        "mean": summary(res[args.inner_steps])}
    if coin_record:
        C.log(f"COIN from scratch, reference run to {max(coin_record)} steps on "
              f"{args.coin_points} points/step")
        res, info = coin(m, signals, evals, args, max(coin_record), args.coin_points,
                         coin_record)
        for s in coin_record:
            result["coin"]["runs"][str(s)] = {**info, "steps": s, "per_mesh": res[s],
                                              "mean": summary(res[s])}
    for s, r in result["coin"]["runs"].items():
        C.log(f"  COIN {s} steps: Chamfer {r['mean']['chamfer_l1']}, IoU {r['mean']['iou']:.3f}")

    result["seconds"]["total"] = time.perf_counter() - t_start
    return report(result, args)


def report(result: dict, args) -> int:
    """Table, MSCN-vs-Functa verdict and plot from the results (also ``--replot``)."""
    mach = result["machine"]
    result["device"] = (f"CPU, {mach['cpus']} cores shared with other jobs, "
                        f"{mach['torch_threads']} torch thread(s)")
    budgets = result["config"]["budgets"]
    for r in [*result["runs"].values(), *result["coin"]["runs"].values(),
              result["mc_floor_64"]]:
        r["mean"] = summary(r["per_mesh"])
    names = result["data"]["test"]

    def fmt(v, spec=".4f"):
        return "–" if v is None else format(v, spec)

    lines = ["| method | modulations | Chamfer-L1 | IoU | F-score | NC | "
             + " | ".join(f"{n} CD" for n in names) + " |", "|" + "---|" * (6 + len(names))]
    rows = [(r["method"], r["budget"], r) for r in result["runs"].values()]
    rows += [(f"coin, {s} Adam steps", result["coin"]["code_size"], r)
             for s, r in result["coin"]["runs"].items()]
    rows += [("exact SDF, MC 64³ (floor)", "–", result["mc_floor_64"])]
    for name, size, r in rows:
        mean = r["mean"]
        cd = fmt(mean["chamfer_l1"]) if mean["n_empty"] == 0 else (
            f"{fmt(mean.get('chamfer_l1_nonempty_mean'))} ({mean['n_empty']} of {len(names)} "
            "empty)")
        lines.append(f"| {name} | {size} | {cd} | {fmt(mean['iou'], '.3f')}"
                     f" | {fmt(mean['fscore'], '.3f')} | {fmt(mean['normal_consistency'], '.3f')}"
                     " | " + " | ".join(fmt(r["per_mesh"][n]["chamfer_l1"])
                                        if math.isfinite(num(r["per_mesh"][n]["chamfer_l1"]))
                                        else "empty" for n in names)
                     + " |")
    result["markdown_table"] = "\n".join(lines)
    verdict = {}
    for b in budgets:
        a, f = result["runs"].get(f"mscn-{b}"), result["runs"].get(f"functa-{b}")
        if a and f:
            ca, cf = a["mean"]["chamfer_l1"], f["mean"]["chamfer_l1"]
            verdict[b] = {"mscn_chamfer_better": ca is not None and (cf is None or ca < cf),
                          "mscn_iou_better": a["mean"]["iou"] > f["mean"]["iou"],
                          "mscn_fscore_better": a["mean"]["fscore"] > f["mean"]["fscore"],
                          "empty_meshes": {"mscn": a["mean"]["n_empty"],
                                           "functa": f["mean"]["n_empty"]}}
    result["mscn_vs_functa"] = verdict
    plot(result, args.png)
    result["plot"] = str(args.png.relative_to(C.ROOT)) if args.png.is_relative_to(C.ROOT) \
        else str(args.png)
    C.write_json(args.out, result)
    print(result["markdown_table"])
    print(f"\nMSCN vs Functa: {verdict}\n{result['seconds']['total']:.0f} s in all")
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    C.run_script(main, __file__)
