"""Forged ``.mscn`` streams (valid CRC, hostile content) end in one line of BitstreamError,
with bounded memory, before anything is decoded; legitimate streams decode as before.

Real components throughout: the shipped ERA5 checkpoint encodes vendored ERA5 and COADS
fields (COADS SST has a NaN land mask), ``tests/forge.py`` rewrites the header the way an
attacker would and re-seals the CRC, and the hostile decodes run in a child process whose
address space is capped at what it uses after warming up plus 1 GiB.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from forge import del_field, forge, item, parse, seal, set_field, zlib_bomb

from mscn_core import limits
from mscn_core.bitstream import (
    HEADER_FLOOR,
    HEADER_MAX,
    BitstreamError,
    header_bound,
    read_bitstream,
)
from mscn_core.checkpoint import load_checkpoint
from mscn_core.entropy import decode_symbols
from mscn_core.pipeline import decode_stream, encode_items, merge_common, predictor, quantizer
from mscn_core.registry import get_modality
from mscn_datasets import meshes, vendored_path
from mscn_plugins.sdf import SdfModality, SdfOptions
from mscn_plugins.sphere import SphereOptions, unpack_mask
from mscn_plugins.voxel import VoxelModality, VoxelOptions

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "plugins" / "checkpoints" / "era5_t850.safetensors"
ERA5 = vendored_path("era5_t_z_3deg_2017-01-01_float32.nc")
COADS = vendored_path("coads_sst_airt_2deg_jan-mar.nc")
BUNNY = meshes.vendored_mesh("bunny00")
HEADROOM = 1 << 30  # address space the capped child may add to its warmed-up size


# -- real streams ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ck():
    return load_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def sphere(ck):
    m = get_modality("sphere")
    m.load_state(ck.modality_state)
    return m


@pytest.fixture(scope="module")
def era5(ck, sphere) -> bytes:
    """Two held-out ERA5 t850 fields (members 8, 9), no NaN mask."""
    fields = [f for f in sphere.read(ERA5, var="t", sel=["isobaricInhPa=850"])
              if int(f["number"]) >= 8][:2]
    return encode_items(ck, sphere, fields, bits=6, with_metrics=False)[0]


@pytest.fixture(scope="module")
def coads(ck, sphere) -> bytes:
    """One COADS SST field: land cells NaN, so the item carries a ``nan_mask``."""
    field = sphere.read(COADS, var="SST")[0]
    return encode_items(ck, sphere, [field], bits=6, with_metrics=False)[0]


def _reference_decode(data: bytes, ck, m) -> list:
    """The decode loop as it was before the checks (read, decode symbols, reconstruct)."""
    stream = read_bitstream(data, expected_checkpoint_hash=ck.sha256)
    q, model = quantizer(ck, stream.bits)
    common = stream.extra.get("common", {})
    out = []
    for payload, rest in zip(stream.payloads, stream.items_meta, strict=True):
        symbols = decode_symbols(payload, ck.rep.code_size(), model)
        code = torch.from_numpy(q.dequantize(symbols[None])).float()[0]
        out.append(m.reconstruct(merge_common(common, rest), predictor(ck, m, code)))
    return out


def test_legitimate_streams_decode_bit_identically(ck, sphere, era5, coads):
    for data, n in ((era5, 2), (coads, 1)):
        decoded = decode_stream(data, ck)
        assert len(decoded.artifacts) == n
        for got, ref in zip(decoded.artifacts, _reference_decode(data, ck, sphere), strict=True):
            assert np.array_equal(got.values, ref.values, equal_nan=True)
            assert got.dims == ref.dims and got.attrs == ref.attrs
    # the masked field keeps exactly its land cells as NaN
    truth = sphere.read(COADS, var="SST")[0]
    (sst,) = decode_stream(coads, ck).artifacts
    np.testing.assert_array_equal(np.isnan(sst.values), np.isnan(truth.values))


def test_check_meta_accepts_real_sphere_items_and_counts_their_output(sphere, era5, coads):
    for data, cells in ((era5, 61 * 120), (coads, 90 * 180)):
        header, _ = parse(data)
        meta = item(header)
        assert sphere.check_meta(meta) == cells
        assert sphere.check_meta(meta, SphereOptions(resolution=1.0)) == 181 * 360
    mask = item(parse(coads)[0])["nan_mask"]
    assert unpack_mask(mask, (90, 180)).sum() == item(parse(coads)[0])["n_masked"]


def test_headers_use_the_preset_dictionary_and_plain_zlib_still_reads(era5):
    """Writers deflate the header with the modality's dictionary (its header_words, then
    the core's words: zlib FDICT + its Adler-32); a header without a dictionary (as
    written before, or by forge.seal) reads the same; a header naming a dictionary this
    build lacks, or bomb-sized with the dictionary, is one line."""
    from mscn_core.bitstream import HEADER_DICT, header_dictionary
    from mscn_plugins.sphere import SphereModality

    n = int.from_bytes(era5[6:10], "little")
    raw = era5[10:10 + n]
    sphere = header_dictionary(SphereModality.header_words)
    assert raw[1] & 0x20 and int.from_bytes(raw[2:6], "big") == zlib.adler32(sphere)
    assert zlib.adler32(sphere) == 0xE37281B9  # frozen: every sphere stream names it
    header, payloads = parse(era5)
    plain = read_bitstream(seal(header, payloads))
    assert plain.items_meta == read_bitstream(era5).items_meta
    smaller = len(zlib.compress(json.dumps(header, sort_keys=True, separators=(",", ":"))
                                .encode(), 9))
    assert n < smaller - 50  # the dictionary's point
    other = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, b'{"x":1}')
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    packed = other.compress(text) + other.flush()
    body = b"MSCN" + era5[4:6] + len(packed).to_bytes(4, "little") + packed + b"".join(payloads)
    forged = body + zlib.crc32(body).to_bytes(4, "little")
    with pytest.raises(BitstreamError, match="^malformed header: not zlib-compressed JSON "
                                             r"\(header is not zlib data \(it needs preset "
                                             "dictionary"):
        read_bitstream(forged)
    bomb = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, HEADER_DICT)
    packed = bomb.compress(b" " * (64 << 20)) + bomb.flush()
    body = b"MSCN" + era5[4:6] + len(packed).to_bytes(4, "little") + packed + b"".join(payloads)
    with pytest.raises(BitstreamError, match="^malformed header: it inflates beyond"):
        read_bitstream(body + zlib.crc32(body).to_bytes(4, "little"))


def test_non_finite_metadata_values_still_read(ck, era5):
    """Python's json writes NaN/Infinity tokens; msgspec's parser would refuse them, so
    the header is parsed by json and only validated by msgspec."""
    def mutate(h, p):
        h["items"][0]["note"] = float("nan")
        h["extra"]["inf"] = float("inf")

    data = forge(era5, mutate)
    assert b'"note":NaN' in zlib.decompress(data[10:10 + int.from_bytes(data[6:10], "little")])
    stream = read_bitstream(data)
    assert np.isnan(stream.items_meta[0]["note"]) and stream.extra["inf"] == float("inf")
    assert len(decode_stream(data, ck).artifacts) == 2


# -- the hostile cases, decoded in a memory-capped child ----------------------------------
def _bomb_mask(size: int):
    def mutate(h, p):
        set_field(h, "nan_mask", base64.b64encode(zlib_bomb(size)).decode())
    return mutate


def _axis(n: int, shape: list[int] | None = None):
    def mutate(h, p):
        t = item(h)["template"]
        t["coords"]["longitude"]["data"]["n"] = n
        set_field(h, "template", t)
        if shape is not None:
            set_field(h, "shape", shape)
    return mutate


def _many_items(n: int):
    def mutate(h, p) -> bytes:  # built as text: 12M Python dicts would be the attack itself
        head = json.dumps({**h, "n_items": n, "items": [], "payload_lengths": []},
                          sort_keys=True, separators=(",", ":")).encode()
        return (head.replace(b'"items":[]', b'"items":[' + b"{}," * (n - 1) + b"{}]")
                .replace(b'"payload_lengths":[]',
                         b'"payload_lengths":[' + b"4," * (n - 1) + b"4]"))
    return mutate


def _set(key, value):
    return lambda h, p: set_field(h, key, value)


def _template(key, value):
    def mutate(h, p):
        t = item(h)["template"]
        if value is None:
            del t[key]
        else:
            t[key] = value
        set_field(h, "template", t)
    return mutate


def _empty_payloads(k: int):
    def mutate(h, p):
        h["items"] += [{} for _ in range(k)]
        p += [b""] * k
        h["payload_lengths"] += [0] * k
        h["n_items"] = len(p)
    return mutate


def _bits_as_string(h, p):
    h["bits"] = "6"


# name: (stream, mutation, the one line it must end in)
CASES = {
    # as reported: 3 GB of mask in a few KB; the header bound stops it first
    "zlib_bomb_mask_3GB": ("coads", _bomb_mask(3 << 30),
                           r"^malformed header: it inflates beyond [\d,]+ bytes \(the bound"),
    # a bomb small enough to pass the header bound: the mask's exact size stops it
    "zlib_bomb_mask_200MB": ("coads", _bomb_mask(200 << 20),
                             r"^item 0: nan_mask inflates beyond 2,025 bytes$"),
    "axis_of_2e8": ("era5", _axis(200_000_000),
                    r"^item 0: template coordinate 'longitude' n must be in \[0, [\d,]+\], "
                    r"got 200,000,000$"),
    "axis_of_2e8_with_matching_shape": ("era5", _axis(200_000_000, [61, 200_000_000]),
                                        r"^item 0: shape must be in \[1, [\d,]+\], "
                                        r"got 200,000,000$"),
    "axis_inconsistent_with_shape": ("era5", _axis(1_000_000),
                                     r"^item 0: template grid 61x1000000 does not match "
                                     r"shape 61x120$"),
    "12_million_items": ("era5", _many_items(12_000_000),
                         r"^malformed header: it inflates beyond [\d,]+ bytes"),
    "items_without_payload": ("era5", _empty_payloads(1000),
                              r"^item 2: a payload of 0 bytes cannot hold \d+ coded values$"),
    "mask_not_zlib": ("coads", _set("nan_mask", base64.b64encode(b"hello world").decode()),
                      r"^item 0: nan_mask is not zlib data"),
    "mask_not_base64": ("coads", _set("nan_mask", "%%%"), r"^item 0: nan_mask is not base64"),
    "scale_as_strings": ("era5", _set("scale", ["236.1", "305.8"]),
                         r"^item 0: scale must be a number, got str '236.1'$"),
    "template_missing": ("era5", lambda h, p: del_field(h, "template"),
                         r"^item 0: template missing$"),
    "dtype_foo": ("era5", _template("dtype", "foo"),
                  r"^item 0: template dtype 'foo' is not a numpy dtype$"),
    "coords_not_an_object": ("era5", _template("coords", [1, 2]),
                             r"^item 0: template coords must be an object, got list of 2$"),
    "bits_as_string": ("era5", _bits_as_string,
                       r"^malformed header JSON: Expected `int`, got `str` - at `\$\.bits`$"),
}

CHILD = r"""
import json, resource, sys, traceback
from pathlib import Path
import torch, xarray  # noqa: F401 - imported before the cap, as a CLI process has them
torch.set_num_threads(1)
from mscn_core.bitstream import BitstreamError
from mscn_core.checkpoint import load_checkpoint
from mscn_core.pipeline import decode_stream

