"""Rate-distortion sweeps of classical lossy codecs (SZ3, zfp, BitRound+zlib) on 2-D fields.

Baselines for the neural compressor: every codec is swept over its own parameter so that the
curves cover roughly 0.01 .. 4+ bits per value.

Usage as a library (``bench/`` is a plain script folder, not a package)::

    import sys; sys.path.insert(0, str(Path(__file__).parent))   # from another bench script
    from classical_codecs import sweep_classical
    points = sweep_classical(field, data_range=float(np.nanmax(field) - np.nanmin(field)))

Usage from the shell::

    python bench/classical_codecs.py FILE.nc --var t --sel isobaricInhPa=850 --index 0

Isolation: each codec point runs in its own child process (this file with ``--worker``, JSON on
stdin/stdout).  Two reasons, both observed with the pinned versions:

* ``numcodecs`` 0.16.6 cannot even be imported while ``zfpy`` 1.0.1.post0 is installed (it parses
  zfpy's version string with ``int()``), so the BitRound worker installs a stub for
  ``numcodecs.zfpy`` first and never imports zfpy;
* ``zfpy`` aborts the interpreter (glibc malloc assertion / SIGSEGV) for fixed-rate settings below
  its minimum number of bits per block.

A point whose child crashes, times out or raises is returned with ``ok=False`` and ``error`` set;
it never aborts the sweep.

Conventions:

* The codecs are fed the field cast to ``dtype`` (float32 by default, which is how such data is
  stored) with NaNs replaced by the mean of the finite cells.
* ``rmse``, ``mae``, ``max_abs_error`` and ``psnr`` compare the reconstruction with the *original*
  field (its own dtype, usually float64) over the finite cells only; ``max_abs_error_input``
  compares against the exact array the codec received (what an error bound is promised against).
* ``bits_per_value = 8 * n_bytes / field.size`` counts every cell, NaN or not.  ``n_bytes`` is the
  real length of the compressed stream (zfp's stream includes its own header; the shape/dtype
  that SZ3 and BitRound+zlib need at decode time are not counted).
* ``psnr = -10 log10(mse / data_range**2)`` (``inf`` for an exact reconstruction).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ALL_CODECS = ("sz3", "zfp", "bitround_zlib")

# codec name accepted by ``sweep_classical`` -> list of (codec, mode) sweeps it expands to
_CODEC_MODES: dict[str, tuple[tuple[str, str], ...]] = {
    "sz3": (("sz3", "abs"),),
    "zfp": (("zfp", "accuracy"), ("zfp", "rate")),
    "zfp_accuracy": (("zfp", "accuracy"),),
    "zfp_rate": (("zfp", "rate"),),
    "bitround_zlib": (("bitround_zlib", "keepbits"),),
}

# Default sweeps.  Error bounds / tolerances are fractions of the data range.
SZ3_REL_BOUNDS = tuple(float(x) for x in np.logspace(-4, 0, 13))  # 1e-4 .. 1 x range
ZFP_REL_TOLERANCES = tuple(float(x) for x in np.logspace(-5, 1, 13))  # 1e-5 .. 10 x range
ZFP_RATES = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
BITROUND_KEEPBITS = tuple(range(0, 13))
ZLIB_LEVEL = 9

_MANTISSA_BITS = {"float32": 23, "float64": 52}
_EXPONENT_BITS = {"float32": 8, "float64": 11}


def zfp_min_rate(ndim: int, dtype: str = "float32") -> float:
    """Smallest zfp fixed rate (bits/value) that zfpy survives.

    A zfp block of ``4**ndim`` values needs at least 1 + ``exponent bits`` bits; asking for fewer
    makes zfpy 1.0.1 corrupt the heap (measured: rate 0.5 on 2-D float32 and <= 0.625 on 2-D
    float64 abort).  Returns ``(1 + ebits) / 4**ndim`` (0.5625 for 2-D float32).
    """
    return (1 + _EXPONENT_BITS[str(np.dtype(dtype))]) / 4**ndim


# ----------------------------------------------------------------------------------------------
# Array <-> JSON helpers
# ----------------------------------------------------------------------------------------------


def _pack(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {
        "dtype": a.dtype.str,
        "shape": list(a.shape),
        "b64": base64.b64encode(a.tobytes()).decode("ascii"),
    }


def _unpack(d: dict) -> np.ndarray:
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


# ----------------------------------------------------------------------------------------------
# Codec round trips (run inside the child process only)
# ----------------------------------------------------------------------------------------------


def _roundtrip_sz3(x: np.ndarray, mode: str, param: float) -> tuple[int, np.ndarray, dict]:
    from pysz import sz, szConfig, szErrorBoundMode

    if mode != "abs":
        raise ValueError(f"sz3 mode {mode!r} not supported (use 'abs')")
    if not param > 0:
        raise ValueError("sz3 absolute error bound must be > 0")
    cfg = szConfig(x.shape)
    cfg.errorBoundMode = szErrorBoundMode.ABS
    cfg.absErrorBound = float(param)
    t0 = time.perf_counter()
    comp, _ratio = sz.compress(x, cfg)
    t1 = time.perf_counter()
    comp = np.ascontiguousarray(comp, dtype=np.uint8).copy()  # decode from a detached copy
    rec, _cfg = sz.decompress(comp, x.dtype, x.shape)
    t2 = time.perf_counter()
    return int(comp.nbytes), np.asarray(rec, dtype=x.dtype).reshape(x.shape), {
        "t_compress_s": t1 - t0,
        "t_decompress_s": t2 - t1,
    }


def _roundtrip_zfp(x: np.ndarray, mode: str, param: float) -> tuple[int, np.ndarray, dict]:
    import zfpy

    t0 = time.perf_counter()
    if mode == "accuracy":
        if not param > 0:
            raise ValueError("zfp tolerance must be > 0")
        comp = zfpy.compress_numpy(x, tolerance=float(param))
    elif mode == "rate":
        rmin = zfp_min_rate(x.ndim, x.dtype)
        if param < rmin:
            # zfpy would abort the process here; report it as a missing point instead.
            raise ValueError(
                f"zfp rate {param} < minimum {rmin:g} bits/value for {x.ndim}-D {x.dtype} "
                "(1 + exponent bits per block; zfpy corrupts the heap below it)"
            )
        comp = zfpy.compress_numpy(x, rate=float(param))
    else:
        raise ValueError(f"zfp mode {mode!r} not supported (use 'accuracy' or 'rate')")
    t1 = time.perf_counter()
    comp = bytes(comp)
    rec = zfpy.decompress_numpy(comp)
    t2 = time.perf_counter()
    return len(comp), np.asarray(rec, dtype=x.dtype).reshape(x.shape), {
        "t_compress_s": t1 - t0,
        "t_decompress_s": t2 - t1,
    }


def _import_bitround():
    """Import ``numcodecs.BitRound`` despite numcodecs 0.16.6 choking on zfpy's version string."""
    if "numcodecs" not in sys.modules:
        import importlib.metadata as md
        import types

        try:
            tuple(map(int, md.version("zfpy").split(".")))
        except md.PackageNotFoundError:
            pass
        except ValueError:
            # numcodecs/__init__ does `from numcodecs.zfpy import ZFPY` inside
            # suppress(ImportError); an empty stub turns the ValueError into that ImportError.
            sys.modules["numcodecs.zfpy"] = types.ModuleType("numcodecs.zfpy")
    from numcodecs import BitRound

    return BitRound


