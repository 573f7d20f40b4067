"""MSCN against spherical-harmonic truncation at the same number of coefficients (issue 8
part 3), on held-out real fields of several grids.

For every field (never in the shipped checkpoint's training set), in one run:

* **SH-N**: real orthonormal spherical harmonics up to degree L, N = (L+1)² = 64, 256,
  1024 coefficients (L = 7, 15, 31), fitted by area-weighted least squares on the field's
  valid points and evaluated at the same points (float64 coefficients, not quantised).
  Weights: the cell area of each point -- on 1-D lat/lon grids (regular, Gaussian) the
  exact area of the cell between the midpoints of neighbouring latitudes and longitudes,
  Δsin(lat)·Δlon (= cos(lat) × cell spacing); on curvilinear grids cos(lat)·|Jacobian| of
  (lat, lon) over the grid indices; on unstructured grids the spherical Voronoi cell
  areas. (The test files carry no cell bounds, so the plugin has no areas of its own.)
* **MSCN-256** (the shipped ERA5 t850 specialist, ``era5_t850.safetensors``, its 256
  modulations): 3 meta-learned steps unquantised; the same codes at 6 bits (what a
  stream holds); 3 steps + 100 ``refine_codes`` steps unquantised. 64 and 1024
  modulations need checkpoints trained at those budgets: ``climate_general_b64`` /
  ``_b1024.safetensors`` (the plain general recipe; gitignored, rebuilt with
  ``plugins/checkpoints/build_climate_general.py --budget 64`` / ``--budget 1024``, the
  latter 6x256 automatically) enter through ``--extra``, as does the CLI's default
  ``climate_general_b192_sh7.safetensors`` (192 modulations + a degree-7 SH base).
* **training mean**: the network with its initial (unadapted) modulations, the reference
  of ``mscn evaluate``'s ``skill_vs_training_mean``.
* **general MSCN-256** (``--general``, default the plain 256-modulation general
  checkpoint ``climate_general.safetensors`` when present -- not the CLI's default, which
  has 192 modulations and an SH base and goes in ``--extra``): the same four entries for
  that checkpoint (field scaling, trained on diverse fields that exclude every test set
  here), keys prefixed ``general_``.
* **COIN**: a small SIREN fitted from scratch per field with Adam (``mscn fit`` without
  ``--checkpoint``), see ``COIN`` for the settings.

All errors go through the plugin's ``metrics`` (field units; ``rmse`` over valid points,
``rmse_area_weighted`` by cos(lat), which the plugin uses when a file has no cell areas),
plus ``rmse_cell_area``: RMSE weighted by the SH fit's own cell areas above.

    .venv/bin/python bench/sphere_vs_sh.py            # ~4 min on 1 CPU thread
    .venv/bin/python bench/sphere_vs_sh.py --quick    # 1 field per set, fewer steps
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from mscn_plugins import sphere_harmonics as SH  # noqa: E402

DATA = C.ROOT / "datasets" / "data"
DEGREES = (7, 15, 31)  # (L+1)^2 = 64, 256, 1024 coefficients
BITS = 6
REFINE_STEPS = 100
COIN = {"depth": 4, "width": 64, "w0": 30.0, "steps": 300, "lr": 1e-3}
OUT = C.RESULTS / "sphere_vs_sh.json"
# the plain 256-modulation general checkpoint (same budget as the specialist); the CLI's
# default, climate_general_b192_sh7, has 192 modulations + an SH base: pass it by --extra
GENERAL = C.ROOT / "plugins" / "checkpoints" / "climate_general.safetensors"


# -- real spherical harmonics (the plugin's own module: one implementation) -----------------

sh_basis, sh_fit = SH.sh_basis, SH.sh_fit
latlon_cell_areas = SH.latlon_cell_areas


def sh_sanity() -> dict:
    """Orthonormality on a fine Gauss-Legendre grid and exact recovery of a field made of
    a few SH (on the 3° ERA5 grid, cos-lat-spacing weights, fit at L=15)."""
    deg = max(DEGREES)
    x, gw = np.polynomial.legendre.leggauss(2 * deg + 2)  # exact for degree <= 4*deg+3
    nlon = 4 * deg + 4
    lat = np.arcsin(x)
    lon = 2 * np.pi * np.arange(nlon) / nlon
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    w = (gw[:, None] * np.full(nlon, 2 * np.pi / nlon)[None, :]).ravel()
    a = sh_basis(la.ravel(), lo.ravel(), deg)
    gram = (a * w[:, None]).T @ a
    ortho = float(np.abs(gram - np.eye(gram.shape[0])).max())
    # known low-order forms: Y_00 = 1/sqrt(4pi), Y_10 = sqrt(3/4pi) sin(lat),
    # Y_11 = sqrt(3/4pi) cos(lat) cos(lon) (up to the sign convention)
    ref = np.stack([np.full(la.size, 1 / math.sqrt(4 * math.pi)),
                    math.sqrt(3 / (4 * math.pi)) * np.sin(la.ravel()),
                    math.sqrt(3 / (4 * math.pi)) * np.cos(la.ravel()) * np.cos(lo.ravel())], 1)
    got = a[:, [0, 2, 3]]
    forms = float(np.abs(np.abs(got) - np.abs(ref)).max())
    # exact fit of a field of a few SH on a 3 degree regular grid (poles included)
    lat3 = np.deg2rad(np.linspace(90, -90, 61))
    lon3 = np.deg2rad(np.arange(0, 360, 3.0))
    la3, lo3 = np.meshgrid(lat3, lon3, indexing="ij")
    rng = np.random.default_rng(0)
    a3 = sh_basis(la3.ravel(), lo3.ravel(), 15)
    true = np.zeros(a3.shape[1])
    true[rng.choice(np.arange(64), 6, replace=False)] = rng.normal(size=6)
    field = a3 @ true
    w3 = latlon_cell_areas(lat3, lon3).ravel()
    coef, fit, diag = sh_fit(la3.ravel(), lo3.ravel(), field, w3, 15)
    return {"gauss_legendre_grid": [len(lat), nlon], "max_abs_gram_minus_identity_L31": ortho,
            "max_abs_error_Y00_Y10_Y11_closed_forms": forms,
            "exact_fit_6_SH_on_3deg_grid_L15": {
                "max_abs_coef_error": float(np.abs(coef - true).max()),
                "max_abs_field_error": float(np.abs(fit - field).max()), **diag},
            "area_sum_3deg_grid_over_4pi": float(w3.sum() / (4 * math.pi))}


# -- cell areas -------------------------------------------------------------------------------

def cell_areas(signal) -> tuple[np.ndarray, str]:
    """Per-point weights for the SH fit and how they were made (the plugin's own rule)."""
    area = getattr(signal, "_cell_area", None)
    return SH.point_weights(signal.coords.double().numpy(), signal.meta.get("grid"),
                            signal.meta["shape"], None if area is None else area.numpy())


# -- data ---------------------------------------------------------------------------------------

def datasets(m, quick: bool) -> list[tuple[str, str, list]]:
    era5 = C.ERA5

    def sel(var, level, member):
        return m.read(era5, var=var, sel=[f"isobaricInhPa={level}", f"number={member}"])[0]

    sets = [("t850_m8-9", "ERA5 t 850 hPa, members 8-9, 00 UTC (held out, in distribution)",
             [sel("t", 850, 8), sel("t", 850, 9)]),
            ("t500", "ERA5 t 500 hPa, member 8, 00 UTC (another level)", [sel("t", 500, 8)]),
            ("z500", "ERA5 z 500 hPa, member 8, 00 UTC (another variable)",
             [sel("z", 500, 8)]),
            ("coads_sst", "COADS SST 2 deg, January and February (another data set, land NaN)",
             m.read(DATA / "coads_sst_airt_2deg_jan-mar.nc", var="SST")[:2]),
            ("t42_u300", "T42 Gaussian grid, U 300 hPa, first time (zonal wind)",
             m.read(DATA / "t42_gaussian_uv300_U.nc", var="U")[:1]),
            ("mpiom_tos", "MPIOM tos, curvilinear ocean crop (regional, land NaN)",
             m.read(DATA / "mpiom_tos_curvilinear_crop.nc", var="tos")[:1]),
            ("geodesic_height", "geodesic 2562-cell grid, height (unstructured)",
             m.read(DATA / "geodesic_2562cells_t0.nc", var="height")[:1])]
    return [(n, d, f[:1] if quick else f) for n, d, f in sets]


# -- methods ------------------------------------------------------------------------------------

def metrics(m, signal, pred, weights) -> dict:
    import torch

    pred = torch.as_tensor(np.asarray(pred, np.float64)).reshape(-1, 1).float()
    out = m.metrics(signal, pred)
    valid = (signal.mask.numpy().reshape(-1).astype(bool) if signal.mask is not None
             else np.ones(signal.n_points, bool))
    err = (pred.double().numpy().reshape(-1) - signal.targets.double().numpy().reshape(-1))
    w = weights[valid]
    out["rmse_cell_area"] = (math.sqrt(float((w * err[valid] ** 2).sum() / w.sum()))
                             * m.value_scale(signal.meta))  # field units per target unit
    keep = ("rmse", "rmse_area_weighted", "rmse_cell_area", "max_abs_error", "psnr_db")
    return {k: float(out[k]) for k in keep}


def coin_predictions(m, signals, steps: int) -> tuple[list, float, int]:
    import torch

    from mscn_core.meta import fit_from_scratch
    from mscn_core.methods import MethodConfig, build_representation
    from mscn_core.signals import full_batches

    siren = C.siren_config(depth=COIN["depth"], width=COIN["width"], w0=COIN["w0"],
                           w0_first=COIN["w0"], in_dim=m.in_dim, out_dim=m.out_dim)
    preds: list = [None] * len(signals)
    n_params = 0
    t0 = time.perf_counter()
    for idx, batch in full_batches(signals, max_batch=len(signals)):
        torch.manual_seed(0)
        rep = build_representation(siren, MethodConfig(method="coin", coin_lr=COIN["lr"],
                                                       coin_steps=steps),
                                   torch.Generator().manual_seed(0))
        state = fit_from_scratch(rep, batch, m, steps)
        with torch.no_grad():
            pred = m.render(lambda pts, state=state, rep=rep: rep.predict(state, {}, pts),
                            batch.coords)
        n_params = rep.code_size()
        for j, i in enumerate(idx):
            preds[i] = pred[j]
    return preds, time.perf_counter() - t0, n_params


def mscn_methods(ck, m, signals, weights, refine_steps: int, prefix: str = ""
                 ) -> tuple[list[dict], dict]:
    """Per field: 3 steps, the same at BITS bits, 3 + refine steps, training mean (keys
    ``{prefix}mscn_{budget}_…``); and the seconds of adapting/refining all fields."""
    from mscn_core.pipeline import (
        adapt_codes,
        initial_predictions,
        predictor,
        quantize_codes,
        refine_codes,
    )

    budget = ck.rep.code_size()
    t0 = time.perf_counter()
    codes = adapt_codes(ck, m, signals)
    t_adapt = time.perf_counter() - t0
    _, qcodes = quantize_codes(ck, codes, BITS)
    t0 = time.perf_counter()
    rcodes = refine_codes(ck, m, signals, codes, refine_steps)
    t_refine = time.perf_counter() - t0
    init = initial_predictions(ck, m, signals)
    out = []
    for i, (s, w) in enumerate(zip(signals, weights, strict=True)):
        out.append({
            f"{prefix}mscn_{budget}_3steps": metrics(m, s, predictor(ck, m, codes[i])(s.coords), w),
            f"{prefix}mscn_{budget}_3steps_{BITS}bit": metrics(
                m, s, predictor(ck, m, qcodes[i])(s.coords), w),
            f"{prefix}mscn_{budget}_refine{refine_steps}": metrics(
                m, s, predictor(ck, m, rcodes[i])(s.coords), w),
            f"{prefix}training_mean": metrics(m, s, init[i], w)})
    return out, {f"{prefix}mscn_adapt_all_fields": t_adapt,
                 f"{prefix}mscn_refine_all_fields": t_refine}


def budget_table(out: dict, general_budget: int | None, extras: list,
                 refine_steps: int) -> str:
    """Per field and budget B in 64/256/1024: SH-B and every MSCN checkpoint whose
    modulations plus SH base coefficients total B (3 steps, and + refine steps)."""
    cols = []  # (budget, header, method key)
    for b in (64, 256, 1024):
        cols.append((b, f"SH-{b}", f"sh_{b}"))
        if general_budget == b:
            cols += [(b, f"general {b} 3st", f"general_mscn_{b}_3steps"),
                     (b, f"general {b} +{refine_steps}", f"general_mscn_{b}_refine{refine_steps}")]
        for stem, eck, _, total in extras:
            if total == b:
                k = eck.rep.code_size()
                cols += [(b, f"{stem} 3st", f"{stem}_mscn_{k}_3steps"),
                         (b, f"{stem} +{refine_steps}", f"{stem}_mscn_{k}_refine{refine_steps}")]
    rows = []
    for name, entry in out["sets"].items():
        for i, f in enumerate(entry["fields"]):
            r = f["methods"]
            rows.append([name, i] + [r[k]["rmse"] if k in r else None for _, _, k in cols])
    return C.markdown_table(["set", "field"] + [h for _, h, _ in cols], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--general", default=str(GENERAL) if GENERAL.exists() else None,
                    help="a second (general, field-scaling) checkpoint to compare; "
                         "default: the plain 256-modulation climate_general.safetensors "
                         "if present (the CLI's default b192_sh7 goes in --extra)")
    ap.add_argument("--extra", action="append", default=[], metavar="CKPT",
                    help="more general checkpoints (repeatable), e.g. the 64- and 1024-"
                         "modulation ones (build_climate_general.py --budget 64 / 1024) or "
                         "the default with an SH base; keys prefixed by the file "
                         "stem, and a same-coefficient table: modulations + (L+1)² SH base "
                         "coefficients against SH of that many coefficients")
    args = ap.parse_args()
    C.setup_torch(args.threads)
    warnings.simplefilter("ignore")  # "not in the checkpoint's training set": the point here
    from mscn_core.checkpoint import load_checkpoint
    from mscn_core.registry import get_modality

    t_start = time.perf_counter()
    refine_steps = 10 if args.quick else REFINE_STEPS
    coin_steps = 50 if args.quick else COIN["steps"]
    ck = load_checkpoint(C.SHIPPED)
    m = get_modality("sphere")
    m.load_state(ck.modality_state)
    budget = ck.rep.code_size()
    gck = gm = None
    if args.general:
        gck = load_checkpoint(args.general)
        gm = get_modality("sphere")  # its own instance: the general one scales by field
        gm.load_state(gck.modality_state)
        if gck.rep.code_size() != budget:
            raise SystemExit(f"{args.general}: {gck.rep.code_size()} modulations, the "
                             f"specialist has {budget}")
    extras = []  # (stem, checkpoint, modality, total coefficients)
    for path in args.extra:
        eck = load_checkpoint(path)
        em = get_modality("sphere")
        em.load_state(eck.modality_state)
        base = SH.n_coefficients(em.sh_degree) if em.sh_degree >= 0 else 0
        extras.append((Path(path).name.split(".")[0], eck, em, eck.rep.code_size() + base))
    C.log("SH sanity checks")
    sanity = sh_sanity()
    C.log(f"  {sanity}")
    out = {"checkpoint": str(C.SHIPPED.relative_to(C.ROOT)), "sha256": ck.sha256,
           "mscn_modulations": budget, "sh_degrees": list(DEGREES),
           "sh_coefficients": [(d + 1) ** 2 for d in DEGREES],
           "settings": {
               "sh": "real orthonormal SH (scipy.special.sph_harm_y), weighted least squares "
                     "(scipy.linalg.lstsq, gelsd) on valid points, weights = cell areas (see "
                     "per-set 'weights'), evaluated at the same points; float64 coefficients",
               "mscn": f"shipped checkpoint, {budget} modulations: 3 meta-learned steps "
                       f"(unquantised; and quantised to {BITS} bits), and 3 + "
                       f"{refine_steps} refine_codes steps (lr default, unquantised)",
               "mscn_other_budgets": "64 and 1024 modulations need checkpoints meta-trained "
                                     "at those budgets: climate_general_b64/_b1024 "
                                     "(build_climate_general.py --budget 64 / --budget "
                                     "1024), compared when given by --extra",
               "training_mean": "the checkpoint's network with its initial modulations "
                                "(pipeline.initial_predictions)",
               "coin": {**COIN, "steps": coin_steps,
                        "note": "fresh SIREN per field, Adam on all points, full batch, "
                                "seed 0 (mscn fit without --checkpoint, smaller and shorter)"},
               "metrics": "plugin metrics in field units: rmse (valid points, unweighted), "
                          "rmse_area_weighted (plugin: cos(lat), no file has cell bounds); "
                          "rmse_cell_area: weighted by the SH fit's cell areas",
               "threads": args.threads, "quick": args.quick},
           "sh_sanity": sanity, "machine": C.machine_info(), "sets": {}}
    if gck is not None:
        out["general_checkpoint"] = {
            "path": str(Path(args.general).resolve().relative_to(C.ROOT))
            if Path(args.general).resolve().is_relative_to(C.ROOT) else str(args.general),
            "sha256": gck.sha256, "scaling_mode": gm.scaling_mode}
        out["settings"]["general_mscn"] = ("the same MSCN entries for the general checkpoint "
                                           "(keys general_*), on its own signals (its "
                                           "scaling)")
    rows = []
    for name, desc, fields in datasets(m, args.quick):
        C.log(f"{name}: {len(fields)} field(s)")
        signals = [m.to_signal(f) for f in fields]
        entry = {"description": desc, "n_points": signals[0].n_points,
                 "grid": signals[0].meta.get("grid", "regular"),
                 "scaling": signals[0].meta["scaling"], "fields": []}
        per = [{"label": C.field_label(f) or str(f.name),
                "n_valid": int(s.mask.sum()) if s.mask is not None else s.n_points,
                "methods": {}, "seconds": {}} for f, s in zip(fields, signals, strict=True)]
        weights = []
        for s, p in zip(signals, per, strict=True):
            w, how = cell_areas(s)
            weights.append(w)
            entry["weights"] = how
            p["weights_sum_over_4pi"] = float(w.sum() / (4 * math.pi))
            xyz = s.coords.double().numpy()
            lat = np.arcsin(np.clip(xyz[:, 2], -1, 1))
            lon = np.arctan2(xyz[:, 1], xyz[:, 0])
            valid = (s.mask.numpy().astype(bool).reshape(-1) if s.mask is not None
                     else np.ones(s.n_points, bool))
            y = s.targets.double().numpy().reshape(-1)
            for deg in DEGREES:
                t0 = time.perf_counter()
                coef, _, diag = sh_fit(lat[valid], lon[valid], y[valid], w[valid], deg)
                pred = sh_basis(lat, lon, deg) @ coef
                pred[~valid] = 0.0  # never scored
                key = f"sh_{(deg + 1) ** 2}"
                p["methods"][key] = {**metrics(m, s, pred, w), **diag}
                p["seconds"][key] = time.perf_counter() - t0
        # MSCN at its budget (the specialist; then the general checkpoint, if any)
        spec, t_spec = mscn_methods(ck, m, signals, weights, refine_steps)
        gen, t_gen = [{}] * len(signals), {}
        if gck is not None:
            gsignals = [gm.to_signal(f) for f in fields]
            gen, t_gen = mscn_methods(gck, gm, gsignals, weights, refine_steps, "general_")
            entry["general_scaling"] = gsignals[0].meta["scaling"]
        ext = []
        for stem, eck, em, _ in extras:
            esignals = [em.to_signal(f) for f in fields]
            res, t_ext = mscn_methods(eck, em, esignals, weights, refine_steps, f"{stem}_")
            ext.append(res)
            t_gen = {**t_gen, **t_ext}
        C.log(f"  {name}: MSCN done ({t_spec}, {t_gen}); COIN")
        coin, t_coin, n_coin = coin_predictions(m, signals, coin_steps)
        out["settings"]["coin"]["params_per_field"] = n_coin
        for i, (s, p, w) in enumerate(zip(signals, per, weights, strict=True)):
            meth = p["methods"]
            meth.update(spec[i])
            meth.update(gen[i])
            for res in ext:
                meth.update(res[i])
            meth[f"coin_{COIN['depth']}x{COIN['width']}_{coin_steps}steps"] = metrics(
                m, s, coin[i], w)
            p["seconds"].update({**t_spec, **t_gen, "coin_all_fields": t_coin})
            sh256 = meth["sh_256"]["rmse"]
            for pre in ("", "general_") if gck is not None else ("",):
                p[f"ratio_{pre}mscn_over_sh256"] = {
                    "3steps": meth[f"{pre}mscn_{budget}_3steps"]["rmse"] / sh256,
                    f"3steps_{BITS}bit": meth[f"{pre}mscn_{budget}_3steps_{BITS}bit"]["rmse"]
                    / sh256,
                    f"refine{refine_steps}": meth[f"{pre}mscn_{budget}_refine{refine_steps}"][
                        "rmse"] / sh256}
            units = s.meta.get("units", "")
            r = p["methods"]
            label = re.sub(r",?isobaricInhPa=[^,]*", "", p["label"])
            best = "general_" if gck is not None else ""  # ratios/area of the general one

            def g(key: str, what: str = "rmse", r=r) -> float | None:
                return r[key][what] if key in r else None

            rows.append([name, f"{i}: {label}", units,
                         r["sh_64"]["rmse"], r["sh_256"]["rmse"], r["sh_1024"]["rmse"],
                         r[f"mscn_{budget}_3steps"]["rmse"],
                         r[f"mscn_{budget}_refine{refine_steps}"]["rmse"],
                         g(f"general_mscn_{budget}_3steps"),
                         g(f"general_mscn_{budget}_3steps_{BITS}bit"),
                         g(f"general_mscn_{budget}_refine{refine_steps}"),
                         g("general_training_mean"),
                         r[f"coin_{COIN['depth']}x{COIN['width']}_{coin_steps}steps"]["rmse"],
                         p[f"ratio_{best}mscn_over_sh256"]["3steps"],
                         p[f"ratio_{best}mscn_over_sh256"][f"refine{refine_steps}"],
                         r["sh_256"]["rmse_area_weighted"],
                         r[f"{best}mscn_{budget}_3steps"]["rmse_area_weighted"],
                         r[f"{best}mscn_{budget}_refine{refine_steps}"]["rmse_area_weighted"]])
        entry["fields"] = per
        out["sets"][name] = entry
    header = ["set", "field", "units", "SH-64", "SH-256", "SH-1024", "spec 3st",
              f"spec +{refine_steps}ref", "gen 3st", f"gen 3st {BITS}b",
              f"gen +{refine_steps}ref", "gen train mean",
              f"COIN {COIN['depth']}x{COIN['width']} {coin_steps}st", "gen/SH256",
              "gen+ref/SH256", "SH-256 (area)", "gen 3st (area)", "gen +ref (area)"]
    table = C.markdown_table(header, rows)
    out["table"] = table
    if extras:
        out["extra_checkpoints"] = {
            stem: {"path": str(p), "sha256": eck.sha256, "modulations": eck.rep.code_size(),
                   "sh_degree": em.sh_degree, "total_coefficients": total}
            for (stem, eck, em, total), p in zip(extras, args.extra, strict=True)}
        out["budget_table"] = budget_table(out, budget if gck is not None else None,
                                           extras, refine_steps)
    out["wall_seconds"] = time.perf_counter() - t_start
    path = args.output or (C.RESULTS / "sphere_vs_sh_quick.json" if args.quick else OUT)
    C.write_json(path, out)
    print("RMSE in field units (valid points); spec = the ERA5 specialist, gen = the general "
          "checkpoint (ratios and area columns: gen when given, else spec); last three "
          "columns area-weighted (cos lat)\n")
    print(table)
    if extras:
        print("\nSame number of coefficients (modulations + SH base coefficients), RMSE:\n")
        print(out["budget_table"])
    print(f"\nwrote {path} ({out['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    C.run_script(main, __file__)
