"""Shared helpers for the climate benchmarks (sphere_quality, rd_climate, encode_speed).

``bench/`` is a plain script folder: the scripts put this folder on ``sys.path`` and
``import _common``. Nothing here trains or times anything by itself.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mscn_core.allocator import active_allocator, reexec_with_tcmalloc
from mscn_core.atomic import write_atomic

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
ERA5 = ROOT / "datasets" / "data" / "era5_t_z_3deg_2017-01-01_float32.nc"
SHIPPED = ROOT / "plugins" / "checkpoints" / "era5_t850.safetensors"
SHARED_CLIMATE = Path("/work/shared/data/climate")

# The shipped checkpoint's recipe (plugins/checkpoints/build_era5_t850.py).
SHIPPED_SIREN = {"depth": 6, "width": 128, "w0": 30.0, "w0_first": 30.0}
SHIPPED_METHOD = {"method": "mscn", "budget": 256, "inner_steps": 3}
SHIPPED_TRAIN = {"outer_steps": 600, "outer_lr": 3e-4, "batch_size": 8,
                 "points_per_item": 2048, "val_every": 50, "seed": 0}
TRAIN_MEMBERS = [0, 1, 2, 3, 4, 5, 6]
VAL_MEMBERS = [7]
TEST_MEMBERS = [8, 9]

_T0 = time.perf_counter()
os.environ.setdefault("TQDM_MININTERVAL", "20")  # meta-training progress bars: sparse lines


def log(msg: str) -> None:
    """Progress line on stderr with elapsed wall time."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def setup_torch(threads: int = 2) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


def machine_info() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "allocator": active_allocator()}


