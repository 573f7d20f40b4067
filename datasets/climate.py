"""Reader for global latitude/longitude climate fields (NetCDF / zarr).

Real files name their axes in many ways (``latitude``/``lat``/``COADSY``/``FNOCY``...),
store latitude north-to-south or south-to-north, and use longitude conventions such as
0..357, -180..177.5 or Ferret's modulo axes 20..380.  Everything downstream (the sphere
modality, the codec, the viewers) wants one thing: a float64 array on a regular global
grid with latitude ascending -90..90 and longitude ascending in [0, 360).  This module
turns a file into such 2-D fields and puts decoded values back into the file's own
layout (names, order, attrs, item coordinates) so that a round trip is exact.

Main entry points::

    ds = open_climate(path)
    da = select_fields(ds, var="t", sel={"isobaricInhPa": 850})
    for field in iter_fields(da):
        values, lat, lon, info = normalize_field(field)
        ...
        restored = restore_layout(values, field)
    write_netcdf(stack_fields(restored_fields), "out.nc")
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mscn_core.atomic import write_atomic

__all__ = [
    "ClimateDataError",
    "FieldLayout",
    "check_global_regular",
    "field_items",
    "field_to_dataarray",
    "find_lat_lon",
    "iter_fields",
    "normalize_field",
    "open_climate",
    "parse_sel",
    "regular_latlon",
    "regular_latlon_shape",
    "restore_layout",
    "select_fields",
    "stack_fields",
    "write_netcdf",
]

# Keys stored in DataArray.encoding so that stack_fields/write_netcdf can undo
# select_fields/iter_fields without polluting the (CF) attrs.
_ENC_DIMS = "mscn_dims"
_ENC_ITEM_DIMS = "mscn_item_dims"
_ENC_GLOBAL_ATTRS = "mscn_global_attrs"
_ENC_TIME = "mscn_time_decoding"

# Relative tolerance on grid spacing (fraction of the spacing).
GRID_RTOL = 1e-3
# Minimum latitude span (degrees) for a grid to count as pole-to-pole.
MIN_LAT_SPAN = 170.0


class ClimateDataError(ValueError):
    """Bad or unsupported climate input; the message names the file/variable and the problem."""


# --------------------------------------------------------------------------------------
# opening
# --------------------------------------------------------------------------------------


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (
        path.is_dir()
        and any((path / m).exists() for m in (".zgroup", "zarr.json", ".zattrs", ".zmetadata"))
    )


def _zarr_consolidated(path: Path) -> bool:
    """True if the store has consolidated metadata (v2 .zmetadata or v3 zarr.json)."""
    if (path / ".zmetadata").exists():
        return True
    meta = path / "zarr.json"
    if meta.exists():
        try:
            return json.loads(meta.read_text()).get("consolidated_metadata") is not None
        except (OSError, ValueError):
            return False
    return False


def open_climate(path: str | os.PathLike[str], engine: str | None = None) -> xr.Dataset:
    """Open a NetCDF file or zarr store as an xarray Dataset.

    Why the fallbacks: several real files carry time units that numpy cannot decode
    (COADS ``hour since 0000-01-01``, NCAR ``months since 1958-1-1``).  Their fields are
    still perfectly usable, so we try default decoding, then cftime, then leave time
    raw (numeric values with the ``units`` attribute kept) instead of failing.
    A missing, corrupt or non-NetCDF file raises :class:`ClimateDataError` naming it.
    """
    p = Path(path)
    if not p.exists():
        raise ClimateDataError(f"climate file {str(p)!r} does not exist")
    kwargs: dict[str, Any] = {}
    if engine is not None:
        kwargs["engine"] = engine
    if kwargs.get("engine", "zarr" if _is_zarr(p) else None) == "zarr":
        kwargs["engine"] = "zarr"
        kwargs["consolidated"] = _zarr_consolidated(p)
    if p.is_dir() and "engine" not in kwargs:
        raise ClimateDataError(f"{str(p)!r} is a directory but not a zarr store")

    attempts: list[tuple[str, dict[str, Any]]] = [
        ("default", {}),
        ("cftime", {"decode_times": xr.coders.CFDatetimeCoder(use_cftime=True)}),
        ("raw", {"decode_times": False}),
    ]
    first_error: Exception | None = None
    for label, extra in attempts:
        try:
            ds = xr.open_dataset(p, **kwargs, **extra)
        except Exception as exc:  # noqa: BLE001 - any backend error means "try next"
            if first_error is None:
                first_error = exc
            continue
        ds.encoding[_ENC_TIME] = label
        return ds
    raise ClimateDataError(
        f"cannot open {str(p)!r} as NetCDF/zarr: {type(first_error).__name__}: {first_error}"
    ) from first_error


# --------------------------------------------------------------------------------------
# finding latitude / longitude
# --------------------------------------------------------------------------------------

_LAT_UNITS = {
    "degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn",
    "deg_n", "degn",
}
_LON_UNITS = {
    "degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese",
    "deg_e", "dege",
}
_LAT_NAMES = {"lat", "latitude", "nav_lat", "lats", "y", "rlat", "xlat", "grid_yt", "yt"}
_LON_NAMES = {"lon", "longitude", "nav_lon", "lons", "x", "rlon", "xlon", "long", "grid_xt", "xt"}


def _axis_score(name: str, attrs: Mapping[str, Any], kind: str) -> int:
    """Score how strongly a dimension looks like latitude (kind='lat') or longitude."""
    std = {"lat": ("latitude", "grid_latitude"), "lon": ("longitude", "grid_longitude")}[kind]
    units = _LAT_UNITS if kind == "lat" else _LON_UNITS
    names = _LAT_NAMES if kind == "lat" else _LON_NAMES
    axis = "Y" if kind == "lat" else "X"
    other_units = _LON_UNITS if kind == "lat" else _LAT_UNITS
    score = 0
    if str(attrs.get("standard_name", "")).lower() in std:
        score += 8
    u = str(attrs.get("units", "")).lower().replace(" ", "_")
    if u in units:
        score += 8
    if u in other_units:
        return 0
    if str(attrs.get("axis", "")).upper() == axis:
        score += 4
    lname = name.lower()
    if lname in names:
        score += 2
    elif lname.startswith(kind) or lname.endswith(kind):
        score += 1
    return score


def find_lat_lon(obj: xr.Dataset | xr.DataArray) -> tuple[str, str]:
    """Return the (latitude, longitude) dimension names of a Dataset or DataArray.

    Why: files use CF attributes (standard_name, units degrees_north, axis Y) *or*
    only names; COADS/Navy files have just ``units: degrees_north`` on ``COADSY``/
    ``FNOCY``.  CF attributes win over names.  Raises :class:`ClimateDataError` when
    either axis cannot be found.
    """
    if isinstance(obj, xr.DataArray):
        dims = list(obj.dims)
    else:
        dims = list(obj.dims)
    best: dict[str, tuple[int, str | None]] = {"lat": (0, None), "lon": (0, None)}
    for dim in dims:
        attrs = obj[dim].attrs if dim in obj.coords else {}
        for kind in ("lat", "lon"):
            s = _axis_score(str(dim), attrs, kind)
            if s > best[kind][0]:
                best[kind] = (s, str(dim))
    lat, lon = best["lat"][1], best["lon"][1]
    what = f"variable {obj.name!r}" if isinstance(obj, xr.DataArray) else "dataset"
    if lat is None or lon is None or lat == lon:
        missing = [k for k, (_, n) in best.items() if n is None] or ["lat/lon (ambiguous)"]
        raise ClimateDataError(
            f"no {' and '.join(missing)} dimension found in {what} with dims {dims}: "
            "need CF standard_name latitude/longitude, units degrees_north/east, axis Y/X, "
            "or a name like lat/latitude and lon/longitude"
        )
    return lat, lon


# --------------------------------------------------------------------------------------
# selecting variables and items
# --------------------------------------------------------------------------------------


def _convert_scalar(text: str) -> Any:
    t = text.strip()
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def parse_sel(items: Sequence[str] | None) -> dict[str, Any]:
    """Parse CLI-style selections ``["isobaricInhPa=850", "time=2017-01-01T12"]``.

    Numeric strings become int/float so that nearest-match selection works on numeric
    coordinates; ``a,b,c`` gives a list (keeps the dimension).
    """
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ClimateDataError(f"bad selection {item!r}: expected NAME=VALUE")
        key, _, value = item.partition("=")
        key = key.strip()
        if not key or not value.strip():
            raise ClimateDataError(f"bad selection {item!r}: expected NAME=VALUE")
        parts = [v for v in value.split(",") if v.strip()]
        out[key] = (
            [_convert_scalar(v) for v in parts] if len(parts) > 1 else _convert_scalar(parts[0])
        )
    return out


_LEVEL_ALIASES = {"level", "lev", "plev", "pressure", "pressure_level", "levelist"}


def _resolve_sel_key(da: xr.DataArray, key: str) -> str:
    if key in da.dims:
        return key
    lower = {str(d).lower(): str(d) for d in da.dims}
    if key.lower() in lower:
        return lower[key.lower()]
    if key.lower() in _LEVEL_ALIASES:
        for d in da.dims:
            attrs = da[d].attrs if d in da.coords else {}
            ds_name = str(d).lower()
            if (
                attrs.get("standard_name") == "air_pressure"
                or str(attrs.get("units", "")).lower() in {"hpa", "pa", "mb", "millibar"}
                or "isobaric" in ds_name
                or ds_name.startswith("lev")
            ):
                return str(d)
    raise ClimateDataError(
        f"cannot select {key!r} on variable {da.name!r}: it has dims {list(da.dims)}"
    )


def _check_scalar(coord: xr.DataArray, value: Any) -> None:
    wanted = value if isinstance(value, list) else [value]
    have = coord.values.item() if coord.values.dtype.kind in "iufb" else coord.values
    ok = any(
        (isinstance(w, int | float) and np.isclose(float(w), float(have))) or str(w) == str(have)
        for w in wanted
    )
    if not ok:
        raise ClimateDataError(
            f"selection {coord.name}={value!r} matches nothing: {coord.name} is {have!r} here"
        )


def _check_near(coord: xr.DataArray, wanted: list, got: np.ndarray, dim: str) -> None:
    """Nearest match forgives rounding (850 vs 850.0001), not a value off the axis."""
    vals = np.asarray(coord.values, dtype=np.float64)
    spacing = float(np.min(np.abs(np.diff(np.unique(vals))))) if vals.size > 1 else 0.0
    tol = max(0.5 * spacing, 1e-6 * max(1.0, float(np.max(np.abs(vals)))))
    for w, g in zip(wanted, got, strict=True):
        if abs(float(w) - float(g)) > tol:
            raise ClimateDataError(
                f"selection {dim}={w!r} matches nothing (nearest is {g!r}); "
                f"{dim} values: {vals[:10].tolist()}"
            )


def _sel_one(da: xr.DataArray, dim: str, value: Any) -> xr.DataArray:
    if dim not in da.coords:
        if isinstance(value, int | list):
            return da.isel({dim: value})
        raise ClimateDataError(f"dimension {dim!r} has no coordinate; select it by integer index")
    coord = da[dim]
    numeric = np.issubdtype(coord.dtype, np.number)
    try:
        if numeric:
            vals = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int | float) for v in vals):
                raise ClimateDataError(
                    f"selection {dim}={value!r}: coordinate {dim!r} is numeric "
                    f"({coord.values.tolist()[:10]}...)"
                )
            out = da.sel({dim: value}, method="nearest")
            _check_near(coord, vals, np.atleast_1d(out[dim].values), dim)
            return out
        return da.sel({dim: value})
    except KeyError as exc:
        shown = coord.values[:10].tolist()
        raise ClimateDataError(
            f"selection {dim}={value!r} matches nothing on {da.name!r}; {dim} values: {shown}"
        ) from exc


def select_fields(
    ds: xr.Dataset | xr.DataArray,
    var: str | None = None,
    sel: Mapping[str, Any] | Sequence[str] | None = None,
) -> xr.DataArray:
    """Choose one variable and optional item selection; return (..., lat, lon) DataArray.

    Why: a file holds several variables and item dims (members, times, levels); the
    codec sees one variable at a time, as a stack of 2-D fields.  With ``var=None`` the
    single data variable on a lat/lon grid is taken (ambiguity is an error listing the
    candidates).  Numeric coords use nearest match.  Original names and attrs are kept.
    """
    if isinstance(ds, xr.DataArray):
        da = ds
    else:
        if var is None:
            gridded = []
            for name, v in ds.data_vars.items():
                try:
                    find_lat_lon(v)
                except ClimateDataError:
                    continue
                gridded.append(str(name))
            if not gridded:
                raise ClimateDataError(
                    f"no data variable on a latitude/longitude grid; variables: "
                    f"{sorted(map(str, ds.data_vars))}"
                )
            if len(gridded) > 1:
                raise ClimateDataError(
                    f"several gridded variables {gridded}; choose one with var=..."
                )
            var = gridded[0]
        if var not in ds.data_vars:
            src = ds.encoding.get("source", "dataset")
            raise ClimateDataError(
                f"variable {var!r} not found in {src}; available variables: "
                f"{sorted(map(str, ds.data_vars))}"
            )
        da = ds[var].copy(deep=False)  # own encoding dict: do not touch the Dataset's
        da.encoding[_ENC_GLOBAL_ATTRS] = dict(ds.attrs)
    lat, lon = find_lat_lon(da)
    if sel:
        if not isinstance(sel, Mapping):
            sel = parse_sel(list(sel))
        for key, value in sel.items():
            if str(key) in da.coords and da[str(key)].ndim == 0 and str(key) not in da.dims:
                _check_scalar(da[str(key)], value)  # already selected (e.g. a written recon)
                continue
            dim = _resolve_sel_key(da, str(key))
            if dim in (lat, lon):
                raise ClimateDataError(
                    f"cannot select on {dim!r}: fields must stay global lat/lon grids"
                )
            da = _sel_one(da, dim, value)
    others = [d for d in da.dims if d not in (lat, lon)]
    da = da.transpose(*others, lat, lon)
    da.encoding[_ENC_DIMS] = tuple(map(str, da.dims))
    da.encoding[_ENC_ITEM_DIMS] = tuple(map(str, others))
    return da


def iter_fields(da: xr.DataArray) -> Iterator[xr.DataArray]:
    """Yield every 2-D (lat, lon) field, in C order over the item dims.

    Each field keeps the item dims as scalar coords (e.g. number=3, time=...,
    isobaricInhPa=850) so its identity travels with it and :func:`stack_fields` can
    rebuild the original array.  Item dims without a coordinate get an integer index
    coordinate (0..n-1) so that the identity is still known.
    """
    lat, lon = find_lat_lon(da)
    item_dims = [str(d) for d in da.dims if d not in (lat, lon)]
    missing = {d: np.arange(da.sizes[d]) for d in item_dims if d not in da.coords}
    if missing:
        da = da.assign_coords(missing)
    dims_order = da.encoding.get(_ENC_DIMS, tuple(map(str, da.dims)))
    shape = [da.sizes[d] for d in item_dims]
    for idx in np.ndindex(*shape):
        field = da.isel(dict(zip(item_dims, idx, strict=True)))
        field.encoding[_ENC_ITEM_DIMS] = tuple(item_dims)
        field.encoding[_ENC_DIMS] = tuple(dims_order)
        yield field


def field_items(
    paths: Iterable[str | os.PathLike[str]],
    var: str | None = None,
    sel: Mapping[str, Any] | Sequence[str] | None = None,
) -> list[xr.DataArray]:
    """All 2-D fields of ``var`` (after ``sel``) from several files, loaded in memory."""
    out: list[xr.DataArray] = []
    for path in paths:
        with open_climate(path) as ds:
            da = select_fields(ds, var=var, sel=sel)
            try:  # load now: a damaged file fails here, before any expensive work
                da = da.load()
            except (RuntimeError, OSError) as err:  # netCDF4/HDF5: "NetCDF: HDF error"
                raise ClimateDataError(f"{path}: cannot read variable {da.name}: {err} "
                                       "(corrupted file?)") from None
            out.extend(iter_fields(da))
    return out


# --------------------------------------------------------------------------------------
# grid checks and normalisation
# --------------------------------------------------------------------------------------


def _regular(sorted_vals: np.ndarray, what: str, period: float | None = None) -> float:
    d = np.diff(sorted_vals)
    if period is not None:
        d = np.append(d, sorted_vals[0] + period - sorted_vals[-1])
    if np.any(d <= 0):
        dup = sorted_vals[:-1][np.diff(sorted_vals) <= 0][:3].tolist()
        raise ClimateDataError(
            f"{what} has duplicate values {dup} (a repeated cyclic column?); "
            "need unique grid points"
        )
    step = float(np.median(d))
    bad = np.abs(d - step) > GRID_RTOL * step
    if np.any(bad):
        i = int(np.argmax(bad))
        if period is not None and i == len(d) - 1:
            raise ClimateDataError(
                f"{what} is not global: points {sorted_vals[0]:g}..{sorted_vals[-1]:g} "
                f"(mod 360) with spacing {step:g} leave a gap of {d[-1]:g} degrees; "
                "longitude must cover 360 degrees"
            )
        raise ClimateDataError(
            f"{what} is irregular: spacing {d[i]:g} at {sorted_vals[i]:g} differs from "
            f"{step:g} (tolerance {GRID_RTOL:g} relative)"
        )
    return step


def check_global_regular(lat: Any, lon: Any) -> tuple[float, float]:
    """Refuse grids the sphere modality cannot represent; return (dlat, dlon).

    Why: the codec assumes a regular global lat/lon grid (quadrature weights, periodic
    longitude).  Longitude, taken mod 360, must be regularly spaced and wrap around
    (360 degrees covered within one spacing); latitude must be regular and span at
    least 170 degrees (so cell-centred -89..89 grids pass, regional ones do not).
    Input order does not matter.
    """
    la = np.asarray(lat, dtype=np.float64)
    lo = np.asarray(lon, dtype=np.float64)
    if la.ndim != 1 or lo.ndim != 1:
        raise ClimateDataError(
            f"latitude/longitude must be 1-D coordinates (got shapes {la.shape}, {lo.shape}); "
            "curvilinear grids are not supported"
        )
    if la.size < 2 or lo.size < 2:
        raise ClimateDataError(f"grid too small: {la.size} latitudes x {lo.size} longitudes")
    if not (np.all(np.isfinite(la)) and np.all(np.isfinite(lo))):
        raise ClimateDataError("latitude/longitude coordinates contain NaN/inf")
    if la.min() < -90 - 1e-6 or la.max() > 90 + 1e-6:
        raise ClimateDataError(
            f"latitude values {la.min():g}..{la.max():g} outside [-90, 90] (not degrees?)"
        )
    la_s = np.sort(la)
    dlat = _regular(la_s, "latitude")
    span = la_s[-1] - la_s[0]
    if span < MIN_LAT_SPAN - 1e-6:
        raise ClimateDataError(
            f"latitude is not global: {la_s[0]:g}..{la_s[-1]:g} spans {span:g} degrees, "
            f"need at least {MIN_LAT_SPAN:g} (pole to pole)"
        )
    lo_s = np.sort(np.mod(lo, 360.0))
    dlon = _regular(lo_s, "longitude", period=360.0)
    return dlat, dlon


@dataclass(frozen=True)
class FieldLayout:
    """How a 2-D field maps onto the normalised grid (enough to undo it exactly).

    ``lat_index``/``lon_index`` are the indices into the original axes that give the
    ascending normalised axes; ``transposed`` is True when the original dims were
    (lon, lat).
    """

    lat_name: str
    lon_name: str
    lat_index: np.ndarray
    lon_index: np.ndarray
    transposed: bool
    shape: tuple[int, int]


def _layout(field2d: xr.DataArray) -> tuple[FieldLayout, np.ndarray, np.ndarray]:
    if not isinstance(field2d, xr.DataArray):
        raise ClimateDataError(f"expected an xarray DataArray, got {type(field2d).__name__}")
    lat, lon = find_lat_lon(field2d)
    if field2d.ndim != 2:
        raise ClimateDataError(
            f"field {field2d.name!r} has dims {list(field2d.dims)}; expected only "
            f"({lat}, {lon}) - use iter_fields() to split item dims"
        )
    for d in (lat, lon):
        if d not in field2d.coords:
            raise ClimateDataError(f"field {field2d.name!r}: dimension {d!r} has no coordinate")
    lat_raw = np.asarray(field2d[lat].values, dtype=np.float64)
    lon_raw = np.asarray(field2d[lon].values, dtype=np.float64)
    try:
        check_global_regular(lat_raw, lon_raw)
    except ClimateDataError as exc:
        raise ClimateDataError(f"field {field2d.name!r}: {exc}") from None
    lat_index = np.argsort(lat_raw, kind="stable")
    lon_mod = np.mod(lon_raw, 360.0)
    lon_index = np.argsort(lon_mod, kind="stable")
    layout = FieldLayout(
        lat_name=lat,
        lon_name=lon,
        lat_index=lat_index,
        lon_index=lon_index,
        transposed=field2d.dims[0] == lon,
        shape=(field2d.sizes[lat], field2d.sizes[lon]),
    )
    return layout, lat_raw[lat_index], lon_mod[lon_index]


def normalize_field(
    field2d: xr.DataArray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, FieldLayout]:
    """Return (values[lat, lon] float64, lat ascending, lon ascending in [0,360), layout).

    Why: one canonical orientation for the codec regardless of file conventions.
    NaN cells (e.g. COADS SST over land) stay NaN so callers can build a mask; an
    all-NaN field or a non-global/irregular grid raises :class:`ClimateDataError`.
    """
    layout, lat_n, lon_n = _layout(field2d)
    vals = np.asarray(field2d.transpose(layout.lat_name, layout.lon_name).values)
    if not (np.issubdtype(vals.dtype, np.number) or vals.dtype == bool):
        raise ClimateDataError(f"field {field2d.name!r} has non-numeric dtype {vals.dtype}")
    vals = vals.astype(np.float64)
    vals = vals[np.ix_(layout.lat_index, layout.lon_index)]
    finite = np.isfinite(vals)
    if not finite.any():
        raise ClimateDataError(f"field {field2d.name!r} {_item_label(field2d)} is all NaN")
    if np.isinf(vals).any():
        raise ClimateDataError(f"field {field2d.name!r} {_item_label(field2d)} contains inf")
    return np.ascontiguousarray(vals), lat_n, lon_n, layout


def _item_label(field: xr.DataArray) -> str:
    scal = {str(k): v.values.item() for k, v in field.coords.items() if v.ndim == 0}
    return f"at {scal}" if scal else ""


def restore_layout(values: np.ndarray, template_field2d: xr.DataArray) -> xr.DataArray:
    """Put normalised-grid values back into the template's own layout.

    Why: decoded output must look like the input (lat order, lon convention, names,
    attrs, scalar item coords), so files written back are drop-in replacements.
    Values are cast to the template's float dtype; normalize -> restore is exact.
    """
    layout, _, _ = _layout(template_field2d)
    v = np.asarray(values)
    if v.shape != layout.shape:
        raise ClimateDataError(
            f"values shape {v.shape} does not match the normalised grid {layout.shape} "
            f"of {template_field2d.name!r}"
        )
    out = np.empty(layout.shape, dtype=np.result_type(v.dtype, np.float64))
    out[np.ix_(layout.lat_index, layout.lon_index)] = v
    if np.issubdtype(template_field2d.dtype, np.floating):
        out = out.astype(template_field2d.dtype)
    if layout.transposed:
        out = out.T
    res = template_field2d.copy(data=out)
    return res


# --------------------------------------------------------------------------------------
# other resolutions
# --------------------------------------------------------------------------------------


def regular_latlon_shape(resolution_deg: float) -> tuple[int, int]:
    """``(nlat, nlon)`` of :func:`regular_latlon` without building it.

    Why: a decoder checks how large an output grid is before allocating it.
    """
    try:
        r = float(resolution_deg)
    except (TypeError, ValueError):
        raise ClimateDataError(f"resolution must be a number of degrees, got "
                               f"{resolution_deg!r}") from None
    if not np.isfinite(r) or r <= 0:
        raise ClimateDataError(f"resolution must be > 0 degrees, got {resolution_deg!r}")
    nlat_f, nlon_f = 180.0 / r, 360.0 / r
    if not np.isfinite(nlon_f):
        raise ClimateDataError(f"resolution {r:g} degrees is too small")
    nlat, nlon = round(nlat_f), round(nlon_f)
    if abs(nlat - nlat_f) > 1e-6 * max(1.0, nlat_f) or abs(nlon - nlon_f) > 1e-6 * max(
        1.0, nlon_f
    ):
        raise ClimateDataError(f"resolution {r:g} does not divide 180 degrees evenly")
    return nlat + 1, nlon


def regular_latlon(resolution_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Global grid at ``resolution_deg``: lat -90..90 inclusive, lon 0..360-res.

    Why: the implicit neural representation can be evaluated at any resolution;
    this is the canonical target grid for such reconstructions.
    """
    nlat, nlon = regular_latlon_shape(resolution_deg)
    lat = np.linspace(-90.0, 90.0, nlat)
    lon = np.arange(nlon, dtype=np.float64) * (360.0 / nlon)
    return lat, lon


