"""The one atomic writer: every file mscn writes goes through :func:`write_atomic`.

A crash or error mid-write never leaves a truncated file where a valid one was
expected, and an existing file is never clobbered unasked (no-clobber is atomic too).
:func:`check_output` is the one set of rules for an output path; the CLI calls it for
every output before any work, and :func:`write_atomic` calls it again at write time.

Temp files sit beside their target as ``.{name}.mscn-tmp.{pid}.{token}{suffix}`` (the
real suffix last: writers infer the format from it). They are removed on every error
path, and the CLI turns SIGTERM/SIGINT into exceptions so that happens then too. Only
``kill -9`` (or a power cut) can leave one behind; the next write to the same target
removes those whose writing process no longer exists. The pid is only meaningful on this
machine: a directory shared by several machines could see another host's live temp
as stale, so do not point concurrent writers on different hosts at the same target.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

TEMP_TAG = ".mscn-tmp."


def _default_mode() -> int:
    """0o666 minus the process umask: what a plain ``open()`` would have created."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temp name beside ``path``, recognisable (and attributable to this process)."""
    path = Path(path)
    return path.parent / (f".{path.name}{TEMP_TAG}{os.getpid()}.{secrets.token_hex(4)}"
                          f"{path.suffix}")


def _error(cls: type[OSError], code: int, path: Path | str, problem: str) -> OSError:
    """An OSError naming the output path (``err.filename``) with a readable problem."""
    return cls(code, problem, str(path))


def _create_error(err: OSError, path: Path) -> OSError:
    """Why a file cannot be created beside ``path``, as an error naming ``path``."""
    cls = PermissionError if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) \
        else type(err)
    why = err.strerror or str(err)
    return _error(cls, err.errno or errno.EACCES, path,
                  f"cannot create files in directory {path.parent} ({why})")


def check_output(path: str | os.PathLike[str], overwrite: bool = False,
                 probe: bool = True) -> Path:
    """Refuse an output path that cannot (or must not) be written; returns it as a Path.

    Why: a long run must fail in its first second, not after the compute. One rule set
    for every writer: ``FileExistsError`` if it exists (a dangling symbolic link counts)
    and not ``overwrite``; ``IsADirectoryError`` if it is a directory; ``FileNotFoundError``
    if its directory is missing (never created); ``NotADirectoryError`` if its "directory"
    is a file; ``PermissionError`` if no file can be created there. ``probe``: also
    create and remove a temp file there (permission bits alone say nothing for root,
    nor for read-only or full file systems). Every error names ``path`` (``err.filename``).
    """
    raw = os.fspath(path)
    path = Path(raw)
    if raw.endswith(("/", os.sep)) or os.path.isdir(path):
        raise _error(IsADirectoryError, errno.EISDIR, path,
                     "is a directory; name the file to write")
    if os.path.lexists(path):
        st = os.lstat(path)
        if not overwrite:
            what = ("exists (a dangling symbolic link)" if stat.S_ISLNK(st.st_mode)
                    and not os.path.exists(path) else "exists")
            raise _error(FileExistsError, errno.EEXIST, path,
                         f"{what}; pass --overwrite to replace it")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise _error(FileExistsError, errno.EEXIST, path,
                         "exists and is not a regular file; refusing to replace it")
    parent = path.parent
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise _error(NotADirectoryError, errno.ENOTDIR, path,
                         f"{parent} is not a directory")
        raise _error(FileNotFoundError, errno.ENOENT, path,
                     f"directory {parent} does not exist (it is not created)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _error(PermissionError, errno.EACCES, path,
                     f"directory {parent} is not writable")
    if probe:
        tmp = temp_path(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as err:
            raise _create_error(err, path) from err
        finally:
            _unlink(tmp)
    return path


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one we may not signal exists too)."""
    if pid <= 0:
        return True  # not a writer's pid: never treat its temp as stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Temp files for ``path`` left by writers that no longer run (``kill -9``)."""
    path = Path(path)
    prefix = f".{path.name}{TEMP_TAG}"
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.[0-9a-f]+" + re.escape(path.suffix))
    found = []
    try:
        entries = os.scandir(path.parent)
    except OSError:
        return []
    with entries:
        for entry in entries:
            m = pattern.fullmatch(entry.name) if entry.name.startswith(prefix) else None
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                found.append(path.parent / entry.name)
    return found


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], object],
                 overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync, then rename it.

    Refuses what :func:`check_output` refuses (``FileExistsError`` if ``path`` exists and
    not ``overwrite``, checked again atomically at the rename; ``FileNotFoundError`` if
    its folder is missing, …). With ``overwrite`` a symbolic link is replaced itself,
    never written through. On any error (and on the exceptions the CLI raises for
    SIGTERM/SIGINT) the temp file is removed and ``path`` is untouched.
    """
    path = check_output(path, overwrite, probe=False)  # creating the temp is the probe
    directory = path.parent
    for old in stale_temps(path):
        _unlink(old)
    tmp = temp_path(path)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_BINARY", 0), _default_mode())
        except OSError as err:
            raise _create_error(err, path) from err
        os.close(fd)
        try:
            write(str(tmp))
        except OSError as err:  # name the target, not the hidden temp file
            if err.filename is not None and os.fsdecode(err.filename) == str(tmp):
                raise _error(type(err), err.errno or errno.EIO, path,
                             err.strerror or str(err)) from err
            raise
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic no-clobber: fails if path appeared meanwhile
            except FileExistsError:
                raise _error(FileExistsError, errno.EEXIST, path,
                             "exists; pass --overwrite to replace it") from None
            except OSError:  # a file system without hard links: best effort
                if os.path.lexists(path):
                    raise _error(FileExistsError, errno.EEXIST, path,
                                 "exists; pass --overwrite to replace it") from None
                os.replace(tmp, path)
    finally:
        _unlink(tmp)
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
