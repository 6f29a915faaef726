"""Array checks shared by the numpy modules: one way to say "bad input" with the name in it."""

from __future__ import annotations

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


# An .npz array of numbers this large that was stored this much smaller is a zip bomb, not
# data: poses compress a few times at most (a motion of 1 MB that would take 1 GiB). Text
# arrays are left alone: numpy pads every string to the longest, and the padding compresses
# away (one long prompt among 30,000 batch labels).
_BOMB_BYTES = 256 << 20
_BOMB_RATIO = 20


def check_npz_expansion(archive: np.lib.npyio.NpzFile) -> None:
    """ValueError naming an array of numbers in an open .npz that would expand far past its
    stored size, before anything is loaded."""
    for info in archive.zip.infolist():
        stored = max(1, info.compress_size)
        if info.file_size <= _BOMB_BYTES or info.file_size <= _BOMB_RATIO * stored:
            continue
        if _member_dtype_kind(archive, info) in ("U", "S", None):
            continue
        raise ValueError(
            f"{info.filename}: {info.file_size >> 20} MiB once loaded, from "
            f"{stored >> 10} KiB stored; not data of this kind (a zip bomb?)"
        )


def _member_dtype_kind(archive: np.lib.npyio.NpzFile, info) -> str | None:
    """The dtype kind in a member's .npy header; None when it has none numpy 1.0/2.0 writes
    (np.load then says what is wrong)."""
    try:
        with archive.zip.open(info) as member:
            version = np.lib.format.read_magic(member)
            read = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }[version]
            return read(member)[2].kind
    except (KeyError, ValueError, OSError):
        return None