def jsonable(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars → Python, non-finite floats → None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (mscn's one writer); results are replaced on a re-run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(jsonable(obj), indent=1) + "\n"
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)


def era5_fields(modality, var: str = "t", level: int = 850,
                members: Sequence[int] = TEST_MEMBERS, path: Path = ERA5) -> list:
    """2-D fields of the vendored ERA5 file for some ensemble members (all 4 times each)."""
    sel = [f"isobaricInhPa={level}", "number=" + ",".join(str(m) for m in members)]
    if len(members) == 1:  # a scalar selection drops the dimension: fine, still one item each
        sel[-1] = f"number={members[0]}"
    return modality.read(path, var=var, sel=sel)


def field_label(field) -> str:
    parts = []
    for k in ("number", "time", "isobaricInhPa"):
        if k in field.coords and field.coords[k].ndim == 0:
            v = field.coords[k].values
            is_date = np.asarray(v).dtype.kind == "M"
            parts.append(f"{k}={np.datetime_as_string(v, unit='h') if is_date else v}")
    return ",".join(parts) or str(field.name)


def summarize(metrics: Sequence[dict]) -> dict:
    """Mean of per-field metrics, plus the pooled RMSE / PSNR (mean MSE over fields)."""
    psnr = [m["psnr_db"] for m in metrics]
    rmse = [m["rmse"] for m in metrics]
    mse01 = [10 ** (-p / 10) for p in psnr]
    out = {"psnr_db": float(np.mean(psnr)), "rmse_k": float(np.mean(rmse)),
           "psnr_db_pooled": -10 * math.log10(float(np.mean(mse01))),
           "rmse_k_pooled": math.sqrt(float(np.mean(np.square(rmse)))),
           "psnr_db_min": float(np.min(psnr)), "rmse_k_max": float(np.max(rmse)),
           "n_fields": len(metrics)}
    if "mae" in metrics[0]:
        out["mae_k"] = float(np.mean([m["mae"] for m in metrics]))
    if "rmse_area_weighted" in metrics[0]:
        out["rmse_area_weighted_k"] = float(np.mean([m["rmse_area_weighted"] for m in metrics]))
    return out


def siren_config(**over):
    from mscn_core.siren import SirenConfig

    return SirenConfig(**{**SHIPPED_SIREN, **over})


def evaluate_checkpoint(ck, modality, fields, steps: int | None = None,
                        bits: int | None = None) -> list[dict]:
    """Per-field metrics after the inner loop (optionally quantised to ``bits``)."""
    from mscn_core import pipeline as P

    signals = [modality.to_signal(f) for f in fields]
    codes = P.adapt_codes(ck, modality, signals, steps=steps)
    if bits is not None:
        _, codes = P.quantize_codes(ck, codes, bits)
    return [modality.metrics(s, P.predictor(ck, modality, c)(s.coords))
            for s, c in zip(signals, codes, strict=True)]


def coin_fit(siren, modality, signals, lr: float, steps: int,
             record_steps: Sequence[int] = (), target_psnr: float | None = None,
             check_every: int = 1, max_seconds: float | None = None) -> dict:
    """COIN-style fitting from scratch (Adam on a fresh SIREN per item, all items batched).

    Records mean metrics at ``record_steps``; with ``target_psnr`` (single item) stops at
    the first checked step whose PSNR reaches it. The time spent evaluating inside the
    callback is measured and subtracted, so ``fit_seconds`` is the fitting alone.
    """
    import torch

    from mscn_core.meta import fit_from_scratch
    from mscn_core.methods import MethodConfig, build_representation
    from mscn_core.signals import full_batches

    rep = build_representation(siren, MethodConfig(method="coin", coin_lr=lr, coin_steps=steps))
    (idx, batch), = list(full_batches(signals, max_batch=len(signals)))
    ordered = [signals[i] for i in idx]
    record = set(record_steps)
    out: dict = {"lr": lr, "at_step": {}, "reached_step": None}
    eval_time = 0.0

    def evaluate(state) -> list[dict]:
        with torch.no_grad():
            pred = modality.render(lambda pts: rep.predict(state, {}, pts), batch.coords)
        return [modality.metrics(s, pred[j]) for j, s in enumerate(ordered)]

    def callback(step: int, state) -> bool:
        nonlocal eval_time
        t = time.perf_counter()
        stop = False
        if step in record:
            out["at_step"][step] = summarize(evaluate(state))
        if target_psnr is not None and (step % check_every == 0 or step == steps):
            ms = evaluate(state)
            psnr = float(np.mean([m["psnr_db"] for m in ms]))
            out["last_psnr"] = psnr
            if psnr >= target_psnr:
                out["reached_step"] = step
                out["reached_metrics"] = summarize(ms)
                stop = True
        out["steps_run"] = step
        eval_time += time.perf_counter() - t
        if max_seconds is not None and time.perf_counter() - t0 - eval_time > max_seconds:
            if step not in out["at_step"]:
                out["at_step"][step] = summarize(evaluate(state))
            out["capped_by_time"] = True
            stop = True
        return stop

    t0 = time.perf_counter()
    fit_from_scratch(rep, batch, modality, steps, callback=callback)
    total = time.perf_counter() - t0
    out["wall_seconds"] = total
    out["eval_seconds"] = eval_time
    out["fit_seconds"] = total - eval_time
    out["n_params_per_item"] = rep.code_size()
    return out


def exact_sdf_floor(mesh, resolution: int) -> dict:
    """Shape metrics of ``mesh`` re-meshed by marching cubes of its exact SDF on the sdf
    plugin's ``resolution``³ lattice: the floor any SDF codec decoded there has."""
    from mscn_datasets.meshes import grid_points, marching_cubes, signed_distance
    from mscn_datasets.shape_metrics import mesh_metrics
    from mscn_plugins.sdf import BOUND

    lattice = grid_points(resolution, BOUND, centres=False)
    sdf = signed_distance(mesh, lattice).reshape((resolution,) * 3)
    return mesh_metrics(marching_cubes(sdf, 0.0, BOUND), mesh)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def run_script(main, script: str) -> None:
    """Run a benchmark's ``main`` under the allocator ``mscn`` itself uses (tcmalloc if any)."""
    reexec_with_tcmalloc([script, *sys.argv[1:]])
    sys.exit(main())
