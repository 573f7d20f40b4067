"""Climate fields on the sphere: lat/lon NetCDF in, NetCDF and globe out.

Points are (cos φ cos λ, cos φ sin λ, sin φ) so the network sees no seam at the date
line and no pole singularity. Regular global grids are normalised (lat ascending, lon in
[0, 360)); every other grid (Gaussian, regional, curvilinear, unstructured) is coded as
its points in the file's own order, its coordinates carried in the stream (or, with
``grid_storage="reference"``, named by a hash and read from a grid file). Values are
scaled to [0, 1] per variable with ranges fitted on the training set (kept in the
checkpoint, so they cost no bits); a variable the checkpoint has never seen is scaled by
its own field range, carried in the item.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import os
import re
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mscn_core import limits
from mscn_core.modality import Modality, PredictFn
from mscn_core.signals import Signal
from mscn_core.streaming import ItemRef
from mscn_plugins import sphere_harmonics as sh

if TYPE_CHECKING:  # torch loads where it is used: listing plugins must not cost its ~1 s
    from torch import Tensor

try:  # the climate extra; without it the plugin reports a clear error when loaded
    import xarray as xr

    from mscn_datasets import climate
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the sphere modality needs the climate extra "
                      f"(pip install 'mscn[climate]'): {err}") from err


def sphere_coords(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """Unit-sphere points ``(nlat*nlon, 3)`` for a lat-major grid."""
    phi = np.deg2rad(np.asarray(lat_deg, dtype=np.float64))[:, None]
    lam = np.deg2rad(np.asarray(lon_deg, dtype=np.float64))[None, :]
    xyz = np.stack(np.broadcast_arrays(np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam),
                                       np.sin(phi) + 0 * lam), axis=-1)
    return xyz.reshape(-1, 3)


def point_coords(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """Unit-sphere points ``(n, 3)`` for flat per-point latitudes/longitudes (any grid)."""
    phi = np.deg2rad(np.asarray(lat_deg, dtype=np.float64).reshape(-1))
    lam = np.deg2rad(np.asarray(lon_deg, dtype=np.float64).reshape(-1))
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], -1)


def nearest_points(src_lat: np.ndarray, src_lon: np.ndarray, lat: np.ndarray,
                   lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every (lat, lon) of a regular grid (lat-major): the index of the nearest source
    point, and whether it is outside the source grid (farther than 1.5x the distance from
    that point to its 8th nearest neighbour, a local spacing that holds on anisotropic
    cells: a cropped curvilinear or unstructured grid ends there). Why: carries a
    non-regular grid's NaN mask to a ``--resolution`` grid without inventing values
    beyond the grid's extent."""
    src = point_coords(src_lat, src_lon)
    dst = sphere_coords(lat, lon)
    try:
        from scipy.spatial import cKDTree
    except ImportError:  # chunked brute force: |a - b|² = 2 - 2 a·b
        idx = np.empty(dst.shape[0], dtype=np.int64)
        dist = np.empty(dst.shape[0])
        for i in range(0, dst.shape[0], 4096):
            dots = dst[i:i + 4096] @ src.T
            idx[i:i + 4096] = np.argmax(dots, axis=1)
            dist[i:i + 4096] = np.sqrt(np.clip(2 - 2 * dots.max(axis=1), 0, None))
        return idx, np.zeros(dst.shape[0], dtype=bool)  # spacing unknown: nothing outside
    tree = cKDTree(src)
    dist, idx = tree.query(dst)
    k = min(9, src.shape[0])
    spacing = tree.query(src, k=k)[0][:, -1] if k > 1 else np.full(src.shape[0], np.inf)
    return idx.astype(np.int64), dist > 1.5 * spacing[idx]


def outside_axes(template: xr.DataArray, grid: climate.Grid, lat: np.ndarray,
                 lon: np.ndarray) -> np.ndarray:
    """Points of a regular (lat, lon) grid, lat-major, beyond a 1-D-axis grid's extent
    (half a spacing past its first/last latitude and, unless it wraps, longitude).
    Gaussian grids cover the globe: nothing is outside."""
    out = np.zeros((len(lat), len(lon)), dtype=bool)
    if grid.kind == "gaussian":
        return out.reshape(-1)
    la = np.asarray(template[grid.lat].values, dtype=np.float64)
    lo = np.asarray(template[grid.lon].values, dtype=np.float64)
    if grid.radians:
        la, lo = np.degrees(la), np.degrees(lo)
    half = 0.5 * float(np.max(np.abs(np.diff(np.sort(la))))) if la.size > 1 else 0.5
    out |= ((np.asarray(lat) < la.min() - half - 1e-9)
            | (np.asarray(lat) > la.max() + half + 1e-9))[:, None]
    lo_s = np.sort(np.mod(lo, 360.0))
    gaps = np.diff(np.append(lo_s, lo_s[0] + 360.0))
    step = float(np.median(gaps)) if gaps.size else 360.0
    if gaps.size and gaps.max() > 1.5 * step:  # a longitude gap: the grid does not wrap
        j = int(np.argmax(gaps))
        start = lo_s[(j + 1) % lo_s.size]  # the grid runs from here eastwards ...
        span = 360.0 - gaps[j]  # ... over this many degrees
        rel = np.mod(np.asarray(lon) - start + 0.5 * step, 360.0)
        out |= (rel > span + step + 1e-9)[None, :]
    return out.reshape(-1)


def pack_mask(mask: np.ndarray) -> str:
    """A boolean grid as compact text (zlib of packed bits) for item metadata."""
    return base64.b64encode(zlib.compress(np.packbits(mask.reshape(-1)).tobytes(), 9)).decode()


def mask_bytes(text: Any, shape: Sequence[int]) -> bytes:
    """The packed bits of :func:`pack_mask`'s text, inflated to exactly the size the grid
    needs (why: the text comes from a stream; a zlib bomb stops at ``ceil(cells / 8)``)."""
    if not isinstance(text, str):
        raise ValueError(f"nan_mask must be a base64 string, got {type(text).__name__}")
    n = math.prod(int(d) for d in shape)
    need = (n + 7) // 8
    try:
        packed = base64.b64decode(text, validate=True)
    except ValueError as err:  # binascii.Error
        raise ValueError(f"nan_mask is not base64 ({err})") from None
    raw = limits.inflate(packed, need, "nan_mask")
    if len(raw) != need:
        grid = "x".join(str(int(d)) for d in shape)
        raise ValueError(f"nan_mask holds {8 * len(raw):,} cells, the {grid} grid needs {n:,}")
    return raw


