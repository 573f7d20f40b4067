"""Reader for climate fields on latitude/longitude grids (NetCDF / zarr).

Any grid on the sphere (:func:`find_grid`): regular global grids take the historic
normalised path below; Gaussian, regional, curvilinear (2-D lat/lon) and unstructured
(one cell dim) fields keep their own layout and are read as points (:func:`field_points`).

Real files name their axes in many ways (``latitude``/``lat``/``COADSY``/``FNOCY``...),
store latitude north-to-south or south-to-north, and use longitude conventions such as
0..357, -180..177.5 or Ferret's modulo axes 20..380.  Everything downstream (the sphere
modality, the codec, the viewers) wants one thing: a float64 array on a regular global
grid with latitude ascending -90..90 and longitude ascending in [0, 360).  This module
turns a file into such 2-D fields and puts decoded values back into the file's own
layout (names, order, attrs, item coordinates) so that a round trip is exact.

Main entry points::

    ds = open_climate(path)
    da = select_fields(ds, var="t", sel={"isobaricInhPa": 850})   # exact match by default
    for field in iter_fields(da):
        values, lat, lon, info = normalize_field(field)
        ...
        restored = restore_layout(values, field)
    write_netcdf(stack_fields(restored_fields), "out.nc")

    fields = field_items([path], var=None)       # every gridded variable, file order
    write_netcdf(stack_variables(fields), "out.nc", history="mscn fit ...")

Written files keep the input's format, attributes, fill values, packing, time encoding
and unlimited dims; :func:`portable_encoding` carries what a decoder needs for that.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from mscn_core.atomic import write_atomic

__all__ = [
    "ClimateDataError",
    "EXPECTED_COORDS",
    "FieldLayout",
    "check_global_regular",
    "coords_not_found",
    "field_items",
    "field_to_dataarray",
    "find_lat_lon",
    "find_grid",
    "Grid",
    "GRID_KINDS",
    "check_grid",
    "field_points",
    "grid_points",
    "promote_grid_coords",
    "iter_fields",
    "normalize_field",
    "open_climate",
    "parse_sel",
    "regular_latlon",
    "regular_latlon_shape",
    "restore_layout",
    "select_fields",
    "select_variables",
    "SEL_RTOL",
    "SEL_METHODS",
    "NETCDF_FORMATS",
    "portable_encoding",
    "apply_portable_encoding",
    "check_portable_encoding",
    "stack_variables",
    "stack_fields",
    "write_netcdf",
]

# Keys stored in DataArray.encoding so that stack_fields/write_netcdf can undo
# select_fields/iter_fields without polluting the (CF) attrs.
_ENC_DIMS = "mscn_dims"
_ENC_ITEM_DIMS = "mscn_item_dims"
_ENC_GLOBAL_ATTRS = "mscn_global_attrs"
_ENC_TIME = "mscn_time_decoding"
_ENC_FORMAT = "mscn_format"  # the input's netCDF data model (zarr input: NETCDF4)
_ENC_UNLIMITED = "mscn_unlimited_dims"
_ENC_INDEX_DIMS = "mscn_index_dims"  # item dims that had no coordinate in the input
_ENC_PROMOTED = "mscn_promoted_coords"  # lat/lon stored as data variables in the input
_ENC_ITEM_POS = "mscn_item_pos"  # a field's index along the item dims (repeated coord values)
_ENC_REPEATED = "mscn_repeated_dims"  # item dims whose coordinate repeats values (labels)
_ENC_AREA = "mscn_cell_area"  # cell areas (sr) from CF bounds / corners, native flat order

NETCDF_FORMATS = ("NETCDF4", "NETCDF4_CLASSIC", "NETCDF3_64BIT_OFFSET", "NETCDF3_CLASSIC")

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


def _data_model(path: Path, engine: str | None) -> str:
    """The file's netCDF format (reads the header only), so output keeps it."""
    if engine == "zarr":
        return "NETCDF4"
    try:
        import netCDF4

        with netCDF4.Dataset(path) as nc:
            model = str(nc.data_model)
    except Exception:  # noqa: BLE001 - h5netcdf-only or odd files: the netCDF-4 default
        return "NETCDF4"
    if model == "NETCDF3_64BIT_DATA":  # CDF-5: netCDF4 writes it, xarray does not
        return "NETCDF4"
    return model if model in NETCDF_FORMATS else "NETCDF4"


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
            with warnings.catch_warnings():
                if label == "default":  # e.g. dates before 1582: cftime, without a warning
                    warnings.simplefilter("error", xr.SerializationWarning)
                # NCL's "days since 1-1-1" means year 1: nothing to tell the user
                warnings.filterwarnings("ignore", "Ambiguous reference date string")
                ds = xr.open_dataset(p, **kwargs, **extra)
        except Exception as exc:  # noqa: BLE001 - any backend error means "try next"
            if first_error is None:
                first_error = exc
            continue
        ds.encoding[_ENC_TIME] = label
        ds.encoding[_ENC_FORMAT] = _data_model(p, kwargs.get("engine"))
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


EXPECTED_COORDS = (
    "expected a latitude and a longitude coordinate variable (1-D on the field's dims, or "
    "1-D/2-D named by the field's 'coordinates' attribute or stored as variables) with "
    "standard_name latitude/longitude (or grid_latitude/grid_longitude), units "
    "degrees_north/degrees_east (or radians, with lat/lon in the name), axis Y/X, or a name "
    "like lat/latitude/nav_lat/lat2d/clat/TLAT/grid_center_lat/rlat/y and "
    "lon/longitude/nav_lon/lon2d/clon/TLONG/grid_center_lon/rlon/x (or one starting or "
    "ending with lat/lon)")


def _attr_text(attrs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={str(attrs[k])!r}" if k in attrs else f"{k}=none"
                     for k in ("standard_name", "units", "axis"))


def coords_not_found(obj: xr.Dataset | xr.DataArray, problem: str | None = None) -> str:
    """One line saying why no latitude/longitude was found in ``obj``: the file (where
    known), the variables examined (with their dims and ``coordinates`` attribute), every
    candidate coordinate variable examined with its standard_name/units/axis, the dims
    that have no coordinate variable, and what was expected (:data:`EXPECTED_COORDS`).

    Why one builder: every place that gives up on a grid (:func:`find_grid`,
    :func:`find_lat_lon`, variable selection, the xarray accessor) says the same things."""
    src = obj.encoding.get("source")
    if isinstance(obj, xr.Dataset):
        ds = promote_grid_coords(obj)
        skip = _grid_var_names(ds)
        fields = [v for k, v in ds.data_vars.items() if str(k) not in skip] or \
            list(ds.data_vars.values())
        problem = problem or "no data variable on a latitude/longitude grid"
    else:
        fields = [obj]
        problem = problem or f"no latitude/longitude coordinates found for variable {obj.name!r}"
    examined: dict[str, xr.DataArray] = {}
    bare: list[str] = []
    described = []
    for v in fields:
        dims = ", ".join(map(str, v.dims)) or "no dims"
        named = v.encoding.get("coordinates", v.attrs.get("coordinates"))
        described.append(f"{v.name} ({dims}" + (f"; coordinates={str(named)!r}" if named
                                                 else "") + ")")
        for k, c in v.coords.items():
            if c.ndim >= 1 and set(c.dims) <= set(v.dims):
                examined.setdefault(str(k), c)
        bare += [str(d) for d in v.dims if d not in v.coords and str(d) not in bare]
    cands = "; ".join(f"{k} [{', '.join(map(str, c.dims))}] ({_attr_text(c.attrs)})"
                      + ("" if _is_numeric(c) else f" (not numeric: {c.dtype})")
                      for k, c in examined.items()) or "none"
    parts = [f"{src}: " if src else "", problem,
             f"; variables examined: {', '.join(described) or 'none'}",
             f"; coordinate variables examined: {cands}"]
    if bare:
        parts.append(f"; dims without a coordinate variable: {', '.join(bare)}")
    parts.append(f"; {EXPECTED_COORDS}")
    return " ".join("".join(parts).split())


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
        raise ClimateDataError(coords_not_found(
            obj, f"no {' and '.join(missing)} dimension found in {what} with dims {dims}"))
    return lat, lon


# --------------------------------------------------------------------------------------
# any grid on the sphere: find_grid
# --------------------------------------------------------------------------------------

GRID_KINDS = ("regular", "gaussian", "regional", "curvilinear", "unstructured")
_RAD_UNITS = {"radian", "radians", "rad"}
# names real files give 2-D / per-cell coordinates (no CF attributes needed)
_LAT_HINTS = {"lat2d", "tlat", "ulat", "grid_center_lat", "nav_lat", "xlat", "lat_2d",
              "latitude2d", "clat", "lat_cell", "lat_rho"}
_LON_HINTS = {"lon2d", "tlong", "tlon", "ulong", "ulon", "grid_center_lon", "nav_lon", "xlong",
              "xlon", "lon_2d", "longitude2d", "clon", "lon_cell", "lon_rho"}


@dataclass(frozen=True)
class Grid:
    """Where a field's points are: the coordinate variables and horizontal dims.

    ``kind``: "regular" (global, evenly spaced 1-D axes), "gaussian" (global longitudes,
    uneven pole-to-pole latitudes), "regional" (other 1-D lat/lon axes), "curvilinear"
    (2-D lat/lon on 2 dims) or "unstructured" (1-D lat/lon on one cell dim).  ``lat``/
    ``lon`` name the coordinate variables, ``dims`` the horizontal dims (2 names, or 1
    for unstructured; for 1-D axes (lat dim, lon dim)), ``radians`` their unit.
    """

    kind: str
    lat: str
    lon: str
    dims: tuple[str, ...]
    radians: bool = False


