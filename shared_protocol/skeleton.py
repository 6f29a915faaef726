"""The SMPL body skeleton (24 joints), a built-in approximate rest pose, and forward kinematics.

numpy only (this module runs inside Blender's Python).

Frame: the SMPL body frame, +Y up, +Z the direction the body faces, +X the body's own left,
metres. A pose is (..., 24, 3) axis-angle: index 0 the global orientation, 1..23 the local
rotation of each joint relative to its parent.

The exact rest joints of a body come from the user's SMPL model file (``J_regressor @ v_template``);
``REST_OFFSETS`` is a public approximate set (probably the average male body) used without one.
"""

from __future__ import annotations

import numpy as np

from .arrays import finite_array
from .rotations import axis_angle_to_matrix

__all__ = [
    "DEFAULT_REST_JOINTS",
    "JOINT_NAMES",
    "NUM_JOINTS",
    "PARENTS",
    "REST_OFFSETS",
    "SMPL_TO_BLENDER",
    "forward_kinematics",
    "joint_index",
    "offsets_from_rest_joints",
    "rest_joints_from_offsets",
    "smpl_to_blender",
]

JOINT_NAMES: tuple[str, ...] = (
    "pelvis",
    "left_hip",
    "right_hip",
    "spine1",
    "left_knee",
    "right_knee",
    "spine2",
    "left_ankle",
    "right_ankle",
    "spine3",
    "left_foot",
    "right_foot",
    "neck",
    "left_collar",
    "right_collar",
    "head",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hand",
    "right_hand",
)

# Parent of each joint; every parent comes before its children, so one pass in index order works.
PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21,
)  # fmt: skip

NUM_JOINTS = 24

_INDEX = {name: i for i, name in enumerate(JOINT_NAMES)}


def joint_index(name: str) -> int:
    """Index of an SMPL joint by its smplx name, e.g. ``joint_index("left_wrist") == 20``."""
    try:
        return _INDEX[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown joint name {name!r}; valid names: {', '.join(JOINT_NAMES)}"
        ) from None


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# Each joint relative to its parent (metres, SMPL frame); the pelvis row is its own position.
REST_OFFSETS: np.ndarray = _read_only(
    np.array(
        [
            [0.0, 0.0, 0.0],
            [0.05858135, -0.08228004, -0.01766408],
            [-0.06030973, -0.09051332, -0.01354254],
            [0.00443945, 0.12440352, -0.03838522],
            [0.04345142, -0.38646945, 0.008037],
            [-0.04325663, -0.38368791, -0.00484304],
            [0.00448844, 0.1379564, 0.02682033],
            [-0.01479032, -0.42687458, -0.037428],
            [0.01905555, -0.4200455, -0.03456167],
            [-0.00226458, 0.05603239, 0.00285505],
            [0.04105436, -0.06028581, 0.12204243],
            [-0.03483987, -0.06210566, 0.13032329],
            [-0.0133902, 0.21163553, -0.03346758],
            [0.07170245, 0.11399969, -0.01889817],
            [-0.08295366, 0.11247234, -0.02370739],
            [0.01011321, 0.08893734, 0.05040987],
            [0.12292141, 0.04520509, -0.019046],
            [-0.11322832, 0.04685326, -0.00847207],
            [0.2553319, -0.01564902, -0.02294649],
            [-0.26012748, -0.01436928, -0.03126873],
            [0.26570925, 0.01269811, -0.00737473],
            [-0.26910836, 0.00679372, -0.00602676],
            [0.08669055, -0.01063603, -0.01559429],
            [-0.0887537, -0.00865157, -0.01010708],
        ],
        dtype=np.float64,
    )
)


def rest_joints_from_offsets(offsets) -> np.ndarray:
    """(..., 24, 3) parent-relative offsets -> (..., 24, 3) joint positions (summed along the tree).

    The pelvis offset is taken as the pelvis position.
    """
    off = finite_array(offsets, "offsets", (NUM_JOINTS, 3))
    joints = off.copy()
    for i in range(1, NUM_JOINTS):
        joints[..., i, :] += joints[..., PARENTS[i], :]
    return joints


