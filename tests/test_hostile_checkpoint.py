"""Downloaded checkpoints are hostile input: every forgery ends in one clean CheckpointError.

The metadata is checked against a declared schema (types, ranges, a parameter limit computed
before anything is built), the tensor digest is mandatory, and the tensors' names, shapes and
dtypes are compared with the architecture from the header before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as st_save

from mscn_core.checkpoint import (
    MAX_PARAMS,
    MAX_STATE_ELEMENTS,
    MAX_WIDTH,
    Checkpoint,
    CheckpointError,
    MethodSchema,
    SirenSchema,
    expected_tensors,
    load_checkpoint,
    read_config,
    save_checkpoint,
    siren_parameter_count,
    tensors_digest,
)
from mscn_core.methods import METHODS, MethodConfig, build_representation
from mscn_core.siren import SirenConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "plugins" / "checkpoints").glob("*.safetensors"))
DIGEST = "mscn_tensors_sha256"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A tiny real checkpoint (3 layers × 8, budget 4) with a codec table."""
    torch.manual_seed(0)
    rep = build_representation(SirenConfig(in_dim=2, out_dim=1, width=8, depth=3),
                               MethodConfig(budget=4))
    ck = Checkpoint(rep, "toy", {"scale": [0.0, 1.0]}, {"quant.mean": torch.zeros(4)},
                    {"note": "tiny"})
    path = tmp_path_factory.mktemp("hostile") / "good.safetensors"
    save_checkpoint(ck, path)
    return path


