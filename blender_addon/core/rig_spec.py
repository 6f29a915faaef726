"""The SMPL armature as plain data: bone names, parents, heads, tails and rolls.

Bone orientation (the choice the whole add-on rests on): every bone's head is its SMPL joint
mapped to Blender with (x, y, z) -> (x, -z, y), and its tail is a short step along armature +Z
with zero roll. Blender then gives every bone the rest rotation ``SMPL_TO_BLENDER`` in armature
space (see ``bone_rest_matrix``), so each bone's local X, Y, Z axes are SMPL's X, Y, Z and an
SMPL local axis-angle is the pose bone's rotation unchanged. ``core.posing`` still handles any
other bone orientation (an imported rig whose bones follow the limbs) with
R_bone = B_rest⁻¹ · C · R_smpl · C⁻¹ · B_rest.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from shared_protocol.rotations import axis_angle_to_matrix
from shared_protocol.skeleton import (
    DEFAULT_REST_JOINTS,
    JOINT_NAMES,
    NUM_JOINTS,
    PARENTS,
    SMPL_TO_BLENDER,
    smpl_to_blender,
)

# Length of every bone (metres): the step from head to tail along armature +Z.
BONE_LENGTH = 0.06
# Custom property on the armature data that marks a rig made by this add-on (its value: the
# rig format version).
RIG_PROPERTY = "chatpose_rig"
RIG_VERSION = 1
# The rest rotation, in armature space, of every bone that ``smpl_bone_specs`` builds.
SMPL_BONE_REST = SMPL_TO_BLENDER

# The names SMPL's bones go by in other rigs, in SMPL joint order: the SMPL add-on for Blender
# and SMPL's own joint names, and the SMPL FBX files (male and female templates).
SMPL_CAPITALISED_NAMES: tuple[str, ...] = (
    *("Pelvis", "L_Hip", "R_Hip", "Spine1", "L_Knee", "R_Knee", "Spine2", "L_Ankle"),
    *("R_Ankle", "Spine3", "L_Foot", "R_Foot", "Neck", "L_Collar", "R_Collar", "Head"),
    *("L_Shoulder", "R_Shoulder", "L_Elbow", "R_Elbow", "L_Wrist", "R_Wrist", "L_Hand", "R_Hand"),
)
BONE_NAMINGS: tuple[tuple[str, ...], ...] = (
    JOINT_NAMES,
    SMPL_CAPITALISED_NAMES,
    tuple(f"m_avg_{name}" for name in SMPL_CAPITALISED_NAMES),
    tuple(f"f_avg_{name}" for name in SMPL_CAPITALISED_NAMES),
)


# SMPL's two hand bones (joints 22 and 23): SMPL-H and SMPL-X rigs (the SMPL-X add-on for
# Blender) have SMPL's other 22 bones, under the same names, and fingers in their place.
HAND_JOINTS = (22, 23)
_BODY = NUM_JOINTS - len(HAND_JOINTS)


def smpl_bone_names(bone_names: Collection[str]) -> tuple[str | None, ...] | None:
    """The rig's names for the 24 SMPL bones, in SMPL joint order (the first naming of
    ``BONE_NAMINGS`` it has in full, maybe behind a namespace such as ``SMPL:``, which FBX
    files carry), or None. A rig with the 22 body bones of a naming but without its hands
    (SMPL-H, SMPL-X) has None for them: its hands are not posed."""
    present = set(bone_names)
    for prefix in _namespaces(present):
        for naming in BONE_NAMINGS:
            if present.issuperset(prefix + name for name in naming):
                return tuple(prefix + name for name in naming)
        for naming in BONE_NAMINGS:
            if present.issuperset(prefix + name for name in naming[:_BODY]):
                body = tuple(prefix + name for name in naming[:_BODY])
                return (*body, *(None,) * len(HAND_JOINTS))
    return None


def _namespaces(names: set[str]) -> list[str]:
    """The empty namespace, and each one the names have ("SMPL:" of "SMPL:m_avg_Pelvis")."""
    return ["", *sorted({name[: name.rindex(":") + 1] for name in names if ":" in name})]


def hand_heads(heads) -> np.ndarray:
    """(24, 3) rest bone heads with the hands of a rig that has none (NaN rows) put where SMPL
    has them: past the wrist, along the forearm, as far as SMPL's hand is from its wrist for
    that forearm's length. Rest joints need all 24 (the floor, forward kinematics)."""
    h = np.array(heads, dtype=np.float64)
    for hand in HAND_JOINTS:
        if np.isnan(h[hand]).any():
            wrist = PARENTS[hand]
            elbow = PARENTS[wrist]
            ratio = np.linalg.norm(
                DEFAULT_REST_JOINTS[hand] - DEFAULT_REST_JOINTS[wrist]
            ) / np.linalg.norm(DEFAULT_REST_JOINTS[wrist] - DEFAULT_REST_JOINTS[elbow])
            h[hand] = h[wrist] + (h[wrist] - h[elbow]) * ratio
    return h


def missing_smpl_bones(bone_names: Collection[str]) -> list[str]:
    """The SMPL body bones a rig lacks, named as in the naming it comes closest to (for a
    message; the hands are not needed: ``smpl_bone_names``)."""
    present = set(bone_names)
    namings = [
        tuple(prefix + name for name in naming)
        for prefix in _namespaces(present)
        for naming in BONE_NAMINGS
    ]
    closest = max(namings, key=lambda naming: len(present.intersection(naming)))
    return [name for name in closest[:_BODY] if name not in present]


