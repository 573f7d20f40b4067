"""Quantiser, entropy coder and .mscn container (mscn_core.quantize/entropy/bitstream)."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mscn_core.bitstream import (
    CHECKSUM_LEN,
    FORMAT_VERSION,
    MAGIC,
    Bitstream,
    BitstreamError,
    bits_per_value,
    read_bitstream,
    save_bytes_atomic,
    write_bitstream,
)
from mscn_core.entropy import (
    CategoricalModel,
    EntropyDecodeError,
    decode_symbols,
    encode_symbols,
    estimate_bits,
    fit_categorical,
)
from mscn_core.quantize import QuantizerStats, UniformQuantizer, fit_stats

CK = hashlib.sha256(b"checkpoint-A").hexdigest()
CK_B = hashlib.sha256(b"checkpoint-B").hexdigest()
N_VALUES = 256


# --------------------------------------------------------------------------- helpers
def _draw(rng: np.random.Generator, n: int, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Modulation-like values: Laplacian on half the positions, Gaussian on the rest."""
    x = rng.laplace(loc, scale, (n, loc.size))
    half = loc.size // 2
    x[:, :half] = rng.normal(loc[:half], scale[:half], (n, half))
    return x


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(1234)
    loc = rng.normal(0.0, 0.5, N_VALUES)
    scale = rng.uniform(0.05, 2.0, N_VALUES)
    train = _draw(rng, 400, loc, scale)
    test = _draw(rng, 20, loc, scale)  # a different sample from the same distribution
    stats = fit_stats(train)
    return rng, train, test, stats


def _stream(n_items: int = 2) -> tuple[bytes, list[dict], list[bytes]]:
    meta = [
        {
            "variable": f"t{i}",
            "units": "K",
            "grid": {"lat": [-90.0, 90.0, 181], "lon": [0.0, 359.0, 360]},
            "scaling": {"min": 202.66, "max": 320.93},
            "fill_value": float("nan") if i == 0 else -9999.0,
        }
        for i in range(n_items)
    ]
    payloads = [bytes(range(i, i + 7 * (i + 1))) for i in range(n_items)]
    data = write_bitstream(
        checkpoint_hash=CK,
        modality="sphere",
        bits=6,
        items_meta=meta,
        payloads=payloads,
        extra={"codec": "range"},
    )
    return data, meta, payloads


def _reseal(body: bytes) -> bytes:
    """Recompute the CRC so a deliberately malformed body passes the checksum."""
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _forge(header: dict | bytes, payload: bytes = b"", version: int = FORMAT_VERSION) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw = zlib.compress(raw)  # the container stores the header JSON zlib-compressed
    return _reseal(MAGIC + struct.pack("<HI", version, len(raw)) + raw + payload)


# --------------------------------------------------------------------------- quantiser
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_quantizer_error_bound_and_range(setup, bits):
    _, train, test, stats = setup
    q = UniformQuantizer(bits=bits, clip_sigma=3.0, stats=stats)
    sym = q.quantize(test)
    assert sym.shape == test.shape and sym.dtype.kind == "i"
    assert sym.min() >= 0 and sym.max() <= 2**bits - 1
    rec = q.dequantize(sym)
    assert rec.dtype == np.float32
    lo, hi = stats.mean - 3.0 * stats.std, stats.mean + 3.0 * stats.std
    inside = (test >= lo) & (test <= hi)
    assert inside.mean() > 0.9
    err = np.abs(rec.astype(np.float64) - test)
    half = np.broadcast_to(q.step / 2, test.shape)
    tol = 1e-6 * (np.abs(test) + 1)  # float32 output
    assert np.all(err[inside] <= half[inside] + tol[inside])
    # outside the range: clipped to the nearest end
    clipped = np.clip(test, lo, hi)
    assert np.allclose(rec[~inside], clipped[~inside], rtol=1e-5, atol=1e-5)


