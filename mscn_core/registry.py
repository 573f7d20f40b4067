"""Modality discovery over the ``mscn.modalities`` entry-point group.

Like xarray's backends: names are listed without importing anything; a plugin is
imported when first used, and one that fails to import or breaks the contract is
reported by name with its error and skipped, never taking the others down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from .modality import contract_problems

GROUP = "mscn.modalities"


class ModalityError(LookupError):
    """A modality that is unknown or broken."""


@dataclass
class ModalityInfo:
    name: str
    entry_point: str
    distribution: str
    version: str
    status: str = "not loaded"  # ok | error
    error: str = ""
    description: str = ""
    in_dim: int | None = None
    out_dim: int | None = None


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _load(ep: EntryPoint) -> tuple[object | None, ModalityInfo]:
    dist = getattr(ep, "dist", None)
    info = ModalityInfo(ep.name, ep.value, dist.metadata["Name"] if dist else "?",
                        dist.version if dist else "?")
    try:
        obj = ep.load()
        instance = obj() if isinstance(obj, type) else obj
    except Exception as err:  # noqa: BLE001 - any failure of a plugin is reported, not raised
        info.status, info.error = "error", f"{type(err).__name__}: {err}"
        return None, info
    problems = contract_problems(instance)
    if problems:
        info.status, info.error = "error", "breaks the contract: " + "; ".join(problems)
        return None, info
    info.status = "ok"
    info.description = str(instance.description)
    info.in_dim, info.out_dim = int(instance.in_dim), int(instance.out_dim)
    return instance, info


def modality_names() -> list[str]:
    """Registered names, without importing any plugin."""
    return sorted(_entry_points())


def list_modalities() -> list[ModalityInfo]:
    """Load every plugin (isolated) and report its status."""
    return [_load(ep)[1] for _, ep in sorted(_entry_points().items())]


def get_modality(name: str):
    """A fresh instance of the named modality, or a ModalityError saying why not."""
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none installed"
        raise ModalityError(f"unknown modality {name!r} (installed: {known})")
    instance, info = _load(eps[name])
    if instance is None:
        raise ModalityError(f"modality {name!r} from {info.distribution} is broken: {info.error}")
    return instance


def guess_modality(path: str | os.PathLike) -> str:
    """The first working modality whose ``guess_can_open`` accepts the path."""
    for name, ep in sorted(_entry_points().items()):
        instance, _ = _load(ep)
        if instance is None:
            continue
        try:
            if instance.guess_can_open(path):
                return name
        except Exception:  # noqa: BLE001, S112 - a broken guesser is skipped like xarray's
            continue
    raise ModalityError(f"no installed modality can open {path}; pass --modality")
