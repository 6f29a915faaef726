"""A simple mannequin mesh for the SMPL armature: one capsule per limb segment, rigidly skinned.

Without the licensed SMPL model there is no body mesh to ship, so the rig gets capsules: one
from each joint to each of its children (skinned to the joint's bone, which is the bone that
turns that segment), a sphere for the head, short capsules for hands and feet. Geometry is in
armature space (Blender frame, Z up), built from the bone heads.

The limbs are coloured by part, the body's left side in warm colours and its right side in cool
ones, so that left and right, and each limb's segments, can be told apart at a glance: the body
has no face and is otherwise symmetric. The viewport's solid mode and the add-on's snapshots
(Workbench, material colours) show them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared_protocol.pose import SOLE_DEPTH
from shared_protocol.skeleton import (
    DEFAULT_REST_JOINTS,
    JOINT_NAMES,
    NUM_JOINTS,
    PARENTS,
    SMPL_TO_BLENDER,
    forward_kinematics,
)

# Radius (metres) of the segment from a joint to its children, by joint.
SEGMENT_RADIUS = {
    "pelvis": 0.075,
    "left_hip": 0.065,
    "right_hip": 0.065,
    "spine1": 0.085,
    "left_knee": 0.05,
    "right_knee": 0.05,
    "spine2": 0.09,
    "left_ankle": SOLE_DEPTH,  # the segment to the foot joint: the sole, as AMASS's floor has it
    "right_ankle": SOLE_DEPTH,
    "spine3": 0.055,
    "neck": 0.045,
    "left_collar": 0.045,
    "right_collar": 0.045,
    "left_shoulder": 0.045,
    "right_shoulder": 0.045,
    "left_elbow": 0.037,
    "right_elbow": 0.037,
    "left_wrist": 0.03,
    "right_wrist": 0.03,
}
HEAD_RADIUS = 0.1
HEAD_LIFT = 0.09  # the head sphere's centre above the head joint
HAND_LENGTH, HAND_RADIUS = 0.08, 0.03
FOOT_LENGTH, FOOT_RADIUS = 0.05, 0.035


@dataclass(frozen=True)
class Part:
    """A coloured part of the mannequin: the bones whose segments it is made of, and its colour
    (linear RGB, what Blender's material viewport colour takes)."""

    name: str
    colour: tuple[float, float, float]
    bones: tuple[str, ...]


PARTS = (
    Part("torso", (0.55, 0.55, 0.55), ("pelvis", "spine1", "spine2", "spine3", "neck")),
    Part("head", (0.80, 0.70, 0.60), ("head",)),
    Part("left upper arm", (0.80, 0.10, 0.08), ("left_collar", "left_shoulder")),
    Part("left forearm", (0.90, 0.45, 0.05), ("left_elbow",)),
    Part("left hand", (0.90, 0.80, 0.10), ("left_wrist", "left_hand")),
    Part("left thigh", (0.60, 0.05, 0.35), ("left_hip",)),
    Part("left shin", (0.85, 0.30, 0.55), ("left_knee",)),
    Part("left foot", (0.45, 0.15, 0.05), ("left_ankle", "left_foot")),
    Part("right upper arm", (0.05, 0.20, 0.85), ("right_collar", "right_shoulder")),
    Part("right forearm", (0.05, 0.60, 0.85), ("right_elbow",)),
    Part("right hand", (0.30, 0.85, 0.80), ("right_wrist", "right_hand")),
    Part("right thigh", (0.05, 0.50, 0.15), ("right_hip",)),
    Part("right shin", (0.40, 0.80, 0.15), ("right_knee",)),
    Part("right foot", (0.05, 0.30, 0.30), ("right_ankle", "right_foot")),
)
PART_OF_BONE = {bone: index for index, part in enumerate(PARTS) for bone in part.bones}


@dataclass(frozen=True)
class MeshData:
    """Vertices (V, 3), faces (tuples of vertex indices), skin weights (V, 24) and each face's
    part (F,), an index into `PARTS`."""

    vertices: np.ndarray
    faces: list[tuple[int, ...]]
    weights: np.ndarray
    face_parts: np.ndarray


def capsule(p0, p1, radius: float, segments: int = 12, rings: int = 4):
    """Vertices and faces of a capsule around the segment p0-p1 (a sphere when they coincide)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    axis = p1 - p0
    length = np.linalg.norm(axis)
    w = axis / length if length > 1e-9 else np.array([0.0, 0.0, 1.0])
    helper = np.array([1.0, 0.0, 0.0]) if abs(w[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(w, helper)
    u /= np.linalg.norm(u)
    v = np.cross(w, u)
    around = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    circle = np.cos(around)[:, None] * u + np.sin(around)[:, None] * v  # (segments, 3)

    verts = [p0 - radius * w]  # bottom pole
    ring_list = []
    # Bottom hemisphere from the pole up to the equator at p0, then the top one from p1.
    for k in range(1, rings + 1):
        phi = -np.pi / 2 + k * (np.pi / 2) / rings
        ring_list.append(p0 + radius * (np.sin(phi) * w) + radius * np.cos(phi) * circle)
    for k in range(0, rings):
        phi = k * (np.pi / 2) / rings
        ring_list.append(p1 + radius * (np.sin(phi) * w) + radius * np.cos(phi) * circle)
    for ring in ring_list:
        verts.extend(ring)
    verts.append(p1 + radius * w)  # top pole
    verts = np.array(verts)

    n_rings = len(ring_list)
    top = len(verts) - 1

    def idx(r: int, s: int) -> int:
        return 1 + r * segments + (s % segments)

    faces = [(0, idx(0, s + 1), idx(0, s)) for s in range(segments)]
    for r in range(n_rings - 1):
        for s in range(segments):
            faces.append((idx(r, s), idx(r, s + 1), idx(r + 1, s + 1), idx(r + 1, s)))
    faces += [(idx(n_rings - 1, s), idx(n_rings - 1, s + 1), top) for s in range(segments)]
    return verts, faces


def _pieces(heads: np.ndarray):
    """(bone index, p0, p1, radius) for every capsule of the mannequin."""
    children = {i: [c for c in range(NUM_JOINTS) if PARENTS[c] == i] for i in range(NUM_JOINTS)}
    up = np.array([0.0, 0.0, 1.0])
    for i, name in enumerate(JOINT_NAMES):
        head = heads[i]
        if children[i]:
            for c in children[i]:
                yield i, head, heads[c], SEGMENT_RADIUS[name]
        elif name == "head":
            centre = head + HEAD_LIFT * up
            yield i, centre, centre, HEAD_RADIUS
        else:  # hands and feet: a short piece further along the parent -> joint direction
            d = head - heads[PARENTS[i]]
            if name.endswith("foot"):
                d[2] = 0.0  # feet point forward, along the floor
            d /= np.linalg.norm(d)
            length, radius = (
                (FOOT_LENGTH, FOOT_RADIUS) if name.endswith("foot") else (HAND_LENGTH, HAND_RADIUS)
            )
            yield i, head, head + length * d, radius


def lowest_point(axis_angle, rest_joints=None) -> np.ndarray:
    """(..., 24, 3) SMPL axis-angle -> (...) the height (SMPL frame, metres) of the posed
    mannequin's lowest point, for a body with ``rest_joints`` (24, 3) (None: the built-in
    skeleton's) at the origin: each capsule turned and moved with its bone, as the mesh is
    skinned, its lowest point its lower end less its radius. At rest, the soles."""
    rest = DEFAULT_REST_JOINTS if rest_joints is None else np.asarray(rest_joints, np.float64)
    pieces = list(_pieces(rest @ SMPL_TO_BLENDER.T))  # built in armature space
    bones = np.array([bone for bone, *_ in pieces])
    ends = np.array([(p0, p1) for _, p0, p1, _ in pieces]) @ SMPL_TO_BLENDER  # (P, 2, 3), SMPL
    radii = np.array([radius for *_, radius in pieces])
    positions, rotations = forward_kinematics(axis_angle, rest)
    from_bone = ends - rest[bones][:, None, :]  # each end in its bone's rest frame
    posed = np.einsum("...pij,pkj->...pki", rotations[..., bones, :, :], from_bone)
    heights = posed[..., 1] + positions[..., bones, 1][..., None]  # (..., P, 2)
    return (heights.min(axis=-1) - radii).min(axis=-1)


def mannequin_mesh(heads, segments: int = 12, rings: int = 4) -> MeshData:
    """The mannequin for bone heads (24, 3) in armature space."""
    heads = np.asarray(heads, dtype=np.float64)
    if heads.shape != (NUM_JOINTS, 3):
        raise ValueError(f"heads: expected shape (24, 3), got {heads.shape}")
    all_verts, all_faces, owners, face_parts = [], [], [], []
    offset = 0
    for bone, p0, p1, radius in _pieces(heads):
        verts, faces = capsule(p0, p1, radius, segments, rings)
        all_verts.append(verts)
        all_faces.extend(tuple(offset + k for k in f) for f in faces)
        owners.extend([bone] * len(verts))
        face_parts.extend([PART_OF_BONE[JOINT_NAMES[bone]]] * len(faces))
        offset += len(verts)
    weights = np.zeros((offset, NUM_JOINTS))
    weights[np.arange(offset), owners] = 1.0
    return MeshData(np.concatenate(all_verts), all_faces, weights, np.array(face_parts))
