"""Plausible rotation limits for the SMPL body joints, a sampler of random plausible poses, and
clipping to the limits. numpy only.

Frame: the SMPL body frame (+Y up, +Z the direction the body faces, +X the body's own left). At
the rest pose (the T-pose) every joint's local frame is aligned with it, so "a rotation about
local X" of the left knee is a rotation about the body's left-right axis when the thigh hangs
straight down.

How a joint's rotation is limited: swing–twist about the bone axis
-------------------------------------------------------------------
Each joint has a *bone axis* ``BONE_AXIS[j]``: the principal axis (X, Y or Z) closest to the
direction of the bone it moves at rest (the arm chain lies along X, the legs, spine, neck and head
along Y, the ankle-to-toe bone along Z). A local rotation R is split into R = swing · twist:

- twist: a rotation by an angle τ about the bone axis (the roll of the bone about itself:
  forearm pronation, hip internal/external rotation, turning the head);
- swing: a rotation about an axis perpendicular to the bone axis (where the bone points); as a
  rotation vector it has a zero component along the bone axis.

The *limit coordinates* of a joint are a 3-vector: the two swing-vector components in their own
slots and τ in the bone-axis slot. For a left arm joint (bone axis X) they are (τ, s_y, s_z);
for a leg joint (bone axis Y) (s_x, τ, s_z). For rotations under ~60° they are close to the
axis-angle components themselves, which is what the numbers below were read from, but unlike
Euler angles they have no gimbal lock below a swing of 180°. ``LIMITS`` holds a
[low, high] box in these coordinates; ``clip_to_limits`` clips each coordinate to its box and
recomposes; clipping a clipped pose changes nothing (joints inside their box, to 1e-9 rad,
are returned bit for bit).

Why these ranges
----------------
They are the usual clinical ranges of motion (AAOS / physiotherapy tables), spread over SMPL's
joints, with a margin, widened where a named action of ``actions.py`` needs it (the tests check
that every action sample is within them). Signs for the *left* side (the right side is the
mirror image, see ``mirror_pose``):

- hip: flexion (thigh forward) is −X, up to 135°; extension +X to 40°; abduction (thigh out to the
  body's left) +Z to 75°; internal/external rotation ±60° (clinically ~45°; the tree pose and
  warrior II need more with the pelvis kept facing forward).
- knee: a hinge. Flexion (shin backward) is +X, 0..155° (3° of hyperextension); almost no swing
  sideways and ±30° of tibial rotation.
- ankle (bone axis Z, the foot points forward): plantar flexion (toes down) +X to 70°,
  dorsiflexion −X to 40°; toe-in/out ±30°, inversion/eversion ±35° (a foot kept flat under a
  leg spread wide). Toes: −50..30° of flexion, ±10° otherwise.
- spine1/2/3: forward flexion is +X; the three share about 105° of flexion and 70° of
  extension, ±60° of twist (+Y turns the chest to the left) and ±45° of side bend (−Z bends to
  the left).
- neck + head: together about 85° of flexion (+X, looking down) and extension, ±90° of turn (+Y
  turns to the left) and ±60° of tilt.
- collar: ±20..35° (shrugging, protraction).
- shoulder (bone axis X): swing about Z raises the arm (+Z for the left arm: +X turns towards +Y),
  −110°..110° relative to the collar (arms folded in front need the most lowering); swing about Y
  moves it forward (−Y for the left arm), up to 140° (across the chest) and 60° backward; twist
  (internal/external rotation) ±120°, which hands behind the head or a salute need in SMPL's
  palms-down rest frame.
- elbow: a hinge. Flexion is −Y for the left elbow (the forearm swings forward when the palm
  faces down), −5..150°, ±15° of swing sideways; the forearm's twist (pronation/supination,
  which SMPL puts partly on the elbow) ±90°.
- wrist: flexion/extension ±80° about Z, deviation about Y, ±60° of twist. Hands (fingers): ±20°.

The global orientation (joint 0) is not limited and passes through ``clip_to_limits`` unchanged;
``sample_plausible_poses`` gives it zero yaw (facing +Z) and a small random pitch and roll.
"""

from __future__ import annotations

import numpy as np

from shared_protocol.arrays import finite_array
from shared_protocol.rotations import (
    axis_angle_to_matrix,
    axis_angle_to_quaternion,
    matrix_to_axis_angle,
    quaternion_to_axis_angle,
)
from shared_protocol.skeleton import JOINT_NAMES, NUM_JOINTS

