"""Real entropy coding of quantised modulations with ``constriction`` (range coding).

Pure numpy + constriction; no torch, no plugin imports.

Model
-----
:class:`CategoricalModel` holds a probability table of shape ``(P, n_symbols + 1)`` where
``P`` is either 1 (one model shared by all positions) or ``n_values`` (one model per
modulation position). Column ``n_symbols`` is the **ESCAPE** symbol.

Escape design
-------------
Every row gives ESCAPE a small positive mass ``ε``; symbols never seen in training get
*exactly zero* mass. A symbol ``s`` at position ``i`` is coded as

* the token ``s`` under row ``i`` if ``P[i, s] > 0``, otherwise
* the token ``ESCAPE`` under row ``i``, and ``s`` is appended to a list of raw symbols.

After all ``n_values`` tokens, the raw symbols are appended to the *same* range-coder stream,
each under a uniform model over ``n_symbols`` (``log2(n_symbols)`` bits each). The decoder
reads ``n_values`` tokens, counts the escapes, then reads that many raw symbols. So encoding
never fails for any symbol in ``[0, n_symbols)``, and typical data (no escapes) costs the
cross-entropy plus the coder's flush overhead (≤ one or two 32-bit words).

``constriction`` internally gives every entry at least its smallest representable
probability (24-bit fixed point), so a zero-mass token is still *decodable* from corrupted
data. The encoder never emits one, so decoding such a token (or a raw escaped symbol that
the model actually has mass for, or trailing data) is reported as
:class:`EntropyDecodeError`. Corrupted payloads therefore either raise
:class:`EntropyDecodeError` or decode to *some* symbols in range (a range coder has no
redundancy to detect every corruption; the ``.mscn`` container checksum does that).

Fitting (:func:`fit_categorical`)
---------------------------------
* global counts ``c_g`` over all items and positions -> ``p_g = c_g / N_g`` (zero for
  unseen symbols, which therefore escape);
* per position (``per_position=True``): ``p_i = (c_i + α p_g) / (N + α)`` with
  ``α = smoothing`` (default ``n_symbols / 2``) — a Dirichlet prior centred on the global
  histogram, so the support of every row is the global support and sparse per-position
  counts do not cause escapes;
* escape mass ``ε`` (default: Good–Turing estimate of the unseen-symbol probability,
  ``(n_1 + 1) / (N_g + 2)`` where ``n_1`` is the number of symbols seen exactly once), and
  each row is ``[(1 - ε) p, ε]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import constriction
import numpy as np

__all__ = [
    "EntropyDecodeError",
    "CategoricalModel",
    "fit_categorical",
    "encode_symbols",
    "decode_symbols",
    "estimate_bits",
]

_model_mod = constriction.stream.model
_queue_mod = constriction.stream.queue


class EntropyDecodeError(ValueError):
    """The payload cannot be decoded with this model (corrupted data or wrong model)."""


@dataclass
class CategoricalModel:
    """Probability table ``(P, n_symbols + 1)``; last column is ESCAPE. Rows are normalised."""

    probabilities: np.ndarray

    def __post_init__(self) -> None:
        try:
            p = np.array(self.probabilities, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError("probabilities must be a numeric array") from exc
        if p.ndim == 1:
            p = p[None, :]
        if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 3:
            raise ValueError(
                "probabilities must have shape (n_positions or 1, n_symbols + 1) with "
                f"n_symbols >= 2, got {np.shape(self.probabilities)}"
            )
        if p.shape[1] - 1 >= 1 << 24:
            raise ValueError(f"too many symbols: {p.shape[1] - 1}")
        if not np.all(np.isfinite(p)) or np.any(p < 0):
            raise ValueError("probabilities must be finite and non-negative")
        if np.any(p[:, -1] <= 0):
            raise ValueError("every row needs a positive ESCAPE probability (last column)")
        # Normalise, but leave an already-normalised table bit-identical: a model reloaded
        # from a checkpoint must feed constriction exactly the same floats as the original.
        sums = p.sum(axis=1, keepdims=True)
        if np.any(np.abs(sums - 1.0) > 1e-9):
            p /= sums
        self.probabilities = p

    @property
    def n_symbols(self) -> int:
        """Alphabet size excluding ESCAPE."""
        return int(self.probabilities.shape[1] - 1)

    @property
    def escape(self) -> int:
        """Index of the ESCAPE token."""
        return self.n_symbols

    @property
    def n_positions(self) -> int:
        return int(self.probabilities.shape[0])

    @property
    def per_position(self) -> bool:
        return self.n_positions > 1

    def rows(self, n_values: int) -> np.ndarray:
        """The probability row used at each of ``n_values`` positions (a view if shared)."""
        if self.per_position:
            if n_values != self.n_positions:
                raise ValueError(
                    f"per-position model has {self.n_positions} positions, got {n_values} values"
                )
            return self.probabilities
        return np.broadcast_to(self.probabilities, (n_values, self.probabilities.shape[1]))

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """float64 arrays for checkpoint storage (key ``{prefix}probabilities``)."""
        return {f"{prefix}probabilities": self.probabilities.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], prefix: str = "") -> CategoricalModel:
        try:
            return cls(probabilities=np.asarray(arrays[f"{prefix}probabilities"]))
        except KeyError as exc:
            raise ValueError(f"missing entropy model array {exc.args[0]!r}") from exc


def _as_symbols(symbols: Any, n_symbols: int, ndim: int, what: str = "symbols") -> np.ndarray:
    arr = np.asarray(symbols)
    if arr.dtype.kind == "f":
        if not (np.all(np.isfinite(arr)) and np.all(arr == np.rint(arr))):
            raise ValueError(f"{what} must be integers")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_symbols):
        raise ValueError(
            f"{what} must lie in [0, {n_symbols - 1}], got range [{arr.min()}, {arr.max()}]"
        )
    return arr


def fit_categorical(
    symbols: np.ndarray,
    n_symbols: int,
    per_position: bool = True,
    smoothing: float | None = None,
    escape_mass: float | None = None,
) -> CategoricalModel:
    """Fit a categorical model (with ESCAPE) on training symbols ``(n_items, n_values)``.

    See the module docstring for the estimator. ``smoothing`` (α ≥ 0) is the weight, in
    pseudo-counts, of the global histogram in each per-position row (ignored when
    ``per_position=False``); default ``n_symbols / 2`` (about half a pseudo-count per symbol,
    which measured best or near-best from 2 to 8 bits and 50 to 2000 training items).
    ``escape_mass`` in (0, 0.5] overrides the Good–Turing default.
    """
    if isinstance(n_symbols, bool) or not isinstance(n_symbols, int | np.integer):
        raise ValueError(f"n_symbols must be an integer, got {n_symbols!r}")
    n_symbols = int(n_symbols)
    if not 2 <= n_symbols < 1 << 24:
        raise ValueError(f"n_symbols must be in [2, 2**24), got {n_symbols}")
    sym = _as_symbols(symbols, n_symbols, 2)
    n_items, n_values = sym.shape
    if n_items == 0 or n_values == 0:
        raise ValueError(f"symbols must be non-empty, got shape {sym.shape}")
    if smoothing is None:
        smoothing = n_symbols / 2.0
    smoothing = float(smoothing)
    if not (np.isfinite(smoothing) and smoothing >= 0):
        raise ValueError(f"smoothing must be finite and >= 0, got {smoothing}")

    counts_g = np.bincount(sym.ravel(), minlength=n_symbols).astype(np.float64)
    n_g = float(counts_g.sum())
    if escape_mass is None:
        n1 = float(np.count_nonzero(counts_g == 1))
        eps = (n1 + 1.0) / (n_g + 2.0)
        eps = min(eps, 0.5)
    else:
        eps = float(escape_mass)
        if not (0 < eps <= 0.5):
            raise ValueError(f"escape_mass must be in (0, 0.5], got {escape_mass}")
    p_g = counts_g / n_g

    if per_position:
        # counts[i, s] = number of items with symbol s at position i
        flat = (np.arange(n_values)[None, :] * n_symbols + sym).ravel()
        counts = np.bincount(flat, minlength=n_values * n_symbols).astype(np.float64)
        counts = counts.reshape(n_values, n_symbols)
        p = (counts + smoothing * p_g[None, :]) / (n_items + smoothing)
    else:
        p = p_g[None, :]
    table = np.concatenate([(1.0 - eps) * p, np.full((p.shape[0], 1), eps)], axis=1)
    return CategoricalModel(probabilities=table)


def _tokens(sym: np.ndarray, rows: np.ndarray, escape: int) -> tuple[np.ndarray, np.ndarray]:
    """Split symbols into coder tokens (ESCAPE where the row has no mass) and raw symbols."""
    mass = rows[np.arange(sym.shape[0]), sym] if sym.size else np.zeros(0)
    esc = mass <= 0
    tokens = np.where(esc, escape, sym).astype(np.int32)
    raws = sym[esc].astype(np.int32)
    return tokens, raws


def estimate_bits(symbols: np.ndarray, model: CategoricalModel) -> float:
    """Ideal code length in bits (cross-entropy of ``symbols`` under ``model``, with escapes)."""
    sym = _as_symbols(symbols, model.n_symbols, 1)
    rows = model.rows(sym.shape[0])
    tokens, raws = _tokens(sym, rows, model.escape)
    if not tokens.size:
        return 0.0
    p = rows[np.arange(tokens.shape[0]), tokens]
    return float(-np.log2(p).sum() + raws.size * np.log2(model.n_symbols))


def encode_symbols(symbols: np.ndarray, model: CategoricalModel) -> bytes:
    """Range-code ``symbols`` (shape ``(n_values,)``, ints in ``[0, n_symbols)``) to bytes.

    The output length is a multiple of 4 (constriction emits 32-bit words, stored
    little-endian); 0 values encode to ``b""``.
    """
    sym = _as_symbols(symbols, model.n_symbols, 1)
    rows = model.rows(sym.shape[0])
    if sym.size == 0:
        return b""
    tokens, raws = _tokens(sym, rows, model.escape)
    enc = _queue_mod.RangeEncoder()
    if model.per_position:
        enc.encode(tokens, _model_mod.Categorical(perfect=False), rows)
    else:
        enc.encode(tokens, _model_mod.Categorical(model.probabilities[0], perfect=False))
    if raws.size:
        enc.encode(raws, _model_mod.Uniform(model.n_symbols))
    words = np.asarray(enc.get_compressed(), dtype=np.uint32)
    return words.astype("<u4").tobytes()


def decode_symbols(data: bytes, n_values: int, model: CategoricalModel) -> np.ndarray:
    """Decode ``n_values`` symbols (int64 array) produced by :func:`encode_symbols`.

    Raises :class:`EntropyDecodeError` for payloads that are provably not a valid encoding
    (bad length, zero-mass token, inconsistent escape, trailing data, coder failure).
    """
    if isinstance(n_values, bool) or not isinstance(n_values, int | np.integer):
        raise ValueError(f"n_values must be an integer, got {n_values!r}")
    n_values = int(n_values)
    if n_values < 0:
        raise ValueError(f"n_values must be >= 0, got {n_values}")
    rows = model.rows(n_values)
    try:
        buf = memoryview(data).cast("B")
    except TypeError as exc:
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}") from exc
    if n_values == 0:
        if len(buf):
            raise EntropyDecodeError(f"expected an empty payload for 0 values, got {len(buf)} B")
        return np.zeros(0, dtype=np.int64)
    if not len(buf):
        # constriction's range coder always emits at least one word for >= 1 symbol
        raise EntropyDecodeError(f"empty payload, expected {n_values} coded values")
    if len(buf) % 4:
        raise EntropyDecodeError(f"payload length {len(buf)} is not a multiple of 4 bytes")
    words = np.frombuffer(buf, dtype="<u4").astype(np.uint32)
    try:
        dec = _queue_mod.RangeDecoder(words)
        if model.per_position:
            tokens = dec.decode(_model_mod.Categorical(perfect=False), rows)
        else:
            cat = _model_mod.Categorical(model.probabilities[0], perfect=False)
            tokens = dec.decode(cat, n_values)
        tokens = np.asarray(tokens, dtype=np.int64)
        n_esc = int(np.count_nonzero(tokens == model.escape))
        if n_esc:
            raws = np.asarray(dec.decode(_model_mod.Uniform(model.n_symbols), n_esc))
        else:
            raws = np.zeros(0, dtype=np.int64)
        exhausted = bool(dec.maybe_exhausted())
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # constriction errors, incl. Rust panics (BaseException)
        raise EntropyDecodeError(f"entropy decoding failed: {exc}") from exc

    if tokens.shape != (n_values,) or raws.shape != (n_esc,):
        raise EntropyDecodeError("entropy decoder returned an unexpected number of symbols")
    if tokens.size and (tokens.min() < 0 or tokens.max() > model.escape):
        raise EntropyDecodeError("decoded token out of range")
    idx = np.arange(n_values)
    if np.any(rows[idx, tokens] <= 0):
        raise EntropyDecodeError("decoded a symbol the model gives no mass (corrupted payload?)")
    out = tokens.copy()
    esc_pos = np.flatnonzero(tokens == model.escape)
    if n_esc:
        raws = raws.astype(np.int64)
        if raws.min() < 0 or raws.max() >= model.n_symbols:
            raise EntropyDecodeError("escaped symbol out of range")
        if np.any(rows[esc_pos, raws] > 0):
            raise EntropyDecodeError("escaped a symbol the model can code (corrupted payload?)")
        out[esc_pos] = raws
    if not exhausted:
        raise EntropyDecodeError("trailing data after the last symbol (corrupted payload?)")
    return out
