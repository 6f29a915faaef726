"""Array checks shared by the numpy modules: one way to say "bad input" with the name in it."""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np


def _shape_text(trailing: tuple[int, ...]) -> str:
    return "(..., " + ", ".join(str(n) for n in trailing) + ")"


def finite_array(x, name: str, trailing: tuple[int, ...]) -> np.ndarray:
    """`x` as a float64 array, after checking its trailing shape and that it is finite.

    Raises ValueError naming `name`: not numeric (strings, booleans and complex numbers too,
    which a float conversion would parse, take as 0 and 1, or cut), wrong trailing shape, NaN
    or inf.
    """
    try:
        raw = np.asarray(x)
        if raw.dtype.kind in "bcUS":
            raise TypeError(f"{raw.dtype} values")
        arr = raw.astype(np.float64, copy=False)
    except (TypeError, ValueError, OverflowError) as exc:  # an int past float64's range
        raise ValueError(
            f"{name}: expected a numeric array, got {type(x).__name__} ({exc})"
        ) from exc
    if arr.ndim < len(trailing) or arr.shape[arr.ndim - len(trailing) :] != trailing:
        raise ValueError(f"{name}: expected shape {_shape_text(trailing)}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or inf")
    return arr


# What reading a damaged .npz member raises, besides ValueError: zipfile's own errors, zlib's,
# RuntimeError for an encrypted member and NotImplementedError for a compression method
# zipfile lacks.
NPZ_READ_ERRORS = (
    OSError,
    EOFError,
    KeyError,
    zipfile.BadZipFile,
    zlib.error,
    RuntimeError,
    NotImplementedError,
)

# Arrays of numbers this large, stored this much smaller, are a zip bomb, not data: poses
# compress a few times at most (a motion of 1 MB that would take 1 GiB). Text arrays may
# expand far more and be data: numpy pads every string to the longest, and the padding
# compresses away (one long prompt among 30,000 batch labels: 960 MB); what they expand to
# is only capped, in total.
_BOMB_BYTES = 256 << 20
_BOMB_RATIO = 20
_TEXT_BYTES = 2 << 30


def open_npz(path) -> np.lib.npyio.NpzFile:
    """`np.load(path)` of an .npz archive, never a pickle; the caller closes it. ValueError,
    naming what the file is instead (not the file: the caller knows its name), for a file that
    is no zip archive (numpy would take it for a pickle and say so: text, a pickle, a single
    .npy array) or that would take far more memory than it stores (`check_npz_expansion`).
    A damaged archive raises one of `NPZ_READ_ERRORS`; FileNotFoundError passes as it is."""
    with open(path, "rb") as stream:
        magic = stream.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise ValueError("a single .npy array, not an .npz archive of arrays")
    if not magic.startswith(b"PK"):
        raise ValueError("not an .npz file (an .npz is a zip archive)")
    archive = np.load(path, allow_pickle=False)
    try:
        check_npz_expansion(archive)
    except BaseException:
        archive.close()
        raise
    return archive


def npz_member(archive: Mapping[str, object], key: str) -> np.ndarray:
    """`archive[key]` of an open .npz, which must be an array. ValueError naming the member
    for an object array (it needs pickle, which is never loaded) or for another file under
    that name, a member `poses` with no .npy suffix say (numpy hands its bytes over)."""
    try:
        value = archive[key]
    except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{key}: {exc}") from None
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{key}: not a .npy array")
    return value


def write_npz(stream, arrays: Mapping[str, np.ndarray]) -> None:
    """`arrays` as an .npz archive into the binary `stream`, as `np.savez` writes one, but
    with its text arrays compressed: numpy pads every string to the longest (one long prompt
    among thousands of short labels took hundreds of megabytes), and the padding compresses
    away. Numbers are stored as they are: a long motion held still would compress past what
    `check_npz_expansion` takes for a zip bomb."""
    with zipfile.ZipFile(stream, "w", allowZip64=True) as archive:
        for name, value in arrays.items():
            array = np.asanyarray(value)
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            text = array.dtype.kind in "US"
            member.compress_type = zipfile.ZIP_DEFLATED if text else zipfile.ZIP_STORED
            with archive.open(member, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, array, allow_pickle=False)


def check_npz_expansion(archive: np.lib.npyio.NpzFile) -> None:
    """ValueError, before anything is loaded, for an open .npz that would take far more memory
    than it stores: arrays of numbers expanding past `_BOMB_RATIO` times their stored size,
    text arrays expanding past 2 GiB together, an array whose header claims more data than its
    member holds (numpy allocates what the header says before reading), or a member whose
    sizes in the zip directory are not what the file holds; also for a member that is no .npy
    array but is named as one (numpy would hand its raw bytes over as if they were one)."""
    archive_bytes = archive.zip.fp.seek(0, 2)
    expanded = stored = text = 0
    for info in archive.zip.infolist():
        stored_here = info.compress_size
        if info.header_offset + stored_here > archive_bytes or (
            info.compress_type == zipfile.ZIP_STORED and info.file_size > stored_here
        ):
            raise ValueError(f"{info.filename}: its sizes in the zip directory are not the file's")
        header = _member_header(archive, info)
        if header is not None and header[1] > info.file_size:
            raise ValueError(
                f"{info.filename}: its header claims {header[1]:,} bytes of data, and it holds "
                f"{info.file_size:,}"
            )
        if header is not None and header[0] in ("U", "S"):
            if info.file_size > _BOMB_RATIO * max(1, stored_here):  # padding, stored small
                text += info.file_size
            continue
        expanded += info.file_size
        stored += stored_here
    if text > _TEXT_BYTES:
        raise ValueError(f"{text >> 20} MiB of text once loaded, stored in far less")
    if expanded > _BOMB_BYTES and expanded > _BOMB_RATIO * max(1, stored):
        raise ValueError(
            f"{expanded >> 20} MiB of arrays once loaded, from {max(1, stored) >> 10} KiB "
            "stored; not data of this kind (a zip bomb?)"
        )


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0}


def _member_header(archive: np.lib.npyio.NpzFile, info) -> tuple[str, int] | None:
    """(dtype kind, bytes of memory its shape and dtype take: each element at least one) from
    a member's .npy header, read as numpy reads it; None for a member damaged in the zip (np.load
    says what is wrong), one of Python objects (AMASS's SMPL-X files hold one; numpy refuses
    it if it is read) or another file (a readme). ValueError for a member named .npy that is
    no .npy array, or a header numpy could not read either."""
    try:
        with archive.zip.open(info) as member:
            if member.read(6) != b"\x93NUMPY":
                shape = None
            else:
                member.seek(0)
                version = np.lib.format.read_magic(member)
                # numpy's public readers (its private one moved in numpy 2.3); 3.0 is 2.0's
                # layout with a UTF-8 header, which no array of numbers needs.
                read = _HEADER_READERS.get(version, np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(member)
    except NPZ_READ_ERRORS:
        return None  # np.load says what is wrong with it
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"{info.filename}: not a readable .npy header ({exc})") from None
    if shape is None and info.filename.endswith(".npy"):  # numpy would hand its bytes over
        raise ValueError(f"{info.filename}: not a .npy array")
    if shape is None:
        return None  # a readme, say: readers leave it out
    if dtype.hasobject:
        return None
    return dtype.kind, math.prod(shape) * max(1, dtype.itemsize)