def field_to_dataarray(
    values: np.ndarray, lat: Any, lon: Any, template_field2d: xr.DataArray
) -> xr.DataArray:
    """Wrap values on an arbitrary (normalised) grid in a DataArray like the template.

    ``values`` is (len(lat), len(lon)) with lat ascending and lon in [0, 360) ascending
    (e.g. from :func:`regular_latlon`).  The result uses the template's coordinate and
    variable names, attrs, scalar item coords, lat order (descending if the template's
    is) and lon convention (longitudes mapped into [lon0, lon0+360) with lon0 the
    template's first longitude, so -180..180 and Ferret 20..380 grids are followed).
    """
    lat_a = np.asarray(lat, dtype=np.float64)
    lon_a = np.asarray(lon, dtype=np.float64)
    v = np.asarray(values)
    if v.shape != (lat_a.size, lon_a.size):
        raise ClimateDataError(
            f"values shape {v.shape} does not match grid ({lat_a.size}, {lon_a.size})"
        )
    tlat, tlon = find_lat_lon(template_field2d)
    t_lat = np.asarray(template_field2d[tlat].values, dtype=np.float64)
    t_lon = np.asarray(template_field2d[tlon].values, dtype=np.float64)
    lat_desc = t_lat.size > 1 and t_lat[0] > t_lat[-1]
    lon_desc = t_lon.size > 1 and t_lon[0] > t_lon[-1]
    lon0 = float(np.min(t_lon))
    lon_t = lon0 + np.mod(lon_a - lon0, 360.0)
    lat_order = np.argsort(lat_a, kind="stable")
    lon_order = np.argsort(lon_t, kind="stable")
    if lat_desc:
        lat_order = lat_order[::-1]
    if lon_desc:
        lon_order = lon_order[::-1]
    data = v[np.ix_(lat_order, lon_order)]
    if np.issubdtype(template_field2d.dtype, np.floating):
        data = data.astype(template_field2d.dtype)

    def _coord_vals(raw: np.ndarray, tmpl: xr.DataArray) -> np.ndarray:
        if np.issubdtype(tmpl.dtype, np.floating):
            return raw.astype(tmpl.dtype)
        return raw

    coords: dict[str, Any] = {
        tlat: (tlat, _coord_vals(lat_a[lat_order], template_field2d[tlat]),
               dict(template_field2d[tlat].attrs)),
        tlon: (tlon, _coord_vals(lon_t[lon_order], template_field2d[tlon]),
               dict(template_field2d[tlon].attrs)),
    }
    for name, c in template_field2d.coords.items():
        if c.ndim == 0:
            coords[str(name)] = c.variable.copy()
    order = (tlon, tlat) if template_field2d.dims[0] == tlon else (tlat, tlon)
    da = xr.DataArray(
        data.T if order[0] == tlon else data,
        dims=order,
        coords=coords,
        name=template_field2d.name,
        attrs=dict(template_field2d.attrs),
    )
    da.encoding.update(
        {k: v for k, v in template_field2d.encoding.items() if k.startswith("mscn_")}
    )
    return da


