"""Checks of the classical-codec baselines (bench/classical_codecs.py) on a real climate field."""

from __future__ import annotations

import importlib
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
cc = importlib.import_module("classical_codecs")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "climate"
ERA5 = SHARED / "era5_t_z_3deg_2017-01-01.nc"
VENDORED_ERA5 = "era5_t_z_3deg_2017-01-01_float32.nc"


def _load_real_field() -> tuple[np.ndarray, str]:
    """ERA5 t850 member 0, time 0: from ../shared, else the vendored subset of the same file."""
    path = ERA5 if ERA5.exists() else REPO / "datasets" / "data" / VENDORED_ERA5
    field, _ = cc.load_field(path, "t", index=0)  # t[0, 0, 0]: member 0, time 0, 850 hPa
    return field, f"{path.name}:t[0,0,0]"


@pytest.fixture(scope="module")
def real():
    field, name = _load_real_field()
    field = np.asarray(field, dtype=np.float64)
    finite = np.isfinite(field)
    data_range = float(field[finite].max() - field[finite].min())
    # the codecs see float32; this is the unavoidable part of the error vs the true field
    cast_err = float(np.max(np.abs(field[finite].astype(np.float32) - field[finite])))
    return {"field": field, "name": name, "range": data_range, "cast_err": cast_err}


SZ3_REL = (1e-4, 1e-3, 1e-2, 5e-2, 2e-1)
ZFP_REL_TOL = (1e-7, 1e-4, 1e-3, 1e-2, 1e-1)
ZFP_RATES = (0.5, 1.0, 2.0, 4.0, 8.0)
KEEPBITS = (0, 2, 4, 7, 10, 23)


@pytest.fixture(scope="module")
def sweep(real):
    r = real["range"]
    points = cc.sweep_classical(
        real["field"],
        r,
        codecs=("sz3", "zfp", "bitround_zlib"),
        timeout=60,
        params={
            "sz3": [b * r for b in SZ3_REL],
            "zfp_accuracy": [t * r for t in ZFP_REL_TOL],
            "zfp_rate": list(ZFP_RATES),
            "bitround_zlib": list(KEEPBITS),
        },
    )
    by = {}
    for p in points:
        by.setdefault(p["label"], []).append(p)
    return by


def _assert_bpv_monotone(points, tighter_first=True):
    """bits/value must not grow as the tolerance grows (slack: 2 % or 4 bytes)."""
    pts = sorted(points, key=lambda p: p["param"], reverse=not tighter_first)
    for a, b in zip(pts, pts[1:], strict=False):
        slack = 0.02 * a["bits_per_value"] + 8 * 4 / a["n_values"]
        assert b["bits_per_value"] <= a["bits_per_value"] + slack, (a, b)


def _check_common(p, n_values, data_range):
    assert p["ok"], p["error"]
    assert p["n_values"] == n_values
    assert p["n_bytes"] > 0
    assert p["bits_per_value"] == pytest.approx(8 * p["n_bytes"] / n_values)
    assert 0 <= p["mae"] <= p["rmse"] <= p["max_abs_error"] + 1e-12
    if p["rmse"] > 0:
        assert p["psnr"] == pytest.approx(-10 * math.log10(p["rmse"] ** 2 / data_range**2))


def test_sz3_respects_abs_bound_and_rate_decreases(real, sweep):
    pts = sweep["sz3"]
    assert len(pts) == len(SZ3_REL)
    for p in pts:
        _check_common(p, real["field"].size, real["range"])
        bound = p["param"]
        assert p["max_abs_error_input"] <= bound * (1 + 1e-6), p
        assert p["max_abs_error"] <= bound * (1 + 1e-6) + real["cast_err"], p
        # a useful bound is also mostly used: the error is not trivially tiny
        assert p["max_abs_error_input"] > 0.3 * bound
    _assert_bpv_monotone(pts)
    assert pts[0]["bits_per_value"] > 4 * pts[-1]["bits_per_value"]


