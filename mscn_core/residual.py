"""Error-bounded coding: the residual of the INR reconstruction, quantised and range-coded.

Why: a meta-learned network alone cannot promise anything at a given point; adding the
residual ``r = target - prediction`` quantised with step ``2E'`` makes every valid
point land within ``E' <= E`` of its input (SZ-style), and the network's prediction
makes those residuals small, so they cost few bits.

Units. The core works in the signal's *target* units; the plugin's optional
``value_scale(meta)`` converts to artifact units (what the user's bound ``E`` is in):
``step = 2 E' / value_scale``.

Margin. ``E' = E - margin``, where the margin covers what the encoder cannot see:

- the float32 rounding of the targets (2**-25 at 1.0) and the network's float32 output
  on another machine (other BLAS, other thread count): ``FLOAT_SLACK`` = 2**-19 times
  ``value_scale * (1 + max |target|)``. Measured: the float32 prediction of a shipped
  checkpoint lies within 4.1e-7 (2**-21.2) of the same network in float64 on held-out
  fields at 1 and 2 threads, so two float32 implementations differ by < 2**-20.2; the
  slack is twice that. (Decoding runs on the CPU; TF32 GPU matmuls would need more.)
- the plugin's final cast (to float32, to 8-bit integers): half of the optional
  ``output_ulp(meta)``, the spacing of the artifact's number format at the largest
  magnitude the item can take (0 when the plugin does not declare it: float64 output).

A bound ``E <= 2 margin`` is refused: the output format cannot guarantee it.

Stream layout. An item's payload is the modulation code's range-coded words followed
by ``residual.bytes`` bytes of the residual's range-coded words; ``meta["residual"]``
(in the header, validated by :func:`check_residual` before anything is decoded) holds::

    {"points": N, "channels": c, "step": 2E'/value_scale, "max_abs_error": E,
     "model": "laplace", "min": qmin, "max": qmax, "mean": mu, "scale": b, "bytes": B}
    or "model": "hist" with "counts": [...] over qmin..qmax instead of mean/scale;
    "delta": true when the symbols are differences along the point order.

Symbols are the integers ``q`` (row-major over ``(N, c)``, masked points 0), or their
differences along the points (per channel); the encoder keeps whichever of the four
(model x delta) gives fewer bytes, table included. Streams with a
residual are written as format version 2 (older readers refuse them cleanly).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import constriction
import numpy as np
import torch
from torch import Tensor

from . import limits

FLOAT_SLACK = 2.0 ** -19  # target units, relative to 1 + max|target| (see module docstring)
MAX_HIST = 1 << 14  # histogram bins a stream may carry
MAX_SYMBOL = 1 << 22  # |q| beyond: the bound is below float32 resolution; coder support < 2**24
MODELS = ("laplace", "hist")
_model = constriction.stream.model
_queue = constriction.stream.queue


class BoundError(ValueError):
    """A bound the codec cannot honour (too small for the output format, no value_scale)."""


def value_scale(modality: Any, meta: dict) -> float:
    """Artifact units per target unit, from the plugin; refused when it has none."""
    fn = getattr(modality, "value_scale", None)
    if not callable(fn):
        raise BoundError(f"modality {modality.name!r} has no value_scale(); it cannot encode "
                         "with an error bound")
    s = limits.check_finite(fn(meta), f"{modality.name}.value_scale()")
    if s <= 0:
        raise BoundError(f"{modality.name}.value_scale() must be > 0, got {s}")
    return s


def output_ulp(modality: Any, meta: dict) -> float:
    fn = getattr(modality, "output_ulp", None)
    if not callable(fn):
        return 0.0
    u = limits.check_finite(fn(meta), f"{modality.name}.output_ulp()")
    if u < 0:
        raise BoundError(f"{modality.name}.output_ulp() must be >= 0, got {u}")
    return u


def margin(scale: float, max_target: float, ulp: float) -> float:
    """What E' must stay below E by, in artifact units (see the module docstring)."""
    return FLOAT_SLACK * scale * (1.0 + max_target) + 0.5 * ulp


# -- entropy coding of the integers q ------------------------------------------------
def _laplace(meta: dict) -> Any:
    return _model.QuantizedLaplace(meta["min"], meta["max"], float(meta["mean"]),
                                   float(meta["scale"]))


def _hist(meta: dict) -> Any:
    counts = np.asarray(meta["counts"], dtype=np.float64)
    return _model.Categorical(counts / counts.sum(), perfect=False)


