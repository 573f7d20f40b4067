"""Issue 13 as a climate user meets it through the real CLI: exact ``--sel``, every
variable in one stream with its own scaling, decoded files that keep the input's
metadata and say in ``history`` what made them, zarr input."""

from __future__ import annotations

import warnings
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr
from clirun import mscn, ok, refused

from mscn_datasets import vendored_path

ROOT = Path(__file__).resolve().parents[1]
ERA5 = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")
COADS = vendored_path("coads_sst_airt_2deg_jan-mar.nc")
CKPT = ROOT / "plugins" / "checkpoints" / "era5_t850.safetensors"
HELD = ["--sel", "number=8", "--sel", "isobaricInhPa=850"]  # never in the checkpoint's training


def _globals(path) -> dict:
    with netCDF4.Dataset(path) as d:
        return {k: d.getncattr(k) for k in d.ncattrs()}


def test_sel_matches_exactly_by_default(tmp_path):
    """Level 700 is not in a file with 500 and 850: refused, not silently 850."""
    out = tmp_path / "x.nc"
    line = refused(mscn("fit", ERA5, "--var", "t", "--sel", "isobaricInhPa=700",
                        "--sel", "number=8", "--checkpoint", CKPT, "-o", out))
    assert "700" in line and "850" in line and "500" in line, line
    assert not out.exists()


def test_sel_nearest_on_request_says_what_it_chose(tmp_path):
    out = tmp_path / "x.nc"
    r = mscn("fit", ERA5, "--var", "t", "--sel", "isobaricInhPa=700", "--sel", "number=8",
             "--sel-method", "nearest", "--checkpoint", CKPT, "--steps", "1", "-o", out)
    ok(r)
    assert "nearest is 850" in r.stderr, r.stderr
    with xr.open_dataset(out) as ds:
        assert float(ds["isobaricInhPa"]) == 850.0


def test_help_states_the_selection_tolerance():
    r = mscn("fit", "--help", "--modality", "sphere")
    assert r.returncode == 0
    assert "--sel-method" in r.stdout and "1e-6" in r.stdout


@pytest.mark.parametrize("var_flags", [[], ["--var", "t", "--var", "z"]])
def test_every_variable_goes_into_one_stream(tmp_path, var_flags):
    """No --var (every variable) or --var repeated: t and z both encoded, each field with
    its own scaling; z is unknown to the checkpoint and the user is told so."""
    stream, out = tmp_path / "tz.mscn", tmp_path / "tz.nc"
    r = mscn("encode", ERA5, *var_flags, *HELD, "--checkpoint", CKPT, "-o", stream)
    rep = ok(r)
    assert rep["items"] == 8  # 4 times x {t, z}
    assert "z[m**2 s**-2] is not in the checkpoint's training set" in r.stderr
    dec = ok(mscn("decode", stream, "--checkpoint", CKPT, "-o", out))
    assert dec["items"] == 8
    with xr.open_dataset(out) as got, xr.open_dataset(ERA5) as src:
        assert set(got.data_vars) == {"t", "z"}
        for v in ("t", "z"):
            assert got[v].attrs["units"] == src[v].attrs["units"]
            assert got[v].dims == src[v].sel(number=8, isobaricInhPa=850).dims
        t = src["t"].sel(number=8, isobaricInhPa=850).values
        assert np.sqrt(np.mean((got["t"].values - t) ** 2)) < 1.5  # K; measured 0.66
        # z is decoded on its own scale (the specialist checkpoint never saw z: a poor but
        # real fit, measured correlation 0.69), not on t's range in kelvin
        z = src["z"].sel(number=8, isobaricInhPa=850).values
        zd = got["z"].values
        assert np.corrcoef(zd.ravel(), z.ravel())[0, 1] > 0.5
        assert z.min() - 0.1 * np.ptp(z) < zd.min() and zd.max() < z.max() + 0.1 * np.ptp(z)


def test_decoded_file_keeps_the_inputs_metadata(tmp_path):
    """Global attributes, Conventions as they were, time units/calendar/dtype, the
    variable's encoding; history gains one line naming command, checkpoint and bits."""
    stream, out = tmp_path / "t.mscn", tmp_path / "t.nc"
    ok(mscn("encode", ERA5, "--var", "t", *HELD, "--checkpoint", CKPT, "--bits", "5",
            "-o", stream))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = mscn("decode", stream, "--checkpoint", CKPT, "-o", out)
    ok(r)
    assert "SerializationWarning" not in r.stderr, r.stderr
    src, got = _globals(ERA5), _globals(out)
    assert {k: v for k, v in got.items() if k != "history"} == \
        {k: v for k, v in src.items() if k != "history"}  # incl. Conventions CF-1.7, GRIB_*
    first, rest = got["history"].split("\n", 1)
    assert rest == src["history"]
    assert "mscn decode" in first and "5 bits" in first and "bits/value" in first
    from mscn_core.checkpoint import file_sha256

    assert file_sha256(CKPT)[:16] in first
    with netCDF4.Dataset(ERA5) as a, netCDF4.Dataset(out) as b:
        assert b.data_model == a.data_model
        for name in ("time", "valid_time", "t"):
            va, vb = a[name], b[name]
            assert vb.dtype == va.dtype, name
            for attr in ("units", "calendar", "long_name", "standard_name"):
                if attr in va.ncattrs():
                    assert vb.getncattr(attr) == va.getncattr(attr), (name, attr)
        chunks = b["t"].chunking()
        assert chunks != "contiguous" and chunks[-2:] == [61, 120]
        assert all(c == 1 for c in chunks[:-2])  # one chunk per field


def test_non_cf_input_gets_no_conventions_stamp(tmp_path):
    """COADS has no Conventions attribute: the decoded file must not claim one; its
    _FillValue/missing_value survive, and land cells are the fill value again."""
    out = tmp_path / "sst.nc"
    ok(mscn("fit", COADS, "--var", "SST", "--sel", "TIME=366",
            "--checkpoint", CKPT, "--steps", "1", "-o", out))
    src, got = _globals(COADS), _globals(out)
    assert ("Conventions" in got) == ("Conventions" in src)
    with netCDF4.Dataset(COADS) as a, netCDF4.Dataset(out) as b:
        for attr in ("_FillValue", "missing_value"):
            if attr in a["SST"].ncattrs():
                assert np.array_equal(b["SST"].getncattr(attr), a["SST"].getncattr(attr)), attr
        a["SST"].set_auto_mask(False)
        b["SST"].set_auto_mask(False)
        raw_in, raw_out = a["SST"][0], b["SST"][:].reshape(a["SST"].shape[1:])
        fill = a["SST"].getncattr("_FillValue") if "_FillValue" in a["SST"].ncattrs() else None
        if fill is not None:
            assert np.array_equal(raw_out == fill, raw_in == fill)


def test_fit_reads_a_zarr_store(tmp_path):
    store, out = tmp_path / "era5.zarr", tmp_path / "t.nc"
    with xr.open_dataset(ERA5) as ds:
        ds.to_zarr(store, consolidated=False)  # zarr 3 warns about consolidated metadata
    rep = ok(mscn("fit", store, "--var", "t", *HELD, "--checkpoint", CKPT, "--steps", "1",
                  "-o", out))
    assert rep["items"] == 4 and rep["mean"]["rmse"] < 10
    with xr.open_dataset(out) as got:
        assert got["t"].dims == ("time", "latitude", "longitude")
        assert float(got["number"]) == 8 and float(got["isobaricInhPa"]) == 850
