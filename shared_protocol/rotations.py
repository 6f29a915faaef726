"""Rotation conversions between axis-angle, rotation matrices, quaternions and the 6D form.

numpy only (this module runs inside Blender's Python). Every public function:

- is batched over arbitrary leading dimensions (an empty batch such as shape (0, 3) works),
- accepts array-likes and returns a new float64 array,
- validates its input and raises ``ValueError`` naming the argument: wrong trailing shape,
  NaN/inf, a zero quaternion, a degenerate 6D vector, or a matrix that is not a rotation
  (tolerance ``ROTATION_TOLERANCE`` so float32 model output passes).

Conventions
-----------
- Axis-angle: a 3-vector whose direction is the axis and whose norm is the angle in radians.
  Outputs have angle in [0, π]; at exactly π the sign of the axis is ambiguous.
- Matrices act on column vectors: ``v_rotated = R @ v``.
- Quaternions are (w, x, y, z), Blender's order (scipy uses (x, y, z, w)). Outputs are unit and
  canonical with w >= 0; inputs need not be unit (they are normalised) but must not be zero.
- 6D: the HMR2 / ChatPose-release layout, "two columns one after the other":
  ``6D = [R[:, 0], R[:, 1]]`` (first column, then second column). Decoding reshapes to (..., 2, 3),
  treats the two rows as the first two columns, orthonormalises them by Gram-Schmidt and takes the
  third column as their cross product. This is NOT the interleaved SPIN/VPoser layout
  (``R[:, :2].reshape(6)`` = [R00, R01, R10, R11, R20, R21]) and NOT pytorch3d's row layout
  (``[R[0, :], R[1, :]]``, which decodes to the transpose).
"""

from __future__ import annotations

import numpy as np

from .arrays import finite_array

__all__ = [
    "ROTATION_TOLERANCE",
    "axis_angle_to_matrix",
    "axis_angle_to_quaternion",
    "geodesic_distance",
    "matrix_to_axis_angle",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "quaternion_to_axis_angle",
    "quaternion_to_matrix",
    "rotation_6d_to_matrix",
    "rotation_angle",
    "slerp",
]

# Max |RᵀR − I| and |det R − 1| accepted for a rotation matrix: loose enough for float32 output.
ROTATION_TOLERANCE = 1e-3
# Below this angle the Taylor series replace sinθ/θ-style ratios (their error there is < 1e-20).
_SMALL_ANGLE = 1e-4
# Norms below this count as zero (quaternions, 6D columns).
_TINY = 1e-12
# Sine of the angle between the two 6D columns below which they count as collinear.
_COLLINEAR = 1e-6


def _validated_rotation(x, name: str) -> np.ndarray:
    """Like ``finite_array`` for (..., 3, 3), and also require (approximately) a rotation."""
    m = finite_array(x, name, (3, 3))
    if m.size == 0:
        return m
    err = np.abs(np.swapaxes(m, -1, -2) @ m - np.eye(3)).max()
    if err > ROTATION_TOLERANCE:
        raise ValueError(f"{name}: not a rotation matrix (max |RᵀR − I| = {err:.3g})")
    det = np.linalg.det(m)
    worst = det.flat[np.argmax(np.abs(det - 1.0))]
    if abs(worst - 1.0) > 3 * ROTATION_TOLERANCE:
        kind = "a reflection" if worst < 0 else "not a rotation matrix"
        raise ValueError(f"{name}: {kind} (det = {worst:.3g}, expected +1)")
    return m


