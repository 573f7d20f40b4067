"""Read -> write round trips of every shared climate file: the output is a faithful copy.

Why: ``mscn decode``/``fit`` output must be a drop-in replacement for the input (issue 13):
same format, dimensions, dtypes, attributes (fill values, packing, Conventions), global
attributes (history gains one line), time units, unlimited dims and compression.  The
files the reader refuses are listed with the exact refusal, so a change in what is
refused shows up here (none since every grid kind is read: issue 8 part 2).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr
from ncheader import compare_headers, header

from mscn_datasets import climate
from mscn_datasets.climate import (
    ClimateDataError,
    apply_portable_encoding,
    check_portable_encoding,
    field_items,
    normalize_field,
    portable_encoding,
    stack_variables,
    write_netcdf,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "climate"
if not SHARED.is_dir():
    pytest.skip(f"{SHARED} is absent", allow_module_level=True)

FILES = sorted(p.name for p in SHARED.glob("*.nc"))

# The reader's one-line refusal for every file it cannot read, from field_items or from
# the grid check of the first field of each variable.  Empty since issue 8 part 2: Gaussian,
# regional, curvilinear and unstructured grids are read (tests/test_grids.py).
REFUSED: dict[str, str] = {}
# Files that cannot be written back at all, and why.  SEAM (its time coordinate is all
# the netCDF default fill, so fields are not told apart by value) is written since its
# fields carry their item positions.
NOT_WRITABLE: dict[str, str] = {}
# gridded variables read with var=None, in file order (bounds variables are not fields)
VARIABLES = {
    "coads_climatology_2deg.nc": ["SST", "AIRT", "SPEH", "WSPD", "UWND", "VWND", "SLP"],
    "era5_t_z_3deg_2017-01-01.nc": ["z", "t"],
    "etopo60_relief_1deg.nc": ["ROSE"],
    "hgt500_2p5deg_monthly.nc": ["HGT"],
    "navy_winds_2p5deg_1982-1992.nc": ["UWND", "VWND"],
    "ncl_geodesic_2562cells_unstructured.nc": [
        "thickness", "height", "relative", "divergence", "absolute", "kinetic_energy",
        "tracer_1", "tracer_2", "tracer_3", "tracer_4", "tracer_5"],
    "ncl_ice5g_21k_topo_1deg.nc": ["Topo", "Icemask"],
    "ncl_landsea_1deg.nc": ["LSMASK"],
    "ncl_mpiom_tos_bipolar_curvilinear.nc": ["tos"],
    "ncl_pop_ocean_curvilinear.nc": ["urot", "vrot", "t"],
    "ncl_seam_ps_2d_latlon.nc": ["ps"],  # lat2d/lon2d are its grid, not fields
    "ncl_sst_2deg_monthly.nc": ["sst"],
    "ncl_t42_T_PS_18lev.nc": ["T", "PS"],
    "ncl_t42_T_U_V_14lev.nc": ["T", "U", "V"],
    "ncl_t42_uv300.nc": ["U", "V"],
    "ncl_t63_t_rh_17lev.nc": ["rhumidity", "var3", "t"],
    "ncl_t63_uas_monthly.nc": ["uas"],
    "ncl_t63_vas_monthly.nc": ["vas"],
}


def _read(path: Path) -> tuple[list[xr.DataArray], str | None]:
    """All fields of every gridded variable, and the reader's refusal (None: accepted)."""
    try:
        fields = field_items([path])
    except ClimateDataError as err:
        return [], str(err)
    seen: set[str] = set()
    for f in fields:
        if f.name not in seen:
            seen.add(str(f.name))
            try:
                if climate.native_regular(climate.find_grid(f)):
                    normalize_field(f)
                else:
                    climate.field_points(f)
            except ClimateDataError as err:
                return fields, str(err)
    return fields, None


def _values_equal(a: Path, b: Path) -> None:
    """Decoded values equal (NaN where NaN) and stored values equal (fill values kept;
    float data packed into a float dtype, like ERA5's, is only equal once decoded)."""
    with netCDF4.Dataset(a) as x, netCDF4.Dataset(b) as y:
        for name in y.variables:
            float_packed = x[name].dtype.kind == "f" and "scale_factor" in x[name].ncattrs()
            for raw in (False,) if float_packed else (False, True):
                x[name].set_auto_maskandscale(not raw)
                y[name].set_auto_maskandscale(not raw)
                u, v = x[name][...], y[name][...]
                if not raw and u.dtype.kind in "iuf":
                    u = np.ma.filled(np.ma.asarray(u).astype(np.float64), np.nan)
                    v = np.ma.filled(np.ma.asarray(v).astype(np.float64), np.nan)
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v),
                                              err_msg=f"{name} ({'stored' if raw else 'decoded'})")


def test_every_shared_file_is_listed():
    assert set(FILES) == set(VARIABLES), "a new shared file: list it in VARIABLES/REFUSED"