def test_quantizer_mean_exact_and_top_symbol(setup):
    _, _, _, stats = setup
    for bits in (2, 5, 8):
        q = UniformQuantizer(bits=bits, stats=stats)
        sym = q.quantize(stats.mean[None, :])
        assert np.all(sym == q.centre_symbol)
        assert np.allclose(q.dequantize(sym)[0], stats.mean.astype(np.float32))
        top = np.full(N_VALUES, 2**bits - 1)
        assert np.allclose(q.dequantize(top), (stats.mean + 3 * stats.std).astype(np.float32))
    # the largest value a quantiser produces is 2**bits - 2 (odd level count)
    q = UniformQuantizer(bits=4, stats=stats)
    assert q.quantize(stats.mean + 100 * stats.std).max() == 14


def test_quantizer_scalar_stats_and_validation(setup):
    q = UniformQuantizer(bits=4, stats=QuantizerStats(mean=np.float64(1.0), std=np.float64(0.5)))
    x = np.linspace(-0.5, 2.5, 101)
    assert np.max(np.abs(q.dequantize(q.quantize(x)) - x)) <= 0.5 * 3 * 0.5 / 7 + 1e-6
    _, _, _, stats = setup
    for bits in (1, 9, 0, 2.5, True):
        with pytest.raises(ValueError, match="bits"):
            UniformQuantizer(bits=bits, stats=stats)
    q = UniformQuantizer(bits=4, stats=stats)
    with pytest.raises(ValueError, match="shape"):
        q.quantize(np.zeros((3, N_VALUES + 1)))
    with pytest.raises(ValueError, match="non-finite"):
        q.quantize(np.full(N_VALUES, np.nan))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        q.dequantize(np.full(N_VALUES, 16))
    with pytest.raises(ValueError, match="clip_sigma"):
        UniformQuantizer(bits=4, clip_sigma=0.0, stats=stats)
    with pytest.raises(ValueError, match="shape"):
        fit_stats(np.zeros(5))


def test_fit_stats_floor_zeros_and_storage():
    v = np.zeros((10, 4))
    v[:, 0] = 2.0  # constant -> std floored
    v[:, 1] = np.arange(10.0) + 1
    v[3, 2] = 5.0  # one sample -> global std
    st = fit_stats(v)  # column 3 all zeros (pruned) -> global stats
    assert st.mean.shape == st.std.shape == (4,)
    assert np.all(st.std > 0) and st.std[0] == pytest.approx(1e-6)
    assert st.mean[1] == pytest.approx(5.5) and st.mean[2] == pytest.approx(5.0)
    back = QuantizerStats.from_arrays(st.to_arrays("q."), "q.")
    assert np.array_equal(back.mean, st.mean) and np.array_equal(back.std, st.std)
    assert np.array_equal(
        QuantizerStats.from_dict(json.loads(json.dumps(st.to_dict()))).std, st.std
    )
    q = UniformQuantizer(bits=5, clip_sigma=2.5, stats=st)
    q2 = UniformQuantizer.from_arrays(q.to_arrays())
    assert q2.bits == 5 and q2.clip_sigma == 2.5 and np.array_equal(q2.stats.mean, st.mean)
    assert UniformQuantizer.from_dict(q.to_dict()).bits == 5


# --------------------------------------------------------------------------- entropy coder
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("per_position", [True, False])
def test_entropy_round_trip_and_rate(setup, bits, per_position):
    _, train, test, stats = setup
    q = UniformQuantizer(bits=bits, stats=stats)
    model = fit_categorical(q.quantize(train), q.n_symbols, per_position=per_position)
    assert model.n_symbols == 2**bits and model.per_position == per_position
    coded = ideal = 0.0
    for x in test:
        sym = q.quantize(x)
        data = encode_symbols(sym, model)
        out = decode_symbols(data, N_VALUES, model)
        assert out.dtype == np.int64 and np.array_equal(out, sym)
        est = estimate_bits(sym, model)
        # per item: within 2 % + a few bytes of the cross-entropy
        assert 8 * len(data) <= 1.02 * est + 8 * 8, (len(data), est)
        coded += 8 * len(data)
        ideal += est
    assert ideal <= coded <= 1.02 * ideal + 8 * 8 * len(test)


