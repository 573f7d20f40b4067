"""Encode-time refinement (issue 8 part 4): quality vs ``--refine-steps`` vs encode time.

The shipped checkpoint (ERA5 t 850 hPa, members 0-7) encodes held-out real fields with
its 3 meta-learned steps, then N more Adam steps on the same 256 coded positions
(``refine_codes``; N = 0 is the paper's codec and the baseline of every ratio):

* t 850 hPa members 8-9 (in distribution, held out), t 500 hPa (another level),
  z 500 hPa (another variable), COADS SST (another data set, land NaNs);
* unquantised (adapt + refine, then metrics) and 6 bits (``encode_items``: a real
  stream, quantisation-aware refinement; its bytes are reported to show they do not
  grow with N), RMSE and area-weighted RMSE in field units, encode seconds;
* an Adam learning-rate check at 100 steps (unquantised, first field of each set);
* the fraction of 3-step code values beyond the quantiser's clip range (what 6 bits
  cannot represent, whatever the refinement).

    .venv/bin/python bench/refine_steps.py            # ~10 min on 1 CPU thread
    .venv/bin/python bench/refine_steps.py --quick    # 1 field per set, N <= 30
    .venv/bin/python bench/refine_steps.py --checkpoint default \
        -o bench/results/refine_steps_default.json    # the sphere default, 3 more grids

``--checkpoint default`` is the sphere modality's default checkpoint (the general one with
an SH base) and adds its held-out files of other grids: the T42 Gaussian U300, the MPI-OM
curvilinear crop and the geodesic unstructured height (first field of each).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

STEPS = (0, 10, 30, 100, 300)
BITS = 6
LRS = (3e-3, 1e-2, 3e-2)
DATA = C.ROOT / "datasets" / "data"
COADS = DATA / "coads_sst_airt_2deg_jan-mar.nc"
OTHER_GRIDS = [("t42_u300", "T42 Gaussian grid, U 300 hPa (another model and grid)",
                DATA / "t42_gaussian_uv300_U.nc", "U"),
               ("mpiom_tos", "MPI-OM curvilinear ocean crop (regional, land NaNs)",
                DATA / "mpiom_tos_curvilinear_crop.nc", "tos"),
               ("geodesic_height", "geodesic 2562-cell unstructured grid, height",
                DATA / "geodesic_2562cells_t0.nc", "height")]


def datasets(m, quick: bool, other_grids: bool = False) -> list[tuple[str, str, list]]:
    """(name, description, fields); 2 fields per set (ERA5: member 8 and 9 at the first
    time; COADS: January and February), so the whole run fits ~10 min on one thread."""
    sets = [("t850_m8-9", "t 850 hPa, members 8-9 (in distribution, held out)",
             C.era5_fields(m)[::4]),
            ("t500", "t 500 hPa, members 8-9 (another level)",
             C.era5_fields(m, level=500)[::4]),
            ("z500", "z 500 hPa, members 8-9 (another variable)",
             C.era5_fields(m, var="z", level=500)[::4]),
            ("coads_sst", "COADS SST Jan-Feb (another data set, land NaNs)",
             m.read(COADS, var="SST")[:2])]
    if other_grids:
        sets += [(n, d, m.read(p, var=v)[:1]) for n, d, p, v in OTHER_GRIDS]
    return [(n, d, f[:1] if quick else f) for n, d, f in sets]


def mean_metrics(metrics: list[dict]) -> dict:
    keys = ("rmse", "rmse_area_weighted", "psnr_db", "max_abs_error")
    return {k: float(sum(x[k] for x in metrics) / len(metrics)) for k in keys}


def run_unquantised(ck, m, signals, steps: int, lr: float | None = None) -> dict:
    from mscn_core.pipeline import adapt_codes, predictor, refine_codes

    t0 = time.perf_counter()
    codes = adapt_codes(ck, m, signals)
    codes = refine_codes(ck, m, signals, codes, steps, lr)
    seconds = time.perf_counter() - t0
    metrics = [m.metrics(s, predictor(ck, m, c)(s.coords)) for s, c in zip(signals, codes,
                                                                           strict=True)]
    return {"seconds": seconds, **mean_metrics(metrics)}


def run_bits(ck, m, fields, steps: int) -> dict:
    from mscn_core.pipeline import decode_stream, encode_items

    t0 = time.perf_counter()
    data, rep = encode_items(ck, m, fields, bits=BITS, refine_steps=steps)
    seconds = time.perf_counter() - t0
    decode_stream(data, ck)  # the unmodified decoder reads it
    return {"seconds": seconds, "bytes": len(data), "payload_bytes": rep.payload_bytes,
            **mean_metrics(rep.metrics)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--checkpoint", default=str(C.SHIPPED),
                    help="checkpoint to refine with; 'default': the sphere modality's "
                         "default (and its held-out files of three more grids)")
    args = ap.parse_args()
    C.setup_torch(args.threads)
    warnings.simplefilter("ignore")  # "outside the training range": the point of the bench
    from mscn_core.checkpoint import load_checkpoint
    from mscn_core.pipeline import REFINE_LR, adapt_codes, quantizer
    from mscn_core.registry import get_modality

    m = get_modality("sphere")
    other_grids = args.checkpoint == "default"
    if other_grids:
        from mscn_core.catalog import find_named

        path = find_named(type(m).default_checkpoint)
    else:
        path = Path(args.checkpoint).resolve()
    ck = load_checkpoint(path)
    m.load_state(ck.modality_state)
    steps = tuple(n for n in STEPS if n <= 30) if args.quick else STEPS
    out = {"checkpoint": str(path.relative_to(C.ROOT)) if path.is_relative_to(C.ROOT)
           else str(path), "sha256": ck.sha256,
           "refine_lr": REFINE_LR, "bits": BITS, "steps": list(steps),
           "machine": C.machine_info(), "sets": {}}
    rows = []
    for name, desc, fields in datasets(m, args.quick, other_grids):
        signals = [m.to_signal(f) for f in fields]
        codes = adapt_codes(ck, m, signals).double().numpy()
        q, _ = quantizer(ck, BITS)
        clipped = float((abs(codes - q.stats.mean) > q.clip_sigma * q.stats.std).mean())
        entry = {"description": desc, "fields": [C.field_label(f) for f in fields],
                 "n_points": signals[0].n_points, "clipped_fraction_at_0_steps": clipped,
                 "unquantised": {}, f"bits{BITS}": {}}
        for n in steps:
            C.log(f"{name}: {n} refine steps")
            u = entry["unquantised"][n] = run_unquantised(ck, m, signals, n)
            q = entry[f"bits{BITS}"][n] = run_bits(ck, m, fields, n)
            u0, q0 = entry["unquantised"][steps[0]], entry[f"bits{BITS}"][steps[0]]
            rows.append([name, n, u["rmse"], u["rmse_area_weighted"], u["rmse"] / u0["rmse"],
                         u["seconds"], q["rmse"], q["rmse_area_weighted"],
                         q["rmse"] / q0["rmse"], q["seconds"], q["payload_bytes"]])
        if not args.quick:
            entry["lr_check_100_steps"] = {}
            for lr in LRS:
                C.log(f"{name}: lr {lr:g}, 100 steps")
                entry["lr_check_100_steps"][lr] = run_unquantised(ck, m, signals[:1], 100,
                                                                  lr)
        out["sets"][name] = entry
    header = ["set", "refine steps", "RMSE", "RMSE (area)", "x baseline", "s",
              f"RMSE {BITS}b", f"RMSE {BITS}b (area)", "x baseline", "s (encode)",
              "payload B"]
    table = C.markdown_table(header, rows)
    out["table"] = table
    path = args.output or C.RESULTS / ("refine_steps_quick.json" if args.quick
                                       else "refine_steps.json")
    C.write_json(path, out)
    print(table)
    if not args.quick:
        print("\nlr check (unquantised RMSE at 100 steps):")
        print(C.markdown_table(["set", *(f"lr {lr:g}" for lr in LRS), "clipped at 0 steps"],
                               [[n, *(e["lr_check_100_steps"][lr]["rmse"] for lr in LRS),
                                 e["clipped_fraction_at_0_steps"]]
                                for n, e in out["sets"].items()]))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    C.run_script(main, __file__)
