"""Uniform scalar quantisation of sparse modulations (COIN++ protocol, DESIGN §2).

Pure numpy; no torch, no plugin imports.

Statistics
----------
:class:`QuantizerStats` holds a per-coordinate centre (``mean``) and scale (``std``) of the
*non-zero* modulation values, fitted on the training set with :func:`fit_stats`. Both are
float64 arrays of shape ``(n_values,)`` (one entry per kept modulation position) or 0-d
arrays (one scalar shared by all positions).

Quantiser design (mid-tread, odd number of levels)
--------------------------------------------------
With ``b`` bits the alphabet is ``{0, ..., 2**b - 1}`` (``n_symbols = 2**b``), but the
quantiser uses only the ``n_levels = 2**b - 1`` symbols ``0 .. 2**b - 2`` as reconstruction
levels, placed symmetrically around the mean::

    c     = 2**(b-1) - 1                       # centre symbol
    step  = k * std / c                        # = 2 k std / (n_levels - 1)
    level = mean + (symbol - c) * step         # symbol 0 -> mean - k std, 2c -> mean + k std

An odd level count makes the quantiser *mid-tread*: the mean itself (offset 0) is exactly
representable (symbol ``c``), and the grid is symmetric so both clip ends
``mean ± k·std`` are levels. Hence for any value inside the clip range the round-trip error is
at most ``step / 2``; values outside are clipped first. The top symbol ``2**b - 1`` is never
produced by :meth:`UniformQuantizer.quantize`; :meth:`UniformQuantizer.dequantize` maps it to
the top level ``mean + k·std`` so every in-range symbol decodes to something sensible. (It
costs nothing in the entropy coder: a symbol that never occurs gets zero model mass.) The
price is one level out of ``2**b``, which matters only at 2 bits (3 levels: -kσ, mean, +kσ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "DEFAULT_STD_FLOOR",
    "QuantizerStats",
    "fit_stats",
    "UniformQuantizer",
]

MIN_BITS = 2
MAX_BITS = 8
DEFAULT_STD_FLOOR = 1e-6


def _as_float_array(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from exc
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


@dataclass
class QuantizerStats:
    """Per-coordinate (shape ``(n_values,)``) or scalar (0-d) centre and scale."""

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = _as_float_array(self.mean, "mean")
        self.std = _as_float_array(self.std, "std")
        if self.mean.shape != self.std.shape:
            raise ValueError(
                f"mean and std must have the same shape, got {self.mean.shape} and {self.std.shape}"
            )
        if np.any(self.std <= 0):
            raise ValueError("std must be strictly positive (use fit_stats, which floors it)")

    @property
    def n_values(self) -> int | None:
        """Number of coordinates, or ``None`` for scalar statistics."""
        return None if self.mean.ndim == 0 else int(self.mean.shape[0])

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """float64 arrays for safetensors/npz storage (keys ``{prefix}mean``, ``{prefix}std``)."""
        return {f"{prefix}mean": self.mean.copy(), f"{prefix}std": self.std.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], prefix: str = "") -> QuantizerStats:
        try:
            mean, std = arrays[f"{prefix}mean"], arrays[f"{prefix}std"]
        except KeyError as exc:
            raise ValueError(f"missing quantiser statistics array {exc.args[0]!r}") from exc
        return cls(mean=np.asarray(mean), std=np.asarray(std))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists of floats, or floats for scalar stats)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizerStats:
        try:
            return cls(mean=np.asarray(d["mean"]), std=np.asarray(d["std"]))
        except KeyError as exc:
            raise ValueError(f"missing quantiser statistics field {exc.args[0]!r}") from exc


def fit_stats(
    values: np.ndarray,
    *,
    per_coordinate: bool = True,
    ignore_zeros: bool = True,
    std_floor: float = DEFAULT_STD_FLOOR,
) -> QuantizerStats:
    """Fit centre/scale of the non-zero modulation values of a training set.

    ``values`` has shape ``(n_items, n_values)``. With ``ignore_zeros`` (default) exact zeros
    are treated as pruned modulations and excluded. With ``per_coordinate`` the result has
    shape ``(n_values,)``; a coordinate with no usable value falls back to the global
    statistics. ``std`` is floored at ``std_floor`` so it is never 0.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"values must have shape (n_items, n_values), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"values must be non-empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("values contain non-finite entries")
    if not std_floor > 0:
        raise ValueError(f"std_floor must be > 0, got {std_floor}")

    mask = arr != 0 if ignore_zeros else np.ones(arr.shape, dtype=bool)
    n_all = int(mask.sum())
    if n_all:
        g_mean = float(arr[mask].mean())
        g_std = float(arr[mask].std())
    else:
        g_mean, g_std = 0.0, 1.0
    g_std = max(g_std, std_floor)
    if not per_coordinate:
        return QuantizerStats(mean=np.asarray(g_mean), std=np.asarray(g_std))

    cnt = mask.sum(axis=0)
    safe = np.maximum(cnt, 1)
    mean = np.where(mask, arr, 0.0).sum(axis=0) / safe
    var = np.where(mask, (arr - mean) ** 2, 0.0).sum(axis=0) / safe
    std = np.sqrt(var)
    # Coordinates never (or once) observed: no usable spread -> global statistics.
    mean = np.where(cnt == 0, g_mean, mean)
    std = np.where(cnt < 2, g_std, std)
    std = np.maximum(std, std_floor)
    return QuantizerStats(mean=mean, std=std)


