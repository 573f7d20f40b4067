"""``ncdump -h``-level view of a NetCDF file, and a comparison of input and output headers.

Why: a file written back by mscn must be a drop-in replacement for its input: same data
model, dimensions, variable dtypes and attributes (fill values and packing included),
global attributes and compression.  Uses the netCDF4 library (not the ncdump binary).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np


def _attr(value: Any) -> tuple[str, Any]:
    """An attribute as (type, value) with NaN made comparable, as ncdump shows it."""
    if isinstance(value, str):
        return ("str", value)
    arr = np.asarray(value)
    if arr.dtype.kind in "US":
        return ("str", tuple(map(str, arr.ravel().tolist())))
    flat = tuple("nan" if isinstance(x, float) and x != x else x for x in arr.ravel().tolist())
    return (str(arr.dtype), flat)


def _compression(filters: dict[str, Any]) -> tuple[bool, int, bool]:
    """(deflate, level, shuffle); deflate at level 0 compresses nothing and netCDF4-python
    cannot write it (it drops the filter), so it counts as no compression."""
    level = int(filters.get("complevel") or 0)
    if not filters.get("zlib") or level == 0:
        return (False, 0, False)
    return (True, level, bool(filters.get("shuffle")))


def _var_header(v: netCDF4.Variable) -> dict[str, Any]:
    chunking = v.chunking()
    filters = v.filters() or {}
    return {
        "dtype": str(v.dtype),
        "dims": tuple(v.dimensions),
        "attrs": {a: _attr(v.getncattr(a)) for a in v.ncattrs()},
        "chunking": "contiguous" if chunking in (None, "contiguous") else tuple(chunking),
        "compression": _compression(filters),
    }


def header(path: str | Path) -> dict[str, Any]:
    """Data model, dimensions (size, unlimited), variables and global attributes."""
    with netCDF4.Dataset(path) as nc:
        return {
            "data_model": nc.data_model,
            "dimensions": {n: (len(d), d.isunlimited()) for n, d in nc.dimensions.items()},
            "variables": {n: _var_header(v) for n, v in nc.variables.items()},
            "global": {a: _attr(nc.getncattr(a)) for a in nc.ncattrs()},
        }


def compare_headers(inp: dict[str, Any], out: dict[str, Any],
                    fields: Iterable[str]) -> list[str]:
    """Differences that make ``out`` not a faithful copy of ``inp`` (empty list: faithful).

    ``fields``: the gridded variables written (chunked one 2-D field per chunk in
    netCDF-4 output, with the input's compression).  Every variable of ``out`` must be
    in ``inp`` with the same dtype, dims and attributes (``coordinates`` as a set);
    dimensions the same size and unlimited-ness; global attributes equal except
    ``history``, which gains exactly one first line.  Attributes named ``mscn_*`` may be
    added (global or per variable).
    """
    diffs: list[str] = []
    if inp["data_model"] != out["data_model"]:
        diffs.append(f"data model {inp['data_model']} -> {out['data_model']}")
    for name, dim in out["dimensions"].items():
        if inp["dimensions"].get(name) != dim:
            diffs.append(f"dimension {name}: {inp['dimensions'].get(name)} -> {dim}")
    fields = set(fields)
    for name, vo in out["variables"].items():
        vi = inp["variables"].get(name)
        if vi is None:
            diffs.append(f"variable {name} is not in the input")
            continue
        for key in ("dtype", "dims"):
            if vi[key] != vo[key]:
                diffs.append(f"{name} {key}: {vi[key]} -> {vo[key]}")
        for a in sorted(set(vi["attrs"]) | set(vo["attrs"])):
            ai, ao = vi["attrs"].get(a), vo["attrs"].get(a)
            if ai is None and a.startswith("mscn_"):
                continue  # provenance mscn adds (checkpoint, bits, scaling)
            if a == "coordinates" and ai is not None and ao is not None:
                ai, ao = set(ai[1].split()), set(ao[1].split())  # order is not meaning
            if ai != ao:
                diffs.append(f"{name}:{a} {ai} -> {ao}")
        if name in fields:
            if inp["data_model"].startswith("NETCDF4"):
                want = tuple(n if d in vo["dims"][-2:] else 1
                             for d, n in zip(vo["dims"], _shape(out, vo), strict=True))
                if vo["chunking"] != want:
                    diffs.append(f"{name} chunking {vo['chunking']}, want one field {want}")
            elif vo["chunking"] != "contiguous":
                diffs.append(f"{name} chunking {vo['chunking']} in a classic file")
            if vi["compression"] != vo["compression"]:
                diffs.append(f"{name} compression {vi['compression']} -> {vo['compression']}")
    gi, go = inp["global"], out["global"]
    for a in sorted(set(gi) | set(go)):
        if a == "history" or (a.startswith("mscn_") and a not in gi):
            continue
        if gi.get(a) != go.get(a):
            diffs.append(f"global {a}: {gi.get(a)} -> {go.get(a)}")
    hist_o = go.get("history", ("str", ""))[1]
    lines = str(hist_o).split("\n")
    old = gi["history"][1] if "history" in gi else None
    if old is None and len(lines) != 1 or old is not None and "\n".join(lines[1:]) != old:
        diffs.append(f"history {old!r} -> {hist_o!r}: not one line prepended")
    return diffs


def _shape(hdr: dict[str, Any], var: dict[str, Any]) -> tuple[int, ...]:
    return tuple(hdr["dimensions"][d][0] for d in var["dims"])