def _coord_score(name: str, attrs: Mapping[str, Any], kind: str) -> int:
    """How strongly a coordinate variable looks like latitude/longitude: CF attributes,
    radians with a lat/lon name, then name hints (lat2d, TLAT, grid_center_lat...)."""
    lname = name.lower()
    units = str(attrs.get("units", "")).lower().strip()
    score = _axis_score(name, attrs, kind)
    if units in _RAD_UNITS:
        score = 4 + (4 if kind in lname else 0) if kind in lname else 0
    if lname in (_LAT_HINTS if kind == "lat" else _LON_HINTS):
        score += 3
    if "bnds" in lname or "bounds" in lname or "corner" in lname or "vert" in lname:
        score = min(score, 0)
    return score


def _is_numeric(v: Any) -> bool:
    return np.dtype(v.dtype).kind in "fiu"


def _grid_candidates(da: xr.DataArray) -> dict[str, xr.DataArray]:
    return {str(k): c for k, c in da.coords.items()
            if 1 <= c.ndim <= 2 and set(c.dims) <= set(da.dims) and _is_numeric(c)}


def _pick(cands: Mapping[str, xr.DataArray], kind: str, dims: Sequence[Any]) -> str | None:
    best: tuple[int, int, int] | None = None
    name = None
    for n, c in cands.items():
        s = _coord_score(n, c.attrs, kind)
        if s <= 0:
            continue
        key = (s, int(n in dims), -c.ndim)
        if best is None or key > best:
            best, name = key, n
    return name


def _axis_kind(lat: np.ndarray, lon: np.ndarray) -> str:
    """regular / gaussian / regional for 1-D axes (degrees)."""
    try:
        check_global_regular(lat, lon)
        return "regular"
    except ClimateDataError:
        pass
    try:
        lo_s = np.sort(np.mod(lon, 360.0))
        _regular(lo_s, "longitude", period=360.0)
        la_s = np.sort(lat)
        if la_s[-1] - la_s[0] >= MIN_LAT_SPAN - 1e-6 and np.all(np.diff(la_s) > 0) and \
                np.allclose(la_s, -la_s[::-1], atol=1e-3):
            return "gaussian"
    except ClimateDataError:
        pass
    return "regional"


def find_grid(obj: xr.DataArray | xr.Dataset) -> Grid:
    """The grid of a field (or of the first gridded variable of a Dataset).

    Why one finder: regular, Gaussian, regional, curvilinear and unstructured grids all
    reduce to "a lat and a lon coordinate variable on the field's dims".  CF attributes
    win (standard_name, units degrees_north/east, axis), then radians with a lat/lon
    name, then names (lat2d, TLAT, grid_center_lat, nav_lat...).  Raises
    :class:`ClimateDataError` when no pair is found.
    """
    if isinstance(obj, xr.Dataset):
        ds = promote_grid_coords(obj)
        for v in ds.data_vars.values():
            try:
                return find_grid(v)
            except ClimateDataError:
                continue
        raise ClimateDataError(coords_not_found(obj))
    cands = _grid_candidates(obj)
    lat, lon = _pick(cands, "lat", obj.dims), _pick(cands, "lon", obj.dims)
    what = f"variable {obj.name!r}"
    if lat is None or lon is None or lat == lon:
        missing = [k for k, n in (("lat", lat), ("lon", lon)) if n is None] or \
            [f"separate lat and lon ({lat!r} looks like both)"]
        raise ClimateDataError(coords_not_found(
            obj, f"no {' and '.join(missing)} coordinates found in {what} with dims "
                 f"{list(obj.dims)}"))
    la, lo = obj.coords[lat], obj.coords[lon]
    radians = is_radians(la.attrs)
    if la.ndim == 1 and lo.ndim == 1:
        if la.dims == lo.dims:
            return Grid("unstructured", lat, lon, (str(la.dims[0]),), radians)
        a = np.asarray(la.values, dtype=np.float64)
        b = np.asarray(lo.values, dtype=np.float64)
        if radians:
            a, b = np.degrees(a), np.degrees(b)
        kind = _axis_kind(a, b) if np.isfinite(a).all() and np.isfinite(b).all() \
            else "regional"
        return Grid(kind, lat, lon, (str(la.dims[0]), str(lo.dims[0])), radians)
    if la.ndim == 2 and lo.ndim == 2 and la.dims == lo.dims:
        return Grid("curvilinear", lat, lon, tuple(map(str, la.dims)), radians)
    raise ClimateDataError(f"{what}: latitude {lat!r} {list(la.dims)} and longitude {lon!r} "
                           f"{list(lo.dims)} do not form a grid")


def is_radians(attrs: Mapping[str, Any]) -> bool:
    """Whether a latitude coordinate's ``units`` say radians (as :func:`find_grid` decides)."""
    return str(attrs.get("units", "")).lower().strip() in _RAD_UNITS


GRID_HASH_TAG = b"mscn-grid-1\0"  # versions the canonical form below


def grid_sha256(lat: xr.Variable | xr.DataArray, lon: xr.Variable | xr.DataArray) -> str:
    """sha256 (hex) of a horizontal grid in a canonical form: each coordinate's dims and
    shape (JSON), then its values as float64 little-endian, in degrees (radians per
    :func:`is_radians` of ``lat``, as :func:`find_grid` decides), in the file's own order
    (each variable's own dims, not the field's). Names and attributes are not in it, so a
    grid file written by another tool with the same points has the same hash.

    Why: a stream that references its grid (``grid_storage="reference"``) names it by
    this hash, and decoding checks a grid file against it before using its points."""
    radians = is_radians(lat.attrs)
    h = hashlib.sha256(GRID_HASH_TAG)
    h.update(json.dumps([{"dims": [str(d) for d in v.dims], "shape": [int(n) for n in v.shape]}
                         for v in (lat, lon)], separators=(",", ":")).encode() + b"\0")
    for v in (lat, lon):
        a = np.asarray(v.values, dtype=np.float64)
        if radians:
            a = np.degrees(a)
        h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()


def _bounds_names(ds: xr.Dataset) -> set[str]:
    return {str(v.attrs.get("bounds", v.encoding.get("bounds", "")))
            for v in ds.variables.values()} - {""}


def _grid_var_names(ds: xr.Dataset) -> set[str]:
    """Data variables that describe the grid, not fields: lat/lon stored as variables,
    bounds, corners, Gaussian weights."""
    out = set(_bounds_names(ds))
    for name, v in ds.data_vars.items():
        n = str(name)
        low = n.lower()
        if low in ("gw", "grid_dims", "interp_indx") or "corner" in low or low.endswith(
                ("_bnds", "_bounds", "_vertices")):
            out.add(n)
            continue
        if _is_numeric(v) and 1 <= v.ndim <= 2 and _geo(n, v):
            others = [(str(k), w) for k, w in ds.data_vars.items() if k != name and w.ndim > 0]
            if any(set(v.dims) <= set(w.dims) and w.ndim > v.ndim or
                   set(v.dims) <= set(w.dims) and v.ndim == 2 for _, w in others):
                out.add(n)
                continue
            # an unstructured grid whose fields are 1-D too (one time selected): a lat and
            # a lon on the dim of a field that is neither
            kind = "lon" if _coord_score(n, v.attrs, "lat") > 0 else "lat"
            if v.ndim == 1 and any(w.dims == v.dims and _coord_score(k, w.attrs, kind) > 0
                                   for k, w in others) and any(
                    w.dims == v.dims and not _geo(k, w) for k, w in others):
                out.add(n)
    return out


def _geo(name: str, v: xr.DataArray) -> bool:
    return _coord_score(name, v.attrs, "lat") > 0 or _coord_score(name, v.attrs, "lon") > 0


def promote_grid_coords(ds: xr.Dataset) -> xr.Dataset:
    """Lat/lon stored as data variables become coordinates (so each field carries them);
    the names are kept in the Dataset's encoding to write them back as variables."""
    if ds.encoding.get(_ENC_PROMOTED) is not None:
        return ds
    names = [n for n in _grid_var_names(ds) if n in ds.data_vars and n not in _bounds_names(ds)
             and (_coord_score(n, ds[n].attrs, "lat") > 0 or _coord_score(n, ds[n].attrs,
                                                                          "lon") > 0)]
    out = ds.set_coords(names) if names else ds.copy()
    out.encoding = dict(ds.encoding)
    out.encoding[_ENC_PROMOTED] = tuple(sorted(names))
    return out


def check_grid(field: xr.DataArray, grid: Grid | None = None) -> Grid:
    """Refuse grids whose points the codec cannot use, in one line naming the variable:
    NaN coordinates, latitudes outside ±90, duplicate points (1-D axes: a repeated value,
    except one repeated cyclic longitude column; unstructured: a repeated cell).
    Curvilinear grids may repeat points (fold and halo columns of ocean grids)."""
    grid = grid or find_grid(field)
    la = np.asarray(field.coords[grid.lat].values, dtype=np.float64)
    lo = np.asarray(field.coords[grid.lon].values, dtype=np.float64)
    if grid.radians:
        la, lo = np.degrees(la), np.degrees(lo)
    what = f"field {field.name!r}"
    src = field.encoding.get("source")
    if src:
        what = f"{src}: {what}"
    if not (np.isfinite(la).all() and np.isfinite(lo).all()):
        raise ClimateDataError(f"{what}: coordinates {grid.lat}/{grid.lon} contain NaN/inf")
    if la.size and (la.min() < -90 - 1e-6 or la.max() > 90 + 1e-6):
        unit = (f" degrees (units radians: {np.radians(la.min()):g}..{np.radians(la.max()):g})"
                if grid.radians else "")
        raise ClimateDataError(f"{what}: latitude {grid.lat} values {la.min():g}..{la.max():g}"
                               f"{unit} outside [-90, 90]")
    if grid.kind in ("gaussian", "regional"):
        if np.unique(la).size != la.size:
            raise ClimateDataError(f"{what}: latitude {grid.lat} has duplicate values")
        lo_m = np.mod(lo, 360.0)
        ndup = lo_m.size - np.unique(lo_m).size
        cyclic = ndup == 1 and lo.size > 2 and abs(abs(lo[-1] - lo[0]) - 360.0) < 1e-6
        if ndup and not cyclic:
            raise ClimateDataError(f"{what}: longitude {grid.lon} has duplicate values")
    elif grid.kind == "unstructured":
        pts = np.stack([np.round(la, 9), np.round(np.mod(lo, 360.0), 9)], axis=1)
        pts[np.abs(pts[:, 0]) >= 90 - 1e-9, 1] = 0.0  # every longitude is the pole
        if np.unique(pts, axis=0).shape[0] != pts.shape[0]:
            raise ClimateDataError(f"{what}: duplicate points in {grid.lat}/{grid.lon}")
    return grid