def offsets_from_rest_joints(rest_joints) -> np.ndarray:
    """(..., 24, 3) joint positions -> (..., 24, 3) offsets from each joint's parent.

    The inverse of ``rest_joints_from_offsets`` (the pelvis row is kept as is).
    """
    joints = finite_array(rest_joints, "rest_joints", (NUM_JOINTS, 3))
    off = joints.copy()
    off[..., 1:, :] -= joints[..., PARENTS[1:], :]
    return off


# Rest joint positions of the built-in skeleton, pelvis at the origin.
DEFAULT_REST_JOINTS: np.ndarray = _read_only(rest_joints_from_offsets(REST_OFFSETS))


def forward_kinematics(
    axis_angle, rest_joints=None, translation=None
) -> tuple[np.ndarray, np.ndarray]:
    """Posed joint positions and world rotations of the SMPL skeleton.

    axis_angle: (..., 24, 3); index 0 the global orientation, the rest local to the parent.
    rest_joints: (24, 3) or (..., 24, 3) broadcastable against the batch; default
        ``DEFAULT_REST_JOINTS``.
    translation: (..., 3) added to the pelvis (and so to every joint), or None.

    Returns ``(positions (..., 24, 3), world_rotations (..., 24, 3, 3))`` where ``...`` is the
    broadcast of the three batch shapes. With G the world rotation and p the position:
    G_i = G_parent · R_i, p_i = p_parent + G_parent · (rest_i − rest_parent), p_0 = rest_0 + t.
    """
    aa = finite_array(axis_angle, "axis_angle", (NUM_JOINTS, 3))
    rest = (
        DEFAULT_REST_JOINTS
        if rest_joints is None
        else finite_array(rest_joints, "rest_joints", (NUM_JOINTS, 3))
    )
    trans = np.zeros(3) if translation is None else finite_array(translation, "translation", (3,))
    try:
        batch = np.broadcast_shapes(aa.shape[:-2], rest.shape[:-2], trans.shape[:-1])
    except ValueError:
        raise ValueError(
            f"axis_angle, rest_joints, translation: batch shapes {aa.shape[:-2]}, "
            f"{rest.shape[:-2]} and {trans.shape[:-1]} do not broadcast"
        ) from None

    local = np.broadcast_to(axis_angle_to_matrix(aa), (*batch, NUM_JOINTS, 3, 3))
    offsets = np.broadcast_to(offsets_from_rest_joints(rest), (*batch, NUM_JOINTS, 3))

    rotations = np.empty((*batch, NUM_JOINTS, 3, 3))
    positions = np.empty((*batch, NUM_JOINTS, 3))
    rotations[..., 0, :, :] = local[..., 0, :, :]
    positions[..., 0, :] = offsets[..., 0, :] + trans
    for i in range(1, NUM_JOINTS):  # parents come first, so they are already filled in
        parent_rot = rotations[..., PARENTS[i], :, :]
        rotations[..., i, :, :] = parent_rot @ local[..., i, :, :]
        positions[..., i, :] = (
            positions[..., PARENTS[i], :] + (parent_rot @ offsets[..., i, :, None])[..., 0]
        )
    return positions, rotations


# SMPL (Y-up) to Blender (Z-up): (x, y, z) -> (x, −z, y), applied as ``SMPL_TO_BLENDER @ p``.
SMPL_TO_BLENDER: np.ndarray = _read_only(
    np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
)


def smpl_to_blender(points) -> np.ndarray:
    """(..., 3) points in the SMPL frame (Y-up) -> (..., 3) in Blender's frame (Z-up)."""
    p = finite_array(points, "points", (3,))
    return p @ SMPL_TO_BLENDER.T