def _roundtrip_bitround_zlib(
    x: np.ndarray, mode: str, param: float
) -> tuple[int, np.ndarray, dict]:
    if mode != "keepbits":
        raise ValueError(f"bitround_zlib mode {mode!r} not supported (use 'keepbits')")
    keepbits = int(param)
    if keepbits != param or not 0 <= keepbits <= _MANTISSA_BITS[str(x.dtype)]:
        raise ValueError(f"keepbits must be an integer in 0..{_MANTISSA_BITS[str(x.dtype)]}")
    BitRound = _import_bitround()
    codec = BitRound(keepbits=keepbits)
    t0 = time.perf_counter()
    rounded = np.asarray(codec.encode(x))
    comp = zlib.compress(np.ascontiguousarray(rounded).tobytes(), ZLIB_LEVEL)
    t1 = time.perf_counter()
    int_dtype = np.dtype(x.dtype.str.replace("f", "i"))
    ints = np.frombuffer(zlib.decompress(comp), dtype=int_dtype).copy()
    rec = np.asarray(codec.decode(ints)).view(x.dtype).reshape(x.shape)
    t2 = time.perf_counter()
    return len(comp), rec, {"t_compress_s": t1 - t0, "t_decompress_s": t2 - t1}


_ROUNDTRIPS = {
    "sz3": _roundtrip_sz3,
    "zfp": _roundtrip_zfp,
    "bitround_zlib": _roundtrip_bitround_zlib,
}


