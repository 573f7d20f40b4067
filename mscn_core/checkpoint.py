"""Checkpoints: safetensors tensors + a JSON config in the file's metadata. Never unpickles.

Checkpoints get downloaded, so everything in one is hostile until checked, in this order and
before any tensor is allocated: the metadata against a declared schema (types, ranges, a
parameter-count limit computed from the architecture), the tensor digest's presence, then
every tensor's name, shape and dtype (read from the header) against what the architecture
implies. Only then are tensors read, their digest compared, and the network built.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import torch
from msgspec import Meta
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .atomic import save_bytes_atomic
from .gates import HardConcreteGates
from .methods import MethodConfig, Representation, build_representation
from .siren import SirenConfig, layer_shapes

FORMAT_VERSION = 1
_META_KEY = "mscn"
_DIGEST_KEY = "mscn_tensors_sha256"  # safetensors checks the header only, not the data

# -- limits (refuse absurd files before allocating; generous for real networks) ------------
MAX_DIM = 64  # in_dim / out_dim: coordinates and channels
MAX_WIDTH = 4096  # units per hidden layer (8× the paper's 512)
MAX_DEPTH = 64  # layers (4× the paper's 15)
# SIREN weights + biases from the architecture alone. The paper's 15×512 net has 3.4 M,
# the shipped 6×128 ones 83 k; 2**26 (67 M, 256 MiB of float32) still allows 15×2048.
MAX_PARAMS = 2**26
# Every tensor of the representation (rates, gates, masks, Functa's projection too):
# mscn-grad keeps three per weight, hence 4 × MAX_PARAMS (1 GiB of float32).
MAX_STATE_ELEMENTS = 4 * MAX_PARAMS
MAX_TENSOR_BYTES = 2**31  # all tensors of the file together, codec tables included
MAX_CODEC_TENSORS = 1024
_FINITE = 1e6  # bound for floats that have no natural one: rejects inf and NaN too

# safetensors dtype names -> torch; codec tables must be numpy-convertible, so no bf16/fp8.
_MODEL_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                 "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_CODEC_DTYPES = {k: v for k, v in _MODEL_DTYPES.items() if k != "BF16"}
_DTYPE_NAMES = {v: k for k, v in _MODEL_DTYPES.items()}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PRINTABLE = r"^[^\x00-\x1f\x7f\x85\u2028\u2029]+\Z"  # no control characters, one line


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not ours, wrong version, broken or mismatched."""


# -- the declared schema of the JSON config (metadata key "mscn") ---------------------------
# Unknown keys: refused in ``siren`` and ``method_config`` (a field this build does not know
# would change what the weights mean), ignored at the top level (additive metadata: anything
# that changes how tensors are read bumps FORMAT_VERSION), kept as-is in the free-form
# ``modality_state`` (the plugin validates it) and ``info`` objects.
PosFloat = Annotated[float, Meta(gt=0, le=_FINITE)]
NonNegFloat = Annotated[float, Meta(ge=0, le=_FINITE)]
Rate = Annotated[float, Meta(gt=0, lt=1)]


class SirenSchema(msgspec.Struct, forbid_unknown_fields=True):
    """``SirenConfig`` as stored: every field required (the architecture must be explicit)."""

    in_dim: Annotated[int, Meta(ge=1, le=MAX_DIM)]
    out_dim: Annotated[int, Meta(ge=1, le=MAX_DIM)]
    width: Annotated[int, Meta(ge=1, le=MAX_WIDTH)]
    depth: Annotated[int, Meta(ge=2, le=MAX_DEPTH)]
    w0: PosFloat
    w0_first: PosFloat
    output_offset: Annotated[float, Meta(ge=-_FINITE, le=_FINITE)]


_MC = MethodConfig()  # defaults for fields older checkpoints lack (e.g. grad_impl)