@dataclass
class UniformQuantizer:
    """Clip to ``mean ± clip_sigma·std`` and quantise uniformly (see module docstring)."""

    bits: int
    clip_sigma: float = 3.0
    stats: QuantizerStats = field(
        default_factory=lambda: QuantizerStats(mean=np.asarray(0.0), std=np.asarray(1.0))
    )

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int | np.integer):
            raise ValueError(f"bits must be an integer, got {self.bits!r}")
        self.bits = int(self.bits)
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        try:
            self.clip_sigma = float(self.clip_sigma)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"clip_sigma must be a number, got {self.clip_sigma!r}") from exc
        if not (np.isfinite(self.clip_sigma) and self.clip_sigma > 0):
            raise ValueError(f"clip_sigma must be finite and > 0, got {self.clip_sigma}")
        if not isinstance(self.stats, QuantizerStats):
            raise ValueError("stats must be a QuantizerStats")

    # -- geometry -----------------------------------------------------------------------
    @property
    def n_symbols(self) -> int:
        """Alphabet size for the entropy coder: ``2**bits``."""
        return 1 << self.bits

    @property
    def n_levels(self) -> int:
        """Reconstruction levels actually used: ``2**bits - 1`` (odd, mid-tread)."""
        return self.n_symbols - 1

    @property
    def centre_symbol(self) -> int:
        """Symbol that reconstructs exactly to the mean."""
        return (self.n_levels - 1) // 2

    @property
    def step(self) -> np.ndarray:
        """Quantisation step per coordinate (same shape as the statistics)."""
        return self.clip_sigma * self.stats.std / self.centre_symbol

    def _check_shape(self, arr: np.ndarray, what: str) -> None:
        n = self.stats.n_values
        if n is None:
            return
        if arr.ndim == 0 or arr.shape[-1] != n:
            raise ValueError(
                f"{what} must have shape (..., {n}) to match the quantiser statistics, "
                f"got {arr.shape}"
            )

    # -- coding -------------------------------------------------------------------------
    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Map float values of shape ``(..., n_values)`` to int64 symbols in ``[0, 2**bits-2]``."""
        arr = np.asarray(values, dtype=np.float64)
        self._check_shape(arr, "values")
        if not np.all(np.isfinite(arr)):
            raise ValueError("values contain non-finite entries")
        c = self.centre_symbol
        z = (arr - self.stats.mean) / self.step  # offset from the mean, in steps
        q = np.rint(np.clip(z, -c, c)) + c
        return q.astype(np.int64)

    def dequantize(self, symbols: np.ndarray) -> np.ndarray:
        """Map symbols in ``[0, 2**bits-1]`` back to float32 values (top symbol -> top level)."""
        sym = np.asarray(symbols)
        if sym.dtype.kind == "f":
            if not (np.all(np.isfinite(sym)) and np.all(sym == np.rint(sym))):
                raise ValueError("symbols must be integers")
        elif sym.dtype.kind not in "iu":
            raise ValueError(f"symbols must be integers, got dtype {sym.dtype}")
        sym = sym.astype(np.int64)
        self._check_shape(sym, "symbols")
        if sym.size and (sym.min() < 0 or sym.max() >= self.n_symbols):
            raise ValueError(
                f"symbols must lie in [0, {self.n_symbols - 1}] for {self.bits} bits, "
                f"got range [{sym.min()}, {sym.max()}]"
            )
        c = self.centre_symbol
        off = np.minimum(sym, self.n_levels - 1) - c
        return (self.stats.mean + off * self.step).astype(np.float32)

    # -- storage ------------------------------------------------------------------------
    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        out = self.stats.to_arrays(prefix)
        out[f"{prefix}bits"] = np.asarray(self.bits, dtype=np.int64)
        out[f"{prefix}clip_sigma"] = np.asarray(self.clip_sigma, dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], prefix: str = "") -> UniformQuantizer:
        try:
            bits = int(np.asarray(arrays[f"{prefix}bits"]).item())
            clip = float(np.asarray(arrays[f"{prefix}clip_sigma"]).item())
        except KeyError as exc:
            raise ValueError(f"missing quantiser array {exc.args[0]!r}") from exc
        return cls(bits=bits, clip_sigma=clip, stats=QuantizerStats.from_arrays(arrays, prefix))

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "clip_sigma": self.clip_sigma, **self.stats.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UniformQuantizer:
        try:
            return cls(
                bits=d["bits"], clip_sigma=d["clip_sigma"], stats=QuantizerStats.from_dict(d)
            )
        except KeyError as exc:
            raise ValueError(f"missing quantiser field {exc.args[0]!r}") from exc
