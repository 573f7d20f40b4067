"""Tests for mscn_datasets.climate on real files (no mocks).

The vendored subsets in datasets/data always run; the five shared files in
../shared/data/climate are added when that folder exists.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from mscn_datasets import vendored_path
from mscn_datasets.climate import (
    SEL_RTOL,
    ClimateDataError,
    check_global_regular,
    field_items,
    field_to_dataarray,
    find_lat_lon,
    iter_fields,
    normalize_field,
    open_climate,
    parse_sel,
    regular_latlon,
    restore_layout,
    select_fields,
    select_variables,
    stack_fields,
    stack_variables,
    write_netcdf,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "climate"

ERA5_V = "era5_t_z_3deg_2017-01-01_float32.nc"
COADS_V = "coads_sst_airt_2deg_jan-mar.nc"
ETOPO_V = "etopo_relief_2deg_blockmean.nc"

# (label, path, var, lat name, lon name, number of 2-D fields)
CASES = [
    ("vendored-era5", vendored_path(ERA5_V), "t", "latitude", "longitude", 80),
    ("vendored-coads", vendored_path(COADS_V), "SST", "COADSY", "COADSX", 3),
    ("vendored-etopo", vendored_path(ETOPO_V), "ROSE", "ETOPO60Y", "ETOPO60X", 1),
]
for _label, _fn, _var, _la, _lo, _n in [
    ("shared-era5", "era5_t_z_3deg_2017-01-01.nc", "t", "latitude", "longitude", 80),
    ("shared-navy", "navy_winds_2p5deg_1982-1992.nc", "UWND", "FNOCY", "FNOCX", 132),
    ("shared-coads", "coads_climatology_2deg.nc", "SST", "COADSY", "COADSX", 12),
    ("shared-hgt", "hgt500_2p5deg_monthly.nc", "HGT", "lat", "lon", 21),
    ("shared-etopo", "etopo60_relief_1deg.nc", "ROSE", "ETOPO60Y", "ETOPO60X", 1),
]:
    if (SHARED / _fn).exists():
        CASES.append((_label, SHARED / _fn, _var, _la, _lo, _n))


def _era5() -> xr.Dataset:
    return open_climate(vendored_path(ERA5_V))


def _era5_field() -> xr.DataArray:
    return next(iter_fields(select_fields(_era5(), "t"))).load()


# ------------------------------------------------------------------ loading real files


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_real_files_load_normalize_restore(case):
    _, path, var, lat_name, lon_name, n_fields = case
    ds = open_climate(path)
    assert find_lat_lon(ds) == (lat_name, lon_name)
    da = select_fields(ds, var)
    assert da.dims[-2:] == (lat_name, lon_name)
    assert da.attrs == ds[var].attrs
    fields = list(iter_fields(da))
    assert len(fields) == n_fields
    for field in (fields[0], fields[-1]):
        assert field.dims == (lat_name, lon_name)
        for d in da.dims[:-2]:  # item identity travels with the field
            assert d in field.coords and field[d].ndim == 0
        values, lat, lon, _ = normalize_field(field)
        assert values.dtype == np.float64 and values.shape == (lat.size, lon.size)
        assert np.all(np.diff(lat) > 0) and -90 <= lat[0] and lat[-1] <= 90
        assert np.all(np.diff(lon) > 0) and 0 <= lon[0] and lon[-1] < 360
        assert np.isfinite(values).any()
        xr.testing.assert_identical(restore_layout(values, field), field)


def test_all_shared_files_present_or_vendored_fallback():
    # documents which sources ran; the vendored three always do
    labels = [c[0] for c in CASES]
    assert {"vendored-era5", "vendored-coads", "vendored-etopo"} <= set(labels)
    if SHARED.is_dir():
        assert len(labels) == 8


def test_era5_level_selection():
    ds = _era5()
    da = select_fields(ds, "t", {"isobaricInhPa": 850})
    fields = list(iter_fields(da))
    assert len(fields) == 40
    assert all(float(f["isobaricInhPa"]) == 850.0 for f in fields)
    assert da.dims == ("number", "time", "latitude", "longitude")
    # CLI strings, level alias; nearest match only when asked, and it says what it chose
    assert len(list(iter_fields(select_fields(ds, "t", ["isobaricInhPa=850"])))) == 40
    with pytest.warns(UserWarning, match=r"^isobaricInhPa=849: nearest is 850$"):
        near = select_fields(ds, "t", ["level=849", "number=1,2"], sel_method="nearest")
    assert float(near["isobaricInhPa"]) == 850.0
    assert len(list(iter_fields(near))) == 2 * 4
    with pytest.raises(ClimateDataError, match="cannot select"):
        select_fields(ds, "t", {"height": 2})
    with pytest.raises(ClimateDataError, match="latitude"):
        select_fields(ds, "t", {"latitude": 0})


def test_parse_sel():
    assert parse_sel(["isobaricInhPa=850", "x=2.5", "time=2017-01-01T12", "number=1,2"]) == {
        "isobaricInhPa": 850,
        "x": 2.5,
        "time": "2017-01-01T12",
        "number": [1, 2],
    }
    assert isinstance(parse_sel(["a=850"])["a"], int)
    with pytest.raises(ClimateDataError, match="NAME=VALUE"):
        parse_sel(["850"])


def test_var_none_single_and_ambiguous():
    assert select_fields(open_climate(vendored_path(ETOPO_V))).name == "ROSE"
    with pytest.raises(ClimateDataError, match=r"several gridded variables .*'t'"):
        select_fields(_era5())


def test_field_items_over_files():
    items = field_items([vendored_path(COADS_V), vendored_path(COADS_V)], var="AIRT")
    assert len(items) == 6
    assert all(f.name == "AIRT" and f.dims == ("COADSY", "COADSX") for f in items)


# ------------------------------------------------------- lat order / lon convention


def _variants(field: xr.DataArray) -> dict[str, xr.DataArray]:
    lon = field["longitude"]
    west = field.assign_coords(longitude=((lon + 180.0) % 360.0) - 180.0).sortby("longitude")
    west["longitude"].attrs = dict(lon.attrs)
    return {
        "lat_ascending": field.isel(latitude=slice(None, None, -1)),
        "lon_-180_180": west,
        "both": west.isel(latitude=slice(None, None, -1)),
        "transposed": field.transpose("longitude", "latitude"),
    }


@pytest.mark.parametrize("variant", ["lat_ascending", "lon_-180_180", "both", "transposed"])
def test_layout_variants_normalize_identically_and_restore_exactly(tmp_path, variant):
    field = _era5_field()
    ref_vals, ref_lat, ref_lon, _ = normalize_field(field)
    path = write_netcdf(_variants(field)[variant], tmp_path / f"{variant}.nc")
    back_field = open_climate(path)["t"].load()  # file's own dim order, no transpose
    if variant == "lon_-180_180":
        assert float(back_field["longitude"].min()) == -180.0
    vals, lat, lon, layout = normalize_field(back_field)
    np.testing.assert_array_equal(vals, ref_vals)
    np.testing.assert_array_equal(lat, ref_lat)
    np.testing.assert_array_equal(lon, ref_lon)
    assert layout.transposed == (variant == "transposed")
    xr.testing.assert_identical(restore_layout(vals, back_field), back_field)


def test_ferret_modulo_longitude_20_to_380():
    # COADS longitudes are 21..379 (Ferret modulo axis): normalised to 1..359
    field = next(iter_fields(select_fields(open_climate(vendored_path(COADS_V)), "AIRT")))
    assert float(field["COADSX"][0]) == 21.0 and float(field["COADSX"][-1]) == 379.0
    vals, lat, lon, _ = normalize_field(field)
    np.testing.assert_array_equal(lon, np.arange(1.0, 360.0, 2.0))
    np.testing.assert_array_equal(lat, np.arange(-89.0, 90.0, 2.0))
    # 361 deg = 1 deg: the column at COADSX=361 comes first after normalising
    i361 = int(np.where(field["COADSX"].values == 361.0)[0][0])
    np.testing.assert_array_equal(vals[:, 0], field.values[:, i361].astype(np.float64))
    xr.testing.assert_identical(restore_layout(vals, field), field)


def test_coads_sst_land_nan_preserved(tmp_path):
    da = select_fields(open_climate(vendored_path(COADS_V)), "SST").load()
    field = next(iter_fields(da))
    vals, lat, lon, _ = normalize_field(field)
    nan = np.isnan(vals)
    assert nan.sum() == int(field.isnull().sum()) and 0.2 < nan.mean() < 0.7
    # 40N 100W (=260E, central USA) is land; 0N 180E (Pacific) is ocean
    assert nan[np.searchsorted(lat, 39.0), np.searchsorted(lon, 259.0)]
    assert not nan[np.searchsorted(lat, 1.0), np.searchsorted(lon, 179.0)]
    restored = restore_layout(vals, field)
    xr.testing.assert_identical(restored, field)
    # NaN survives writing (as the file's -1e34 fill) and reading back
    back = select_fields(open_climate(write_netcdf(restored, tmp_path / "sst.nc")), "SST")
    np.testing.assert_array_equal(np.isnan(back.values), np.isnan(field.values))


# ------------------------------------------------------------------ stacking / writing


def test_stack_fields_round_trip():
    da = select_fields(_era5(), "t").load()
    fields = list(iter_fields(da))
    xr.testing.assert_identical(stack_fields(fields), da)
    # through normalise/restore, as the codec would do it
    restored = [restore_layout(normalize_field(f)[0], f) for f in fields]
    xr.testing.assert_identical(stack_fields(restored), da)
    # valid_time varies along time only -> 1-D coord again; step stays scalar
    st = stack_fields(restored)
    assert st["valid_time"].dims == ("time",) and st["step"].ndim == 0


def test_stack_fields_after_scalar_selection_and_inference():
    da = select_fields(_era5(), "z", {"number": 3}).load()
    fields = list(iter_fields(da))
    assert len(fields) == 8
    xr.testing.assert_identical(stack_fields(fields), da)
    # without the iter_fields hints the item dims are inferred from varying coords
    bare = []
    for f in fields:
        g = f.copy()
        g.encoding = {}
        bare.append(g)
    st = stack_fields(bare)
    assert set(st.dims) == set(da.dims)
    xr.testing.assert_identical(st.transpose(*da.dims), da)
    with pytest.raises(ClimateDataError, match="missing"):
        stack_fields(fields[:-1])


def test_write_netcdf_keeps_names_attrs_and_refuses_existing(tmp_path):
    da = select_fields(_era5(), "t", {"isobaricInhPa": 500}).load()
    out = tmp_path / "t500.nc"
    assert write_netcdf(da, out) == out
    back = open_climate(out)
    assert set(back.dims) == {"number", "time", "latitude", "longitude"}
    np.testing.assert_array_equal(back["t"].values, da.values)
    assert back["t"].attrs["units"] == "K" and back["t"].attrs == da.attrs
    assert back["latitude"].attrs["standard_name"] == "latitude"
    assert "write_netcdf" in back.attrs["history"].splitlines()[0]
    assert "cfgrib" in back.attrs["history"]  # source history kept below our line
    assert back.attrs["institution"].startswith("European Centre")
    back.close()

    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_netcdf(da * 2, out)
    assert out.read_bytes() == before
    write_netcdf(da.isel(number=0), out, overwrite=True)
    assert open_climate(out).sizes["time"] == 4 and "number" not in open_climate(out).dims


def test_write_netcdf_failure_leaves_nothing(tmp_path):
    field = _era5_field()
    bad = field.copy()
    bad.attrs["not_serialisable"] = {"nested": "dict"}  # netCDF attrs cannot hold a dict
    target = tmp_path / "bad.nc"
    with pytest.raises((TypeError, ValueError)):
        write_netcdf(bad, target)
    assert os.listdir(tmp_path) == []
    # failing overwrite keeps the old file intact and leaves no temp file
    good = write_netcdf(field, tmp_path / "good.nc")
    before = good.read_bytes()
    with pytest.raises((TypeError, ValueError)):
        write_netcdf(bad, good, overwrite=True)
    assert good.read_bytes() == before
    assert os.listdir(tmp_path) == ["good.nc"]
    # a missing folder is an error, not created; the file mode is what open() would give
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_netcdf(field, tmp_path / "no-such-dir" / "x.nc")
    assert os.listdir(tmp_path) == ["good.nc"]
    umask = os.umask(0)
    os.umask(umask)
    assert good.stat().st_mode & 0o777 == 0o666 & ~umask


def test_zarr_round_trip(tmp_path):
    field = _era5_field()
    store = tmp_path / "field.zarr"
    field.to_dataset().drop_encoding().to_zarr(store, mode="w", consolidated=False)
    ds = open_climate(store)
    back = select_fields(ds, "t").load()
    np.testing.assert_array_equal(back.values, field.values)
    assert find_lat_lon(back) == ("latitude", "longitude")
    vals, *_ = normalize_field(back)
    np.testing.assert_array_equal(vals, normalize_field(field)[0])


# ------------------------------------------------------------- other resolutions


def test_regular_latlon_and_field_to_dataarray():
    lat, lon = regular_latlon(3.0)
    assert lat.size == 61 and lon.size == 120 and lat[0] == -90 and lat[-1] == 90
    assert lon[0] == 0 and lon[-1] == 357
    with pytest.raises(ClimateDataError):
        regular_latlon(7.0)

    field = _era5_field()
    vals, la, lo, _ = normalize_field(field)
    same = field_to_dataarray(vals, la, lo, field)  # same grid -> same as the original
    xr.testing.assert_identical(same, field)

    lat1, lon1 = regular_latlon(1.5)
    fine = field_to_dataarray(np.zeros((lat1.size, lon1.size)), lat1, lon1, field)
    assert fine.dims == ("latitude", "longitude") and fine.name == "t"
    assert fine["latitude"][0] == 90 and fine["latitude"][-1] == -90  # template order
    assert fine.attrs == field.attrs and float(fine["isobaricInhPa"]) == 850.0

    coads = next(iter_fields(select_fields(open_climate(vendored_path(COADS_V)), "SST")))
    lat2, lon2 = regular_latlon(2.0)
    g = field_to_dataarray(np.ones((lat2.size, lon2.size)), lat2, lon2, coads)
    x = g["COADSX"].values
    # new grid 0,2,..,358 mapped into the template's [21, 381): 22..380
    assert x[0] == 22.0 and x[-1] == 380.0 and np.all(np.diff(x) > 0)
    assert g["COADSY"].attrs == coads["COADSY"].attrs and g.attrs["units"] == "Deg C"

    west = _variants(field)["lon_-180_180"]
    w = field_to_dataarray(np.zeros((lat1.size, lon1.size)), lat1, lon1, west)
    assert w["longitude"].values.min() == -180.0 and w["longitude"].values.max() < 180.0


# ------------------------------------------------------------------------ bad input


def test_missing_variable_lists_available():
    with pytest.raises(ClimateDataError, match=r"'q'.*available variables: \['t', 'z'\]"):
        select_fields(_era5(), "q")


def test_no_lat_lon():
    da = xr.DataArray(np.zeros((3, 4)), dims=("a", "b"), name="thing")
    with pytest.raises(ClimateDataError, match="no lat and lon dimension"):
        find_lat_lon(da)
    ds = xr.Dataset({"thing": da})
    with pytest.raises(ClimateDataError, match="no data variable on a latitude/longitude grid"):
        select_fields(ds)


def test_all_nan_field():
    field = _era5_field()
    nan = field.copy(data=np.full(field.shape, np.nan, dtype=field.dtype))
    with pytest.raises(ClimateDataError, match="all NaN"):
        normalize_field(nan)


def test_non_global_grids_refused():
    field = _era5_field()
    europe = field.sel(latitude=slice(72, 30), longitude=slice(0, 45))
    with pytest.raises(ClimateDataError, match="not global"):
        normalize_field(europe)
    lon_band = field.sel(longitude=slice(0, 180))  # global latitude, half the longitudes
    with pytest.raises(ClimateDataError, match="longitude is not global"):
        normalize_field(lon_band)
    tropics = field.sel(latitude=slice(60, -60))
    with pytest.raises(ClimateDataError, match="latitude is not global"):
        normalize_field(tropics)
    # cell-centred grids (COADS -89..89) pass; a repeated cyclic column does not
    check_global_regular(np.arange(-89.0, 90.0, 2.0), np.arange(21.0, 380.0, 2.0))
    with pytest.raises(ClimateDataError, match="duplicate"):
        check_global_regular(np.arange(-90.0, 91.0, 3.0), np.arange(0.0, 361.0, 3.0))


def test_irregular_grid_refused():
    field = _era5_field()
    keep = [i for i in range(field.sizes["latitude"]) if i != 30]  # drop the equator row
    with pytest.raises(ClimateDataError, match="latitude is irregular"):
        normalize_field(field.isel(latitude=keep))
    lon = field["longitude"].values.copy()
    lon[10] += 1.0
    with pytest.raises(ClimateDataError, match="longitude is irregular"):
        normalize_field(field.assign_coords(longitude=lon))


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "corrupt.nc"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ClimateDataError, match="corrupt.nc"):
        open_climate(bad)
    with pytest.raises(ClimateDataError, match="does not exist"):
        open_climate(tmp_path / "nope.nc")


# ------------------------------------------------ exact selection and every variable


def test_exact_selection_refuses_a_missing_level():
    """--sel isobaricInhPa=700 on levels [850, 500] used to give 850 silently."""
    ds = _era5()
    with pytest.raises(ClimateDataError) as info:
        select_fields(ds, "t", {"isobaricInhPa": 700})
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("selection isobaricInhPa=700 matches no isobaricInhPa value")
    assert "[850, 500]" in msg and f"{SEL_RTOL:g}" in msg
    with pytest.raises(ClimateDataError, match=r"isobaricInhPa=700 .*\[850, 500\]"):
        field_items([vendored_path(ERA5_V)], var="t", sel=["isobaricInhPa=700"])
    # float noise is not a different level; integer and float spellings both match
    assert float(select_fields(ds, "t", {"isobaricInhPa": 850.0000001})["isobaricInhPa"]) == 850
    assert float(select_fields(ds, "t", {"isobaricInhPa": 500.0})["isobaricInhPa"]) == 500
    with pytest.raises(ClimateDataError, match="number=10 matches no number value"):
        select_fields(ds, "t", {"number": 10})


def test_nearest_selection_says_what_it_chose():
    ds = _era5()
    with pytest.warns(UserWarning, match=r"^isobaricInhPa=700: nearest is 850$") as rec:
        da = select_fields(ds, "t", {"isobaricInhPa": 700}, sel_method="nearest")
    assert float(da["isobaricInhPa"]) == 850 and len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact hit says nothing
        select_fields(ds, "t", {"isobaricInhPa": 500}, sel_method="nearest")
    with pytest.raises(ClimateDataError, match="more than half a spacing"):
        select_fields(ds, "t", {"isobaricInhPa": 1100}, sel_method="nearest")
    with pytest.raises(ClimateDataError, match="sel_method"):
        select_fields(ds, "t", {"isobaricInhPa": 500}, sel_method="closest")


def test_time_selection_is_one_instant():
    """A date string is one instant, never pandas' partial-string range."""
    ds = _era5()
    da = select_fields(ds, "t", {"time": "2017-01-01T12"})
    assert da["time"].values == np.datetime64("2017-01-01T12:00")
    assert "time" not in da.dims
    # '2017-01' is 2017-01-01T00:00 (which exists), not the whole month
    assert select_fields(ds, "t", {"time": "2017-01"})["time"].ndim == 0
    with pytest.raises(ClimateDataError,
                       match=r"time=2017-01-01T06 matches no time value .*2017-01-01T12:00:00"):
        select_fields(ds, "t", {"time": "2017-01-01T06"})
    with pytest.raises(ClimateDataError, match="date coordinate"):
        select_fields(ds, "t", {"time": 2017})
    two = select_fields(ds, "t", {"time": ["2017-01-01T00", "2017-01-02T12"]})
    assert two.sizes["time"] == 2


