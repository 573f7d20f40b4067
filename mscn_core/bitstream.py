"""The ``.mscn`` bitstream container (DESIGN §6).

Pure stdlib (+ numpy only to serialise numpy scalars/arrays found in metadata).

Layout (all integers little-endian)::

    offset  size         field
    0       4            magic  b"MSCN"
    4       2            format version (u16) = 1
    6       4            header_len (u32) = length of the compressed header in bytes
    10      header_len   zlib-compressed header JSON, UTF-8 (see below)
    ...     sum(lengths) payloads, item after item, in header order
    end-4   4            CRC-32 (zlib.crc32, u32) of every byte before it

Header JSON (compact, sorted keys)::

    {"checkpoint_hash": "<64 hex, sha256 of the checkpoint>", "modality": "sphere",
     "bits": 6, "n_items": 2, "items": [{...}, {...}], "payload_lengths": [123, 456],
     "extra": {...}}

``items`` are arbitrary JSON-serialisable dicts a plugin needs to rebuild each
artifact (its own business; the core never reads them). numpy scalars/arrays are converted to Python
numbers/lists on write. Non-finite floats are written as the (non-standard, but read by
Python's ``json``) tokens ``NaN``/``Infinity`` so non-finite metadata values survive.

The header is zlib-compressed because at ≤ 0.05 bits/value the item metadata
would otherwise cost more than the modulations themselves.

Checksum choice: CRC-32 (4 bytes). The container targets ≤ 0.05 bits/value where every
byte of overhead counts, and the threat model is accidental damage (truncated downloads,
bit rot, wrong file), not an adversary: CRC-32 detects every error burst of ≤ 32 bits
(so every single flipped bit) and misses random damage with probability 2**-32. The
checkpoint itself is identified by its full sha256 in the header.

Reading order: magic -> version -> header_len bound -> checksum -> (only now) JSON ->
field validation -> payload lengths -> expected checkpoint. After a checksum failure only, the
(unverified) header is peeked at to tell "truncated: expected X bytes, got Y" apart from
"checksum mismatch"; nothing from it is trusted or returned. Nothing is allocated from an
unverified length: lengths are compared with ``len(data)`` before slicing, and slicing
only copies bytes that exist.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .atomic import save_bytes_atomic  # noqa: F401 - re-exported

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "CHECKSUM_LEN",
    "BitstreamError",
    "Bitstream",
    "write_bitstream",
    "read_bitstream",
    "save_bytes_atomic",
    "bits_per_value",
    "bitstream_overhead",
]

MAGIC = b"MSCN"
FORMAT_VERSION = 1
CHECKSUM_LEN = 4
_PREFIX = struct.Struct("<4sHI")  # magic, version, header_len
PREFIX_LEN = _PREFIX.size  # 10
MIN_BITS, MAX_BITS = 2, 8
_HASH_RE = re.compile(r"[0-9a-f]{64}")


class BitstreamError(ValueError):
    """The data is not a valid ``.mscn`` stream for this build/checkpoint."""


@dataclass
class Bitstream:
    """A parsed ``.mscn`` stream."""

    version: int
    checkpoint_hash: str
    modality: str
    bits: int
    items_meta: list[dict[str, Any]]
    payloads: list[bytes]
    extra: dict[str, Any] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)  # the full decoded header

    @property
    def n_items(self) -> int:
        return len(self.payloads)

    @property
    def payload_bytes(self) -> int:
        return sum(len(p) for p in self.payloads)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes | bytearray):
        raise TypeError("bytes in metadata are not JSON-serialisable; encode them (e.g. hex)")
    raise TypeError(f"object of type {type(obj).__name__} is not JSON-serialisable")


def _crc(data: bytes | memoryview) -> bytes:
    return struct.pack("<I", zlib.crc32(data) & 0xFFFFFFFF)


def _check_hash(h: Any, what: str) -> str:
    if not isinstance(h, str) or not _HASH_RE.fullmatch(h.lower()):
        raise ValueError(f"{what} must be a 64-character hex sha256 digest, got {h!r}")
    return h.lower()


def write_bitstream(
    *,
    checkpoint_hash: str,
    modality: str,
    bits: int,
    items_meta: list[dict],
    payloads: list[bytes],
    extra: dict | None = None,
) -> bytes:
    """Serialise items into one ``.mscn`` stream (see module docstring for the layout)."""
    ck = _check_hash(checkpoint_hash, "checkpoint_hash")
    if not isinstance(modality, str) or not modality:
        raise ValueError(f"modality must be a non-empty string, got {modality!r}")
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise ValueError(f"bits must be an integer, got {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    items_meta = list(items_meta)
    payloads = list(payloads)
    if len(items_meta) != len(payloads):
        raise ValueError(
            f"items_meta and payloads differ in length ({len(items_meta)} vs {len(payloads)})"
        )
    for i, m in enumerate(items_meta):
        if not isinstance(m, dict):
            raise ValueError(f"items_meta[{i}] must be a dict, got {type(m).__name__}")
    blobs: list[bytes] = []
    for i, p in enumerate(payloads):
        try:
            blobs.append(bytes(memoryview(p).cast("B")))
        except TypeError as exc:
            raise ValueError(f"payloads[{i}] must be bytes-like, got {type(p).__name__}") from exc
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict or None, got {type(extra).__name__}")

    header = {
        "checkpoint_hash": ck,
        "modality": modality,
        "bits": int(bits),
        "n_items": len(blobs),
        "items": items_meta,
        "payload_lengths": [len(b) for b in blobs],
        "extra": extra or {},
    }
    try:
        hjson = json.dumps(
            header,
            default=_json_default,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"item metadata is not JSON-serialisable: {exc}") from exc
    hjson = zlib.compress(hjson, 9)
    if len(hjson) >= 1 << 32:
        raise ValueError("header too large")
    body = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hjson)), hjson, *blobs])
    return body + _crc(body)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _short(h: str) -> str:
    return h[:12]


def read_bitstream(data: bytes, *, expected_checkpoint_hash: str | None = None) -> Bitstream:
    """Parse and verify a ``.mscn`` stream; raise :class:`BitstreamError` on any problem."""
    try:
        buf = bytes(memoryview(data).cast("B"))
    except TypeError as exc:
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}") from exc
    expected = None
    if expected_checkpoint_hash is not None:
        expected = _check_hash(expected_checkpoint_hash, "expected_checkpoint_hash")
    n = len(buf)

    # 1. magic (a strict prefix of the magic is a truncated file, anything else is not ours)
    if buf[:4] != MAGIC:
        if n < 4 and MAGIC.startswith(buf):
            raise BitstreamError(
                f"truncated: expected at least {PREFIX_LEN + 2 + CHECKSUM_LEN} bytes, got {n}"
            )
        raise BitstreamError("not an .mscn file (bad magic)")
    min_len = PREFIX_LEN + 2 + CHECKSUM_LEN  # shortest possible header JSON is "{}"
    if n < PREFIX_LEN:
        raise BitstreamError(f"truncated: expected at least {min_len} bytes, got {n}")
    _, version, header_len = _PREFIX.unpack_from(buf, 0)
    # 2. version (before the checksum: another version may checksum differently)
    if version != FORMAT_VERSION:
        raise BitstreamError(
            f"unsupported format version {version} (this build reads {FORMAT_VERSION})"
        )
    # 3. bound header_len by the data actually present (no allocation from it)
    need = PREFIX_LEN + header_len + CHECKSUM_LEN
    if n < need:
        raise BitstreamError(f"truncated: expected at least {need} bytes, got {n}")
    # 4. checksum over everything before it, before looking at the JSON
    body, stored = buf[:-CHECKSUM_LEN], buf[-CHECKSUM_LEN:]
    if _crc(body) != stored:
        declared = _declared_total(buf, header_len)
        if declared is not None and declared > n:
            raise BitstreamError(f"truncated: expected {declared} bytes, got {n}")
        raise BitstreamError("checksum mismatch: file is corrupted")

    # 5. header JSON (now known to be what the writer wrote)
    header = _parse_header(buf[PREFIX_LEN : PREFIX_LEN + header_len])
    ck = header["checkpoint_hash"]

    # 6. payload lengths
    lengths = header["payload_lengths"]
    avail = n - need
    total = sum(lengths)
    if total != avail:
        raise BitstreamError(
            f"payload lengths inconsistent: header declares {total} payload bytes, "
            f"stream holds {avail}"
        )
    payloads: list[bytes] = []
    off = PREFIX_LEN + header_len
    for ln in lengths:
        payloads.append(buf[off : off + ln])
        off += ln

    # 7. checkpoint
    if expected is not None and expected != ck:
        raise BitstreamError(
            f"checkpoint mismatch: stream needs checkpoint {_short(ck)}, got {_short(expected)}"
        )
    return Bitstream(
        version=version,
        checkpoint_hash=ck,
        modality=header["modality"],
        bits=header["bits"],
        items_meta=header["items"],
        payloads=payloads,
        extra=header["extra"],
        header=header,
    )


def _declared_total(buf: bytes, header_len: int) -> int | None:
    """Best-effort diagnosis after a checksum failure: the total length the (unverified)
    header declares. Only used to choose between "truncated" and "corrupted" messages."""
    try:
        h = json.loads(_inflate(buf[PREFIX_LEN : PREFIX_LEN + header_len]).decode("utf-8"))
        lengths = h["payload_lengths"]
        if not isinstance(lengths, list) or not all(_is_count(x) for x in lengths):
            return None
        return PREFIX_LEN + header_len + sum(lengths) + CHECKSUM_LEN
    except Exception:  # diagnosis only; any failure means "no opinion"
        return None


_MAX_HEADER = 64 << 20  # inflated header bound: a forged stream cannot bomb memory


def _inflate(raw: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(raw, _MAX_HEADER)
    if d.unconsumed_tail or not d.eof:
        raise ValueError("header does not inflate to a complete JSON document within bounds")
    return out


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        text = _inflate(raw)
    except (zlib.error, ValueError) as exc:
        raise BitstreamError(f"malformed header: not zlib-compressed JSON ({exc})") from exc
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BitstreamError(f"malformed header JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise BitstreamError("malformed header JSON: top level is not an object")
    missing = [
        k
        for k in ("checkpoint_hash", "modality", "bits", "n_items", "items", "payload_lengths")
        if k not in header
    ]
    if missing:
        raise BitstreamError(f"malformed header JSON: missing field(s) {', '.join(missing)}")
    ck = header["checkpoint_hash"]
    if not isinstance(ck, str) or not _HASH_RE.fullmatch(ck):
        raise BitstreamError("malformed header JSON: checkpoint_hash is not a sha256 hex digest")
    if not isinstance(header["modality"], str) or not header["modality"]:
        raise BitstreamError("malformed header JSON: modality must be a non-empty string")
    b = header["bits"]
    if not _is_count(b) or not MIN_BITS <= b <= MAX_BITS:
        raise BitstreamError(f"malformed header JSON: bits must be in [{MIN_BITS}, {MAX_BITS}]")
    items, lengths, n_items = header["items"], header["payload_lengths"], header["n_items"]
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise BitstreamError("malformed header JSON: items must be a list of objects")
    if not isinstance(lengths, list) or not all(_is_count(x) for x in lengths):
        raise BitstreamError(
            "payload lengths inconsistent: payload_lengths must be a list of non-negative ints"
        )
    if not _is_count(n_items) or not (n_items == len(items) == len(lengths)):
        raise BitstreamError(
            f"payload lengths inconsistent: n_items={n_items!r}, {len(items)} item metadata "
            f"entries, {len(lengths)} payload lengths"
        )
    extra = header.setdefault("extra", {})
    if not isinstance(extra, dict):
        raise BitstreamError("malformed header JSON: extra must be an object")
    return header


def bits_per_value(n_bytes: int, n_values: int) -> float:
    """Bits per value (DESIGN §2): ``8 * n_bytes / n_values``."""
    if n_values <= 0:
        raise ValueError(f"n_values must be > 0, got {n_values}")
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
    return 8.0 * n_bytes / n_values


def bitstream_overhead(data: bytes) -> int:
    """Container bytes that are not payload (prefix + header JSON + checksum) of a valid
    stream, for rate accounting."""
    bs = read_bitstream(data)
    return len(data) - bs.payload_bytes
