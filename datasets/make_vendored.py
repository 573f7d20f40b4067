"""Rebuild the small real-data subsets vendored in ``datasets/data/``.

Run from the repository root (needs the shared data folder ``../shared/data/climate``
or ``--src DIR``)::

    python -m mscn_datasets.make_vendored

Why vendored subsets: tests and the demo must run on a fresh clone without the shared
folder.  Every value is real data (subset, cast to float32, or block-averaged); see
``datasets/data/README.md`` for provenance and licences.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mscn_datasets.climate import open_climate

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "climate"

ERA5_OUT = "era5_t_z_3deg_2017-01-01_float32.nc"
COADS_OUT = "coads_sst_airt_2deg_jan-mar.nc"
ETOPO_OUT = "etopo_relief_2deg_blockmean.nc"

T42_OUT = "t42_gaussian_uv300_U.nc"
MPIOM_OUT = "mpiom_tos_curvilinear_crop.nc"
GEODESIC_OUT = "geodesic_2562cells_t0.nc"

MAX_BYTES = {ERA5_OUT: 3_000_000, COADS_OUT: 500_000, ETOPO_OUT: 500_000,
             T42_OUT: 300_000, MPIOM_OUT: 300_000, GEODESIC_OUT: 300_000}


def _note(ds: xr.Dataset, text: str) -> None:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")
    old = ds.attrs.get("history")
    line = f"{stamp} mscn_datasets.make_vendored: {text}"
    ds.attrs["history"] = f"{line}\n{old}" if old else line


def _encoding(ds: xr.Dataset, data_vars: list[str], fill: Any = "keep") -> dict[str, dict]:
    enc: dict[str, dict] = {}
    for name in data_vars:
        e: dict[str, Any] = {"dtype": "float32", "zlib": True, "complevel": 9, "shuffle": True}
        src = ds[name].encoding
        if fill == "keep" and "_FillValue" in src:
            e["_FillValue"] = np.float32(src["_FillValue"])
            if "missing_value" in src:
                e["missing_value"] = np.float32(src["missing_value"])
        else:
            e["_FillValue"] = None
        enc[name] = e
    for name, coord in ds.coords.items():
        e = {"_FillValue": None}
        if coord.dtype.kind == "M":
            for k in ("units", "calendar", "dtype"):
                if k in coord.encoding:
                    e[k] = coord.encoding[k]
        else:
            e["dtype"] = coord.dtype
        enc[str(name)] = e
    return enc


def _write(ds: xr.Dataset, out: Path, encoding: dict[str, dict], limit: int | None = None
           ) -> int:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    size = out.stat().st_size
    limit = MAX_BYTES[out.name] if limit is None else limit
    if size > limit:
        raise SystemExit(f"{out.name} is {size} bytes, over the {limit} byte budget")
    return size


def make_era5(src: Path, dst: Path) -> int:
    """ERA5 t and z, all 10 members x 4 times x 2 levels, float32 zlib-9 (~2 MB)."""
    ds = open_climate(src / "era5_t_z_3deg_2017-01-01.nc")
    sub = ds[["t", "z"]].load()
    # float64 in the source (t also carries a stray scale_factor=0.1); store float32.
    for v in ("t", "z"):
        sub[v] = sub[v].astype(np.float32)
        sub[v].attrs = dict(ds[v].attrs)
    _note(sub, "subset of era5_t_z_3deg_2017-01-01.nc (cfgrib 0.9.15.1 sample): "
               "variables t, z; all members/times/levels; cast to float32")
    enc = _encoding(sub, ["t", "z"], fill=None)
    return _write(sub, dst / ERA5_OUT, enc)


def make_coads(src: Path, dst: Path) -> int:
    """COADS climatology SST and AIRT, first 3 months (Jan-Mar), land left masked."""
    ds = open_climate(src / "coads_climatology_2deg.nc")
    sub = ds[["SST", "AIRT"]].isel(TIME=slice(0, 3)).load()
    _note(sub, "subset of coads_climatology.cdf (ferret-datasets 7.6.0): "
               "variables SST, AIRT; TIME indices 0-2 (Jan-Mar)")
    return _write(sub, dst / COADS_OUT, _encoding(sub, ["SST", "AIRT"]))


def make_etopo(src: Path, dst: Path) -> int:
    """ETOPO60 relief block-averaged 2x2 (1 deg -> 2 deg), original coordinate names."""
    ds = open_climate(src / "etopo60_relief_1deg.nc")
    sub = ds[["ROSE"]].load().coarsen(ETOPO60Y=2, ETOPO60X=2).mean(keep_attrs=True)
    for c in ("ETOPO60Y", "ETOPO60X"):
        sub[c].attrs = dict(ds[c].attrs)
    sub["ROSE"].encoding = dict(ds["ROSE"].encoding)
    sub.attrs = dict(ds.attrs)
    _note(sub, "etopo60.cdf (ferret-datasets 7.6.0) block-mean over 2x2 cells, 1 deg -> 2 deg")
    return _write(sub, dst / ETOPO_OUT, _encoding(sub, ["ROSE"]))


def _native_encoding(ds: xr.Dataset) -> dict[str, dict]:
    """The source's own dtypes and fill values (why: these subsets test that a grid is
    written back in the file's own structure), zlib-9 for the fields."""
    enc: dict[str, dict] = {}
    for name, v in ds.variables.items():
        e: dict[str, Any] = {k: v.encoding[k] for k in ("dtype", "_FillValue", "missing_value",
                                                         "units", "calendar")
                             if k in v.encoding}
        e.setdefault("_FillValue", None)
        if name in ds.data_vars and v.ndim >= 1:
            e.update(zlib=True, complevel=9, shuffle=True)
        enc[str(name)] = e
    return enc


