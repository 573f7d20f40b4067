"""Globe viewers for gridded climate fields (truth vs. reconstruction).

All rendering is done with an explicit :class:`matplotlib.figure.Figure` attached
to an Agg canvas, so nothing touches ``pyplot``'s global figure registry and the
module is safe to use from worker threads / headless servers.

Coastlines come from the Natural Earth shapefiles vendored in
``viewers/data/naturalearth`` (see the README there).  On first use cartopy's
``pre_existing_data_dir`` is pointed at that folder, its ``data_dir`` at a
private temporary directory, and the Natural Earth downloader is replaced by one
that raises :class:`FileNotFoundError` -- cartopy will never try to download.

Output files are written atomically by :func:`mscn_core.atomic.write_atomic` (the one
writer of the project): the image is rendered into a temporary file in the destination
directory and then moved into place (``overwrite=True``, the default) so readers never
observe a half-written file.  With ``overwrite=False`` an existing path raises
:class:`FileExistsError` before any rendering, and the final move refuses to clobber a
file created concurrently.

Conventions
-----------
Input fields are one horizontal slice as an :class:`xarray.DataArray` on any grid the
reader's :func:`mscn_datasets.climate.find_grid` names (degrees or radians):

* regular / Gaussian / regional (1-D lat and lon axes): normalised to ascending latitude
  and longitude in [-180, 180) (any order or 360-degree window in); global grids get a
  wrapped extra column so the seam is covered; ``pcolormesh`` with cell edges halfway
  between centres (clipped to +/-90; a Gaussian grid's outer rows reach the poles).
  A regional field is shown whole: maps set to its box, maps and globes centred on it.
* curvilinear (2-D lat/lon on two dims, ocean models): a mesh of cell corners (means of
  the four surrounding centres on the unit sphere), drawn in the axes' own coordinates.
  Cells whose corners straddle a map's seam are drawn once per side, clipped to the
  edge, not smeared across the map; on a globe, corners behind it are pulled onto the
  horizon.  A 2-D array whose index neighbours are not neighbours (a cubed sphere
  stored as rows, SEAM) would overlap itself and is drawn as unstructured cells.
* unstructured (one cell dim): spherical Voronoi polygons around the cell centres.

NaN cells are left blank on every grid.

View options (``mscn view globe ... --projection/--central-longitude/--cmap/--vmin/
--vmax/--panels``) are checked before anything is drawn; a bad one is a one-line
:class:`ValueError` naming the choices.  Titles show scalar coordinates, with numeric
CF times (``units="hour since 0000-01-01"``, left undecoded by the reader) decoded by
cftime: ``TIME=Jan 16 (climatology)`` rather than ``TIME=366``.
"""

from __future__ import annotations

import calendar
import difflib
import functools
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import xarray as xr

from mscn_core.atomic import write_atomic
from mscn_datasets import climate

__all__ = [
    "NATURAL_EARTH_DIR",
    "configure_cartopy",
    "error_on_truth_grid",
    "format_stats",
    "globe_figsize",
    "normalize_field",
    "render_field",
    "render_globe",
    "rotating_globe_gif",
]

#: Folder containing ``shapefiles/natural_earth/...`` (cartopy layout).
NATURAL_EARTH_DIR = Path(__file__).resolve().parent / "data" / "naturalearth"

#: ``projection`` choices: "both" is a PlateCarree map row above an Orthographic globe row.
PROJECTIONS = ("both", "platecarree", "robinson", "orthographic")
#: ``panels`` choices; any non-empty subset, in any order, e.g. "error" alone.
PANELS = ("truth", "recon", "error")

_PANEL_W = 5.0  # inches per column in render_globe
_PC_ROW_H = 2.75  # PlateCarree / Robinson row (2:1 map + title)
_MIN_W = 7.5  # a one-panel figure still fits the title and stats line
_ORTHO_ROW_H = 3.9  # Orthographic row
_HEADER_H = 0.6  # suptitle
_CBAR_H = 0.75  # bottom colour bars


# --------------------------------------------------------------------------- cartopy set-up


def _offline_error(format_dict: Mapping[str, str]) -> FileNotFoundError:
    name = "ne_{resolution}_{name}".format(**format_dict)
    folder = NATURAL_EARTH_DIR / "shapefiles" / "natural_earth" / format_dict.get("category", "?")
    return FileNotFoundError(
        f"Natural Earth shapefile {name!r} is not vendored in {folder} and downloads are "
        "disabled (mscn_viewers works offline). Copy its .shp/.shx/.dbf/.prj files there."
    )


@functools.cache
def configure_cartopy() -> Path:
    """Point cartopy at the vendored Natural Earth data and disable downloads (idempotent).

    Sets ``cartopy.config["pre_existing_data_dir"]`` to :data:`NATURAL_EARTH_DIR`,
    ``data_dir`` to a per-user temporary folder, and replaces the Natural Earth
    downloader by a subclass whose ``acquire_resource`` raises
    :class:`FileNotFoundError` instead of fetching from the internet.
    """
    import cartopy
    from cartopy.io.shapereader import NEShpDownloader

    class OfflineNEShpDownloader(NEShpDownloader):
        def acquire_resource(self, target_path, format_dict):
            raise _offline_error(format_dict)

    cartopy.config["pre_existing_data_dir"] = NATURAL_EARTH_DIR
    cartopy.config["data_dir"] = Path(tempfile.gettempdir()) / f"mscn_cartopy_{os.getuid()}"
    downloaders = cartopy.config.setdefault("downloaders", {})
    key = ("shapefiles", "natural_earth")
    orig = downloaders.get(key) or NEShpDownloader.default_downloader()
    downloaders[key] = OfflineNEShpDownloader(
        url_template=orig.url_template,
        target_path_template=orig.target_path_template,
        pre_downloaded_path_template=orig.pre_downloaded_path_template,
    )
    return NATURAL_EARTH_DIR


def _shapefile(name: str, resolution: str = "110m", category: str = "physical") -> Path:
    configure_cartopy()
    path = (
        NATURAL_EARTH_DIR
        / "shapefiles"
        / "natural_earth"
        / category
        / f"ne_{resolution}_{name}.shp"
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"Vendored Natural Earth shapefile missing: {path}. Downloads are disabled; "
            f"copy ne_{resolution}_{name}.* (shp/shx/dbf/prj) into {path.parent}."
        )
    return path


@functools.cache
def _coastline_geometries(resolution: str = "110m") -> tuple:
    from cartopy.io import shapereader

    return tuple(shapereader.Reader(str(_shapefile("coastline", resolution))).geometries())


def _add_coastlines(ax, resolution: str, linewidth: float = 0.6) -> None:
    import cartopy.crs as ccrs
    from cartopy.feature import ShapelyFeature

    feature = ShapelyFeature(_coastline_geometries(resolution), ccrs.PlateCarree())
    ax.add_feature(feature, facecolor="none", edgecolor="black", linewidth=linewidth, zorder=3)