def _encode(q: np.ndarray, meta: dict) -> bytes:
    enc = _queue.RangeEncoder()
    if meta["model"] == "laplace":
        enc.encode(q.astype(np.int32), _laplace(meta))
    else:
        enc.encode((q - meta["min"]).astype(np.int32), _hist(meta))
    return np.asarray(enc.get_compressed(), dtype=np.uint32).astype("<u4").tobytes()


def _table_bytes(meta: dict) -> int:
    """Header bytes a model's parameters add (zlib'd JSON, as the header is stored)."""
    return len(zlib.compress(json.dumps(meta, separators=(",", ":")).encode(), 9))


def encode_residual(q: np.ndarray) -> tuple[dict, bytes]:
    """The cheapest of a quantised Laplace and a transmitted histogram, on ``q`` or on its
    differences along the point order (``"delta": true``; per channel), and its bytes.

    Why both: a well-fitted item's residual is white (differences cost more), a poorly
    fitted one's is smooth in the plugin's point order (differences cost less)."""
    q = np.asarray(q, dtype=np.int64)
    q2 = q.reshape(q.shape[0], -1)
    candidates = []
    for delta in (False, True):
        sym = (np.diff(q2, axis=0, prepend=0) if delta else q2).reshape(-1)
        lo = int(sym.min())
        hi = max(int(sym.max()), lo + 1)  # the coder's models need two symbols at least
        if max(-lo, hi) > MAX_SYMBOL:
            continue
        extra = {"delta": True} if delta else {}
        mu = float(np.median(sym))
        b = max(float(np.abs(sym - mu).mean()), 0.05)
        for f in (0.7, 0.85, 1.0, 1.2):  # the MLE, nudged: the quantised pmf is not its
            meta = {"model": "laplace", "min": lo, "max": hi, "mean": mu,
                    "scale": float(np.float32(b * f)), **extra}
            candidates.append((meta, _encode(sym, meta)))
        if hi - lo < MAX_HIST:
            counts = np.bincount(sym - lo, minlength=hi - lo + 1)
            meta = {"model": "hist", "min": lo, "max": hi, "counts": counts.tolist(), **extra}
            candidates.append((meta, _encode(sym, meta)))
    meta, data = min(candidates, key=lambda c: len(c[1]) + _table_bytes(c[0]))
    return dict(meta, bytes=len(data)), data


def decode_residual(meta: dict, data: bytes) -> np.ndarray:
    """The integers q (int64, ``points * channels``) of a :func:`check_residual`'ed item."""
    n = meta["points"] * meta["channels"]
    words = np.frombuffer(memoryview(data).cast("B"), dtype="<u4").astype(np.uint32)
    try:
        dec = _queue.RangeDecoder(words)
        if meta["model"] == "laplace":
            q = np.asarray(dec.decode(_laplace(meta), n), dtype=np.int64)
        else:
            q = np.asarray(dec.decode(_hist(meta), n), dtype=np.int64) + meta["min"]
        exhausted = bool(dec.maybe_exhausted())
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # constriction errors, incl. Rust panics
        raise ValueError(f"residual decoding failed: {limits.one_line(exc)}") from None
    if q.shape != (n,) or (q.size and (q.min() < meta["min"] or q.max() > meta["max"])):
        raise ValueError("residual decoded out of its declared range (corrupted payload?)")
    if not exhausted:
        raise ValueError("trailing data after the residual (corrupted payload?)")
    if meta.get("delta"):
        q = np.cumsum(q.reshape(meta["points"], meta["channels"]), axis=0).reshape(-1)
    return q


