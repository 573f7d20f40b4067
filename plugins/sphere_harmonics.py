"""Real spherical harmonics on any set of points: the classical basis for fields on the
sphere, used twice -- as the baseline of ``bench/sphere_vs_sh.py`` and as the optional
*base* of the sphere plugin (``--sh-degree L``: a field's least-squares SH fit up to
degree L travels in the stream as (L+1)² float16 coefficients and the network encodes
only what the harmonics miss).

Why a base: DESIGN §8 -- at CPU training scale 256 modulations lose to 256 harmonics on
held-out fields; the large scales are exactly what a low-degree SH fit captures for a
few coefficients, and the network's modulations are then spent on the rest.
"""

from __future__ import annotations

import base64
import math

import numpy as np

MAX_DEGREE = 31  # (L+1)² = 1024 coefficients: the largest budget of DESIGN §7
_BLOCK = 1 << 16  # points per basis block
# Ridge of the plugin's base fit, relative to the normalised weights (the Gram matrix of a
# global field is ~I/4π): measured on the MPI-OM crop it bounds |c| to ~1.4 and costs 3 %
# of the degree-7 fit's RMSE there, nothing (< 0.1 %) on global ERA5/COADS/T42 fields.
BASE_RIDGE = 1e-6


def n_coefficients(degree: int) -> int:
    return (degree + 1) ** 2


def sh_basis(lat: np.ndarray, lon: np.ndarray, degree: int) -> np.ndarray:
    """(n_points, (degree+1)²) real orthonormal SH (∫ Y_a Y_b dΩ = δ_ab over the unit
    sphere), columns ordered l = 0..degree, m = -l..l; lat/lon in radians. The same
    functions as ``scipy.special.sph_harm_y`` (Condon-Shortley phase): Y_l0 for m = 0,
    √2·(-1)^m Re Y_l^m for m > 0, √2·(-1)^m Im Y_l^|m| for m < 0 -- built by the standard
    recurrence of fully normalised associated Legendre functions, ~10x faster than
    calling scipy per (l, m), which matters when decoding a 1M-point field."""
    lat = np.asarray(lat, np.float64).reshape(-1)
    lon = np.asarray(lon, np.float64).reshape(-1)
    if lat.size > _BLOCK:  # bounded temporaries: the Legendre columns of one block at a time
        return np.concatenate([sh_basis(lat[s:s + _BLOCK], lon[s:s + _BLOCK], degree)
                               for s in range(0, lat.size, _BLOCK)])
    x, phi = np.sin(lat), lon  # x = cos(colatitude)
    sx = np.sqrt(np.clip(1 - x * x, 0, None))
    out = np.empty((x.size, n_coefficients(degree)))
    col = {}  # (l, m >= 0) -> column of P̄_l^m(x)
    p_mm = np.full(x.size, 1 / math.sqrt(4 * math.pi))
    for m in range(degree + 1):
        if m > 0:
            p_mm = -math.sqrt((2 * m + 1) / (2 * m)) * sx * p_mm
        col[(m, m)] = p_mm
        if m < degree:
            col[(m + 1, m)] = math.sqrt(2 * m + 3) * x * p_mm
        for n in range(m + 2, degree + 1):
            a = math.sqrt((4 * n * n - 1) / (n * n - m * m))
            b = math.sqrt(((n - 1) ** 2 - m * m) / (4 * (n - 1) ** 2 - 1))
            col[(n, m)] = a * (x * col[(n - 1, m)] - b * col[(n - 2, m)])
    for m in range(degree + 1):
        c, s = (np.cos(m * phi), np.sin(m * phi)) if m else (None, None)
        for n in range(m, degree + 1):
            p = col[(n, m)]
            if m == 0:
                out[:, n * n + n] = p
            else:
                f = math.sqrt(2) * (-1.0) ** m * p
                out[:, n * n + n + m] = f * c
                out[:, n * n + n - m] = f * s
    return out