def _worker_main() -> int:
    """Child entry point: one JSON request on stdin -> one JSON reply on stdout."""
    req = json.loads(sys.stdin.read())
    try:
        x = _unpack(req["data"])
        n_bytes, rec, extra = _ROUNDTRIPS[req["codec"]](x, req["mode"], req["param"])
        if rec.shape != x.shape:
            raise RuntimeError(f"decoded shape {rec.shape} != input shape {x.shape}")
        reply = {"ok": True, "n_bytes": n_bytes, "recon": _pack(rec), **extra}
    except Exception as exc:  # reported to the parent as a missing point
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(reply))
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------


def _run_child(request: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, input=json.dumps(request), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:g} s", "wall_s": timeout}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        rc = proc.returncode
        what = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        return {"ok": False, "error": f"child crashed ({what}): {tail}", "wall_s": wall}
    try:
        reply = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"ok": False, "error": f"unreadable child output: {proc.stdout[:200]!r}",
                "wall_s": wall}
    reply["wall_s"] = wall
    return reply


def _metrics(true: np.ndarray, codec_in: np.ndarray, rec: np.ndarray, mask: np.ndarray,
             data_range: float) -> dict:
    err = rec.astype(np.float64)[mask] - true.astype(np.float64)[mask]
    err_in = rec.astype(np.float64)[mask] - codec_in.astype(np.float64)[mask]
    mse = float(np.mean(err**2))
    return {
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(err))),
        "max_abs_error": float(np.max(np.abs(err))),
        "max_abs_error_input": float(np.max(np.abs(err_in))),
        "psnr": math.inf if mse == 0 else float(-10.0 * math.log10(mse / data_range**2)),
        "finite_output": bool(np.all(np.isfinite(rec[mask]))),
    }


def default_params(codec: str, mode: str, data_range: float, ndim: int = 2,
                   dtype: str = "float32") -> list[float]:
    """Default parameter sweep for one (codec, mode), in the codec's own units."""
    if (codec, mode) == ("sz3", "abs"):
        return [b * data_range for b in SZ3_REL_BOUNDS]
    if (codec, mode) == ("zfp", "accuracy"):
        return [t * data_range for t in ZFP_REL_TOLERANCES]
    if (codec, mode) == ("zfp", "rate"):
        rmin = zfp_min_rate(ndim, dtype)
        # requested rates below the minimum are moved up to it (deduplicated)
        return sorted({max(r, rmin) for r in ZFP_RATES})
    if (codec, mode) == ("bitround_zlib", "keepbits"):
        return list(BITROUND_KEEPBITS)
    raise ValueError(f"unknown codec/mode {codec}/{mode}")