def test_zfp_accuracy_and_rate(real, sweep):
    n, r = real["field"].size, real["range"]
    acc = sweep["zfp-accuracy"]
    assert len(acc) == len(ZFP_REL_TOL)
    for p in acc:
        _check_common(p, n, r)
        assert p["max_abs_error_input"] <= p["param"] * (1 + 1e-6), p
    _assert_bpv_monotone(acc)
    # tiny tolerance -> (float32-)lossless against the true field
    tiny = min(acc, key=lambda p: p["param"])
    assert tiny["max_abs_error"] <= 1e-6 * r + real["cast_err"]

    rate = {p["param"]: p for p in sweep["zfp-rate"]}
    # 0.5 bits/value is below zfp's minimum for 2-D float32 (it aborts zfpy): a missing point
    low = rate.pop(0.5)
    assert not low["ok"] and "minimum" in low["error"]
    assert low["bits_per_value"] is None
    for rr, p in rate.items():
        _check_common(p, n, r)
        # fixed rate: the size is the rate plus block padding (61 -> 64 rows) plus a header
        assert rr <= p["bits_per_value"] <= rr * 1.1 + 8 * 32 / n, p
    errs = [rate[k]["rmse"] for k in sorted(rate)]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs


def _bitround_numpy(x32: np.ndarray, keepbits: int) -> np.ndarray:
    """Independent round-to-nearest-even of the float32 mantissa."""
    if keepbits >= 23:
        return x32.copy()
    b = x32.view(np.int32).copy()
    drop = 23 - keepbits
    b += ((b >> drop) & 1) + (1 << (drop - 1)) - 1
    b &= np.int32(-1) << drop
    return b.view(np.float32)


def test_bitround_zlib_errors_are_against_the_true_field(real, sweep):
    field, n, r = real["field"], real["field"].size, real["range"]
    pts = sweep["bitround_zlib"]
    assert [p["param"] for p in pts] == list(KEEPBITS)
    for p in pts:
        _check_common(p, n, r)
        k = p["param"]
        expected = _bitround_numpy(field.astype(np.float32), k).astype(np.float64)
        err = expected - field
        assert p["rmse"] == pytest.approx(math.sqrt(np.mean(err**2)), rel=1e-9, abs=1e-12)
        assert p["max_abs_error"] == pytest.approx(np.max(np.abs(err)), rel=1e-9, abs=1e-12)
        # relative rounding bound on the float32 input
        rel = np.abs(expected - field.astype(np.float32)) / np.abs(field.astype(np.float32))
        assert rel.max() <= 2.0 ** -(k + 1) * (1 + 1e-6)
    full = pts[-1]
    assert full["param"] == 23
    assert full["max_abs_error_input"] == 0.0
    assert full["max_abs_error"] == pytest.approx(real["cast_err"], abs=1e-12)
    assert full["rmse"] < 1e-5 * r
    # fewer kept bits -> fewer bytes
    _assert_bpv_monotone(pts, tighter_first=False)
    assert pts[0]["bits_per_value"] < 1.0 < pts[-1]["bits_per_value"]


def test_nan_cells_are_filled_excluded_and_counted(real):
    field = real["field"].copy()
    field[:5, :] = np.nan  # e.g. a missing polar cap
    r = real["range"]
    pts = cc.sweep_classical(field, r, codecs=("sz3", "bitround_zlib"),
                             params={"sz3": [0.01 * r], "bitround_zlib": [23]})
    assert len(pts) == 2
    for p in pts:
        assert p["ok"], p["error"]
        assert p["n_values"] == field.size  # NaN cells count towards bits/value
        assert math.isfinite(p["rmse"]) and math.isfinite(p["max_abs_error"])
    sz3 = pts[0]
    assert sz3["max_abs_error_input"] <= 0.01 * r * (1 + 1e-6)
    assert pts[1]["max_abs_error_input"] == 0.0


def test_crashing_or_hanging_child_is_a_missing_point(real, tmp_path, monkeypatch):
    field = real["field"][:16, :16]
    crash = tmp_path / "crash.py"
    crash.write_text("import os\nos.abort()\n")
    monkeypatch.setattr(cc, "__file__", str(crash))
    pts = cc.sweep_classical(field, real["range"], codecs=("sz3",), params={"sz3": [1.0]})
    assert len(pts) == 1 and not pts[0]["ok"]
    assert "crashed" in pts[0]["error"] and pts[0]["rmse"] is None

    hang = tmp_path / "hang.py"
    hang.write_text(textwrap.dedent("import time\ntime.sleep(30)\n"))
    monkeypatch.setattr(cc, "__file__", str(hang))
    pts = cc.sweep_classical(field, real["range"], codecs=("sz3",), params={"sz3": [1.0]},
                             timeout=1)
    assert not pts[0]["ok"] and "timeout" in pts[0]["error"]