def sh_fit(lat: np.ndarray, lon: np.ndarray, values: np.ndarray, weights: np.ndarray,
           degree: int, ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Weighted least squares argmin_c Σ w_i (A c - v)_i² (weights normalised to sum 1)
    + ridge·|c|² on the given points. Returns (coefficients, the fit at those points,
    diagnostics). ``ridge`` > 0 (the plugin's base: :data:`BASE_RIDGE`) keeps the
    coefficients of a regional field O(1): unregularised, a crop of the ocean gives
    |c| ~ 1e2 at degree 7 and 1e5 at 15 (cancelling columns), which float16 cannot carry."""
    from scipy.linalg import lstsq

    a = sh_basis(lat, lon, degree)
    sw = np.sqrt(weights / weights.sum())
    aw = a * sw[:, None]
    if ridge > 0:
        gram = aw.T @ aw + ridge * np.eye(a.shape[1])
        coef = np.linalg.solve(gram, aw.T @ (values * sw))
        ev = np.linalg.eigvalsh(gram)
        return coef, a @ coef, {"rank": a.shape[1], "n_coef": a.shape[1],
                                "cond": float(ev[-1] / ev[0]), "ridge": ridge}
    coef, _, rank, sv = lstsq(aw, values * sw, lapack_driver="gelsd")
    cond = float(sv[0] / sv[-1]) if sv is not None and sv[-1] > 0 else math.inf
    return coef, a @ coef, {"rank": int(rank), "n_coef": a.shape[1], "cond": cond}


def xyz_latlon(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radians of unit-sphere points (the plugin's network inputs)."""
    xyz = np.asarray(xyz, np.float64)
    return np.arcsin(np.clip(xyz[:, 2], -1, 1)), np.arctan2(xyz[:, 1], xyz[:, 0])


# -- weights: the area each point stands for ---------------------------------------------

def _edges(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    mid = (x[1:] + x[:-1]) / 2
    first, last = x[0] - (mid[0] - x[0]), x[-1] + (x[-1] - mid[-1])
    e = np.concatenate([[first], mid, [last]])
    if lo is not None:
        e = np.clip(e, lo, hi)
    return e


def latlon_cell_areas(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(nlat, nlon) areas (sr) of 1-D lat/lon grid cells: Δsin(lat) × Δlon, with edges at
    the midpoints between points, clipped at the poles (radians in)."""
    dsin = np.abs(np.diff(np.sin(_edges(lat, -np.pi / 2, np.pi / 2))))
    dlon = np.abs(np.diff(_edges(np.unwrap(lon))))
    return dsin[:, None] * dlon[None, :]


VORONOI_MAX_POINTS = 200_000  # above: unstructured cells count as equal-area (quasi-uniform)


def point_weights(xyz: np.ndarray, kind: str | None, shape: list[int] | tuple[int, ...],
                  area: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Per-point weights of an area-weighted fit, and how they were made: the file's cell
    areas when it has bounds; 1-D lat/lon grids Δsin(lat)·Δlon; curvilinear
    cos(lat)·|∂(lat, lon)/∂(i, j)|; unstructured spherical Voronoi areas (equal weights
    above ``VORONOI_MAX_POINTS``: ICON/MPAS cells are near-uniform); else cos(lat)."""
    if area is not None:
        return np.asarray(area, np.float64), "cell areas from the file's bounds"
    lat, lon = xyz_latlon(xyz)
    if kind in (None, "regular", "gaussian", "regional") and len(shape) == 2:
        la, lo = lat.reshape(shape), lon.reshape(shape)
        if np.allclose(la, la[:, :1]) and np.allclose(lo, lo[:1, :]):
            return (latlon_cell_areas(la[:, 0], lo[0]).ravel(),
                    "1-D lat/lon grid: dsin(lat) x dlon between midpoints")
    if kind == "curvilinear" and len(shape) == 2:
        la, lo = lat.reshape(shape), np.unwrap(np.unwrap(lon.reshape(shape), axis=0), axis=1)
        dla_i, dla_j = np.gradient(la)
        dlo_i, dlo_j = np.gradient(lo)
        jac = np.abs(dla_i * dlo_j - dla_j * dlo_i)
        return (np.cos(la) * jac).ravel(), "curvilinear: cos(lat) x |d(lat,lon)/d(i,j)|"
    if kind == "unstructured":
        if len(lat) > VORONOI_MAX_POINTS:
            return np.ones(len(lat)), "unstructured, many cells: equal weights"
        from scipy.spatial import SphericalVoronoi

        pts = np.asarray(xyz, np.float64)
        pts = pts / np.linalg.norm(pts, axis=1, keepdims=True)
        return (SphericalVoronoi(pts, radius=1.0).calculate_areas(),
                "unstructured: spherical Voronoi cell areas")
    return np.cos(lat).clip(0), "cos(lat)"


# -- the base of a stream item ----------------------------------------------------------

def pack_coefficients(coef: np.ndarray) -> tuple[str, np.ndarray]:
    """float16 little-endian, base64: 2 bytes a coefficient in the stream (their
    quantisation error, ~5e-4 relative, is far below a 256-modulation fit's). Returns the
    text and the float64 values a decoder will see (the encoder's base uses those)."""
    q = np.asarray(coef, np.float64).astype("<f2")
    return base64.b64encode(q.tobytes()).decode("ascii"), q.astype(np.float64)


def unpack_coefficients(text: object, degree: int) -> np.ndarray:
    """Inverse of :func:`pack_coefficients`; ValueError (one line) unless ``text`` is
    base64 of exactly (degree+1)² finite float16 values."""
    n = n_coefficients(degree)
    if not isinstance(text, str) or len(text) != 4 * math.ceil(2 * n / 3):
        raise ValueError(f"sh coef must be base64 of {n} float16 values")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ValueError("sh coef is not valid base64") from None
    if len(raw) != 2 * n:
        raise ValueError(f"sh coef holds {len(raw)} bytes, degree {degree} needs {2 * n}")
    coef = np.frombuffer(raw, "<f2").astype(np.float64)
    if not np.isfinite(coef).all():
        raise ValueError("sh coef holds non-finite values")
    return coef


def evaluate(xyz: np.ndarray, coef: np.ndarray, degree: int) -> np.ndarray:
    """The SH expansion at unit-sphere points."""
    lat, lon = xyz_latlon(xyz)
    return sh_basis(lat, lon, degree) @ coef
