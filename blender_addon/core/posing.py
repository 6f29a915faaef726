"""SMPL pose values <-> pose-bone values, for any bone rest orientation.

With C = ``SMPL_TO_BLENDER`` (SMPL axes to armature axes) and B the bone's rest rotation in
armature space (``bone.matrix_local``), the pose-bone rotation that reproduces the SMPL local
rotation R is

    R_bone = B⁻¹ · C · R · C⁻¹ · B

and the root's translation t (SMPL frame, metres) is the pose-bone location u · L⁻¹ · C · t,
where u is the armature's units per metre (``rig_spec.units_per_metre``) and L is
the rotation of the frame Blender reads the root's location in (``location_frame``): the
root's own rest B (bone-local location, Blender's default), or with ``use_local_location``
off its parent's rest, or the armature's axes when it has no parent. For the rig that
``rig_spec.smpl_bone_specs`` builds, B = C for every bone, so R_bone = R and the location is t:
the SMPL values go onto the bones unchanged. Passing ``bone_rest=None`` means that rig.

Quaternions are (w, x, y, z) as in Blender. Every function is batched over leading dimensions.
"""

from __future__ import annotations

import math

import numpy as np

from shared_protocol.rotations import (
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    matrix_to_quaternion,
    quaternion_to_matrix,
)
from shared_protocol.skeleton import NUM_JOINTS, SMPL_TO_BLENDER

from .mannequin import lowest_point
from .rig_spec import SMPL_BONE_REST

_C = SMPL_TO_BLENDER


def _rest(bone_rest) -> np.ndarray:
    if bone_rest is None:
        return np.broadcast_to(SMPL_BONE_REST, (NUM_JOINTS, 3, 3))
    b = np.asarray(bone_rest, dtype=np.float64)
    if b.shape[-3:] != (NUM_JOINTS, 3, 3):
        raise ValueError(f"bone_rest: expected shape (..., 24, 3, 3), got {b.shape}")
    return b


def _orthonormal(b: np.ndarray) -> np.ndarray:
    """The nearest rotation (Blender stores rest matrices in float32)."""
    u, _, vt = np.linalg.svd(b)
    return u @ vt


def bone_rotation_matrices(axis_angle, bone_rest=None) -> np.ndarray:
    """(..., 24, 3) SMPL axis-angle -> (..., 24, 3, 3) pose-bone rotation matrices."""
    r = axis_angle_to_matrix(axis_angle)
    if r.shape[-3:] != (NUM_JOINTS, 3, 3):
        raise ValueError(f"axis_angle: expected shape (..., 24, 3), got {np.shape(axis_angle)}")
    if bone_rest is None:
        return r
    b = _orthonormal(_rest(bone_rest))
    bt = np.swapaxes(b, -1, -2)
    return bt @ _C @ r @ _C.T @ b


def bone_quaternions(axis_angle, bone_rest=None) -> np.ndarray:
    """(..., 24, 3) SMPL axis-angle -> (..., 24, 4) pose-bone quaternions (w, x, y, z), w >= 0."""
    return matrix_to_quaternion(bone_rotation_matrices(axis_angle, bone_rest))


def axis_angle_from_bone_quaternions(quaternions, bone_rest=None) -> np.ndarray:
    """The inverse of ``bone_quaternions``: (..., 24, 4) -> (..., 24, 3) SMPL axis-angle."""
    m = quaternion_to_matrix(quaternions)
    if m.shape[-3:] != (NUM_JOINTS, 3, 3):
        raise ValueError(f"quaternions: expected shape (..., 24, 4), got {np.shape(quaternions)}")
    if bone_rest is not None:
        b = _orthonormal(_rest(bone_rest))
        m = _C.T @ b @ m @ np.swapaxes(b, -1, -2) @ _C
    return matrix_to_axis_angle(m)


def root_location(translation, location_frame=None, units_per_metre: float = 1.0) -> np.ndarray:
    """(..., 3) SMPL translation (metres) -> the root pose bone's ``location``.
    ``location_frame``: L above, (3, 3); None means the rig ``rig_spec`` builds."""
    armature = np.asarray(translation, dtype=np.float64) @ _C.T * units_per_metre
    return armature @ _location_frame(location_frame)  # L⁻¹ · v for each row v


