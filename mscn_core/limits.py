"""Bounds on what a decoder allocates from numbers it read in a stream.

A ``.mscn`` stream may be forged with a valid CRC (see :mod:`mscn_core.bitstream`), so every
size, count and nested compressed blob in it is an attacker's claim. The helpers here turn
such claims into checked values *before* anything is allocated from them:

- :func:`inflate` decompresses zlib data to at most ``max_len`` bytes (a zlib bomb stops
  at the cap instead of filling memory);
- :func:`check_count` accepts only a true ``int`` (never ``bool``) within a range;
- :func:`max_output_values` / :func:`check_output_values` cap how many values one stream
  may decode to (default :data:`MAX_OUTPUT_VALUES`; environment variable
  ``MSCN_MAX_OUTPUT_VALUES`` raises or lowers it for a legitimately huge decode).

Every error is a :class:`ValueError` with a one-line message naming what was refused.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import zlib
from typing import Any

__all__ = [
    "MAX_OUTPUT_VALUES",
    "ENV_MAX_OUTPUT_VALUES",
    "LimitError",
    "inflate",
    "check_count",
    "check_finite",
    "max_output_values",
    "check_output_values",
    "one_line",
    "describe",
]

# 2**26 = 67,108,864 values per stream: 64 items of a million values, a 400³ lattice, a
# 0.05-degree global grid. Measured decode peaks are about 50 bytes per output value at
# large sizes (sample points, predictions, the float64 values, the written copy), so the
# default keeps a forged but self-consistent stream near 3 GiB; raise it to decode more.
MAX_OUTPUT_VALUES = 1 << 26
ENV_MAX_OUTPUT_VALUES = "MSCN_MAX_OUTPUT_VALUES"


class LimitError(ValueError):
    """A stream asks for more than this process is willing to allocate."""


def one_line(err: BaseException | str) -> str:
    """An error message on one line (multi-line library messages are joined)."""
    text = str(err) if not isinstance(err, KeyError) else f"missing field {err}"
    return " ".join(text.split())


def inflate(data: bytes, max_len: int, what: str) -> bytes:
    """zlib-decompress ``data`` to at most ``max_len`` bytes.

    Why: a few KB of zlib can expand to GB; the cap makes a bomb cost ``max_len`` bytes
    at most. Raises ValueError "``what`` inflates beyond N bytes" or "… is not zlib data"
    (also for a truncated or trailing-garbage stream).
    """
    max_len = check_count(max_len, f"{what} size bound", 0, sys.maxsize - 1)
    d = zlib.decompressobj()
    try:
        # one byte more than allowed: getting it proves the data inflates beyond the cap
        # (and max_length=0 would mean "no limit" to zlib)
        out = d.decompress(bytes(data), max_len + 1)
    except zlib.error as exc:
        raise ValueError(f"{what} is not zlib data ({exc})") from None
    if len(out) > max_len:
        raise ValueError(f"{what} inflates beyond {max_len:,} bytes")
    if not d.eof:
        raise ValueError(f"{what} is not zlib data (truncated)")
    if d.unused_data:
        raise ValueError(f"{what} is not zlib data (trailing bytes after the end)")
    return out


def check_count(value: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]``; bool, float and str are refused (why: JSON
    ``true`` or ``"7"`` must not become a size)."""
    # numpy integers count (plugins compute sizes with numpy); numpy bools do not
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            type(value).__name__ == "bool_":
        raise ValueError(f"{what} must be an integer, got {describe(value)}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"in [{lo:,}, {hi:,}]" if hi is not None else f">= {lo:,}"
        raise ValueError(f"{what} must be {rng}, got {_int(value)}")
    return value


def check_finite(value: Any, what: str) -> float:
    """``value`` as a finite float (int or float, not bool or str)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            type(value).__name__ == "bool_":
        raise ValueError(f"{what} must be a number, got {describe(value)}")
    try:
        out = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{what} must be a finite number, got {describe(value)}") from None
    if not math.isfinite(out):
        raise ValueError(f"{what} must be a finite number, got {out}")
    return out


def max_output_values() -> int:
    """The output cap in values per stream: ``MSCN_MAX_OUTPUT_VALUES`` or the default."""
    raw = os.environ.get(ENV_MAX_OUTPUT_VALUES, "").strip()
    if not raw:
        return MAX_OUTPUT_VALUES
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise LimitError(f"{ENV_MAX_OUTPUT_VALUES}={raw!r} is not an integer") from None
    if value < 1:
        raise LimitError(f"{ENV_MAX_OUTPUT_VALUES}={raw!r} must be >= 1")
    return value


def check_output_values(n: int, what: str = "the stream") -> int:
    """Refuse ``n`` output values above :func:`max_output_values` with a one-line
    :class:`LimitError` that says how to raise the limit."""
    limit = max_output_values()
    if n > limit:
        raise LimitError(f"{what} would decode to {n:,} values, more than the limit of "
                         f"{limit:,}; set {ENV_MAX_OUTPUT_VALUES} to a larger number to "
                         "allow it")
    return n


def _int(value: int) -> str:
    """An int for a message: grouped digits, or its size when it is absurdly long."""
    return f"{value:,}" if abs(value) < 10**18 else f"a {len(str(abs(value)))}-digit number"


def describe(value: Any) -> str:
    """A short description of a JSON value for messages (never a 100 MB repr)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _int(value)
    if isinstance(value, str):
        text = repr(value if len(value) <= 40 else value[:40] + "...")
        return f"str {text}"
    if isinstance(value, list | tuple | dict):
        return f"{type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."