@pytest.mark.parametrize("name", FILES)
def test_round_trip_is_faithful(tmp_path, name):
    path = SHARED / name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fields, refusal = _read(path)
        if refusal is None:
            assert name not in REFUSED, f"{name} is accepted now; expected {REFUSED[name]!r}"
        else:
            assert name in REFUSED, f"{name} is refused now: {refusal}"
            assert "\n" not in refusal
            assert re.search(REFUSED[name], refusal), refusal
        assert list(dict.fromkeys(str(f.name) for f in fields)) == VARIABLES[name]
        if name in NOT_WRITABLE:
            if fields:
                with pytest.raises(ClimateDataError, match="duplicate fields"):
                    write_netcdf(stack_variables(fields), tmp_path / name)
            return
        assert list(dict.fromkeys(str(f.name) for f in fields)) == VARIABLES[name]
        arrays = stack_variables(fields)
        out = write_netcdf(arrays, tmp_path / name, history="mscn test round trip")
    assert [str(w.message) for w in caught] == []  # nothing leaks to the user
    names = [str(a.name) for a in arrays]
    hin, hout = header(path), header(out)
    assert compare_headers(hin, hout, names) == []
    assert set(names) <= set(hout["variables"])
    assert hout["global"]["history"][1].split("\n")[0].endswith(": mscn test round trip")
    _values_equal(path, out)


def test_conventions_kept_never_added(tmp_path):
    """CF-1.7 stays CF-1.7 (no CF-1.8 stamp); a file without Conventions gets none."""
    era5 = write_netcdf(stack_variables(field_items([SHARED / "era5_t_z_3deg_2017-01-01.nc"],
                                                     var="t")), tmp_path / "e.nc")
    etopo = write_netcdf(stack_variables(field_items([SHARED / "etopo60_relief_1deg.nc"])),
                         tmp_path / "x.nc")
    with netCDF4.Dataset(era5) as a, netCDF4.Dataset(etopo) as b:
        assert a.getncattr("Conventions") == "CF-1.7"
        assert "Conventions" not in b.ncattrs()
        assert b.data_model == "NETCDF3_CLASSIC"
        assert b.getncattr("history").split("\n")[0].endswith(
            ": written by mscn_datasets.climate.write_netcdf")