def make_t42(src: Path, dst: Path) -> int:
    """T42 Gaussian grid (64 x 128): U at 300 hPa, both months, as in the source."""
    ds = open_climate(src / "ncl_t42_uv300.nc")
    sub = ds[["U"]].load()
    _note(sub, "subset of ncl_t42_uv300.nc (NCL example data): variable U only")
    return _write(sub, dst / T42_OUT, _native_encoding(sub))


def make_mpiom(src: Path, dst: Path) -> int:
    """MPI-OM bipolar curvilinear tos, crop y 100..219 x 0..127 (Arctic fold and land
    included), CF 2-D lat/lon kept, cell bounds dropped."""
    ds = open_climate(src / "ncl_mpiom_tos_bipolar_curvilinear.nc")
    sub = ds[["tos"]].isel(y=slice(100, 220), x=slice(0, 128)).load()
    for c in ("lat", "lon"):
        sub[c].attrs.pop("bounds", None)
        sub[c].encoding.pop("bounds", None)
    _note(sub, "crop of ncl_mpiom_tos_bipolar_curvilinear.nc (NCL example data): tos, "
               "y 100-219, x 0-127; lat_bnds/lon_bnds dropped")
    return _write(sub, dst / MPIOM_OUT, _native_encoding(sub))


def make_geodesic(src: Path, dst: Path) -> int:
    """Geodesic 2562-cell unstructured grid: first time, height/relative/tracer_1, cell
    centres in radians (corners dropped)."""
    ds = open_climate(src / "ncl_geodesic_2562cells_unstructured.nc")
    sub = ds[["height", "relative", "tracer_1", "grid_center_lat", "grid_center_lon"]]
    sub = sub.isel(time=slice(0, 1)).load()
    _note(sub, "subset of ncl_geodesic_2562cells_unstructured.nc (NCL example data): time 0, "
               "height, relative, tracer_1 and the cell centres")
    return _write(sub, dst / GEODESIC_OUT, _native_encoding(sub))