def check_residual(meta: Any, payload_len: int, code_min: int) -> int:
    """Validate a stream's residual metadata (forgeable) without decoding anything;
    return its symbol count, which the caller adds to the output it bounds."""
    if not isinstance(meta, dict):
        raise ValueError(f"residual must be an object, got {limits.describe(meta)}")
    limit = limits.max_output_values()
    n = limits.check_count(meta.get("points"), "residual points", 1, limit)
    c = limits.check_count(meta.get("channels"), "residual channels", 1, limit)
    if n * c > limit:
        limits.check_output_values(n * c, "the residual")
    step = limits.check_finite(meta.get("step"), "residual step")
    if not 0 < step < 1e30:
        raise ValueError(f"residual step must be in (0, 1e30), got {step}")
    limits.check_finite(meta.get("max_abs_error"), "residual max_abs_error")
    nbytes = limits.check_count(meta.get("bytes"), "residual bytes", 4, payload_len - code_min)
    if nbytes % 4:
        raise ValueError(f"residual bytes must be a multiple of 4, got {nbytes}")
    lo = limits.check_count(meta.get("min"), "residual min", -MAX_SYMBOL, MAX_SYMBOL)
    hi = limits.check_count(meta.get("max"), "residual max", lo, MAX_SYMBOL)
    if hi == lo:
        raise ValueError("residual support must hold two symbols or more")
    if meta.get("delta", False) not in (True, False):
        raise ValueError(f"residual delta must be true or false, got "
                         f"{limits.describe(meta.get('delta'))}")
    model = meta.get("model")
    if model == "laplace":
        mu = limits.check_finite(meta.get("mean"), "residual mean")
        b = limits.check_finite(meta.get("scale"), "residual scale")
        if not (abs(mu) <= MAX_SYMBOL and 1e-3 <= b <= MAX_SYMBOL):
            raise ValueError(f"residual Laplace mean {mu} / scale {b} out of range")
    elif model == "hist":
        counts = meta.get("counts")
        if not isinstance(counts, list) or len(counts) != hi - lo + 1 or len(counts) > MAX_HIST:
            raise ValueError(f"residual counts must be a list of {hi - lo + 1} (at most "
                             f"{MAX_HIST}) integers, got {limits.describe(counts)}")
        total = sum(limits.check_count(k, "residual count", 0, limit) for k in counts)
        if total != n * c:
            raise ValueError(f"residual counts add up to {total}, not {n * c} symbols")
    else:
        raise ValueError(f"residual model must be one of {MODELS}, got "
                         f"{limits.describe(model)}")
    return n * c


# -- the predictor wrapper -------------------------------------------------------------
@dataclass
class Residual:
    """Decoded residual in target units, shape ``(points, channels)`` (float64)."""

    values: np.ndarray

    def wrap(self, predict: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``predict`` + the residual on the stream's own points (float64: nothing lost)."""
        n, c = self.values.shape

        def bounded(coords: Tensor) -> Tensor:
            if coords.shape[0] != n:
                raise ValueError(f"a bounded stream decodes on its own {n} points, not "
                                 f"{coords.shape[0]}: drop any option that asks for "
                                 "another output size or resolution")
            pred = predict(coords)
            if tuple(pred.shape) != (n, c):
                raise ValueError(f"the residual is for ({n}, {c}) predictions, the plugin "
                                 f"rendered {tuple(pred.shape)}")
            return pred.double() + torch.from_numpy(self.values)

        return bounded


class Capture:
    """A predictor that records what the plugin's ``reconstruct`` asked for (encoder side:
    the residual is taken against exactly what the decoder will compute)."""

    def __init__(self, predict: Callable[[Tensor], Tensor], n: int) -> None:
        self.predict, self.n, self.pred = predict, n, None

    def __call__(self, coords: Tensor) -> Tensor:
        if coords.shape[0] != self.n:
            raise BoundError(f"the plugin's reconstruct predicts on {coords.shape[0]} points, "
                             f"its signal has {self.n}: it cannot encode with an error bound")
        out = self.predict(coords).double()
        if self.pred is None:
            self.pred = out.clone()
        return out


def quantize(targets: np.ndarray, pred: np.ndarray, valid: np.ndarray, scale: float,
             bound: float, ulp: float) -> tuple[np.ndarray, float, float]:
    """Integers q with ``|pred + q step - target| * scale <= bound - margin`` at every
    valid point, the step, and the achieved max error (artifact units, float64).

    Verified here, as the decoder will compute it; the step shrinks until it holds.
    """
    t = targets.astype(np.float64)
    valid = np.broadcast_to(valid.reshape(-1, 1), t.shape)
    m = margin(scale, float(np.abs(t[valid]).max()), ulp)
    if not bound > 2 * m:
        raise BoundError(f"an error bound of {bound:.3g} is below what this output can "
                         f"guarantee (float rounding and the output format: {2 * m:.3g})")
    inner = bound - m
    diff = np.where(valid, t - pred, 0.0)
    for _ in range(8):
        step = 2 * inner / scale
        q = np.rint(diff / step)
        if np.abs(q).max() > MAX_SYMBOL:
            raise BoundError(f"an error bound of {bound:.3g} needs residual integers beyond "
                             f"{MAX_SYMBOL:,}; give a larger bound")
        q = q.astype(np.int64)
        err = float(np.abs(np.where(valid, pred + q * step - t, 0.0)).max()) * scale
        if err <= bound - m:
            return q, step, err
        inner *= 1 - 1e-6
    raise BoundError(f"cannot meet the bound {bound:.3g} in float64 arithmetic")
