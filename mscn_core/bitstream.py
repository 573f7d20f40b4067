"""The ``.mscn`` bitstream container (DESIGN §6).

Stdlib, plus numpy (to serialise numpy scalars/arrays found in metadata) and msgspec (the
declared schema of the header).

Layout (all integers little-endian)::

    offset  size         field
    0       4            magic  b"MSCN"
    4       2            format version (u16): 1, or 2 for streams with an error bound
    6       4            header_len (u32) = length of the compressed header in bytes
    10      header_len   zlib-compressed header JSON, UTF-8 (see below)
    ...     sum(lengths) payloads, item after item, in header order
    end-4   4            CRC-32 (zlib.crc32, u32) of every byte before it

Version 2 is version 1 plus, in some items' metadata, ``"residual"``: the quantised
residual of an error-bounded stream (``mscn encode --max-abs-error``), whose range-coded
words follow the item's code words in its payload (layout and validation:
:mod:`mscn_core.residual`). Plain streams are still written as version 1, so every
reader reads them; a reader that knows only version 1 refuses a bounded stream with
"unsupported format version 2" instead of decoding it without its residual.

Header JSON (compact, sorted keys)::

    {"checkpoint_hash": "<64 hex, sha256 of the checkpoint>", "modality": "<plugin name>",
     "bits": 6, "n_items": 2, "items": [{...}, {...}], "payload_lengths": [123, 456],
     "extra": {...}}

``items`` are arbitrary JSON-serialisable dicts a plugin needs to rebuild each
artifact (its own business; the core reads only ``n_values``). numpy scalars/arrays are
converted to Python numbers/lists on write. Non-finite floats are written as the
(non-standard, but read by Python's ``json``) tokens ``NaN``/``Infinity`` so non-finite
metadata values survive (which is why the header is parsed by ``json`` and then checked
against the schema with ``msgspec.convert``: msgspec's own parser refuses those tokens).

The header is zlib-compressed because at ≤ 0.05 bits/value the item metadata
would otherwise cost more than the modulations themselves. Writers deflate it with a
preset dictionary (zlib's FDICT: the zlib header says so and names the dictionary by its
Adler-32, ``DICTID``): the modality's ``header_words`` (an optional member of the plugin
contract: the strings its item metadata repeats) then the header's own key names
(:data:`CORE_HEADER_WORDS`; alone, :data:`HEADER_DICT`), all back-references of 2-3
bytes. Measured: a
one-item shape stream's header 216 → 126 bytes, its whole stream 410 → 320 (the
checkpoint's sha256, ~50 bytes as hex in deflate, is most of what is left). A reader
inflates a header with the dictionary its ``DICTID`` names (:data:`HEADER_DICTS`, which
registers every installed modality's on the first unknown ``DICTID``; a header without
FDICT, as written before, inflates as plain zlib), and refuses an unknown ``DICTID`` in
one line. Readers from before the dictionary refuse such streams as a malformed header.
Dictionaries are frozen: changing a byte of a modality's words or of the core's changes
the ``DICTID`` and orphans every stream written with it.

Threat model. A stream is something people download and decode, so the reader assumes
a *forger*, not only damage: someone who writes any header and payload bytes they like
and recomputes the CRC-32 (which therefore proves nothing about intent; it catches
accidental damage: every burst of <= 32 flipped bits, other damage with probability
1 - 2**-32). The checkpoint is identified by its full sha256 in the header, but the
header is as forgeable as the rest. What a forger can make the reader do is bounded:

- *Lengths* (``header_len``, ``payload_lengths``) are compared with ``len(data)`` before
  slicing; slicing only copies bytes that exist.
- *The header* inflates to at most :func:`header_bound` bytes: ``HEADER_RATIO`` (64) times
  the stream's compressed content (header + payloads), never less than ``HEADER_FLOOR``
  (1 MiB) and never more than ``HEADER_MAX`` (16 MiB). Measured on real streams of the
  shipped plugins (1-132 items, and up to 12,000 items of a regular time series, the most
  compressible metadata seen): a header inflates 1.4-38x its own compressed size (so
  that is not the base), but at most 2.4x the stream's content at 6 bits and 5.2x at 2
  bits (payloads of 8-28 bytes; 10x if every payload were the smallest seen), so the
  ratio has a margin of 6x or more; many-item streams carry 112-175 bytes of metadata
  per item (16 MiB: ~100k items). (Measured before :data:`HEADER_DICT`: it shrinks the
  compressed header, not the inflated one, so the ratio to the content grows a little,
  e.g. 2.3x → 2.8x on a two-field ERA5 stream at 6 bits; the 2-bit worst case was not
  re-measured: at the same 1.2x growth it is ~6.3x, a margin of 10x.)
  A zlib bomb stops at the cap, and the JSON parser
  (whose objects cost at most ~30 bytes of memory per byte of text, measured on
  worst-case texts) never sees more than 64x the file or 16 MiB.
- *The schema* is declared (:class:`Header`, checked with ``msgspec``): a field of the
  wrong type or out of range is one line naming it (``$.bits``), never a traceback.
- *Item metadata* is the plugin's business: before decoding any payload, the core
  (:func:`mscn_core.pipeline.decode_stream`) requires every payload to be long enough to
  hold a code (so ``n_items`` is bounded by the payload bytes), asks the plugin's
  ``check_meta`` to validate each item cheaply and to say how many values it will
  produce, and refuses a stream whose total exceeds
  :func:`mscn_core.limits.max_output_values` (environment variable
  ``MSCN_MAX_OUTPUT_VALUES``). Nested blobs (masks) inflate through
  :func:`mscn_core.limits.inflate` with the exact size the declared shape allows.

Reading order: magic -> version -> header_len bound -> checksum -> (only now) bounded
inflate -> JSON -> schema -> payload lengths -> expected checkpoint. After a checksum
failure only, the (unverified) header is peeked at, under the same bounds, to tell
"truncated: expected X bytes, got Y" apart from "checksum mismatch"; nothing from it is
trusted or returned.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import numpy as np

from .atomic import save_bytes_atomic  # noqa: F401 - re-exported
from .limits import inflate, one_line

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "BOUNDED_VERSION",
    "CHECKSUM_LEN",
    "BitstreamError",
    "Bitstream",
    "Header",
    "header_bound",
    "write_bitstream",
    "read_bitstream",
    "save_bytes_atomic",
    "bits_per_value",
    "bitstream_overhead",
    "HEADER_DICT",
    "HEADER_DICTS",
    "header_dictionary",
    "inflate_header_text",
]

MAGIC = b"MSCN"
FORMAT_VERSION = 1
BOUNDED_VERSION = 2  # streams with residuals (error-bounded mode)
FORMAT_VERSIONS = (FORMAT_VERSION, BOUNDED_VERSION)
CHECKSUM_LEN = 4
_PREFIX = struct.Struct("<4sHI")  # magic, version, header_len
PREFIX_LEN = _PREFIX.size  # 10
MIN_BITS, MAX_BITS = 2, 8
_HASH_RE = re.compile(r"[0-9a-f]{64}")

MAX_NAME = 128  # characters of a modality name (a forged one ends up in error messages)

# Inflated-header bound (see the module docstring for the measurements behind it).
HEADER_RATIO = 64  # inflated header / (compressed header + payloads); real streams <= 5.2
HEADER_FLOOR = 1 << 20  # any stream may carry 1 MiB of header (one-item headers: 0.9-2.6 KB)
HEADER_MAX = 16 << 20  # never more (~100k items at a measured 112-175 bytes each)


# The preset dictionary of header deflation (see the module docstring): the strings of
# the header itself (keys sorted, compact separators, as write_bitstream writes them),
# after a modality's own ``header_words`` (the plugin contract's optional member: strings
# its item metadata repeats). FROZEN, both parts: every stream names its dictionary by
# Adler-32. The most frequent strings last (deflate reaches nearer bytes with shorter
# distance codes).
CORE_HEADER_WORDS = (
    '"name":"', '"shape":[', '"scale":[', '"units":', '"resolution":', '"residual":{',
    '{"bits":', ',"checkpoint_hash":"', '","extra":{"common":{', '"n_values":',
    ',"template":{}', '}},"items":[{}],"modality":"', ',"n_items":1,"payload_lengths":[',
)
HEADER_DICTS: dict[int, bytes] = {}  # DICTID → dictionary, filled by header_dictionary
_FDICT = 0x20  # zlib header, second byte: a preset dictionary's DICTID follows


def header_dictionary(words: Sequence[str] = ()) -> bytes:
    """The preset dictionary of a modality whose ``header_words`` are ``words``
    (registered, so that streams naming it inflate in this process)."""
    zdict = "".join([*words, *CORE_HEADER_WORDS]).encode()
    HEADER_DICTS.setdefault(zlib.adler32(zdict), zdict)
    return zdict


HEADER_DICT = header_dictionary()  # the core's own: writers that name no modality words


def dictionary_named(dictid: int) -> bytes | None:
    """The registered dictionary with this DICTID; if none, every installed modality's
    is registered first (a plugin that fails to load is skipped: it never breaks the
    others' streams)."""
    if dictid not in HEADER_DICTS:
        from .registry import get_modality, modality_names

        for name in modality_names():
            try:
                header_dictionary(tuple(getattr(get_modality(name), "header_words", ())))
            except Exception:  # noqa: BLE001 - a broken plugin: its streams stay unreadable
                continue
    return HEADER_DICTS.get(dictid)


def _deflate_header(text: bytes, zdict: bytes = HEADER_DICT) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_DEFAULT_STRATEGY, zdict)
    return c.compress(text) + c.flush()


