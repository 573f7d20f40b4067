"""Modality discovery over the ``mscn.modalities`` entry-point group.

Like xarray's backends: names are listed without importing anything; a plugin is
imported once, when first used, and cached (``refresh()`` forgets, e.g. after a pip
install). A plugin that fails to import (``SystemExit`` included), gives a non-modality
or targets another contract version is reported by name with its reason and skipped,
never taking the others down. Two plugins claiming one name are both listed with a
warning; the built-in wins unless the user picks the other as ``DIST:NAME``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from .modality import contract_problems, default_options, has_view, with_defaults

GROUP = "mscn.modalities"
BUILTIN_DISTRIBUTION = "mscn"


class ModalityError(LookupError):
    """A modality that is unknown, ambiguous or broken."""


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
    contract_version: int | None = None
    options: list[str] | None = None  # option names the CLI exposes
    viewer: bool = False
    note: str = ""  # e.g. a name conflict

    @property
    def qualified(self) -> str:
        return f"{self.distribution}:{self.name}"


@dataclass(frozen=True)
class _Spec:
    name: str
    entry_point: EntryPoint
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION


@functools.cache
def _specs() -> tuple[_Spec, ...]:
    """Every registered entry point, duplicates kept (cached until ``refresh``)."""
    specs = []
    seen = set()
    for ep in entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        spec = _Spec(ep.name, ep, dist.metadata["Name"] if dist else "?",
                     dist.version if dist else "?")
        key = (spec.name, spec.distribution, ep.value)
        if key not in seen:  # the same distribution seen twice on sys.path
            seen.add(key)
            specs.append(spec)
    specs.sort(key=lambda s: (s.name, not s.builtin, s.distribution))
    for name, group in _by_name(specs).items():
        if len(group) > 1:
            warnings.warn(f"modality {name!r} is registered by several distributions: "
                          f"{', '.join(s.distribution for s in group)}; "
                          + _conflict_rule(group), stacklevel=2)
    return tuple(specs)


def _by_name(specs) -> dict[str, list[_Spec]]:
    out: dict[str, list[_Spec]] = {}
    for s in specs:
        out.setdefault(s.name, []).append(s)
    return out


def _conflict_rule(group: list[_Spec]) -> str:
    if any(s.builtin for s in group):
        return ("the built-in is used unless you pick another with --modality "
                f"DIST:{group[0].name}")
    return f"pick one with --modality DIST:{group[0].name}"


def refresh() -> None:
    """Forget discovered entry points and loaded plugins (after installing a plugin)."""
    _specs.cache_clear()
    _load.cache_clear()


@functools.cache
def _load(spec: _Spec) -> tuple[object | None, ModalityInfo]:
    ep = spec.entry_point
    info = ModalityInfo(spec.name, ep.value, spec.distribution, spec.version)
    try:
        obj = ep.load()
        instance = obj() if isinstance(obj, type) else obj
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a plugin's failure is reported
        info.status, info.error = "error", f"{type(err).__name__}: {err}"
        return None, info
    if (isinstance(instance, str | int | float | bytes | list | dict | tuple) or instance is None
            or inspect.isroutine(instance) or inspect.ismodule(instance)):
        info.status = "error"
        info.error = (f"entry point gives a {type(instance).__name__}, not a modality class "
                      "or instance")
        return None, info
    problems = contract_problems(instance)
    if problems:
        info.status, info.error = "error", "breaks the contract: " + "; ".join(problems)
        return None, info
    instance = with_defaults(instance)
    try:
        opts = default_options(instance)
    except Exception as err:  # noqa: BLE001 - e.g. a field without a default
        info.status = "error"
        info.error = (f"options {getattr(instance.options, '__name__', instance.options)} "
                      f"cannot be built from its defaults (every field needs one): "
                      f"{type(err).__name__}: {err}")
        return None, info
    info.status = "ok"
    info.description = str(instance.description)
    info.in_dim, info.out_dim = int(instance.in_dim), int(instance.out_dim)
    info.contract_version = int(instance.contract_version)
    info.options = sorted(vars(opts)) if opts is not None else []
    info.viewer = has_view(instance)
    return instance, info


def modality_names() -> list[str]:
    """Registered names, without importing any plugin."""
    return sorted({s.name for s in _specs()})


def list_modalities() -> list[ModalityInfo]:
    """Load every plugin (isolated) and report its status; conflicts are noted on both."""
    rows = []
    groups = _by_name(_specs())
    for spec in _specs():
        info = _load(spec)[1]
        group = groups[spec.name]
        if len(group) > 1:
            info = dataclasses.replace(info)  # the cached row stays as it was
            others = ", ".join(s.distribution for s in group if s is not spec)
            chosen = _default_choice(group)
            info.note = (f"name also registered by {others}; "
                         + ("used by default" if chosen is spec else
                            f"select with --modality {spec.distribution}:{spec.name}"))
        rows.append(info)
    return rows


def _default_choice(group: list[_Spec]) -> _Spec | None:
    if len(group) == 1:
        return group[0]
    builtins = [s for s in group if s.builtin]
    return builtins[0] if builtins else None


def _resolve(name: str) -> _Spec:
    dist, _, bare = name.rpartition(":")
    group = _by_name(_specs()).get(bare, [])
    if not group:
        known = ", ".join(modality_names()) or "none installed"
        raise ModalityError(f"unknown modality {bare!r} (installed: {known})")
    if dist:
        for s in group:
            if s.distribution.lower().replace("_", "-") == dist.lower().replace("_", "-"):
                return s
        raise ModalityError(f"no distribution {dist!r} provides modality {bare!r} "
                            f"(provided by: {', '.join(s.distribution for s in group)})")
    chosen = _default_choice(group)
    if chosen is None:
        raise ModalityError(f"modality {bare!r} is ambiguous: registered by "
                            f"{', '.join(s.distribution for s in group)}; pick one with "
                            f"--modality DIST:{bare}")
    return chosen


def get_modality(name: str):
    """A fresh instance of the named modality (``NAME`` or ``DIST:NAME``), or why not."""
    spec = _resolve(name)
    instance, info = _load(spec)
    if instance is None:
        raise ModalityError(f"modality {spec.name!r} from {info.distribution} is broken: "
                            f"{info.error}")
    obj = spec.entry_point.load()  # already imported by _load: a dictionary lookup
    # A class gives a fresh instance; an instance entry point is copied, so state
    # loaded from one checkpoint never leaks into the next user.
    return with_defaults(obj()) if isinstance(obj, type) else copy.copy(instance)


def guess_modality(path: str | os.PathLike) -> str:
    """The working modality whose ``guess_can_open`` accepts the file (content first)."""
    accepted = []
    for name, group in _by_name(_specs()).items():
        spec = _default_choice(group)
        if spec is None:
            continue
        instance, _ = _load(spec)
        if instance is None:
            continue
        try:
            if instance.guess_can_open(path):
                accepted.append(name)
        except (Exception, SystemExit):  # noqa: BLE001, S112 - a broken guesser is skipped
            continue
    if len(accepted) == 1:
        return accepted[0]
    if not accepted:
        raise ModalityError(f"no installed modality can open {path}; pass --modality")
    raise ModalityError(f"several modalities can open {path} ({', '.join(accepted)}); "
                        "pass --modality")


def view_modality(view_name: str) -> str | None:
    """The modality whose viewer answers to ``view_name`` (its name or a view name)."""
    groups = _by_name(_specs())
    if view_name.rpartition(":")[2] in groups:
        return view_name
    for name, group in groups.items():
        spec = _default_choice(group)
        instance = _load(spec)[0] if spec is not None else None
        if instance is not None and view_name in getattr(instance, "view_names", ()):
            return name
    return None