# --------------------------------------------------------------------------- field handling


def _wrap180(lon: np.ndarray) -> np.ndarray:
    return (np.asarray(lon, dtype=float) + 180.0) % 360.0 - 180.0


#: Grid kinds drawn cell by cell from their own coordinates (not a lat x lon product).
_CELL_GRIDS = ("curvilinear", "unstructured")


def _grid(da: xr.DataArray):
    """The reader's description of ``da``'s horizontal grid (one finder: climate's)."""
    return climate.find_grid(da)


def normalize_field(da: xr.DataArray, central_longitude: float = 0.0) -> xr.DataArray:
    """Return ``da`` as float ``(lat, lon)`` with ascending lat and lon in [c-180, c+180).

    Longitudes are expressed relative to the central longitude ``c`` (i.e. the
    returned ``lon`` coordinate is ``wrap(lon - c)`` + 0, in [-180, 180)), which
    is what a ``PlateCarree(central_longitude=c)`` axes uses.  Size-1 extra
    dimensions are squeezed into scalar coordinates; other extra dimensions are
    an error.  Attributes (name, long_name, units) are preserved; ``attrs["grid"]``
    is the grid kind.  Curvilinear fields come back as ``(y, x)`` and unstructured
    ones as ``(cell,)``, with ``lat``/``lon`` coordinates in degrees on those dims
    (lon relative to ``c`` as above), since they have no lat x lon product to sort.
    """
    if not isinstance(da, xr.DataArray):
        raise TypeError(f"expected xarray.DataArray, got {type(da).__name__}")
    if da.attrs.get("grid") in _CELL_GRIDS and da.dims in (("y", "x"), ("cell",)):
        shift = da.attrs.get("central_longitude", 0.0) - central_longitude
        out = da.assign_coords(lon=_wrap180(da["lon"] + shift))  # already normalised
        out.attrs["central_longitude"] = float(central_longitude)
        return out
    grid = _grid(da)
    if grid.kind in _CELL_GRIDS:
        return _normalize_cells(da, grid, central_longitude)
    lat, lon = grid.dims  # 1-D axes: their coordinates may be named apart from the dims
    extra = [d for d in da.dims if d not in (lat, lon)]
    big = [d for d in extra if da.sizes[d] != 1]
    if big:
        raise ValueError(f"field must be 2-D (lat, lon); extra non-singleton dims {big}")
    if extra:
        da = da.squeeze(extra)
    for d in (grid.lat, grid.lon):
        if d not in da.coords:
            raise ValueError(f"dimension {d!r} has no coordinate values; cannot georeference")
    attrs, name = dict(da.attrs), da.name
    scale = np.degrees(1.0) if grid.radians else 1.0
    lat_vals = np.asarray(da[grid.lat].values, dtype=float) * scale
    lon_vals = _wrap180(np.asarray(da[grid.lon].values, dtype=float) * scale - central_longitude)
    skip = {lat, lon, grid.lat, grid.lon}
    scalars = {k: v for k, v in da.coords.items() if k not in skip and v.ndim == 0}
    out = xr.DataArray(
        np.asarray(da.transpose(lat, lon).values, dtype=float),
        dims=("lat", "lon"),
        coords={"lat": lat_vals, "lon": lon_vals},
        name=name,
        attrs=attrs,
    )
    out = out.assign_coords(scalars)
    out = out.isel(lon=np.unique(out["lon"].values, return_index=True)[1])  # sorted, deduped
    out = out.sortby("lat")
    out["lon"].attrs.update(units="degrees_east")
    out["lat"].attrs.update(units="degrees_north")
    out.attrs["central_longitude"] = float(central_longitude)
    if grid.kind != "regular":
        out.attrs["grid"] = grid.kind
    return out


def _normalize_cells(da: xr.DataArray, grid, central_longitude: float) -> xr.DataArray:
    """A curvilinear ``(y, x)`` or unstructured ``(cell,)`` field with degree lat/lon coords."""
    dims = tuple(grid.dims)
    extra = [d for d in da.dims if d not in dims]
    big = [d for d in extra if da.sizes[d] != 1]
    if big:
        raise ValueError(f"field must be one horizontal slice; extra non-singleton dims {big}")
    if extra:
        da = da.squeeze(extra)
    scale = np.degrees(1.0) if grid.radians else 1.0
    lat = np.asarray(da[grid.lat].transpose(*dims).values, dtype=float) * scale
    lon = np.asarray(da[grid.lon].transpose(*dims).values, dtype=float) * scale
    new_dims = ("y", "x") if len(dims) == 2 else ("cell",)
    skip = {grid.lat, grid.lon, *dims}
    scalars = {k: v for k, v in da.coords.items() if k not in skip and v.ndim == 0}
    out = xr.DataArray(
        np.asarray(da.transpose(*dims).values, dtype=float),
        dims=new_dims,
        coords={"lat": (new_dims, lat, {"units": "degrees_north"}),
                "lon": (new_dims, _wrap180(lon - central_longitude), {"units": "degrees_east"})},
        name=da.name,
        attrs=dict(da.attrs),
    )
    out = out.assign_coords(scalars)
    out.attrs.update(central_longitude=float(central_longitude), grid=grid.kind)
    return out


def _spacing(c: np.ndarray) -> float:
    return float(np.median(np.diff(c))) if c.size > 1 else 360.0


def _is_global_lon(lon: np.ndarray) -> bool:
    if lon.size < 2:
        return False
    return abs(lon.size * _spacing(lon) - 360.0) < 0.51 * _spacing(lon) or (
        lon[-1] - lon[0] + _spacing(lon) >= 359.999
    )


def _pad_periodic(da: xr.DataArray) -> xr.DataArray:
    """Add wrapped copies of the first/last longitude column for global grids."""
    lon = da["lon"].values
    if not _is_global_lon(lon):
        return da
    first = da.isel(lon=[0]).assign_coords(lon=[lon[0] + 360.0])
    last = da.isel(lon=[-1]).assign_coords(lon=[lon[-1] - 360.0])
    return xr.concat([last, da, first], dim="lon", coords="minimal", compat="override")


def _edges(c: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    c = np.asarray(c, dtype=float)
    if c.size == 1:
        e = np.array([c[0] - 0.5, c[0] + 0.5])
    else:
        mid = 0.5 * (c[1:] + c[:-1])
        e = np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])
    if lo is not None or hi is not None:
        e = np.clip(e, lo, hi)
    return e


