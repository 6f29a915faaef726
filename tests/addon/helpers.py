"""Shared helpers of the bpy tests: random poses and the forward-kinematics check."""

from __future__ import annotations

import bpy
import numpy as np
from mathutils import Euler, Matrix

from blender_addon.core.posing import expected_heads
from shared_protocol.pose import Pose
from shared_protocol.skeleton import JOINT_NAMES

FK_TOLERANCE = 1e-4  # metres


def random_pose(seed: int, max_angle: float = np.pi / 2, translation: bool = True) -> Pose:
    """Random axes, angles up to ``max_angle`` on every joint; a random root translation."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(24, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    aa = axes * rng.uniform(0, max_angle, size=(24, 1))
    return Pose(aa, rng.normal(size=3) * 0.5 if translation else None)


def world_heads(obj) -> np.ndarray:
    """(24, 3) pose-bone heads in world space, in SMPL joint order."""
    bpy.context.view_layer.update()
    return np.array([tuple(obj.matrix_world @ obj.pose.bones[n].head) for n in JOINT_NAMES])


def fk_error(obj, pose: Pose, rest=None) -> float:
    """Max distance (m) between the bone heads and the pose's forward kinematics, in world space."""
    bpy.context.view_layer.update()  # matrix_world too
    expected = expected_heads(pose.axis_angle, rest, pose.translation, np.array(obj.matrix_world))
    return float(np.abs(world_heads(obj) - expected).max())


def transform(obj) -> None:
    """Rotated, uniformly scaled and moved."""
    obj.matrix_world = Matrix.LocRotScale((1.5, -2.0, 0.7), Euler((0.4, -0.3, 2.1)), (1.8,) * 3)
