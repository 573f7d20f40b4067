"""Any grid on the sphere (issue 8 part 2): Gaussian, regional, curvilinear and
unstructured fields read, fit, encode, decode and write back in the file's own structure.

Why these checks: a non-regular field is coded as its points in native order, so the
decoder must rebuild exactly those points (from coordinates carried in the stream, the
input file being absent), restore the layout by a reshape and keep NaN cells NaN; a
forged stream must not be able to size anything through the new metadata.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from mscn_core.checkpoint import load_checkpoint
from mscn_core.pipeline import (
    adapt_codes,
    decode_stream,
    encode_items,
    predictor,
    quantize_codes,
)
from mscn_core.registry import get_modality
from mscn_datasets import climate, vendored_path
from mscn_plugins import sphere as sp

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "climate"
VENDORED = {"gaussian": "t42_gaussian_uv300_U.nc",
            "curvilinear": "mpiom_tos_curvilinear_crop.nc",
            "unstructured": "geodesic_2562cells_t0.nc"}
# every shared file that is not a regular global grid, and the kind find_grid sees
SHARED_KINDS = {
    "ncl_t42_T_PS_18lev.nc": "gaussian", "ncl_t42_T_U_V_14lev.nc": "gaussian",
    "ncl_t42_uv300.nc": "gaussian", "ncl_t63_t_rh_17lev.nc": "gaussian",
    "ncl_t63_uas_monthly.nc": "gaussian", "ncl_t63_vas_monthly.nc": "gaussian",
    "ncl_pop_ocean_curvilinear.nc": "curvilinear",
    "ncl_mpiom_tos_bipolar_curvilinear.nc": "curvilinear",
    "ncl_seam_ps_2d_latlon.nc": "curvilinear",
    "ncl_sst_2deg_monthly.nc": "regional",  # lat/lon on other dims, cyclic column repeated
    "ncl_geodesic_2562cells_unstructured.nc": "unstructured",
}
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")


@pytest.fixture(scope="module")
def ck(tiny_sphere_checkpoint):
    return load_checkpoint(tiny_sphere_checkpoint)


@pytest.fixture()
def m(ck):
    mod = get_modality("sphere")
    mod.load_state(ck.modality_state)
    return mod


@contextlib.contextmanager
def _quiet():
    """Variables the tiny checkpoint never saw warn that they use their own range."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _items(m, kind: str) -> list[xr.DataArray]:
    with _quiet():
        return m.read(vendored_path(VENDORED[kind]))[:2]


# ------------------------------------------------------------------------- find_grid


@needs_shared
@pytest.mark.parametrize("name", sorted(SHARED_KINDS))
def test_find_grid_sees_every_shared_grid(name):
    with _quiet():
        fields = climate.field_items([SHARED / name])
    grid = climate.find_grid(fields[0])
    assert grid.kind == SHARED_KINDS[name]
    assert len(grid.dims) == (1 if grid.kind == "unstructured" else 2)
    assert grid.radians == (grid.kind == "unstructured")
    assert {grid.lat, grid.lon} <= set(map(str, fields[0].coords))
    # grid-describing variables are never fields
    names = {str(f.name) for f in fields}
    assert not names & {"gw", "lat2d", "lon2d", "lat", "lon", "grid_center_lat",
                        "grid_corner_lat", "lat_bnds", "lon_bnds"}