def _validated_quaternion(x, name: str) -> np.ndarray:
    """Validate (..., 4) and return the quaternions normalised to unit length."""
    q = finite_array(x, name, (4,))
    # Scaled by the largest entry first: the norm of a huge quaternion overflows to inf.
    scale = np.abs(q).max(axis=-1, keepdims=True)
    scaled = q / np.where(scale > 0, scale, 1.0)
    unit_norm = np.linalg.norm(scaled, axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        if np.any(scale * unit_norm < _TINY):
            raise ValueError(f"{name}: zero quaternion cannot be normalised")
    return scaled / unit_norm


def _validated_axis_angle(x) -> np.ndarray:
    """Validate (..., 3) axis-angle whose angle can be computed (not overflowing)."""
    aa = finite_array(x, "axis_angle", (3,))
    with np.errstate(over="ignore"):
        if not np.all(np.isfinite(np.linalg.norm(aa, axis=-1))):
            raise ValueError("axis_angle: a rotation angle too large to compute")
    return aa


def _canonical(q: np.ndarray) -> np.ndarray:
    # q and −q are the same rotation; pick the one with w >= 0.
    return np.where(q[..., :1] < 0, -q, q)


# --- private cores (inputs already validated) ---------------------------------------------


def _aa_to_quat(aa: np.ndarray) -> np.ndarray:
    theta = np.linalg.norm(aa, axis=-1, keepdims=True)
    small = theta < _SMALL_ANGLE
    safe = np.where(small, 1.0, theta)
    # sin(θ/2)/θ = 1/2 − θ²/48 + θ⁴/3840 − ...
    ratio = np.where(small, 0.5 - theta**2 / 48.0 + theta**4 / 3840.0, np.sin(safe / 2) / safe)
    q = np.concatenate([np.cos(theta / 2), aa * ratio], axis=-1)
    return _canonical(q)


def _quat_to_aa(q: np.ndarray) -> np.ndarray:
    """Unit, canonical (w >= 0) quaternion to axis-angle; atan2 keeps it stable near 0 and π."""
    w = q[..., :1]
    xyz = q[..., 1:]
    n = np.linalg.norm(xyz, axis=-1, keepdims=True)
    angle = 2.0 * np.arctan2(n, w)  # in [0, π] because w >= 0
    small = n < _SMALL_ANGLE  # then w ≈ 1
    safe_n = np.where(small, 1.0, n)
    safe_w = np.where(small, w, 1.0)
    # 2·atan(n/w)/n = (2/w)(1 − (n/w)²/3 + ...)
    ratio = np.where(small, 2.0 / safe_w * (1.0 - (n / safe_w) ** 2 / 3.0), angle / safe_n)
    return xyz * ratio


def _quat_to_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = np.moveaxis(q, -1, 0)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def _matrix_to_quat(m: np.ndarray) -> np.ndarray:
    """Shepperd's method: build q from whichever of 4w², 4x², 4y², 4z² is largest."""
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    four_sq = np.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22],
        axis=-1,
    )
    # 2|q_k| for each component; the largest is >= 1, so the chosen branch never divides by ~0.
    two_abs = np.sqrt(np.maximum(four_sq, 0.0))
    candidates = (
        np.stack(
            [
                np.stack([four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01], axis=-1),
                np.stack([m21 - m12, four_sq[..., 1], m10 + m01, m02 + m20], axis=-1),
                np.stack([m02 - m20, m10 + m01, four_sq[..., 2], m12 + m21], axis=-1),
                np.stack([m10 - m01, m20 + m02, m21 + m12, four_sq[..., 3]], axis=-1),
            ],
            axis=-2,
        )
        / (2.0 * np.maximum(two_abs, 0.1))[..., None]
    )
    best = np.argmax(two_abs, axis=-1)[..., None, None]
    q = np.take_along_axis(candidates, best, axis=-2)[..., 0, :]
    # Renormalise: absorbs the small non-orthogonality allowed in input matrices.
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return _canonical(q)


def _rotation_angle(m: np.ndarray) -> np.ndarray:
    # cos θ from the trace, sin θ from the skew part; atan2 of both is accurate over [0, π].
    cos = (np.trace(m, axis1=-2, axis2=-1) - 1.0) / 2.0
    skew = np.stack(
        [m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]],
        axis=-1,
    )
    sin = np.linalg.norm(skew, axis=-1) / 2.0
    return np.arctan2(sin, cos)


# --- public API ---------------------------------------------------------------------------


def axis_angle_to_matrix(axis_angle) -> np.ndarray:
    """(..., 3) axis-angle -> (..., 3, 3) rotation matrix (Rodrigues, stable near 0)."""
    aa = _validated_axis_angle(axis_angle)
    theta = np.linalg.norm(aa, axis=-1)[..., None, None]
    small = theta < _SMALL_ANGLE
    safe = np.where(small, 1.0, theta)
    # R = I + a·K + b·K² with K the (unnormalised) cross-product matrix of aa,
    # a = sinθ/θ and b = (1 − cosθ)/θ² = 2 sin²(θ/2)/θ² (no cancellation); Taylor near 0.
    a = np.where(small, 1.0 - theta**2 / 6.0 + theta**4 / 120.0, np.sin(safe) / safe)
    b = np.where(
        small, 0.5 - theta**2 / 24.0 + theta**4 / 720.0, 2.0 * np.sin(safe / 2) ** 2 / safe**2
    )
    x, y, z = np.moveaxis(aa, -1, 0)
    zero = np.zeros_like(x)
    k = np.stack(
        [np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)],
        axis=-2,
    )
    return np.eye(3) + a * k + b * (k @ k)


def matrix_to_axis_angle(matrix) -> np.ndarray:
    """(..., 3, 3) rotation matrix -> (..., 3) axis-angle with angle in [0, π].

    Goes through a Shepperd quaternion and atan2, so it is accurate near 0 and near π
    (arccos of the trace is not).
    """
    return _quat_to_aa(_matrix_to_quat(_validated_rotation(matrix, "matrix")))