def test_entropy_escape_path():
    rng = np.random.default_rng(7)
    n_symbols, nv = 64, 50
    train = np.clip(np.rint(rng.normal(32, 3, (300, nv))), 20, 44).astype(int)
    for per_position in (True, False):
        model = fit_categorical(train, n_symbols, per_position=per_position)
        unseen = np.array([0, 1, 63, 62, 10, 50])
        assert np.all(model.probabilities[:, unseen] == 0)
        assert np.all(model.probabilities[:, model.escape] > 0)
        sym = np.clip(np.rint(rng.normal(32, 3, nv)), 20, 44).astype(int)
        sym[[0, 7, 8, 20, 49]] = [0, 63, 1, 62, 10]
        data = encode_symbols(sym, model)
        assert np.array_equal(decode_symbols(data, nv, model), sym)
        # every symbol escapes
        all_esc = np.resize(unseen, nv)
        d2 = encode_symbols(all_esc, model)
        assert np.array_equal(decode_symbols(d2, nv, model), all_esc)
        assert 8 * len(d2) <= estimate_bits(all_esc, model) * 1.02 + 64
    # escape costs -log2(eps) + log2(n_symbols) bits in the estimate
    model = fit_categorical(train, n_symbols, per_position=False, escape_mass=0.01)
    one = np.full(1, 0)
    assert estimate_bits(one, model) == pytest.approx(-np.log2(0.01) + 6)


def test_entropy_model_storage_and_validation(setup):
    _, train, _, stats = setup
    q = UniformQuantizer(bits=4, stats=stats)
    model = fit_categorical(q.quantize(train), 16)
    arrs = model.to_arrays("ent.")
    assert arrs["ent.probabilities"].dtype == np.float64
    assert arrs["ent.probabilities"].shape == (N_VALUES, 17)
    back = CategoricalModel.from_arrays(arrs, "ent.")
    assert np.array_equal(back.probabilities, model.probabilities)
    sym = q.quantize(train[0])
    assert encode_symbols(sym, back) == encode_symbols(sym, model)
    with pytest.raises(ValueError):
        encode_symbols(np.full(N_VALUES, 16), model)  # out of alphabet
    with pytest.raises(ValueError):
        encode_symbols(sym[:-1], model)  # wrong length for a per-position model
    with pytest.raises(ValueError, match="ESCAPE"):
        CategoricalModel(np.array([[0.5, 0.5, 0.0]]))
    with pytest.raises(ValueError):
        fit_categorical(np.array([[0, 1]]), 1)
    assert encode_symbols(np.zeros(0, int), fit_categorical(np.array([[0, 1]]), 2, False)) == b""


def test_entropy_decode_corrupted_payload(setup):
    rng, train, test, stats = setup
    q = UniformQuantizer(bits=6, stats=stats)
    model = fit_categorical(q.quantize(train), q.n_symbols)
    sym = q.quantize(test[0])
    data = encode_symbols(sym, model)
    wrong_model = fit_categorical(q.quantize(train)[:, ::-1], q.n_symbols)
    candidates = [b"", data[:-1], data[:3], data + b"\x01", rng.bytes(len(data)), rng.bytes(4096)]
    for i in range(0, 8 * len(data), 3):
        b = bytearray(data)
        b[i // 8] ^= 1 << (i % 8)
        candidates.append(bytes(b))
    n_err = 0
    for cand in candidates:
        for m in (model, wrong_model):
            try:
                out = decode_symbols(cand, N_VALUES, m)
            except EntropyDecodeError:
                n_err += 1
                continue
            assert out.shape == (N_VALUES,)
            assert out.min() >= 0 and out.max() < q.n_symbols
    assert n_err > 0
    with pytest.raises(EntropyDecodeError, match="multiple of 4"):
        decode_symbols(data[:-1], N_VALUES, model)
    with pytest.raises(EntropyDecodeError, match="empty"):
        decode_symbols(b"", N_VALUES, model)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), n_values=st.integers(0, 300))
