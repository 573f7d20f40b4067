"""Meta-training state files: what ``--resume`` needs to continue a run bit for bit.

``state.pt`` is the latest state and ``state.prev.pt`` the one before it. Each is written
through :func:`mscn_core.atomic.write_atomic` (temp + fsync + rename), and the latest is
moved to ``.prev`` first, so at every instant at least one complete state exists; a
truncated or corrupt latest file falls back to the previous one with a warning. Files
are read with ``torch.load(weights_only=True)``: a state file cannot run code.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .atomic import save_bytes_atomic, write_atomic

LATEST = "state.pt"
PREVIOUS = "state.prev.pt"
FORMAT = 1


def state_files(state_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    d = Path(state_dir)
    return d / LATEST, d / PREVIOUS


def has_state(state_dir: str | os.PathLike[str]) -> bool:
    return any(p.exists() for p in state_files(state_dir))


def save_state(state_dir: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` as the latest state, keeping the previous latest as ``.prev``."""
    latest, prev = state_files(state_dir)
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    if latest.exists():
        os.replace(latest, prev)
    return write_atomic(latest, lambda tmp: torch.save({"format": FORMAT, **payload}, tmp),
                        overwrite=True)


def load_state(state_dir: str | os.PathLike[str], warn: bool = True
               ) -> tuple[dict[str, Any], Path]:
    """The newest readable state and its path. A bad latest file: warning, then ``.prev``.

    Raises FileNotFoundError (one line, naming the folder) when there is none at all.
    """
    problems = []
    for path in state_files(state_dir):
        if not path.exists():
            continue
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != FORMAT:
                raise ValueError("not an mscn training state")
        except Exception as err:  # noqa: BLE001 - any unreadable file: try the older one
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            problems.append(f"{path}: {why}")
            if warn:
                warnings.warn(f"{path} is unreadable ({why[:120]}); trying the previous state",
                              stacklevel=2)
            continue
        return payload, path
    if problems:
        raise ValueError(f"{state_dir}: no readable training state ({'; '.join(problems)})"[:400])
    raise FileNotFoundError(2, "no training state to resume (run without --resume to "
                            "start)", str(state_dir))


def mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first setting that differs between a saved fingerprint and the current one."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"{key} was {saved.get(key)!r}, now {current.get(key)!r}"
    return None


def cut_log(path: str | os.PathLike[str], step: int) -> None:
    """Keep only the JSONL records of steps ``<= step`` (and drop a half-written last
    line): the resumed run appends the later steps again, without duplicates."""
    p = Path(path)
    if not p.exists():
        return
    kept = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            kept.append(line + "\n")
    save_bytes_atomic("".join(kept).encode(), p, overwrite=True)


def check_resumable(state_dir: str | os.PathLike[str], current: dict[str, Any]) -> None:
    """Refuse (one line, before any work) a resume without state or with other settings."""
    saved, path = load_state(state_dir, warn=False)
    diff = mismatch(json.loads(saved["fingerprint"]), current)
    if diff:
        raise ValueError(f"{path}: cannot resume, the settings differ ({diff}); "
                         "run without --resume to start over")
