"""Find a checkpoint by the sha256 a stream names, so a reader needs no ``--checkpoint``.

Searched in order: folders the caller gives, the folders in the environment variable
``MSCN_CHECKPOINTS`` (``os.pathsep``-separated), then the folders plugins ship
checkpoints in, declared in the ``mscn.checkpoints`` entry-point group (name → an
importable package, or a callable returning folders, whose folder holds
``*.safetensors``). A broken entry point is skipped with a warning, never taking the
search down (a plugin's fault stays the plugin's).

The hash is the one :func:`mscn_core.checkpoint.load_checkpoint` puts in ``ck.sha256``:
the sha256 of the file's bytes. Hashing every candidate on every lookup would read
gigabytes, so hashes are cached per (path, size, mtime_ns): in memory, and in a small
JSON index in the cache folder (``MSCN_CACHE_DIR``, else ``$XDG_CACHE_HOME/mscn``),
written atomically; the index is only a hint, a file is hashed again when it changed.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points
from pathlib import Path

from .checkpoint import file_sha256

GROUP = "mscn.checkpoints"
ENV = "MSCN_CHECKPOINTS"
SUFFIX = ".safetensors"
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_INDEX_NAME = "checkpoint_hashes.json"
_INDEX_MAX = 4096  # entries kept in the JSON index (oldest dropped)

_Key = tuple[str, int, int]  # (resolved path, size, mtime_ns)
_memory: dict[_Key, str] = {}
_lock = threading.Lock()
_index_loaded = False


def _cache_dir() -> Path | None:
    given = os.environ.get("MSCN_CACHE_DIR")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "mscn"


def _load_index() -> None:
    """Merge the on-disk index into memory once (a damaged index is ignored)."""
    global _index_loaded
    if _index_loaded:
        return
    _index_loaded = True
    d = _cache_dir()
    try:
        raw = json.loads((d / _INDEX_NAME).read_text()) if d else {}
        for row in raw.get("entries", []) if isinstance(raw, dict) else []:
            path, size, mtime, digest = row
            if isinstance(digest, str) and _HASH_RE.fullmatch(digest):
                _memory.setdefault((str(path), int(size), int(mtime)), digest)
    except (OSError, ValueError, TypeError, AttributeError):
        pass


def _save_index() -> None:
    """Best effort: a read-only home must not make a lookup fail."""
    from .atomic import save_bytes_atomic

    d = _cache_dir()
    if d is None:
        return
    rows = [[p, s, m, h] for (p, s, m), h in list(_memory.items())[-_INDEX_MAX:]]
    try:
        d.mkdir(parents=True, exist_ok=True)
        save_bytes_atomic(json.dumps({"entries": rows}).encode(), d / _INDEX_NAME,
                          overwrite=True)
    except OSError:
        pass


def checkpoint_hash(path: str | os.PathLike, save: bool = True) -> str:
    """``ck.sha256`` of the checkpoint file at ``path``, without loading it (cached;
    ``save=False`` leaves the on-disk index for the caller to write once)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _lock:
        _load_index()
        digest = _memory.get(key)
    if digest is None:
        digest = file_sha256(p)
        with _lock:
            _memory[key] = digest
            if save:
                _save_index()
    return digest


def _entry_point_dirs() -> Iterator[Path]:
    """Folders declared by the ``mscn.checkpoints`` entry points, broken ones skipped."""
    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj = obj()
            if isinstance(obj, str | os.PathLike):
                found = [Path(obj)]
            elif hasattr(obj, "__path__"):  # a package, namespace packages included
                found = [Path(p) for p in obj.__path__]
            elif getattr(obj, "__file__", None):
                found = [Path(obj.__file__).parent]
            else:
                found = [Path(p) for p in obj]
        except Exception as err:  # noqa: BLE001 - a broken plugin must not stop the search
            warnings.warn(f"checkpoint entry point {ep.name!r} ({ep.value}) is broken and "
                          f"skipped: {type(err).__name__}: {err}", RuntimeWarning,
                          stacklevel=3)
            continue
        yield from found


def search_dirs(extra_dirs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The folders :func:`find_checkpoint` searches, in order, without duplicates."""
    env = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    out: list[Path] = []
    for d in [*map(Path, extra_dirs), *map(Path, env), *_entry_point_dirs()]:
        if d not in out:
            out.append(d)
    return out


def _candidates(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix == SUFFIX and p.is_file())
    except OSError:  # missing or unreadable: nothing there
        return []


def find_checkpoint(sha256: str, extra_dirs: Iterable[str | os.PathLike] = ()) -> Path:
    """The ``*.safetensors`` file whose sha256 is ``sha256`` (what a stream's header
    names), searching ``extra_dirs``, then ``MSCN_CHECKPOINTS``, then the folders
    plugins ship (first match wins); ``FileNotFoundError`` (one line) if none."""
    want = str(sha256).lower()
    if not _HASH_RE.fullmatch(want):
        raise ValueError(f"not a sha256 hex digest: {str(sha256)[:80]!r}")
    dirs = search_dirs(extra_dirs)
    with _lock:
        _load_index()
        known = len(_memory)
    try:
        for d in dirs:
            for p in _candidates(d):
                try:
                    if checkpoint_hash(p, save=False) == want:
                        return p
                except OSError:
                    continue
    finally:
        if len(_memory) != known:  # new hashes: one index write per search
            with _lock:
                _save_index()
    where = ", ".join(map(str, dirs)) or "no folders"
    raise FileNotFoundError(f"no checkpoint with sha256 {want[:12]} in {where}; put it in a "
                            f"folder listed in {ENV} (separated by {os.pathsep!r}) or pass "
                            "checkpoint=PATH")


def find_named(name: str, extra_dirs: Iterable[str | os.PathLike] = ()) -> Path:
    """The checkpoint file called ``name`` (``.safetensors`` added when missing) in the
    same folders as :func:`find_checkpoint`, first match; a modality's shipped default."""
    file = name if name.endswith(SUFFIX) else name + SUFFIX
    dirs = search_dirs(extra_dirs)
    for d in dirs:
        if (d / file).is_file():
            return d / file
    where = ", ".join(map(str, dirs)) or "no folders"
    raise FileNotFoundError(f"no checkpoint called {file} in {where}; pass --checkpoint")


def clear_cache() -> None:
    """Forget in-memory hashes (the on-disk index is re-read at the next lookup)."""
    global _index_loaded
    with _lock:
        _memory.clear()
        _index_loaded = False