class MethodSchema(msgspec.Struct, forbid_unknown_fields=True):
    """``MethodConfig`` as stored: ``method`` required, later additions default."""

    method: Annotated[str, Meta(min_length=1, max_length=64)]
    inner_steps: Annotated[int, Meta(ge=0, le=10_000)] = _MC.inner_steps
    lr_init_low: Rate = _MC.lr_init_low
    lr_init_high: Rate = _MC.lr_init_high
    budget: Annotated[int, Meta(ge=1, le=MAX_STATE_ELEMENTS)] | None = _MC.budget
    l0_weight: NonNegFloat = _MC.l0_weight
    gate_keep_prob: Rate = _MC.gate_keep_prob
    adapt_gates: bool = _MC.adapt_gates
    learn_init: bool = _MC.learn_init
    latent_dim: Annotated[int, Meta(ge=1, le=65_536)] = _MC.latent_dim
    maml_lr: NonNegFloat = _MC.maml_lr
    prune_fraction: Annotated[float, Meta(ge=0, le=1)] = _MC.prune_fraction
    prune_every: Annotated[int, Meta(ge=1, le=10**9)] = _MC.prune_every
    prune_rounds: Annotated[int, Meta(ge=0, le=10**6)] = _MC.prune_rounds
    coin_steps: Annotated[int, Meta(ge=0, le=10**7)] = _MC.coin_steps
    coin_lr: NonNegFloat = _MC.coin_lr
    grad_impl: Annotated[str, Meta(min_length=1, max_length=32)] = _MC.grad_impl


class CodecInfoSchema(msgspec.Struct):
    """``info["codec"]``: the one part of ``info`` the codec reads (quantiser clipping and
    the bit depths that have entropy models)."""

    clip_sigma: PosFloat
    bit_depths: list[Annotated[int, Meta(ge=2, le=8)]]
    fitted_on_items: Annotated[int, Meta(ge=0)] = 0
    refine_steps: Annotated[int, Meta(ge=0, le=10**6)] = 0  # encode's default refinement
    fit_loss: dict[str, Annotated[float, Meta(ge=0)]] = {}  # the training items' spread


class ConfigSchema(msgspec.Struct):
    """The whole config; unknown top-level keys are ignored (see above)."""

    format_version: Annotated[int, Meta(ge=FORMAT_VERSION, le=FORMAT_VERSION)]
    # a registry name, printed in messages: printable, one line, bounded
    modality: Annotated[str, Meta(min_length=1, max_length=128, pattern=_PRINTABLE)]
    method: Annotated[str, Meta(min_length=1, max_length=64)]
    siren: SirenSchema
    method_config: MethodSchema
    modality_state: dict[str, Any] = {}
    info: dict[str, Any] = {}


@dataclass
class ValidConfig:
    """A config that passed the schema and the cross-field checks, as the core's types."""

    raw: dict
    siren: SirenConfig
    method: MethodConfig
    modality: str
    modality_state: dict
    info: dict


@dataclass
class Checkpoint:
    rep: Representation
    modality: str
    modality_state: dict
    codec: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # training summary, provenance
    sha256: str = ""
    path: Path | None = None

    @property
    def config(self) -> dict:
        return _config(self)


def _config(ck: Checkpoint) -> dict:
    cfg = {
        "format_version": FORMAT_VERSION,
        "modality": ck.modality,
        "method": ck.rep.cfg.method,
        "siren": asdict(ck.rep.siren_cfg),
        "method_config": asdict(ck.rep.cfg),
        "modality_state": ck.modality_state,
        "info": ck.info,
    }
    return cfg


