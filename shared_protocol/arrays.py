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
