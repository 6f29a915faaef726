"""Writing a file whole or not at all: into a new temporary file beside it, synced, then
renamed over it, so that a failed write (a full disk, Ctrl-C, a power cut) leaves what was
there before. Standard library only: motions (the add-on's export, the command line's --out),
training's `latest` and log, evaluation's reports."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sys
from collections.abc import Callable
from typing import BinaryIO


def check_writable(path: str | os.PathLike) -> None:
    """OSError, as writing would raise it, when `write_atomically` could not write `path`: a folder
    that is missing or may not be written, a name too long once the temporary file's suffix
    is added. Checked by making that temporary file and removing it again."""
    target, _ = _writable_target(path)
    temporary, descriptor = _new_temporary(target)
    os.close(descriptor)
    os.unlink(temporary)


def _writable_target(path: str | os.PathLike) -> tuple[str, bool]:
    """The file `path` names, through any link, and whether it exists. OSError for one that
    may not be written, or is no regular file (a device behind a link, which the rename
    would replace)."""
    target = os.path.realpath(path)
    existing = os.path.exists(target)
    if existing and not os.path.isfile(target):
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    if existing and not os.access(target, os.W_OK):
        if _on_read_only_file_system(target):  # what writing would say, not a permission
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
    return target, existing


def _on_read_only_file_system(path: str) -> bool:
    if not hasattr(os, "statvfs"):  # Windows has no read-only mounts to tell apart
        return False
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def temporary_name(name: str) -> str:
    """A name for the temporary file that `write_atomically` writes the file `name` into
    first (a new one each time)."""
    return f".{name}.{secrets.token_hex(4)}.tmp"


def _new_temporary(target: str) -> tuple[str, int]:
    """A new file beside `target`, named after it, and its open descriptor."""
    folder, name = os.path.split(target)
    while True:
        temporary = os.path.join(folder, temporary_name(name))
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return temporary, os.open(temporary, flags, 0o666)  # the umask applies, as open's
        except FileExistsError:
            continue


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """`write(stream)` into a temporary file beside `path`, then the file takes its name: a
    write that fails (a full disk, Ctrl-C) leaves whatever `path` held before as it was. As
    `open(path, "wb")` would: a link is written through to its target, a file that may not be
    written is refused (and so is a device or a folder), a new file gets the umask's mode and
    an old one keeps its own."""
    target, existing = _writable_target(path)
    temporary, descriptor = _new_temporary(target)
    try:
        with os.fdopen(descriptor, "wb") as stream:  # a name would get ".npz" from np.savez
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())  # else a power cut may leave the renamed file empty
        if existing:
            os.chmod(temporary, os.stat(target).st_mode & 0o777)
        try:
            os.replace(temporary, target)
        except PermissionError:
            if sys.platform != "win32":
                raise
            # Windows replaces no file that another program holds open ("Access is denied").
            raise PermissionError(
                errno.EACCES,
                "not replaced: open in another program? (Windows cannot replace an open file; "
                "close it there or save under another name)",
                os.fspath(path),
            ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.chmod(temporary, 0o600)  # Windows will not remove a read-only file
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