def test_entropy_decode_random_bytes_never_crashes(data, n_values):
    model = CategoricalModel(np.r_[np.linspace(1, 5, 16), 0.0, 0.0, 0.01])
    try:
        out = decode_symbols(data, n_values, model)
    except EntropyDecodeError:
        return
    assert out.shape == (n_values,) and (out.size == 0 or out.max() < model.n_symbols)


# --------------------------------------------------------------------------- bitstream
def test_bitstream_round_trip():
    data, meta, payloads = _stream(3)
    assert data[:4] == MAGIC
    bs = read_bitstream(data, expected_checkpoint_hash=CK)
    assert isinstance(bs, Bitstream)
    assert bs.version == FORMAT_VERSION and bs.checkpoint_hash == CK
    assert bs.modality == "sphere" and bs.bits == 6 and bs.n_items == 3
    assert bs.payloads == payloads and bs.extra == {"codec": "range"}
    assert np.isnan(bs.items_meta[0]["fill_value"])
    assert bs.items_meta[1] == meta[1]
    assert bs.payload_bytes == sum(map(len, payloads))
    assert len(data) == 10 + struct.unpack_from("<I", data, 6)[0] + bs.payload_bytes + CHECKSUM_LEN
    # bytearray / memoryview input, numpy metadata, zero items, empty payloads
    assert read_bitstream(bytearray(data)).payloads == payloads
    d2 = write_bitstream(
        checkpoint_hash=CK.upper(),
        modality="voxel",
        bits=2,
        items_meta=[{"shape": np.array([64, 64, 64]), "scale": np.float32(0.5)}],
        payloads=[b""],
    )
    bs2 = read_bitstream(memoryview(d2))
    assert bs2.items_meta == [{"shape": [64, 64, 64], "scale": 0.5}] and bs2.payloads == [b""]
    bs3 = read_bitstream(
        write_bitstream(checkpoint_hash=CK, modality="x", bits=8, items_meta=[], payloads=[])
    )
    assert bs3.n_items == 0


def test_full_pipeline(setup):
    _, train, test, stats = setup
    q = UniformQuantizer(bits=5, stats=stats)
    model = fit_categorical(q.quantize(train), q.n_symbols)
    syms = [q.quantize(x) for x in test[:4]]
    data = write_bitstream(
        checkpoint_hash=CK,
        modality="sphere",
        bits=q.bits,
        items_meta=[{"i": i} for i in range(4)],
        payloads=[encode_symbols(s, model) for s in syms],
    )
    bs = read_bitstream(data, expected_checkpoint_hash=CK)
    for s, p in zip(syms, bs.payloads, strict=True):
        rec = q.dequantize(decode_symbols(p, N_VALUES, model))
        assert np.array_equal(rec, q.dequantize(s))
    assert bits_per_value(len(data), 4 * N_VALUES) == pytest.approx(8 * len(data) / 1024)


