"""A library of named everyday actions and limb-level instructions, each a pose generator with
several phrasings. numpy only.

Each ``Action`` has a name (``"raise_left_arm"``), a pose generator (``action(rng)`` -> (24, 3)
axis-angle: a canonical pose with random variation; ``action(None)`` is the canonical pose
itself) and phrasings: text templates whose last two are held out (``phrasings(split)``), so an
evaluation can test paraphrases never seen in training.

Conventions
-----------
- Frame: the SMPL body frame, +Y up, +Z the direction the body faces, +X the body's own left.
- LEFT AND RIGHT ARE ALWAYS THE BODY'S OWN: "raise the left arm" moves the joints named
  ``left_*`` (left_shoulder 16, left_elbow 18, left_wrist 20), whose rest position has x > 0.
- Global orientation: every action is upright (unless the action itself tips the pelvis: a bow,
  bending forward, downward dog) and faces +Z with zero yaw, as PoseScript and the ChatPose
  release store poses after removing the yaw: the pelvis's forward axis ``G_0 · ẑ`` has no x
  component. Standing legs are aimed straight down in the world, so tipping the pelvis forward
  shows up as hip flexion. Twisting the torso or turning the head is done by the spine or neck,
  never by the global orientation.
- Poses are built for the built-in rest skeleton (``shared_protocol.skeleton``) by aiming bones
  at world directions (a two-bone solver for arms and legs, hinged elbows and knees) and are
  finally clipped to ``joint_limits.LIMITS``; the tests check their geometry by forward
  kinematics.
- Contacts (a kneeling knee, shin and foot, feet and hands on the floor, hands on the thighs)
  allow for the body's thickness around its joints (``KNEE_DEPTH``, ``SHIN_DEPTH``,
  ``HAND_DEPTH``, ``shared_protocol.pose.SOLE_DEPTH``: the add-on's mannequin), and are placed
  again after the small random noise every varied pose gets, so that it does not break them.

Phrasing templates contain ``{subject}`` (a person, someone, a man, ...) and ``{their}`` (the
matching possessive), filled by ``Action.render``; imperative templates have neither.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shared_protocol.pose import SOLE_DEPTH
from shared_protocol.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from shared_protocol.skeleton import (
    NUM_JOINTS,
    PARENTS,
    REST_OFFSETS,
    joint_index,
)

from .joint_limits import clip_to_limits, upright_orientation

__all__ = [
    "ACTIONS",
    "SPLITS",
    "SUBJECTS",
    "Action",
    "action_names",
    "get_action",
]

SPLITS = ("train", "val", "test")

# (subject, possessive) pairs for the {subject} / {their} slots of the phrasings.
SUBJECTS: tuple[tuple[str, str], ...] = (
    ("the person", "their"),
    ("someone", "their"),
    ("a man", "his"),
    ("a woman", "her"),
    ("the character", "their"),
)

_UP = np.array([0.0, 1.0, 0.0])
_DOWN = -_UP
_FWD = np.array([0.0, 0.0, 1.0])
_BACK = -_FWD
_LEFT = np.array([1.0, 0.0, 0.0])

_SIGN = {"left": 1.0, "right": -1.0}
_OTHER = {"left": "right", "right": "left"}

# How far the body's surface lies below a joint's centre where it rests on the floor (the
# add-on's mannequin: the thigh's capsule is 0.065 thick at the knee, the shin's 0.05, a hand's
# 0.03; the soles lie SOLE_DEPTH below the foot's joints).
KNEE_DEPTH, SHIN_DEPTH, HAND_DEPTH = 0.065, 0.05, 0.03

# (root, middle, end joint, rest direction in which the hinge bends the lower bone).
_LIMBS: dict[tuple[str, str], tuple[int, int, int, np.ndarray]] = {
    ("left", "arm"): (16, 18, 20, _FWD),
    ("right", "arm"): (17, 19, 21, _FWD),
    ("left", "leg"): (1, 4, 7, _BACK),
    ("right", "leg"): (2, 5, 8, _BACK),
}


def _norm(v: np.ndarray) -> float:
    return math.sqrt(float(v @ v))


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product of two 3-vectors (np.cross is slow for single vectors)."""
    return np.array(
        [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
    )


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = math.sqrt(float(v @ v))
    if n < 1e-12:
        raise ValueError("zero direction")
    return v / n


def _out(side: str) -> np.ndarray:
    """The body's own outward direction for a side: +X for the left, −X for the right."""
    return _SIGN[side] * _LEFT


def _matrix(rotvec) -> np.ndarray:
    """Rodrigues for one rotation vector (a fast path: no validation, no batching)."""
    v = np.asarray(rotvec, dtype=np.float64)
    theta = math.sqrt(float(v @ v))
    if theta < 1e-12:
        return np.eye(3)
    x, y, z = v / theta
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(theta) * k + (1.0 - math.cos(theta)) * (k @ k)


def _chain(joint: int) -> tuple[int, ...]:
    chain = []
    while joint >= 0:
        chain.append(joint)
        joint = PARENTS[joint]
    return tuple(reversed(chain))


_CHAINS = tuple(_chain(j) for j in range(NUM_JOINTS))


def _min_rotation(a: np.ndarray, b: np.ndarray, fallback_axis: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector a onto unit vector b."""
    axis = _cross(a, b)
    s, c = _norm(axis), float(np.dot(a, b))
    if s < 1e-9:
        if c > 0:
            return np.eye(3)
        return _matrix(_unit(fallback_axis) * math.pi)
    return _matrix(axis / s * math.atan2(s, c))


def _hinge_axis(bone: np.ndarray, bend: np.ndarray) -> np.ndarray:
    """The principal axis (with sign) closest to bone × bend: −Y for the left elbow, +Y for the
    right, +X for the knees; SMPL bends elbows and knees about these local axes."""
    c = _cross(bone, bend)
    k = int(np.argmax(np.abs(c)))
    axis = np.zeros(3)
    axis[k] = math.copysign(1.0, c[k])
    return axis


def _frame(d: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.column_stack([d, b, _cross(d, b)])


class _Builder:
    """A pose under construction. Angles are in degrees; ``jit`` and ``vec`` add the random
    variation (none when the builder has no rng: the canonical pose)."""

    def __init__(self, rng: np.random.Generator | None, variation: float) -> None:
        self.rng = rng
        self.var = 0.0 if rng is None else float(variation)
        self.rot = np.tile(np.eye(3), (NUM_JOINTS, 1, 1))  # local rotation matrices
        self.contacts: list[Callable[[], None]] = []  # placed again after the noise

    # --- randomness ------------------------------------------------------------------------

    def jit(self, mean: float, spread: float) -> float:
        if self.var == 0.0:
            return float(mean)
        return float(mean + self.rng.uniform(-spread, spread) * self.var)

    def vec(self, v, spread_deg: float = 6.0) -> np.ndarray:
        """Unit vector along v, tipped by a random angle up to ``spread_deg``."""
        u = _unit(v)
        if self.var == 0.0 or spread_deg == 0.0:
            return u
        axis = self.rng.normal(size=3)
        axis -= axis.dot(u) * u
        if _norm(axis) < 1e-9:
            return u
        angle = math.radians(self.rng.uniform(0.0, spread_deg) * self.var)
        return _matrix(_unit(axis) * angle) @ u

    def side(self) -> str:
        """A random side (the canonical pose takes the left)."""
        if self.rng is None:
            return "left"
        return "left" if self.rng.random() < 0.5 else "right"

    # --- forward kinematics ----------------------------------------------------------------

    @property
    def aa(self) -> np.ndarray:
        """The pose so far as (24, 3) axis-angle."""
        return matrix_to_axis_angle(self.rot)

    def set(self, joint: int, rotvec) -> None:
        self.rot[joint] = _matrix(rotvec)

    def world(self, joint: int) -> tuple[np.ndarray, np.ndarray]:
        """World rotation and position of one joint (forward kinematics along its chain)."""
        chain = _CHAINS[joint]
        rotation = np.eye(3)
        position = np.zeros(3)
        for j in chain:
            position = position + rotation @ REST_OFFSETS[j]
            rotation = rotation @ self.rot[j]
        return rotation, position

    def position(self, joint: str | int) -> np.ndarray:
        return self.world(joint if isinstance(joint, int) else joint_index(joint))[1]

    # --- setting joints --------------------------------------------------------------------

    def orient(self, pitch: float = 0.0, roll: float = 0.0) -> None:
        """Global orientation with zero yaw; pitch > 0 tips the torso forward."""
        self.set(0, upright_orientation(math.radians(pitch), math.radians(roll)))

    def spine(self, flex: float = 0.0, twist: float = 0.0, lean: float = 0.0) -> None:
        """Spread over spine1/2/3: flex > 0 bends forward, twist > 0 turns the chest to the
        body's left, lean > 0 bends sideways to the body's left."""
        for j, w in ((3, 0.4), (6, 0.3), (9, 0.3)):
            self.set(j, np.radians([flex * w, twist * w, -lean * w]))

    def head(self, turn: float = 0.0, down: float = 0.0, tilt: float = 0.0) -> None:
        """Spread over neck and head: turn > 0 to the body's left, down > 0 looks down, tilt > 0
        brings the left ear towards the left shoulder."""
        for j, w in ((12, 0.45), (15, 0.55)):
            self.set(j, np.radians([down * w, turn * w, -tilt * w]))

    def collar(self, side: str, up: float = 0.0, forward: float = 0.0) -> None:
        s = _SIGN[side]
        self.set(13 if side == "left" else 14, np.radians([0.0, -s * forward, s * up]))

    def limb(
        self,
        side: str,
        kind: str,
        upper,
        bend: float,
        pole=None,
        frame: int | None = None,
    ) -> None:
        """Aim a limb: the upper bone (upper arm, thigh) along the world direction ``upper`` and
        the hinge (elbow, knee) bent by ``bend`` degrees towards ``pole`` (the direction the
        lower bone leans away from the upper one; default: the rest direction carried along by
        the smallest swing). With ``frame`` the directions are in that joint's world frame."""
        root, mid, _end, rest_bend = _LIMBS[(side, kind)]
        parent = self.world(PARENTS[root])[0]
        to_world = np.eye(3) if frame is None else self.world(frame)[0]
        u = parent.T @ (to_world @ _unit(upper))
        d0 = _unit(REST_OFFSETS[mid])
        hinge = _hinge_axis(d0, rest_bend)
        b0 = _unit(_cross(hinge, d0))  # where the hinge turns the lower bone at rest
        local = _min_rotation(d0, u, b0)
        if pole is not None:
            p = parent.T @ (to_world @ _unit(pole))
            p_perp = p - p.dot(u) * u
            if _norm(p_perp) > 1e-6:
                local = _frame(u, _unit(p_perp)) @ _frame(d0, b0).T
        self.rot[root] = local
        self.set(mid, hinge * math.radians(bend))

    def reach(self, side: str, kind: str, target, hint, exact: bool = False) -> None:
        """Two-bone solve: put the limb's end joint (wrist, ankle) at the world point ``target``
        with the middle joint (elbow, knee) displaced towards the world direction ``hint``.

        The solve takes the limb for two bones in line at rest, which the rest skeleton's are
        not quite (its knees and elbows are a little bent): the end lands within a few
        centimetres of the target. ``exact`` re-aims a few times to put it there (where the
        limb reaches that far)."""
        target = np.asarray(target, dtype=np.float64)
        self._reach(side, kind, target, hint)
        if exact:
            end, aim = _LIMBS[(side, kind)][2], target
            for _ in range(5):
                miss = target - self.position(end)
                if _norm(miss) < 1e-4:
                    break
                aim = aim + miss
                self._reach(side, kind, aim, hint)

    def _reach(self, side: str, kind: str, target, hint) -> None:
        root, mid, end, _ = _LIMBS[(side, kind)]
        l1 = float(_norm(REST_OFFSETS[mid]))
        l2 = float(_norm(REST_OFFSETS[end]))
        start = self.position(root)
        to_target = np.asarray(target, dtype=np.float64) - start
        d = float(np.clip(_norm(to_target), abs(l1 - l2) + 1e-3, (l1 + l2) * 0.999))
        t = _unit(to_target)
        h = _unit(hint)
        h_perp = h - h.dot(t) * t
        h_perp = _unit(h_perp) if _norm(h_perp) > 1e-6 else _unit(_cross(t, _LEFT))
        cos_a = (l1 * l1 + d * d - l2 * l2) / (2.0 * l1 * d)
        alpha = math.acos(float(np.clip(cos_a, -1.0, 1.0)))
        upper = math.cos(alpha) * t + math.sin(alpha) * h_perp
        elbow = start + l1 * upper
        lower = _unit(start + d * t - elbow)
        bend = math.degrees(math.acos(float(np.clip(upper.dot(lower), -1.0, 1.0))))
        # The lower bone leans back towards the line start-target: away from the hint.
        self.limb(side, kind, upper, bend, -h_perp)

    def foot(self, side: str, pitch: float = 0.0) -> None:
        """Set the ankle so that the foot keeps its heading but is level (pitch 0) or pitched
        ``pitch`` degrees in the world (> 0 toes down, < 0 toes up)."""
        knee = 4 if side == "left" else 5
        ankle = 7 if side == "left" else 8
        shin = self.world(knee)[0]
        forward = _cross(shin @ _LEFT, _UP)  # the knee's hinge axis gives the leg's heading
        heading = math.atan2(forward[0], forward[2])
        target = _matrix([0.0, heading, 0.0]) @ _matrix([math.radians(pitch), 0.0, 0.0])
        self.rot[ankle] = shin.T @ target

    def sole_height(self, side: str) -> float:
        """Height of a foot's sole: its lowest joint (ankle or foot) less ``SOLE_DEPTH``."""
        ankle, foot = (7, 10) if side == "left" else (8, 11)
        return min(self.position(ankle)[1], self.position(foot)[1]) - SOLE_DEPTH

    def ankle(self, side: str, plantar: float) -> None:
        """Set the ankle locally: plantar > 0 points the toes (relative to the shin)."""
        self.set(7 if side == "left" else 8, np.radians([plantar, 0.0, 0.0]))

    def contact(self, place: Callable[[], None]) -> None:
        """Place limbs in a contact (with the floor, with the body) now, and again after
        ``finish`` adds its noise, which would break it. ``place`` sets joints from the pose so
        far and values drawn beforehand: it draws nothing."""
        place()
        self.contacts.append(place)

    def finish(self, noise_deg: float = 1.0) -> np.ndarray:
        pose = self.aa
        if self.var > 0.0:
            pose[1:] += self.rng.normal(scale=math.radians(noise_deg) * self.var, size=(23, 3))
            if self.contacts:
                self.rot = axis_angle_to_matrix(pose)
                for place in self.contacts:
                    place()
                pose = self.aa
        return clip_to_limits(pose)

    # --- common building blocks ------------------------------------------------------------

    def relaxed_arm(self, side: str, out: float = 0.25) -> None:
        self.limb(side, "arm", self.vec(_DOWN + out * _out(side), 6), self.jit(12, 8), _FWD)

    def standing_leg(self, side: str, out: float = 0.03) -> None:
        self.limb(side, "leg", self.vec(_DOWN + out * _out(side), 3), self.jit(3, 3), _BACK)
        self.foot(side, self.jit(0, 4))

    def leg_angle(self, side: str, forward: float, bend: float, out: float = 0.05) -> None:
        """Thigh tipped ``forward`` degrees from straight down towards +Z (negative: backward),
        knee bent ``bend`` degrees."""
        a = math.radians(forward)
        direction = math.cos(a) * _DOWN + math.sin(a) * _FWD + out * _out(side)
        self.limb(side, "leg", self.vec(direction, 4), bend)

    def lay_hand(self, side: str, along, palm=_DOWN) -> None:
        """Turn the forearm about its own axis (the elbow's twist) and bend the wrist so that
        the hand points along the world direction ``along``, its palm facing ``palm`` (as far
        as a direction square to ``along`` can): a hand laid flat on something."""
        _shoulder, elbow, wrist, _ = _LIMBS[(side, "arm")]
        d = _unit(along)
        n = _unit(np.asarray(palm, dtype=np.float64) - np.dot(palm, d) * d)
        h0 = _unit(REST_OFFSETS[joint_index(f"{side}_hand")])  # from the wrist, at rest
        n0 = _unit(_DOWN - _DOWN.dot(h0) * h0)  # the palm faces down at rest (the T-pose)
        local = self.world(elbow)[0].T @ _frame(d, n) @ _frame(h0, n0).T  # the wrist's
        # The part of it about the forearm's axis goes to the elbow (a forearm turns there).
        axis = _unit(REST_OFFSETS[wrist])
        rotvec = matrix_to_axis_angle(local)
        angle = _norm(rotvec)
        w, v = math.cos(angle / 2), math.sin(angle / 2) * (rotvec / max(angle, 1e-12))
        twist = 2.0 * math.atan2(float(v @ axis), w)
        self.rot[elbow] = self.rot[elbow] @ _matrix(axis * twist)
        self.rot[wrist] = _matrix(-axis * twist) @ local

    def kneeling_leg(self, side: str) -> None:
        """Kneel on ``side``'s knee: the thigh about straight down, the shin back along the floor
        (the ankle about level with the knee: the shin's capsule rests on the floor as the
        knee's does) and the foot stretched back, its instep on the floor."""
        hip_joint, knee_joint, ankle_joint = _LIMBS[(side, "leg")][:3]
        foot_joint = joint_index(f"{side}_foot")
        thigh = self.vec(_DOWN + 0.05 * _out(side), 3)
        drop = KNEE_DEPTH - SHIN_DEPTH + self.jit(0.0, 0.005)  # the ankle this much lower
        back = math.sqrt(_norm(REST_OFFSETS[ankle_joint]) ** 2 - drop * drop)
        shin = back * _unit(_BACK + self.jit(0.03, 0.03) * _out(side)) - drop * _UP
        # The foot pointing back, a little down (its capsule, as thick as the shin's less a
        # centimetre, rests on the floor): a half turn from the rest foot's own slope; the
        # toes pointed too.
        rest = REST_OFFSETS[foot_joint]
        pitch = math.degrees(math.atan2(rest[1], rest[2])) + 180.0 - self.jit(4, 3)
        toes = self.jit(25, 4)

        def place() -> None:
            hip = self.position(hip_joint)
            knee = hip + _norm(REST_OFFSETS[knee_joint]) * thigh
            self.reach(side, "leg", knee + shin, knee - hip - shin, exact=True)
            self.foot(side, pitch)
            self.set(foot_joint, np.radians([toes, 0.0, 0.0]))

        self.contact(place)

    def leg_to_floor(
        self, side: str, floor: float, bend: float, pitch: float, out: float, towards=_BACK
    ) -> None:
        """Aim a leg (knee bent ``bend`` degrees, the foot pitched ``pitch``: ``foot``) down and
        towards a world direction (back: in the body's own sagittal plane), tipped just so far
        that its sole rests at the height ``floor`` (as close as it comes, if it cannot
        reach)."""
        lo, hi = 0.0, 90.0  # degrees from straight down: the sole rises monotonically
        for _ in range(16):  # to 0.002°
            a = 0.5 * (lo + hi)
            r = math.radians(a)
            direction = math.cos(r) * _DOWN + math.sin(r) * towards + out * _out(side)
            self.limb(side, "leg", direction, bend, _BACK)
            self.foot(side, pitch)
            if self.sole_height(side) < floor:
                lo = a
            else:
                hi = a

    def plant_feet(
        self, pitches: dict[str, float], fixed: str | None = None, lower: bool = False
    ) -> None:
        """Both soles on one floor, each foot pitched ``pitches[side]`` (``foot``): the floor
        is the ``fixed`` foot's sole, else the higher sole (a foot can always be raised, by
        bending its knee further), or with ``lower`` the lower one (for knees bent deeply:
        bending one further would take its hip and ankle past their limits). The other ankles
        move straight up or down, each knee staying on its side of the line from hip to ankle
        (a leg about straight: towards the thigh's own front), so that the hip does not
        twist."""

        def place() -> None:
            for s, pitch in pitches.items():
                self.foot(s, pitch)
            soles = [self.sole_height(s) for s in pitches]
            floor = (
                self.sole_height(fixed)
                if fixed is not None
                else min(soles)
                if lower
                else max(soles)
            )
            for s, pitch in pitches.items():
                hip, knee, ankle = _LIMBS[(s, "leg")][:3]
                for _ in range(3):  # re-levelling the foot moves the sole a little
                    miss = floor - self.sole_height(s)
                    if s == fixed or abs(miss) < 1e-4:
                        break
                    aside = self.position(knee) - 0.5 * (self.position(hip) + self.position(ankle))
                    hint = aside if _norm(aside) > 0.02 else self.world(hip)[0] @ _FWD
                    self.reach(s, "leg", self.position(ankle) + miss * _UP, hint, exact=True)
                    self.foot(s, pitch)

        self.contact(place)

    def neutral(self, arms: bool = True, legs: bool = True) -> None:
        self.orient(self.jit(0, 3), self.jit(0, 2))
        self.spine(self.jit(0, 4), self.jit(0, 4), self.jit(0, 3))
        self.head(self.jit(0, 8), self.jit(0, 6), self.jit(0, 4))
        if arms:
            for side in ("left", "right"):
                self.relaxed_arm(side)
        if legs:
            for side in ("left", "right"):
                self.standing_leg(side)


def _sides(side: str) -> tuple[str, ...]:
    return ("left", "right") if side == "both" else (side,)


# --- pose generators --------------------------------------------------------------------------
# Each takes a _Builder, sets the pose and returns nothing; arguments bound with a lambda.


def _raise_arm(b: _Builder, side: str) -> None:
    b.neutral()
    for s in _sides(side):
        b.collar(s, up=b.jit(15, 5))
        b.limb(s, "arm", b.vec(_UP + 0.12 * _out(s), 8), b.jit(6, 6))


def _lower_arm(b: _Builder, side: str) -> None:
    b.neutral()
    for s in _sides(side):
        b.collar(s, up=b.jit(-5, 3))
        b.limb(s, "arm", b.vec(_DOWN + 0.1 * _out(s), 4), b.jit(5, 4), _FWD)


def _bend_arm(b: _Builder, side: str) -> None:
    b.neutral()
    for s in _sides(side):
        b.limb(s, "arm", b.vec(_DOWN + 0.15 * _out(s) + 0.1 * _FWD, 6), b.jit(95, 15), _FWD)


def _straighten_arm(b: _Builder, side: str) -> None:
    b.neutral()
    for s in _sides(side):
        b.limb(s, "arm", b.vec(_DOWN + _FWD + 0.25 * _out(s), 8), b.jit(2, 2))


def _spread_arm(b: _Builder, side: str) -> None:
    b.neutral()
    for s in _sides(side):
        b.limb(s, "arm", b.vec(_out(s) + 0.1 * _FWD, 4), b.jit(3, 3))


def _cross_arm(b: _Builder, side: str) -> None:
    b.neutral()
    for s in _sides(side):
        # With both arms, the left one crosses above the right one.
        low = 0.45 if (side == "both" and s == "right") else 0.3
        b.limb(s, "arm", b.vec(-0.55 * _out(s) + 0.75 * _FWD - low * _UP, 5), b.jit(10, 8))


def _reach_arm(b: _Builder, side: str) -> None:
    b.neutral()
    b.spine(b.jit(-5, 4))
    for s in _sides(side):
        b.collar(s, up=b.jit(10, 5), forward=b.jit(10, 5))
        b.limb(s, "arm", b.vec(0.75 * _UP + 0.65 * _FWD + 0.1 * _out(s), 8), b.jit(5, 5))


def _raise_leg(b: _Builder, side: str) -> None:
    b.neutral(arms=False)
    for s in ("left", "right"):
        b.relaxed_arm(s, out=0.45)
    b.leg_angle(side, b.jit(70, 12), b.jit(5, 5))
    b.ankle(side, b.jit(20, 10))


def _bend_knee(b: _Builder, side: str) -> None:
    if side == "both":  # a half squat: the torso leans forward over bent knees
        b.neutral(legs=False)
        b.orient(b.jit(20, 5))
        for s in ("left", "right"):
            a = b.jit(55, 8)
            b.leg_angle(s, a, a + b.jit(30, 6), out=0.12)
        b.plant_feet({"left": 0.0, "right": 0.0}, lower=True)
        for s in ("left", "right"):
            b.relaxed_arm(s)
        return
    b.neutral()
    b.leg_angle(side, b.jit(10, 8), b.jit(95, 15))
    b.ankle(side, b.jit(20, 10))


def _straighten_leg(b: _Builder, side: str) -> None:
    if side == "both":  # standing tall on straight legs
        b.neutral(legs=False)
        for s in ("left", "right"):
            b.limb(s, "leg", b.vec(_DOWN + 0.03 * _out(s), 2), b.jit(1, 1), _BACK)
            b.foot(s, 0.0)
        return
    # The named leg straight out in front on its heel, the other knee bent (a hamstring stretch).
    b.neutral(legs=False)
    b.orient(b.jit(20, 5))
    b.leg_angle(side, b.jit(35, 6), b.jit(1, 1))
    other = _OTHER[side]
    a = b.jit(35, 6)
    b.leg_angle(other, a, a + b.jit(20, 5))
    b.plant_feet({side: b.jit(-25, 8), other: 0.0}, fixed=side)  # the straight leg's heel
    for s in ("left", "right"):
        b.relaxed_arm(s)


def _spread_leg(b: _Builder, side: str) -> None:
    b.neutral(legs=False)
    if side == "both":  # a wide stance on straight legs
        first, second = ("left", "right") if b.jit(0, 1) > 0 else ("right", "left")
        a = math.radians(b.jit(25, 4))
        b.limb(first, "leg", b.vec(math.cos(a) * _DOWN + math.sin(a) * _out(first), 2), b.jit(2, 2))
        bend = b.jit(2, 2)

        def place() -> None:  # the second leg spread just so far that both feet stand
            b.foot(first, 0.0)
            b.leg_to_floor(second, b.sole_height(first), bend, 0.0, 0.0, towards=_out(second))

        b.contact(place)
        return
    a = math.radians(b.jit(40, 8))
    b.limb(side, "leg", b.vec(math.cos(a) * _DOWN + math.sin(a) * _out(side), 3), b.jit(3, 3))
    b.ankle(side, b.jit(15, 8))
    b.standing_leg(_OTHER[side])
    for s in ("left", "right"):
        b.relaxed_arm(s, out=0.4)


def _sit(b: _Builder) -> None:
    b.neutral(arms=False, legs=False)
    b.orient(b.jit(8, 4), b.jit(0, 2))  # a little forward, so that the hands reach the thighs
    for s in ("left", "right"):
        a = b.jit(90, 8)
        b.leg_angle(s, a, a + b.jit(0, 8), out=0.1)
    b.plant_feet({"left": 0.0, "right": 0.0})
    for s in ("left", "right"):  # hands resting on the middle of the thighs, elbows back
        b.contact(
            functools.partial(
                _hand_on_thigh, b, s, b.jit(0.45, 0.1), b.jit(0.1, 0.01), b.jit(0.01, 0.01)
            )
        )


def _hand_on_thigh(b: _Builder, side: str, along: float, up: float, out: float) -> None:
    """The wrist ``along`` the way from hip to knee, ``up`` above the thigh's axis (its top:
    the thigh's capsule is 0.065 thick, the wrist's 0.03) and ``out`` outward."""
    hip, knee = b.position(f"{side}_hip"), b.position(f"{side}_knee")
    on = hip + along * (knee - hip) + up * _UP + out * _out(side)
    b.reach(side, "arm", on, _out(side) + _BACK, exact=True)
    b.lay_hand(side, knee - hip)  # flat on the thigh, fingers towards the knee


def _kneel_one(b: _Builder, side: str) -> None:
    """Kneel on ``side``'s knee: that thigh vertical, its shin back along the floor; the other
    foot flat on the floor in front, its shin about upright and its thigh about level (sloping
    up a little to a knee above its foot)."""
    b.neutral(arms=False, legs=False)
    b.kneeling_leg(side)
    other = _OTHER[side]
    # The foot level, so its sole's depth below the ankle is that of the rest foot.
    sole_below_ankle = SOLE_DEPTH - min(0.0, float(REST_OFFSETS[joint_index(f"{other}_foot")][1]))
    ahead, out = b.jit(0.38, 0.04), b.jit(0.06, 0.02)

    def place() -> None:
        floor = b.position(f"{side}_knee")[1] - KNEE_DEPTH
        hip = b.position(f"{other}_hip")
        ankle = np.array([hip[0], floor + sole_below_ankle, hip[2] + ahead]) + out * _out(other)
        b.reach(other, "leg", ankle, _UP + _FWD, exact=True)
        b.foot(other, 0.0)

    b.contact(place)
    for s in ("left", "right"):
        b.relaxed_arm(s)


def _kneel_both(b: _Builder) -> None:
    b.neutral(arms=False, legs=False)
    for s in ("left", "right"):
        b.kneeling_leg(s)
    for s in ("left", "right"):
        b.relaxed_arm(s)


def _squat(b: _Builder) -> None:
    b.neutral(arms=False, legs=False)
    b.orient(b.jit(15, 5))
    for s in ("left", "right"):
        a = b.jit(108, 6)
        b.leg_angle(s, a, a + b.jit(25, 5), out=0.22)
    b.plant_feet({"left": 0.0, "right": 0.0}, lower=True)
    for s in ("left", "right"):  # arms forward for balance
        b.limb(s, "arm", b.vec(_FWD + 0.2 * _DOWN + 0.1 * _out(s), 6), b.jit(10, 8))


def _lunge(b: _Builder, side: str) -> None:
    """Lunge with ``side``'s leg in front: front thigh near level and shin vertical, its foot
    flat; back thigh slightly behind the vertical with the knee low, the heel up and the toes
    on the front foot's floor."""
    b.neutral(legs=False)
    a = b.jit(80, 6)
    b.leg_angle(side, a, a + b.jit(0, 6), out=0.08)
    other = _OTHER[side]
    b.leg_angle(other, -b.jit(10, 5), b.jit(95, 8), out=0.05)
    # On the toes, the foot steep: the shin runs back about level, and an ankle bends 40° at
    # most towards it.
    b.plant_feet({side: 0.0, other: b.jit(55, 5)}, fixed=side)


def _stand_on_leg(b: _Builder, side: str) -> None:
    b.neutral(arms=False)
    b.leg_angle(_OTHER[side], b.jit(80, 8), b.jit(90, 10))
    b.ankle(_OTHER[side], b.jit(20, 10))
    for s in ("left", "right"):
        b.limb(s, "arm", b.vec(_DOWN + 0.6 * _out(s), 8), b.jit(15, 8))


def _bend_forward(b: _Builder) -> None:
    b.neutral(arms=False)
    b.orient(b.jit(70, 10))
    b.spine(b.jit(25, 8))
    b.head(down=b.jit(10, 8))
    for s in ("left", "right"):
        b.standing_leg(s)
        b.limb(s, "arm", b.vec(_DOWN + 0.1 * _FWD + 0.1 * _out(s), 6), b.jit(5, 5))


def _lean_back(b: _Builder) -> None:
    b.neutral(arms=False)
    b.orient(b.jit(-8, 4))
    b.spine(b.jit(-40, 8))
    b.head(down=b.jit(-15, 8))
    for s in ("left", "right"):
        b.standing_leg(s)
        b.relaxed_arm(s)


def _lean_side(b: _Builder, side: str) -> None:
    b.neutral(arms=False)
    b.spine(lean=_SIGN[side] * b.jit(35, 6))
    b.head(tilt=_SIGN[side] * b.jit(10, 6))
    for s in ("left", "right"):
        b.limb(s, "arm", b.vec(_DOWN + 0.2 * _out(s), 6), b.jit(8, 6), _FWD, frame=9)


def _twist(b: _Builder, side: str) -> None:
    b.neutral(arms=False)
    b.spine(b.jit(0, 4), _SIGN[side] * b.jit(45, 8))
    b.head(turn=_SIGN[side] * b.jit(10, 8))
    for s in ("left", "right"):  # the arms follow the chest
        b.limb(s, "arm", b.vec(_DOWN + 0.25 * _out(s), 6), b.jit(20, 10), _FWD, frame=9)


def _turn_head(b: _Builder, side: str) -> None:
    b.neutral()
    b.head(turn=_SIGN[side] * b.jit(58, 8), down=b.jit(0, 5))


def _look(b: _Builder, down: float) -> None:
    b.neutral()
    b.head(turn=b.jit(0, 5), down=down + b.jit(0, 6))


def _t_pose(b: _Builder) -> None:
    b.orient(b.jit(0, 2), b.jit(0, 2))
    for s in ("left", "right"):
        b.limb(s, "arm", b.vec(_out(s), 2), b.jit(2, 2))
        b.limb(s, "leg", b.vec(_DOWN + 0.04 * _out(s), 2), b.jit(1, 1), _BACK)
        b.foot(s, 0.0)


def _a_pose(b: _Builder) -> None:
    b.neutral(arms=False)
    b.head(b.jit(0, 3), b.jit(0, 3))
    for s in ("left", "right"):
        b.limb(s, "arm", b.vec(_out(s) + _DOWN, 4), b.jit(3, 3))


def _wave(b: _Builder, side: str) -> None:
    b.neutral()
    b.limb(
        side,
        "arm",
        b.vec(0.85 * _out(side) + 0.35 * _UP + 0.15 * _FWD, 8),
        b.jit(75, 15),
        _UP + 0.2 * _FWD,
    )
    b.set(20 if side == "left" else 21, np.radians([0.0, 0.0, b.jit(0, 25)]))
    b.head(turn=_SIGN[side] * b.jit(10, 10))


def _point(b: _Builder, side: str) -> None:
    b.neutral()
    b.limb(side, "arm", b.vec(_FWD + 0.2 * _out(side), 5), b.jit(3, 3))
    b.head(turn=_SIGN[side] * b.jit(5, 5))


def _salute(b: _Builder) -> None:
    b.neutral()
    head = b.position("head")
    target = head + np.array([b.jit(-0.11, 0.02), b.jit(0.07, 0.02), b.jit(0.1, 0.02)])
    b.reach("right", "arm", target, -_LEFT + 0.3 * _FWD)
    b.set(21, np.radians([0.0, b.jit(0, 10), b.jit(-10, 10)]))


def _hands_on_hips(b: _Builder) -> None:
    b.neutral(arms=False)
    pelvis = b.position("pelvis")
    for s in ("left", "right"):
        target = pelvis + np.array([_SIGN[s] * b.jit(0.2, 0.02), b.jit(0.06, 0.03), b.jit(0, 0.03)])
        b.reach(s, "arm", target, _out(s) + 0.1 * _BACK)


def _arms_crossed(b: _Builder) -> None:
    b.neutral(arms=False)
    chest = b.position("spine3")
    # The left forearm lies over (in front of) the right one, each hand by the other elbow.
    for s, height, depth in (("left", -0.03, 0.21), ("right", -0.08, 0.17)):
        target = chest + np.array(
            [-_SIGN[s] * b.jit(0.1, 0.015), b.jit(height, 0.02), b.jit(depth, 0.02)]
        )
        b.reach(s, "arm", target, _DOWN + 0.3 * _out(s) + 0.1 * _FWD)


def _hands_behind_head(b: _Builder) -> None:
    b.neutral(arms=False)
    head = b.position("head")
    for s in ("left", "right"):
        target = head + np.array([_SIGN[s] * b.jit(0.08, 0.02), b.jit(0.07, 0.02), -0.1])
        b.reach(s, "arm", target, _out(s) + 0.3 * _UP + 0.1 * _FWD)


def _clap(b: _Builder) -> None:
    b.neutral(arms=False)
    chest = b.position("spine3")
    height, depth = b.jit(0.05, 0.05), b.jit(0.35, 0.04)
    for s in ("left", "right"):
        target = chest + np.array([_SIGN[s] * 0.02, height, depth])
        b.reach(s, "arm", target, _DOWN + _out(s))


def _bow(b: _Builder) -> None:
    b.neutral(arms=False)
    b.orient(b.jit(35, 8))
    b.spine(b.jit(10, 5))
    b.head(down=b.jit(15, 8))
    for s in ("left", "right"):
        b.standing_leg(s)
        b.limb(s, "arm", b.vec(_DOWN + 0.1 * _out(s), 4), b.jit(5, 5), _FWD, frame=9)


def _stretch(b: _Builder) -> None:
    b.neutral(arms=False)
    b.spine(b.jit(-8, 4))
    b.head(down=b.jit(-10, 5))
    for s in ("left", "right"):
        b.collar(s, up=b.jit(15, 5))
    head = b.position("head")
    for s in ("left", "right"):
        target = head + np.array([_SIGN[s] * b.jit(0.06, 0.02), 0.45, b.jit(0.0, 0.03)])
        b.reach(s, "arm", target, _out(s) + 0.5 * _BACK)


def _jump(b: _Builder) -> None:
    b.neutral(arms=False, legs=False)
    b.orient(b.jit(10, 5))
    for s in ("left", "right"):
        a = b.jit(40, 10)
        b.leg_angle(s, a, a + b.jit(35, 10), out=0.1)
        b.ankle(s, b.jit(35, 10))
        b.limb(s, "arm", b.vec(0.8 * _UP + 0.4 * _out(s) + 0.3 * _FWD, 10), b.jit(10, 8))


def _run(b: _Builder) -> None:
    lead = b.side()
    rear = _OTHER[lead]
    b.neutral(arms=False, legs=False)
    b.orient(b.jit(10, 4))
    b.leg_angle(lead, b.jit(55, 10), b.jit(70, 15))
    b.ankle(lead, b.jit(10, 10))
    b.leg_angle(rear, -b.jit(25, 6), b.jit(80, 15))
    b.ankle(rear, b.jit(30, 10))
    fwd, back = math.radians(b.jit(40, 8)), math.radians(b.jit(35, 8))
    # Opposite arm and leg: the arm on the rear leg's side swings forward.
    b.limb(rear, "arm", math.cos(fwd) * _DOWN + math.sin(fwd) * _FWD, b.jit(90, 10), _FWD)
    b.limb(lead, "arm", math.cos(back) * _DOWN - math.sin(back) * _FWD, b.jit(85, 10), _FWD)


def _walk(b: _Builder) -> None:
    lead = b.side()
    rear = _OTHER[lead]
    b.neutral(arms=False, legs=False)
    b.leg_angle(lead, b.jit(25, 5), b.jit(8, 5))
    b.foot(lead, b.jit(-15, 5))
    b.leg_angle(rear, -b.jit(15, 4), b.jit(20, 8))
    b.foot(rear, b.jit(25, 8))
    fwd, back = math.radians(b.jit(22, 6)), math.radians(b.jit(18, 6))
    b.limb(
        rear,
        "arm",
        math.cos(fwd) * _DOWN + math.sin(fwd) * _FWD + 0.1 * _out(rear),
        b.jit(20, 8),
        _FWD,
    )
    b.limb(
        lead,
        "arm",
        math.cos(back) * _DOWN - math.sin(back) * _FWD + 0.1 * _out(lead),
        b.jit(12, 6),
        _FWD,
    )


def _fighting_stance(b: _Builder) -> None:
    """Orthodox guard: left foot forward, knees soft, both fists up in front of the chin."""
    b.neutral(arms=False, legs=False)
    b.spine(b.jit(10, 4))
    b.head(down=b.jit(5, 5))
    b.leg_angle("left", b.jit(20, 5), b.jit(25, 5), out=0.1)
    bend = b.jit(20, 5)

    heel = b.jit(20, 5)  # the back heel up, on the ball of the foot

    def place() -> None:  # the back leg, its knee as soft, tipped back until both feet stand
        b.foot("left", 0.0)
        b.leg_to_floor("right", b.sole_height("left"), bend, heel, 0.1)

    b.contact(place)
    head = b.position("head")
    for s, depth, height in (("left", 0.3, -0.02), ("right", 0.2, -0.06)):
        target = head + np.array([_SIGN[s] * b.jit(0.08, 0.02), b.jit(height, 0.03), depth])
        b.reach(s, "arm", target, _DOWN + 0.3 * _out(s))


def _prayer_overhead(b: _Builder) -> None:
    for s in ("left", "right"):
        b.collar(s, up=b.jit(12, 4))
    head = b.position("head")
    for s in ("left", "right"):
        target = head + np.array([_SIGN[s] * 0.04, b.jit(0.36, 0.03), b.jit(0.02, 0.02)])
        b.reach(s, "arm", target, _out(s) + 0.5 * _BACK)


def _tree_pose(b: _Builder) -> None:
    stand = b.side()
    lifted = _OTHER[stand]
    b.neutral(arms=False, legs=False)
    b.standing_leg(stand, out=0.0)
    knee = b.position(f"{stand}_knee")
    target = knee + np.array([-_SIGN[stand] * 0.07, b.jit(0.12, 0.03), 0.05])
    b.reach(lifted, "leg", target, _out(lifted) + 0.9 * _FWD + 0.2 * _UP)
    b.ankle(lifted, b.jit(30, 8))
    _prayer_overhead(b)


def _warrior_ii(b: _Builder) -> None:
    front = b.side()
    back = _OTHER[front]
    b.neutral(arms=False, legs=False)
    thigh = b.vec(0.75 * _out(front) + 0.5 * _DOWN + 0.4 * _FWD, 4)
    b.limb(front, "leg", thigh, math.degrees(math.acos(thigh.dot(_DOWN))), _DOWN)
    bend = b.jit(2, 2)

    def place() -> None:  # the straight back leg spread just so far that both feet stand
        b.foot(front, 0.0)
        b.leg_to_floor(back, b.sole_height(front), bend, 0.0, 0.0, towards=_out(back))

    b.contact(place)
    for s in ("left", "right"):
        b.limb(s, "arm", b.vec(_out(s), 4), b.jit(3, 3))
    b.head(turn=_SIGN[front] * b.jit(60, 8))


def _downward_dog(b: _Builder) -> None:
    """Hands and feet on the floor, hips high: the arms in line with the torso, the straight
    legs tipped back just so far that the soles reach the floor the hands are on."""
    b.orient(b.jit(130, 4))
    b.spine(b.jit(0, 4))
    b.head(down=b.jit(0, 5))
    for s in ("left", "right"):
        b.collar(s, up=b.jit(15, 5))
        b.limb(s, "arm", b.vec(_UP + 0.12 * _out(s), 4), b.jit(2, 2), _FWD, frame=9)
        b.lay_hand(s, _FWD + 0.15 * _out(s))  # flat on the floor, fingers forward
    legs = {s: (b.jit(2, 2), b.jit(15, 5), b.jit(0.05, 0.03)) for s in ("left", "right")}

    def place() -> None:
        floor = min(b.position(j)[1] for j in (20, 21, 22, 23)) - HAND_DEPTH  # wrists, hands
        for s, (bend, pitch, out) in legs.items():
            b.leg_to_floor(s, floor, bend, pitch, out)

    b.contact(place)


def _chair_pose(b: _Builder) -> None:
    b.neutral(arms=False, legs=False)
    b.orient(b.jit(30, 5))
    for s in ("left", "right"):
        a = b.jit(60, 8)
        b.leg_angle(s, a, a + b.jit(22, 5))
        b.collar(s, up=b.jit(12, 4))
        b.limb(s, "arm", b.vec(_UP + 0.45 * _FWD + 0.1 * _out(s), 5), b.jit(3, 3))
    b.plant_feet({"left": 0.0, "right": 0.0})


# --- phrasings ---------------------------------------------------------------------------------
# Templates per action; the last two of each list are held out (validation, then test). The
# side-dependent words come from _words(); {subject} and {their} stay for Action.render.


class _Keep(dict):
    """format_map dict that leaves unknown slots ({subject}, {their}) in place."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _words(side: str) -> dict[str, str]:
    if side == "both":
        return {
            "side": "both",
            "arm": "both arms",
            "hand": "both hands",
            "elbow": "both elbows",
            "their_arm": "both of {their} arms",
            "leg": "both legs",
            "knee": "both knees",
            "foot": "both feet",
            "their_leg": "both of {their} legs",
            "their_knee": "both of {their} knees",
            "sides": "sides",
            "s": "s",
            "forearm_points": "the forearms point",
            "across": "across each other in front of the body",
        }
    other = _OTHER[side]
    return {
        "side": side,
        "other": other,
        "arm": f"the {side} arm",
        "hand": f"the {side} hand",
        "elbow": f"the {side} elbow",
        "their_arm": f"{{their}} {side} arm",
        "leg": f"the {side} leg",
        "knee": f"the {side} knee",
        "foot": f"the {side} foot",
        "their_leg": f"{{their}} {side} leg",
        "their_knee": f"{{their}} {side} knee",
        "other_leg": f"the {other} leg",
        "other_foot": f"the {other} foot",
        "sides": "side",
        "s": "",
        "forearm_points": "the forearm points",
        "across": f"across the body towards the {other} side",
    }


_ARM_PHRASINGS: dict[str, tuple[str, ...]] = {
    "raise": (
        "raise {arm}",
        "lift {arm} straight up above the head",
        "{subject} raises {their_arm} overhead",
        "{subject} is holding {arm} up in the air",
        "put {arm} up",
        "{subject} has {their_arm} stretched up towards the ceiling",
        "hold {arm} high over the head, pointing at the sky",
    ),
    "lower": (
        "lower {arm}",
        "bring {arm} down to the {sides}",
        "{subject} lets {their_arm} hang down by the {sides}",
        "{subject} rests {arm} along the body",
        "drop {arm} down",
        "{subject} keeps {their_arm} down, relaxed",
        "let {arm} fall loosely to the {sides}",
    ),
    "bend": (
        "bend {elbow}",
        "bend {arm} at the elbow{s}",
        "{subject} bends {their_arm} so {forearm_points} forward",
        "flex {elbow} to about ninety degrees",
        "{subject} holds {arm} bent at ninety degrees",
        "{subject} has {their_arm} bent at the elbow{s}",
        "fold {arm} at the elbow{s}",
    ),
    "straighten": (
        "straighten {arm}",
        "extend {arm} fully",
        "{subject} straightens {their_arm}",
        "keep {arm} straight, angled down in front of the body",
        "{subject} holds {arm} straight with the elbow{s} locked",
        "{subject} has {their_arm} fully extended",
        "unbend {elbow} completely",
    ),
    "spread": (
        "spread {arm} out to the {sides}",
        "hold {arm} out sideways at shoulder height",
        "{subject} extends {their_arm} out to the {sides}",
        "open {arm} wide",
        "{subject} stretches {arm} out horizontally",
        "{subject} holds {their_arm} straight out to the {sides}",
        "stick {arm} out sideways, level with the shoulder{s}",
    ),
    "cross": (
        "cross {arm} {across}",
        "{subject} crosses {their_arm} {across}",
        "bring {arm} {across}",
        "swing {arm} {across}",
        "{subject} reaches {arm} {across}",
        "move {arm} {across}",
        "{subject} sweeps {their_arm} {across}",
    ),
    "reach": (
        "reach up and forward with {hand}",
        "{subject} reaches {arm} up and forward",
        "stretch {arm} forward and up as if grabbing something from a high shelf",
        "reach out with {hand} towards something high in front",
        "{subject} extends {their_arm} up and out in front",
        "try to grab something above and in front with {hand}",
        "{subject} reaches ahead and upward with {their_arm}",
    ),
}

_LEG_PHRASINGS: dict[tuple[str, bool], tuple[str, ...]] = {
    ("raise", False): (
        "raise {leg}",
        "lift {leg} straight up in front",
        "{subject} raises {their_leg} forward, keeping it straight",
        "kick {leg} up in front",
        "{subject} stands on {other_leg} and lifts {leg} forward",
        "hold {leg} up in front of the body",
        "{subject} swings {their_leg} up, straight out in front",
    ),
    ("bend", False): (
        "bend {knee}",
        "{subject} bends {their_leg} at the knee",
        "flex {knee}",
        "bend {leg} at the knee and lift the foot behind",
        "{subject} has {their_knee} bent, with the foot off the ground behind",
        "{subject} bends {knee} so the {side} foot comes up behind",
        "fold {leg} at the knee, heel towards the buttock",
    ),
    ("bend", True): (
        "bend both knees",
        "{subject} bends {their_knee}",
        "flex both knees",
        "bend both legs at the knees and sink down a little",
        "{subject} stands with both knees bent",
        "{subject} lowers the hips by bending both knees",
        "do a half squat with both knees bent",
    ),
    ("straighten", False): (
        "straighten {leg}",
        "{subject} straightens {their_leg}",
        "extend {leg} fully",
        "lock {knee}",
        "{subject} keeps {leg} straight in front, resting on the heel",
        "{subject} has {their_leg} fully extended",
        "unbend {knee} completely",
    ),
    ("straighten", True): (
        "straighten both legs",
        "{subject} straightens {their_leg}",
        "extend both legs fully",
        "lock both knees",
        "{subject} stands tall with both legs straight",
        "{subject} has both legs fully extended",
        "unbend both knees completely",
    ),
    ("spread", False): (
        "move {leg} out to the side",
        "{subject} lifts {their_leg} out sideways",
        "spread {leg} away from the body",
        "raise {leg} out to the side",
        "{subject} swings {leg} out to the {side}",
        "hold {leg} out to the side, off the ground",
        "{subject} stands on {other_leg} with {their_leg} spread out sideways",
    ),
    ("spread", True): (
        "spread both legs apart",
        "stand with the feet wide apart",
        "{subject} stands with {their} legs spread wide",
        "take a wide stance",
        "{subject} spreads both legs",
        "{subject} plants both feet far apart",
        "open the legs wide, feet well apart",
    ),
}

_SIDED_PHRASINGS: dict[str, tuple[str, ...]] = {
    "kneel": (
        "kneel on {knee}",
        "{subject} kneels on {their_knee}",
        "go down on {knee}",
        "get down on one knee, the {side} one",
        "{subject} is kneeling with {their_knee} on the ground and the {other} foot in front",
        "drop to {knee}",
        "{subject} rests {their_knee} on the floor, {other} foot forward",
    ),
    "lunge": (
        "lunge forward with {leg}",
        "do a lunge, {leg} in front",
        "{subject} lunges with {their_leg} forward",
        "step forward into a lunge on {leg}",
        "{subject} is in a lunge with {their_knee} bent in front",
        "{subject} steps {their} {side} foot far forward and bends both knees",
        "take a big step forward with the {side} foot and sink down",
    ),
    "stand_on": (
        "stand on {leg}",
        "balance on {foot}",
        "{subject} stands on one leg, the {side} one",
        "lift the {other} foot and stand on the {side} leg",
        "{subject} is balancing on {their_leg} with the {other} knee raised",
        "{subject} stands on {their} {side} foot only",
        "stay on {leg}, {other} foot off the floor",
    ),
    "lean": (
        "lean to the {side}",
        "bend sideways to the {side}",
        "{subject} leans {their} upper body to the {side}",
        "tilt the torso to the {side}",
        "{subject} is bending to the {side} side",
        "side bend to the {side}",
        "{subject} tips {their} chest over to the {side}",
    ),
    "twist": (
        "twist to the {side}",
        "turn the torso to the {side}",
        "{subject} twists {their} upper body to the {side}",
        "rotate the chest towards the {side}",
        "{subject} is twisting at the waist to the {side}",
        "{subject} turns the shoulders to the {side} while the hips face forward",
        "swivel the upper body round to the {side}",
    ),
    "turn_head": (
        "turn the head to the {side}",
        "look to the {side}",
        "{subject} turns {their} head to the {side}",
        "{subject} is looking over to the {side}",
        "face the {side} with the head",
        "{subject} looks {side}",
        "rotate the head {side}wards",
    ),
    "wave": (
        "wave with {hand}",
        "{subject} waves {their} {side} hand",
        "wave hello with {hand}",
        "raise {hand} and wave",
        "{subject} is waving with {hand}",
        "greet someone with a wave of {hand}",
        "{subject} lifts {their} {side} hand to wave goodbye",
    ),
    "point": (
        "point forward with {hand}",
        "{subject} points straight ahead with {their_arm}",
        "point at something in front with {hand}",
        "stretch {arm} forward and point",
        "{subject} is pointing ahead with {hand}",
        "indicate something in front with {arm}",
        "{subject} extends {their_arm} forward to point at something",
    ),
}

_BODY_PHRASINGS: dict[str, tuple[str, ...]] = {
    "sit": (
        "sit down",
        "sit on a chair",
        "{subject} is sitting with {their} hands on {their} thighs",
        "{subject} sits upright with the knees bent at ninety degrees",
        "take a seat",
        "{subject} is seated, feet flat on the floor",
        "{subject} sits as if on a bench",
    ),
    "kneel_on_both_knees": (
        "kneel on both knees",
        "kneel down",
        "{subject} is kneeling upright on both knees",
        "get down on both knees",
        "{subject} kneels with the torso upright",
        "{subject} is on {their} knees",
        "drop down onto both knees",
    ),
    "squat": (
        "squat down",
        "do a deep squat",
        "{subject} is squatting with the arms forward",
        "crouch down low",
        "{subject} squats, knees bent and hips low",
        "{subject} is in a deep crouch",
        "sink into a full squat",
    ),
    "bend_forward": (
        "bend forward",
        "bend over at the waist",
        "{subject} bends forward with the arms hanging down",
        "lean forward and reach towards the floor",
        "{subject} is bent over",
        "fold forward from the hips",
        "{subject} bends down towards {their} toes",
    ),
    "lean_back": (
        "lean back",
        "lean backwards",
        "{subject} leans back, arching the spine",
        "arch the back",
        "{subject} is bending backwards",
        "tilt the upper body backwards",
        "{subject} arches {their} back and looks up",
    ),
    "look_up": (
        "look up",
        "{subject} tilts {their} head back to look up",
        "raise the chin",
        "{subject} is looking up at the sky",
        "look towards the ceiling",
        "{subject} gazes upward",
        "tip the head back",
    ),
    "look_down": (
        "look down",
        "{subject} lowers {their} head",
        "drop the chin to the chest",
        "{subject} is looking at the floor",
        "look at your feet",
        "{subject} gazes downward",
        "bow the head",
    ),
    "t_pose": (
        "T-pose",
        "stand in a T-pose",
        "{subject} stands with the arms straight out to the sides in a T",
        "make a T shape with the body",
        "{subject} is in a T-pose",
        "arms out horizontally, legs together",
        "{subject} strikes a T-pose",
    ),
    "a_pose": (
        "A-pose",
        "stand in an A-pose",
        "{subject} stands with the arms angled down at forty-five degrees",
        "hold the arms out and down, like the letter A",
        "{subject} is in an A-pose",
        "arms slanted down and away from the body",
        "{subject} takes the A-pose",
    ),
    "salute": (
        "salute",
        "give a military salute",
        "{subject} salutes with the right hand",
        "raise the right hand to the forehead in a salute",
        "{subject} is saluting",
        "{subject} stands at attention and salutes",
        "bring the right hand to the brow like a soldier",
    ),
    "hands_on_hips": (
        "put your hands on your hips",
        "hands on hips",
        "{subject} stands with {their} hands on {their} hips",
        "place both hands on the hips",
        "{subject} has {their} hands on {their} waist, elbows out",
        "rest the hands on the hips",
        "{subject} puts {their} fists on {their} hips",
    ),
    "arms_crossed": (
        "cross your arms",
        "fold the arms across the chest",
        "{subject} stands with {their} arms crossed",
        "{subject} has {their} arms folded",
        "arms crossed over the chest",
        "{subject} folds {their} arms in front of {their} chest",
        "stand with folded arms",
    ),
    "hands_behind_head": (
        "put your hands behind your head",
        "{subject} has {their} hands clasped behind {their} head",
        "hands behind the head, elbows out",
        "{subject} stands with {their} hands behind {their} head",
        "lace the fingers behind the head",
        "{subject} cradles the back of {their} head in {their} hands",
        "interlock the hands at the back of the head",
    ),
    "clap": (
        "clap",
        "clap your hands",
        "{subject} claps {their} hands in front of the chest",
        "bring the hands together in a clap",
        "{subject} is clapping",
        "{subject} applauds",
        "put the palms together in front of you",
    ),
    "bow": (
        "bow",
        "take a bow",
        "{subject} bows forward from the waist",
        "bow politely",
        "{subject} is bowing with {their} arms at {their} sides",
        "lean forward in a bow",
        "{subject} bends into a respectful bow",
    ),
    "stretch": (
        "stretch",
        "stretch up towards the sky",
        "{subject} stretches both arms up over {their} head",
        "reach both hands up high and stretch",
        "{subject} is stretching upward",
        "do an overhead stretch",
        "{subject} stretches tall with {their} hands above {their} head",
    ),
    "jump": (
        "jump",
        "jump in the air",
        "{subject} is jumping with {their} arms up",
        "leap up",
        "{subject} jumps, knees bent and arms raised",
        "{subject} springs into the air",
        "hop up high with the arms up",
    ),
    "run": (
        "run",
        "{subject} is running",
        "sprint",
        "{subject} runs forward, arms pumping",
        "jog",
        "{subject} is mid-stride in a run",
        "dash forward",
    ),
    "walk": (
        "walk",
        "{subject} is walking",
        "take a step forward",
        "{subject} walks forward",
        "stroll",
        "{subject} is mid-step while walking",
        "step ahead casually",
    ),
    "fighting_stance": (
        "get into a fighting stance",
        "{subject} is in a boxing stance",
        "put your fists up",
        "{subject} raises {their} fists, ready to fight",
        "take a boxer's guard",
        "{subject} stands ready to fight, left foot forward",
        "adopt a combat stance with the fists up",
    ),
    "tree_pose": (
        "tree pose",
        "do the tree pose",
        "{subject} is in yoga tree pose",
        "stand on one leg with the other foot on the inner thigh",
        "{subject} balances in tree pose with the hands above the head",
        "vrksasana",
        "{subject} does the yoga tree",
    ),
    "warrior_ii": (
        "warrior two",
        "do warrior II",
        "{subject} is in the warrior II yoga pose",
        "warrior 2 pose, arms out to the sides",
        "{subject} holds warrior II with the front knee bent",
        "virabhadrasana II",
        "{subject} stands in a wide yoga lunge with the arms stretched sideways",
    ),
    "downward_dog": (
        "downward dog",
        "do downward-facing dog",
        "{subject} is in downward dog",
        "hands and feet on the floor, hips up high",
        "{subject} makes an inverted V with the body",
        "adho mukha svanasana",
        "{subject} does the downward-facing dog yoga pose",
    ),
    "chair_pose": (
        "chair pose",
        "do the yoga chair pose",
        "{subject} is in chair pose with the arms up",
        "bend the knees as if sitting on an invisible chair, arms overhead",
        "{subject} holds a yoga chair pose",
        "utkatasana",
        "{subject} sits back into an imaginary chair with the arms raised",
    ),
}


# --- the registry -----------------------------------------------------------------------------


def _split_of(index: int, count: int) -> str:
    """Phrasing ``index`` of ``count``: the last is "test", the one before "val", others
    "train"."""
    if index == count - 1:
        return "test"
    if index == count - 2:
        return "val"
    return "train"


@dataclass(frozen=True)
class Action:
    """A named action: a pose generator and its phrasings.

    ``templates`` have their side words filled in; ``{subject}`` and ``{their}`` remain.
    ``side`` is "left", "right", "both" or None (a whole-body action with no side in its name).
    """

    name: str
    description: str
    category: str
    side: str | None
    templates: tuple[str, ...]
    build: Callable[[_Builder], None]

    def __call__(self, rng: np.random.Generator | None = None, variation: float = 1.0):
        """A (24, 3) axis-angle pose: the canonical one (rng None) or a random variation."""
        return self.sample(rng, variation)

    def sample(self, rng: np.random.Generator | None = None, variation: float = 1.0):
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng: expected a numpy Generator or None, got {type(rng).__name__}")
        if not (math.isfinite(variation) and variation >= 0):
            raise ValueError(f"variation: expected a non-negative number, got {variation!r}")
        builder = _Builder(rng, variation)
        self.build(builder)
        return builder.finish()

    def phrasings(self, split: str | None = None) -> tuple[str, ...]:
        """The templates of one split (all of them with None). The last template is held out
        for "test" and the one before for "val"; the rest are "train"."""
        if split is None:
            return self.templates
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS} or None, got {split!r}")
        n = len(self.templates)
        return tuple(t for i, t in enumerate(self.templates) if _split_of(i, n) == split)

    def render(self, rng: np.random.Generator | None = None, split: str = "train") -> str:
        """One phrasing of ``split`` as a sentence: subject filled in, capitalised, with a full
        stop. Without rng: the first template of the split with the first subject."""
        options = self.phrasings(split)
        if rng is None:
            template, (subject, their) = options[0], SUBJECTS[0]
        else:
            template = options[int(rng.integers(len(options)))]
            subject, their = SUBJECTS[int(rng.integers(len(SUBJECTS)))]
        return _sentence(template, subject, their)

    def sentences(self, split: str) -> tuple[str, ...]:
        """Every sentence ``render`` can give for ``split``: each template with each subject."""
        return tuple(_sentence(t, *subject) for t in self.phrasings(split) for subject in SUBJECTS)


def _sentence(template: str, subject: str, their: str) -> str:
    text = template.format(subject=subject, their=their)
    return text[0].upper() + text[1:] + "."


ACTIONS: dict[str, Action] = {}


def _add(
    name: str,
    description: str,
    category: str,
    side: str | None,
    templates: Sequence[str],
    build: Callable[[_Builder], None],
) -> None:
    words = _Keep(_words(side if side is not None else "left"))
    filled = tuple(t.format_map(words) for t in templates)
    if len(filled) < 5 or len(set(filled)) != len(filled):
        raise AssertionError(f"{name}: needs at least 5 distinct phrasings")
    ACTIONS[name] = Action(name, description, category, side, filled, build)


def _plural(side: str, word: str) -> str:
    return f"both_{word}s" if side == "both" else f"{side}_{word}"


def _register_all() -> None:
    arm_builders: dict[str, tuple[Callable[[_Builder, str], None], str]] = {
        "raise": (_raise_arm, "arm straight up overhead"),
        "lower": (_lower_arm, "arm straight down by the side"),
        "bend": (_bend_arm, "upper arm down, elbow bent ~95°, forearm forward"),
        "straighten": (_straighten_arm, "arm straight, angled 45° down in front"),
        "spread": (_spread_arm, "arm straight out to the side at shoulder height"),
        "cross": (_cross_arm, "arm across the front of the body to the other side"),
        "reach": (_reach_arm, "arm reaching up and forward"),
    }
    for verb, (fn, what) in arm_builders.items():
        for side in ("left", "right", "both"):
            _add(
                f"{verb}_{_plural(side, 'arm')}",
                f"{side} {what}",
                "arm",
                side,
                _ARM_PHRASINGS[verb],
                lambda b, fn=fn, side=side: fn(b, side),
            )
    leg_builders: dict[str, tuple[Callable[[_Builder, str], None], str, str, tuple[str, ...]]] = {
        "raise": (_raise_leg, "leg", "straight leg lifted ~70° in front", ("left", "right")),
        "bend": (
            _bend_knee,
            "knee",
            "knee bent ~95°, foot up behind (both: half squat)",
            ("left", "right", "both"),
        ),
        "straighten": (
            _straighten_leg,
            "leg",
            "leg straight in front on the heel, other knee bent (both: standing on straight legs)",
            ("left", "right", "both"),
        ),
        "spread": (
            _spread_leg,
            "leg",
            "leg out to the side (both: wide stance)",
            ("left", "right", "both"),
        ),
    }
    for verb, (fn, noun, what, sides) in leg_builders.items():
        for side in sides:
            _add(
                f"{verb}_{_plural(side, noun)}",
                f"{side}: {what}",
                "leg",
                side,
                _LEG_PHRASINGS[(verb, side == "both")],
                lambda b, fn=fn, side=side: fn(b, side),
            )
    sided: dict[str, tuple[str, Callable[[_Builder, str], None], str, str]] = {
        "kneel": ("kneel_on_{side}_knee", _kneel_one, "body", "that knee on the floor"),
        "lunge": ("lunge_{side}", _lunge, "body", "lunge with that leg in front"),
        "stand_on": ("stand_on_{side}_leg", _stand_on_leg, "body", "standing on that leg only"),
        "lean": ("lean_{side}", _lean_side, "torso", "side bend towards that side"),
        "twist": ("twist_{side}", _twist, "torso", "chest turned towards that side"),
        "turn_head": ("turn_head_{side}", _turn_head, "head", "head turned towards that side"),
        "wave": ("wave_{side}_hand", _wave, "gesture", "that hand raised and waving"),
        "point": ("point_{side}_hand", _point, "gesture", "that arm pointing straight ahead"),
    }
    for key, (pattern, fn, category, what) in sided.items():
        for side in ("left", "right"):
            _add(
                pattern.format(side=side),
                f"{side}: {what}",
                category,
                side,
                _SIDED_PHRASINGS[key],
                lambda b, fn=fn, side=side: fn(b, side),
            )
    body: dict[str, tuple[Callable[[_Builder], None], str, str]] = {
        "sit": (_sit, "body", "sitting on a chair, hips and knees at ~90°, hands on thighs"),
        "kneel_on_both_knees": (_kneel_both, "body", "kneeling upright on both knees"),
        "squat": (_squat, "body", "deep squat, feet flat, arms forward"),
        "bend_forward": (_bend_forward, "torso", "bent forward ~70-95° at the hips"),
        "lean_back": (_lean_back, "torso", "upper body arched backwards"),
        "look_up": (lambda b: _look(b, -40.0), "head", "head tipped back"),
        "look_down": (lambda b: _look(b, 40.0), "head", "head bowed"),
        "t_pose": (_t_pose, "gesture", "T-pose (the SMPL rest pose)"),
        "a_pose": (_a_pose, "gesture", "arms 45° down from the T-pose"),
        "salute": (_salute, "gesture", "military salute with the right hand at the brow"),
        "hands_on_hips": (_hands_on_hips, "gesture", "hands on the hips, elbows out"),
        "arms_crossed": (_arms_crossed, "gesture", "arms folded across the chest"),
        "hands_behind_head": (_hands_behind_head, "gesture", "hands behind the head"),
        "clap": (_clap, "gesture", "hands together in front of the chest"),
        "bow": (_bow, "torso", "bow of ~35° from the hips, arms at the sides"),
        "stretch": (_stretch, "gesture", "both arms straight up, hands close together"),
        "jump": (_jump, "body", "airborne: knees bent, toes pointed, arms up"),
        "run": (_run, "body", "running stride (random leading leg), opposite arm forward"),
        "walk": (_walk, "body", "walking step (random leading leg), arms swinging"),
        "fighting_stance": (_fighting_stance, "body", "boxing guard, left foot forward"),
        "tree_pose": (_tree_pose, "yoga", "tree: one foot on the other inner thigh (random side)"),
        "warrior_ii": (_warrior_ii, "yoga", "warrior II (random front side), arms out"),
        "downward_dog": (_downward_dog, "yoga", "downward dog: hands and feet down, hips up"),
        "chair_pose": (_chair_pose, "yoga", "chair: knees bent, torso forward, arms up"),
    }
    for name, (fn, category, what) in body.items():
        _add(name, what, category, None, _BODY_PHRASINGS[name], fn)


_register_all()


def action_names() -> tuple[str, ...]:
    """All action names, in registration order."""
    return tuple(ACTIONS)


@functools.cache
def held_out_sentences() -> frozenset[str]:
    """Every val and test sentence of every action, case-folded: what no training caption may
    be word for word, whichever action's phrasing (and synonyms) it came from."""
    return frozenset(
        sentence.casefold()
        for action in ACTIONS.values()
        for split in ("val", "test")
        for sentence in action.sentences(split)
    )


def get_action(name: str) -> Action:
    """The action called ``name``; ValueError listing the names otherwise."""
    try:
        return ACTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown action {name!r}; known: {', '.join(ACTIONS)}") from None