def grid_points(field: xr.DataArray, grid: Grid | None = None
                ) -> tuple[np.ndarray, np.ndarray, Grid]:
    """(lat, lon) in degrees of every value of ``field``, flat in the field's own C order
    (why: the signal of a non-regular grid is its points in native order)."""
    grid = check_grid(field, grid)
    la = field.coords[grid.lat].variable
    lo = field.coords[grid.lon].variable
    hdims = [d for d in field.dims if d in grid.dims]
    shape = tuple(field.sizes[d] for d in hdims)
    out = []
    for v in (la, lo):
        v = v.set_dims({d: field.sizes[d] for d in hdims}).transpose(*hdims)
        a = np.broadcast_to(np.asarray(v.values, dtype=np.float64), shape).reshape(-1)
        out.append(np.degrees(a) if grid.radians else a)
    return out[0], out[1], grid


def field_points(field: xr.DataArray) -> tuple[np.ndarray, np.ndarray, np.ndarray, Grid]:
    """(values, lat, lon, grid), all flat in the field's own order; NaN stays NaN.

    Why: any grid kind becomes "values at points on the sphere" without reordering, so
    decoding restores the layout by a reshape.  All-NaN or inf fields are refused.
    """
    lat, lon, grid = grid_points(field)
    extra = [d for d in field.dims if d not in grid.dims]
    if extra:
        raise ClimateDataError(f"field {field.name!r} has dims {list(field.dims)}; expected "
                               f"only {list(grid.dims)} - use iter_fields() to split item dims")
    vals = np.asarray(field.values)
    if not (np.issubdtype(vals.dtype, np.number) or vals.dtype == bool):
        raise ClimateDataError(f"field {field.name!r} has non-numeric dtype {vals.dtype}")
    vals = vals.astype(np.float64).reshape(-1)
    if not np.isfinite(vals).any():
        raise ClimateDataError(f"field {field.name!r} {_item_label(field)} is all NaN")
    if np.isinf(vals).any():
        raise ClimateDataError(f"field {field.name!r} {_item_label(field)} contains inf")
    return vals, lat, lon, grid


def _corner_names(ds: xr.Dataset, grid: Grid) -> tuple[str, str] | None:
    """The variables holding the cell corners of ``grid``: CF ``bounds`` of the lat/lon
    coordinates, else ``<lat>`` with center -> corner (SCRIP: grid_corner_lat)."""
    la, lo = ds[grid.lat], ds[grid.lon]
    names = (la.attrs.get("bounds", la.encoding.get("bounds")),
             lo.attrs.get("bounds", lo.encoding.get("bounds")))
    if all(isinstance(n, str) and n in ds.variables for n in names):
        return str(names[0]), str(names[1])
    scrip = (grid.lat.replace("center", "corner"), grid.lon.replace("center", "corner"))
    if "center" in grid.lat and all(n in ds.variables for n in scrip):
        return scrip
    return None


def cell_areas(ds: xr.Dataset, grid: Grid, field: xr.DataArray) -> np.ndarray | None:
    """Solid angle (sr) of every cell of a curvilinear/unstructured grid, flat in the
    field's own order, from CF bounds or SCRIP corners (fan of spherical triangles);
    None without corners or when they are unusable (why: ocean and geodesic cells vary in
    size, so an area-weighted error needs their areas; cos(lat) only suits 1-D grids)."""
    if grid.kind not in ("curvilinear", "unstructured"):
        return None
    names = _corner_names(ds, grid)
    if names is None:
        return None
    try:
        hdims = [str(d) for d in field.dims if d in grid.dims]
        cb = []
        for n in names:
            v = ds[n].variable
            extra = [d for d in v.dims if d not in hdims]
            if len(extra) != 1 or v.ndim != len(hdims) + 1:
                return None
            a = np.asarray(v.transpose(*hdims, extra[0]).values, dtype=np.float64)
            cb.append(a.reshape(-1, a.shape[-1]))
        lat, lon = cb
        if not grid.radians:
            lat, lon = np.radians(lat), np.radians(lon)
        xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)
        area = np.zeros(xyz.shape[0])
        a = xyz[:, 0]
        for i in range(1, xyz.shape[1] - 1):
            b, c = xyz[:, i], xyz[:, i + 1]
            num = np.abs(np.einsum("ij,ij->i", a, np.cross(b, c)))
            den = 1 + np.einsum("ij,ij->i", a, b) + np.einsum("ij,ij->i", b, c) + \
                np.einsum("ij,ij->i", c, a)
            area += 2 * np.arctan2(num, den)
    except (KeyError, ValueError):
        return None
    if not np.isfinite(area).all() or area.sum() <= 0:
        return None
    return area


def native_regular(grid: Grid) -> bool:
    """True when the field takes the historic regular path (1-D dimension coordinates)."""
    return grid.kind == "regular" and grid.lat == grid.dims[0] and grid.lon == grid.dims[1] \
        and not grid.radians


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

# Exact selection: a numeric coordinate value c matches an asked value w when
# |c - w| <= SEL_RTOL * max(1, |w|) (forgives 850 vs 850.0000001, not 700 vs 850).
SEL_RTOL = 1e-6
SEL_METHODS = ("exact", "nearest")


def _resolve_sel_key(da: xr.DataArray, key: str) -> str | None:
    """The dimension (or scalar coordinate) of ``da`` that ``key`` names, else None."""
    if key in da.dims:
        return key
    if key in da.coords and da[key].ndim == 0:
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
    return None


def _fmt_value(v: Any) -> str:
    """A coordinate value as a user would type it (850, 2.5, 2017-01-01T12:00:00)."""
    if isinstance(v, np.datetime64):
        return "NaT" if np.isnat(v) else pd.Timestamp(v).isoformat()
    if isinstance(v, np.timedelta64):
        return "NaT" if np.isnat(v) else str(pd.Timedelta(v))
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.10g}"
    if _is_cftime(v):
        return str(v.isoformat())
    return str(v)


def _available(vals: np.ndarray) -> str:
    flat = np.asarray(vals).ravel()
    shown = ", ".join(_fmt_value(v) for v in flat[:10])
    return f"[{shown}{', ...' if flat.size > 10 else ''}] ({flat.size} values)"


def _is_cftime(v: Any) -> bool:
    return type(v).__module__.split(".")[0] == "cftime"


_ISO = re.compile(
    r"^\s*(-?\d{1,4})-(\d{1,2})(?:-(\d{1,2}))?"
    r"(?:[T ](\d{1,2})(?::(\d{1,2})(?::(\d{1,2})(?:\.(\d{1,6}))?)?)?)?\s*$"
)


def _cftime_value(text: Any, like: Any, dim: str) -> Any:
    """``text`` (ISO date) as a cftime date in the calendar of ``like``."""
    m = _ISO.match(str(text))
    if not isinstance(text, str) or m is None:
        raise ClimateDataError(
            f"selection {dim}={text!r}: {dim} is a date coordinate; give an ISO date "
            "like 2017-01-01T12:00"
        )
    y, mo, d, h, mi, s, us = (int(x) if x else 0 for x in m.groups())
    try:
        return type(like)(y, mo, d or 1, h, mi, s, us, calendar=like.calendar)
    except (ValueError, TypeError) as err:
        raise ClimateDataError(f"selection {dim}={text!r}: not a date here ({err})") from None


def _sel_keys(vals: np.ndarray, w: Any, dim: str) -> tuple[np.ndarray, float, str]:
    """Coordinate values and the asked one as comparable numbers, and the kind of axis.

    Kinds: "num" (relative tolerance applies), "time" (exact instants; a string is one
    instant, never pandas' partial-string range), "str" (exact text).
    """
    kind = vals.dtype.kind
    if kind in "iuf":
        if isinstance(w, bool) or not isinstance(w, int | float | np.integer | np.floating):
            raise ClimateDataError(
                f"selection {dim}={w!r}: {dim} is numeric; {dim} values: {_available(vals)}"
            )
        return vals.astype(np.float64), float(w), "num"
    if kind in "Mm":
        unit = "datetime64[ns]" if kind == "M" else "timedelta64[ns]"
        if isinstance(w, bool | int | float | np.number):
            raise ClimateDataError(
                f"selection {dim}={w!r}: {dim} is a {'date' if kind == 'M' else 'duration'} "
                "coordinate; give e.g. 2017-01-01T12:00" + ("" if kind == "M" else " or 6h")
            )
        try:
            t = (pd.Timestamp(w) if kind == "M" else pd.Timedelta(w)).to_numpy()
        except (ValueError, TypeError, OverflowError) as err:
            raise ClimateDataError(f"selection {dim}={w!r}: not a time ({err})") from None
        if kind == "M" and pd.Timestamp(w).tzinfo is not None:
            t = pd.Timestamp(w).tz_convert(None).to_numpy()
        x = vals.astype(unit).astype(np.int64).astype(np.float64)
        return x, float(np.asarray(t).astype(unit).astype(np.int64)), "time"
    if vals.size and _is_cftime(vals.flat[0]):
        target = _cftime_value(w, vals.flat[0], dim)
        x = np.array([(v - target).total_seconds() for v in vals.ravel()], dtype=np.float64)
        return x, 0.0, "time"
    text = np.array([str(v) for v in vals.ravel()], dtype=object)
    return (text == str(w)).astype(np.float64) * -1.0, -1.0, "str"