def test_find_grid_keeps_regular_grids_on_the_historic_path():
    field = climate.field_items([vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")],
                                var="t")[0]
    grid = climate.find_grid(field)
    assert grid == climate.Grid("regular", "latitude", "longitude",
                                ("latitude", "longitude"), False)
    assert climate.native_regular(grid)
    assert climate.find_lat_lon(field) == ("latitude", "longitude")


# ------------------------------------------------ fit / encode / decode per grid kind


@pytest.mark.parametrize("kind", sorted(VENDORED))
def test_fit_writes_back_the_files_own_structure(kind, ck, m, tmp_path):
    items = _items(m, kind)
    with _quiet():
        signals = [m.to_signal(f) for f in items]
        for f, s in zip(items, signals, strict=True):
            assert s.n_points == f.size and s.meta["grid"] == kind
            finite = np.isfinite(np.asarray(f.values)).reshape(-1)
            assert (s.mask is None and finite.all()) or np.array_equal(s.mask.numpy(), finite)
        codes = adapt_codes(ck, m, signals, steps=2)
        recon = [m.reconstruct(s.meta, predictor(ck, m, c), template=f)
                 for s, c, f in zip(signals, codes, items, strict=True)]
        out = m.save(recon, tmp_path / "fit.nc")
    src = xr.open_dataset(vendored_path(VENDORED[kind]), decode_times=False)
    got = xr.open_dataset(out, decode_times=False)
    name = str(items[0].name)
    a = src[name].isel({d: slice(0, got.sizes[d]) for d in got[name].dims
                        if d not in climate.find_grid(items[0]).dims})
    b = got[name]
    assert b.dims == a.dims and b.shape == a.shape
    assert set(got.variables) - {name} <= set(src.variables)
    for c in ("lat", "lon", "grid_center_lat", "grid_center_lon"):
        if c in src.variables:
            np.testing.assert_array_equal(got[c].values, src[c].values)
            assert got[c].attrs == src[c].attrs and got[c].dims == src[c].dims
    assert {k: v for k, v in b.attrs.items() if not k.startswith("mscn_")} == a.attrs
    nan = np.isnan(a.values)
    assert np.array_equal(np.isnan(b.values), nan)
    assert np.isfinite(b.values[~nan]).all()


@pytest.mark.parametrize("kind", sorted(VENDORED))
def test_decode_equals_fit_at_the_same_bits_and_resolution_gives_a_regular_grid(
        kind, ck, m):
    items = _items(m, kind)
    with _quiet():
        data, rep = encode_items(ck, m, items, bits=6, with_metrics=False)
        dec = decode_stream(data, ck)
        signals = [m.to_signal(f) for f in items]
        _, codes = quantize_codes(ck, adapt_codes(ck, m, signals), 6)
        for f, s, c, d in zip(items, signals, codes, dec.artifacts, strict=True):
            fit = m.reconstruct(s.meta, predictor(ck, m, c), template=f)
            assert d.dims == f.dims
            np.testing.assert_allclose(d.values, fit.values, rtol=0, atol=1e-5 * (
                s.meta["scale"][1] - s.meta["scale"][0]))
        coarse = decode_stream(data, ck, options=m.options(resolution=6.0)).artifacts[0]
    assert coarse.dims == ("lat", "lon") and coarse.shape == (31, 60)
    assert climate.find_grid(coarse).kind == "regular"
    if kind == "curvilinear":  # the crop's land and everything outside the crop are NaN
        assert 0.5 < np.isnan(coarse.values).mean() < 0.9
        assert np.isnan(coarse.sel(lat=-90).values).all()
    else:  # Gaussian and geodesic grids cover the globe, without NaN cells
        assert np.isfinite(coarse.values).all()


def test_header_bytes_per_kind_and_compact_coordinates(ck, m):
    """The stream carries the grid (the decoder has no grid file): zlib'd raw bytes, far
    smaller than JSON lists and exact."""
    sizes = {}
    for kind in sorted(VENDORED):
        items = _items(m, kind)[:1]
        with _quiet():
            data, rep = encode_items(ck, m, items, bits=6, with_metrics=False)
        sizes[kind] = rep.n_bytes - rep.payload_bytes
        tmpl = m.item_template(items[0])
        grid = climate.find_grid(items[0])
        for c in (grid.lat, grid.lon):
            entry = tmpl["coords"][c]
            if kind != "gaussian":
                assert set(entry["data"]) == {"zlib", "shape"}
            back = sp._expand_axis(entry["data"], entry["dtype"])
            np.testing.assert_array_equal(back, items[0][c].values)
    assert sizes["gaussian"] < sizes["unstructured"] < sizes["curvilinear"], sizes


# ---------------------------------------------------------------- forged or bad grids


def _native_meta(m, kind: str) -> dict:
    item = _items(m, kind)[0]
    with _quiet():
        meta = dict(m.to_signal(item).meta)
    meta["template"] = m.item_template(item)
    return json.loads(json.dumps(meta))


def _forge_coord(meta: dict, name: str, fn) -> dict:
    bad = copy.deepcopy(meta)
    entry = bad["template"]["coords"][name]
    arr = sp._expand_axis(entry["data"], entry["dtype"]).copy()
    fn(arr)
    entry["data"] = sp._compact_axis(arr)
    return bad


@pytest.mark.parametrize("how, message", [
    ("kind", "grid must be one of"),
    ("kind_mismatch", "template dims must be 2 distinct names"),
    ("shape_len", "shape of a unstructured grid must be a list of 1 sizes"),
    ("shape_size", "does not match shape"),
    ("zlib_bomb", "inflates beyond"),
    ("zlib_short", "needs"),
    ("zlib_shape", "shape does not match its dims"),
    ("zlib_keys", "binary data needs exactly"),
    ("nan_coord", "contain NaN"),
    ("lat_95", "outside [-90, 90]"),
    ("duplicate_cell", "duplicate points"),
    ("mask", "nan_mask"),
])
def test_forged_grid_metadata_is_refused_in_one_line(m, how, message):
    meta = _native_meta(m, "unstructured")
    assert m.check_meta(meta) == 2562
    meta = copy.deepcopy(meta)  # check_meta caches the grid check per template object
    lat = "grid_center_lat"
    if how == "kind":
        meta["grid"] = "hexagonal"
    elif how == "kind_mismatch":
        meta["grid"], meta["shape"] = "curvilinear", [2562, 1]
    elif how == "shape_len":
        meta["shape"] = [2562, 1]
    elif how == "shape_size":
        meta["shape"] = [2561]
    elif how == "zlib_bomb":
        meta["template"]["coords"][lat]["data"]["zlib"] = base64.b64encode(
            zlib.compress(bytes(1 << 24), 9)).decode()
    elif how == "zlib_short":
        meta["template"]["coords"][lat]["data"]["zlib"] = base64.b64encode(
            zlib.compress(bytes(100))).decode()
    elif how == "zlib_shape":
        meta["template"]["coords"][lat]["data"]["shape"] = [2562, 2]
    elif how == "zlib_keys":
        meta["template"]["coords"][lat]["data"]["n"] = 3
    elif how == "nan_coord":
        meta = _forge_coord(meta, lat, lambda a: a.__setitem__(5, np.nan))
    elif how == "lat_95":
        meta = _forge_coord(meta, lat, lambda a: a.__setitem__(5, np.radians(95.0)))
    elif how == "duplicate_cell":
        meta = _forge_coord(meta, lat, lambda a: a.__setitem__(5, a[6]))
        meta = _forge_coord(meta, "grid_center_lon",
                            lambda a: a.__setitem__(5, a[6]))
    elif how == "mask":
        meta["nan_mask"] = sp.pack_mask(np.zeros(100, bool))
    with pytest.raises(ValueError) as info:
        m.check_meta(meta)
    msg = str(info.value)
    assert "\n" not in msg and message in msg, msg


def test_forged_curvilinear_stream_metadata_is_refused(m):
    meta = _native_meta(m, "curvilinear")
    assert m.check_meta(meta) == 120 * 128
    bad = copy.deepcopy(meta)
    bad["template"]["coords"]["lat"]["data"]["shape"] = [128, 120]
    with pytest.raises(ValueError, match="has sizes|does not match shape"):
        m.check_meta(bad)
    bad = copy.deepcopy(meta)
    bad["shape"] = [120, 128, 1]
    with pytest.raises(ValueError, match="list of 2 sizes"):
        m.check_meta(bad)


def _curvilinear(lat: np.ndarray, lon: np.ndarray, name: str = "sst") -> xr.DataArray:
    return xr.DataArray(np.ones(lat.shape, np.float32), dims=("y", "x"), name=name,
                        coords={"lat": (("y", "x"), lat, {"units": "degrees_north"}),
                                "lon": (("y", "x"), lon, {"units": "degrees_east"})})


@pytest.mark.parametrize("case, message", [
    ("nan", "coordinates lat/lon contain NaN"),
    ("lat95", "latitude lat values"),
    ("dup_axis", "latitude lat has duplicate values"),
    ("dup_cell", "duplicate points"),
])
def test_bad_grids_are_refused_in_one_line_naming_the_variable(case, message, tmp_path):
    lat, lon = np.meshgrid(np.linspace(-60, 60, 5), np.linspace(0, 90, 4), indexing="ij")
    if case == "nan":
        lat[1, 1] = np.nan
        da = _curvilinear(lat, lon)
    elif case == "lat95":
        lat[1, 1] = 95.0
        da = _curvilinear(lat, lon)
    elif case == "dup_axis":
        da = xr.DataArray(np.ones((3, 4)), dims=("lat", "lon"), name="sst", coords={
            "lat": ("lat", [0.0, 0.0, 10.0], {"units": "degrees_north"}),
            "lon": ("lon", [0.0, 10.0, 20.0, 30.0], {"units": "degrees_east"})})
    else:
        da = xr.DataArray(np.ones(3), dims="cell", name="sst", coords={
            "clat": ("cell", [0.0, 10.0, 10.0], {"units": "degrees_north"}),
            "clon": ("cell", [0.0, 10.0, 10.0], {"units": "degrees_east"})})
    path = tmp_path / "bad.nc"
    da.to_dataset().to_netcdf(path)
    field = climate.field_items([path])[0]
    with pytest.raises(climate.ClimateDataError) as info:
        climate.field_points(field)
    msg = str(info.value)
    assert "\n" not in msg and message in msg and "'sst'" in msg and "bad.nc" in msg, msg


def test_a_cyclic_longitude_column_is_not_a_duplicate():
    da = xr.DataArray(np.ones((3, 5)), dims=("latitude", "longitude"), name="sst", coords={
        "lat": ("latitude", [-60.0, 0.0, 60.0], {"units": "degrees_north"}),
        "lon": ("longitude", [0.0, 90.0, 180.0, 270.0, 360.0], {"units": "degrees_east"})})
    values, lat, lon, grid = climate.field_points(da)
    assert grid.kind == "regional" and grid.dims == ("latitude", "longitude")
    assert values.size == lat.size == lon.size == 15


@needs_shared
def test_cell_areas_from_bounds_and_corners_weigh_the_error(m):
    """Geodesic corners tile the sphere (4π sr); MPI-OM's CF bounds nearly so (its two
    halo columns overlap); the area-weighted RMSE uses them, not cos(lat)."""
    import torch

    for name, total in (("ncl_geodesic_2562cells_unstructured.nc", 1.0),
                        ("ncl_mpiom_tos_bipolar_curvilinear.nc", 0.997)):
        with _quiet():
            field = climate.field_items([SHARED / name])[0]
            sig = m.to_signal(field)
        area = field.encoding["mscn_cell_area"]
        assert area.shape == (field.size,) and (area > 0).all()
        assert abs(area.sum() / (4 * np.pi) - total) < 2e-3
        err = torch.zeros_like(sig.targets)
        err[0] = 1.0  # one wrong point: its share of the area, not of cos(lat)
        valid = sig.mask.numpy() if sig.mask is not None else np.ones(field.size, bool)
        got = m.metrics(sig, sig.targets + err)["rmse_area_weighted"]
        span = sig.meta["scale"][1] - sig.meta["scale"][0]
        if valid[0]:
            assert np.isclose(got / span, np.sqrt(area[0] / area[valid].sum()))


@pytest.mark.parametrize("kind", ["curvilinear", "unstructured"])
def test_xarray_backend_opens_non_regular_streams(kind, ck, tiny_sphere_checkpoint, tmp_path):
    """engine="mscn" on a stream of 2-D-coordinate or one-cell-dim fields: the file's dims
    and coordinates, values as ``mscn decode`` gives them."""
    path = vendored_path(VENDORED[kind])
    with _quiet(), xr.open_dataset(path) as src:
        src.mscn.encode(tmp_path / "s.mscn", checkpoint=tiny_sphere_checkpoint, bits=6)
        ds = xr.open_dataset(tmp_path / "s.mscn", engine="mscn",
                             checkpoint=tiny_sphere_checkpoint)
        dec = decode_stream((tmp_path / "s.mscn").read_bytes(), ck).artifacts
        name = str(dec[0].name)
        assert ds[name].dims == src[name].dims and ds[name].shape == src[name].shape
        grid = climate.find_grid(dec[0])
        for c in (grid.lat, grid.lon):
            np.testing.assert_array_equal(ds[c].values, src[c].values)
        first = ds[name].isel({d: 0 for d in ds[name].dims if d not in grid.dims}).values
        np.testing.assert_array_equal(first, dec[0].values)


@needs_shared
def test_seam_with_an_all_fill_time_is_encoded_decoded_and_written_back(ck, m, tmp_path):
    """SEAM's time is 12 copies of the netCDF default fill: the fields carry their
    positions (in the stream too), so the decoded file is the input's structure."""
    src = SHARED / "ncl_seam_ps_2d_latlon.nc"
    with _quiet():
        items = m.read(src)
        assert [f.encoding["mscn_item_pos"] for f in items] == [(i,) for i in range(12)]
        data, _ = encode_items(ck, m, items, bits=6, with_metrics=False)
        dec = decode_stream(data, ck)
        out = m.save(dec.artifacts, tmp_path / "seam.nc")
    a = xr.open_dataset(src, decode_times=False)
    b = xr.open_dataset(out, decode_times=False)
    assert sorted(a.variables) == sorted(b.variables)
    assert b["ps"].dims == a["ps"].dims and b["ps"].shape == a["ps"].shape
    assert "lat2d" in b.data_vars and "lat2d" not in b.coords  # a data variable, as input
    np.testing.assert_array_equal(b["lat2d"].values, a["lat2d"].values)
    np.testing.assert_array_equal(b["time"].values, a["time"].values)
    assert np.isfinite(b["ps"].values).all()


def test_resolution_leaves_nan_outside_a_regional_grid(m):
    """A Europe crop written at 6 degrees: values inside its extent, NaN beyond."""
    field = climate.field_items([vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")],
                                var="t", sel={"isobaricInhPa": 850, "number": 0})[0]
    europe = field.sel(latitude=slice(72, 30), longitude=slice(0, 45))
    assert climate.find_grid(europe).kind == "regional"
    with _quiet():
        sig = m.to_signal(europe)
    out = m.reconstruct(sig.meta, lambda pts: torch_zeros(pts), m.options(resolution=6.0),
                        template=europe)
    half = 1.5  # half the crop's 3-degree spacing
    inside = ((out["lat"] >= 30 - half) & (out["lat"] <= 72 + half)
              & ((out["lon"] <= 45 + half) | (out["lon"] >= 360 - half)))
    v = out.values
    assert np.isfinite(v[inside.values]).all() and np.isnan(v[~inside.values]).all()


def torch_zeros(pts):
    import torch

    return torch.zeros(pts.shape[0], 1)