__all__ = [
    "BONE_AXIS",
    "LIMITS",
    "MIRROR_INDEX",
    "MIRROR_SIGNS",
    "RELAXED_COORDS",
    "clip_to_limits",
    "from_limit_coords",
    "limit_violation",
    "mirror_pose",
    "sample_plausible_poses",
    "to_limit_coords",
    "upright_orientation",
    "within_limits",
]

_X, _Y, _Z = 0, 1, 2

# Bone axis of each joint (see the module docstring); the pelvis entry is unused.
BONE_AXIS: tuple[int, ...] = tuple(
    _X if ("collar" in n or "shoulder" in n or "elbow" in n or "wrist" in n or "hand" in n)
    else _Z if ("ankle" in n or "foot" in n)
    else _Y
    for n in JOINT_NAMES
)  # fmt: skip

# Index of each joint's mirror image (left <-> right), and the sign that mirrors a rotation
# vector through the body's sagittal plane (x -> -x): M R M = R(−M v) = R((v_x, −v_y, −v_z)).
MIRROR_INDEX: tuple[int, ...] = tuple(
    JOINT_NAMES.index(n.replace("left_", "@").replace("right_", "left_").replace("@", "right_"))
    for n in JOINT_NAMES
)
MIRROR_SIGNS: np.ndarray = np.array([1.0, -1.0, -1.0])
MIRROR_SIGNS.setflags(write=False)

# Limits of the left side and the centre joints, in degrees, as (x, y, z) pairs of limit
# coordinates (the bone-axis slot holds the twist). Right-side joints are mirrored from these.
_LEFT_AND_CENTRE_DEG: dict[str, tuple[tuple[float, float], ...]] = {
    "left_hip": ((-135, 40), (-60, 60), (-30, 75)),
    "left_knee": ((-3, 155), (-30, 30), (-8, 8)),
    "left_ankle": ((-40, 70), (-30, 30), (-35, 35)),
    "left_foot": ((-50, 30), (-10, 10), (-10, 10)),
    "spine1": ((-30, 45), (-20, 20), (-15, 15)),
    "spine2": ((-20, 30), (-20, 20), (-15, 15)),
    "spine3": ((-20, 30), (-20, 20), (-15, 15)),
    "neck": ((-45, 50), (-50, 50), (-35, 35)),
    "head": ((-40, 40), (-40, 40), (-25, 25)),
    "left_collar": ((-20, 20), (-30, 20), (-15, 35)),
    "left_shoulder": ((-120, 120), (-140, 60), (-110, 110)),
    "left_elbow": ((-90, 90), (-150, 5), (-15, 15)),
    "left_wrist": ((-60, 60), (-40, 30), (-80, 80)),
    "left_hand": ((-20, 20), (-20, 20), (-20, 20)),
}

# Centres of the random-pose sampler ("relaxed standing": arms hanging at ~70° below the
# T-pose, elbows and knees a little bent), in degrees, left side and centre.
_RELAXED_DEG: dict[str, tuple[float, float, float]] = {
    "left_hip": (-8, 0, 3),
    "left_knee": (15, 0, 0),
    "left_shoulder": (0, -10, -65),
    "left_elbow": (0, -25, 0),
}


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    limits = np.empty((NUM_JOINTS, 3, 2))
    limits[0] = [[-np.pi, np.pi]] * 3
    relaxed = np.zeros((NUM_JOINTS, 3))
    for j, name in enumerate(JOINT_NAMES[1:], start=1):
        if name.startswith("right_"):
            continue
        box = np.radians(np.array(_LEFT_AND_CENTRE_DEG[name], dtype=np.float64))
        centre = np.radians(np.array(_RELAXED_DEG.get(name, (0.0, 0.0, 0.0))))
        limits[j] = box
        relaxed[j] = centre
        m = MIRROR_INDEX[j]
        if m != j:
            # Mirroring multiplies each coordinate by MIRROR_SIGNS: swap low/high where it is −1.
            mirrored = box * MIRROR_SIGNS[:, None]
            limits[m] = np.sort(mirrored, axis=1)
            relaxed[m] = centre * MIRROR_SIGNS
    limits.setflags(write=False)
    relaxed.setflags(write=False)
    return limits, relaxed


