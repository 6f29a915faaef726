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


# An .npz member this large that was stored this much smaller is a zip bomb, not data: real
# poses and pictures compress a few times at most (a motion of 1 MB that would take 1 GiB).
_BOMB_BYTES = 256 << 20
_BOMB_RATIO = 20


def check_npz_expansion(archive: np.lib.npyio.NpzFile) -> None:
    """ValueError naming a member of an open .npz that would expand far past its stored size,
    before anything is loaded."""
    for info in archive.zip.infolist():
        stored = max(1, info.compress_size)
        if info.file_size > _BOMB_BYTES and info.file_size > _BOMB_RATIO * stored:
            raise ValueError(
                f"{info.filename}: {info.file_size >> 20} MiB once loaded, from "
                f"{stored >> 10} KiB stored; not data of this kind (a zip bomb?)"
            )