def test_bitstream_error_messages():
    data, _, _ = _stream()
    with pytest.raises(BitstreamError, match=r"not an \.mscn file \(bad magic\)"):
        read_bitstream(b"PK\x03\x04" + data[4:])
    with pytest.raises(BitstreamError, match="truncated: expected at least 16 bytes, got 0"):
        read_bitstream(b"")  # empty file: a write that never happened
    with pytest.raises(BitstreamError, match="bad magic"):
        read_bitstream(b"MX")
    with pytest.raises(
        BitstreamError, match=r"unsupported format version 3 \(this build reads 1 and 2\)"
    ):
        read_bitstream(_reseal(data[:4] + struct.pack("<H", 3) + data[6:-CHECKSUM_LEN]))
    with pytest.raises(BitstreamError, match=r"truncated: expected at least \d+ bytes, got 40"):
        read_bitstream(data[:40])  # cut inside the header JSON: only a lower bound is known
    with pytest.raises(
        BitstreamError, match=rf"truncated: expected {len(data)} bytes, got {len(data) - 1}"
    ):
        read_bitstream(data[:-1])  # cut in the payload/checksum: exact length from header
    with pytest.raises(BitstreamError, match="truncated: expected"):
        read_bitstream(data[:8])
    with pytest.raises(BitstreamError, match="truncated: expected"):
        read_bitstream(data[:2])
    bad = bytearray(data)
    bad[len(data) - CHECKSUM_LEN - 3] ^= 0x10  # payload byte
    with pytest.raises(BitstreamError, match="checksum mismatch: file is corrupted"):
        read_bitstream(bytes(bad))
    with pytest.raises(BitstreamError, match="checksum mismatch"):
        read_bitstream(data + b"junk")
    with pytest.raises(
        BitstreamError,
        match=rf"checkpoint mismatch: stream needs checkpoint {CK[:12]}, got {CK_B[:12]}",
    ):
        read_bitstream(data, expected_checkpoint_hash=CK_B)
    # checksum-valid but malformed headers
    with pytest.raises(BitstreamError, match="not zlib-compressed"):
        read_bitstream(_reseal(MAGIC + struct.pack("<HI", FORMAT_VERSION, 9) + b"{not zip}"))
    with pytest.raises(BitstreamError, match="malformed header JSON"):
        read_bitstream(_forge(b"{not json"))
    with pytest.raises(BitstreamError, match="malformed header JSON"):
        read_bitstream(_forge(b"\xff\xfe"))
    with pytest.raises(BitstreamError, match="malformed header JSON"):
        read_bitstream(_forge(b"[1, 2]"))
    with pytest.raises(BitstreamError, match="malformed header JSON: missing"):
        read_bitstream(_forge({"modality": "x"}))
    good = {
        "checkpoint_hash": CK,
        "modality": "x",
        "bits": 4,
        "n_items": 2,
        "items": [{}, {}],
        "payload_lengths": [3, 4],
        "extra": {},
    }
    assert read_bitstream(_forge(good, b"abcdefg")).payloads == [b"abc", b"defg"]
    with pytest.raises(BitstreamError, match="payload lengths inconsistent"):
        read_bitstream(_forge(good, b"abcdef"))
    with pytest.raises(BitstreamError, match="payload lengths inconsistent"):
        read_bitstream(_forge({**good, "payload_lengths": [3, -3, 7]}, b"abcdefg"))
    with pytest.raises(BitstreamError, match="payload lengths inconsistent"):
        read_bitstream(_forge({**good, "n_items": 3}, b"abcdefg"))
    with pytest.raises(BitstreamError, match="payload lengths inconsistent"):
        read_bitstream(_forge({**good, "payload_lengths": [10**30, 4]}, b"abcdefg"))
    with pytest.raises(BitstreamError, match="malformed header JSON"):
        read_bitstream(_forge({**good, "bits": 12}, b"abcdefg"))
    with pytest.raises(BitstreamError, match="malformed header JSON"):
        read_bitstream(_forge({**good, "checkpoint_hash": "abc"}, b"abcdefg"))
    # a huge declared header length allocates nothing and is reported as truncation
    huge = MAGIC + struct.pack("<HI", 1, 2**32 - 1) + b"{}" + b"\0" * 4
    with pytest.raises(
        BitstreamError, match=rf"truncated: expected at least {2**32 + 13} bytes, got 16"
    ):
        read_bitstream(huge)


def test_write_bitstream_validation():
    with pytest.raises(ValueError, match="checkpoint_hash"):
        write_bitstream(checkpoint_hash="xyz", modality="x", bits=4, items_meta=[], payloads=[])
    with pytest.raises(ValueError, match="differ in length"):
        write_bitstream(checkpoint_hash=CK, modality="x", bits=4, items_meta=[{}], payloads=[])
    with pytest.raises(ValueError, match="JSON"):
        write_bitstream(
            checkpoint_hash=CK, modality="x", bits=4, items_meta=[{"o": object()}], payloads=[b""]
        )
    with pytest.raises(ValueError, match="bits"):
        write_bitstream(checkpoint_hash=CK, modality="x", bits=9, items_meta=[], payloads=[])


_VALID, _, _ = _stream(2)