def _match(vals: np.ndarray, w: Any, dim: str, method: str, what: str,
           notes: set[str]) -> int:
    """Index of the coordinate value that the asked value ``w`` selects."""
    x, t, kind = _sel_keys(vals, w, dim)
    if x.size == 0:
        raise ClimateDataError(f"selection {dim}={_fmt_value(w)} on {what}: {dim} is empty")
    dist = np.abs(x - t)
    i = int(np.nanargmin(dist)) if np.isfinite(dist).any() else 0
    tol = SEL_RTOL * max(1.0, abs(t)) if kind == "num" else 0.0
    if dist[i] <= tol:
        return i
    if method == "nearest" and kind != "str":
        uniq = np.unique(x[np.isfinite(x)])
        spacing = float(np.min(np.diff(uniq))) if uniq.size > 1 else 0.0
        if dist[i] <= max(0.5 * spacing, tol):
            note = f"{dim}={_fmt_value(w)}: nearest is {_fmt_value(vals.ravel()[i])}"
            if note not in notes:
                notes.add(note)
                warnings.warn(note, UserWarning, stacklevel=4)
            return i
        raise ClimateDataError(
            f"selection {dim}={_fmt_value(w)} on {what} matches nothing (nearest "
            f"{_fmt_value(vals.ravel()[i])} is more than half a spacing away); "
            f"{dim} values: {_available(vals)}"
        )
    how = (f"exact match within {SEL_RTOL:g} relative" if kind == "num"
           else "exact match")
    raise ClimateDataError(
        f"selection {dim}={_fmt_value(w)} matches no {dim} value of {what} ({how}); "
        f"{dim} values: {_available(vals)}"
    )


def _sel_one(da: xr.DataArray, dim: str, value: Any, method: str,
             notes: set[str]) -> xr.DataArray:
    many = isinstance(value, list | tuple)
    wanted = list(value) if many else [value]
    what = repr(str(da.name))
    if dim not in da.dims:  # a scalar coordinate: selected already (e.g. a written recon)
        vals = np.atleast_1d(da[dim].values)
        for w in wanted:
            _match(vals, w, dim, method, what, notes)
        return da
    if dim not in da.coords:
        n = da.sizes[dim]
        if all(isinstance(w, int) and not isinstance(w, bool) and -n <= w < n for w in wanted):
            return da.isel({dim: wanted if many else wanted[0]})
        raise ClimateDataError(
            f"selection {dim}={value!r} on {what}: {dim!r} has no coordinate; select it by "
            f"integer index 0..{n - 1}"
        )
    vals = np.asarray(da[dim].values)
    idx = [_match(vals, w, dim, method, what, notes) for w in wanted]
    return da.isel({dim: idx if many else idx[0]})


def _gridded_variables(ds: xr.Dataset) -> list[str]:
    """Data variables on a lat/lon grid, in file order; CF cell bounds are not fields."""
    ds = promote_grid_coords(ds)
    skip = _grid_var_names(ds)
    out = []
    for name, v in ds.data_vars.items():
        if str(name) in skip:
            continue
        try:
            find_grid(v)
        except ClimateDataError:
            continue
        out.append(str(name))
    return out


def _variable_names(ds: xr.Dataset, var: str | Sequence[str] | None) -> list[str]:
    if var is None:
        names = _gridded_variables(ds)
        if not names:
            raise ClimateDataError(coords_not_found(ds))
        return names
    names = [var] if isinstance(var, str) else list(dict.fromkeys(var))
    if not names:
        raise ClimateDataError("no variable chosen (empty list)")
    for name in names:
        if not isinstance(name, str) or name not in ds.data_vars:
            src = ds.encoding.get("source", "dataset")
            raise ClimateDataError(
                f"variable {name!r} not found in {src}; available variables: "
                f"{sorted(map(str, ds.data_vars))}"
            )
    return names


def _prepare(da: xr.DataArray, ds: xr.Dataset | None) -> xr.DataArray:
    da = da.copy(deep=False)  # own encoding dict: do not touch the Dataset's
    if ds is not None:
        da.encoding[_ENC_GLOBAL_ATTRS] = dict(ds.attrs)
        promoted = [n for n in ds.encoding.get(_ENC_PROMOTED, ()) if n in da.coords]
        if promoted:
            da.encoding[_ENC_PROMOTED] = tuple(promoted)
        for key in (_ENC_FORMAT,):
            if key in ds.encoding:
                da.encoding[key] = ds.encoding[key]
        unlimited = ds.encoding.get("unlimited_dims") or ()
        da.encoding[_ENC_UNLIMITED] = tuple(str(d) for d in ds.dims if d in unlimited)
    return da


def _horizontal(da: xr.DataArray) -> tuple[str, ...]:
    """The field's horizontal dims in the order a field keeps them: (lat, lon) on the
    regular path, the file's own order on any other grid."""
    try:
        grid = find_grid(da)
    except ClimateDataError as err:
        try:  # lat/lon dims named so but without coordinate values: said later, precisely
            return find_lat_lon(da)
        except ClimateDataError:
            raise err from None  # the coordinate variables examined, not only the dims
    if native_regular(grid):
        return grid.dims
    return tuple(str(d) for d in da.dims if d in grid.dims)


def _finish(da: xr.DataArray) -> xr.DataArray:
    hdims = _horizontal(da)
    others = [d for d in da.dims if d not in hdims]
    da = da.transpose(*others, *hdims)
    da.encoding[_ENC_DIMS] = tuple(map(str, da.dims))
    da.encoding[_ENC_ITEM_DIMS] = tuple(map(str, others))
    return da


def select_variables(
    ds: xr.Dataset | xr.DataArray,
    var: str | Sequence[str] | None = None,
    sel: Mapping[str, Any] | Sequence[str] | None = None,
    sel_method: str = "exact",
) -> list[xr.DataArray]:
    """Choose variables and an item selection; one (..., lat, lon) DataArray per variable.

    Why: a file holds several variables and item dims (members, times, levels); the
    codec sees each variable as a stack of 2-D fields.  ``var=None`` takes every data
    variable on a lat/lon grid in file order; a string or list takes those (duplicates
    dropped).  Each selection applies to every chosen variable with that dimension; one
    that no chosen variable has is an error.  ``sel_method="exact"`` (default): numeric
    values match within ``SEL_RTOL`` (1e-6) relative to max(1, |value|), dates and
    strings match exactly, else :class:`ClimateDataError` lists the available values.
    ``"nearest"`` takes the nearest value (no farther than half a spacing) and warns
    ``"isobaricInhPa=700: nearest is 850"`` when it differs.
    """
    if sel_method not in SEL_METHODS:
        raise ClimateDataError(f"sel_method must be one of {SEL_METHODS}, got {sel_method!r}")
    if isinstance(ds, xr.DataArray):
        arrays = [_prepare(ds, None)]
    else:
        ds = promote_grid_coords(ds)
        arrays = [_prepare(ds[name], ds) for name in _variable_names(ds, var)]
    grids = [_horizontal(a) for a in arrays]
    if sel and not isinstance(sel, Mapping):
        sel = parse_sel(list(sel))
    notes: set[str] = set()
    for key, value in (sel or {}).items():
        used = False
        for i, (a, hdims) in enumerate(zip(arrays, grids, strict=True)):
            dim = _resolve_sel_key(a, str(key))
            if dim is None:
                continue
            if dim in hdims:
                raise ClimateDataError(
                    f"cannot select on {dim!r}: fields must stay global lat/lon grids"
                )
            arrays[i] = _sel_one(a, dim, value, sel_method, notes)
            used = True
        if not used:
            dims = {str(a.name): list(map(str, a.dims)) for a in arrays}
            raise ClimateDataError(
                f"cannot select {str(key)!r}: no chosen variable has it (dims: {dims})"
            )
    return [_finish(a) for a in arrays]


def select_fields(
    ds: xr.Dataset | xr.DataArray,
    var: str | Sequence[str] | None = None,
    sel: Mapping[str, Any] | Sequence[str] | None = None,
    sel_method: str = "exact",
) -> xr.DataArray:
    """One variable as a (..., lat, lon) DataArray; see :func:`select_variables`.

    Why one: callers that handle a single variable (viewers, the accessor) should not
    get a list.  ``var=None`` with several gridded variables is an error naming them.
    """
    if isinstance(ds, xr.Dataset):
        names = _variable_names(ds, var)
        if len(names) > 1:
            raise ClimateDataError(
                f"several gridded variables {names}; choose one with var=... "
                "(select_variables/field_items take them all)"
            )
        var = names[0]
    return select_variables(ds, var, sel, sel_method)[0]