def _one_line(text: str, limit: int = 400) -> str:
    """Messages quote hostile strings: escape line breaks/control characters, bound length."""
    text = re.sub(r"[\x00-\x1f\x7f\x85\u2028\u2029]", lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= limit else text[:limit] + "…"


def _fail(path: object, detail: str) -> CheckpointError:
    return CheckpointError(f"{path}: {_one_line(detail)}")


def siren_parameter_count(siren: SirenConfig) -> int:
    """Weights + biases of the SIREN, from the architecture alone (nothing is built)."""
    return sum(o * i + o for o, i in layer_shapes(siren))


def _value_at(raw: object, where: str) -> object:
    """The offending value for a msgspec error path like ``$.siren.width`` (or a sentinel)."""
    node = raw
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", where[1:]):
        key, idx = part
        try:
            node = node[key] if key else node[int(idx)]  # type: ignore[index]
        except (KeyError, IndexError, TypeError, ValueError):
            return _MISSING
    return node


_MISSING = object()


def validate_config(raw: object, where: object) -> ValidConfig:
    """Schema, ranges and size limits of a parsed config; raises a one-line CheckpointError.

    ``where`` names the file in messages. Builds nothing: the parameter count is arithmetic.
    """
    if isinstance(raw, dict):
        version = raw.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            shown = _one_line(repr(version), 60)
            raise _fail(where, f"checkpoint format version {shown} is not supported "
                               f"(this build reads {FORMAT_VERSION})")
    try:
        cfg = msgspec.convert(raw, ConfigSchema)
    except msgspec.ValidationError as err:
        msg = str(err)
        m = re.search(r" - at `(\$[^`]*)`$", msg)
        value = _value_at(raw, m.group(1)) if m else _MISSING
        got = "" if value is _MISSING or isinstance(value, dict | list) else \
            f" (got {_one_line(repr(value), 60)})"
        raise _fail(where, f"invalid checkpoint metadata: {msg}{got}") from None
    except RecursionError:
        raise _fail(where, "invalid checkpoint metadata: nested too deeply") from None
    if "codec" in cfg.info:
        try:
            msgspec.convert(cfg.info["codec"], CodecInfoSchema)
        except msgspec.ValidationError as err:
            msg = str(err)
            msg = msg.replace("at `$", "at `$.info.codec") if " - at `$" in msg else \
                f"{msg} - at `$.info.codec`"
            raise _fail(where, f"invalid checkpoint metadata: {msg}") from None
    siren = SirenConfig(**msgspec.structs.asdict(cfg.siren))
    mcfg = MethodConfig(**msgspec.structs.asdict(cfg.method_config))
    n = siren_parameter_count(siren)
    if n > MAX_PARAMS:
        raise _fail(where, f"invalid checkpoint metadata: the network's {n} parameters "
                           f"({siren.depth} layers × {siren.width}) exceed the limit {MAX_PARAMS}")
    try:
        siren.validate()
        mcfg.validate()
    except ValueError as err:
        raise _fail(where, f"checkpoint config is invalid: {err}") from None
    if cfg.method != cfg.method_config.method:
        raise _fail(where, f"checkpoint config is invalid: method {cfg.method!r} differs from "
                           f"method_config.method {cfg.method_config.method!r}")
    return ValidConfig(raw, siren, mcfg, cfg.modality, cfg.modality_state, cfg.info)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of all tensors (detects altered data)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_bytes(ck: Checkpoint) -> bytes:
    """The file a save writes; sets ``ck.sha256`` (what bitstreams refer to) without I/O.

    The config goes through the reader's schema first: never write what load would refuse.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ck.rep.state_dict().items()}
    tensors.update({f"codec.{k}": v.detach().cpu().contiguous() for k, v in ck.codec.items()})
    text = json.dumps(_config(ck))
    validate_config(json.loads(text), "checkpoint being written")
    data = st_save(tensors, metadata={_META_KEY: text, _DIGEST_KEY: tensors_digest(tensors)})
    ck.sha256 = hashlib.sha256(data).hexdigest()
    return data


def save_checkpoint(ck: Checkpoint, path: str | os.PathLike, overwrite: bool = True) -> str:
    """Write the checkpoint; returns its sha256 (what bitstreams refer to)."""
    data = checkpoint_bytes(ck)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_bytes_atomic(data, path, overwrite=overwrite)
    ck.path = Path(path)
    return ck.sha256


def _read_header(path: Path) -> tuple[ValidConfig, str]:
    """Validated config and tensor digest, from the safetensors header alone."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _fail(path, f"is not a readable mscn checkpoint (truncated, corrupted or not "
                          f"safetensors): {err}") from err
    if _META_KEY not in meta:
        raise _fail(path, f"is a safetensors file but not an mscn checkpoint "
                          f"(no '{_META_KEY}' metadata)")
    try:
        raw = json.loads(meta[_META_KEY])
    except (ValueError, RecursionError) as err:  # JSONDecodeError, int digit limit, nesting
        raise _fail(path, f"checkpoint config is not valid JSON: {err}") from None
    valid = validate_config(raw, path)
    digest = meta.get(_DIGEST_KEY)
    if digest is None:
        raise _fail(path, f"no tensor digest ({_DIGEST_KEY}); the file was altered or not "
                          "written by mscn")
    if not _HEX64.fullmatch(digest):
        raise _fail(path, f"the tensor digest ({_DIGEST_KEY}) is not 64 lowercase hex "
                          f"characters: {_one_line(repr(digest), 80)}")
    return valid, digest


def read_config(path: str | os.PathLike) -> dict:
    """The JSON config alone (cheap: reads the safetensors header only), validated like a load
    so that callers which only peek get the same clean error."""
    return _read_header(Path(path))[0].raw


def expected_tensors(siren: SirenConfig, mcfg: MethodConfig) -> dict[str, tuple[tuple, Any]]:
    """``model.*`` name -> (shape, dtype) the architecture implies, built on the meta device
    (no memory); refuses representations over MAX_STATE_ELEMENTS and gate budgets larger
    than the number of gates."""
    with torch.device("meta"):
        rep = build_representation(siren, mcfg)
    for mod in rep.modules():
        if isinstance(mod, HardConcreteGates) and mod.budget is not None \
                and mod.budget > mod.log_alpha.numel():
            raise ValueError(f"method_config.budget {mod.budget} exceeds the "
                             f"{mod.log_alpha.numel()} gates of this architecture")
    out = {f"model.{k}": (tuple(v.shape), v.dtype) for k, v in rep.state_dict().items()}
    total = sum(math.prod(s) for s, _ in out.values())
    if total > MAX_STATE_ELEMENTS:
        raise ValueError(f"the representation's {total} values exceed the limit "
                         f"{MAX_STATE_ELEMENTS}")
    return out


def _check_tensor_header(f, path: Path, valid: ValidConfig) -> None:
    """Names, shapes, dtypes and total size from the header vs. the config's architecture."""
    try:
        expected = expected_tensors(valid.siren, valid.method)
    except (ValueError, TypeError, RuntimeError) as err:
        raise _fail(path, f"checkpoint config is invalid: {err}") from None
    keys = list(f.keys())
    if len(keys) > len(expected) + MAX_CODEC_TENSORS:
        raise _fail(path, f"{len(keys)} tensors: more than the architecture's {len(expected)} "
                          f"plus {MAX_CODEC_TENSORS} codec tables")
    problems, total = [], 0
    for k in keys:
        sl = f.get_slice(k)
        shape, dtype_name = tuple(sl.get_shape()), sl.get_dtype()
        if k in expected:
            want_shape, want_dtype = expected[k]
            if shape != want_shape or _MODEL_DTYPES.get(dtype_name) != want_dtype:
                problems.append(f"{k} is {dtype_name}{list(shape)}, the config implies "
                                f"{_DTYPE_NAMES.get(want_dtype, want_dtype)}{list(want_shape)}")
                continue
        elif not k.startswith("codec.") or k == "codec.":
            problems.append(f"unexpected tensor {k!r}")
            continue
        elif dtype_name not in _CODEC_DTYPES:
            problems.append(f"codec tensor {k!r} has unsupported dtype {dtype_name}")
            continue
        total += math.prod(shape) * _MODEL_DTYPES[dtype_name].itemsize
    missing = sorted(set(expected) - set(keys))
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}" + (" …" if len(missing) > 4 else ""))
    if problems:
        raise _fail(path, f"tensors do not match the architecture in its config "
                          f"({valid.siren}): {'; '.join(problems[:4])}")
    if total > MAX_TENSOR_BYTES:
        raise _fail(path, f"tensors total {total} bytes, over the limit {MAX_TENSOR_BYTES}")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Validate header, tensor layout and digest, then build the network and load it."""
    path = Path(path)
    valid, digest = _read_header(path)
    model, codec, tensors = {}, {}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            _check_tensor_header(f, path, valid)
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
                (model if k.startswith("model.") else codec)[k.split(".", 1)[1]] = tensors[k]
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as err:
        raise _fail(path, f"cannot read checkpoint tensors: {err}") from err
    if tensors_digest(tensors) != digest:
        raise _fail(path, "checkpoint tensors are corrupted or altered (checksum mismatch)")
    try:
        rep = build_representation(valid.siren, valid.method)
        rep.load_state_dict(model, strict=True)
    except (ValueError, RuntimeError) as err:
        raise _fail(path, f"tensors do not match the architecture in its config "
                          f"({valid.siren}): {err}") from err
    rep.eval()
    return Checkpoint(rep, valid.modality, valid.modality_state, codec, valid.info,
                      file_sha256(path), path)