def inflate_header_text(raw: bytes) -> bytes:
    """A header's JSON text, no bound (tests and benchmarks read their own streams)."""
    zdict = dictionary_named(int.from_bytes(raw[2:6], "big")) if raw[1] & _FDICT else b""
    return zlib.decompressobj(zlib.MAX_WBITS, zdict or b"").decompress(bytes(raw))


def _inflate_header(raw: bytes, bound: int) -> bytes:
    """The header's JSON text, inflated to at most ``bound`` bytes with the preset
    dictionary its zlib header names (or none): :func:`limits.inflate`'s checks."""
    if len(raw) < 6 or not raw[1] & _FDICT:
        return inflate(raw, bound, "header")
    zdict = dictionary_named(int.from_bytes(raw[2:6], "big"))
    if zdict is None:
        raise ValueError(f"header is not zlib data (it needs preset dictionary "
                         f"{raw[2:6].hex()}, which this build does not have)")
    d = zlib.decompressobj(zlib.MAX_WBITS, zdict)
    try:
        out = d.decompress(bytes(raw), bound + 1)  # one more byte proves "beyond"
    except zlib.error as exc:
        raise ValueError(f"header is not zlib data ({exc})") from None
    if len(out) > bound:
        raise ValueError(f"header inflates beyond {bound:,} bytes")
    if not d.eof:
        raise ValueError("header is not zlib data (truncated)")
    if d.unused_data:
        raise ValueError("header is not zlib data (trailing bytes after the end)")
    return out