def iter_fields(da: xr.DataArray) -> Iterator[xr.DataArray]:
    """Yield every 2-D (lat, lon) field, in C order over the item dims.

    Each field keeps the item dims as scalar coords (e.g. number=3, time=...,
    isobaricInhPa=850) so its identity travels with it and :func:`stack_fields` can
    rebuild the original array.  Item dims without a coordinate get an integer index
    coordinate (0..n-1) so that the identity is still known; stack_fields drops it again.
    """
    hdims = _horizontal(da)
    item_dims = [str(d) for d in da.dims if d not in hdims]
    missing = {d: np.arange(da.sizes[d]) for d in item_dims if d not in da.coords}
    index_dims = tuple(da.encoding.get(_ENC_INDEX_DIMS, ())) + tuple(missing)
    if missing:
        enc = dict(da.encoding)
        da = da.assign_coords(missing)
        da.encoding = enc
    dims_order = da.encoding.get(_ENC_DIMS, tuple(map(str, da.dims)))
    shape = [da.sizes[d] for d in item_dims]
    # a coordinate that repeats values (SEAM's time: all the netCDF default fill) cannot
    # tell fields apart: each field then carries its position
    repeated = tuple(d for d in item_dims
                     if not pd.Index(np.asarray(da[d].values).ravel()).is_unique)
    for idx in np.ndindex(*shape):
        field = da.isel(dict(zip(item_dims, idx, strict=True)))
        if repeated:
            field.encoding[_ENC_ITEM_POS] = tuple(int(i) for i in idx)
            field.encoding[_ENC_REPEATED] = repeated
        field.encoding[_ENC_ITEM_DIMS] = tuple(item_dims)
        field.encoding[_ENC_DIMS] = tuple(dims_order)
        if index_dims:
            field.encoding[_ENC_INDEX_DIMS] = index_dims
        yield field


def field_items(
    paths: Iterable[str | os.PathLike[str]],
    var: str | Sequence[str] | None = None,
    sel: Mapping[str, Any] | Sequence[str] | None = None,
    sel_method: str = "exact",
) -> list[xr.DataArray]:
    """All 2-D fields of the chosen variables (after ``sel``) from several files, loaded.

    ``var``/``sel``/``sel_method`` as in :func:`select_variables` (``var=None``: every
    gridded variable).  Fields come file by file, variable by variable in the chosen
    order; each keeps its own variable's attrs and encoding.
    """
    out: list[xr.DataArray] = []
    for path in paths:
        with open_climate(path) as ds:
            for da in select_variables(ds, var=var, sel=sel, sel_method=sel_method):
                try:  # load now: a damaged file fails here, before any expensive work
                    da = da.load()
                except (RuntimeError, OSError) as err:  # netCDF4/HDF5: "NetCDF: HDF error"
                    raise ClimateDataError(f"{path}: cannot read variable {da.name}: {err} "
                                           "(corrupted file?)") from None
                fields = list(iter_fields(da))
                try:
                    grid = find_grid(fields[0]) if fields else None
                except ClimateDataError:
                    grid = None
                area = cell_areas(ds, grid, fields[0]) if grid is not None else None
                for f in fields:
                    f.encoding["source"] = f.encoding.get("source", str(path))
                    if area is not None:
                        f.encoding[_ENC_AREA] = area
                out.extend(fields)
    return out


def scan_fields(
    path: str | os.PathLike[str],
    label: Callable[[xr.DataArray], str],
    var: str | Sequence[str] | None = None,
    sel: Mapping[str, Any] | Sequence[str] | None = None,
    sel_method: str = "exact",
) -> list[tuple[tuple[str, str, int], str]]:
    """``((path, variable, n), label(field))`` for every field :func:`field_items` returns
    from ``path``, in the same order, reading coordinates only (no values).

    Why: an archive of many files is listed cheaply; :func:`load_field` reads the n-th
    field of a variable later, when a training step asks for it. A bad ``var``/``sel``
    fails here, before any training.
    """
    out = []
    with open_climate(path) as ds:
        for da in select_variables(ds, var=var, sel=sel, sel_method=sel_method):
            for n, f in enumerate(iter_fields(da)):
                out.append(((str(path), str(da.name), n), label(f)))
    return out


def load_field(
    ds: xr.Dataset,
    path: str | os.PathLike[str],
    name: str,
    n: int,
    sel: Mapping[str, Any] | Sequence[str] | None = None,
    sel_method: str = "exact",
) -> xr.DataArray:
    """The ``n``-th field of variable ``name`` of the open ``ds`` (opened from ``path``),
    equal in values, coordinates and encoding to that item of :func:`field_items`; only
    its own values are read (lazy indexing / dask chunks)."""
    with warnings.catch_warnings():  # a nearest selection already said so when scanned
        warnings.simplefilter("ignore")
        (da,) = select_variables(ds, var=name, sel=sel, sel_method=sel_method)
    f = next(itertools.islice(iter_fields(da), n, None), None)
    if f is None:
        raise ClimateDataError(f"{path}: variable {name} has no field {n} (file changed "
                               "since it was listed?)")
    try:
        f = f.load()
    except (RuntimeError, OSError) as err:  # netCDF4/HDF5: "NetCDF: HDF error"
        raise ClimateDataError(f"{path}: cannot read variable {name}: {err} "
                               "(corrupted file?)") from None
    try:
        grid = find_grid(f)
    except ClimateDataError:
        grid = None
    area = cell_areas(ds, grid, f) if grid is not None else None
    f.encoding["source"] = f.encoding.get("source", str(path))
    if area is not None:
        f.encoding[_ENC_AREA] = area
    return f


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
    """Where a field sits: its scalar coordinates as a user would type them
    (``at time=2017-01-01T00:00:00, isobaricInhPa=850``; dates in ISO form, not
    nanoseconds)."""
    scal = [f"{k}={_fmt_value(np.asarray(v.values)[()])}" for k, v in field.coords.items()
            if v.ndim == 0]
    return f"at {', '.join(scal)}" if scal else ""


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
    grid = find_grid(template_field2d)
    if not native_regular(grid):
        return _regular_like(v, lat_a, lon_a, template_field2d)
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
    # the file's format, fill values, packing and compression hold on any grid
    da.encoding.update({k: v for k, v in template_field2d.encoding.items()
                        if k.startswith("mscn_") or k in _VAR_ENC and k != "chunksizes"})
    for d in (tlat, tlon):
        if d in template_field2d.coords:
            da[d].encoding = {k: v for k, v in template_field2d[d].encoding.items()
                              if k in ("dtype", "_FillValue")}
    return da


def _regular_like(values: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                  template: xr.DataArray) -> xr.DataArray:
    """Values on a regular (lat, lon) grid, named ``lat``/``lon`` with CF attributes, with
    the template's name, attrs, scalar item coords and value encoding (why: a non-regular
    input written at ``--resolution`` is a plain global grid, not its native layout)."""
    data = values.astype(template.dtype) if np.issubdtype(template.dtype, np.floating) \
        else values
    coords: dict[str, Any] = {
        "lat": ("lat", lat, {"standard_name": "latitude", "long_name": "latitude",
                             "units": "degrees_north", "axis": "Y"}),
        "lon": ("lon", lon, {"standard_name": "longitude", "long_name": "longitude",
                             "units": "degrees_east", "axis": "X"})}
    for name, c in template.coords.items():
        if c.ndim == 0 and str(name) not in coords:
            coords[str(name)] = c.variable.copy()
    da = xr.DataArray(data, dims=("lat", "lon"), coords=coords, name=template.name,
                      attrs=dict(template.attrs))
    enc = {k: v for k, v in template.encoding.items()
           if (k.startswith("mscn_") or k in _VAR_ENC) and k != "chunksizes"
           and k not in (_ENC_DIMS, _ENC_PROMOTED)}
    da.encoding.update(enc)
    return da


# --------------------------------------------------------------------------------------
# stacking and writing
# --------------------------------------------------------------------------------------


def _scalar_key(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item() if not isinstance(v, np.datetime64 | np.timedelta64) else v
    return v


def _infer_item_dims(fields: list[xr.DataArray]) -> tuple[str, ...]:
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
    hdims = tuple(str(d) for d in first.dims if d in _horizontal(first))
    for f in fields:
        if set(f.dims) != set(hdims):
            raise ClimateDataError(f"field with dims {list(f.dims)} is not a {hdims} field")
    if item_dims is None:
        item_dims = first.encoding.get(_ENC_ITEM_DIMS)
        if item_dims is None:
            item_dims = _infer_item_dims(fields)
    item_dims = tuple(item_dims)
    for d in item_dims:
        if any(d not in f.coords or f[d].ndim != 0 for f in fields):
            raise ClimateDataError(f"item dim {d!r} is not a scalar coord of every field")

    # unique values per item dim, in order of first appearance
    uniq: dict[str, list[Any]] = {d: [] for d in item_dims}
    pos: dict[str, dict[Any, int]] = {d: {} for d in item_dims}
    index_of: list[tuple[int, ...]] = []
    given = [f.encoding.get(_ENC_ITEM_POS) for f in fields]
    if item_dims and all(isinstance(p, list | tuple) and len(p) == len(item_dims)
                         for p in given):  # positions iter_fields recorded (repeated values)
        index_of = [tuple(int(i) for i in p) for p in given]  # type: ignore[union-attr]
        shape = tuple(max(p[k] for p in index_of) + 1 for k in range(len(item_dims)))
        for k, d in enumerate(item_dims):
            vals: list[Any] = [None] * shape[k]
            for f, idx in zip(fields, index_of, strict=True):
                vals[idx[k]] = f[d].values[()]
            if any(v is None for v in vals):
                raise ClimateDataError(f"{len(fields)} fields do not fill the {shape} grid "
                                       f"over {item_dims}; some items are missing")
            uniq[d] = vals
    else:
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
    gshape = tuple(first.sizes[d] for d in hdims)
    data = np.empty(shape + gshape, dtype=first.dtype)
    for f, idx in zip(fields, index_of, strict=True):
        if tuple(f.sizes[d] for d in hdims) != gshape:
            raise ClimateDataError("fields have different grid sizes; cannot stack")
        data[idx] = f.transpose(*hdims).values

    coords: dict[str, Any] = {}
    for d in item_dims:
        c0 = first[d]
        coords[d] = xr.Variable(d, np.array(uniq[d], dtype=c0.dtype), c0.attrs, c0.encoding)
    for d in hdims:
        if d in first.coords:  # a dim without coordinate variable stays without one
            coords[d] = first[d].variable.copy()
    for name, c in first.coords.items():  # e.g. 2-D lat/lon of a curvilinear grid
        if c.ndim and str(name) not in coords and set(c.dims) <= set(hdims):
            coords[str(name)] = c.variable.copy()
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
        dims=item_dims + hdims,
        coords=coords,
        name=first.name,
        attrs=dict(first.attrs),
    )
    dims_order = first.encoding.get(_ENC_DIMS)
    if dims_order and set(dims_order) == set(da.dims):
        da = da.transpose(*dims_order)
    synthetic = [d for d in first.encoding.get(_ENC_INDEX_DIMS, ()) if d in da.coords]
    if synthetic:  # index coords iter_fields made up: the input had none
        da = da.drop_vars(synthetic)
    da.encoding.update({k: v for k, v in first.encoding.items() if k.startswith("mscn_")})
    for k in _VAR_ENC + ("coordinates",):
        if k in first.encoding:
            da.encoding[k] = first.encoding[k]
    return da