# -- the general climate checkpoint's training data (issue 8 part 1) ----------------------
#
# Diverse real fields on their native grids, split BY FILE AND DATE (never by ensemble
# member of one day): train/ and val/ hold different dates of the same files (val: the
# last months/steps), some files are train only. Held out entirely (bench/sphere_vs_sh.py
# test sets): ncl_t42_uv300.nc, ncl_mpiom_tos_bipolar_curvilinear.nc,
# ncl_geodesic_2562cells_unstructured.nc, COADS Jan-Mar (every variable) and ERA5
# 2017-01-01. Cautious extras: ncl_sst_2deg_monthly Jan-Mar (another SST climatology, so a
# near twin of the COADS SST test months) and U/V at 250-400 hPa of the other T42 file
# (the held-out field is T42 U300) are left out too.
GENERAL_DIR = "climate_general"
GENERAL_MAX_BYTES = 8_000_000  # all files together
# (source file, output stem, variables, train isel, val isel or None, cast float32)
_GENERAL: list[tuple[str, str, list[str], dict, dict | None, bool]] = [
    # 2.5 deg monthly winds 1982-1992: train every 5th month of 1982-1991, val 1992 (4 months)
    ("navy_winds_2p5deg_1982-1992.nc", "navy_winds", ["UWND", "VWND"],
     {"TIME": list(range(0, 120, 5))}, {"TIME": [120, 123, 126, 129]}, False),
    # 500 hPa heights, 21 months: train the first 16, val the last 5
    ("hgt500_2p5deg_monthly.nc", "hgt500", ["HGT"],
     {"time": list(range(16))}, {"time": list(range(16, 21))}, False),
    # COADS climatology, 7 variables: train Apr/Jun/Aug/Oct, val Dec (Jan-Mar held out)
    ("coads_climatology_2deg.nc", "coads", ["SST", "AIRT", "SPEH", "WSPD", "UWND", "VWND", "SLP"],
     {"TIME": [3, 5, 7, 9]}, {"TIME": [11]}, False),
    # ERA5: day 2 only (2017-01-01 is the bench's test day), members 0 and 5, both times
    ("era5_t_z_3deg_2017-01-01.nc", "era5_2017-01-02", ["t", "z"],
     {"time": [2, 3], "number": [0, 5]}, None, True),
    # relief (1 deg, single field) and the last-glacial-maximum topography
    ("etopo60_relief_1deg.nc", "etopo60_relief", ["ROSE"], {}, None, False),
    ("ncl_ice5g_21k_topo_1deg.nc", "ice5g_topo", ["Topo"], {}, None, False),
    # T42 Gaussian model states: 18 hybrid levels, 2 days -> train day 1, val day 2
    ("ncl_t42_T_PS_18lev.nc", "t42_T_PS", ["T", "PS"],
     {"time": [0], "lev": [0, 3, 6, 9, 12, 15, 17]}, {"time": [1], "lev": [2, 8, 14]}, False),
    # another T42 state (1 time): T, U, V at 7 levels (not 250-400 hPa: see above)
    ("ncl_t42_T_U_V_14lev.nc", "t42_T_U_V", ["T", "U", "V"],
     {"lev": [0, 1, 3, 7, 9, 11, 13]}, None, False),
    # T63 Gaussian: t, relative humidity, var3 at 5 levels (1 time)
    ("ncl_t63_t_rh_17lev.nc", "t63_t_rh", ["t", "rhumidity", "var3"],
     {"lev": [0, 2, 6, 9, 12]}, None, False),
    # T63 monthly near-surface winds 2005: train Jan-Sep, val Oct and Dec
    ("ncl_t63_uas_monthly.nc", "t63_uas", ["uas"],
     {"time": list(range(9))}, {"time": [9, 11]}, False),
    ("ncl_t63_vas_monthly.nc", "t63_vas", ["vas"],
     {"time": list(range(9))}, {"time": [9, 11]}, False),
    # curvilinear: POP ocean (every 2nd point each way) and a SEAM 2-D lat/lon grid
    ("ncl_pop_ocean_curvilinear.nc", "pop_ocean_stride2", ["urot", "vrot", "t"],
     {"nlat": slice(0, None, 2), "nlon": slice(0, None, 2)}, None, False),
    # (SEAM: train only, its time values are all the fill value, so the CLI could not
    # tell val fields from train fields by label and would drop them all from train)
    ("ncl_seam_ps_2d_latlon.nc", "seam_ps", ["ps"], {"time": list(range(9))}, None, False),
    # another monthly SST climatology: train Apr-Sep, val Nov (Jan-Mar left out, see above)
    ("ncl_sst_2deg_monthly.nc", "ncl_sst", ["sst"],
     {"time": [3, 4, 5, 6, 7, 8]}, {"time": [10]}, False),
]


def _general_subset(ds: xr.Dataset, names: list[str], isel: dict, cast: bool) -> xr.Dataset:
    keep = list(names)
    for extra in ("lat2d", "lon2d", "lat", "lon"):  # coordinates stored as data variables
        if extra in ds.data_vars and extra not in keep:
            keep.append(extra)
    sub = ds[keep].isel({k: v for k, v in isel.items() if k in ds.dims}).load()
    if cast:
        for v in names:
            attrs = dict(ds[v].attrs)
            sub[v] = sub[v].astype(np.float32)
            sub[v].attrs = attrs
            sub[v].encoding = {}
    return sub


def make_climate_general(src: Path, dst: Path) -> int:
    """Training (train/) and validation (val/) files of the general climate checkpoint:
    every shared file except the bench's test sets, subsampled in time/levels (see
    _GENERAL). Returns the total bytes (at most GENERAL_MAX_BYTES)."""
    total = 0
    for sub_dir in ("train", "val"):
        (dst / GENERAL_DIR / sub_dir).mkdir(parents=True, exist_ok=True)
    for fname, stem, names, tr, va, cast in _GENERAL:
        ds = open_climate(src / fname)
        for part, isel in (("train", tr), ("val", va)):
            if isel is None:
                continue
            sub = _general_subset(ds, names, isel, cast)
            what = ", ".join(f"{k}={v if isinstance(v, list) else 'every 2nd'}"
                             for k, v in isel.items()) or "everything"
            _note(sub, f"mscn climate_general {part}: subset of {fname}: {', '.join(names)}; "
                       f"isel {what}" + ("; cast to float32" if cast else ""))
            enc = _native_encoding(sub)
            if cast:
                enc.update(_encoding(sub, names, fill=None))
            out = dst / GENERAL_DIR / part / f"{stem}.nc"
            total += _write(sub, out, enc, limit=GENERAL_MAX_BYTES)
    if total > GENERAL_MAX_BYTES:
        raise SystemExit(f"{GENERAL_DIR} is {total} bytes, over {GENERAL_MAX_BYTES}")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="shared climate folder")
    ap.add_argument("--dst", type=Path, default=DATA_DIR, help="output folder")
    args = ap.parse_args(argv)
    if not args.src.is_dir():
        raise SystemExit(f"source folder {args.src} not found (use --src)")
    args.dst.mkdir(parents=True, exist_ok=True)
    for fn in (make_era5, make_coads, make_etopo, make_t42, make_mpiom, make_geodesic,
               make_climate_general):
        size = fn(args.src, args.dst)
        print(f"{fn.__name__}: {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