def header_bound(content_len: int) -> int:
    """Most bytes the header of a stream may inflate to, from the length of its
    compressed content (compressed header + payloads: all but prefix and checksum)."""
    return min(HEADER_MAX, max(HEADER_FLOOR, HEADER_RATIO * content_len))


class Header(msgspec.Struct):
    """The declared schema of the header JSON (unknown fields are ignored: a later
    writer may add some). ``items`` must be a list of objects: checked separately,
    because converting them as ``dict`` would copy every item (200 MB per million)."""

    checkpoint_hash: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    modality: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
    bits: Annotated[int, msgspec.Meta(ge=MIN_BITS, le=MAX_BITS)]
    n_items: Annotated[int, msgspec.Meta(ge=0)]
    items: list[Any]
    payload_lengths: list[Annotated[int, msgspec.Meta(ge=0)]]
    extra: dict[str, Any] = {}


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
    version: int = FORMAT_VERSION,
    header_words: Sequence[str] = (),
) -> bytes:
    """Serialise items into one ``.mscn`` stream (see module docstring for the layout);
    ``header_words``: the modality's, for the header's preset dictionary."""
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
    if version not in FORMAT_VERSIONS:
        raise ValueError(f"version must be one of {FORMAT_VERSIONS}, got {version!r}")
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
    hjson = _deflate_header(hjson, header_dictionary(header_words))
    if len(hjson) >= 1 << 32:
        raise ValueError("header too large")
    body = b"".join([_PREFIX.pack(MAGIC, version, len(hjson)), hjson, *blobs])
    return body + _crc(body)


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as a reader gets it back from a header (tuples → lists, numpy → Python):
    the encoder simulates the decoder on exactly that."""
    return json.loads(json.dumps(obj, default=_json_default))


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _short(h: str) -> str:
    return h[:12]


def read_bitstream(data: bytes, *, expected_checkpoint_hash: str | None = None) -> Bitstream:
    """Parse and verify a ``.mscn`` stream; raise :class:`BitstreamError` on any problem."""
    try:  # bytes are used as they are: a copy of a large stream would double its memory
        buf = data if type(data) is bytes else bytes(memoryview(data).cast("B"))
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
    if version not in FORMAT_VERSIONS:
        raise BitstreamError(
            f"unsupported format version {version} (this build reads "
            f"{' and '.join(map(str, FORMAT_VERSIONS))})"
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

    # 5. header JSON (now known to be what the writer wrote), inflated within bounds
    header = _parse_header(buf[PREFIX_LEN : PREFIX_LEN + header_len],
                           header_bound(n - PREFIX_LEN - CHECKSUM_LEN))
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
        raw = buf[PREFIX_LEN : PREFIX_LEN + header_len]
        bound = header_bound(len(buf) - PREFIX_LEN - CHECKSUM_LEN)
        h = json.loads(_inflate_header(raw, bound).decode("utf-8"))
        lengths = h["payload_lengths"]
        if not isinstance(lengths, list) or not all(_is_count(x) for x in lengths):
            return None
        return PREFIX_LEN + header_len + sum(lengths) + CHECKSUM_LEN
    except Exception:  # diagnosis only; any failure means "no opinion"
        return None


_REQUIRED = ("checkpoint_hash", "modality", "bits", "n_items", "items", "payload_lengths")


def _parse_header(raw: bytes, bound: int) -> dict[str, Any]:
    try:
        text = _inflate_header(raw, bound)
    except ValueError as exc:
        if "inflates beyond" in str(exc):
            raise BitstreamError(
                f"malformed header: it inflates beyond {bound:,} bytes (the bound for "
                f"this stream: {HEADER_RATIO}x its size, at least {HEADER_FLOOR >> 20} MiB, "
                f"at most {HEADER_MAX >> 20} MiB)"
            ) from None
        raise BitstreamError(f"malformed header: not zlib-compressed JSON ({exc})") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BitstreamError(f"malformed header JSON: {one_line(exc)}") from None
    if not isinstance(header, dict):
        raise BitstreamError("malformed header JSON: top level is not an object")
    missing = [k for k in _REQUIRED if k not in header]
    if missing:
        raise BitstreamError(f"malformed header JSON: missing field(s) {', '.join(missing)}")
    try:
        h = msgspec.convert(header, type=Header)
    except msgspec.ValidationError as exc:
        where = "payload lengths inconsistent" if any(
            f"`$.{k}" in str(exc) for k in ("payload_lengths", "n_items")) else \
            "malformed header JSON"
        raise BitstreamError(f"{where}: {one_line(exc)}") from None
    for i, m in enumerate(h.items):
        if not isinstance(m, dict):
            raise BitstreamError(f"malformed header JSON: Expected `object`, got "
                                 f"`{_json_type(m)}` - at `$.items[{i}]`")
    if not (h.n_items == len(h.items) == len(h.payload_lengths)):
        raise BitstreamError(
            f"payload lengths inconsistent: n_items={h.n_items}, {len(h.items)} item metadata "
            f"entries, {len(h.payload_lengths)} payload lengths"
        )
    header.update(items=h.items, extra=h.extra)
    return header


def _json_type(x: Any) -> str:
    names = {bool: "bool", int: "int", float: "float", str: "str", list: "array",
             type(None): "null"}
    return names.get(type(x), type(x).__name__)


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


def short_float(x: float, tol: float) -> float | int:
    """The shortest decimal within ``tol`` of ``x`` (an int when integral), so that a
    header's JSON writes ``0.99684113`` instead of ``0.9968411326408386``, ``0`` instead
    of ``-0.0`` (plugins use it for numbers they need only to float32 precision)."""
    x = float(x)
    if not math.isfinite(x):
        return x
    for digits in range(1, 18):
        y = float(f"{x:.{digits}g}")
        if abs(y - x) <= tol:
            break
    else:
        y = x
    return int(y) if y.is_integer() and abs(y) < 2**53 else y