def _nan_ok(arr: np.ndarray) -> bool:
    return np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating)


def stack_variables(fields: Sequence[xr.DataArray]) -> list[xr.DataArray]:
    """Fields of several variables -> one stacked N-D DataArray per variable.

    Why: field_items returns the fields of every chosen variable in one list; writing
    them back needs one array per variable (in order of first appearance).
    """
    groups: dict[str, list[xr.DataArray]] = {}
    for f in fields:
        groups.setdefault(str(f.name), []).append(f)
    out = []
    for group in groups.values():
        try:
            out.append(stack_fields(group))
        except ClimateDataError:
            if len(group) > 1:
                raise
            out.append(group[0])  # one field without item identity: nothing to stack
    return out


# encoding keys kept for data variables and for coordinates
_VAR_ENC = ("dtype", "_FillValue", "missing_value", "scale_factor", "add_offset",
            "zlib", "complevel", "shuffle", "chunksizes", "contiguous")
_COORD_ENC = ("dtype", "_FillValue", "missing_value", "scale_factor", "add_offset",
              "units", "calendar")
_DEFAULT_COMPRESSION = {"zlib": True, "complevel": 4, "shuffle": True}


def _to_dataset(obj: Any) -> xr.Dataset:
    """The Dataset to write: a DataArray, a Dataset or a list of DataArrays (variables)."""
    if isinstance(obj, xr.Dataset):
        ds = obj.copy()
        for k, v in obj.variables.items():
            ds[k].encoding = dict(v.encoding)
        return ds
    arrays = [obj] if isinstance(obj, xr.DataArray) else obj
    if not isinstance(arrays, list | tuple) or not arrays or not all(
        isinstance(a, xr.DataArray) for a in arrays
    ):
        raise TypeError(
            "write_netcdf needs an xarray DataArray, Dataset or a non-empty list of "
            f"DataArrays, got {type(obj).__name__}"
        )
    names = [str(a.name) if a.name is not None else "field" for a in arrays]
    if len(set(names)) != len(names):
        raise ClimateDataError(f"several arrays named {names}: stack each variable first")
    parts = [a.to_dataset(name=n) for a, n in zip(arrays, names, strict=True)]
    ds = parts[0] if len(parts) == 1 else xr.merge(
        parts, compat="no_conflicts", join="outer", combine_attrs="override"
    )
    for a, n in zip(arrays, names, strict=True):  # merge may drop encodings
        ds[n].encoding = dict(a.encoding)
        for c, cv in a.coords.items():
            if c in ds.coords and not ds[c].encoding and cv.encoding:
                ds[c].encoding = dict(cv.encoding)
    first = arrays[0].encoding
    ds.attrs = dict(first.get(_ENC_GLOBAL_ATTRS, {}))
    ds.encoding = {k: v for k, v in first.items() if k in (_ENC_FORMAT, _ENC_GLOBAL_ATTRS)}
    unlimited: list[str] = []
    for a in arrays:
        unlimited += [d for d in a.encoding.get(_ENC_UNLIMITED, ()) if d not in unlimited]
    ds.encoding["unlimited_dims"] = unlimited
    return ds


def _grid_chunks(var: xr.Variable, ds: xr.Dataset) -> tuple[int, ...] | None:
    """One chunk per 2-D field: 1 along every item dim, the whole horizontal grid."""
    try:
        hdims = _horizontal(xr.DataArray(var, coords={
            str(k): c.variable for k, c in ds.coords.items() if set(c.dims) <= set(var.dims)}))
    except (ClimateDataError, ValueError):
        return None
    return tuple(var.sizes[d] if d in hdims else 1 for d in var.dims)


def _var_encoding(name: str, ds: xr.Dataset, fmt: str, known: bool) -> dict[str, Any]:
    var = ds.variables[name]
    enc_in = var.encoding
    is_coord = name in ds.coords
    is_time = var.dtype.kind in "Mm" or (var.dtype == object and var.size > 0
                                          and _is_cftime(var.values.flat[0]))
    keys = _COORD_ENC if is_coord else _VAR_ENC + ("units", "calendar")
    enc: dict[str, Any] = {}
    for k in keys:
        if k not in enc_in or k in ("zlib", "complevel", "shuffle", "chunksizes", "contiguous"):
            continue
        if k in ("units", "calendar") and not is_time:
            continue
        enc[k] = enc_in[k]
    if "dtype" in enc:
        target = np.dtype(enc["dtype"])
        packed = any(k in enc for k in ("scale_factor", "add_offset"))
        masked = any(k in enc for k in ("_FillValue", "missing_value"))
        if var.dtype.kind in "Mm":
            if target.kind not in "iuf":
                del enc["dtype"]
        elif target.kind in "iu" and var.dtype.kind == "f" and not packed and not masked:
            if np.isnan(var.values).any():  # NaN with no fill value cannot be an integer
                del enc["dtype"]
        elif target.kind not in "biuf" or var.dtype.kind not in "biuf":
            del enc["dtype"]
    if "_FillValue" not in enc and (is_coord or known):
        enc["_FillValue"] = None  # never add a fill value the input did not have
    field_1d = var.ndim == 1 and _ENC_DIMS in enc_in  # unstructured, one item selected
    if fmt.startswith("NETCDF4") and not is_coord and (var.ndim >= 2 or field_1d):
        if "zlib" in enc_in:
            enc["zlib"] = bool(enc_in["zlib"])
            if enc["zlib"]:
                enc["complevel"] = int(enc_in.get("complevel") or 0)
            enc["shuffle"] = bool(enc_in.get("shuffle", False))
        elif not known or "chunksizes" not in enc_in:
            enc.update(_DEFAULT_COMPRESSION)
        chunks = _grid_chunks(var, ds) if var.ndim >= 2 else (var.size,)
        if chunks is not None:
            enc["chunksizes"] = chunks
    return enc


def _coordinates_attr(ds: xr.Dataset, name: str, own: Sequence[str]) -> str | None:
    """The input's ``coordinates`` attribute (cfgrib lists dimension coordinates too),
    less what is not written, plus the variable's ``own`` non-dimension coordinates it
    did not name.  Not ``ds[name].coords``: a Dataset lends every scalar coordinate to
    every variable (``lev`` selected on T is not PS's, ``time`` not lat2d's)."""
    old = ds[name].encoding.get("coordinates")
    names = [c for c in old.split() if c in ds.variables] if isinstance(old, str) else []
    extra = [c for c in own if c in ds.coords and c not in names]
    return " ".join(names + extra) or None


def _encode_times(ds: xr.Dataset, encoding: dict[str, dict[str, Any]]) -> xr.Dataset:
    """Encode dates with the input's units string verbatim and no calendar it lacked.

    Why: xarray rewrites ``hour since 1980-01-14 14:00:00`` as ``hours since
    1980-01-14T14:00:00`` and adds ``calendar``; readers comparing headers see a change.
    Dates that do not encode exactly (or with a warning) are left to xarray.
    """
    from xarray.coding.times import decode_cf_datetime, encode_cf_datetime

    for name, enc in encoding.items():
        var = ds.variables[name]
        values = var.values
        dates = var.dtype.kind == "M" or (var.dtype == object and var.size > 0
                                          and _is_cftime(values.flat[0]))
        if not dates or "units" not in enc or np.asarray(pd.isna(values)).any():
            continue
        units, calendar = str(enc["units"]), enc.get("calendar")
        target = np.dtype(enc.get("dtype", np.float64))
        if target.kind not in "iuf":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                # "days since 1-1-1" (NCL files): the units are written verbatim anyway
                warnings.filterwarnings("ignore", "Ambiguous reference date string")
                num, _, _ = encode_cf_datetime(values, units, calendar or "standard",
                                               dtype=target)
                num = np.asarray(num).astype(target)
                back = decode_cf_datetime(num, units, calendar or "standard",
                                          use_cftime=var.dtype == object)
        except Exception:  # noqa: BLE001 - anything odd: xarray's own encoding
            continue
        if not np.array_equal(np.asarray(back).ravel(), values.ravel()):
            continue
        attrs = dict(var.attrs, units=units)
        if calendar is not None:
            attrs["calendar"] = calendar
        new = xr.Variable(var.dims, num.reshape(var.shape), attrs)
        if name in ds.coords:
            ds = ds.assign_coords({name: new})
        else:
            ds[name] = new
        encoding[name] = {k: v for k, v in enc.items()
                          if k not in ("units", "calendar", "dtype")}
    return ds