def translation_from_root_location(
    location, location_frame=None, units_per_metre: float = 1.0
) -> np.ndarray:
    """The inverse of ``root_location``."""
    loc = np.asarray(location, dtype=np.float64) / units_per_metre
    return loc @ _location_frame(location_frame).T @ _C


def _location_frame(location_frame) -> np.ndarray:
    if location_frame is None:
        return SMPL_BONE_REST
    return _orthonormal(np.asarray(location_frame, dtype=np.float64))


def floor_translation(axis_angle, rest_joints=None, translation=None) -> np.ndarray:
    """(..., 24, 3) SMPL axis-angle -> (..., 3) translations (SMPL frame, metres) that keep a
    posed body on the floor it stands on at rest: the pelvis's height set so that the body's
    lowest point is as high as at rest, its soles. Its place across the floor is
    ``translation``'s (..., 3), whose height is replaced (None: the pelvis's rest place). The
    model's poses carry no translation, so a kneeling or sitting answer would float at
    standing height. The body is the mannequin's (``mannequin.lowest_point``): a body lying
    on its back rests on its back, not on its spine's joints."""
    zero = np.zeros((NUM_JOINTS, 3))
    height = lowest_point(zero, rest_joints) - lowest_point(axis_angle, rest_joints)
    across = np.zeros(3) if translation is None else np.asarray(translation, dtype=np.float64)
    placed = np.array(
        np.broadcast_to(across, (*np.broadcast_shapes(height.shape, across.shape[:-1]), 3))
    )
    placed[..., 1] = height
    return placed


def continuous_quaternions(quaternions, start=None) -> np.ndarray:
    """(N, ..., 4) quaternions with signs flipped so that each is on the same side as the one
    before it (``start`` before the first), so keys interpolate the short way."""
    q = np.array(quaternions, dtype=np.float64)
    if q.shape[0] == 0:
        return q
    prev = np.asarray(start, dtype=np.float64) if start is not None else q[0]
    signs = np.empty(q.shape[:-1])
    signs[0] = np.where(np.sum(q[0] * prev, axis=-1) < 0, -1.0, 1.0)
    if q.shape[0] > 1:
        steps = np.where(np.sum(q[1:] * q[:-1], axis=-1) < 0, -1.0, 1.0)
        signs[1:] = signs[0] * np.cumprod(steps, axis=0)
    return q * signs[..., None]


# An angle past which the turns it holds are taken off before following it (a bone turned by
# hand a thousand turns round).
_MANY_TURNS = 1e4


def continuous_axis_angles(vectors, start) -> np.ndarray:
    """(N, 3) rotation vectors in time order -> (N, 4) (angle, x, y, z) channel values of an
    AXIS_ANGLE bone, each written in the one of its equivalent forms (the axis either way, the
    angle whole turns on or back) that follows the values before it (``start`` before the
    first): the axis on the same side as before, then the angle nearest. Blender interpolates
    each channel on its own, and an axis that flips between keys swings the bone through
    another rotation half way. No rotation keeps the axis it had."""
    vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)
    values = np.empty((len(vectors), 4))
    previous = np.asarray(start, dtype=np.float64)
    for n, vector in enumerate(vectors):
        values[n] = previous = _axis_angle_after(vector, previous)
    return values


def _axis_angle_after(vector: np.ndarray, previous: np.ndarray) -> np.ndarray:
    if abs(previous[0]) > _MANY_TURNS:  # whole turns off first: float sums lose the rest
        previous = np.array([math.remainder(previous[0], 2 * np.pi), *previous[1:]])
    angle = float(np.linalg.norm(vector))
    if angle == 0.0:
        return np.array([_nearest_turn(0.0, previous[0]), *previous[1:]])
    # Before no rotation (a whole number of turns), either side of the axis will do.
    was_turning = abs(np.sin(previous[0] / 2)) > 1e-9 and bool(np.any(previous[1:]))
    best = None
    for sign in (1.0, -1.0):
        axis = sign * vector / angle
        turned = _nearest_turn(sign * angle, previous[0])
        cost = (was_turning and float(axis @ previous[1:]) < 0, abs(turned - previous[0]))
        if best is None or cost < best[0]:
            best = (cost, np.array([turned, *axis]))
    return best[1]


def _nearest_turn(angle: float, reference: float) -> float:
    """`angle` plus the whole number of turns that brings it nearest `reference`."""
    return angle + 2 * np.pi * np.round((reference - angle) / (2 * np.pi))