def _mesh(da: xr.DataArray) -> tuple[np.ndarray, np.ndarray, np.ma.MaskedArray]:
    """Cell edges and masked values of a normalised field, padded across the seam."""
    padded = _pad_periodic(da)
    lon_e = _edges(padded["lon"].values)
    lat_e = _edges(padded["lat"].values, -90.0, 90.0)
    if da.attrs.get("grid") == "gaussian":  # its outermost rows are the polar caps
        lat_e[0], lat_e[-1] = -90.0, 90.0
    return lon_e, lat_e, np.ma.masked_invalid(padded.values)


def error_on_truth_grid(truth: xr.DataArray, recon: xr.DataArray) -> xr.DataArray:
    """``recon - truth`` on the truth grid.

    Same grid: the plain difference.  Regular-like recon (1-D lat/lon, e.g. decoded with
    ``--resolution``): bilinear interpolation, periodic in lon, onto the truth's points
    (curvilinear/unstructured truths: where a bilinear neighbour is NaN, e.g. land next to
    a coast, the nearest non-NaN recon value).  Curvilinear/unstructured recon on
    another grid: nearest recon cell (great-circle) to each truth point.
    """
    t = normalize_field(truth)
    r = normalize_field(recon)
    if _same_grid(t, r):
        r_on_t = r.values
    elif r.attrs.get("grid") in _CELL_GRIDS:
        r_on_t = _nearest(r, t)
    else:
        # Periodic in lon (wrapped columns); beyond recon's outermost latitude rows (e.g.
        # truth has the pole rows, recon has cell centres) hold the edge row constant.
        rp = _pad_periodic(r)
        rlat = rp["lat"].values
        if t.attrs.get("grid") in _CELL_GRIDS:
            pts = {k: xr.DataArray(np.ravel(t[k].values), dims="pt") for k in ("lat", "lon")}
            pts["lat"] = pts["lat"].clip(rlat.min(), rlat.max())
            r_on_t = rp.interp(pts, method="linear").values.reshape(t.shape)
            gap = np.isnan(r_on_t) & np.isfinite(t.values)  # a NaN (land) neighbour
            if gap.any() and np.isfinite(r.values).any():
                r_on_t[gap] = _nearest(r, t.where(gap), finite_only=True)[gap]
        else:
            r_on_t = rp.interp(
                lat=np.clip(t["lat"].values, rlat.min(), rlat.max()),
                lon=t["lon"].values,
                method="linear",
            ).values
    err = t.copy(data=r_on_t - t.values)
    err.name = f"{t.name}_error" if t.name else "error"
    err.attrs = {
        "long_name": f"{_long_name(t)} error (recon − truth)",
        "units": t.attrs.get("units", ""),
    }
    for k in ("grid", "central_longitude"):
        if k in t.attrs:
            err.attrs[k] = t.attrs[k]
    return err


def _same_grid(a: xr.DataArray, b: xr.DataArray) -> bool:
    if a.dims != b.dims or a.shape != b.shape:
        return False
    return all(np.allclose(a[k].values, b[k].values) for k in ("lat", "lon"))


def _points(da: xr.DataArray) -> np.ndarray:
    """Unit vectors of every value's position (1-D grids: the lat x lon product)."""
    lat, lon = np.asarray(da["lat"].values, float), np.asarray(da["lon"].values, float)
    if da.dims == ("lat", "lon"):
        lat, lon = np.meshgrid(lat, lon, indexing="ij")
    return _xyz(lat, lon + da.attrs.get("central_longitude", 0.0)).reshape(-1, 3)


def _nearest(src: xr.DataArray, dst: xr.DataArray, finite_only: bool = False) -> np.ndarray:
    """``src`` values at ``dst``'s points: nearest neighbour on the sphere (chord kd-tree);
    ``finite_only``: the nearest non-NaN one (coastal points next to a masked cell)."""
    from scipy.spatial import cKDTree

    pts, vals = _points(src), np.ravel(src.values)
    if finite_only:
        ok = np.isfinite(vals)
        pts, vals = pts[ok], vals[ok]
    _, idx = cKDTree(pts).query(_points(dst))
    return vals[idx].reshape(dst.shape)


# --------------------------------------------------------------------------- labels


def _long_name(da: xr.DataArray) -> str:
    ln = da.attrs.get("long_name") or da.attrs.get("standard_name") or da.name or "field"
    return str(ln)


def _var_label(da: xr.DataArray) -> str:
    ln = _long_name(da)
    if da.name and str(da.name) != ln:
        return f"{ln} ({da.name})"
    return ln


def _units(da: xr.DataArray) -> str:
    return str(da.attrs.get("units", "")).strip()


def _cbar_label(da: xr.DataArray, prefix: str | None = None) -> str:
    u = _units(da)
    base = prefix or _var_label(da)
    return f"{base} [{u}]" if u else base


def _fmt_date(d: Any, climatology: bool = False) -> str:
    """``2017-01-01 12:00`` (time dropped at midnight); ``Jan 16 (climatology)`` for a
    climatological axis, whose year (often 0) means nothing."""
    if climatology:
        return f"{calendar.month_abbr[d.month]} {d.day} (climatology)"
    s = f"{d.year:04d}-{d.month:02d}-{d.day:02d}"
    return s if (d.hour, d.minute) == (0, 0) else f"{s} {d.hour:02d}:{d.minute:02d}"


