"""Checkpoints: safetensors tensors + a JSON config in the file's metadata. Never unpickles."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .atomic import save_bytes_atomic
from .methods import MethodConfig, Representation, build_representation
from .siren import SirenConfig

FORMAT_VERSION = 1
_META_KEY = "mscn"
_DIGEST_KEY = "mscn_tensors_sha256"  # safetensors checks the header only, not the data


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not ours, wrong version, broken or mismatched."""


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
    """The file a save writes; sets ``ck.sha256`` (what bitstreams refer to) without I/O."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ck.rep.state_dict().items()}
    tensors.update({f"codec.{k}": v.detach().cpu().contiguous() for k, v in ck.codec.items()})
    data = st_save(tensors, metadata={_META_KEY: json.dumps(_config(ck)),
                                      _DIGEST_KEY: tensors_digest(tensors)})
    ck.sha256 = hashlib.sha256(data).hexdigest()
    return data


def save_checkpoint(ck: Checkpoint, path: str | os.PathLike, overwrite: bool = True) -> str:
    """Write the checkpoint; returns its sha256 (what bitstreams refer to)."""
    data = checkpoint_bytes(ck)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_bytes_atomic(data, path, overwrite=overwrite)
    ck.path = Path(path)
    return ck.sha256


def read_config(path: str | os.PathLike) -> dict:
    """The JSON config alone (cheap: reads the safetensors header only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable mscn checkpoint (truncated, "
                              f"corrupted or not safetensors): {err}") from err
    if _META_KEY not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not an mscn checkpoint "
                              f"(no '{_META_KEY}' metadata)")
    try:
        cfg = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: checkpoint config is not valid JSON: {err}") from err
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported "
                              f"(this build reads {FORMAT_VERSION})")
    return cfg


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    cfg = read_config(path)
    try:
        siren = SirenConfig(**cfg["siren"])
        mcfg = MethodConfig(**cfg["method_config"])
        rep = build_representation(siren, mcfg)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: checkpoint config is invalid: {err}") from err
    model, codec, tensors = {}, {}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get(_DIGEST_KEY)
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
                (model if k.startswith("model.") else codec)[k.split(".", 1)[1]] = tensors[k]
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read checkpoint tensors: {err}") from err
    if expected is not None and tensors_digest(tensors) != expected:
        raise CheckpointError(f"{path}: checkpoint tensors are corrupted or altered "
                              "(checksum mismatch)")
    try:
        rep.load_state_dict(model, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: tensors do not match the architecture in its config "
                              f"({siren}): {err}") from err
    rep.eval()
    return Checkpoint(rep, cfg["modality"], cfg.get("modality_state", {}), codec,
                      cfg.get("info", {}), file_sha256(path), path)