def _integral(ds: xr.Dataset, encoding: dict[str, dict[str, Any]]) -> xr.Dataset:
    """Round float data bound for an unpacked integer dtype with no fill value ourselves
    (xarray would warn); NaN there cannot be written."""
    for name, enc in encoding.items():
        var = ds.variables[name]
        if ("dtype" not in enc or np.dtype(enc["dtype"]).kind not in "iu"
                or var.dtype.kind != "f" or "scale_factor" in enc or "add_offset" in enc
                or enc.get("_FillValue") is not None or "missing_value" in enc):
            continue
        if np.isnan(var.values).any():
            raise ClimateDataError(f"{name}: NaN values but no fill value for its "
                                   f"{np.dtype(enc['dtype'])} dtype")
        ds[name] = var.copy(data=np.rint(var.values).astype(enc["dtype"]))
    return ds


def _netcdf_dataset(
    obj: Any, history: str | None = None
) -> tuple[xr.Dataset, str, dict[str, dict[str, Any]], list[str]]:
    """The Dataset write_netcdf writes, its format, per-variable encoding, unlimited dims."""
    ds = _to_dataset(obj)
    arrays = [obj] if isinstance(obj, xr.DataArray) else (
        list(obj) if isinstance(obj, list | tuple) else list(ds.data_vars.values()))
    promoted = {n for a in arrays for n in a.encoding.get(_ENC_PROMOTED, ())
                if n in ds.coords and n not in ds.dims}
    if promoted:  # lat/lon the input stored as data variables: written back as such
        keep = {str(k): dict(v.encoding) for k, v in ds.variables.items()}
        denc = dict(ds.encoding)
        ds = ds.reset_coords(sorted(promoted))
        ds.encoding = denc
        for k, e in keep.items():
            ds[k].encoding = e
    fmt = ds.encoding.get(_ENC_FORMAT)
    for v in ds.data_vars.values():
        fmt = fmt or v.encoding.get(_ENC_FORMAT)
    known = fmt is not None
    fmt = str(fmt or "NETCDF4")
    if fmt not in NETCDF_FORMATS:
        raise ClimateDataError(f"unknown netCDF format {fmt!r}; one of {NETCDF_FORMATS}")
    if isinstance(obj, xr.DataArray | list | tuple) or _ENC_GLOBAL_ATTRS in ds.encoding:
        first = obj if isinstance(obj, xr.DataArray) else (
            obj[0] if isinstance(obj, list | tuple) else None)
        if first is not None:
            ds.attrs = dict(first.encoding.get(_ENC_GLOBAL_ATTRS, {}))
    unlimited = [str(d) for d in (ds.encoding.get("unlimited_dims") or ()) if d in ds.dims]
    for v in ds.data_vars.values():
        unlimited += [d for d in v.encoding.get(_ENC_UNLIMITED, ())
                      if d in ds.dims and d not in unlimited]
    if fmt.startswith("NETCDF3") and len(unlimited) > 1:
        unlimited = unlimited[:1]
    encoding = {str(k): _var_encoding(str(k), ds, fmt, known) for k in ds.variables}
    own = {str(a.name): [str(c) for c in a.coords if c not in a.dims]
           for a in arrays if a.name is not None}
    coordinates = {str(k): _coordinates_attr(ds, str(k), own.get(str(k), []))
                   for k in ds.data_vars}
    ds = _integral(ds, encoding)
    ds = _encode_times(ds, encoding)
    ds = ds.drop_encoding()
    for k, text in coordinates.items():
        ds[k].encoding["coordinates"] = text or None  # None: no attribute, not xarray's guess
    stamp = _dt.datetime.now(_dt.UTC).strftime("%a %b %d %H:%M:%S %Y")
    line = f"{stamp}: {history or 'written by mscn_datasets.climate.write_netcdf'}"
    old = ds.attrs.get("history")
    ds.attrs["history"] = f"{line}\n{old}" if old is not None and str(old) else line
    return ds, fmt, encoding, unlimited


def write_netcdf(
    obj: xr.DataArray | xr.Dataset | Sequence[xr.DataArray],
    path: str | os.PathLike[str],
    overwrite: bool = False,
    history: str | None = None,
) -> Path:
    """Write NetCDF atomically through :func:`mscn_core.atomic.write_atomic`.

    Why: a crash or error mid-write must never leave a truncated file where a valid
    one was expected, nor clobber an existing file unasked; and output must be a
    drop-in replacement for the input.  ``obj``: a DataArray, a Dataset, or a list
    of DataArrays of different variables (each already stacked).  Kept from the input
    (as recorded by :func:`open_climate`/:func:`select_variables`): global, variable and
    coordinate attributes (``Conventions`` untouched, never added), ``_FillValue`` and
    ``missing_value`` (NaN cells written as the fill value), packing, time units,
    calendar and dtype, the file format (zarr input: NETCDF4), unlimited dimensions and
    compression.  netCDF-4 output is chunked one 2-D field per chunk.  ``history``
    gains one first line ``"<date>: <history>"`` (a default text when None).  Raises
    FileExistsError if ``path`` exists and ``overwrite`` is False, FileNotFoundError if
    its directory is missing.  Returns the final path.
    """
    def write(tmp: str) -> None:
        ds, fmt, encoding, unlimited = _netcdf_dataset(obj, history)
        try:
            import netCDF4  # noqa: F401

            engine = "netcdf4"
        except ImportError:  # h5netcdf writes netCDF-4 only
            engine, fmt = "h5netcdf", "NETCDF4"
        ds.to_netcdf(tmp, engine=engine, format=fmt, encoding=encoding,
                     unlimited_dims=unlimited)

    return write_atomic(path, write, overwrite=overwrite)


# --------------------------------------------------------------------------------------
# portable encoding (for streams that must rebuild the file without the input)
# --------------------------------------------------------------------------------------

_PORTABLE_TOP = {"format", "global_attrs", "global_attr_dtypes", "unlimited_dims", "dims",
                 "item_dims", "index_dims", "variable", "coords", "promoted_coords",
                 "item_pos"}
_PORTABLE_VAR = set(_VAR_ENC) | {"attr_dtypes", "coordinates"}
_PORTABLE_COORD = set(_COORD_ENC) | {"attr_dtypes"}
_RESERVED_ATTRS = {"_NCProperties", "_IsNetcdf4", "_SuperblockVersion", "_Netcdf4Dimid",
                   "_Netcdf4Coordinates", "_FillValue", "missing_value"}
_MAX_NAMES = 1024  # dims, coordinates or attributes in one encoding
_MAX_CHUNK_BYTES = 1 << 32  # HDF5 refuses chunks of 4 GiB or more
_MAX_ATTR_LEN = 1 << 20  # characters or list elements in one attribute


def _plain(v: Any) -> Any:
    """A JSON-able copy (numpy scalars/arrays -> Python; dtype -> name)."""
    if isinstance(v, np.dtype):
        return str(v)
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def _attr_dtypes(attrs: Mapping[str, Any]) -> dict[str, str]:
    """dtypes of numeric attributes that JSON would turn into int64/float64."""
    out = {}
    for k, v in attrs.items():
        dt = getattr(v, "dtype", None)
        if dt is not None and dt.kind in "biuf" and dt not in (np.int64, np.float64):
            out[str(k)] = str(dt)
    return out


def _enc_subset(enc: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: _plain(enc[k]) for k in keys if k in enc and enc[k] is not None}


def portable_encoding(field: xr.DataArray) -> dict[str, Any]:
    """What :func:`write_netcdf` needs beyond a field's attrs and coordinates, as JSON.

    Why: a compressed stream is decoded with no access to the input file; with this and
    the field's attrs/coords the decoder writes the file the input would have given:
    format, global attributes (and numeric attribute dtypes), unlimited dims, the
    variable's dtype, fill values, packing, compression and input chunking, and each
    coordinate's dtype, fill value and time units/calendar.
    """
    enc = field.encoding
    out: dict[str, Any] = {}
    if enc.get(_ENC_FORMAT) is not None:
        out["format"] = str(enc[_ENC_FORMAT])
    if _ENC_GLOBAL_ATTRS in enc:
        gattrs = enc[_ENC_GLOBAL_ATTRS]
        out["global_attrs"] = {str(k): _plain(v) for k, v in gattrs.items()}
        out["global_attr_dtypes"] = _attr_dtypes(gattrs)
    for key, name in ((_ENC_UNLIMITED, "unlimited_dims"), (_ENC_DIMS, "dims"),
                      (_ENC_ITEM_DIMS, "item_dims"), (_ENC_INDEX_DIMS, "index_dims"),
                      (_ENC_PROMOTED, "promoted_coords")):
        if key in enc:
            out[name] = [str(d) for d in enc[key]]
    if _ENC_ITEM_POS in enc:
        out["item_pos"] = [int(i) for i in enc[_ENC_ITEM_POS]]
    var = _enc_subset(enc, _VAR_ENC + ("coordinates",))
    var["attr_dtypes"] = _attr_dtypes(field.attrs)
    out["variable"] = var
    coords = {}
    for name, c in field.coords.items():
        is_time = c.dtype.kind in "Mm" or (c.dtype == object and c.size > 0
                                            and _is_cftime(c.values.flat[0]))
        keys = _COORD_ENC if is_time else tuple(k for k in _COORD_ENC
                                                if k not in ("units", "calendar"))
        centry = _enc_subset(c.encoding, keys)
        centry["attr_dtypes"] = _attr_dtypes(c.attrs)
        coords[str(name)] = centry
    out["coords"] = coords
    return out


def _cast_attrs(attrs: Mapping[str, Any], dtypes: Mapping[str, str]) -> dict[str, Any]:
    out = dict(attrs)
    for k, dt in dtypes.items():
        if k in out and not isinstance(out[k], str):
            arr = np.asarray(out[k], dtype=dt)
            out[k] = arr[()] if arr.ndim == 0 else arr
    return out