# --------------------------------------------------------------------------------------
# stacking and writing
# --------------------------------------------------------------------------------------


def _scalar_key(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item() if not isinstance(v, np.datetime64 | np.timedelta64) else v
    return v


def _infer_item_dims(fields: list[xr.DataArray], lat: str, lon: str) -> tuple[str, ...]:
    scal = [str(k) for k, c in fields[0].coords.items() if c.ndim == 0]
    varying = [
        k for k in scal
        if len({_scalar_key(f[k].values[()]) for f in fields if k in f.coords}) > 1
    ]
    n = len(fields)
    for size in range(1, len(varying) + 1):
        for combo in itertools.combinations(varying, size):
            keys = {tuple(_scalar_key(f[k].values[()]) for k in combo) for f in fields}
            counts = [len({_scalar_key(f[k].values[()]) for f in fields}) for k in combo]
            if len(keys) == n and int(np.prod(counts)) == n:
                return combo
    raise ClimateDataError(
        f"cannot tell which scalar coords {varying} index the {n} fields; pass item_dims=..."
    )


def stack_fields(
    fields: Sequence[xr.DataArray], item_dims: Sequence[str] | None = None
) -> xr.DataArray:
    """Rebuild the N-D array that :func:`iter_fields` split (inverse of iter_fields).

    Why: decoded fields must be written back as the original variable, e.g.
    (number, time, isobaricInhPa, latitude, longitude).  Item dims come from the
    fields' encoding (set by iter_fields) or are inferred from varying scalar coords.
    Other scalar coords that vary (e.g. ERA5 ``valid_time`` along ``time``) become
    coords along the dims they depend on.  Every item combination must be present once.
    """
    fields = list(fields)
    if not fields:
        raise ClimateDataError("stack_fields needs at least one field")
    first = fields[0]
    lat, lon = find_lat_lon(first)
    for f in fields:
        if f.ndim != 2 or set(f.dims) != {lat, lon}:
            raise ClimateDataError(f"field with dims {list(f.dims)} is not a ({lat}, {lon}) field")
    if item_dims is None:
        item_dims = first.encoding.get(_ENC_ITEM_DIMS)
        if item_dims is None:
            item_dims = _infer_item_dims(fields, lat, lon)
    item_dims = tuple(item_dims)
    for d in item_dims:
        if any(d not in f.coords or f[d].ndim != 0 for f in fields):
            raise ClimateDataError(f"item dim {d!r} is not a scalar coord of every field")

    # unique values per item dim, in order of first appearance
    uniq: dict[str, list[Any]] = {d: [] for d in item_dims}
    pos: dict[str, dict[Any, int]] = {d: {} for d in item_dims}
    index_of: list[tuple[int, ...]] = []
    for f in fields:
        idx = []
        for d in item_dims:
            key = _scalar_key(f[d].values[()])
            if key not in pos[d]:
                pos[d][key] = len(uniq[d])
                uniq[d].append(f[d].values[()])
            idx.append(pos[d][key])
        index_of.append(tuple(idx))
    shape = tuple(len(uniq[d]) for d in item_dims)
    n_expected = int(np.prod(shape)) if shape else 1
    if len(set(index_of)) != len(index_of):
        raise ClimateDataError(f"duplicate fields for the same item over {item_dims}")
    if len(fields) != n_expected:
        raise ClimateDataError(
            f"{len(fields)} fields do not fill the {shape} grid over {item_dims}; "
            "some items are missing"
        )
    ny, nx = first.sizes[lat], first.sizes[lon]
    data = np.empty(shape + (ny, nx), dtype=first.dtype)
    for f, idx in zip(fields, index_of, strict=True):
        if f.sizes[lat] != ny or f.sizes[lon] != nx:
            raise ClimateDataError("fields have different grid sizes; cannot stack")
        data[idx] = f.transpose(lat, lon).values

    coords: dict[str, Any] = {}
    for d in item_dims:
        c0 = first[d]
        coords[d] = xr.Variable(d, np.array(uniq[d], dtype=c0.dtype), c0.attrs, c0.encoding)
    coords[lat] = first[lat].variable.copy()
    coords[lon] = first[lon].variable.copy()
    # other scalar coords: constant -> scalar, else along the dims they vary with
    for name, c in first.coords.items():
        name = str(name)
        if c.ndim != 0 or name in item_dims:
            continue
        arr = np.empty(shape, dtype=c.dtype) if shape else np.empty((), dtype=c.dtype)
        for f, idx in zip(fields, index_of, strict=True):
            if name not in f.coords:
                raise ClimateDataError(f"scalar coord {name!r} missing from some fields")
            arr[idx] = f[name].values[()]
        keep = []
        for ax in range(len(shape)):
            ref = np.take(arr, [0], axis=ax)
            if not np.array_equal(arr, np.broadcast_to(ref, arr.shape), equal_nan=_nan_ok(arr)):
                keep.append(ax)
        sub = arr[tuple(slice(None) if ax in keep else 0 for ax in range(len(shape)))]
        coords[name] = xr.Variable(
            tuple(item_dims[ax] for ax in keep), sub, c.attrs, c.encoding
        )
    da = xr.DataArray(
        data,
        dims=item_dims + (lat, lon),
        coords=coords,
        name=first.name,
        attrs=dict(first.attrs),
    )
    dims_order = first.encoding.get(_ENC_DIMS)
    if dims_order and set(dims_order) == set(da.dims):
        da = da.transpose(*dims_order)
    da.encoding.update({k: v for k, v in first.encoding.items() if k.startswith("mscn_")})
    for k in ("dtype", "_FillValue", "missing_value"):
        if k in first.encoding:
            da.encoding[k] = first.encoding[k]
    return da


def _nan_ok(arr: np.ndarray) -> bool:
    return np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating)