def sweep_classical(
    field: np.ndarray,
    data_range: float | None,
    codecs: Iterable[str] = ALL_CODECS,
    timeout: float = 60,
    *,
    dtype: str = "float32",
    params: dict[str, Sequence[float]] | None = None,
    max_workers: int | None = None,
) -> list[dict]:
    """Sweep classical codecs over their parameters on a 2-D field.

    Args:
        field: (nlat, nlon) float array; NaN cells are filled with the mean for compression,
            excluded from the error metrics, but counted in ``bits_per_value``.
        data_range: normalisation for PSNR and for the relative default sweeps; ``None`` -> the
            finite max - min of ``field``.
        codecs: any of ``"sz3"``, ``"zfp"`` (both fixed-accuracy and fixed-rate),
            ``"zfp_accuracy"``, ``"zfp_rate"``, ``"bitround_zlib"``.
        timeout: seconds per codec point (child process).
        dtype: dtype the codecs are fed (``"float32"`` or ``"float64"``).
        params: optional explicit parameters per ``"codec"`` / ``"codec_mode"`` key, e.g.
            ``{"sz3": [0.1, 1.0], "zfp_rate": [2, 4], "bitround_zlib": [3, 23]}`` (SZ3 bounds
            and zfp tolerances in field units, zfp rates in bits/value, integer keepbits).
        max_workers: child processes run concurrently (default ``min(4, cpu_count)``).

    Returns:
        One dict per point, ordered by codec, mode, parameter, with keys ``codec``, ``mode``,
        ``label``, ``param``, ``ok``, ``error``, ``n_bytes``, ``n_values``, ``bits_per_value``,
        ``rmse``, ``mae``, ``max_abs_error``, ``max_abs_error_input``, ``psnr``, ``dtype``,
        ``t_compress_s``, ``t_decompress_s``, ``wall_s`` (metrics are ``None`` when not ok).
    """
    true = np.asarray(field)
    if true.ndim != 2:
        raise ValueError(f"expected a 2-D (nlat, nlon) field, got shape {true.shape}")
    if true.dtype.kind != "f":
        true = true.astype(np.float64)
    mask = np.isfinite(true)
    if not mask.any():
        raise ValueError("field has no finite values")
    if data_range is None:
        data_range = float(np.max(true[mask]) - np.min(true[mask]))
    data_range = float(data_range)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    dtype = str(np.dtype(dtype))
    if dtype not in _MANTISSA_BITS:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")

    fill = float(np.mean(true[mask], dtype=np.float64))
    codec_in = np.where(mask, true, fill).astype(dtype)
    packed = _pack(codec_in)
    n_values = int(true.size)
    params = dict(params or {})

    jobs: list[tuple[str, str, float]] = []
    for name in codecs:
        if name not in _CODEC_MODES:
            raise ValueError(f"unknown codec {name!r}; choose from {sorted(_CODEC_MODES)}")
        for codec, mode in _CODEC_MODES[name]:
            key = f"{codec}_{mode}"
            if key in params:
                plist = params[key]
            elif codec in params and len(_CODEC_MODES[codec]) == 1:
                plist = params[codec]
            else:
                plist = default_params(codec, mode, data_range, true.ndim, dtype)
            jobs.extend((codec, mode, p) for p in plist if (codec, mode, p) not in jobs)

    def run(job: tuple[str, str, float]) -> dict:
        codec, mode, param = job
        param = int(param) if mode == "keepbits" else float(param)
        request = {"codec": codec, "mode": mode, "param": param, "data": packed}
        reply = _run_child(request, timeout)
        point = {
            "codec": codec,
            "mode": mode,
            "label": f"{codec}-{mode}" if codec == "zfp" else codec,
            "param": param,
            "ok": bool(reply.get("ok")),
            "error": reply.get("error"),
            "n_bytes": None,
            "n_values": n_values,
            "bits_per_value": None,
            "rmse": None,
            "mae": None,
            "max_abs_error": None,
            "max_abs_error_input": None,
            "psnr": None,
            "dtype": dtype,
            "t_compress_s": reply.get("t_compress_s"),
            "t_decompress_s": reply.get("t_decompress_s"),
            "wall_s": reply.get("wall_s"),
        }
        if point["ok"]:
            rec = _unpack(reply["recon"])
            m = _metrics(true, codec_in, rec, mask, data_range)
            point["n_bytes"] = int(reply["n_bytes"])
            point["bits_per_value"] = 8.0 * point["n_bytes"] / n_values
            finite = m.pop("finite_output")
            point.update(m)
            if not finite:
                point["ok"] = False
                point["error"] = "reconstruction contains non-finite values"
        return point

    workers = max_workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(run, jobs))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def load_field(path: str | Path, var: str, sel: Sequence[str] = (), index: int = 0
               ) -> tuple[np.ndarray, dict]:
    """Read one 2-D field (the last two dims are lat/lon) from a netCDF file.

    ``sel`` holds ``dim=value`` strings (exact match, else nearest); the remaining leading dims
    are flattened in C order and ``index`` picks one of them.
    """
    import xarray as xr

    with xr.open_dataset(path, decode_times=False) as ds:
        da = ds[var]
        info: dict = {"file": str(path), "var": var, "sel": {}}
        for item in sel:
            key, _, value = item.partition("=")
            val = _parse_value(value)
            try:
                da = da.sel({key: val})
            except KeyError:
                da = da.sel({key: val}, method="nearest")
            # record the coordinate actually selected (it differs from `val` after "nearest")
            coord = da.coords.get(key)
            info["sel"][key] = coord.values.item() if coord is not None and coord.ndim == 0 else val
        if da.ndim < 2:
            raise ValueError(f"{var} has fewer than 2 dims after selection: {da.dims}")
        lead = da.shape[:-2]
        n_lead = int(np.prod(lead)) if lead else 1
        if not -n_lead <= index < n_lead:
            raise IndexError(f"--index {index} out of range for leading dims {da.dims[:-2]}{lead}")
        idx = tuple(int(i) for i in np.unravel_index(index % n_lead, lead)) if lead else ()
        info["index"] = dict(zip(da.dims[:-2], idx, strict=True))
        da = da[idx]
        info["dims"] = list(da.dims)
        values = np.asarray(da.values)
    return values, info


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def format_table(points: Sequence[dict]) -> str:
    """Compact human-readable table of sweep points."""
    lines = [f"{'label':<14}{'param':>12}{'bytes':>9}{'bpv':>9}{'rmse':>11}{'maxerr':>11}"
             f"{'psnr':>8}  note"]
    for p in points:
        if p["ok"]:
            lines.append(
                f"{p['label']:<14}{p['param']:>12.4g}{p['n_bytes']:>9d}"
                f"{p['bits_per_value']:>9.4f}{p['rmse']:>11.4g}{p['max_abs_error']:>11.4g}"
                f"{p['psnr']:>8.2f}"
            )
        else:
            lines.append(f"{p['label']:<14}{p['param']:>12.4g}{'-':>9}{'-':>9}{'-':>11}"
                         f"{'-':>11}{'-':>8}  {p['error']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker_main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="netCDF file")
    ap.add_argument("--var", required=True, help="variable name")
    ap.add_argument("--sel", action="append", default=[], metavar="DIM=VALUE",
                    help="coordinate selection (repeatable)")
    ap.add_argument("--index", type=int, default=0,
                    help="flat index over the remaining leading dims (default 0)")
    ap.add_argument("--codecs", default=",".join(ALL_CODECS),
                    help="comma list from: " + ", ".join(_CODEC_MODES))
    ap.add_argument("--data-range", type=float, default=None,
                    help="default: finite max - min of the field")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per codec point")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--table", action="store_true", help="also print a text table to stderr")
    ap.add_argument("-o", "--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    field, info = load_field(args.file, args.var, args.sel, args.index)
    finite = np.isfinite(field)
    data_range = args.data_range
    if data_range is None:
        data_range = float(np.max(field[finite]) - np.min(field[finite]))
    t0 = time.perf_counter()
    points = sweep_classical(
        field, data_range, codecs=[c.strip() for c in args.codecs.split(",") if c.strip()],
        timeout=args.timeout, dtype=args.dtype, max_workers=args.workers,
    )
    elapsed = time.perf_counter() - t0
    result = {
        **info,
        "shape": list(field.shape),
        "n_nan": int((~finite).sum()),
        "data_range": data_range,
        "min": float(np.min(field[finite])),
        "max": float(np.max(field[finite])),
        "std": float(np.std(field[finite])),
        "codec_dtype": args.dtype,
        "sweep_seconds": elapsed,
        "n_failed": sum(not p["ok"] for p in points),
        "points": points,
    }
    text = json.dumps(_jsonable(result), indent=1)
    print(text)
    if args.out:
        from mscn_core.atomic import write_atomic

        write_atomic(args.out, lambda tmp: Path(tmp).write_text(text + "\n"), overwrite=True)
    if args.table:
        print(format_table(points), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