def _parts(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def forge(src: Path, dst: Path, cfg: Callable | None = None, tensors: Callable | None = None,
          meta: Callable | None = None, redigest: bool = True, text: Callable | None = None
          ) -> Path:
    """Re-save ``src`` with edits: ``cfg`` edits the parsed config in place, ``text`` maps it
    to the raw metadata string; the digest is recomputed for edited tensors unless
    ``redigest`` is False (then the original digest is kept)."""
    md, ts = _parts(src)
    if cfg is not None or text is not None:
        c = json.loads(md["mscn"])
        if cfg is not None:
            cfg(c)
        md["mscn"] = text(c) if text is not None else json.dumps(c)
    if tensors is not None:
        tensors(ts)
        if redigest:
            md[DIGEST] = tensors_digest(ts)
    if meta is not None:
        meta(md)
    dst.write_bytes(st_save(ts, metadata=md))
    return dst


def refused(path: Path, match: str, peek: bool = True) -> str:
    """Both the loader and the header-only peek give the same one-line error."""
    with pytest.raises(CheckpointError, match=match or None) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and len(msg.splitlines()) == 1, msg
    if peek:
        with pytest.raises(CheckpointError) as err2:
            read_config(path)
        assert str(err2.value) == msg
    return msg


# -- what must keep loading --------------------------------------------------------------------
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_checkpoints_still_load(path):
    assert {"era5_t850", "shapes_sdf", "shapes_voxel", "nerf_scenes"} <= {
        p.stem for p in SHIPPED}
    ck = load_checkpoint(path)
    cfg = read_config(path)
    assert cfg["modality"] == ck.modality
    assert ck.rep.siren_cfg.width == cfg["siren"]["width"] and ck.rep.code_size() > 0


def test_limits_admit_the_papers_network_for_every_method():
    paper = SirenConfig(in_dim=3, out_dim=3, width=512, depth=15)
    assert siren_parameter_count(paper) == sum(
        p.numel() for p in build_representation(paper, MethodConfig()).net.parameters())
    assert siren_parameter_count(paper) < MAX_PARAMS // 16
    for method in METHODS:
        shapes = expected_tensors(paper, MethodConfig(method=method))
        assert sum(math.prod(s) for s, _ in shapes.values()) <= MAX_STATE_ELEMENTS


def test_schema_declares_every_config_field_with_the_same_defaults():
    assert set(SirenSchema.__struct_fields__) == {f.name for f in dataclasses.fields(SirenConfig)}
    assert set(MethodSchema.__struct_fields__) == {
        f.name for f in dataclasses.fields(MethodConfig)}
    schema_defaults = msgspec.structs.asdict(MethodSchema(method="mscn"))
    assert schema_defaults == dataclasses.asdict(MethodConfig(method="mscn"))


def test_older_config_without_later_fields_loads(good, tmp_path):
    ok = forge(good, tmp_path / "old.safetensors",
               cfg=lambda c: c["method_config"].pop("grad_impl"))
    assert load_checkpoint(ok).rep.cfg.grad_impl == "bmm"


def test_unknown_keys_ignored_at_top_kept_in_free_sections(good, tmp_path):
    def edit(c):
        c["future_section"] = {"x": 1}
        c["info"]["new"] = [1, 2]
        c["modality_state"]["extra"] = "kept"

    ck = load_checkpoint(forge(good, tmp_path / "extra.safetensors", cfg=edit))
    assert ck.info["new"] == [1, 2] and ck.modality_state["extra"] == "kept"


# -- metadata of the wrong type or out of range ------------------------------------------------
@pytest.mark.parametrize("text", ["[]", "[1, 2]", '"checkpoint"', "3", "null", "true"])
def test_metadata_that_is_not_an_object(good, tmp_path, text):
    bad = forge(good, tmp_path / "top.safetensors", text=lambda c: text)
    refused(bad, r"invalid checkpoint metadata: Expected `object`, got `\w+`$")


@pytest.mark.parametrize("section,value,expect", [
    ("siren", [1, 2], "Expected `object`, got `array` - at `$.siren`"),
    ("method_config", "mscn", "Expected `object`, got `str` - at `$.method_config`"),
    ("modality_state", [1], "Expected `object`, got `array` - at `$.modality_state`"),
    ("info", 3, "Expected `object`, got `int` - at `$.info`"),
    ("modality", 5, "Expected `str`, got `int` - at `$.modality`"),
    ("modality", "", "Expected `str` of length >= 1 - at `$.modality`"),
    ("modality", "a\nb", "matching regex"),
    ("method", None, "Expected `str`, got `null` - at `$.method`"),
    ("format_version", "1", "format version '1' is not supported"),
    ("format_version", True, "format version True is not supported"),
])
def test_config_section_of_the_wrong_type(good, tmp_path, section, value, expect):
    bad = forge(good, tmp_path / "sec.safetensors", cfg=lambda c: c.update({section: value}))
    msg = refused(bad, "")
    assert expect in msg, msg


def test_missing_section_is_refused(good, tmp_path):
    bad = forge(good, tmp_path / "nosiren.safetensors", cfg=lambda c: c.pop("siren"))
    assert "Object missing required field `siren`" in refused(bad, "invalid checkpoint metadata")


@pytest.mark.parametrize("section,key,value,expect", [
    ("method_config", "inner_steps", "3",
     "Expected `int`, got `str` - at `$.method_config.inner_steps` (got '3')"),
    ("siren", "width", 200000, "Expected `int` <= 4096 - at `$.siren.width` (got 200000)"),
    ("siren", "width", 10**40, "<= 4096 - at `$.siren.width`"),
    ("siren", "width", 8.0, "Expected `int`, got `float` - at `$.siren.width`"),
    ("siren", "width", True, "Expected `int`, got `bool` - at `$.siren.width`"),
    ("siren", "depth", 0, "Expected `int` >= 2 - at `$.siren.depth` (got 0)"),
    ("siren", "depth", 1, "Expected `int` >= 2 - at `$.siren.depth`"),
    ("siren", "in_dim", -1, "Expected `int` >= 1 - at `$.siren.in_dim`"),
    ("siren", "w0", float("nan"), "Expected `float` > 0.0 - at `$.siren.w0` (got nan)"),
    ("siren", "w0", float("inf"), "at `$.siren.w0` (got inf)"),
    ("siren", "w0_first", -30.0, "Expected `float` > 0.0 - at `$.siren.w0_first`"),
    ("siren", "output_offset", float("-inf"), "at `$.siren.output_offset`"),
    ("siren", "colour", 1, "Object contains unknown field `colour` - at `$.siren`"),
    ("method_config", "budget", -5, "Expected `int` >= 1 - at `$.method_config.budget`"),
    ("method_config", "budget", "all", "at `$.method_config.budget`"),
    ("method_config", "lr_init_low", 0.0, "at `$.method_config.lr_init_low`"),
    ("method_config", "gate_keep_prob", 1.0, "at `$.method_config.gate_keep_prob`"),
    ("method_config", "prune_every", 0, "at `$.method_config.prune_every`"),
    ("method_config", "adapt_gates", "yes", "Expected `bool`, got `str`"),
    ("method_config", "method", "nonsense", "checkpoint config is invalid: unknown method"),
    ("method_config", "grad_impl", "loop", "unknown grad_impl 'loop'"),
    ("method_config", "a\nb", 1, r"unknown field `a\nb`"),
])
def test_field_of_the_wrong_type_or_range(good, tmp_path, section, key, value, expect):
    bad = forge(good, tmp_path / "field.safetensors",
                cfg=lambda c: c[section].update({key: value}))
    msg = refused(bad, "")
    assert expect in msg, msg


def test_missing_architecture_field_is_refused(good, tmp_path):
    bad = forge(good, tmp_path / "nowidth.safetensors", cfg=lambda c: c["siren"].pop("width"))
    assert "missing required field `width` - at `$.siren`" in refused(bad, "")


def test_parameter_count_limit_from_the_architecture(good, tmp_path):
    bad = forge(good, tmp_path / "big.safetensors",
                cfg=lambda c: c["siren"].update(width=MAX_WIDTH, depth=64))
    refused(bad, rf"parameters \(64 layers × 4096\) exceed the limit {MAX_PARAMS}$")


def test_budget_larger_than_the_gates_is_refused(good, tmp_path):
    bad = forge(good, tmp_path / "budget.safetensors",
                cfg=lambda c: c["method_config"].update(budget=17))  # 2 × 8 gates
    refused(bad, "budget 17 exceeds the 16 gates", peek=False)


def test_method_and_method_config_must_agree(good, tmp_path):
    bad = forge(good, tmp_path / "disagree.safetensors", cfg=lambda c: c.update(method="coin"))
    refused(bad, "method 'coin' differs from method_config.method 'mscn'")


def test_huge_json_integer_is_a_clean_error(good, tmp_path):
    bad = forge(good, tmp_path / "digits.safetensors",
                text=lambda c: json.dumps(c).replace('"width": 8', '"width": ' + "9" * 5000))
    refused(bad, "not valid JSON")


def test_deeply_nested_json_is_a_clean_error(good, tmp_path):
    bad = forge(good, tmp_path / "deep.safetensors", text=lambda c: "[" * 100_000 + "]" * 100_000)
    refused(bad, "not valid JSON|nested too deeply")


CHILD = textwrap.dedent("""
    import json, resource, sys
    from mscn_core.checkpoint import CheckpointError, load_checkpoint
    load_checkpoint(sys.argv[1])  # warm every import and code path first
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
              if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    out = []
    for path in sys.argv[2:]:
        try:
            load_checkpoint(path)
            out.append(["loaded", ""])
        except BaseException as err:  # noqa: BLE001 - the test judges the type
            out.append([type(err).__name__, str(err)])
    print(json.dumps(out))
""")


def test_huge_architecture_fails_fast_without_allocating(good, tmp_path):
    """width 200000 used to try a 160 GB allocation; now the schema refuses it first."""
    forged = [
        forge(good, tmp_path / "w.safetensors", cfg=lambda c: c["siren"].update(width=200000)),
        forge(good, tmp_path / "p.safetensors",
              cfg=lambda c: c["siren"].update(width=MAX_WIDTH, depth=64)),
        forge(good, tmp_path / "f.safetensors", cfg=lambda c: (
            c.update(method="functa"),
            c["method_config"].update(method="functa", latent_dim=65536),
            c["siren"].update(width=4096, depth=4))),
    ]
    r = subprocess.run([sys.executable, "-c", CHILD, str(good), *map(str, forged)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [t for t, _ in results] == ["CheckpointError"] * 3, results
    assert "<= 4096 - at `$.siren.width` (got 200000)" in results[0][1]
    assert "exceed the limit" in results[1][1] and "exceed the limit" in results[2][1]
    assert all("\n" not in m for _, m in results)


# -- the tensor digest is mandatory --------------------------------------------------------------
def test_altered_tensor_with_digest_deleted(good, tmp_path):
    def alter(ts):
        ts["model.net.params.0"] = ts["model.net.params.0"] + 1

    bad = forge(good, tmp_path / "nodigest.safetensors", tensors=alter, redigest=False,
                meta=lambda m: m.pop(DIGEST))
    refused(bad, r"no tensor digest \(mscn_tensors_sha256\); the file was altered or not "
                 "written by mscn")


def test_digest_deleted_alone_is_refused(good, tmp_path):
    bad = forge(good, tmp_path / "nodigest2.safetensors", meta=lambda m: m.pop(DIGEST))
    refused(bad, "no tensor digest")


@pytest.mark.parametrize("digest", ["", "abc", "Z" * 64, "A" * 64, "0" * 63, "0" * 65])
def test_digest_that_is_not_64_hex_characters(good, tmp_path, digest):
    bad = forge(good, tmp_path / "hex.safetensors", meta=lambda m: m.update({DIGEST: digest}))
    refused(bad, "is not 64 lowercase hex characters")


def test_wrong_digest_is_refused(good, tmp_path):
    bad = forge(good, tmp_path / "wrong.safetensors", meta=lambda m: m.update({DIGEST: "0" * 64}))
    refused(bad, r"corrupted or altered \(checksum mismatch\)", peek=False)


def test_altered_tensor_with_stale_digest_is_refused(good, tmp_path):
    def alter(ts):
        ts["codec.quant.mean"] = ts["codec.quant.mean"] + 1

    bad = forge(good, tmp_path / "stale.safetensors", tensors=alter, redigest=False)
    refused(bad, "checksum mismatch", peek=False)


# -- tensors vs. the architecture, from the header -----------------------------------------------
@pytest.mark.parametrize("edit,expect", [
    (lambda ts: ts.update({"model.net.params.0": torch.zeros(8, 3)}),
     "model.net.params.0 is F32[8, 3], the config implies F32[8, 2]"),
    (lambda ts: ts.update({"model.net.params.1": torch.zeros(8, dtype=torch.float64)}),
     "model.net.params.1 is F64[8], the config implies F32[8]"),
    (lambda ts: ts.update({"model.extra": torch.zeros(2)}), "unexpected tensor 'model.extra'"),
    (lambda ts: ts.update({"other.x": torch.zeros(2)}), "unexpected tensor 'other.x'"),
    (lambda ts: ts.update({"codec.": torch.zeros(2)}), "unexpected tensor 'codec.'"),
    (lambda ts: ts.pop("model.gates.log_alpha"), "missing model.gates.log_alpha"),
    (lambda ts: ts.update({"codec.t": torch.zeros(2, dtype=torch.bfloat16)}),
     "codec tensor 'codec.t' has unsupported dtype BF16"),
])
def test_tensors_that_do_not_match_the_config(good, tmp_path, edit, expect):
    bad = forge(good, tmp_path / "shape.safetensors", tensors=edit)
    msg = refused(bad, "do not match the architecture|unsupported dtype", peek=False)
    assert expect in msg, msg


def test_config_width_that_does_not_match_the_tensors(good, tmp_path):
    bad = forge(good, tmp_path / "w16.safetensors", cfg=lambda c: c["siren"].update(width=16))
    msg = refused(bad, "do not match the architecture", peek=False)
    assert "model.net.params.0 is F32[8, 2], the config implies F32[16, 2]" in msg


def test_header_is_checked_before_any_tensor_is_read(good, tmp_path, monkeypatch):
    bad = forge(good, tmp_path / "hdr.safetensors", tensors=lambda ts: ts.pop("model.shift_init"))
    import safetensors

    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, k):
            raise AssertionError("a tensor was read before the header was checked")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr("mscn_core.checkpoint.safe_open", Spy)
    refused(bad, "missing model.shift_init", peek=False)


# -- not a checkpoint at all -------------------------------------------------------------------
def test_pickle_renamed_to_safetensors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps({"net.weight": [1.0] * 100}))
    refused(bad, "not a readable mscn checkpoint")
    torch_pickle = tmp_path / "torch.safetensors"
    torch.save({"w": torch.zeros(3)}, torch_pickle)
    refused(torch_pickle, "not a readable mscn checkpoint")


def test_save_refuses_what_load_would_refuse(tmp_path):
    rep = build_representation(SirenConfig(in_dim=2, width=8, depth=3), MethodConfig(budget=4))
    with pytest.raises(CheckpointError, match="checkpoint being written: invalid checkpoint "
                                              "metadata: .* at `\\$.modality`"):
        save_checkpoint(Checkpoint(rep, "", {}), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# -- property: structural mutations never escape as another exception ---------------------------
_LEAVES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 4097, 200000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
_JSON = st.recursive(_LEAVES, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)),
    max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_config_loads_or_fails_cleanly(good, tmp_path, data):
    md, ts = _parts(good)
    cfg = json.loads(md["mscn"])
    paths = [p for p in _paths(cfg) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    parent = cfg
    for k in path[:-1]:
        parent = parent[k]
    op = data.draw(st.sampled_from(["replace", "delete", "huge", "negative"]), label="op")
    if op == "delete":
        del parent[path[-1]]
    elif op == "huge":
        parent[path[-1]] = data.draw(st.sampled_from([10**6, 2**40, 10**100, 1e308]))
    elif op == "negative":
        parent[path[-1]] = data.draw(st.sampled_from([-1, -2**40, -1e-9, -0.0]))
    else:
        parent[path[-1]] = data.draw(_JSON, label="value")
    md["mscn"] = json.dumps(cfg)
    forged = tmp_path / "mutant.safetensors"
    forged.write_bytes(st_save(ts, metadata=md))
    try:
        load_checkpoint(forged)
        event("loaded")
    except CheckpointError as err:
        event("refused")
        assert "\n" not in str(err) and len(str(err).splitlines()) == 1, str(err)


# -- info: free-form provenance, except the part the codec reads (found by the fuzzer) -------

ERA5_CKPT = ROOT / "plugins" / "checkpoints" / "era5_t850.safetensors"


@pytest.mark.parametrize("codec, expect", [
    ("x", r"Expected `object`, got `str` - at `\$\.info\.codec`"),
    ({"clip_sigma": "3", "bit_depths": [6]}, r"at `\$\.info\.codec\.clip_sigma`"),
    ({"clip_sigma": 3.0, "bit_depths": [6, 99]}, r"at `\$\.info\.codec\.bit_depths\[1\]`"),
    ({"bit_depths": [6]}, r"missing required field `clip_sigma`"),
    ({"clip_sigma": 3.0, "bit_depths": [6], "refine_steps": -3},
     r"at `\$\.info\.codec\.refine_steps`"),
    ({"clip_sigma": 3.0, "bit_depths": [6], "refine_steps": 10**9},
     r"at `\$\.info\.codec\.refine_steps`"),
])
def test_codec_info_is_validated_with_the_checkpoint(tmp_path, codec, expect):
    bad = forge(ERA5_CKPT, tmp_path / "codec.safetensors",
                cfg=lambda c: c["info"].__setitem__("codec", codec))
    refused(bad, expect)


def test_inspect_shows_forged_training_info_as_found(tmp_path, capsys):
    from mscn_core.cli import main

    def strip(c):
        del c["info"]["train"]["best_val_loss"]
        c["info"]["provenance"] = [1, {"x": None}]

    odd = forge(ERA5_CKPT, tmp_path / "odd.safetensors", cfg=strip)
    assert main(["inspect", str(odd)]) == 0
    assert "best validation loss None" in capsys.readouterr().out


def test_missing_codec_tables_are_one_line_at_encode(tmp_path):
    from mscn_core.pipeline import quantizer

    def drop(ts):
        for k in [k for k in ts if k.startswith("codec.bits6.")]:
            del ts[k]

    ck = load_checkpoint(forge(ERA5_CKPT, tmp_path / "nobits6.safetensors", tensors=drop))
    with pytest.raises(ValueError, match="codec tables for 6 bits are missing or malformed"):
        quantizer(ck, 6)
    quantizer(ck, 4)  # the other depths still work
