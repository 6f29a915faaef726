"""Writing files and folders that hours of work end in (checkpoints, reports): asked before
the work whether they can be written, written whole or not at all, and a failed write told
apart from a bug. No torch here (safetensors' error type only)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors import SafetensorError

from inference_service.checkpoint import CONFIG_NAME, share_as_umask_allows
from shared_protocol.safe_files import check_writable, temporary_name, write_atomically

# How torch's, safetensors' and the tokenizers library's errors say that a write fell short (a
# full disk, a folder gone): torch and safetensors raise RuntimeError for it, tokenizers a bare
# Exception. Other errors of those types are bugs, left with their traceback.
_WRITE_FAILURES = (
    "unexpected pos",
    "iostream error",
    "file write failed",
    "Parent directory",
    "No space",
    "os error",
    "IoError",
)


def write_failure(exc: BaseException) -> str | None:
    """The first line of `exc` when it is a library's way of saying a write fell short,
    else None."""
    problem = str(exc).strip().split("\n")[0]
    raised_for_writes = isinstance(exc, (RuntimeError, SafetensorError)) or type(exc) is Exception
    if raised_for_writes and any(sign in problem for sign in _WRITE_FAILURES):
        return problem
    return None


def unwritable(folder: Path, files: Sequence[Path] = ()) -> str | None:
    """Why `folder` could not be made or written in, or None: the nearest folder on its path
    that exists must be a folder, writable. Asked before long work that ends in writing there
    (a run's --out, evaluate's report), which makes the rest of the path only then. `files`,
    to be written there by `write_text_atomically`: their temporary files' names must fit the
    disk's longest name, and one there already must be a file that may be written (through a
    link, to a folder that is there)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # to a place that is not there (a drive not mounted)
            target = os.readlink(existing)
            return f"{existing} is a link to {target}, which does not exist"
        existing = existing.parent
    if existing == folder and not existing.is_dir():
        return f"{folder} is a file, not a folder"
    if not existing.is_dir():
        return f"{existing} is a file, so {folder} cannot be made"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing}"
    for file in files:
        if os.path.lexists(file):  # asked as the write will: a link's target, a read-only file
            try:
                check_writable(file)
            except OSError as exc:
                return f"{file}: {exc.strerror or exc}"
    try:
        longest = os.pathconf(existing, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return None
    for name in (temporary_name(file.name) for file in files):
        if len(os.fsencode(name)) > longest:
            return f"a name too long for this disk ({name}, at most {longest} bytes)"
    return None


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` in UTF-8, whole or not at all (`write_atomically`)."""
    write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))


def sync(path: Path, *, tree: bool = False) -> None:
    """fsync the file or folder `path`, with `tree` every file and folder in it as well (not
    following links). Windows syncs only a file opened for writing, and has no folder handles
    to sync (its renames are written through); elsewhere a file is opened to read, so that a
    read-only one (a copied base model's) is synced too."""
    paths = [path]
    if tree:
        paths += sorted(p for p in path.rglob("*") if not p.is_symlink())
    for item in paths:
        folder = item.is_dir()
        if folder and os.name == "nt":
            continue
        fd = os.open(item, os.O_RDWR if os.name == "nt" and not folder else os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_folder(destination: Path, *, fill: bool = False) -> Path:
    """The folder `write_folder_whole` writes `destination` in first, on its disk: `.NAME.tmp`
    beside it, or with `fill`, where `destination` is a folder already, `.writing.tmp` in it.
    Always the same name, so that the next write removes what a killed one left."""
    if fill and destination.is_dir():
        return destination / ".writing.tmp"
    return destination.parent / f".{destination.name}.tmp"


def write_folder_whole(
    destination: Path, write: Callable[[Path], object], *, fill: bool = False
) -> None:
    """`write(folder)` into a new, empty `temporary_folder`, which then becomes `destination`:
    a checkpoint written whole or not at all. A write that fails, Ctrl-C included, is raised
    as it came once all it wrote is removed (it may hold a whole model), leaving `destination`
    as it was (past the rename, a Ctrl-C leaves the new one there). Before the rename the
    safetensors files get the mode the umask gives (`share_as_umask_allows`) and all of it is
    synced: a power cut leaves nothing half written under the name. A folder at `destination`
    is moved aside once the new one is whole, the new one takes its place, and then the old
    one is removed (a failure between the two puts it back: never neither); with `fill`, it is
    the user's (given empty: a link's target, a mount, the shell's folder), kept and filled,
    chatpose.json last, as a folder without it is not taken for a checkpoint."""
    if destination.exists() and not destination.is_dir():  # before the work, not after it
        raise NotADirectoryError(f"{destination}: a file is there, not a folder; move it away")
    temporary = temporary_folder(destination, fill=fill)
    filling = temporary.parent == destination
    _remove(temporary)  # left by a write that was killed
    moved: list[Path] = []  # into the user's folder
    try:
        temporary.mkdir(parents=True)
        write(temporary)
        share_as_umask_allows(temporary)
        sync(temporary, tree=True)
        if filling:
            for entry in sorted(temporary.iterdir(), key=lambda p: (p.name == CONFIG_NAME, p.name)):
                moved.append(destination / entry.name)
                os.replace(entry, moved[-1])
            temporary.rmdir()
        else:
            _replace_folder(destination, temporary)
    except BaseException:
        for path in (temporary, *moved):
            _remove(path)
        raise
    with contextlib.suppress(PermissionError):  # a folder others may write to but not read
        sync(destination if filling else destination.parent)  # the renames


def _replace_folder(destination: Path, new: Path) -> None:
    """`new` renamed to `destination`, a folder there moved aside first (a folder cannot be
    renamed onto another on Windows) and removed once `new` has its name."""
    old = destination.parent / f".{destination.name}.old"
    _remove(old)  # left by a write that was killed
    if not destination.exists():
        os.replace(new, destination)
        return
    os.replace(destination, old)
    try:
        os.replace(new, destination)
    except BaseException:
        if not os.path.lexists(new):  # renamed (a Ctrl-C just after): the new one is in place
            _remove(old)
        else:
            os.replace(old, destination)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    """Remove the file or folder `path`, if there, as far as it can be; a folder that copying
    made read-only (copytree gives each its source's mode) is made writable first."""
    if path.is_dir() and not path.is_symlink():
        for folder, _, _ in os.walk(path):
            with contextlib.suppress(OSError):
                os.chmod(folder, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