def _corrupt(draw_data: st.DataObject) -> bytes:
    kind = draw_data.draw(st.sampled_from(["truncate", "flip", "random", "append", "splice"]))
    d = _VALID
    if kind == "truncate":
        return d[: draw_data.draw(st.integers(0, len(d) - 1))]
    if kind == "flip":
        bits = draw_data.draw(
            st.lists(st.integers(0, 8 * len(d) - 1), min_size=1, max_size=4, unique=True)
        )
        b = bytearray(d)
        for i in bits:
            b[i // 8] ^= 1 << (i % 8)
        return bytes(b)
    if kind == "random":
        return draw_data.draw(st.binary(max_size=2 * len(d)))
    if kind == "append":
        return d + draw_data.draw(st.binary(min_size=1, max_size=64))
    i = draw_data.draw(st.integers(0, len(d) - 1))
    j = draw_data.draw(st.integers(i + 1, len(d)))
    return d[:i] + draw_data.draw(st.binary(min_size=1, max_size=16)) + d[j:]


@settings(max_examples=400, deadline=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bitstream_corruption_property(data):
    bad = _corrupt(data)
    if bad == _VALID:
        return
    with pytest.raises(BitstreamError):
        read_bitstream(bad)
    with pytest.raises(BitstreamError):
        read_bitstream(bad, expected_checkpoint_hash=CK)


@settings(max_examples=100, deadline=500)
@given(prefix=st.sampled_from([b"", MAGIC, MAGIC + b"\x01\x00"]), rest=st.binary(max_size=200))
def test_bitstream_random_headers_property(prefix, rest):
    with pytest.raises(BitstreamError):
        read_bitstream(prefix + rest)


# --------------------------------------------------------------------------- files / accounting
def test_save_bytes_atomic(tmp_path):
    data, _, _ = _stream()
    p = tmp_path / "out.mscn"
    assert save_bytes_atomic(data, p) == p
    assert p.read_bytes() == data
    with pytest.raises(FileExistsError):
        save_bytes_atomic(b"other", p)
    assert p.read_bytes() == data
    save_bytes_atomic(b"other", str(p), overwrite=True)
    assert p.read_bytes() == b"other"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.mscn"]  # no temp files left
    with pytest.raises(OSError):
        save_bytes_atomic(data, tmp_path / "missing-dir" / "x.mscn")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.mscn"]


def test_bits_per_value():
    assert bits_per_value(407, 65160) == pytest.approx(8 * 407 / 65160)
    assert bits_per_value(0, 10) == 0.0
    with pytest.raises(ValueError):
        bits_per_value(10, 0)


def test_the_codec_does_not_depend_on_the_batch_it_was_fitted_in(tiny_sphere_checkpoint):
    """``fit_codec``'s batch size bounds memory only: items adapt independently, so batches
    of 1 and of 16 give the same quantiser ranges and entropy models."""
    import torch
    from conftest import ERA5

    from mscn_core.checkpoint import load_checkpoint
    from mscn_core.pipeline import CODEC_BATCH, fit_codec
    from mscn_core.registry import get_modality

    ck = load_checkpoint(tiny_sphere_checkpoint)
    m = get_modality("sphere")
    m.load_state(ck.modality_state)
    assert m.codec_batch_size is None and CODEC_BATCH == 16  # pointwise: the core default
    assert get_modality("nerf").codec_batch_size == 2  # rays × samples per item: fewer
    fields = m.read(ERA5, var="t", sel=["isobaricInhPa=850"])[:6]
    signals = [m.to_signal(f) for f in fields]
    codecs = {}
    for batch in (1, 16):
        fit_codec(ck, m, signals, bit_depths=(4, 6), batch_size=batch)
        codecs[batch] = dict(ck.codec)
    assert codecs[1].keys() == codecs[16].keys()
    for k in codecs[1]:  # (bitwise equal here; float statistics may vary by the last ulp
        if k.startswith("quant."):  # with the BLAS's blocking on other machines)
            torch.testing.assert_close(codecs[1][k], codecs[16][k], rtol=1e-6, atol=1e-9)
        else:  # the entropy models: symbol counts, identical
            assert torch.equal(codecs[1][k], codecs[16][k]), k
    with pytest.raises(ValueError, match="codec batch size"):
        fit_codec(ck, m, signals, batch_size=-1)
