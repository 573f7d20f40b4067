"""The one atomic writer: every file mscn writes goes through :func:`write_atomic`.

A crash or error mid-write never leaves a truncated file where a valid one was
expected, and an existing file is never clobbered unasked (no-clobber is atomic too).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _default_mode() -> int:
    """0o666 minus the process umask: what a plain ``open()`` would have created."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], object],
                 overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync, then rename it.

    ``FileExistsError`` if ``path`` exists and not ``overwrite`` (checked before writing
    and again, atomically, at the rename); ``FileNotFoundError`` if its folder is
    missing. On any error the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"refusing to overwrite existing file: {path} "
                              "(pass --overwrite / overwrite=True)")
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"directory {str(directory)!r} does not exist")
    # The real suffix last, so writers that infer the format from the name still can.
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 _default_mode())
    os.close(fd)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic no-clobber: fails if path appeared meanwhile
            except FileExistsError:
                raise FileExistsError(f"refusing to overwrite existing file: {path}") from None
            except OSError:  # a file system without hard links: best effort
                if os.path.lexists(path):
                    raise FileExistsError(f"refusing to overwrite existing file: {path}") \
                        from None
                os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _fsync_dir(directory)
    return path


def save_bytes_atomic(data: bytes, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through :func:`write_atomic`. Returns the path."""
    blob = bytes(memoryview(data).cast("B"))
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(blob), overwrite)


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