def axis_angle_to_quaternion(axis_angle) -> np.ndarray:
    """(..., 3) axis-angle -> (..., 4) unit quaternion (w, x, y, z) with w >= 0."""
    return _aa_to_quat(_validated_axis_angle(axis_angle))


def quaternion_to_axis_angle(quaternion) -> np.ndarray:
    """(..., 4) quaternion (w, x, y, z), any non-zero norm -> (..., 3) axis-angle in [0, π]."""
    q = _validated_quaternion(quaternion, "quaternion")
    return _quat_to_aa(_canonical(q))


def slerp(start, end, fraction) -> np.ndarray:
    """(..., 4) unit quaternions from `start` to `end` (..., 4) at `fraction` (0 at start, 1 at
    end; broadcast against their leading dimensions), at a constant rate along the shorter arc
    (q and −q are the one rotation); canonical, w >= 0."""
    q0 = _canonical(_validated_quaternion(start, "start"))
    q1 = _validated_quaternion(end, "end")
    t = finite_array(fraction, "fraction", ())[..., None]
    cos = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(cos < 0, -q1, q1)
    angle = np.arccos(np.clip(np.abs(cos), 0.0, 1.0))
    sin = np.sin(angle)
    near = sin < _SMALL_ANGLE  # nearly the same rotation: the straight line is as good
    safe = np.where(near, 1.0, sin)
    w0 = np.where(near, 1.0 - t, np.sin((1.0 - t) * angle) / safe)
    w1 = np.where(near, t, np.sin(t * angle) / safe)
    q = w0 * q0 + w1 * q1
    return _canonical(q / np.linalg.norm(q, axis=-1, keepdims=True))


def matrix_to_quaternion(matrix) -> np.ndarray:
    """(..., 3, 3) rotation matrix -> (..., 4) unit quaternion (w, x, y, z) with w >= 0."""
    return _matrix_to_quat(_validated_rotation(matrix, "matrix"))


def quaternion_to_matrix(quaternion) -> np.ndarray:
    """(..., 4) quaternion (w, x, y, z), any non-zero norm -> (..., 3, 3) rotation matrix."""
    return _quat_to_matrix(_validated_quaternion(quaternion, "quaternion"))


def matrix_to_rotation_6d(matrix) -> np.ndarray:
    """(..., 3, 3) rotation matrix -> (..., 6) = [R[:, 0], R[:, 1]] (HMR2 / ChatPose layout)."""
    m = _validated_rotation(matrix, "matrix")
    return np.concatenate([m[..., :, 0], m[..., :, 1]], axis=-1)


def rotation_6d_to_matrix(rot6d) -> np.ndarray:
    """(..., 6) = [first column, second column] -> (..., 3, 3) by Gram-Schmidt.

    The columns need not be unit or orthogonal (network output), but they must be non-zero and
    not collinear.
    """
    x = finite_array(rot6d, "rot6d", (6,))
    a1, a2 = _rescaled(x[..., :3]), _rescaled(x[..., 3:])
    n1 = np.linalg.norm(a1, axis=-1, keepdims=True)
    n2 = np.linalg.norm(a2, axis=-1, keepdims=True)
    if np.any(n1 < _TINY) or np.any(n2 < _TINY):
        raise ValueError("rot6d: degenerate 6D rotation (a zero column)")
    b1 = a1 / n1
    u2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    nu2 = np.linalg.norm(u2, axis=-1, keepdims=True)
    if np.any(nu2 < _COLLINEAR * n2):
        raise ValueError("rot6d: degenerate 6D rotation (the two columns are collinear)")
    b2 = u2 / nu2
    b3 = np.cross(b1, b2)
    return np.stack([b1, b2, b3], axis=-1)


def _rescaled(columns: np.ndarray) -> np.ndarray:
    """Columns divided by their largest entry: same directions, and norms that cannot overflow
    (a column of 1e200 would square to inf)."""
    largest = np.abs(columns).max(axis=-1, keepdims=True)
    return columns / np.where(largest > 0, largest, 1.0)


def rotation_angle(matrix) -> np.ndarray:
    """(..., 3, 3) rotation matrix -> (...) rotation angle in radians, in [0, π]."""
    return _rotation_angle(_validated_rotation(matrix, "matrix"))


def geodesic_distance(matrix_a, matrix_b) -> np.ndarray:
    """Geodesic distance (radians, in [0, π]) between rotations: the angle of Aᵀ·B.

    The leading dimensions of the two arguments broadcast against each other.
    """
    a = _validated_rotation(matrix_a, "matrix_a")
    b = _validated_rotation(matrix_b, "matrix_b")
    try:
        rel = np.swapaxes(a, -1, -2) @ b
    except ValueError as exc:
        raise ValueError(
            f"matrix_a, matrix_b: batch shapes {a.shape[:-2]} and {b.shape[:-2]} do not broadcast"
        ) from exc
    return _rotation_angle(rel)