def test_every_variable_and_lists():
    """--var t --var z used to encode only z; var=None takes every gridded variable."""
    path = vendored_path(ERA5_V)
    ds = _era5()
    assert [a.name for a in select_variables(ds)] == ["t", "z"]  # file order
    assert [a.name for a in select_variables(ds, ["z", "t", "z"])] == ["z", "t"]
    items = field_items([path], sel={"isobaricInhPa": 850})
    assert [f.name for f in items] == ["t"] * 40 + ["z"] * 40
    assert all(float(f["isobaricInhPa"]) == 850 for f in items)
    assert items[0].attrs["units"] == "K" and items[-1].attrs["units"] == "m**2 s**-2"
    both = field_items([path], var=["z", "t"], sel=["number=1", "isobaricInhPa=500"])
    assert [f.name for f in both] == ["z"] * 4 + ["t"] * 4
    with pytest.raises(ClimateDataError, match="several gridded variables"):
        select_fields(ds, ["t", "z"])
    with pytest.raises(ClimateDataError, match=r"cannot select 'height': no chosen variable"):
        field_items([path], var=["t", "z"], sel={"height": 2})
    with pytest.raises(ClimateDataError, match="variable 'q' not found"):
        field_items([path], var=["t", "q"])


def test_write_several_variables_with_history_line(tmp_path):
    items = field_items([vendored_path(ERA5_V)], sel={"number": 0})
    out = write_netcdf(stack_variables(items), tmp_path / "tz.nc",
                       history="mscn fit era5.nc --checkpoint c.safetensors --bits 8")
    back = xr.open_dataset(out)
    assert list(back.data_vars) == ["t", "z"] and back["t"].dims[0] == "time"
    first, *rest = back.attrs["history"].split("\n")
    assert first.endswith(": mscn fit era5.nc --checkpoint c.safetensors --bits 8")
    assert "\n".join(rest) == _era5().attrs["history"]
    assert back.attrs["Conventions"] == _era5().attrs["Conventions"]
    back.close()