def _decode_time(v: Any, attrs: Mapping[str, Any]) -> str | None:
    """A numeric time with CF ``units="<unit> since <date>"`` as a date, or None.

    Why: readers leave times they cannot decode numeric (COADS ``hour since 0000-01-01``
    has a year 0 that the standard calendar lacks; a recon may carry raw times), and
    ``TIME=366`` says nothing. cftime decodes them, year 0 allowed on a second try.
    """
    units = str(attrs.get("units", ""))
    if " since " not in units or np.asarray(v).dtype.kind not in "fiu":
        return None
    import cftime

    cal = str(attrs.get("calendar", "standard")).strip().lower() or "standard"
    for extra in ({}, {"has_year_zero": True}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                d = cftime.num2date(float(v), units, calendar=cal, **extra)
        except Exception:  # noqa: BLE001 - undecodable units: the raw value is shown
            continue
        clim = d.year == 0 or "modulo" in attrs or "climatology" in attrs
        return _fmt_date(d, clim)
    return _months_since(v, units, cal, attrs)


def _months_since(v: Any, units: str, cal: str, attrs: Mapping[str, Any]) -> str | None:
    """``months since 1958-1-1`` (NCAR files): cftime refuses it outside 360_day because a
    month has no fixed length; a whole number of calendar months is still a clear date."""
    import cftime

    unit, _, ref = units.partition(" since ")
    if unit.strip().lower() not in ("month", "months") or float(v) != round(float(v)):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = cftime.num2date(0, f"days since {ref}", calendar=cal, has_year_zero=True)
    except Exception:  # noqa: BLE001
        return None
    year, month = divmod(r.month - 1 + int(round(float(v))), 12)
    d = SimpleNamespace(year=r.year + year, month=month + 1, day=r.day, hour=r.hour,
                        minute=r.minute)
    return _fmt_date(d, d.year == 0 or "modulo" in attrs or "climatology" in attrs)


def _fmt_scalar(v: Any, attrs: Mapping[str, Any] | None = None) -> str:
    """A scalar coordinate value for a title; numeric CF times (``attrs`` units) as dates."""
    v = np.asarray(v)
    if attrs:
        date = _decode_time(v, attrs)
        if date is not None:
            return date
    if np.issubdtype(v.dtype, np.datetime64):
        s = np.datetime_as_string(v, unit="m").replace("T", " ")
        return s[:-6] if s.endswith(" 00:00") else s
    if np.issubdtype(v.dtype, np.timedelta64):
        hours = v / np.timedelta64(1, "h")
        return f"{hours:g}h"
    if np.issubdtype(v.dtype, np.floating):
        return f"{float(v):g}"
    item = v.item() if v.ndim == 0 else v
    if all(hasattr(item, a) for a in ("year", "month", "day", "calendar")):  # cftime object
        return _fmt_date(item)
    return str(item)


def _redundant_coord(da: xr.DataArray, name: str) -> bool:
    """Hide cfgrib's ``step=0``, a ``valid_time`` equal to ``time``, and a NetCDF fill
    value (SEAM's ``time=9.96921e+36``): it says "no value", not a time."""
    try:
        v = da.coords[name].values
        fill = da.coords[name].attrs.get("_FillValue", da.coords[name].encoding.get("_FillValue"))
        if np.asarray(v).dtype.kind == "f" and (abs(float(v)) >= 9.9e36 or v == fill):
            return True
        if name == "step":
            return bool(np.all(np.asarray(v).astype(float) == 0))
        if name == "valid_time" and "time" in da.coords and da.coords["time"].ndim == 0:
            return bool(v == da.coords["time"].values)
    except Exception:
        return False
    return False


def item_identity(da: xr.DataArray) -> str:
    """``number=3 · time=2017-01-01 12:00 · isobaricInhPa=850`` from scalar coords."""
    lat, lon = (None, None)
    try:
        grid = _grid(da)
        lat, lon = grid.lat, grid.lon
    except ValueError:  # ClimateDataError: no recognisable axes
        pass
    parts = []
    for k, c in da.coords.items():
        if k in (lat, lon, "lat", "lon") or c.ndim != 0:
            continue
        if _redundant_coord(da, str(k)):
            continue
        try:
            parts.append(f"{k}={_fmt_scalar(c.values, c.attrs)}")
        except Exception:  # identity is cosmetic
            continue
    return " · ".join(parts)


_STAT_UNITS = {
    "psnr": ("PSNR", "{:.1f} dB"),
    "rmse": ("RMSE", "{:.3g} {u}"),
    "mae": ("MAE", "{:.3g} {u}"),
    "max_abs_error": ("max|err|", "{:.3g} {u}"),
    "maxerr": ("max|err|", "{:.3g} {u}"),
    "max_error": ("max|err|", "{:.3g} {u}"),
    "bpv": (None, "{:.3g} bits/value"),
    "bits_per_value": (None, "{:.3g} bits/value"),
    "bits/value": (None, "{:.3g} bits/value"),
    "ratio": ("ratio", "{:.1f}×"),
    "compression_ratio": ("ratio", "{:.1f}×"),
    "cr": ("ratio", "{:.1f}×"),
    "bytes": (None, "{:,.0f} bytes"),
}


def format_stats(stats: Mapping[str, Any] | None, units: str = "") -> str:
    """Format a stats dict, e.g. ``PSNR 41.2 dB | RMSE 1.07 K | 0.043 bits/value``."""
    if not stats:
        return ""
    out = []
    for key, val in stats.items():
        norm = str(key).strip().lower().replace(" ", "_")
        if isinstance(val, str) or not np.isscalar(val) or isinstance(val, bool):
            out.append(f"{key} {val}")
            continue
        label, fmt = _STAT_UNITS.get(norm, (str(key), "{:.4g}"))
        text = fmt.format(float(val), u=units).strip()
        out.append(f"{label} {text}" if label else text)
    return " | ".join(out)


# --------------------------------------------------------------------------- scales


def _robust_range(values: np.ndarray, robust: bool = True) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99]) if robust else (v.min(), v.max())
    if not hi > lo:
        lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi)


def _symmetric_range(err: np.ndarray) -> float:
    a = np.abs(np.asarray(err, dtype=float))
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 1.0
    m = float(np.percentile(a, 99))
    if not m > 0:
        m = float(a.max())
    return m if m > 0 else 1.0


# --------------------------------------------------------------------------- drawing


def _projection(kind: str, central_longitude: float, central_latitude: float):
    import cartopy.crs as ccrs

    if kind == "platecarree":
        return ccrs.PlateCarree(central_longitude=central_longitude)
    if kind == "robinson":
        return ccrs.Robinson(central_longitude=central_longitude)
    if kind == "orthographic":
        return ccrs.Orthographic(
            central_longitude=central_longitude, central_latitude=central_latitude
        )
    raise ValueError(f"unknown projection {kind!r}; choose one of {', '.join(PROJECTIONS)}")


def _draw(
    ax,
    da: xr.DataArray,
    kind: str,
    central_longitude: float,
    *,
    cmap,
    vmin,
    vmax,
    coastlines: bool,
    coast_resolution: str,
    gridlines: bool = False,
):
    """Draw one normalised-at-lon-0 field onto a GeoAxes; returns the colour-bar mappable."""
    from matplotlib.colors import Normalize

    grid = da.attrs.get("grid", "regular")
    if grid in _CELL_GRIDS:
        mesh = _draw_cells(ax, da, kind, central_longitude, cmap, Normalize(vmin, vmax))
    else:
        mesh = _draw_mesh(ax, da, kind, central_longitude, cmap, vmin, vmax)
    _frame(ax, da, kind)
    if coastlines:
        _add_coastlines(ax, coast_resolution)
    if gridlines:
        ax.gridlines(linewidth=0.3, color="0.4", alpha=0.6, linestyle=":")
    return mesh


def _draw_mesh(ax, da: xr.DataArray, kind: str, central_longitude: float, cmap, vmin, vmax):
    """A field on 1-D lat/lon axes as one pcolormesh."""
    import cartopy.crs as ccrs

    if kind in ("platecarree", "robinson"):
        # Maps: shift the data itself so the map's seam (c ± 180) is the data's lon ±180 and
        # the source CRS shares the map's centre: no cell straddles the seam.
        field = normalize_field(da, central_longitude)
        transform = ccrs.PlateCarree(central_longitude=central_longitude)
    else:
        field = normalize_field(da, 0.0)
        transform = ccrs.PlateCarree()
    lon_e, lat_e, values = _mesh(field)
    if kind == "robinson":
        # The wrapped seam columns would project onto the far edge of a curved map; clip
        # them to the seam instead (a PlateCarree map clips them by its rectangular frame).
        lon_e = np.clip(lon_e, -179.999, 179.999)
    return ax.pcolormesh(
        lon_e,
        lat_e,
        values,
        transform=transform,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        shading="flat",
        rasterized=True,
    )


