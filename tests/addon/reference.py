"""The tests' reference for where a pose puts the pose bones' heads (no bpy: the Blender-free
tests use it too, and helpers.py for the bpy ones)."""

from __future__ import annotations

import numpy as np

from shared_protocol.skeleton import SMPL_TO_BLENDER, forward_kinematics


def expected_heads(axis_angle, rest_joints=None, translation=None, matrix_world=None):
    """Where the pose bones' heads must be, in Blender world space, for an SMPL pose.

    Forward kinematics in the SMPL frame, mapped to armature space with C, then through the
    armature object's 4x4 ``matrix_world`` when given. (..., 24, 3).
    """
    positions, _ = forward_kinematics(axis_angle, rest_joints, translation)
    heads = positions @ SMPL_TO_BLENDER.T
    if matrix_world is not None:
        m = np.asarray(matrix_world, dtype=np.float64)
        heads = heads @ m[:3, :3].T + m[:3, 3]
    return heads