LIMITS, RELAXED_COORDS = _build_tables()
"""``LIMITS``: (24, 3, 2) radians, [low, high] per limit coordinate; row 0 (global) is unused.
``RELAXED_COORDS``: (24, 3) radians, the centre of ``sample_plausible_poses``."""

# Coordinates this close to their box count as inside (clipping leaves the joint untouched).
_INSIDE_TOLERANCE = 1e-9

_AXES = np.array(BONE_AXIS)
_ONE_HOT = np.eye(3)[_AXES]  # (24, 3): the bone axis of each joint


def _qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def _validated_pose(axis_angle, name: str = "axis_angle") -> np.ndarray:
    return finite_array(axis_angle, name, (NUM_JOINTS, 3))


def to_limit_coords(axis_angle) -> np.ndarray:
    """(..., 24, 3) axis-angle -> (..., 24, 3) limit coordinates (swing components + twist).

    Row 0 (the global orientation) is returned unchanged.
    """
    aa = _validated_pose(axis_angle)
    q = axis_angle_to_quaternion(aa)  # (w, x, y, z), w >= 0
    w = q[..., 0]
    v_axis = np.sum(q[..., 1:] * _ONE_HOT, axis=-1)
    norm = np.hypot(w, v_axis)
    degenerate = norm < 1e-9  # a swing of exactly 180°: the twist is undefined, take 0
    safe = np.where(degenerate, 1.0, norm)
    twist_q = np.concatenate(
        [
            np.where(degenerate, 1.0, w / safe)[..., None],
            np.where(degenerate, 0.0, v_axis / safe)[..., None] * _ONE_HOT,
        ],
        axis=-1,
    )
    twist_angle = 2.0 * np.arctan2(twist_q[..., 1:] @ np.ones(3), twist_q[..., 0])
    inverse = twist_q * np.array([1.0, -1.0, -1.0, -1.0])
    swing = quaternion_to_axis_angle(_qmul(q, inverse))
    coords = swing * (1.0 - _ONE_HOT) + twist_angle[..., None] * _ONE_HOT
    coords[..., 0, :] = aa[..., 0, :]
    return coords


def from_limit_coords(coords) -> np.ndarray:
    """(..., 24, 3) limit coordinates -> (..., 24, 3) axis-angle (the inverse of
    ``to_limit_coords`` for swings under 180°). Row 0 passes through unchanged."""
    c = finite_array(coords, "coords", (NUM_JOINTS, 3))
    swing = c * (1.0 - _ONE_HOT)
    twist = c * _ONE_HOT  # a rotation vector along the bone axis
    q = _qmul(axis_angle_to_quaternion(swing), axis_angle_to_quaternion(twist))
    aa = quaternion_to_axis_angle(q)
    aa[..., 0, :] = c[..., 0, :]
    return aa


def clip_to_limits(axis_angle) -> np.ndarray:
    """(..., 24, 3) axis-angle -> the same with every joint's limit coordinates clipped to
    ``LIMITS``. Joints already inside their box come back (numerically) unchanged; the global
    orientation always does."""
    aa = _validated_pose(axis_angle)
    coords = to_limit_coords(aa)
    clipped = np.clip(coords, LIMITS[..., 0], LIMITS[..., 1])
    out = from_limit_coords(clipped)
    # Joints inside their box (to rounding) are kept bit for bit: clipping is idempotent.
    inside = np.all(np.abs(clipped - coords) <= _INSIDE_TOLERANCE, axis=-1)
    out[inside] = aa[inside]
    out[..., 0, :] = aa[..., 0, :]
    return out


def limit_violation(axis_angle) -> np.ndarray:
    """(..., 24, 3) axis-angle -> (...) the largest amount (radians) by which any body joint's
    limit coordinate leaves its box (0 when the pose is within the limits)."""
    coords = to_limit_coords(axis_angle)[..., 1:, :]
    below = LIMITS[1:, :, 0] - coords
    above = coords - LIMITS[1:, :, 1]
    excess = np.maximum(np.maximum(below, above), 0.0)
    return excess.reshape(*excess.shape[:-2], -1).max(axis=-1)


def within_limits(axis_angle, tolerance: float = 1e-6) -> np.ndarray:
    """(..., 24, 3) axis-angle -> (...) bool: every body joint within ``LIMITS`` (+ tolerance)."""
    return limit_violation(axis_angle) <= tolerance


