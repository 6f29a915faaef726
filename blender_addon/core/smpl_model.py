"""The user's own SMPL model file: exact rest joints and, when present, the body mesh.

The SMPL files need a registration and cannot be shipped; a user who has one points the add-on
to it (Preferences > SMPL model file). Only ``.npz`` files are read (``np.load`` without
pickle): the official ``.pkl`` files pickle chumpy objects, and unpickling runs code. Convert a
``.pkl`` with smplx's ``tools/clean_ch.py`` or any script that saves the arrays to ``.npz``.

Read: ``v_template`` (V, 3), ``J_regressor`` (24, V), optional ``f`` (F, 3) faces and
``weights`` (V, 24) skinning weights, optional ``shapedirs`` (V, 3, B) with ``betas``.
The rest joints are ``J_regressor @ (v_template + shapedirs · betas)`` (SMPL frame, metres).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from shared_protocol.arrays import NPZ_READ_ERRORS, npz_member, open_npz
from shared_protocol.skeleton import NUM_JOINTS


@dataclass(frozen=True)
class SmplModel:
    rest_joints: np.ndarray  # (24, 3), SMPL frame
    vertices: np.ndarray  # (V, 3), SMPL frame, shaped by betas
    faces: np.ndarray | None  # (F, 3) int
    weights: np.ndarray | None  # (V, 24)


def smpl_model_from_arrays(arrays, betas=None) -> SmplModel:
    """Builds the model from a mapping of arrays (an opened ``.npz``); ValueError names the
    array that is missing or has the wrong shape."""
    for key in ("v_template", "J_regressor"):
        if key not in arrays:
            raise ValueError(f"{key}: missing (is this an SMPL model file?)")
    v = _array(arrays, "v_template").astype(np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"v_template: expected shape (V, 3), got {v.shape}")
    n = v.shape[0]
    regressor = _array(arrays, "J_regressor")
    if regressor.dtype == object:
        raise ValueError("J_regressor: a pickled sparse matrix; save it as a dense array")
    regressor = regressor.astype(np.float64)
    if regressor.shape != (NUM_JOINTS, n):
        other = {52: " (an SMPL-H model? the SMPL one is needed)", 55: " (an SMPL-X model?"
                 " the SMPL one is needed)"}.get(regressor.shape[0], "")  # fmt: skip
        raise ValueError(f"J_regressor: expected shape (24, {n}), got {regressor.shape}{other}")
    if betas is not None and "shapedirs" in arrays:
        dirs = _array(arrays, "shapedirs").astype(np.float64)
        b = np.asarray(betas, dtype=np.float64).reshape(-1)
        k = min(b.shape[0], dirs.shape[-1])
        v = v + dirs[..., :k] @ b[:k]
    faces = weights = None
    if "f" in arrays:
        faces = _array(arrays, "f").astype(np.int64)
        if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= n:
            raise ValueError(f"f: expected (F, 3) vertex indices below {n}")
    if "weights" in arrays:
        weights = _array(arrays, "weights").astype(np.float64)
        if weights.shape != (n, NUM_JOINTS):
            raise ValueError(f"weights: expected shape ({n}, 24), got {weights.shape}")
    joints = regressor @ v
    if not np.all(np.isfinite(joints)):
        raise ValueError("rest joints: contain NaN or inf")
    return SmplModel(joints, v, faces, weights)


def _array(arrays, key: str) -> np.ndarray:
    """``arrays[key]`` as an array; ValueError naming it when it cannot be read, as a pickled
    object (a sparse matrix, say) cannot without unpickling."""
    try:
        return npz_member(arrays, key)
    except ValueError as exc:
        raise ValueError(f"{exc}; save it as a plain (dense) array") from None


def load_smpl_model(path: str | os.PathLike, betas=None) -> SmplModel:
    """Reads an SMPL ``.npz`` model file; ValueError names the file and the problem."""
    path = os.fspath(path)
    if path.lower().endswith(".pkl"):
        raise ValueError(
            f"{path}: .pkl model files are not read (they need chumpy and unpickling); "
            "save the arrays as .npz (see docs/addon.md)"
        )
    try:
        with open_npz(path) as data:  # arrays read when used, not all
            return smpl_model_from_arrays(data, betas)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    except NPZ_READ_ERRORS as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