spec = json.loads(sys.argv[1])
ck = load_checkpoint(spec["checkpoint"])
decode_stream(Path(spec["warm"]).read_bytes(), ck)  # lazy imports and first allocations
vm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmSize:"))
cap = vm * 1024 + spec["headroom"]
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
out = {}
for name, path in spec["cases"].items():
    try:
        decode_stream(Path(path).read_bytes(), ck)
        out[name] = {"type": None, "message": ""}
    except BitstreamError as err:
        out[name] = {"type": "BitstreamError", "message": str(err)}
    except BaseException as err:  # MemoryError, a traceback the user would see
        out[name] = {"type": type(err).__name__, "message": traceback.format_exc()[-2000:]}
print("RESULTS " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hostile(era5, coads, tmp_path_factory) -> dict:
    """Every case of CASES decoded in one address-space-capped child process."""
    folder = tmp_path_factory.mktemp("forged")
    seeds = {"era5": era5, "coads": coads}
    paths = {}
    for name, (seed, mutate, _) in CASES.items():
        paths[name] = str(folder / f"{name}.mscn")
        Path(paths[name]).write_bytes(forge(seeds[seed], mutate))
    paths["legit_control"] = str(folder / "legit.mscn")  # decodes under the same cap
    Path(paths["legit_control"]).write_bytes(coads)
    spec = {"checkpoint": str(CHECKPOINT), "warm": paths["legit_control"], "cases": paths,
            "headroom": HEADROOM}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(limits.ENV_MAX_OUTPUT_VALUES, None)  # the default limit is under test
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True,
                       text=True, timeout=600, env=env, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert r.returncode == 0 and lines, f"child died (rc {r.returncode}): {r.stderr[-3000:]}"
    results = json.loads(lines[0][len("RESULTS "):])
    return {name: (path, results[name]) for name, path in paths.items()}


def test_the_capped_child_still_decodes_a_legitimate_stream(hostile):
    assert hostile["legit_control"][1] == {"type": None, "message": ""}


@pytest.mark.parametrize("name", list(CASES))
def test_forged_stream_ends_in_one_line_of_bitstream_error(name, hostile):
    import re

    path, result = hostile[name]
    assert result["type"] == "BitstreamError", result["message"]
    assert "\n" not in result["message"]
    assert re.search(CASES[name][2], result["message"]), result["message"]
    assert Path(path).stat().st_size < 100_000  # small files: the attack is in the claims


# -- bounds in the container and in the core ----------------------------------------------
def test_header_bound_is_relative_and_absolute():
    assert header_bound(100) == HEADER_FLOOR
    assert header_bound(100_000) == 64 * 100_000
    assert header_bound(10**9) == HEADER_MAX


def test_header_schema_errors_name_the_field(era5):
    def with_header(**fields):
        return forge(era5, lambda h, p: h.update(fields))

    cases = {
        "modality": ("", r"at `\$\.modality`"),
        "checkpoint_hash": ("A" * 64, r"at `\$\.checkpoint_hash`"),
        "items": ([{}, 3], r"Expected `object`, got `int` - at `\$\.items\[1\]`"),
        "extra": ([], r"Expected `object`, got `array` - at `\$\.extra`"),
        "bits": (True, r"Expected `int`, got `bool` - at `\$\.bits`"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(BitstreamError, match=message):
            read_bitstream(with_header(**{key: value}))
    with pytest.raises(BitstreamError, match=r"payload lengths inconsistent: .* at "
                                             r"`\$\.payload_lengths\[0\]`"):
        read_bitstream(with_header(payload_lengths=["8", 8]))
    with pytest.raises(BitstreamError, match=r"malformed header JSON: extra.common"):
        decode_stream(with_header(extra={"common": [1]}), load_checkpoint(CHECKPOINT))


def test_header_inflating_past_the_absolute_bound_is_refused():
    # hex of random bytes compresses ~2:1, so only the absolute bound (not the ratio) bites
    text = b'{"pad":"' + os.urandom(HEADER_MAX // 2 + 10).hex().encode() + b'"}'
    data = seal(text, [], level=1)
    assert header_bound(len(data) - 14) == HEADER_MAX
    with pytest.raises(BitstreamError, match="inflates beyond 16,777,216 bytes"):
        read_bitstream(data)


def test_output_limit_counts_the_requested_grid_and_says_how_to_raise_it(
        ck, era5, monkeypatch):
    with pytest.raises(BitstreamError, match=r"18001x36000 output grid would decode to "
                                             r"648,036,000 values, more than the limit of "
                                             r"67,108,864; set MSCN_MAX_OUTPUT_VALUES"):
        decode_stream(era5, ck, SphereOptions(resolution=0.01))
    monkeypatch.setenv(limits.ENV_MAX_OUTPUT_VALUES, "10000")
    with pytest.raises(BitstreamError, match=r"^the stream \(up to item 1\) would decode to "
                                             r"14,640 values, more than the limit of 10,000"):
        decode_stream(era5, ck)
    monkeypatch.setenv(limits.ENV_MAX_OUTPUT_VALUES, "20000")
    assert len(decode_stream(era5, ck).artifacts) == 2
    monkeypatch.setenv(limits.ENV_MAX_OUTPUT_VALUES, "lots")
    with pytest.raises(ValueError, match="MSCN_MAX_OUTPUT_VALUES='lots' is not an integer"):
        limits.max_output_values()


def test_limits_helpers():
    packed = zlib.compress(b"abc" * 100)
    assert limits.inflate(packed, 300, "blob") == b"abc" * 100
    with pytest.raises(ValueError, match="^blob inflates beyond 299 bytes$"):
        limits.inflate(packed, 299, "blob")
    with pytest.raises(ValueError, match="^blob inflates beyond 1,048,576 bytes$"):
        limits.inflate(zlib_bomb(1 << 30), 1 << 20, "blob")
    with pytest.raises(ValueError, match="^blob is not zlib data"):
        limits.inflate(b"plain text", 100, "blob")
    with pytest.raises(ValueError, match=r"^blob is not zlib data \(truncated\)$"):
        limits.inflate(packed[:-6], 300, "blob")
    with pytest.raises(ValueError, match="trailing bytes"):
        limits.inflate(packed + b"x", 300, "blob")
    assert limits.check_count(5, "n", 0, 10) == 5
    assert limits.check_count(np.int64(5), "n") == 5
    for bad, message in ((True, "an integer, got True"), ("5", "an integer, got str '5'"),
                         (5.0, "an integer, got 5.0"), (11, r"in \[0, 10\], got 11"),
                         (-1, r"in \[0, 10\], got -1")):
        with pytest.raises(ValueError, match=f"^n must be {message}$"):
            limits.check_count(bad, "n", 0, 10)
    assert limits.one_line(ValueError("a\n  b")) == "a b"


# -- the shape plugins ----------------------------------------------------------------------
def _json(meta: dict) -> dict:
    return json.loads(json.dumps(meta))


def test_sdf_and_voxel_check_meta_accept_real_items_and_refuse_forged_ones():
    sdf = SdfModality()
    opts = SdfOptions(resolution=32, metric_grid=8, near_samples=500)
    (shape,) = sdf.read(BUNNY, opts)
    s = sdf.to_signal(shape, opts)
    meta = _json(dict(s.meta, template=sdf.item_template(shape, opts),
                      n_values=sdf.n_values(s)))
    assert sdf.check_meta(meta, opts) == 32**3
    vox = VoxelModality()
    vopts = VoxelOptions(resolution=16)
    (grid,) = vox.read(BUNNY, vopts)
    vs = vox.to_signal(grid, vopts)
    vmeta = _json(dict(vs.meta, template=vox.item_template(grid, vopts),
                       n_values=vox.n_values(vs)))
    assert vox.check_meta(vmeta, vopts) == 16**3
    assert vox.check_meta(vmeta, VoxelOptions(output_resolution=40)) == 40**3

    forged = {
        "frame": ({"center": [0, 0], "scale": 1.0}, "frame center must be 3 finite numbers"),
        "name": (7, "name must be a string, got int"),
    }
    for key, (value, message) in forged.items():
        for m, base, o in ((sdf, meta, opts), (vox, vmeta, vopts)):
            with pytest.raises(ValueError, match=message):
                m.check_meta({**base, key: value}, o)
    assert isinstance(meta["frame"], list) and len(meta["frame"]) == 4  # [cx, cy, cz, scale]
    old = {**meta, "frame": {"center": meta["frame"][:3], "scale": meta["frame"][3]}}
    assert sdf.check_meta(old, opts) == 32**3  # the earlier layout still decodes
    for frame in ({"center": [0, 0, float("nan")], "scale": 1}, {"center": [0, 0, 0]},
                  {"center": [0, 0, 0], "scale": -2.0}, {"center": [0, 0, 0], "scale": "1"},
                  [0, 0, 0], [0, 0, 0, 0], [0, 0, "0", 1], [0, 0, float("inf"), 1],
                  [0, 0, 0, 1, 1], [[0, 0, 0], 1]):
        with pytest.raises(ValueError, match="^frame "):
            sdf.check_meta({**meta, "frame": frame}, opts)
    for res, message in ((5000, r"resolution must be in \[2, 1,024\], got 5,000"),
                         (True, "resolution must be an integer, got True")):
        with pytest.raises(ValueError, match=message):
            vox.check_meta({**vmeta, "resolution": res}, vopts)
    with pytest.raises(ValueError, match="would decode to 1,073,741,824 values"):
        vox.check_meta(vmeta, VoxelOptions(output_resolution=1024))
    with pytest.raises(ValueError, match="resolution must be >= 8, got 4"):
        sdf.check_meta(meta, SdfOptions(resolution=4))
    # direct library use is protected too: reconstruct checks before it allocates
    with pytest.raises(ValueError, match="frame scale"):
        sdf.reconstruct({**meta, "frame": {"center": [0, 0, 0], "scale": 0}},
                        lambda x: torch.zeros(len(x), 1), opts)


@pytest.mark.parametrize("name, opts, forged, message", [
    ("sdf", SdfOptions(resolution=32, metric_grid=16, near_samples=2000),
     ("frame", {"center": [0, 0, 0], "scale": float("nan")}),
     r"^item 0: frame scale must be a positive finite number, got nan$"),
    ("voxel", VoxelOptions(resolution=16), ("frame", [0, 0, 0, -1.0]),
     r"^item 0: frame scale must be a positive finite number, got -1.0$"),
    ("voxel", VoxelOptions(resolution=16), ("resolution", 5000),
     r"^item 0: resolution must be in \[2, 1,024\], got 5,000$"),
])
def test_shape_streams_decode_and_forged_ones_are_refused(name, opts, forged, message):
    """The shipped shape checkpoints on the held-out bunny: a real stream decodes, the same
    stream with one forged claim ends in one line."""
    shape_ck = load_checkpoint(ROOT / "plugins" / "checkpoints" / f"shapes_{name}.safetensors")
    m = get_modality(name)
    m.load_state(shape_ck.modality_state)
    data, _ = encode_items(shape_ck, m, m.read(BUNNY, opts), bits=6, with_metrics=False,
                           options=opts)
    (decoded,) = decode_stream(data, shape_ck, opts).artifacts
    assert decoded.name == "bunny00" and len(decoded.mesh.vertices) > 0
    with pytest.raises(BitstreamError, match=message):
        decode_stream(forge(data, _set(*forged)), shape_ck, opts)


# -- the contract checker runs check_meta (C17) ---------------------------------------------
def test_the_contract_checker_calls_check_meta_on_an_encoded_items_meta(tmp_path):
    from test_contract_checker import LineModality, line_items

    from mscn_core.testing import CLAUSES, check_modality

    seen = []

    class Refuses(LineModality):
        def check_meta(self, meta, options=None):
            seen.append(meta)
            raise ValueError("refuses its own items")

    class Uncounted(LineModality):
        def check_meta(self, meta, options=None):
            return "49"

    assert CLAUSES["check_meta"] == "C17"
    for cls, message in ((Refuses, "raised ValueError: refuses its own items"),
                         (Uncounted, "an int >= 0")):
        found = [v for v in check_modality(cls(), line_items(), tmp_dir=tmp_path / cls.__name__)
                 if v.severity == "error"]
        assert [(v.clause, v.name) for v in found] == [("C17", "check_meta")], found
        assert message in found[0].message
    # what decode would pass: the item's meta after the header's JSON, with n_values
    assert seen[0]["n_values"] == 49 and "template" in seen[0]
    assert check_modality(LineModality(), line_items(), tmp_dir=tmp_path / "ok") == []