def unpack_mask(text: str, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_mask`, bounded by the grid's size."""
    n = math.prod(int(d) for d in shape)
    bits = np.unpackbits(np.frombuffer(mask_bytes(text, shape), np.uint8))
    return bits[:n].reshape(tuple(int(d) for d in shape)).astype(bool)


def nearest_mask(mask: np.ndarray, meta: dict, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Mask on the native normalised grid, carried to another global grid by nearest cell."""
    nlat, nlon = mask.shape
    lat0, lat1 = meta["lat"]
    if (len(lat), len(lon)) == (nlat, nlon) and np.isclose(lat[0], lat0):
        return mask
    i = np.rint((np.asarray(lat) - lat0) / (lat1 - lat0) * (nlat - 1))
    j = np.rint(np.mod(np.asarray(lon) - meta["lon_first"], 360.0) / (360.0 / nlon))
    return mask[np.ix_(np.clip(i, 0, nlat - 1).astype(int), j.astype(int) % nlon)]


def variable_key(field: xr.DataArray) -> str:
    return f"{field.name}[{field.attrs.get('units', '')}]"


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


BINARY_MIN = 256  # coordinates with more values than this go as zlib'd raw bytes


def _compact_axis(values: np.ndarray) -> Any:
    """A regular 1-D axis as {first, step, n} when that rebuilds it bit for bit; a large
    irregular numeric one (2-D lat/lon of a curvilinear grid, cell centres) as
    {zlib, shape}: base64 of its zlib'd little-endian bytes (exact, ~2-3x smaller than
    JSON); anything else as JSON lists."""
    if values.ndim == 1 and values.size > 2 and values.dtype.kind == "f":
        first, step = float(values[0]), float(values[1] - values[0])
        if np.array_equal(_expand_axis({"first": first, "step": step, "n": values.size},
                                       str(values.dtype)), values):
            return {"first": first, "step": step, "n": int(values.size)}
    if values.size > BINARY_MIN and values.dtype.kind in "fiu":
        raw = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
        return {"zlib": base64.b64encode(zlib.compress(raw, 9)).decode(),
                "shape": [int(n) for n in values.shape]}
    return _jsonable(values)


def _expand_axis(data: Any, dtype: str) -> np.ndarray:
    if isinstance(data, dict) and "ref" in data:  # resolve_grid() replaces it first
        raise ValueError("coordinate data is a grid reference: the grid file is needed")
    if isinstance(data, dict) and "zlib" in data:  # sizes checked by _coord_shape
        dt = np.dtype(dtype).newbyteorder("<")
        shape = tuple(int(n) for n in data["shape"])
        need = math.prod(shape) * dt.itemsize
        try:
            packed = base64.b64decode(data["zlib"], validate=True)
        except ValueError as err:
            raise ValueError(f"coordinate data is not base64 ({err})") from None
        raw = limits.inflate(packed, need, "coordinate data")
        if len(raw) != need:
            raise ValueError(f"coordinate data holds {len(raw):,} bytes, its shape {list(shape)} "
                             f"needs {need:,}")
        return np.frombuffer(raw, dt).reshape(shape).astype(dtype)
    if isinstance(data, dict):
        return (data["first"] + data["step"] * np.arange(data["n"])).astype(dtype)
    return np.asarray(data, dtype=dtype)


CF_ATTRS = ("units", "standard_name", "long_name", "axis", "calendar", "positive",
            "_FillValue", "missing_value", "valid_min", "valid_max", "modulo")


def field_template(field: xr.DataArray, metadata: str = "full",
                   grid_storage: str = "embed") -> dict:
    """JSON description of a 2-D field without its values: enough to rebuild the artifact.

    Coordinates go through xarray's CF encoder so times become numbers with units.
    ``grid_storage="reference"``: a curvilinear or unstructured grid's lat/lon values are
    replaced by a reference (:func:`refer_grid`); decoding then needs the grid file.
    """
    if grid_storage not in GRID_STORAGE:
        raise ValueError(f"grid_storage must be 'embed' or 'reference', got {grid_storage!r}")
    ds = field.to_dataset(name=str(field.name))
    ds = ds.drop_vars(str(field.name)).assign_coords()
    with warnings.catch_warnings():  # NCL's "days since 1-1-1" is year 1: no news
        warnings.filterwarnings("ignore", "Ambiguous reference date string")
        variables, _ = xr.conventions.cf_encoder(dict(ds.variables), {})
    coords = {str(k): {"dims": list(v.dims), "data": _compact_axis(np.asarray(v.values)),
                       "dtype": str(v.dtype),
                       "attrs": {a: _jsonable(b) for a, b in v.attrs.items()
                                 if a not in ("_FillValue", "missing_value")}}
              for k, v in variables.items()}
    keep = (lambda a: True) if metadata == "full" else (lambda a: a in CF_ATTRS)
    if metadata not in ("full", "cf"):
        raise ValueError(f"metadata must be 'full' or 'cf', got {metadata!r}")
    for c in coords.values():
        c["attrs"] = {a: v for a, v in c["attrs"].items() if keep(a)}
    encoding = climate.portable_encoding(field)
    if metadata == "cf" and "global_attrs" in encoding:  # CF essentials only
        encoding["global_attrs"] = {a: v for a, v in encoding["global_attrs"].items()
                                    if a in ("Conventions",)}
    tmpl = {"name": str(field.name), "dims": list(field.dims), "dtype": str(field.dtype),
            "attrs": {a: _jsonable(b) for a, b in field.attrs.items() if keep(a)},
            "coords": coords, "encoding": encoding}
    if grid_storage == "reference":
        tmpl = refer_grid(tmpl, field)[0]
    return tmpl


# -- grid by reference: the stream names its grid, a grid file holds it -----------------
GRID_STORAGE = ("embed", "reference")
REFERENCE_KINDS = ("curvilinear", "unstructured")  # 1-D axis grids cost little: embedded
_GRID_REF_KEYS = ("sha256", "file", "kind", "lat", "lon")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def refer_grid(tmpl: dict, field: xr.DataArray) -> tuple[dict, dict | None]:
    """``tmpl`` (a :func:`field_template` of ``field``) with its horizontal grid replaced
    by a reference, and the replaced coordinate entries (None: nothing replaced).

    Only curvilinear and unstructured grids (2-D or per-cell lat/lon, the bulk of such a
    stream); regular, Gaussian and regional 1-D axes stay embedded. The lat/lon entries
    keep dims, dtype and attributes (small), their data becomes ``{"ref": "grid",
    "shape"}``; ``tmpl["grid_ref"]`` holds the grid's :func:`climate.grid_sha256`, the
    source file's basename (informational), the grid kind and the coordinate names.
    Bounds/corner variables are never template coordinates (their vertex dim is not
    the field's), so there is nothing of theirs to replace."""
    try:
        grid = climate.find_grid(field)
    except climate.ClimateDataError:
        return tmpl, None
    if grid.kind not in REFERENCE_KINDS or not {grid.lat, grid.lon} <= set(tmpl["coords"]):
        return tmpl, None
    sha = climate.grid_sha256(field.coords[grid.lat].variable, field.coords[grid.lon].variable)
    coords = dict(tmpl["coords"])
    replaced = {}
    for name in (grid.lat, grid.lon):
        replaced[name] = coords[name]
        shape = [int(n) for n in field.coords[name].shape]
        coords[name] = dict(coords[name], data={"ref": "grid", "shape": shape})
    source = field.encoding.get("source")
    ref = {"sha256": sha, "file": os.path.basename(str(source)) if source else "",
           "kind": grid.kind, "lat": grid.lat, "lon": grid.lon}
    return dict(tmpl, coords=coords, grid_ref=ref), replaced


def _grid_ref_text(ref: dict) -> str:
    src = f"from {ref['file']}" if ref["file"] else "source file unknown"
    return f"grid sha256 {ref['sha256'][:12]}\u2026 ({src})"


def read_grid_file(path: str | os.PathLike, tmpl: dict) -> dict[str, np.ndarray]:
    """The referenced grid's coordinate data, CF-encoded as :func:`field_template`
    stores it, from grid file ``path`` (read with :func:`climate.open_climate`); one-line
    ValueError when the file lacks the named coordinates, they have other dims or shape,
    or its grid hash is not the stream's. ``tmpl``: a checked template with a grid_ref."""
    ref = tmpl["grid_ref"]
    names = (ref["lat"], ref["lon"])
    ds = climate.open_climate(path)
    try:
        ds = climate.promote_grid_coords(ds)
        missing = [n for n in names if n not in ds.variables]
        if missing:
            try:
                g = climate.find_grid(ds)
                hint = f"; its grid is {g.lat}/{g.lon} ({g.kind})"
            except climate.ClimateDataError:
                hint = "; it has no latitude/longitude grid"
            raise ValueError(f"grid file {path} has no {' and no '.join(missing)} (the "
                             f"stream's {ref['kind']} grid is {names[0]}/{names[1]}){hint}")
        variables = {n: ds[n].variable for n in names}
        sha = climate.grid_sha256(variables[names[0]], variables[names[1]])
        if sha != ref["sha256"]:
            why = ""
            for n, v in variables.items():  # say why, where the layout already differs
                c = tmpl["coords"][n]
                have = ([str(d) for d in v.dims], [int(k) for k in v.shape])
                want = (list(c["dims"]), [int(k) for k in c["data"]["shape"]])
                if have != want:
                    why = (f" ({n} is {'x'.join(map(str, have[1]))} on {', '.join(have[0])}, "
                           f"the stream's {'x'.join(map(str, want[1]))} on {', '.join(want[0])})")
                    break
            raise ValueError(f"grid file {path} has grid {sha[:12]}, the stream needs "
                             f"{ref['sha256'][:12]}{why}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Ambiguous reference date string")
            encoded, _ = xr.conventions.cf_encoder(variables, {})
        return {n: np.asarray(encoded[n].values).astype(tmpl["coords"][n]["dtype"])
                for n in names}
    finally:
        ds.close()


def resolved_template(tmpl: dict, grid: dict[str, Any]) -> dict:
    """``tmpl`` without its grid reference: the referenced coordinates' data from
    ``grid`` (name → array or :func:`_compact_axis` data), all else as it was."""
    coords = dict(tmpl["coords"])
    for name, data in grid.items():
        coords[name] = dict(coords[name], data=data)
    return {k: v for k, v in tmpl.items() if k != "grid_ref"} | {"coords": coords}


def template_coords(tmpl: dict) -> xr.Dataset:
    """The template's coordinates, CF-decoded (times back to dates where they decode)."""
    variables = {k: xr.Variable(c["dims"], _expand_axis(c["data"], c["dtype"]), c["attrs"])
                 for k, c in tmpl["coords"].items()}
    ds = xr.Dataset(coords=variables)
    # as the reader decodes them: standard dates, else cftime (dates before 1582), else
    # numbers (COADS year 0); never a warning
    for times in (True, xr.coders.CFDatetimeCoder(use_cftime=True)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", xr.SerializationWarning)
                warnings.filterwarnings("ignore", "Ambiguous reference date string")
                return xr.decode_cf(ds, decode_times=times)
        except (ValueError, xr.SerializationWarning):
            continue
    return xr.decode_cf(ds, decode_times=False)


def template_field(tmpl: dict) -> xr.DataArray:
    """Inverse of :func:`field_template`: a NaN-filled DataArray with the same metadata."""
    decoded = template_coords(tmpl)
    shape = tuple(decoded.sizes[d] for d in tmpl["dims"])
    fill = np.nan if np.dtype(tmpl["dtype"]).kind == "f" else 0
    out = xr.DataArray(np.full(shape, fill, dtype=tmpl["dtype"]), dims=tmpl["dims"],
                       coords=decoded.coords, name=tmpl["name"], attrs=tmpl["attrs"])
    if "encoding" in tmpl:  # the file's format, global attributes, packing, fill values
        out = climate.apply_portable_encoding(out, tmpl["encoding"])
    return out


# -- validation of stream metadata (it may be forged: nothing is sized before a check) ----
_RESERVED_ATTRS = {"_FillValue", "missing_value", "_Netcdf4Dimid", "_Netcdf4Coordinates",
                   "_NCProperties", "_IsNetcdf4", "_SuperblockVersion"}  # encoding, not attrs
_COORD_KINDS = "biufSU"  # what CF-encoded coordinates are (times become numbers)
_MAX_ITEMSIZE = 1024  # bytes per coordinate element ("<U256" at most)


def _pair(value: Any, what: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{what} must be a list of two numbers, got {limits.describe(value)}")
    return limits.check_finite(value[0], what), limits.check_finite(value[1], what)


def _dtype(value: Any, what: str, kinds: str) -> np.dtype:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a numpy dtype name, got {limits.describe(value)}")
    try:
        dt = np.dtype(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value[:60]!r} is not a numpy dtype") from None
    if dt.kind not in kinds or not 0 < dt.itemsize <= _MAX_ITEMSIZE:
        raise ValueError(f"{what} {value!r} is not a supported dtype here")
    return dt


def _check_name(name: Any, what: str) -> None:
    """A name NetCDF can write: a non-empty string without '/' or NUL."""
    if not isinstance(name, str) or not name or "/" in name or "\0" in name:
        raise ValueError(f"{what} {limits.describe(name)} is not a usable name")


def _attr_number(x: Any) -> bool:
    if isinstance(x, bool):  # NetCDF has no boolean attributes
        return False
    return isinstance(x, float) or (isinstance(x, int) and -(1 << 63) <= x < (1 << 63))


def _check_attrs(attrs: Any, what: str) -> None:
    """Attributes as a reader wrote them (and NetCDF can write back): name → string,
    number, or a flat list of strings or of numbers."""
    if not isinstance(attrs, dict):
        raise ValueError(f"{what} must be an object, got {limits.describe(attrs)}")
    for k, v in attrs.items():
        _check_name(k, f"{what} key")
        if k in _RESERVED_ATTRS:
            raise ValueError(f"{what}: {k!r} is reserved")
        flat = v if isinstance(v, list) else [v]
        if not (all(isinstance(x, str) for x in flat) or all(_attr_number(x) for x in flat)):
            raise ValueError(f"{what}[{k!r}] must be a string, a number or a list of either")


def _numeric_sizes(name: str, c: dict, dims: list[str], limit: int, what: str
                   ) -> tuple[int, ...]:
    """The bounded sizes of a coordinate whose values are not inline (raw bytes, or in the
    grid file): numeric dtype, one size per dim."""
    if np.dtype(c["dtype"]).kind not in "fiu":
        raise ValueError(f"template coordinate {name!r}: {what} must be numeric")
    shp = c["data"]["shape"]
    if not isinstance(shp, list) or len(shp) != len(dims):
        raise ValueError(f"template coordinate {name!r}: shape does not match its dims")
    sizes = tuple(limits.check_count(n, f"template coordinate {name!r} shape", 0, limit)
                  for n in shp)
    limits.check_output_values(math.prod(sizes), f"template coordinate {name!r}")
    return sizes


def _coord_shape(name: str, c: Any, limit: int) -> tuple[list[str], tuple[int, ...]]:
    """A template coordinate's dims and shape, checked without expanding it."""
    _check_name(name, "template coordinate")
    if not isinstance(c, dict):
        raise ValueError(f"template coordinate {name!r} must be an object")
    for key in ("dims", "data", "dtype", "attrs"):
        if key not in c:
            raise ValueError(f"template coordinate {name!r} has no {key!r}")
    dims = c["dims"]
    if not isinstance(dims, list) or len(set(map(repr, dims))) != len(dims):
        raise ValueError(f"template coordinate {name!r}: dims must be distinct strings")
    for d in dims:
        _check_name(d, f"template coordinate {name!r} dim")
    _dtype(c["dtype"], f"template coordinate {name!r} dtype", _COORD_KINDS)
    _check_attrs(c["attrs"], f"template coordinate {name!r} attrs")
    data = c["data"]
    if isinstance(data, dict) and "ref" in data:  # in the grid file (refer_grid)
        if set(data) != {"ref", "shape"} or data["ref"] != "grid":
            raise ValueError(f"template coordinate {name!r}: a grid reference needs exactly "
                             "ref 'grid' and a shape")
        return dims, _numeric_sizes(name, c, dims, limit, "grid coordinates")
    if isinstance(data, dict) and "zlib" in data:  # raw bytes (_compact_axis)
        if set(data) != {"zlib", "shape"} or not isinstance(data["zlib"], str):
            raise ValueError(f"template coordinate {name!r}: binary data needs exactly a zlib "
                             "string and a shape")
        return dims, _numeric_sizes(name, c, dims, limit, "binary data")
    if isinstance(data, dict):  # a regular axis {first, step, n} (_compact_axis)
        if len(dims) != 1 or set(data) != {"first", "step", "n"}:
            raise ValueError(f"template coordinate {name!r}: a compact axis needs one dim "
                             "and exactly first, step, n")
        limits.check_finite(data["first"], f"template coordinate {name!r} first")
        limits.check_finite(data["step"], f"template coordinate {name!r} step")
        return dims, (limits.check_count(data["n"], f"template coordinate {name!r} n",
                                         0, limit),)
    shape: list[int] = []
    level = data
    for _ in dims:  # nested lists, one level per dim, rectangular (checked below)
        if not isinstance(level, list):
            raise ValueError(f"template coordinate {name!r}: data does not match its dims")
        shape.append(len(level))
        level = level[0] if level else []
    try:
        arr = np.asarray(data, dtype=object)
    except ValueError:  # ragged
        raise ValueError(f"template coordinate {name!r}: data is not rectangular") from None
    if arr.shape != tuple(shape) or any(isinstance(x, list | dict) for x in arr.flat):
        raise ValueError(f"template coordinate {name!r}: data does not match its dims")
    return dims, tuple(shape)


def check_template(tmpl: Any, shape: tuple[int, ...], limit: int, native: bool = False
                   ) -> None:
    """Raise ValueError unless ``tmpl`` is a :func:`field_template` of a field whose
    grid is ``shape`` (regular path: normalised (lat, lon), the field may be (lon, lat);
    ``native``: any other grid, the field's own dims in order, 1 or 2 of them)."""
    if not isinstance(tmpl, dict):
        raise ValueError("template missing" if tmpl is None else
                         f"template must be an object, got {limits.describe(tmpl)}")
    for key in ("name", "dims", "dtype", "attrs", "coords"):
        if key not in tmpl:
            raise ValueError(f"template has no {key!r}")
    if "encoding" in tmpl:
        climate.check_portable_encoding(tmpl["encoding"])
    _check_name(tmpl["name"], "template name")
    dims = tmpl["dims"]
    ndims = len(shape) if native else 2
    if not isinstance(dims, list) or len(dims) != ndims or len(set(map(repr, dims))) != ndims:
        raise ValueError(f"template dims must be {ndims} distinct names, got "
                         f"{limits.describe(dims)}")
    for d in dims:
        _check_name(d, "template dim")
    _dtype(tmpl["dtype"], "template dtype", "biuf")
    _check_attrs(tmpl["attrs"], "template attrs")
    coords = tmpl["coords"]
    if not isinstance(coords, dict):
        raise ValueError(f"template coords must be an object, got {limits.describe(coords)}")
    sizes: dict[str, int] = {}
    for name, c in coords.items():
        cdims, cshape = _coord_shape(name, c, limit)
        for d, n in zip(cdims, cshape, strict=True):
            if d not in dims:
                raise ValueError(f"template coordinate {name!r} has dim {d!r}, not one of "
                                 f"the field's {dims}")
            if sizes.setdefault(d, n) != n:
                raise ValueError(f"template dim {d!r} has sizes {sizes[d]} and {n}")
    missing = [d for d in dims if d not in sizes]
    if missing:
        raise ValueError(f"template dim {missing[0]!r} has no coordinate")
    _check_grid_ref(tmpl, native)
    if native:
        got = tuple(sizes[d] for d in dims)
        if got != tuple(shape):
            raise ValueError(f"template grid {'x'.join(map(str, got))} does not match shape "
                             f"{'x'.join(map(str, shape))}")
        return
    grid = (sizes[dims[0]], sizes[dims[1]])
    if grid not in (tuple(shape), tuple(shape)[::-1]):
        raise ValueError(f"template grid {grid[0]}x{grid[1]} does not match shape "
                         f"{shape[0]}x{shape[1]}")


def _check_grid_ref(tmpl: dict, native: bool) -> None:
    """A template's grid reference (:func:`refer_grid`), if any: its fields' types, and
    exactly its lat and lon coordinates refer to it."""
    refs = sorted(n for n, c in tmpl["coords"].items()
                  if isinstance(c["data"], dict) and "ref" in c["data"])
    if "grid_ref" not in tmpl:
        if refs:
            raise ValueError(f"template coordinate {refs[0]!r} refers to a grid but the "
                             "template has no grid_ref")
        return
    ref = tmpl["grid_ref"]
    if not native:
        raise ValueError("template grid_ref on a regular grid (regular grids are embedded)")
    if not isinstance(ref, dict):
        raise ValueError(f"template grid_ref must be an object, got {limits.describe(ref)}")
    if sorted(map(str, ref)) != sorted(_GRID_REF_KEYS):
        raise ValueError(f"template grid_ref must have exactly {', '.join(_GRID_REF_KEYS)}; "
                         f"got {', '.join(sorted(map(str, ref))[:8]) or 'nothing'}")
    sha = ref["sha256"]
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError(f"template grid_ref sha256 must be 64 lowercase hex digits, got "
                         f"{limits.describe(sha)}")
    name = ref["file"]
    if not isinstance(name, str) or len(name) > 255 or any(ch in name for ch in "/\\\0\n"):
        raise ValueError(f"template grid_ref file must be a file's base name, got "
                         f"{limits.describe(name)}")
    if ref["kind"] not in REFERENCE_KINDS:
        raise ValueError(f"template grid_ref kind must be one of {REFERENCE_KINDS}, got "
                         f"{limits.describe(ref['kind'])}")
    for key in ("lat", "lon"):
        _check_name(ref[key], f"template grid_ref {key}")
    if ref["lat"] == ref["lon"] or refs != sorted((ref["lat"], ref["lon"])):
        raise ValueError(f"template grid_ref names {limits.describe(ref['lat'])}/"
                         f"{limits.describe(ref['lon'])}, but the coordinates that refer to "
                         f"it are {refs}")


def _template_grid(tmpl: dict) -> tuple[int, int]:
    """(nlat, nlon) of a checked template whose axes form a global regular grid (the
    axes are CF-decoded, as :func:`template_field` will), else ValueError."""
    try:
        coords = template_coords(tmpl)
        lat, lon = climate.find_lat_lon(coords)
        climate.check_global_regular(np.asarray(coords[lat].values, dtype=np.float64),
                                     np.asarray(coords[lon].values, dtype=np.float64))
    except (ValueError, TypeError, OverflowError, KeyError) as err:
        raise ValueError(f"template coordinates: {limits.one_line(err)}") from None
    return coords.sizes[lat], coords.sizes[lon]


def _template_native_grid(tmpl: dict, kind: str, shape: tuple[int, ...]) -> None:
    """A checked template of a non-regular grid must hold a usable grid of ``kind`` (no
    NaN coordinates, |lat| <= 90, no duplicate cells where the kind forbids them)."""
    try:
        coords = template_coords(tmpl)
        stub = xr.DataArray(np.broadcast_to(np.float32(0), shape), dims=tmpl["dims"],
                            coords=coords.coords, name=tmpl["name"])
        grid = climate.check_grid(stub)
    except (ValueError, TypeError, OverflowError, KeyError) as err:
        raise ValueError(f"template coordinates: {limits.one_line(err)}") from None
    if grid.kind != kind:
        raise ValueError(f"template coordinates form a {grid.kind} grid, the item says {kind}")
    if climate.native_regular(grid):
        raise ValueError("template coordinates form a regular grid, the item says "
                         f"{kind}")


@dataclass
class SphereOptions:
    """What a climate user picks: which variable and fields, which output grid."""

    # variable to use, repeatable: --var t --var z (default: every variable on a lat/lon
    # grid); each field carries its own scaling in the stream
    var: list[str] = field(default_factory=list)
    # select along a dimension, e.g. --sel isobaricInhPa=850 (repeatable; a,b keeps several)
    sel: list[str] = field(default_factory=list)
    # how --sel matches: exact (numbers within 1e-6 relative, times and names exactly) or
    # nearest (within half a spacing; the value used is printed)
    sel_method: Literal["exact", "nearest"] = "exact"
    # write or decode on a global grid of this spacing (degrees) instead of the input's
    resolution: float | None = None
    # metadata kept in a stream: every attribute (full) or the CF essentials (cf)
    metadata: Literal["full", "cf"] = "full"
    # encode: a curvilinear or unstructured grid's lat/lon go into the stream (embed) or
    # stay in the input file, the stream naming them by a sha256 of their values
    # (reference: one-field MPI-OM streams 70-140x smaller; decode needs --grid-file).
    # Regular, Gaussian and regional grids (1-D axes, a few hundred bytes) are always
    # embedded; times, levels and other coordinates too
    grid_storage: Literal["embed", "reference"] = "embed"
    # decode/fit: the file holding the grid a stream references (any NetCDF/zarr with the
    # same lat/lon variables and values, e.g. the input file; checked by its hash)
    grid_file: str | None = None
    # meta-train: validation fields = --sel plus these (overriding), e.g. number=7;
    # replaces the random split
    val_sel: list[str] = field(default_factory=list)
    # view: map projection(s) (both: a map and a globe; platecarree, robinson, orthographic)
    projection: str = "both"
    # view: longitude at the centre of the maps and globes (degrees east)
    central_longitude: float = 0.0
    # view: matplotlib colormap of the truth and reconstruction panels
    cmap: str = "viridis"
    # view: lower colour limit of truth and reconstruction (default: truth's 1st percentile)
    vmin: float | None = None
    # view: upper colour limit (default: the truth's 99th percentile)
    vmax: float | None = None
    # view: which panels, in order, comma-separated: truth,recon,error (e.g. error only)
    panels: str = "truth,recon,error"
    # meta-train: how a field maps to [0, 1]: variable (the training range of each known
    # variable) or field (every field by its own min/max, in the stream and its bits; one
    # network for any variable, level and date). Stored in the checkpoint: fit/encode use
    # the checkpoint's mode unless this is given.
    scaling: Literal["variable", "field"] | None = None
    # meta-train: spherical-harmonic base of this degree L (0-31; -1 none): each field's
    # area-weighted least-squares SH fit travels in the stream as (L+1)² float16
    # coefficients and the network encodes only the rest (DESIGN §8). Stored in the
    # checkpoint: fit/encode use the checkpoint's degree unless this is given.
    sh_degree: int | None = None

    def validation(self) -> SphereOptions | None:
        """Options that select the validation items (None: the core splits at random)."""
        if not self.val_sel:
            return None
        return dataclasses.replace(self, sel=list(self.sel) + list(self.val_sel), val_sel=[])


def _options(options: SphereOptions | None, **overrides: Any) -> SphereOptions:
    opts = options if options is not None else SphereOptions()
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(opts, **given) if given else opts


def _on_lat_lon(var: xr.DataArray) -> bool:
    """A variable on latitude/longitude axes that carry plausible degree values.

    Dimension names alone (``x``/``y``/``z`` of a voxel grid) are not enough.
    """
    try:
        grid = climate.find_grid(var)
    except climate.ClimateDataError:
        return False
    la, lo = np.asarray(var[grid.lat].values), np.asarray(var[grid.lon].values)
    if la.dtype.kind not in "fiu" or lo.dtype.kind not in "fiu" or la.size < 2 or lo.size < 2:
        return False
    if grid.radians:
        la, lo = np.degrees(la), np.degrees(lo)
    return bool(np.nanmin(la) >= -90.01 and np.nanmax(la) <= 90.01
                and np.nanmax(lo) - np.nanmin(lo) <= 360.01)


_ENSEMBLE_NAMES = ("number", "member", "ensemble", "realization", "realisation", "ens")


def _is_time_like(name: str, coord: xr.DataArray) -> bool:
    """A coordinate a climatology averages over: time (by dtype, CF axis/units or name)
    or ensemble member."""
    units = str(coord.attrs.get("units", ""))
    return (coord.dtype.kind in "Mm" or coord.dtype == object
            or coord.attrs.get("axis") == "T" or coord.attrs.get("standard_name") == "time"
            or " since " in units or "time" in name.lower()
            or name.lower() in _ENSEMBLE_NAMES)


def _netcdf_structured(path: Path) -> bool:
    """Classic netCDF, or HDF5 with netCDF-4 structure (``_NCProperties``, dimension
    scales) and no top-level ``voxels`` dataset (IM-NET voxel grids, even written through
    netCDF4: the voxel plugin claims those)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(b"\x89HDF"):
        return True
    try:
        import h5py
    except ImportError:  # no h5py: no voxel plugin can claim it either
        return True
    try:
        with h5py.File(path, "r") as f:
            if isinstance(f.get("voxels"), h5py.Dataset):
                return False
            if "_NCProperties" in f.attrs:
                return True
            return any(isinstance(obj, h5py.Dataset) and (
                "DIMENSION_LIST" in obj.attrs or obj.attrs.get("CLASS") == b"DIMENSION_SCALE")
                for obj in f.values())
    except Exception:  # noqa: BLE001 - unreadable as HDF5: not ours
        return False


OPEN_FILES = 16  # files ``load`` keeps open (metadata only; fields of a file come together)
NETCDF_MAGIC = (b"CDF\x01", b"CDF\x02", b"CDF\x05", b"\x89HDF\r\n\x1a\n")


class SphereModality(Modality):
    name = "sphere"
    description = "climate fields on any lat/lon grid (NetCDF/zarr) on the unit sphere"
    in_dim = 3
    out_dim = 1
    magic = NETCDF_MAGIC
    file_extensions = (".nc", ".nc4", ".netcdf", ".cdf", ".zarr")
    options = SphereOptions
    points_per_step = 65536  # a 0.25° global field (1M points) adapts on 64k per step
    view_names = ("globe",)
    # fit/evaluate/encode (and ds.mscn / da.mscn) without a checkpoint: the general
    # checkpoint with a degree-7 SH base, per-field scaling (trained on 190 fields of 14
    # shared files, no unstructured grid: plugins/checkpoints/README.md)
    default_checkpoint = "climate_general_b192_sh7.safetensors"
    # xarray/CF names every field's template repeats (bitstream preset dictionary): FROZEN
    header_words = (
        '"GRIB_', '"history":"', '"calendar":"proleptic_gregorian"', '"_FillValue":',
        '"missing_value":', '"chunksizes":[', '"complevel":', '"contiguous":false',
        '"shuffle":true', '"zlib":true', '"unlimited_dims":[', '"global_attr_dtypes":{}',
        '"global_attrs":{', '"format":"NETCDF4"', '"item_dims":[', '"variable":{',
        '"stored_direction":"decreasing"', '"seconds since 1970-01-01"', '"hours since ',
        '"positive":"down"', '"point_spacing":"even"', '"axis":"', '"long_name":"time"',
        '"standard_name":"time"', '"long_name":"longitude","standard_name":"longitude",'
        '"units":"degrees_east"', '"long_name":"latitude","standard_name":"latitude",'
        '"units":"degrees_north"', '"standard_name":"', '"long_name":"', '"units":"',
        '"encoding":{"coords":{', '"attr_dtypes":{}', '"dtype":"int64"', '"dtype":"float32"',
        '"dtype":"float64"', '"dims":[]', '"data":{"first":', '"n":', '"step":', '"attrs":{',
        '"dims":["latitude","longitude"]', '"coords":{', '"lat":[-90.0,90.0]', '"lon_first":',
        '"n_masked":', '"nan_mask":"eN', '"scaling":"own field range (field scaling)"',
        '"scaling":"training-set range of ', '"sh":{"coef":"', '"variable":"', '"sphere"')

    def __init__(self) -> None:
        self.scaling: dict[str, list[float]] = {}  # variable key -> [min, max]
        self.scaling_mode = "variable"  # or "field": see SphereOptions.scaling
        self.sh_degree = -1  # spherical-harmonic base degree, -1 none: SphereOptions.sh_degree
        self._grid_checked: tuple[dict, Any] | None = None  # see check_meta
        self._warned: set[str] = set()  # variables already reported as unknown
        self._open: dict[str, xr.Dataset] = {}  # load(): files kept open, oldest first
        # referenced grids: those this instance encoded (sha256 -> coordinate data: a
        # bounded encode reconstructs without a grid file) and grid files read (keyed by
        # path and sha256: read and hashed once per stream)
        self._known_grids: dict[str, dict[str, Any]] = {}
        self._grid_files: dict[tuple[str, str], dict[str, Any]] = {}

    # -- reading ----------------------------------------------------------------------
    def guess_can_open(self, path: str | os.PathLike) -> bool:
        """NetCDF/zarr content (what :func:`climate.open_climate` reads) with at least one
        data variable of one or more dims, even when its coordinates cannot be found or
        are out of range: ``read`` then says precisely why, naming the file, instead of
        the core's "no installed modality can open".

        HDF5 is shared with voxel/SDF files, so the magic alone does not decide: an HDF5
        file counts only with netCDF-4 structure (``_NCProperties`` or dimension scales)
        and no top-level ``voxels`` dataset (IM-NET grids: the voxel plugin's), unless a
        variable is on a lat/lon grid.
        """
        p = Path(path)
        if p.is_dir():
            if not any((p / f).exists() for f in (".zgroup", ".zmetadata", "zarr.json")):
                return False
        elif not super().guess_can_open(p):
            return False
        try:
            ds = climate.open_climate(p)
        except Exception:  # noqa: BLE001 - not a file this plugin reads
            return False
        try:  # lat/lon stored as data variables (geodesic, SEAM) count as coordinates
            ds = climate.promote_grid_coords(ds)
            if any(_on_lat_lon(v) for v in ds.data_vars.values()):
                return True
            if not any(v.ndim >= 1 for v in ds.data_vars.values()):
                return False
            return p.is_dir() or _netcdf_structured(p)
        except Exception:  # noqa: BLE001 - an odd file: not claimed, as before
            return False
        finally:
            ds.close()

    def read(self, path: str | os.PathLike, options: SphereOptions | None = None, *,
             var: str | Sequence[str] | None = None, sel: dict | Sequence[str] | None = None
             ) -> list[xr.DataArray]:
        """2-D fields of the chosen variables (default: all on a lat/lon grid), in file
        order; ``var``/``sel`` override ``options`` (Python API). A file whose coordinates
        cannot be found, or whose grid the codec cannot use (latitude outside ±90, NaN
        coordinates, duplicate points), raises :class:`climate.ClimateDataError` in one
        line naming the file, the variables and coordinates examined and what was
        expected."""
        opts = _options(options)
        var = var if var is not None else (opts.var or None)
        if isinstance(var, list | tuple) and len(var) == 1:
            var = var[0]
        sel = sel if sel is not None else (opts.sel or None)
        if sel is not None and not isinstance(sel, dict):
            sel = climate.parse_sel(list(sel))
        items = climate.field_items([path], var=var, sel=sel, sel_method=opts.sel_method)
        seen = set()
        for f in items:  # a grid the codec cannot use (latitude 95, NaN): said now, naming
            if f.name not in seen:  # the file; the fields of a variable share their grid
                seen.add(f.name)
                try:
                    grid = climate.find_grid(f)
                except climate.ClimateDataError:
                    continue  # lat/lon dims without coordinate values: to_signal says so
                climate.check_grid(f, grid)
        return items

    def _selection(self, options: SphereOptions | None) -> tuple[Any, Any, str]:
        opts = _options(options)
        var = opts.var[0] if len(opts.var) == 1 else (opts.var or None)
        sel = climate.parse_sel(list(opts.sel)) if opts.sel else None
        return var, sel, opts.sel_method

    def scan(self, path: str | os.PathLike, options: SphereOptions | None = None
             ) -> list[ItemRef]:
        """References to the fields ``read`` returns, from coordinates only.

        One file or store at a time, opened lazily (not ``open_mfdataset``): every item
        then keeps its own file's attributes, encoding and time decoding exactly as
        ``read`` gives them, files of different variables, grids or calendars need not
        combine, and nothing that grows with the archive (a dask graph over every file)
        is held; a zarr store is one source whose chunks are read per field.
        """
        var, sel, method = self._selection(options)
        return [ItemRef((*key, sel, method), label) for key, label in
                climate.scan_fields(path, self.item_label, var=var, sel=sel, sel_method=method)]

    def load(self, ref: ItemRef, options: SphereOptions | None = None) -> xr.DataArray:
        """The field behind ``ref`` (only its values are read); the last few files stay
        open, so the fields of one file do not reopen it."""
        path, name, n, sel, method = ref.key
        ds = self._open.pop(path, None)
        if ds is None:
            ds = climate.open_climate(path)
        self._open[path] = ds  # most recent last
        while len(self._open) > OPEN_FILES:
            self._open.pop(next(iter(self._open))).close()
        return climate.load_field(ds, path, name, n, sel=sel, sel_method=method)

    def item_label(self, item: xr.DataArray) -> str:
        """Variable, scalar coordinates (time, member, level) and shape. Where an item
        coordinate does not tell the file's fields apart (missing values: SEAM's times
        are all the netCDF fill value; NaN/NaT; any repeated value) the label also holds
        the field's position along that dim (a --sel on another dim leaves it as it is),
        so distinct fields never share a label (train/validation de-duplication)."""
        pos = item.encoding.get(climate._ENC_ITEM_POS)
        dims = item.encoding.get(climate._ENC_ITEM_DIMS, ())
        repeated = set(item.encoding.get(climate._ENC_REPEATED, ()))
        at = {str(d): p for d, p in zip(dims, pos or (), strict=False) if d in repeated}
        scal = sorted((str(k), str(v.values) + (f"#{at[str(k)]}" if str(k) in at else ""))
                      for k, v in item.coords.items() if v.ndim == 0)
        return f"{item.name}|{scal}|{item.shape}"

    # -- training-set state -----------------------------------------------------------
    def fit_state(self, items: Sequence[xr.DataArray]) -> None:
        ranges: dict[str, list[float]] = {}
        for f in items:
            v = np.asarray(f.values, dtype=np.float64)
            lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
            k = variable_key(f)
            old = ranges.get(k, [lo, hi])
            ranges[k] = [min(old[0], lo), max(old[1], hi)]
        self.scaling = {k: [lo, hi if hi > lo else lo + 1.0] for k, (lo, hi) in ranges.items()}

    def state(self) -> dict:
        return {"scaling": self.scaling, "scaling_mode": self.scaling_mode,
                "sh_degree": self.sh_degree}

    def load_state(self, state: dict) -> None:
        self.scaling = {k: list(v) for k, v in state.get("scaling", {}).items()}
        # checkpoints from before the mode existed are "variable"
        mode = state.get("scaling_mode", "variable")
        if mode not in ("variable", "field"):
            raise ValueError(f"scaling_mode must be 'variable' or 'field', got {mode!r}")
        self.scaling_mode = mode
        self.sh_degree = _sh_degree(state.get("sh_degree", -1))  # older checkpoints: none

    def _use_options(self, options: SphereOptions | None) -> None:
        """An explicit --scaling sets the mode (meta-train: it lands in the checkpoint)."""
        mode = getattr(options, "scaling", None)
        if mode is not None:
            if mode not in ("variable", "field"):
                raise ValueError(f"scaling must be 'variable' or 'field', got {mode!r}")
            self.scaling_mode = mode
        degree = getattr(options, "sh_degree", None)
        if degree is not None:
            self.sh_degree = _sh_degree(degree)

    def scale_for(self, field: xr.DataArray) -> tuple[float, float, str]:
        """The [0, 1] scaling: in "field" mode every field's own range; else the
        checkpoint's training range for a variable it knows, else the field's own range
        (said once). The range is in the stream either way (meta ``scale``)."""
        k = variable_key(field)
        if self.scaling_mode == "field":
            v = np.asarray(field.values, dtype=np.float64)
            lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
            return lo, (hi if hi > lo else lo + 1.0), "own field range (field scaling)"
        if k in self.scaling:
            lo, hi = self.scaling[k]
            return lo, hi, "training-set range of " + k
        if self.scaling and k not in self._warned:
            self._warned.add(k)
            known = ", ".join(sorted(self.scaling))
            warnings.warn(f"{k} is not in the checkpoint's training set ({known}): scaled by "
                          "each field's own range, carried in the stream", stacklevel=2)
        v = np.asarray(field.values, dtype=np.float64)
        lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
        return lo, (hi if hi > lo else lo + 1.0), "own field range (variable not in checkpoint)"

    # -- signals ----------------------------------------------------------------------
    def to_signal(self, item: xr.DataArray, options: SphereOptions | None = None) -> Signal:
        """Regular global grids: lat-major normalised grid (as ever). Any other grid: the
        field's points in its own order (meta ``grid`` = kind, ``shape`` = its dims)."""
        import torch

        try:
            grid = climate.find_grid(item)
        except climate.ClimateDataError:
            grid = None
        self._use_options(options)
        if grid is not None and not climate.native_regular(grid):
            return self._native_signal(item, grid)
        try:  # a lazily opened field (the accessor, the Python API) loads its values here
            values, lat, lon, _ = climate.normalize_field(item)
        except (RuntimeError, OSError) as err:  # netCDF4/HDF5: "NetCDF: HDF error"
            src = item.encoding.get("source", "the file")
            raise ValueError(f"{src}: cannot read variable {item.name}: {err} "
                             "(corrupted file?)") from None
        lo, hi, how = self.scale_for(item)
        vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
        if vmin < lo - 0.1 * (hi - lo) or vmax > hi + 0.1 * (hi - lo):
            warnings.warn(f"{item.name} {climate._item_label(item)} spans [{vmin:.4g}, "
                          f"{vmax:.4g}], outside the checkpoint's training range [{lo:.4g}, "
                          f"{hi:.4g}]: expect a poor fit (the checkpoint has not seen such "
                          "fields)", stacklevel=2)
        finite = np.isfinite(values).reshape(-1)
        scaled = ((np.nan_to_num(values, nan=lo) - lo) / (hi - lo)).reshape(-1, 1)
        meta = {"variable": str(item.name), "units": str(item.attrs.get("units", "")),
                "scale": [lo, hi], "scaling": how, "shape": list(values.shape),
                "lat": [float(lat[0]), float(lat[-1])], "lon_first": float(lon[0]),
                "n_masked": int((~finite).sum())}
        if not finite.all():
            meta["nan_mask"] = pack_mask(~finite.reshape(values.shape))
        return self._sh_residual(Signal(torch.from_numpy(sphere_coords(lat, lon)).float(),
                                        torch.from_numpy(scaled).float(),
                                        None if finite.all() else torch.from_numpy(finite),
                                        meta))

    def _native_signal(self, item: xr.DataArray, grid: climate.Grid) -> Signal:
        import torch

        try:
            values, lat, lon, grid = climate.field_points(item)
        except (RuntimeError, OSError) as err:
            src = item.encoding.get("source", "the file")
            raise ValueError(f"{src}: cannot read variable {item.name}: {err} "
                             "(corrupted file?)") from None
        lo, hi, how = self.scale_for(item)
        finite = np.isfinite(values)
        scaled = ((np.nan_to_num(values, nan=lo) - lo) / (hi - lo)).reshape(-1, 1)
        meta = {"variable": str(item.name), "units": str(item.attrs.get("units", "")),
                "scale": [lo, hi], "scaling": how, "grid": grid.kind,
                "shape": [int(n) for n in item.shape], "n_masked": int((~finite).sum())}
        if not finite.all():
            meta["nan_mask"] = pack_mask(~finite)
        sig = Signal(torch.from_numpy(point_coords(lat, lon)).float(),
                     torch.from_numpy(scaled).float(),
                     None if finite.all() else torch.from_numpy(finite), meta)
        area = item.encoding.get(climate._ENC_AREA)
        if isinstance(area, np.ndarray) and area.shape == (sig.n_points,):
            sig._cell_area = torch.from_numpy(area)  # not in meta: never in a stream
        return self._sh_residual(sig)

    def _sh_residual(self, sig: Signal) -> Signal:
        """With an SH base (``sh_degree`` >= 0): the targets become what the field's
        area-weighted SH fit misses, scaled to [0, 1] (meta ``sh``: degree, float16
        coefficients, the residual's range); errors stay in the field's units."""
        import torch

        degree = self.sh_degree
        if degree < 0:
            return sig
        xyz = sig.coords.double().numpy()
        t = sig.targets.double().numpy().reshape(-1)
        valid = (sig.mask.numpy().astype(bool) if sig.mask is not None
                 else np.ones(t.size, dtype=bool))
        area = getattr(sig, "_cell_area", None)
        w, _ = sh.point_weights(xyz, sig.meta.get("grid"), sig.meta["shape"],
                                None if area is None else area.numpy())
        lat, lon = sh.xyz_latlon(xyz)
        coef, _, _ = sh.sh_fit(lat[valid], lon[valid], t[valid], w[valid], degree,
                               sh.BASE_RIDGE)
        text, coef = sh.pack_coefficients(coef)  # the base a decoder will rebuild
        r = t - sh.sh_basis(lat, lon, degree) @ coef
        # the range at float32 precision, written as the shortest text: the decoder
        # parses exactly the numbers the targets were scaled with
        r_lo = float(str(np.float32(r[valid].min())))
        r_hi = float(str(np.float32(max(float(r[valid].max()), r_lo + 1e-6))))
        targets = np.where(valid, (r - r_lo) / (r_hi - r_lo), 0.0)
        meta = {**sig.meta, "sh": {"degree": degree, "coef": text, "range": [r_lo, r_hi]}}
        out = Signal(sig.coords, torch.from_numpy(targets).float()[:, None], sig.mask, meta)
        if area is not None:
            out._cell_area = area
        return out

    def item_template(self, item: xr.DataArray, options: SphereOptions | None = None) -> dict:
        """``metadata="cf"`` keeps only CF attributes (units, names, calendar…): fewer bytes.
        ``grid_storage="reference"``: the grid by reference (:func:`refer_grid`); this
        instance remembers it, so it can reconstruct the item without a grid file."""
        opts = _options(options)
        tmpl = field_template(item, opts.metadata)
        if opts.grid_storage == "embed":
            return tmpl
        if opts.grid_storage != "reference":
            raise ValueError(f"grid_storage must be 'embed' or 'reference', got "
                             f"{opts.grid_storage!r}")
        tmpl, replaced = refer_grid(tmpl, item)
        if replaced is not None:
            self._known_grids[tmpl["grid_ref"]["sha256"]] = {
                k: c["data"] for k, c in replaced.items()}
        return tmpl

    def resolve_grid(self, tmpl: dict, options: SphereOptions | None = None) -> dict:
        """A checked template with its referenced grid filled in (unchanged without one):
        from ``options.grid_file`` (checked by hash), else a grid this instance encoded;
        else a one-line ValueError saying which grid file is needed."""
        ref = tmpl.get("grid_ref")
        if ref is None:
            return tmpl
        path = _options(options).grid_file
        if path is not None:
            key = (os.path.abspath(os.fspath(path)), ref["sha256"])
            grid = self._grid_files.get(key)
            if grid is None:
                grid = read_grid_file(path, tmpl)
                self._grid_files = {key: grid}  # one grid file at a time
        elif ref["sha256"] in self._known_grids:
            grid = self._known_grids[ref["sha256"]]
        else:
            raise ValueError(f"stream references {_grid_ref_text(ref)}; pass --grid-file FILE "
                             "holding it")
        return resolved_template(tmpl, grid)

    def n_values(self, signal: Signal) -> int:
        """Grid cells of the field, masked (land) cells included: the file's values."""
        return signal.n_points

    def metrics(self, signal: Signal, pred: Tensor) -> dict[str, float]:
        """Errors in the field's units. ``rmse_area_weighted`` weighs each point by its
        cell's area: cos(lat) on 1-D lat/lon grids (regular, Gaussian, regional: exact up
        to the constant spacing); on curvilinear/unstructured grids the cell areas from
        the file's CF bounds or SCRIP corners, else cos(lat) too (then it is only right
        where points are evenly spaced in lat/lon, e.g. not on a geodesic grid)."""
        import torch

        lo, hi = signal.meta["scale"]
        p = pred.detach().reshape(-1).double()
        t = signal.targets.reshape(-1).double()
        valid = signal.mask.reshape(-1) if signal.mask is not None else torch.ones_like(t).bool()
        err = (p - t)[valid] * _residual_span(signal.meta)  # in the field's [0, 1] scaling
        mse01 = float((err**2).mean())
        area = getattr(signal, "_cell_area", None)
        if area is not None:
            w = area.double()[valid]
        else:
            phi = torch.asin(signal.coords[:, 2].double().clamp(-1, 1))[valid]
            w = torch.cos(phi).clamp_min(0)
        span = hi - lo
        return {"psnr_db": -10 * math.log10(max(mse01, 1e-20)),
                "rmse": math.sqrt(mse01) * span,
                "mae": float(err.abs().mean()) * span,
                "max_abs_error": float(err.abs().max()) * span,
                "bias": float(err.mean()) * span,  # mean(recon - truth), the field's units
                "rmse_area_weighted": math.sqrt(float((w * err**2).sum() / w.sum())) * span,
                "scale_min": lo, "scale_max": hi}

    def value_scale(self, meta: dict) -> float:
        """Field units per unit of the [0, 1] targets (error bounds are in field units)."""
        lo, hi = meta["scale"]
        return (float(hi) - float(lo)) * _residual_span(meta)

    def output_ulp(self, meta: dict) -> float:
        """Float outputs round to their dtype: its spacing near the largest magnitude a
        decoded value can take (the scaling's ends, a whole range beyond)."""
        dtype = np.dtype(meta["template"]["dtype"])
        if dtype.kind != "f":
            return 0.0
        lo, hi = (float(v) for v in meta["scale"])
        return float(np.spacing(dtype.type(max(abs(lo), abs(hi)) + (hi - lo))))

    def reference_group(self, item: xr.DataArray) -> tuple | None:
        """Fields of one climatology: same variable, units, grid and non-time scalar
        coordinates (level...); times, members and realisations are what it averages.
        None with an SH base: each field's targets are its own residual, so a per-point
        mean of them is no climatology."""
        if self.sh_degree >= 0:
            return None
        keep = []
        for k, c in sorted(item.coords.items(), key=lambda kv: str(kv[0])):
            if c.ndim != 0 or _is_time_like(str(k), c):
                continue
            keep.append((str(k), str(c.values)))
        return (str(item.name), str(item.attrs.get("units", "")), tuple(item.shape),
                tuple(keep))

    # -- artifacts --------------------------------------------------------------------
    def check_meta(self, meta: dict, options: SphereOptions | None = None) -> int:
        """Validate a stream item (scale, shape, template, NaN mask) without building the
        field; the number of values: the native grid, or the ``options.resolution`` grid."""
        limit = limits.max_output_values()
        lo, hi = _pair(meta.get("scale"), "scale")
        if not lo <= hi:
            raise ValueError(f"scale must be [min, max] with min <= max, got [{lo}, {hi}]")
        self._check_sh(meta.get("sh"))
        if "grid" in meta:
            return self._check_native_meta(meta, options, limit)
        shape = meta.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise ValueError(f"shape must be a list of two sizes, got {limits.describe(shape)}")
        nlat, nlon = (limits.check_count(n, "shape", 1, limit) for n in shape)
        limits.check_output_values(nlat * nlon, f"a {nlat}x{nlon} field")
        tmpl = meta.get("template")
        check_template(tmpl, (nlat, nlon), limit)  # sizes bounded: safe to expand the axes
        last = getattr(self, "_grid_checked", None)
        if last is not None and last[0] is tmpl:
            grid = last[1]
        else:  # ~1 ms: done once for all the items that share one template
            grid = _template_grid(tmpl)
            self._grid_checked = (tmpl, grid)  # holds tmpl, so `is` cannot match a new one
        if grid != (nlat, nlon):
            raise ValueError(f"template grid is {grid[0]}x{grid[1]} (lat x lon), shape says "
                             f"{nlat}x{nlon}")
        if "nan_mask" in meta:
            mask_bytes(meta["nan_mask"], (nlat, nlon))
            lat0, lat1 = _pair(meta.get("lat"), "lat")
            if lat0 == lat1:
                raise ValueError("lat must be the first and last latitudes, got equal values")
            limits.check_finite(meta.get("lon_first"), "lon_first")
        resolution = _options(options).resolution
        if resolution is None:
            return nlat * nlon
        glat, glon = climate.regular_latlon_shape(resolution)
        return limits.check_output_values(glat * glon, f"a {glat}x{glon} output grid")

    def _check_sh(self, base: Any) -> None:
        """An item's SH base (:meth:`_sh_residual`), if any: any degree decodes (the item
        carries its base; the network was trained for the checkpoint's degree)."""
        if base is None:
            return
        if not isinstance(base, dict) or sorted(base) != ["coef", "degree", "range"]:
            raise ValueError("sh must be an object with exactly coef, degree, range")
        degree = base["degree"]
        if type(degree) is not int or not 0 <= degree <= sh.MAX_DEGREE:
            raise ValueError(f"sh degree must be an integer in 0..{sh.MAX_DEGREE}, got "
                             f"{limits.describe(degree)}")
        sh.unpack_coefficients(base["coef"], degree)
        r_lo, r_hi = _pair(base["range"], "sh range")
        if not r_lo < r_hi:
            raise ValueError(f"sh range must be [min, max] with min < max, got [{r_lo}, {r_hi}]")

    def _check_native_meta(self, meta: dict, options: SphereOptions | None, limit: int
                           ) -> int:
        """check_meta for a non-regular grid: kind, shape (1 dim for unstructured, else 2),
        template (coordinates decoded only after their sizes are bounded), NaN mask."""
        kind = meta["grid"]
        if kind not in climate.GRID_KINDS or kind == "regular":
            raise ValueError(f"grid must be one of {climate.GRID_KINDS[1:]}, got "
                             f"{limits.describe(kind)}")
        shape = meta.get("shape")
        ndim = 1 if kind == "unstructured" else 2
        if not isinstance(shape, list) or len(shape) != ndim:
            raise ValueError(f"shape of a {kind} grid must be a list of {ndim} sizes, got "
                             f"{limits.describe(shape)}")
        sizes = tuple(limits.check_count(n, "shape", 1, limit) for n in shape)
        n = limits.check_output_values(math.prod(sizes), f"a {'x'.join(map(str, sizes))} field")
        tmpl = meta.get("template")
        check_template(tmpl, sizes, limit, native=True)
        if "grid_ref" in tmpl and tmpl["grid_ref"]["kind"] != kind:
            raise ValueError(f"template grid_ref is a {tmpl['grid_ref']['kind']} grid, the "
                             f"item says {kind}")
        path = _options(options).grid_file
        last = getattr(self, "_grid_checked", None)
        if last is None or last[0] is not tmpl or last[1] != (kind, sizes, path):
            # a referenced grid is read (and its hash checked) here, before any decoding
            _template_native_grid(self.resolve_grid(tmpl, options), kind, sizes)
            self._grid_checked = (tmpl, (kind, sizes, path))
        if "nan_mask" in meta:
            mask_bytes(meta["nan_mask"], sizes)
        resolution = _options(options).resolution
        if resolution is None:
            return n
        glat, glon = climate.regular_latlon_shape(resolution)
        return limits.check_output_values(glat * glon, f"a {glat}x{glon} output grid")

    def _native_reconstruct(self, meta: dict, predict: PredictFn, resolution: Any,
                            template: xr.DataArray) -> xr.DataArray:
        """Predict at the template's own points (exactly the signal's, in its order) and
        reshape; or on a regular grid, the NaN mask carried by nearest point."""
        import torch

        lo, hi = meta["scale"]
        src_lat, src_lon, grid = climate.grid_points(template)
        if resolution is None:
            lat, lon = src_lat, src_lon
            pts = torch.from_numpy(point_coords(lat, lon)).float()
        else:
            lat, lon = climate.regular_latlon(float(resolution))
            pts = torch.from_numpy(sphere_coords(lat, lon)).float()
        with torch.no_grad():
            pred = predict(pts).reshape(-1).double().numpy()
        values = lo + pred * (hi - lo)
        mask = (unpack_mask(meta["nan_mask"], (math.prod(meta["shape"]),)).reshape(-1)
                if "nan_mask" in meta else np.zeros(src_lat.size, dtype=bool))
        if resolution is None:
            values[mask] = np.nan
        else:  # NaN where the nearest input point was NaN, and outside the input grid
            idx, outside = nearest_points(src_lat, src_lon, lat, lon)
            if grid.kind in ("gaussian", "regional"):
                outside = outside_axes(template, grid, lat, lon)
            values[mask[idx] | outside] = np.nan
        if resolution is None:
            data = values.reshape(template.shape)
            if np.issubdtype(template.dtype, np.floating):
                data = data.astype(template.dtype)
            return template.copy(data=data)
        return climate.field_to_dataarray(values.reshape(len(lat), len(lon)), lat, lon,
                                          template)

    def reconstruct(self, meta: dict, predict: PredictFn, options: SphereOptions | None = None,
                    template: xr.DataArray | None = None) -> xr.DataArray:
        """The field as a DataArray; ``options.resolution`` (degrees) gives a new global grid."""
        import torch

        if template is None:
            self.check_meta(meta, options)  # a stream's meta: validated before any allocation
            template = template_field(self.resolve_grid(meta["template"], options))
        predict = _with_sh_base(meta, predict)
        if "grid" in meta:
            out = self._native_reconstruct(meta, predict, _options(options).resolution,
                                           template)
            lo, hi = meta["scale"]
            out.attrs = dict(template.attrs)
            out.attrs["mscn_reconstruction"] = ("decoded from sparse modulations of a "
                                                "meta-learned SIREN")
            out.attrs["mscn_scale_min"], out.attrs["mscn_scale_max"] = float(lo), float(hi)
            return out
        resolution = _options(options).resolution
        lo, hi = meta["scale"]
        if resolution is None:
            _, lat, lon, _ = climate.normalize_field(template.fillna(0))
        else:
            lat, lon = climate.regular_latlon(float(resolution))
        pts = torch.from_numpy(sphere_coords(lat, lon)).float()
        with torch.no_grad():
            pred = predict(pts).reshape(len(lat), len(lon)).double().numpy()
        values = lo + pred * (hi - lo)
        if "nan_mask" in meta:  # cells that were NaN in the input are NaN again
            mask = unpack_mask(meta["nan_mask"], meta["shape"])
            values[nearest_mask(mask, meta, lat, lon)] = np.nan
        if resolution is None:
            out = climate.restore_layout(values, template)
        else:
            out = climate.field_to_dataarray(values, lat, lon, template)
        out.attrs = dict(template.attrs)
        out.attrs["mscn_reconstruction"] = "decoded from sparse modulations of a meta-learned SIREN"
        out.attrs["mscn_scale_min"], out.attrs["mscn_scale_max"] = float(lo), float(hi)
        return out

    def save(self, artifacts: xr.DataArray | list[xr.DataArray], path: str | os.PathLike,
             overwrite: bool = False, provenance: dict | None = None) -> Path:
        """One NetCDF; provenance (checkpoint hash, bits per value) becomes attributes."""
        prov = dict(provenance or {})
        fields = artifacts if isinstance(artifacts, list) else [artifacts]
        for a in fields:
            a.attrs.update({f"mscn_{k}": v for k, v in prov.items()
                            if k in ("checkpoint_sha256", "bits_per_value", "max_abs_error")
                            and v is not None})
        return climate.write_netcdf(climate.stack_variables(fields), path, overwrite=overwrite,
                                    history=history_line(prov))

    def view(self, truth: xr.DataArray, recon: xr.DataArray, path: str | os.PathLike,
             options: SphereOptions | None = None, overwrite: bool = False,
             animation: str | os.PathLike | None = None) -> Path:
        """Truth / reconstruction / error on maps and globes, with PSNR, RMSE and bits;
        ``animation``: also a rotating globe of the reconstruction (GIF)."""
        from mscn_viewers.globe import render_globe, rotating_globe_gif

        if animation is not None and not overwrite and Path(animation).exists():
            raise FileExistsError(f"{animation} exists; pass --overwrite to replace it")
        opts = _options(options)
        look = {"projection": opts.projection, "central_longitude": opts.central_longitude,
                "cmap": opts.cmap, "vmin": opts.vmin, "vmax": opts.vmax,
                "panels": opts.panels}
        out = render_globe(truth, recon, path, stats=globe_stats(truth, recon),
                           overwrite=overwrite, **look)
        if animation is not None:
            rotating_globe_gif(recon, animation, overwrite=overwrite, truth=truth, **look)
        return out


def _sh_degree(value: Any) -> int:
    if type(value) is not int or not -1 <= value <= sh.MAX_DEGREE:
        raise ValueError(f"sh_degree must be an integer in -1..{sh.MAX_DEGREE}, got "
                         f"{limits.describe(value)}")
    return value


def _residual_span(meta: dict) -> float:
    """Targets per unit of the field's [0, 1] scaling: the SH residual's range, else 1."""
    base = meta.get("sh")
    return 1.0 if base is None else float(base["range"][1]) - float(base["range"][0])


def _with_sh_base(meta: dict, predict: PredictFn) -> PredictFn:
    """The network predicts the SH residual in [0, 1]; the field (in its [0, 1] scaling)
    is the base expansion plus the residual mapped back to its range."""
    base = meta.get("sh")
    if base is None:
        return predict
    import torch

    degree = int(base["degree"])
    coef = sh.unpack_coefficients(base["coef"], degree)
    r_lo, r_hi = (float(v) for v in base["range"])

    def full(pts: Tensor) -> Tensor:
        res = predict(pts).reshape(-1).double()
        shb = torch.from_numpy(sh.evaluate(pts.double().numpy(), coef, degree))
        return (shb + r_lo + res * (r_hi - r_lo))[:, None]

    return full


def history_line(provenance: dict) -> str:
    """CDO's habit: what made the file, in one line (the date is added by the writer)."""
    parts = []
    if provenance.get("checkpoint_sha256"):
        parts.append(f"checkpoint sha256 {str(provenance['checkpoint_sha256'])[:16]}")
    if provenance.get("bits"):
        parts.append(f"{provenance['bits']} bits")
    if provenance.get("bits_per_value") is not None:
        parts.append(f"{float(provenance['bits_per_value']):.4g} bits/value")
    if provenance.get("max_abs_error") is not None:
        parts.append(f"max abs error {float(provenance['max_abs_error']):.6g}")
    command = str(provenance.get("command") or "mscn")
    return f"{command} ({', '.join(parts)})" if parts else command


def globe_stats(truth: xr.DataArray, recon: xr.DataArray) -> dict:
    """PSNR on the checkpoint's scaling (kept in the recon's attrs), RMSE, bits if decoded."""
    from mscn_viewers.globe import error_on_truth_grid

    err = np.asarray(error_on_truth_grid(truth, recon).values, dtype=np.float64)
    rmse = float(np.sqrt(np.nanmean(err**2)))
    stats = {}
    lo, hi = recon.attrs.get("mscn_scale_min"), recon.attrs.get("mscn_scale_max")
    if lo is not None and hi is not None and rmse > 0:
        stats["psnr"] = 20 * math.log10((float(hi) - float(lo)) / rmse)
    stats["rmse"] = rmse
    if "mscn_bits_per_value" in recon.attrs:
        stats["bits_per_value"] = float(recon.attrs["mscn_bits_per_value"])
    return stats


from mscn_plugins import sphere_xarray as _sphere_xarray  # noqa: E402,F401 - ds.mscn / da.mscn