_KEEP_ENCODING = ("_FillValue", "missing_value", "dtype", "units", "calendar",
                  "scale_factor", "add_offset")


def _clean_encoding(var: xr.Variable, is_coord: bool, engine: str) -> dict[str, Any]:
    enc_in = var.encoding
    enc: dict[str, Any] = {}
    is_time = var.dtype.kind in "Mm" or var.dtype == object
    integer_target = np.dtype(enc_in.get("dtype", var.dtype)).kind in "iu"
    for k in _KEEP_ENCODING:
        if k not in enc_in:
            continue
        if k in ("units", "calendar") and not is_time:
            continue
        if k in ("scale_factor", "add_offset") and not integer_target:
            continue
        if k == "dtype":
            target = np.dtype(enc_in[k])
            # never pack floats into integers without scale_factor, never change time dtype
            if is_time or (target.kind in "iu" and var.dtype.kind == "f"
                           and "scale_factor" not in enc_in):
                continue
        enc[k] = enc_in[k]
    if is_coord and "_FillValue" not in enc:
        enc["_FillValue"] = None
    if not is_coord and var.ndim >= 2 and engine == "netcdf4":
        enc.update(zlib=True, complevel=4, shuffle=True)
    return enc


def write_netcdf(
    obj: xr.DataArray | xr.Dataset,
    path: str | os.PathLike[str],
    overwrite: bool = False,
) -> Path:
    """Write CF NetCDF atomically through :func:`mscn_core.atomic.write_atomic`.

    Why: a crash or error mid-write must never leave a truncated file where a valid
    one was expected, nor clobber an existing file unasked.  Names, units and attrs
    are kept (and the source file's global attrs for DataArrays from select_fields);
    a ``history`` line is prepended.  Raises FileExistsError if ``path`` exists and
    ``overwrite`` is False, FileNotFoundError if its directory is missing.  Returns
    the final path.
    """
    def write(tmp: str) -> None:
        # The temp name keeps the real suffix; the engine is explicit all the same.
        ds, engine, encoding = _netcdf_dataset(obj)
        ds.to_netcdf(tmp, engine=engine, encoding=encoding)

    return write_atomic(path, write, overwrite=overwrite)


def _netcdf_dataset(obj: xr.DataArray | xr.Dataset) -> tuple[xr.Dataset, str, dict]:
    """The Dataset write_netcdf writes, its engine and per-variable encoding."""
    if isinstance(obj, xr.DataArray):
        name = obj.name if obj.name is not None else "field"
        ds = obj.to_dataset(name=name)
        ds.attrs = dict(obj.encoding.get(_ENC_GLOBAL_ATTRS, {}))
    elif isinstance(obj, xr.Dataset):
        ds = obj.copy()
    else:
        raise TypeError(f"write_netcdf needs an xarray DataArray or Dataset, got {type(obj)}")
    try:
        import netCDF4  # noqa: F401

        engine = "netcdf4"
    except ImportError:
        engine = "h5netcdf"
    encoding = {
        str(k): _clean_encoding(v, k in ds.coords, engine) for k, v in ds.variables.items()
    }
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = f"{stamp} written by mscn_datasets.climate.write_netcdf"
    old = ds.attrs.get("history")
    ds.attrs["history"] = f"{line}\n{old}" if old else line
    ds.attrs.setdefault("Conventions", "CF-1.8")
    return ds, engine, encoding
