"""The sphere modality end to end on real NetCDF: read → fit → NetCDF/bitstream → back."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import ERA5

from mscn_core.allocator import tcmalloc_path
from mscn_core.checkpoint import load_checkpoint
from mscn_core.pipeline import (
    adapt_codes,
    decode_stream,
    encode_items,
    predictor,
    quantize_codes,
    quantizer,
)
from mscn_core.registry import get_modality
from mscn_datasets import climate, vendored_path
from mscn_plugins.sphere import SphereModality, SphereOptions, sphere_coords

COADS = vendored_path("coads_sst_airt_2deg_jan-mar.nc")



def _mscn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mscn_core", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _held_out(modality):
    return [f for f in modality.read(ERA5, var="t", sel=["isobaricInhPa=850"])
            if int(f["number"]) >= 8]


@pytest.fixture(scope="module")
def loaded(tiny_sphere_checkpoint):
    ck = load_checkpoint(tiny_sphere_checkpoint)
    m = get_modality("sphere")
    m.load_state(ck.modality_state)
    return ck, m


def test_sphere_coordinates_are_unit_vectors_with_poles_and_dateline():
    lat = np.array([-90.0, 0.0, 90.0])
    lon = np.array([0.0, 90.0, 180.0, 359.999])
    xyz = sphere_coords(lat, lon).reshape(3, 4, 3)
    np.testing.assert_allclose(np.linalg.norm(xyz, axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(xyz[2, :, 2], 1.0)  # north pole: z = 1 whatever the longitude
    np.testing.assert_allclose(xyz[1, 1], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(xyz[1, 0], xyz[1, 3], atol=1e-4)  # no seam at the date line


def test_scaling_is_fitted_per_variable_and_stored(loaded):
    ck, m = loaded
    (key, (lo, hi)), = ck.modality_state["scaling"].items()
    assert key == "t[K]" and 200 < lo < 250 < 290 < hi < 320
    s = m.to_signal(_held_out(m)[0])
    assert s.meta["scaling"].startswith("training-set range")
    assert float(s.targets.min()) > -0.1 and float(s.targets.max()) < 1.1


def test_metrics_units_and_psnr_are_consistent(loaded):
    _, m = loaded
    s = m.to_signal(_held_out(m)[0])
    pred = s.targets + 0.01  # a constant error of 1 % of the range
    met = m.metrics(s, pred)
    span = s.meta["scale"][1] - s.meta["scale"][0]
    assert met["psnr_db"] == pytest.approx(40.0, abs=1e-3)
    assert met["rmse"] == pytest.approx(0.01 * span, rel=1e-4)
    assert met["mae"] == pytest.approx(0.01 * span, rel=1e-4)
    assert met["rmse_area_weighted"] == pytest.approx(0.01 * span, rel=1e-4)


def test_area_weighting_discounts_polar_errors(loaded):
    _, m = loaded
    s = m.to_signal(_held_out(m)[0])
    pred = s.targets.clone()
    polar = s.coords[:, 2].abs() > 0.95
    pred[polar] += 0.1
    met = m.metrics(s, pred)
    assert met["rmse_area_weighted"] < 0.5 * met["rmse"]


def test_meta_learned_fit_beats_the_training_mean_on_held_out_members(loaded):
    ck, m = loaded
    fields = _held_out(m)
    signals = [m.to_signal(f) for f in fields]
    codes = adapt_codes(ck, m, signals)
    fit = [m.metrics(s, predictor(ck, m, c)(s.coords))["rmse"]
           for s, c in zip(signals, codes, strict=True)]
    train = [f for f in m.read(ERA5, var="t", sel=["isobaricInhPa=850"]) if int(f["number"]) < 6]
    mean = torch.stack([m.to_signal(f).targets for f in train]).mean(0)
    base = [m.metrics(s, mean)["rmse"] for s in signals]
    untrained = adapt_codes(ck, m, signals, steps=0)
    zero = [m.metrics(s, predictor(ck, m, c)(s.coords))["rmse"]
            for s, c in zip(signals, untrained, strict=True)]
    # 3 inner steps must improve on the shared init, and the tiny test net must not be
    # worse than the climatological mean by more than a little (the shipped one beats it).
    assert np.mean(fit) < np.mean(zero)
    assert np.mean(fit) < 1.5 * np.mean(base)


def test_fit_cli_writes_netcdf_that_reopens_with_same_names(tiny_sphere_checkpoint, tmp_path):
    out = tmp_path / "recon.nc"
    r = _mscn("fit", ERA5, "--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=8,9",
              "--checkpoint", tiny_sphere_checkpoint, "-o", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["items"] == 8 and math.isfinite(report["mean"]["psnr_db"])
    src = xr.open_dataset(ERA5)["t"].sel(isobaricInhPa=850, number=[8, 9])
    got = xr.open_dataset(out)["t"]
    assert set(got.dims) == set(src.dims) - {"isobaricInhPa"} | set(got.dims)
    np.testing.assert_array_equal(got["latitude"], src["latitude"])  # 90 → -90 kept
    np.testing.assert_array_equal(got["longitude"], src["longitude"])
    np.testing.assert_array_equal(got["number"], [8, 9])
    assert got.attrs["units"] == "K" and got.attrs["standard_name"] == "air_temperature"
    err = float(np.sqrt(((got.transpose(*src.dims[:2], ...) - src.squeeze()) ** 2).mean()))
    assert err == pytest.approx(report["mean"]["rmse"], rel=0.05)
    # an existing output is not clobbered
    before = out.read_bytes()
    r = _mscn("fit", ERA5, "--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=8",
              "--checkpoint", tiny_sphere_checkpoint, "-o", out)
    assert r.returncode != 0 and "exists" in r.stderr
    assert out.read_bytes() == before


def test_reconstruction_at_another_resolution(loaded):
    ck, m = loaded
    field = _held_out(m)[0]
    s = m.to_signal(field)
    code = adapt_codes(ck, m, [s])[0]
    one_deg = m.reconstruct(s.meta, predictor(ck, m, code), SphereOptions(resolution=1.0),
                              template=field)
    assert one_deg.sizes["latitude"] == 181 and one_deg.sizes["longitude"] == 360
    assert float(one_deg["latitude"][0]) == 90.0  # the input's north-to-south order is kept
    native = m.reconstruct(s.meta, predictor(ck, m, code), None, template=field)
    # the 1° field sampled at the 3° points is the native reconstruction (same function)
    sub = one_deg.sel(latitude=native["latitude"], longitude=native["longitude"])
    np.testing.assert_allclose(sub.values, native.values, atol=1e-3)


def test_flipped_latitude_and_negative_longitudes_give_the_same_fit(loaded):
    ck, m = loaded
    field = _held_out(m)[0]
    other = field.isel(latitude=slice(None, None, -1))
    other = other.assign_coords(longitude=((other["longitude"] + 180) % 360) - 180)
    other = other.sortby("longitude")
    a, b = (adapt_codes(ck, m, [m.to_signal(f)])[0] for f in (field, other))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    recon = m.reconstruct(m.to_signal(other).meta, predictor(ck, m, b), None, template=other)
    np.testing.assert_array_equal(recon["longitude"], other["longitude"])
    assert float(recon["longitude"].min()) < 0


def test_masked_cells_are_excluded_and_restored_as_nan(loaded):
    ck, m = loaded
    sst = m.read(COADS, var="SST")[0]
    s = m.to_signal(sst)
    assert s.mask is not None and 0.3 < 1 - float(s.mask.float().mean()) < 0.6
    code = adapt_codes(ck, m, [s])[0]
    pred = predictor(ck, m, code)(s.coords)
    met = m.metrics(s, pred)
    assert all(math.isfinite(v) for v in met.values())
    recon = m.reconstruct(s.meta, predictor(ck, m, code), None, template=sst)
    np.testing.assert_array_equal(np.isnan(recon.values), np.isnan(sst.values))
    # garbage in masked cells must not change the fit: the loss never sees them
    poisoned = sst.fillna(1e6)
    poisoned.values[np.isnan(sst.values)] = 1e6
    s2 = m.to_signal(poisoned.where(~np.isnan(sst)))
    torch.testing.assert_close(adapt_codes(ck, m, [s2])[0], code)


def test_encode_decode_round_trip_matches_fit_at_same_quantisation(loaded, tmp_path):
    ck, m = loaded
    fields = _held_out(m)[:3]
    data, report = encode_items(ck, m, fields, bits=6)
    assert report.n_bytes == len(data) and report.bits_per_value == 8 * len(data) / (3 * 61 * 120)
    # the decoded symbols are the encoded ones
    from mscn_core.bitstream import read_bitstream
    from mscn_core.entropy import decode_symbols

    signals = [m.to_signal(f) for f in fields]
    symbols, dequant = quantize_codes(ck, adapt_codes(ck, m, signals), 6)
    _, model = quantizer(ck, 6)
    stream = read_bitstream(data, expected_checkpoint_hash=ck.sha256)
    for sym, payload in zip(symbols, stream.payloads, strict=True):
        np.testing.assert_array_equal(decode_symbols(payload, ck.rep.code_size(), model), sym)
    dec = decode_stream(data, ck)
    assert dec.modality.name == "sphere" and dec.stream.n_items == 3
    assert dec.n_bytes == len(data) and dec.n_values == 3 * 61 * 120
    assert dec.bits_per_value == report.bits_per_value
    decoded = dec.artifacts
    for f, s, c, d in zip(fields, signals, dequant, decoded, strict=True):
        fit = m.reconstruct(s.meta, predictor(ck, m, c), None, template=f)
        np.testing.assert_allclose(d.values, fit.values, rtol=0, atol=1e-4)
        assert d.name == "t" and d.attrs["units"] == "K"
        np.testing.assert_array_equal(d["latitude"], f["latitude"])
        assert int(d["number"]) == int(f["number"]) and d["time"].values == f["time"].values
    # a plugin object handed in (one under development) decodes the same; another refuses
    mine = decode_stream(data, ck, modality=m).artifacts
    np.testing.assert_array_equal(mine[0].values, decoded[0].values)

    class Other(type(m)):
        name = "other"

    with pytest.raises(ValueError, match="holds 'sphere' items, not 'other'"):
        decode_stream(data, ck, modality=Other())


def test_sphere_options_pick_fields_metadata_and_output_grid(loaded):
    """The typed options: read's var/sel, stream metadata (cf keeps fewer attributes,
    same values), decoding onto another grid."""
    from mscn_core.pipeline import decode, encode

    ck, m = loaded
    opts = SphereOptions(var="t", sel=["isobaricInhPa=850", "number=9"])
    fields = m.read(ERA5, opts)
    assert len(fields) == len(m.read(ERA5, var="t", sel=["isobaricInhPa=850", "number=9"]))
    assert all(int(f["number"]) == 9 for f in fields)
    full, _ = encode_items(ck, m, fields[:2], bits=6, with_metrics=False)
    cf, _ = encode_items(ck, m, fields[:2], bits=6, with_metrics=False,
                         options=SphereOptions(metadata="cf"))
    assert len(cf) < len(full)
    a, b = decode_stream(full, ck).artifacts, decode_stream(cf, ck).artifacts
    for x, y, f in zip(a, b, fields[:2], strict=True):
        np.testing.assert_array_equal(x.values, y.values)
        assert y.attrs["units"] == "K" and y.attrs["standard_name"] == "air_temperature"
        assert set(y.attrs) < set(x.attrs) and set(f.attrs) <= set(x.attrs)
    # the top-level API: options of the modality, e.g. a 1° output grid
    data = encode(fields[0], ck, bits=6)
    one_deg, = decode(data, ck, SphereOptions(resolution=1.0))
    assert one_deg.sizes["latitude"] == 181 and one_deg.sizes["longitude"] == 360


def test_masked_field_with_undecodable_time_round_trips_through_the_bitstream(loaded):
    ck, m = loaded
    fields = m.read(COADS, var="SST")
    data, report = encode_items(ck, m, fields, bits=5)
    decoded = decode_stream(data, ck).artifacts
    for f, d in zip(fields, decoded, strict=True):
        np.testing.assert_array_equal(np.isnan(d.values), np.isnan(f.values))
        for c in f.coords:
            np.testing.assert_array_equal(d[c].values, f[c].values)
        assert d.attrs["units"] == f.attrs["units"]
    # the land masks must be sent, but compressed: all metadata together costs less
    # than the masks alone would as raw bitmaps
    raw_masks = len(fields) * math.ceil(90 * 180 / 8)
    assert report.n_bytes - report.payload_bytes < raw_masks


def test_encode_cli_options_and_sample_budget_match_the_python_api(loaded,
                                                                    tiny_sphere_checkpoint,
                                                                    tmp_path):
    """`mscn encode --metadata cf --points-per-step N` writes the bytes encode_items does."""
    ck, m = loaded
    stream = tmp_path / "t.mscn"
    sel = ["--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=9"]
    r = _mscn("encode", ERA5, *sel, "--checkpoint", tiny_sphere_checkpoint, "--bits", "5",
              "--metadata", "cf", "--points-per-step", "1024", "-o", stream)
    assert r.returncode == 0, r.stderr
    fields = m.read(ERA5, SphereOptions(var="t", sel=sel[3::2]))
    data, report = encode_items(ck, m, fields, bits=5, options=SphereOptions(metadata="cf"),
                                points_per_step=1024)
    assert stream.read_bytes() == data
    assert json.loads(r.stdout)["bits_per_value"] == pytest.approx(report.bits_per_value)
    whole, _ = encode_items(ck, m, fields, bits=5, options=SphereOptions(metadata="cf"))
    assert whole != data  # the budget changed the fit (61×120 points > 1024 per step)
    r = _mscn("evaluate", ERA5, *sel, "--checkpoint", tiny_sphere_checkpoint,
              "--points-per-step", "1024")
    assert r.returncode == 0, r.stderr
    signals = [m.to_signal(f) for f in fields]
    codes = adapt_codes(ck, m, signals, points_per_step=1024)
    psnr = [m.metrics(s, predictor(ck, m, c)(s.coords))["psnr_db"]
            for s, c in zip(signals, codes, strict=True)]
    assert json.loads(r.stdout)["mean"]["psnr_db"] == pytest.approx(np.mean(psnr), rel=1e-9)


def test_decode_with_the_wrong_checkpoint_names_the_mismatch(tiny_sphere_checkpoint, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(tiny_sphere_checkpoint.read_bytes())
    ck = load_checkpoint(tiny_sphere_checkpoint)
    m = SphereModality()
    m.load_state(ck.modality_state)
    stream = tmp_path / "t.mscn"
    r = _mscn("encode", ERA5, "--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=9",
              "--checkpoint", tiny_sphere_checkpoint, "--bits", "4", "-o", stream)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bits_per_value"] > 0
    # a different checkpoint (retrained: different hash) is refused with a clear message
    from mscn_core.checkpoint import save_checkpoint

    ck.info["note"] = "changed"
    save_checkpoint(ck, other)
    r = _mscn("decode", stream, "--checkpoint", other, "-o", tmp_path / "x.nc")
    assert r.returncode == 2 and "checkpoint mismatch" in r.stderr
    assert not (tmp_path / "x.nc").exists()
    r = _mscn("decode", stream, "--checkpoint", tiny_sphere_checkpoint, "-o", tmp_path / "y.nc")
    assert r.returncode == 0, r.stderr
    assert xr.open_dataset(tmp_path / "y.nc")["t"].attrs["units"] == "K"


def test_accessor_fits_a_dataarray(tiny_sphere_checkpoint):
    da = xr.open_dataset(ERA5)["t"].sel(isobaricInhPa=850, number=9).isel(time=slice(0, 2))
    recon = da.mscn.fit(tiny_sphere_checkpoint)
    assert recon.shape == da.shape and recon.attrs["units"] == "K"
    assert float(np.sqrt(((recon - da) ** 2).mean())) < 10.0


@pytest.mark.parametrize("args, message", [
    (["--var", "nope"], "nope"),
    (["--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=99"], "number"),
])
def test_bad_selection_is_a_clear_error(tiny_sphere_checkpoint, tmp_path, args, message):
    r = _mscn("fit", ERA5, *args, "--checkpoint", tiny_sphere_checkpoint, "-o", tmp_path / "o.nc")
    assert r.returncode != 0 and message in r.stderr
    if "nope" in args:
        assert "t" in r.stderr and "z" in r.stderr  # lists what is there
    assert not (tmp_path / "o.nc").exists()


def test_bad_files_are_refused(tiny_sphere_checkpoint, tmp_path):
    corrupt = tmp_path / "corrupt.nc"
    corrupt.write_bytes(b"CDF\x01" + bytes(range(256)) * 4)
    r = _mscn("fit", corrupt, "--checkpoint", tiny_sphere_checkpoint, "-o", tmp_path / "o.nc")
    assert r.returncode != 0 and "corrupt.nc" in r.stderr
    regional = xr.open_dataset(ERA5)["t"].isel(number=0, time=0).sel(
        isobaricInhPa=850, latitude=slice(60, 0), longitude=slice(0, 90))
    regional.to_netcdf(tmp_path / "regional.nc")
    # a regional grid is a supported kind now (issue 8 part 2): fitted at its own points
    r = _mscn("fit", tmp_path / "regional.nc", "--checkpoint", tiny_sphere_checkpoint,
              "-o", tmp_path / "regional_fit.nc")
    assert r.returncode == 0, r.stderr
    with xr.open_dataset(tmp_path / "regional_fit.nc") as got:
        assert got["t"].dims == regional.dims
        np.testing.assert_array_equal(got["latitude"].values, regional["latitude"].values)
    # a bad grid (duplicate latitudes) is still refused in one line naming the variable
    dup = regional.isel(latitude=[0, 0, 1, 2])
    dup.to_netcdf(tmp_path / "dup.nc")
    r = _mscn("fit", tmp_path / "dup.nc", "--checkpoint", tiny_sphere_checkpoint,
              "-o", tmp_path / "o.nc")
    assert r.returncode != 0 and "duplicate" in r.stderr and "'t'" in r.stderr, r.stderr
    allnan = xr.open_dataset(ERA5)["t"].isel(number=0, time=0).sel(isobaricInhPa=850) * np.nan
    allnan.to_netcdf(tmp_path / "nan.nc")
    r = _mscn("fit", tmp_path / "nan.nc", "--checkpoint", tiny_sphere_checkpoint,
              "-o", tmp_path / "o.nc")
    assert r.returncode != 0 and "NaN" in r.stderr
    assert not (tmp_path / "o.nc").exists()


def test_view_globe_cli_writes_a_png(tiny_sphere_checkpoint, tmp_path):
    from PIL import Image

    recon = tmp_path / "recon.nc"
    sel = ["--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=9"]
    assert _mscn("fit", ERA5, *sel, "--checkpoint", tiny_sphere_checkpoint, "-o",
                 recon).returncode == 0
    png = tmp_path / "globe.png"
    r = _mscn("view", "globe", ERA5, recon, *sel, "--index", "1", "-o", png)
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert img.std() > 30
    # without a viewer name the modality is guessed from the file; --gif adds a rotating globe
    png2, gif = tmp_path / "guessed.png", tmp_path / "spin.gif"
    r = _mscn("view", ERA5, recon, *sel, "--index", "1", "-o", png2, "--gif", gif)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(png2)), np.asarray(Image.open(png)))
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames > 1


def test_view_clobbers_neither_output_without_overwrite(tiny_sphere_checkpoint, tmp_path):
    recon, png, gif = tmp_path / "recon.nc", tmp_path / "old.png", tmp_path / "old.gif"
    sel = ["--var", "t", "--sel", "isobaricInhPa=850", "--sel", "number=9"]
    assert _mscn("fit", ERA5, *sel, "--checkpoint", tiny_sphere_checkpoint, "-o",
                 recon).returncode == 0
    png.write_bytes(b"precious png")
    gif.write_bytes(b"precious gif")
    r = _mscn("view", ERA5, recon, *sel, "-o", png, "--gif", tmp_path / "new.gif")
    assert r.returncode != 0 and "exists" in r.stderr
    assert not (tmp_path / "new.gif").exists() and png.read_bytes() == b"precious png"
    r = _mscn("view", ERA5, recon, *sel, "-o", tmp_path / "new.png", "--gif", gif)
    assert r.returncode != 0 and "exists" in r.stderr
    assert gif.read_bytes() == b"precious gif"
    assert not (tmp_path / "new.png").exists()  # refused before rendering anything


def test_climate_reader_keeps_the_shipped_names():
    fields = climate.field_items([ERA5], var="t", sel={"isobaricInhPa": 850})
    assert len(fields) == 40 and fields[0].dims == ("latitude", "longitude")


def test_meta_train_cli_then_inspect(tmp_path):
    ck = tmp_path / "cli.safetensors"
    log = tmp_path / "train.jsonl"
    r = _mscn("meta-train", "--data", ERA5, "--var", "t", "--sel", "isobaricInhPa=500",
              "--sel", "number=0,1", "--val-sel", "number=1", "--depth", "3", "--width", "16",
              "--budget", "8", "--outer-steps", "4", "--outer-lr", "1e-3", "--batch-size", "2",
              "--points-per-item", "128", "--val-every", "2", "--progress", "false",
              "--threads", "1",
              "--log-path", log, "-o", ck)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps_run"] == 4
    # `mscn` runs under tcmalloc whenever the system has it (setup.sh installs it)
    assert summary["allocator"] == ("tcmalloc" if tcmalloc_path() else "glibc")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any("val_loss" in rec for rec in records)
    r = _mscn("inspect", ck)
    assert r.returncode == 0, r.stderr
    assert "budget 8" in r.stdout and "code size   8" in r.stdout and "t[K]" in r.stdout
    r = _mscn("inspect", ck, "--json")
    info = json.loads(r.stdout)
    assert info["info"]["n_train"] == 4 and info["info"]["n_val"] == 4  # member 1 held out
    r = _mscn("inspect", ERA5)
    assert r.returncode == 2 and "not" in r.stderr and "checkpoint" in r.stderr