@dataclass(frozen=True)
class BoneSpec:
    """One bone: head and tail in armature space (Blender frame, metres), roll in radians."""

    name: str
    parent: str | None
    head: tuple[float, float, float]
    tail: tuple[float, float, float]
    roll: float = 0.0


def smpl_bone_specs(rest_joints=None, length: float = BONE_LENGTH) -> tuple[BoneSpec, ...]:
    """The 24 bones in SMPL joint order; parents come before their children.

    rest_joints: (24, 3) rest joint positions in the SMPL frame (default ``DEFAULT_REST_JOINTS``).
    """
    if not length > 0:
        raise ValueError(f"length: expected a positive bone length, got {length}")
    joints = DEFAULT_REST_JOINTS if rest_joints is None else np.asarray(rest_joints, float)
    if joints.shape != (NUM_JOINTS, 3):
        raise ValueError(f"rest_joints: expected shape (24, 3), got {joints.shape}")
    if not np.all(np.isfinite(joints)):
        raise ValueError("rest_joints: contains NaN or inf")
    heads = smpl_to_blender(joints)
    specs = []
    for i, name in enumerate(JOINT_NAMES):
        head = tuple(float(v) for v in heads[i])
        tail = (head[0], head[1], head[2] + length)
        parent = None if PARENTS[i] < 0 else JOINT_NAMES[PARENTS[i]]
        specs.append(BoneSpec(name, parent, head, tail, 0.0))
    return tuple(specs)


def armature_axes(heads) -> np.ndarray:
    """C: SMPL's X, Y, Z axes in armature space (as columns), read off a rig's 24 rest bone
    heads: up from the pelvis to the head, the body's left from the right hip to the left one,
    each snapped to the nearest armature axis. ``SMPL_TO_BLENDER`` for a Z-up rig (this
    add-on's own), the identity for one whose armature data is Y-up and whose object is turned
    upright (as Blender's FBX importer leaves an SMPL FBX)."""
    h = np.asarray(heads, dtype=np.float64)
    up = h[JOINT_NAMES.index("head")] - h[0]
    left = h[JOINT_NAMES.index("left_hip")] - h[JOINT_NAMES.index("right_hip")]
    x, y = _nearest_axis(left), _nearest_axis(up)
    if x @ y != 0:  # not an upright body: keep the add-on's own convention
        return SMPL_TO_BLENDER
    return np.stack([x, y, np.cross(x, y)], axis=1)


def _nearest_axis(v: np.ndarray) -> np.ndarray:
    axis = np.zeros(3)
    i = int(np.argmax(np.abs(v)))
    axis[i] = np.sign(v[i]) or 1.0
    return axis


def rest_joints_from_heads(heads) -> np.ndarray:
    """(24, 3) bone heads in armature space -> rest joints in the SMPL frame, in metres."""
    h = np.asarray(heads, dtype=np.float64)
    return h @ armature_axes(h) / units_per_metre(h)  # p @ C.T inverted, C being a rotation


def units_per_metre(heads) -> float:
    """How many armature units make a metre, read off a rig's 24 rest bone heads: the power of
    ten that brings its skeleton nearest to SMPL's size. A rig built in centimetres (as other
    tools' FBX files are, shown at object scale 0.01) has 100; the SMPL skeleton of any body,
    a child's or a tall one's, in metres has 1. Translations in metres are scaled by it."""
    size = _spread(np.asarray(heads, dtype=np.float64))
    if not size > 0:  # every head in one place: no size to read
        return 1.0
    return float(10.0 ** round(np.log10(size / _spread(DEFAULT_REST_JOINTS))))


def _spread(points: np.ndarray) -> float:
    return float(np.linalg.norm(points - points.mean(axis=0), axis=1).mean())


def bone_rest_matrix(head, tail, roll: float = 0.0) -> np.ndarray:
    """The 3x3 rest rotation Blender gives a bone (its ``matrix_local`` rotation part).

    A numpy port of Blender's ``vec_roll_to_mat3_normalized``: the bone's Y axis points from
    head to tail, the other two follow by the smallest rotation from +Y, then ``roll`` turns
    them about Y. Columns are the bone's local X, Y, Z axes in armature space.
    """
    vec = np.asarray(tail, float) - np.asarray(head, float)
    norm = np.linalg.norm(vec)
    if not norm > 0:
        raise ValueError("head and tail coincide: a bone needs a length")
    x, y, z = vec / norm
    theta = 1.0 + y
    theta_alt = x * x + z * z
    safe, critical = 6.1e-3, 2.5e-4  # Blender's SAFE_THRESHOLD and CRITICAL_THRESHOLD
    if theta > safe or theta_alt > critical * critical:
        if theta <= safe:  # close to -Y: a series that stays accurate there
            theta = theta_alt * 0.5 + theta_alt * theta_alt * 0.125
        b = np.array(
            [
                [1 - x * x / theta, x, -x * z / theta],
                [-x, y, -z],
                [-x * z / theta, z, 1 - z * z / theta],
            ]
        )
    else:  # pointing exactly along -Y
        b = np.diag([-1.0, -1.0, 1.0])
    return axis_angle_to_matrix(np.array([x, y, z]) * roll) @ b