# --------------------------------------------------------------------------- cell grids

_LIM = 179.999  # seam copies are clipped just inside the map's edge (see _map_polygons)
_HORIZON_EPS = 1e-4  # hidden globe points are pulled this far in front of the horizon
_GEOMETRY: dict = {}  # cell geometry by (shape, lat bytes, lon bytes); frames reuse it


def _xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], -1)


def _latlon(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    lat = np.degrees(np.arcsin(np.clip(p[..., 2], -1.0, 1.0)))
    return lat, np.degrees(np.arctan2(p[..., 1], p[..., 0]))


def _quad_corners(centres: np.ndarray) -> np.ndarray:
    """(ny+1, nx+1, 3) cell corners of a curvilinear grid: means of the four surrounding
    centres on the unit sphere (edges extrapolated), so the lon seam needs no unwrapping."""
    q = np.pad(centres, ((1, 1), (1, 1), (0, 0)), mode="reflect", reflect_type="odd")
    c = 0.25 * (q[:-1, :-1] + q[1:, :-1] + q[:-1, 1:] + q[1:, 1:])
    return c / np.linalg.norm(c, axis=-1, keepdims=True)


def _voronoi_cells(points: np.ndarray) -> np.ndarray:
    """(n, k, 3) spherical Voronoi polygons around ``points`` (the dual of the Delaunay
    triangulation that scipy's ConvexHull gives), padded by repeating the last vertex."""
    from scipy.spatial import SphericalVoronoi

    _, first, inverse = np.unique(np.round(points, 9), axis=0, return_index=True,
                                  return_inverse=True)
    sv = SphericalVoronoi(points[first], radius=1.0, threshold=1e-6)
    sv.sort_vertices_of_regions()
    k = max(len(r) for r in sv.regions)
    idx = np.array([r + [r[-1]] * (k - len(r)) for r in sv.regions])
    return sv.vertices[idx][np.ravel(inverse)]


def _cell_geometry(field: xr.DataArray) -> tuple[str, np.ndarray]:
    """``("quads", corners)`` for a curvilinear grid whose index neighbours are neighbours
    on the sphere, else ``("polygons", voronoi cells)`` -- e.g. unstructured cells, or
    a cubed sphere stored as an arbitrary 2-D array (SEAM), whose quads would overlap."""
    lat = np.asarray(field["lat"].values, dtype=float)
    lon = np.asarray(field["lon"].values, dtype=float) + field.attrs.get("central_longitude", 0)
    key = (lat.shape, lat.tobytes(), _wrap180(lon).tobytes())
    if key in _GEOMETRY:
        return _GEOMETRY[key]
    centres = _xyz(lat, lon)
    geom = None
    if lat.ndim == 2 and min(lat.shape) >= 2:
        c = _quad_corners(centres)
        area = 0.5 * np.linalg.norm(np.cross(c[1:, 1:] - c[:-1, :-1], c[1:, :-1] - c[:-1, 1:]),
                                    axis=-1).sum()
        if area < 1.3 * 4 * np.pi:  # a true mesh tiles (part of) the sphere once
            geom = ("quads", c)
    if geom is None:
        geom = ("polygons", _voronoi_cells(centres.reshape(-1, 3)))
    if len(_GEOMETRY) > 16:
        _GEOMETRY.clear()
    _GEOMETRY[key] = geom
    return geom


def _map_polygons(lon: np.ndarray, lat: np.ndarray):
    """Polygons (n, k) in map-relative lon [-180, 180) -> (vertex list, source index).

    Why: a cell whose corners straddle the map's seam would be drawn as a band across the
    whole map.  Its corners are unwrapped to be contiguous and it is drawn twice, once
    per side, clipped to the edge; a cell around a pole becomes the band up to the pole.
    """
    d = _wrap180(np.diff(lon, axis=1))
    lu = np.concatenate([lon[:, :1], lon[:, :1] + np.cumsum(d, axis=1)], axis=1)
    winding = lu[:, -1] - lu[:, 0] + _wrap180(lu[:, 0] - lu[:, -1])
    pole = np.abs(winding) > 180.0
    cross = ~pole & ((lu.max(1) >= 180.0) | (lu.min(1) < -180.0))
    verts, src = [], []
    for i in np.flatnonzero(~pole & ~cross):
        verts.append(np.stack([lu[i], lat[i]], -1))
        src.append(i)
    for i in np.flatnonzero(cross):
        shift = -360.0 if lu[i].max() >= 180.0 else 360.0
        for u in (lu[i], lu[i] + shift):
            verts.append(np.stack([np.clip(u, -_LIM, _LIM), lat[i]], -1))
            src.append(i)
    for i in np.flatnonzero(pole):
        o = np.argsort(lon[i])
        lo_, la_ = lon[i][o], lat[i][o]
        edge, top = 0.5 * (la_[0] + la_[-1]), 90.0 * np.sign(la_.mean())
        ring = [(-_LIM, top), (-_LIM, edge), *zip(lo_, la_, strict=True), (_LIM, edge), (_LIM, top)]
        verts.append(np.array(ring, dtype=float))
        src.append(i)
    return verts, np.array(src, dtype=int), pole | cross


def _on_globe(p: np.ndarray, proj) -> tuple[np.ndarray, np.ndarray]:
    """Orthographic view: points behind the globe are pulled onto the horizon, so cells
    cut by it end at the limb; returns the lat/lon and which points were visible."""
    lon0 = np.radians(proj.proj4_params.get("lon_0", 0.0))
    lat0 = np.radians(proj.proj4_params.get("lat_0", 0.0))
    v = np.array([np.cos(lat0) * np.cos(lon0), np.cos(lat0) * np.sin(lon0), np.sin(lat0)])
    dot = p @ v
    hidden = dot < _HORIZON_EPS
    p = np.where(hidden[..., None], p - (dot - _HORIZON_EPS)[..., None] * v, p)
    lat, lon = _latlon(p)
    return np.stack([lon, lat], -1), ~hidden


def _project(ax, lonlat: np.ndarray, src_crs) -> np.ndarray:
    flat = lonlat.reshape(-1, 2)
    xy = ax.projection.transform_points(src_crs, flat[:, 0], flat[:, 1])[:, :2]
    return xy.reshape(lonlat.shape)


def _draw_cells(ax, field: xr.DataArray, kind: str, central_longitude: float, cmap, norm):
    """Curvilinear / unstructured field onto a GeoAxes in the axes' own coordinates.

    Curvilinear grids are a QuadMesh of their corners; cells straddling a map's seam
    (and unstructured cells, as spherical Voronoi polygons) are a PolyCollection.
    NaN cells are not drawn.  Returns the first collection (the colour-bar mappable).
    """
    import cartopy.crs as ccrs
    from matplotlib.collections import PolyCollection, QuadMesh

    what, geom = _cell_geometry(field)
    values = np.asarray(field.values, dtype=float)
    finite = np.isfinite(values)
    globe_view = kind == "orthographic"
    if globe_view:
        src = ccrs.PlateCarree()
        lonlat, seen = _on_globe(geom, ax.projection)
    else:
        src = ccrs.PlateCarree(central_longitude=central_longitude)
        lat, lon = _latlon(geom)
        lonlat, seen = np.stack([_wrap180(lon - central_longitude), lat], -1), None
    style = {"cmap": cmap, "norm": norm, "rasterized": True}
    first = None
    if what == "quads":
        cells = np.stack([lonlat[:-1, :-1], lonlat[:-1, 1:], lonlat[1:, 1:], lonlat[1:, :-1]],
                         axis=2)  # (ny, nx, 4, 2)
        vals = values.reshape(cells.shape[:2])
        hide = ~np.isfinite(vals)
        if globe_view:
            hide |= ~(seen[:-1, :-1] | seen[:-1, 1:] | seen[1:, 1:] | seen[1:, :-1])
            polys, src_idx = [], np.zeros(0, int)
        else:
            flat = cells.reshape(-1, 4, 2)
            polys, src_idx, odd = _map_polygons(flat[..., 0], flat[..., 1])
            keep = odd[src_idx] & np.isfinite(vals.ravel()[src_idx])
            polys = [v for v, k in zip(polys, keep, strict=True) if k]
            src_idx = src_idx[keep]
            hide |= odd.reshape(hide.shape)
        xy = _project(ax, lonlat, src)
        first = QuadMesh(xy, shading="flat", antialiased=False, **style)
        first.set_array(np.ma.masked_array(vals, hide))
        ax.add_collection(first, autolim=False)
        pvals = vals.ravel()[src_idx]
    else:
        vals = values.ravel()
        if globe_view:
            keep = np.flatnonzero(finite.ravel() & seen.any(axis=1))
            polys, src_idx = list(lonlat[keep]), keep
        else:
            polys, src_idx, _ = _map_polygons(lonlat[..., 0], lonlat[..., 1])
            ok = finite.ravel()[src_idx]
            polys = [v for v, k in zip(polys, ok, strict=True) if k]
            src_idx = src_idx[ok]
        pvals = vals[src_idx]
    if polys or first is None:
        sizes = [len(v) for v in polys]
        xy = _project(ax, np.concatenate(polys), src) if polys else np.zeros((0, 2))
        verts = np.split(xy, np.cumsum(sizes)[:-1]) if polys else []
        coll = PolyCollection(verts, array=pvals, antialiased=False, linewidths=0, **style)
        ax.add_collection(coll, autolim=False)
        first = first or coll
    return first


def _region(da: xr.DataArray) -> tuple[float, float, float, float] | None:
    """(lon0, lon1, lat0, lat1) of a regional field, lon0 < lon1 unwrapped, else None."""
    if da.attrs.get("grid") != "regional":
        return None
    lon = np.sort(np.unique(_wrap180(np.asarray(da["lon"].values, dtype=float)
                                     + da.attrs.get("central_longitude", 0.0))))
    lat = np.asarray(da["lat"].values, dtype=float)
    gaps = np.diff(np.concatenate([lon, [lon[0] + 360.0]]))
    start = (int(np.argmax(gaps)) + 1) % lon.size  # the region begins after the widest gap
    lon0 = lon[start]
    lon1 = lon0 + float((lon[start - 1] - lon0) % 360.0)
    dx, dy = 0.5 * _spacing(lon), 0.5 * _spacing(np.sort(lat))
    return (lon0 - dx, lon1 + dx, max(lat.min() - dy, -90.0), min(lat.max() + dy, 90.0))


def _frame(ax, da: xr.DataArray, kind: str) -> None:
    """Whole globe, or a regional field's own box on a map (a globe shows it whole)."""
    box = _region(da)
    if box is None or kind == "orthographic":
        ax.set_global()
        return
    import cartopy.crs as ccrs

    lon0, lon1, lat0, lat1 = box
    mid = 0.5 * (lon0 + lon1)
    ax.set_extent((lon0 - mid, lon1 - mid, lat0, lat1), crs=ccrs.PlateCarree(central_longitude=mid))


def _centre(da: xr.DataArray, central_longitude: float, central_latitude: float
            ) -> tuple[float, float]:
    """Where to centre maps and globes: a regional field's middle, else as asked."""
    box = _region(da)
    if box is None:
        return central_longitude, central_latitude
    return float(_wrap180(0.5 * (box[0] + box[1]))), 0.5 * (box[2] + box[3])


def _new_figure(figsize, dpi, layout=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout=layout, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _write_file(path, write: Callable[[str], object], overwrite: bool) -> Path:
    """:func:`mscn_core.atomic.write_atomic`, creating the destination folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, write, overwrite=overwrite)


def _save_png(fig, path, overwrite: bool) -> Path:
    try:
        return _write_file(path, lambda tmp: fig.savefig(tmp, format="png"), overwrite)
    finally:
        fig.clear()


def _check_projection(projection: str) -> list[str]:
    """The rows of a ``projection`` choice, or a one-line error listing the choices."""
    p = str(projection).lower().replace("_", "").replace(" ", "").replace("-", "")
    if p == "both":
        return ["platecarree", "orthographic"]
    if p in PROJECTIONS:
        return [p]
    raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(PROJECTIONS)}")


def _check_panels(panels: str | Sequence[str]) -> list[str]:
    """``"truth,recon,error"`` (or a list) → validated panel names, in the order given."""
    items = str(panels).split(",") if isinstance(panels, str) else list(panels)
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    names = ["recon" if n in ("reconstruction", "rec") else n for n in names]
    choices = ",".join(PANELS)
    if not names:
        raise ValueError(f"no panels given; pick a comma-separated subset of {choices}")
    for n in names:
        if n not in PANELS:
            raise ValueError(f"unknown panel {n!r}; pick a comma-separated subset of {choices}")
    if len(set(names)) != len(names):
        raise ValueError(f"panels {','.join(names)!r} repeat a panel; each of {choices} once")
    return names


def _check_cmap(cmap: str, what: str = "cmap") -> str:
    """A colormap name registered with matplotlib, or a one-line error with close matches."""
    import matplotlib

    if isinstance(cmap, str) and cmap in matplotlib.colormaps:
        return cmap
    close = difflib.get_close_matches(str(cmap), list(matplotlib.colormaps), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "e.g. viridis, magma, RdBu_r"
    raise ValueError(f"unknown {what} {cmap!r} (not in matplotlib.colormaps); {hint}")


def _colour_limits(
    values: np.ndarray, vmin: float | None, vmax: float | None, robust: bool
) -> tuple[float, float]:
    """Explicit ``vmin``/``vmax`` override the robust (1st–99th percentile) range."""
    for name, v in (("vmin", vmin), ("vmax", vmax)):
        if v is not None and not np.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    lo, hi = (0.0, 1.0) if vmin is not None and vmax is not None else _robust_range(values, robust)
    lo = float(vmin) if vmin is not None else lo
    hi = float(vmax) if vmax is not None else hi
    if not lo < hi:
        raise ValueError(f"colour limits need vmin < vmax, got vmin={lo:g}, vmax={hi:g}")
    return lo, hi


def _row_height(kind: str) -> float:
    return _ORTHO_ROW_H if kind == "orthographic" else _PC_ROW_H


def globe_figsize(
    projection: str = "both", panels: str | Sequence[str] = PANELS
) -> tuple[float, float]:
    """Figure size in inches used by :func:`render_globe` (pixels = inches * dpi)."""
    rows = _check_projection(projection)
    n = len(_check_panels(panels))
    h = _HEADER_H + _CBAR_H + sum(_row_height(r) for r in rows)
    return (max(n * _PANEL_W, _MIN_W), h)


def _title_block(truth: xr.DataArray, title: str | None, stats: Mapping | None) -> str:
    ident = item_identity(truth)
    first = title if title else _var_label(truth)
    lines = [f"{first} — {ident}" if ident else first]
    s = format_stats(stats, _units(truth))
    if s:
        lines.append(s)
    return "\n".join(lines)


def render_globe(
    truth: xr.DataArray,
    recon: xr.DataArray,
    path,
    *,
    title: str | None = None,
    stats: dict | None = None,
    projection: str = "both",
    central_longitude: float = 0.0,
    dpi=110,
    error: xr.DataArray | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    panels: str | Sequence[str] = "truth,recon,error",
    error_cmap: str = "RdBu_r",
    robust: bool = True,
    central_latitude: float = 20.0,
    coast_resolution: str = "110m",
    overwrite: bool = True,
) -> Path:
    """Render truth | reconstruction | error panels and write a PNG atomically.

    ``truth``/``recon`` are horizontal fields on possibly different grids (any kind
    :func:`normalize_field` takes).  The error (recon − truth) is computed on the truth
    grid by :func:`error_on_truth_grid` unless ``error`` is given.  Truth and recon share
    one colour scale (truth's 1st–99th percentiles, or min/max if
    ``robust=False``; ``vmin``/``vmax`` override either end); the error uses
    ``error_cmap`` symmetric about zero at ±99th percentile of |error|.
    ``projection`` is "both" (PlateCarree row and Orthographic row), "platecarree",
    "robinson" or "orthographic", all centred on ``central_longitude``.  ``panels``
    picks the columns and their order (a comma-separated subset of truth,recon,error;
    "error" alone is a difference-only view).  Options are checked before anything
    is drawn; a bad one is a one-line :class:`ValueError`.  Image size in pixels is
    ``globe_figsize(projection, panels) * dpi``.  Returns the written path.
    """
    rows = _check_projection(projection)
    cols = _check_panels(panels)
    _check_cmap(cmap)
    _check_cmap(error_cmap, "error_cmap")
    if not overwrite and Path(path).exists():
        raise FileExistsError(f"{path} exists and overwrite=False")
    configure_cartopy()
    t = normalize_field(truth)
    r = normalize_field(recon)
    central_longitude, central_latitude = _centre(t, central_longitude, central_latitude)
    vmin, vmax = _colour_limits(t.values, vmin, vmax, robust)
    err = normalize_field(error) if error is not None else error_on_truth_grid(truth, recon)
    emax = _symmetric_range(err.values)
    finite = np.isfinite(err.values)
    rmse = float(np.sqrt(np.mean(err.values[finite] ** 2))) if finite.any() else float("nan")
    units = _units(t)

    fig = _new_figure(globe_figsize(projection, cols), dpi, layout="constrained")
    gs = fig.add_gridspec(len(rows), len(cols), height_ratios=[_row_height(k) for k in rows])
    field_axes, err_axes = [], []
    mesh_f = mesh_e = None
    col_titles = {
        "truth": "Truth",
        "recon": "Reconstruction"
        + (f"  ({'×'.join(str(n) for n in r.shape)})" if r.shape != t.shape else ""),
        "error": f"Error (recon − truth), RMSE {rmse:.3g} {units}".rstrip(),
    }
    fields = {"truth": t, "recon": r, "error": err}
    for i, kind in enumerate(rows):
        proj = _projection(kind, central_longitude, central_latitude)
        for j, name in enumerate(cols):
            is_err = name == "error"
            ax = fig.add_subplot(gs[i, j], projection=proj)
            m = _draw(
                ax,
                fields[name],
                kind,
                central_longitude,
                cmap=error_cmap if is_err else cmap,
                vmin=-emax if is_err else vmin,
                vmax=emax if is_err else vmax,
                coastlines=True,
                coast_resolution=coast_resolution,
                gridlines=kind == "orthographic",
            )
            if i == 0:
                ax.set_title(col_titles[name], fontsize=10)
            (err_axes if is_err else field_axes).append(ax)
            if is_err:
                mesh_e = m
            else:
                mesh_f = m
    if mesh_f is not None:
        wide = len(field_axes) > len(rows)  # the bar spans truth and recon
        cb = fig.colorbar(mesh_f, ax=field_axes, location="bottom", shrink=0.6 if wide else 0.9,
                          aspect=40 if wide else 20, extend="both", pad=0.02)
        cb.set_label(_cbar_label(t))
    if mesh_e is not None:
        cbe = fig.colorbar(
            mesh_e, ax=err_axes, location="bottom", shrink=0.9, aspect=20, extend="both", pad=0.02
        )
        cbe.set_label(_cbar_label(t, "recon − truth"))
    fig.suptitle(_title_block(truth, title, stats), fontsize=12)
    return _save_png(fig, path, overwrite)


def render_field(
    da: xr.DataArray,
    path,
    *,
    title: str | None = None,
    projection: str = "platecarree",
    central_longitude: float = 0.0,
    dpi=110,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    robust: bool = True,
    stats: dict | None = None,
    central_latitude: float = 20.0,
    coastlines: bool = True,
    colorbar: bool = True,
    bare: bool = False,
    figsize: tuple[float, float] | None = None,
    coast_resolution: str = "110m",
    overwrite: bool = True,
) -> Path:
    """Render a single field (one panel per projection) and write a PNG atomically.

    ``bare=True`` draws only the map: no title, colour bar, frame or margins;
    the axes fill the whole figure, so for ``projection="platecarree"`` pixel
    ``(x, y)`` of a ``W×H`` image maps linearly to lon ``c-180..c+180`` (left to
    right) and lat ``90..-90`` (top to bottom).  Default ``figsize`` is
    (8, 4.6) per panel, or (8, 4) bare.
    """
    kinds = _check_projection(projection)
    _check_cmap(cmap)
    if not overwrite and Path(path).exists():
        raise FileExistsError(f"{path} exists and overwrite=False")
    configure_cartopy()
    f = normalize_field(da)
    central_longitude, central_latitude = _centre(f, central_longitude, central_latitude)
    vmin, vmax = _colour_limits(f.values, vmin, vmax, robust)
    if bare:
        colorbar = False
        figsize = figsize or (8.0 * len(kinds), 4.0)
        fig = _new_figure(figsize, dpi)
    else:
        figsize = figsize or (8.0 * len(kinds), 4.6 if kinds == ["platecarree"] else 5.4)
        fig = _new_figure(figsize, dpi, layout="constrained")
    axes, mesh = [], None
    for j, kind in enumerate(kinds):
        proj = _projection(kind, central_longitude, central_latitude)
        if bare:
            w = 1.0 / len(kinds)
            ax = fig.add_axes((j * w, 0.0, w, 1.0), projection=proj)
            ax.spines["geo"].set_visible(False)
        else:
            ax = fig.add_subplot(1, len(kinds), j + 1, projection=proj)
        mesh = _draw(
            ax,
            f,
            kind,
            central_longitude,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            coastlines=coastlines,
            coast_resolution=coast_resolution,
            gridlines=kind == "orthographic" and not bare,
        )
        axes.append(ax)
    if colorbar:
        cb = fig.colorbar(
            mesh, ax=axes, location="bottom", shrink=0.7, aspect=40, extend="both", pad=0.03
        )
        cb.set_label(_cbar_label(f))
    if not bare:
        fig.suptitle(_title_block(da, title, stats), fontsize=11)
    return _save_png(fig, path, overwrite)


def rotating_globe_gif(
    da: xr.DataArray,
    path,
    frames=24,
    dpi=80,
    *,
    truth: xr.DataArray | None = None,
    panels: str | Sequence[str] | None = None,
    projection: str = "orthographic",
    central_longitude: float = 0.0,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    error_cmap: str = "RdBu_r",
    robust: bool = True,
    central_latitude: float = 20.0,
    duration_ms: int = 120,
    title: str | None = None,
    coastlines: bool = True,
    coast_resolution: str = "110m",
    overwrite: bool = True,
) -> Path:
    """Write an animated GIF of Orthographic globes rotating eastward through 360°.

    ``da`` is the reconstruction.  With ``truth``, each frame shows the ``panels``
    (default truth, recon, error) side by side, all centred on the same longitude;
    without it, the reconstruction alone.  Frame ``k`` is centred on longitude
    ``central_longitude + 360·k/frames``; all frames share one colour scale (the
    truth's, as in :func:`render_globe`; ``vmin``/``vmax`` override it).

    The rotating frames are always Orthographic globes: rotating a flat map only
    scrolls it sideways, so ``projection`` (validated: a typo is still an error) does
    not change the animation and ``central_longitude`` is where the rotation starts.
    Written atomically with pillow.
    """
    from PIL import Image

    frames = int(frames)
    if frames < 1:
        raise ValueError("frames must be >= 1")
    _check_projection(projection)
    if panels is None:
        panels = PANELS if truth is not None else ("recon",)
    cols = _check_panels(panels)
    if truth is None and set(cols) - {"recon"}:
        raise ValueError(f"panels {','.join(cols)!r} need the truth field (truth=...)")
    _check_cmap(cmap)
    _check_cmap(error_cmap, "error_cmap")
    if not overwrite and Path(path).exists():
        raise FileExistsError(f"{path} exists and overwrite=False")
    configure_cartopy()
    f = normalize_field(da)
    fields = {"recon": f}
    if truth is not None:
        fields["truth"] = normalize_field(truth)
        fields["error"] = error_on_truth_grid(truth, da)
    ref = fields.get("truth", f)
    central_longitude, central_latitude = _centre(ref, central_longitude, central_latitude)
    vmin, vmax = _colour_limits(ref.values, vmin, vmax, robust)
    emax = _symmetric_range(fields["error"].values) if "error" in fields else 1.0
    labelled = truth if truth is not None else da
    head = title if title else _var_label(labelled)
    ident = item_identity(labelled)
    names = {"truth": "Truth", "recon": "Reconstruction", "error": "Error (recon − truth)"}

    n = len(cols)
    fig = _new_figure((4.0 * n, 4.6), dpi)
    images = []
    try:
        for k in range(frames):
            lon0 = float(_wrap180(central_longitude + 360.0 * k / frames))
            fig.clear()
            for j, name in enumerate(cols):
                x0, w = j / n, 1.0 / n
                is_err = name == "error"
                ax = fig.add_axes(
                    (x0 + 0.04 * w, 0.17, 0.92 * w, 0.70 if n == 1 else 0.66),
                    projection=_projection("orthographic", lon0, central_latitude),
                )
                mesh = _draw(
                    ax,
                    fields[name],
                    "orthographic",
                    lon0,
                    cmap=error_cmap if is_err else cmap,
                    vmin=-emax if is_err else vmin,
                    vmax=emax if is_err else vmax,
                    coastlines=coastlines,
                    coast_resolution=coast_resolution,
                    gridlines=True,
                )
                if n > 1:
                    ax.set_title(names[name], fontsize=9, pad=3)
                cax = fig.add_axes((x0 + 0.12 * w, 0.09, 0.76 * w, 0.035))
                cb = fig.colorbar(mesh, cax=cax, orientation="horizontal", extend="both")
                cb.set_label(_cbar_label(ref, "recon − truth" if is_err else None), fontsize=8)
                cb.ax.tick_params(labelsize=7)
            fig.suptitle(f"{head}\n{ident}" if ident else head, fontsize=9, y=0.985)
            hemi = "E" if lon0 >= 0 else "W"
            fig.text(
                0.98, 0.885 if n == 1 else 0.93, f"centre {abs(lon0):.0f}°{hemi}", ha="right",
                fontsize=7, color="0.3",
            )
            fig.canvas.draw()
            rgba = np.asarray(fig.canvas.buffer_rgba())
            images.append(Image.fromarray(rgba[..., :3].copy()))
    finally:
        fig.clear()

    def write(tmp: str) -> None:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=int(duration_ms),
            loop=0,
            optimize=False,
        )

    return _write_file(path, write, overwrite)