def test_fill_value_written_as_fill(tmp_path):
    """COADS land cells: NaN in memory, -1e34 (its _FillValue/missing_value) on disk."""
    src = SHARED / "coads_climatology_2deg.nc"
    out = write_netcdf(stack_variables(field_items([src], var="SST")), tmp_path / "c.nc")
    with netCDF4.Dataset(out) as nc:
        v = nc["SST"]
        v.set_auto_maskandscale(False)
        raw = v[0]
        assert v.getncattr("_FillValue") == np.float32(-1e34)
        assert v.getncattr("missing_value") == np.float32(-1e34)
        assert (raw == np.float32(-1e34)).any() and not np.isnan(raw).any()
        assert nc.dimensions["TIME"].isunlimited()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_input_round_trip(tmp_path, zarr_format):
    """zarr in -> NETCDF4 out, chunked per field, default compression; all else as the
    netCDF the store was made from.  A selection (what ``mscn fit`` does) writes too."""
    src = SHARED / "era5_t_z_3deg_2017-01-01.nc"
    store = tmp_path / "era5.zarr"
    with xr.open_dataset(src) as ds, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's own notes on consolidated metadata
        ds.to_zarr(store, zarr_format=zarr_format, consolidated=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_netcdf(stack_variables(field_items([store])), tmp_path / "z.nc")
        fields = field_items([store], var="t", sel=["isobaricInhPa=850", "number=8"])
        sel = write_netcdf(stack_variables(fields), tmp_path / "sel.nc")
    assert [str(w.message) for w in caught] == []
    assert sorted(compare_headers(header(src), header(out), ["t", "z"])) == [
        "t compression (False, 0, False) -> (True, 4, True)",
        "z compression (False, 0, False) -> (True, 4, True)",
    ]
    _values_equal(src, out)
    hsel = header(sel)
    assert hsel["data_model"] == "NETCDF4"
    assert hsel["variables"]["t"]["dims"] == ("time", "latitude", "longitude")
    assert hsel["variables"]["t"]["chunking"] == (1, 61, 120)
    assert hsel["variables"]["isobaricInhPa"]["dims"] == ()
    with xr.open_dataset(src) as a, xr.open_dataset(sel) as b:
        xr.testing.assert_identical(a["t"].sel(isobaricInhPa=850, number=8), b["t"])


# ------------------------------------------------------------------ portable encoding


def _strip(field: xr.DataArray) -> xr.DataArray:
    """The field as a decoder rebuilds it: same values, attrs and coords, no encodings."""
    return field.copy(deep=True).drop_encoding()


@pytest.mark.parametrize("name", [n for n in FILES if n not in NOT_WRITABLE])
def test_portable_encoding_rebuilds_the_same_file(tmp_path, name):
    """Direct write == write of fields rebuilt from JSON (what a .mscn stream carries)."""
    fields = field_items([SHARED / name])
    rebuilt = []
    for f in fields:
        enc = json.loads(json.dumps(portable_encoding(f)))
        check_portable_encoding(enc)
        rebuilt.append(apply_portable_encoding(_strip(f), enc))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = write_netcdf(stack_variables(fields), tmp_path / "direct.nc")
        b = write_netcdf(stack_variables(rebuilt), tmp_path / "rebuilt.nc")
    assert [str(w.message) for w in caught] == []
    ha, hb = header(a), header(b)
    for h in (ha, hb):
        h["global"].pop("history")
    assert ha == hb
    _values_equal(a, b)


READABLE = [n for n in FILES if n not in REFUSED and n not in NOT_WRITABLE]


@pytest.mark.parametrize("name", READABLE)
def test_sphere_template_plus_portable_encoding(tmp_path, name):
    """The sphere plugin's field template + portable encoding rebuild the input's file."""
    from mscn_plugins import sphere

    src = SHARED / name
    fields = field_items([src])
    rebuilt = []
    for f in fields:
        tmpl = json.loads(json.dumps(sphere.field_template(f)))
        enc = json.loads(json.dumps(portable_encoding(f)))
        t = sphere.template_field(tmpl)
        rebuilt.append(apply_portable_encoding(t.copy(data=f.values), enc))
    out = write_netcdf(stack_variables(rebuilt), tmp_path / name)
    names = list(dict.fromkeys(str(f.name) for f in fields))
    assert compare_headers(header(src), header(out), names) == []
    _values_equal(src, out)


def _era5_encoding() -> dict:
    f = field_items([SHARED / "era5_t_z_3deg_2017-01-01.nc"], var="t",
                    sel={"isobaricInhPa": 850, "number": 0, "time": "2017-01-01"})[0]
    return json.loads(json.dumps(portable_encoding(f)))


def _set(enc: dict, path: str, value: object) -> dict:
    *keys, last = path.split(".")
    d = enc
    for k in keys:
        d = d[k]
    d[last] = value
    return enc


@pytest.mark.parametrize(("path", "value", "match"), [
    ("format", "NETCDF5", "format"),
    ("format", 4, "format"),
    ("variable.dtype", "object", "variable.dtype"),
    ("variable.dtype", "<U8", "variable.dtype"),
    ("variable.dtype", "float128", "variable.dtype"),
    ("variable.dtype", ["f4"], "variable.dtype"),
    ("variable.scale_factor", float("inf"), "variable.scale_factor"),
    ("variable.scale_factor", float("nan"), "variable.scale_factor"),
    ("variable.scale_factor", "0.1", "variable.scale_factor"),
    ("variable.add_offset", True, "variable.add_offset"),
    ("variable._FillValue", "x", "variable._FillValue"),
    ("variable.complevel", 12, "variable.complevel"),
    ("variable.zlib", 1, "variable.zlib"),
    ("variable.chunksizes", [1 << 20, 1 << 20, 1 << 20], "variable.chunksizes"),
    ("variable.chunksizes", [0, 61, 120], "variable.chunksizes"),
    ("variable.chunksizes", "big", "variable.chunksizes"),
    ("variable.nonsense", 1, "variable.nonsense"),
    ("variable.attr_dtypes", {"units": "object"}, "variable.attr_dtypes"),
    ("global_attrs", {"a/b": "x"}, "global_attrs key"),
    ("global_attrs", {"": "x"}, "global_attrs key"),
    ("global_attrs", {"x": {"nested": 1}}, r"global_attrs\['x'\]"),
    ("global_attrs", {"x": [1, "a"]}, r"global_attrs\['x'\]"),
    ("global_attrs", {"x": [[1]]}, r"global_attrs\['x'\]"),
    ("global_attrs", {"x": True}, r"global_attrs\['x'\]"),
    ("global_attrs", {"x\0": "y"}, "global_attrs key"),
    ("global_attrs", [], "global_attrs"),
    ("unlimited_dims", "time", "unlimited_dims"),
    ("coords", {"time": {"units": 5}}, r"coords\['time'\]\.units"),
    ("coords", {"time": {"dtype": "complex128"}}, r"coords\['time'\]\.dtype"),
    ("coords", {"a/b": {}}, "coords key"),
    ("surprise", 1, "surprise"),
])
def test_check_portable_encoding_refuses_forgeries(path, value, match):
    enc = _set(_era5_encoding(), path, value)
    with pytest.raises(ValueError, match=match) as info:
        check_portable_encoding(enc)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=match):
        apply_portable_encoding(xr.DataArray(np.zeros((2, 2))), enc)


def test_check_portable_encoding_accepts_real_ones():
    enc = _era5_encoding()
    check_portable_encoding(enc)
    assert enc["format"] == "NETCDF4" and enc["global_attrs"]["Conventions"] == "CF-1.7"
    assert enc["coords"]["time"]["units"] == "seconds since 1970-01-01"
    assert enc["coords"]["time"]["dtype"] == "int64"
    assert enc["variable"]["scale_factor"] == 0.1
    for bad in (None, [], "x"):
        with pytest.raises(ValueError, match="portable encoding"):
            check_portable_encoding(bad)
    assert climate.NETCDF_FORMATS[0] == "NETCDF4"