def mirror_pose(axis_angle) -> np.ndarray:
    """The mirror image of a pose through the body's sagittal plane (x -> −x).

    Left and right joints swap and every rotation vector (x, y, z) becomes (x, −y, −z). The
    global orientation is mirrored too (so zero yaw stays zero yaw). "Raise the left arm"
    mirrored is "raise the right arm".
    """
    aa = _validated_pose(axis_angle)
    return aa[..., list(MIRROR_INDEX), :] * MIRROR_SIGNS


def _fold(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Reflect values into [low, high] (a triangle wave: no pile-up at the bounds)."""
    width = high - low
    safe = np.where(width > 0, width, 1.0)
    y = np.mod(x - low, 2.0 * safe)
    return np.where(width > 0, low + safe - np.abs(y - safe), low)


# Joints moved together by one "activity" level per sample, and how far each group may stray
# (legs, which carry the body, and the spine less than the arms).
_GROUPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("left_collar", "left_shoulder", "left_elbow", "left_wrist", "left_hand"), 1.0),
    (("right_collar", "right_shoulder", "right_elbow", "right_wrist", "right_hand"), 1.0),
    (("left_hip", "left_knee", "left_ankle", "left_foot"), 0.6),
    (("right_hip", "right_knee", "right_ankle", "right_foot"), 0.6),
    (("spine1", "spine2", "spine3"), 0.6),
    (("neck", "head"), 0.8),
)


def sample_plausible_poses(
    rng: np.random.Generator,
    n: int,
    *,
    spread: float = 0.45,
    tilt_degrees: float = 8.0,
) -> np.ndarray:
    """``n`` random plausible poses, (n, 24, 3) axis-angle, within ``LIMITS``.

    Each limit coordinate is drawn from a normal distribution centred on ``RELAXED_COORDS``
    (relaxed standing) with a standard deviation of ``spread × activity × half its range``,
    reflected into the box. ``activity`` is drawn per sample and per limb group (each arm, each
    leg, the spine, the neck and head) uniformly in [0.15, 1] (times 0.6 for the legs and the
    spine, 0.8 for the neck and head), so that some limbs are posed strongly while others stay
    near rest. The global orientation is upright and facing +Z with
    zero yaw, plus a normal pitch and roll of ``tilt_degrees`` standard deviation.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng: expected a numpy Generator, got {type(rng).__name__}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n!r}")
    if not (np.isfinite(spread) and spread >= 0):
        raise ValueError(f"spread: expected a non-negative number, got {spread!r}")
    if not (np.isfinite(tilt_degrees) and tilt_degrees >= 0):
        raise ValueError(f"tilt_degrees: expected a non-negative number, got {tilt_degrees!r}")
    n = int(n)
    activity = np.ones((n, NUM_JOINTS))
    levels = rng.uniform(0.15, 1.0, size=(n, len(_GROUPS)))
    for g, (group, scale) in enumerate(_GROUPS):
        for name in group:
            activity[:, JOINT_NAMES.index(name)] = levels[:, g] * scale
    half = (LIMITS[..., 1] - LIMITS[..., 0]) / 2.0
    noise = rng.normal(size=(n, NUM_JOINTS, 3))
    coords = RELAXED_COORDS + noise * spread * activity[..., None] * half
    coords = _fold(coords, LIMITS[..., 0], LIMITS[..., 1])
    coords[:, 0, :] = 0.0
    poses = from_limit_coords(coords)
    tilt = rng.normal(scale=np.radians(tilt_degrees), size=(n, 2))
    poses[:, 0, :] = upright_orientation(tilt[:, 0], tilt[:, 1])
    return poses


def upright_orientation(pitch, roll) -> np.ndarray:
    """Global orientation(s) with zero yaw: R = R_x(pitch) · R_z(roll), radians.

    Pitch > 0 tips the torso forward (towards +Z), roll > 0 tips it to the body's right (−X).
    The pelvis's forward axis R·ẑ = (0, −sin pitch, cos pitch) keeps a zero x component: zero
    yaw in the sense of PoseScript and the ChatPose release (facing +Z).
    """
    pitch = np.asarray(pitch, dtype=np.float64)
    roll = np.asarray(roll, dtype=np.float64)
    zeros = np.zeros(np.broadcast_shapes(pitch.shape, roll.shape))
    rx = axis_angle_to_matrix(np.stack([pitch + zeros, zeros, zeros], axis=-1))
    rz = axis_angle_to_matrix(np.stack([zeros, zeros, roll + zeros], axis=-1))
    return matrix_to_axis_angle(rx @ rz)
