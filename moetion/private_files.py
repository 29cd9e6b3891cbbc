"""Files only this user can read: what moetion writes holds weights and data-derived logs.

Every directory moetion creates is 0700 and every file 0600, whatever the umask. A directory it is
handed back (a shared-memory root, a run directory) is checked with ``lstat`` before use: a real
directory, not a symlink, owned by this user, with no group or other permissions; anything else is
an error naming the fix, never silently "repaired". Files are created with ``O_EXCL|O_NOFOLLOW``
under unpredictable temporary names and renamed into place after an ``fsync`` of the file and of
its directory, so a crash leaves the old file or the new one, and a planted symlink is never
followed.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from moetion.errors import MoetionError

DIR_MODE = 0o700
FILE_MODE = 0o600
_CREATE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(MoetionError):
    """A path moetion would write to or read from is not private to this user (or is a symlink)."""


def private_dir(path: Path | str) -> Path:
    """``path`` as a private directory: created 0700 (with any missing parents, 0700 too) or, if it
    exists, checked (not a symlink, a directory, owned by this user, mode without group/other bits)."""
    path = Path(path)
    try:
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE, follow_symlinks=False)  # the umask may have cleared bits; never adds any
    except FileNotFoundError:
        private_dir(path.parent)
        return private_dir(path)
    except FileExistsError:
        check_private_dir(path)
    except OSError as error:
        raise UnsafePathError(f"{path}: cannot create a private directory ({error.strerror}); choose a directory "
                              "this user can write") from None
    return path


def check_private_dir(path: Path | str) -> os.stat_result:
    """The ``lstat`` of ``path`` if it is a private directory of this user; UnsafePathError otherwise."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except OSError as error:
        raise UnsafePathError(f"{path}: cannot be checked ({error.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePathError(f"{path}: is a symlink, expected a private directory; remove it (someone may be "
                              "redirecting this job's files)")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{path}: is not a directory; remove it or choose another path")
    if info.st_uid != os.geteuid():
        raise UnsafePathError(f"{path}: owned by uid {info.st_uid}, expected this user (uid {os.geteuid()}); "
                              "choose a directory of your own")
    if info.st_mode & 0o077:
        raise UnsafePathError(f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets other users in, expected 0700; "
                              f"run `chmod 700 {path}` if it is yours and holds nothing of another job")
    return info


def check_private_file(path: Path | str) -> os.stat_result:
    """The ``lstat`` of ``path`` if it is a regular file of this user (not a symlink); else UnsafePathError."""
    path = Path(path)
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file of this user"
        raise UnsafePathError(f"{path}: is {kind} (uid {info.st_uid}); remove it")
    return info


def create_exclusive(path: Path | str, flags: int = os.O_WRONLY) -> int:
    """A new file at ``path``, mode 0600, opened with O_EXCL|O_NOFOLLOW: never an existing file or a link."""
    return os.open(path, flags | _CREATE, FILE_MODE)


def temp_name(path: Path | str) -> Path:
    """An unpredictable sibling name for writing ``path`` aside (hidden, same directory)."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{secrets.token_hex(8)}"


def write_atomically(path: Path | str, data: bytes | memoryview) -> None:
    """Replaces ``path`` by ``data`` (mode 0600): written aside, fsynced, renamed, directory fsynced."""
    path = Path(path)
    tmp = temp_name(path)
    fd = create_exclusive(tmp)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            view = memoryview(data)
            while len(view):
                view = view[f.write(view):]
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path | str) -> None:
    """Makes the names in directory ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