def _enc_values(entry: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in entry.items() if k != "attr_dtypes"}
    if "dtype" in out:
        out["dtype"] = np.dtype(out["dtype"])
        for k in ("_FillValue", "missing_value"):
            if k in out and not isinstance(out[k], list):
                out[k] = np.asarray(out[k]).astype(out["dtype"])[()] if (
                    out["dtype"].kind in "biuf") else out[k]
    if "chunksizes" in out:
        out["chunksizes"] = tuple(out["chunksizes"])
    return out


def apply_portable_encoding(field: xr.DataArray, enc: dict[str, Any]) -> xr.DataArray:
    """A copy of ``field`` whose encodings (and attr dtypes) are those :func:`portable_encoding`
    recorded, so ``stack_fields`` + ``write_netcdf`` give the input's file.

    ``enc`` is checked first (:func:`check_portable_encoding`); a forged one raises
    ValueError.
    """
    check_portable_encoding(enc)
    out = field.copy(deep=False)
    e: dict[str, Any] = {k: v for k, v in out.encoding.items() if not k.startswith("mscn_")}
    e.update(_enc_values(enc["variable"]))
    if "format" in enc:
        e[_ENC_FORMAT] = enc["format"]
    if "global_attrs" in enc:
        e[_ENC_GLOBAL_ATTRS] = _cast_attrs(enc["global_attrs"],
                                           enc.get("global_attr_dtypes", {}))
    for name, key in (("unlimited_dims", _ENC_UNLIMITED), ("dims", _ENC_DIMS),
                      ("item_dims", _ENC_ITEM_DIMS), ("index_dims", _ENC_INDEX_DIMS),
                      ("promoted_coords", _ENC_PROMOTED)):
        if name in enc:
            e[key] = tuple(enc[name])
    if "item_pos" in enc:
        e[_ENC_ITEM_POS] = tuple(enc["item_pos"])
    out.encoding = e
    out.attrs = _cast_attrs(out.attrs, enc["variable"].get("attr_dtypes", {}))
    new = {}
    for name, centry in enc["coords"].items():
        if name not in out.coords:
            continue
        cvar = out.coords[name].variable.copy(deep=False)  # index coords: not in place
        cvar.attrs = _cast_attrs(cvar.attrs, centry.get("attr_dtypes", {}))
        cenc = {k: v for k, v in cvar.encoding.items() if k not in _COORD_ENC}
        cenc.update(_enc_values(centry))
        cvar.encoding = cenc
        new[name] = cvar
    return out.assign_coords(new)


def _bad(key: str, why: str) -> ValueError:
    return ValueError(f"portable encoding: {key} {why}")


def _describe(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, float) or (isinstance(x, int) and -(1 << 63) <= x < (1 << 64))


def _check_name(name: Any, key: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\0" in name or len(name) > 256:
        raise _bad(key, f"has an unusable name {_describe(name)}")


def _check_names(v: Any, key: str) -> None:
    if not isinstance(v, list) or len(v) > _MAX_NAMES:
        raise _bad(key, f"must be a list of names, got {_describe(v)}")
    for n in v:
        _check_name(n, key)
    if len(set(v)) != len(v):
        raise _bad(key, "has duplicate names")


def _check_dtype(v: Any, key: str, kinds: str = "biuf") -> np.dtype:
    if not isinstance(v, str) or len(v) > 32:
        raise _bad(key, f"must be a numpy dtype name, got {_describe(v)}")
    try:
        dt = np.dtype(v)
    except (TypeError, ValueError):
        raise _bad(key, f"{_describe(v)} is not a numpy dtype") from None
    if dt.kind not in kinds or not 0 < dt.itemsize <= (8 if kinds == "biuf" else 1024):
        raise _bad(key, f"{_describe(v)} is not a supported dtype")
    return dt


def _check_attr_values(attrs: Any, key: str) -> None:
    if not isinstance(attrs, dict) or len(attrs) > _MAX_NAMES:
        raise _bad(key, f"must be an object, got {_describe(attrs)}")
    for k, v in attrs.items():
        _check_name(k, f"{key} key")
        if k in _RESERVED_ATTRS:
            raise _bad(f"{key}[{k!r}]", "is reserved")
        flat = v if isinstance(v, list) else [v]
        if isinstance(v, str) and len(v) > _MAX_ATTR_LEN or len(flat) > _MAX_ATTR_LEN:
            raise _bad(f"{key}[{k!r}]", "is too long")
        if not flat or not (all(isinstance(x, str) for x in flat)
                            or all(_is_number(x) for x in flat)):
            raise _bad(f"{key}[{k!r}]", "must be a string, a number or a flat list of either")


def _check_attr_dtypes(v: Any, key: str) -> None:
    if not isinstance(v, dict) or len(v) > _MAX_NAMES:
        raise _bad(key, f"must be an object, got {_describe(v)}")
    for k, dt in v.items():
        _check_name(k, f"{key} key")
        _check_dtype(dt, f"{key}[{k!r}]")


def _check_fill(v: Any, key: str, dtype: np.dtype | None) -> None:
    flat = v if isinstance(v, list) else [v]
    if not flat or len(flat) > 2 or not all(_is_number(x) for x in flat):
        raise _bad(key, f"must be a number, got {_describe(v)}")
    if dtype is not None and dtype.kind in "iub":
        info = np.iinfo(dtype) if dtype.kind in "iu" else None
        for x in flat:
            if not (isinstance(x, int) or (isinstance(x, float) and x.is_integer())):
                raise _bad(key, f"{_describe(x)} is not an integer for dtype {dtype}")
            if info is not None and not info.min <= int(x) <= info.max:
                raise _bad(key, f"{_describe(x)} does not fit dtype {dtype}")


def _check_entry(entry: Any, key: str, allowed: set[str], kinds: str) -> None:
    if not isinstance(entry, dict):
        raise _bad(key, f"must be an object, got {_describe(entry)}")
    for k in entry:
        if k not in allowed:
            raise _bad(f"{key}.{k}" if isinstance(k, str) else key, "is not a known key")
    dtype = _check_dtype(entry["dtype"], f"{key}.dtype", kinds) if "dtype" in entry else None
    for k in ("_FillValue", "missing_value"):
        if k in entry:
            _check_fill(entry[k], f"{key}.{k}", dtype)
    for k in ("scale_factor", "add_offset"):
        if k in entry and not (_is_number(entry[k]) and math.isfinite(entry[k])):
            raise _bad(f"{key}.{k}", f"must be a finite number, got {_describe(entry[k])}")
    if entry.get("scale_factor", 1) == 0:
        raise _bad(f"{key}.scale_factor", "must not be 0")
    for k in ("zlib", "shuffle", "contiguous"):
        if k in entry and not isinstance(entry[k], bool):
            raise _bad(f"{key}.{k}", f"must be true or false, got {_describe(entry[k])}")
    if "complevel" in entry and not (isinstance(entry["complevel"], int)
                                     and not isinstance(entry["complevel"], bool)
                                     and 0 <= entry["complevel"] <= 9):
        raise _bad(f"{key}.complevel", f"must be an integer 0..9, got "
                   f"{_describe(entry['complevel'])}")
    if "chunksizes" in entry:
        ch = entry["chunksizes"]
        if (not isinstance(ch, list) or not 0 < len(ch) <= 64 or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 < n < (1 << 32)
                for n in ch)):
            raise _bad(f"{key}.chunksizes", f"must be a list of 1..64 positive sizes, got "
                       f"{_describe(ch)}")
        if math.prod(ch) * (dtype.itemsize if dtype is not None else 8) >= _MAX_CHUNK_BYTES:
            raise _bad(f"{key}.chunksizes", f"{_describe(ch)} is a chunk of 4 GiB or more")
    for k in ("units", "calendar", "coordinates"):
        if k in entry and not (isinstance(entry[k], str) and 0 < len(entry[k]) <= 4096):
            raise _bad(f"{key}.{k}", f"must be a short string, got {_describe(entry[k])}")
    if "attr_dtypes" in entry:
        _check_attr_dtypes(entry["attr_dtypes"], f"{key}.attr_dtypes")


def check_portable_encoding(enc: Any) -> None:
    """Raise ValueError (one line naming the key) unless ``enc`` is a sane
    :func:`portable_encoding`.

    Why: it comes from a stream, which may be forged; nothing is allocated from its
    sizes (chunk sizes are only checked: positive, under 4 GiB per chunk).
    """
    if not isinstance(enc, dict):
        raise _bad("", f"must be an object, got {_describe(enc)}")
    for k in enc:
        if k not in _PORTABLE_TOP:
            raise _bad(str(k)[:60] if isinstance(k, str) else _describe(k), "is not a known key")
    for k in ("variable", "coords"):
        if k not in enc:
            raise _bad(k, "is missing")
    if "format" in enc and enc["format"] not in NETCDF_FORMATS:
        raise _bad("format", f"{_describe(enc['format'])} is not one of {NETCDF_FORMATS}")
    if "global_attrs" in enc:
        _check_attr_values(enc["global_attrs"], "global_attrs")
    if "global_attr_dtypes" in enc:
        _check_attr_dtypes(enc["global_attr_dtypes"], "global_attr_dtypes")
    for k in ("unlimited_dims", "dims", "item_dims", "index_dims", "promoted_coords"):
        if k in enc:
            _check_names(enc[k], k)
    if "item_pos" in enc:
        p = enc["item_pos"]
        if not isinstance(p, list) or len(p) > 64 or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < (1 << 31)
                for i in p):
            raise _bad("item_pos", f"must be a list of at most 64 indices, got {_describe(p)}")
    _check_entry(enc["variable"], "variable", _PORTABLE_VAR, "biuf")
    coords = enc["coords"]
    if not isinstance(coords, dict) or len(coords) > _MAX_NAMES:
        raise _bad("coords", f"must be an object, got {_describe(coords)}")
    for name, entry in coords.items():
        _check_name(name, "coords key")
        _check_entry(entry, f"coords[{name!r}]", _PORTABLE_COORD, "biufSU")
