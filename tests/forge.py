"""The attacker's tool: rewrite a valid ``.mscn`` stream and re-seal it with a valid CRC.

A checksum proves nothing against a forger, so tests (and the fuzzer) build hostile
streams this way: :func:`parse` a real stream, change its header dict or payloads, and
:func:`seal` it again. Deliberately independent of ``mscn_core.bitstream`` (only the
documented layout), so a reader bug cannot hide in a shared helper. The one thing taken
from it is data: the preset dictionary real headers are deflated with (:func:`seal`
writes plain zlib, which readers accept too).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable

from mscn_core.bitstream import inflate_header_text

MAGIC = b"MSCN"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, version, header_len

# mutate(header, payloads): change them in place, or return the header JSON text to use
# verbatim (bytes), e.g. one too large to build as Python objects
Mutator = Callable[[dict, list[bytes]], "bytes | None"]


def parse(data: bytes) -> tuple[dict, list[bytes]]:
    """The header dict and the payloads of a *valid* stream (no checks: test input)."""
    _, _, header_len = _PREFIX.unpack_from(data, 0)
    header = json.loads(inflate_header_text(data[_PREFIX.size:_PREFIX.size + header_len]))
    payloads, off = [], _PREFIX.size + header_len
    for n in header["payload_lengths"]:
        payloads.append(bytes(data[off:off + n]))
        off += n
    return header, payloads


def seal(header: dict | bytes, payloads: list[bytes], *, level: int = 9,
         version: int = VERSION) -> bytes:
    """A stream with this header (a dict, or its JSON text as bytes) and these payloads,
    concatenated as given, and a valid CRC-32. ``payload_lengths`` is NOT recomputed."""
    text = header if isinstance(header, bytes) else json.dumps(
        header, sort_keys=True, separators=(",", ":")).encode()
    packed = zlib.compress(text, level)
    body = _PREFIX.pack(MAGIC, version, len(packed)) + packed + b"".join(payloads)
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def forge(data: bytes, mutate: Mutator) -> bytes:
    """``data`` with ``mutate(header, payloads)`` applied, re-sealed with a valid CRC."""
    header, payloads = parse(data)
    text = mutate(header, payloads)
    return seal(text if isinstance(text, bytes) else header, payloads)


def zlib_bomb(n: int) -> bytes:
    """Valid zlib data that inflates to ``n`` zero bytes (~1000x smaller), made in
    milliseconds: one flushed, history-free deflate block of 16 MiB of zeros, repeated."""
    chunk = 1 << 24
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * min(chunk, n)) + c.flush(zlib.Z_FULL_FLUSH)
    q, r = divmod(n, chunk)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = last.compress(b"\0" * r) + last.flush(zlib.Z_FINISH)
    adler = ((n % 65521) << 16) | 1  # adler-32 of n zero bytes
    return b"\x78\xda" + block * q + tail + adler.to_bytes(4, "big")


def item(header: dict, i: int = 0) -> dict:
    """Item ``i``'s metadata as the decoder merges it (common fields + the item's own):
    a copy for reading; write changes to ``header["extra"]["common"]`` or the item."""
    from mscn_core.pipeline import merge_common

    return merge_common(header.get("extra", {}).get("common", {}), header["items"][i])


def set_field(header: dict, key: str, value: object) -> None:
    """Set top-level item field ``key`` of every item (in ``common`` and per item)."""
    common = header.setdefault("extra", {}).setdefault("common", {})
    common[key] = value
    for m in header["items"]:
        m.pop(key, None)


def del_field(header: dict, key: str) -> None:
    """Remove item field ``key`` everywhere."""
    header.get("extra", {}).get("common", {}).pop(key, None)
    for m in header["items"]:
        m.pop(key, None)
