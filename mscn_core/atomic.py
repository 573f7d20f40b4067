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

Folder outputs go through :func:`write_folder_atomic`: built under a temp name, given a
marker file (:data:`MARKER`, one JSON line: what wrote it, when, the checkpoint) as its
last step, then renamed into place. ``overwrite`` replaces an existing folder only if it
carries that marker (mscn completed it); a folder without it (a user's) is never removed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

TEMP_TAG = ".mscn-tmp."
MARKER = ".mscn-output"  # in every folder mscn wrote (and completed)


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
                 probe: bool = True, folder_ok: bool = False) -> Path:
    """Refuse an output path that cannot (or must not) be written; returns it as a Path.

    Why: a long run must fail in its first second, not after the compute. One rule set
    for every writer: ``FileExistsError`` if it exists (a dangling symbolic link counts)
    and not ``overwrite``; ``IsADirectoryError`` if it is a directory; ``FileNotFoundError``
    if its directory is missing (never created); ``NotADirectoryError`` if its "directory"
    is a file; ``PermissionError`` if no file can be created there. ``probe``: also
    create and remove a temp file there (permission bits alone say nothing for root,
    nor for read-only or full file systems). ``folder_ok``: the output may be a folder
    (:func:`write_folder_atomic`); an existing one is then replaced with ``overwrite``
    only if mscn wrote it (:func:`is_mscn_output`), else ``FileExistsError``. Every
    error names ``path`` (``err.filename``).
    """
    raw = os.fspath(path)
    path = Path(raw)
    if folder_ok and os.path.isdir(path) and not os.path.islink(path):
        if not is_mscn_output(path):
            if overwrite:
                raise _error(FileExistsError, errno.EEXIST, path,
                             f"is a directory that was not written by mscn (no {MARKER}); "
                             "remove it yourself or choose another -o")
            raise _error(IsADirectoryError, errno.EISDIR, path,
                         "is a directory; name the file to write")
        if not overwrite:
            raise _error(FileExistsError, errno.EEXIST, path,
                         "exists (a folder mscn wrote); pass --overwrite to replace it")
    elif raw.endswith(("/", os.sep)) or os.path.isdir(path):
        raise _error(IsADirectoryError, errno.EISDIR, path,
                     "is a directory; name the file to write")
    elif os.path.lexists(path):
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


def is_mscn_output(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a real folder (not a link) holding mscn's :data:`MARKER` file,
    i.e. one :func:`write_folder_atomic` completed: the only folders mscn replaces."""
    path = Path(path)
    try:
        return (stat.S_ISDIR(os.lstat(path).st_mode)
                and stat.S_ISREG(os.lstat(path / MARKER).st_mode))
    except OSError:
        return False


def _marker_line(info: dict | None) -> bytes:
    from . import __version__

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"written_by": f"mscn {__version__}", "time": stamp, **(info or {})}
    return (json.dumps(record, default=str) + "\n").encode()


def write_folder_atomic(path: str | os.PathLike[str], fill: Callable[[Path], object],
                        overwrite: bool = False, marker: dict | None = None) -> Path:
    """Build a folder with ``fill(tmp_dir)`` under a temp name beside ``path`` (its files
    through :func:`write_atomic`), add the :data:`MARKER` file (``marker``: more to record
    in it, e.g. the checkpoint), then rename it into place.

    Refuses what :func:`check_output` refuses with ``folder_ok``: an existing ``path``
    without ``overwrite``; with it, a folder mscn did not write (no marker). A folder
    mscn wrote is swapped: old → temp name, new → ``path``, then the old one removed;
    a file or link is replaced itself. On any error (and on the exceptions the CLI
    raises for SIGTERM/SIGINT) the temp folder is removed and ``path`` is as it was.
    """
    path = check_output(path, overwrite, probe=False, folder_ok=True)
    tmp = temp_path(path)
    try:
        tmp.mkdir()
    except OSError as err:
        raise _create_error(err, path) from err
    old = None
    try:
        fill(tmp)
        save_bytes_atomic(_marker_line(marker), tmp / MARKER)
        _fsync_dir(tmp)
        if os.path.lexists(path):  # checked again now: it may have changed meanwhile
            check_output(path, overwrite, probe=False, folder_ok=True)
            old = temp_path(path)
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, just made: never the user's
        if old is not None and not os.path.lexists(path):
            os.rename(old, path)
            old = None
        raise
    finally:
        if old is not None:
            if is_mscn_output(old):
                shutil.rmtree(old, ignore_errors=True)
            elif not os.path.isdir(old) or os.path.islink(old):
                _unlink(old)
    _fsync_dir(path.parent)
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
