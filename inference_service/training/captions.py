"""Automatic PoseScript-style captions from pose geometry. numpy only.

A pose is measured by forward kinematics (joint positions and world rotations on the built-in
rest skeleton, or on given rest joints) and described by *facts*, each a small fact about one body
part in the spirit of PoseScript's "posecodes":

- angles: elbows and knees straight / slightly bent / bent / sharply bent (measured from the rest
  skeleton's own angle, so the T-pose is "straight");
- distances: hands close together or wide apart, feet wide apart;
- relative positions: a hand above the head (above its crown) or raised above the shoulder, an
  arm stretched out to the side or forward (its elbow straight or slightly bent), a hand in
  front of the body or behind the back, a hand across the body on the other side, a hand by the
  head (up to its crown), one foot in front of the other, a thigh raised level;
- ground contact: the lowest point of the body is the ground; knees or hands that touch it, a foot
  off the ground while the other stands;
- posture: kneeling, sitting position, crouching, standing on one leg;
- torso: leaning forward, bent over, upside down (pointing well below the horizontal), leaning
  back, leaning sideways (out of the body's sagittal plane, at any bend), twisted; head turned,
  looking up or down.

Frame: the SMPL body frame (+Y up, +Z forward, +X the body's own left) with the global
orientation included, so "in front" is +Z as in PoseScript (poses are stored with zero yaw).
LEFT AND RIGHT ARE THE BODY'S OWN.

``pose_facts`` is deterministic given the pose. ``caption_pose`` is deterministic given the pose
and the rng (which only picks phrasings, sentence joins and, beyond the salient facts, which minor
facts to mention); with ``rng=None`` it takes the first phrasing of every fact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared_protocol.arrays import finite_array
from shared_protocol.skeleton import DEFAULT_REST_JOINTS, NUM_JOINTS, forward_kinematics

__all__ = ["Fact", "caption_pose", "pose_facts"]

_PELVIS, _L_HIP, _R_HIP, _SPINE3, _NECK, _HEAD = 0, 1, 2, 9, 12, 15
_J = {
    "left": dict(hip=1, knee=4, ankle=7, foot=10, shoulder=16, elbow=18, wrist=20, hand=22),
    "right": dict(hip=2, knee=5, ankle=8, foot=11, shoulder=17, elbow=19, wrist=21, hand=23),
}
_S = {"left": 1.0, "right": -1.0}
_OTHER = {"left": "right", "right": "left"}
_Z = np.array([0.0, 0.0, 1.0])

# Thresholds (metres, degrees). Joint positions are those of SMPL's joints, not the skin: a
# "touching" hand is within a few centimetres of another joint's centre.
GROUND_CONTACT = 0.08  # a part this close to the lowest point touches the ground
FOOT_OFF_GROUND = 0.15
HANDS_CLOSE, HANDS_APART = 0.15, 1.1
FEET_APART = 0.5  # sideways, between the ankles; ~0.17 standing
HAND_NEAR_HEAD = 0.22  # from the head (the segment from the head joint to the head's centre)
# The head: its centre lies this far above the head joint (along the head's own up axis) and
# its top this far above the centre (the add-on's mannequin: 0.09 and 0.1, so the crown of an
# upright head is 0.19 m above the joint). A hand "above the head" is above the crown.
HEAD_CENTRE, HEAD_RADIUS = 0.09, 0.1
UPSIDE_DOWN = 25  # degrees below the horizontal the torso points, past which it is upside down
STRETCHED_ELBOW = 60  # an arm "stretched" (forward, out to the side) is bent less than this
FOOT_IN_FRONT = 0.25
CROUCH_HEIGHT = 0.5  # pelvis above the ground; ~0.95 standing


@dataclass(frozen=True, order=True)
class Fact:
    """One fact about the pose. ``side`` is "left", "right", "both" or "" (the whole body)."""

    kind: str
    side: str
    value: str
    salience: float = 0.5


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _flexion(p: np.ndarray, rest: np.ndarray, a: int, b: int, c: int) -> float:
    """How far the joint b is bent from the rest skeleton's angle, degrees (0 = as at rest)."""
    at_rest = _angle(rest[a] - rest[b], rest[c] - rest[b])
    return at_rest - _angle(p[a] - p[b], p[c] - p[b])


def _elevation(v: np.ndarray, axis: int) -> float:
    """The angle of v out of the plane normal to ``axis`` (towards +axis), radians."""
    return math.asin(max(-1.0, min(1.0, float(v[axis] / np.linalg.norm(v)))))


def _to_segment(point: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from a point to the segment a-b."""
    ab = b - a
    t = float(np.clip(np.dot(point - a, ab) / max(float(np.dot(ab, ab)), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(point - (a + t * ab)))


def _bend_value(flex: float) -> tuple[str, float]:
    if flex < 25:
        return "straight", 0.25
    if flex < 60:
        return "slightly bent", 0.4
    if flex < 115:
        return "bent", 0.75
    return "sharply bent", 0.85


def pose_facts(axis_angle, rest_joints=None) -> list[Fact]:
    """The facts of one pose ((24, 3) axis-angle), left and right ones merged into "both" where
    they agree, ordered from the most to the least salient (ties in a fixed order)."""
    aa = finite_array(axis_angle, "axis_angle", (NUM_JOINTS, 3))
    if aa.shape != (NUM_JOINTS, 3):
        raise ValueError(f"axis_angle: expected one pose of shape (24, 3), got {aa.shape}")
    rest = (
        DEFAULT_REST_JOINTS
        if rest_joints is None
        else finite_array(rest_joints, "rest_joints", (NUM_JOINTS, 3))
    )
    if rest.shape != (NUM_JOINTS, 3):
        raise ValueError(f"rest_joints: expected shape (24, 3), got {rest.shape}")
    body = _Body.of(aa, rest)
    facts = [*_posture_facts(body), *_torso_facts(body), *_arm_facts(body), *_leg_facts(body)]
    return _ordered(_merge(facts))


@dataclass(frozen=True)
class _Body:
    """What every group of facts measures a pose by: its joints' positions ``p`` and global
    rotations ``g``, each part's height above the lowest joint, the parts on the ground, the
    knees' bends and the torso's incline."""

    p: np.ndarray
    g: np.ndarray
    rest: np.ndarray
    height: dict[str, float]
    touching: set[str]
    knee_flex: dict[str, float]
    pitch: float  # degrees, > 0 leaning forward
    roll: float  # degrees, > 0 to the left
    upside_down: bool

    @classmethod
    def of(cls, aa: np.ndarray, rest: np.ndarray) -> _Body:
        p, g = forward_kinematics(aa, rest)
        ground = float(p[:, 1].min())
        height = {
            "pelvis": p[_PELVIS, 1] - ground,
            "head": p[_HEAD, 1] - ground,
        }
        for side, j in _J.items():
            height[f"{side}_foot"] = min(p[j["ankle"], 1], p[j["foot"], 1]) - ground
            height[f"{side}_knee"] = p[j["knee"], 1] - ground
            height[f"{side}_hand"] = min(p[j["wrist"], 1], p[j["hand"], 1]) - ground
        # Torso incline relative to the rest skeleton's own (its neck is ~4° behind the pelvis
        # and ~1° to its right).
        torso = p[_NECK] - p[_PELVIS]
        rest_torso = rest[_NECK] - rest[_PELVIS]
        pitch = math.degrees(
            math.atan2(torso[2], torso[1]) - math.atan2(rest_torso[2], rest_torso[1])
        )
        # Sideways: the angle out of the body's sagittal plane (poses have zero yaw, so that
        # plane is world YZ at any bend), not atan2(x, y), which past the horizontal turns the
        # rest neck's small offset into a large angle.
        roll = math.degrees(_elevation(torso, 0) - _elevation(rest_torso, 0))
        below_horizontal = -math.degrees(_elevation(torso, 1))  # > 0 the torso points down
        return cls(
            p=p,
            g=g,
            rest=rest,
            height=height,
            touching={part for part, h in height.items() if h < GROUND_CONTACT},
            knee_flex={
                s: _flexion(p, rest, j["hip"], j["knee"], j["ankle"]) for s, j in _J.items()
            },
            pitch=pitch,
            roll=roll,
            upside_down=below_horizontal > UPSIDE_DOWN,
        )

    def down(self, part: str) -> list[str]:
        """The sides whose ``part`` (knee, foot, hand) is on the ground."""
        return [s for s in ("left", "right") if f"{s}_{part}" in self.touching]


def _posture_facts(body: _Body) -> list[Fact]:
    """Kneeling, hands on the ground, standing on one leg, sitting, crouching."""
    p, height, facts = body.p, body.height, []
    add = facts.append
    knees_down, feet_down = body.down("knee"), body.down("foot")
    for side in knees_down:
        add(Fact("kneel", side, "on the knee", 0.95))
    for side in body.down("hand"):
        add(Fact("ground", side, "hand on the ground", 0.9))
    if len(feet_down) == 1 and not knees_down:
        lifted = _OTHER[feet_down[0]]
        if height[f"{lifted}_foot"] > FOOT_OFF_GROUND:
            add(Fact("one_leg", feet_down[0], "standing on the leg", 0.9))
            add(Fact("foot_off", lifted, "off the ground", 0.6))

    thighs_level = []
    for side, j in _J.items():
        if p[j["knee"], 1] > p[j["hip"], 1] - 0.12 and p[j["knee"], 2] > p[j["hip"], 2] + 0.15:
            thighs_level.append(side)
            add(Fact("thigh", side, "raised", 0.55))
    upright = abs(body.pitch) < 35 and abs(body.roll) < 35
    bent_knees = min(body.knee_flex.values()) > 60
    sitting = len(thighs_level) == 2 and upright and bent_knees and not knees_down
    low = height["pelvis"] < CROUCH_HEIGHT
    torso_up = p[_NECK, 1] - p[_PELVIS, 1] > 0
    if sitting and not low:
        add(Fact("posture", "", "sitting", 0.9))
    elif not knees_down and low and torso_up and body.pitch > -20:
        add(Fact("posture", "", "crouching", 0.85))
    return facts


def _torso_facts(body: _Body) -> list[Fact]:
    """The torso's incline and twist, and where the head turns."""
    g, pitch, roll, facts = body.g, body.pitch, body.roll, []
    add = facts.append
    if body.upside_down:
        add(Fact("torso", "", "upside down", 0.9))
    elif pitch > 60:
        add(Fact("torso", "", "bent over", 0.9))
    elif pitch > 20:
        add(Fact("torso", "", "leaning forward", 0.8))
    elif pitch < -15:
        add(Fact("torso", "", "leaning back", 0.8))
    if not body.upside_down and abs(roll) > 15:
        add(Fact("torso_side", "left" if roll > 0 else "right", "leaning", 0.75))

    chest_in_pelvis = g[_PELVIS].T @ g[_SPINE3] @ _Z
    twist = math.degrees(math.atan2(chest_in_pelvis[0], chest_in_pelvis[2]))
    if abs(twist) > 25:
        add(Fact("twist", "left" if twist > 0 else "right", "twisted", 0.7))
    face = g[_SPINE3].T @ g[_HEAD] @ _Z  # where the face points, in the chest's frame
    yaw = math.degrees(math.atan2(face[0], face[2]))
    if abs(yaw) > 30:
        add(Fact("head_turn", "left" if yaw > 0 else "right", "turned", 0.7))
    if face[1] < -0.35:
        add(Fact("head_pitch", "", "looking down", 0.55))
    elif face[1] > 0.35:
        add(Fact("head_pitch", "", "looking up", 0.55))
    return facts


def _arm_facts(body: _Body) -> list[Fact]:
    """Each arm's bend, height and direction, where each hand is, and the hands together."""
    p, g, rest, facts = body.p, body.g, body.rest, []
    add = facts.append
    chest = p[_SPINE3]
    head_centre = p[_HEAD] + g[_HEAD] @ np.array([0.0, HEAD_CENTRE, 0.0])
    crown = head_centre[1] + HEAD_RADIUS  # the top of the head's height
    for side, j in _J.items():
        s = _S[side]
        wrist, shoulder = p[j["wrist"]], p[j["shoulder"]]
        # In front of / behind the body: measured in the chest's own frame (a bow keeps the
        # hanging hands "at the sides", not "behind").
        depth = (g[_SPINE3].T @ (wrist - chest))[2]
        elbow_flex = _flexion(p, rest, j["shoulder"], j["elbow"], j["wrist"])
        value, sal = _bend_value(elbow_flex)
        add(Fact("elbow", side, value, sal))
        out = s * (wrist[0] - shoulder[0])
        ahead = wrist[2] - shoulder[2]
        if wrist[1] > crown:
            add(Fact("hand_height", side, "above the head", 0.85))
        elif wrist[1] > shoulder[1] + 0.1:
            add(Fact("hand_height", side, "above the shoulder", 0.65))
        stretched = elbow_flex < STRETCHED_ELBOW  # the elbow straight or slightly bent
        if stretched and abs(wrist[1] - shoulder[1]) < 0.15 and out > 0.4:
            add(Fact("arm_direction", side, "out to the side", 0.6))
        elif stretched and abs(wrist[1] - shoulder[1]) < 0.2 and ahead > 0.35:
            add(Fact("arm_direction", side, "forward", 0.6))
        elif depth > 0.3:
            add(Fact("hand_depth", side, "in front of the body", 0.45))
        if depth < -0.2:
            add(Fact("hand_depth", side, "behind the back", 0.6))
        at_waist = g[_PELVIS].T @ (wrist - p[_PELVIS])  # in the pelvis's frame
        on_waist = abs(at_waist[1]) < 0.15 and 0.1 < s * at_waist[0] < 0.3
        if on_waist and abs(at_waist[2]) < 0.15 and elbow_flex > 45:
            add(Fact("hand_hip", side, "on the hip", 0.7))
        if s * (wrist[0] - chest[0]) < -0.05:
            add(Fact("hand_cross", side, "across the body", 0.65))
        near_head = _to_segment(wrist, p[_HEAD], head_centre) < HAND_NEAR_HEAD
        if near_head and wrist[1] <= crown:
            add(Fact("hand_head", side, "by the head", 0.7))
    wrist_gap = float(np.linalg.norm(p[20] - p[21]))
    if wrist_gap < HANDS_CLOSE:
        add(Fact("hands", "both", "close together", 0.75))
    elif wrist_gap > HANDS_APART:
        add(Fact("hands", "both", "wide apart", 0.55))
    dy = p[20, 1] - p[21, 1]
    if abs(dy) > 0.3:
        add(Fact("hand_higher", "left" if dy > 0 else "right", "higher", 0.35))
    return facts


def _leg_facts(body: _Body) -> list[Fact]:
    """Each knee's bend, and where the feet stand."""
    p, facts = body.p, []
    add = facts.append
    for side in ("left", "right"):
        value, sal = _bend_value(body.knee_flex[side])
        add(Fact("knee", side, value, sal))
    ankle_gap = abs(float(p[7, 0] - p[8, 0]))  # sideways: one foot ahead is "foot_front"
    if ankle_gap > FEET_APART:
        add(Fact("feet", "both", "wide apart", 0.6))
    dz = min(p[7, 2], p[10, 2]) - min(p[8, 2], p[11, 2])
    if abs(dz) > FOOT_IN_FRONT:
        add(Fact("foot_front", "left" if dz > 0 else "right", "in front", 0.6))
    return facts


# Kinds that describe one side each and may merge into "both".
_MERGEABLE = {
    "elbow", "knee", "hand_height", "arm_direction", "hand_depth", "hand_cross", "hand_head",
    "kneel", "ground", "thigh", "hand_hip",
}  # fmt: skip
_KIND_ORDER = (
    "posture", "kneel", "one_leg", "ground", "torso", "torso_side", "twist", "head_turn",
    "head_pitch", "hand_height", "arm_direction", "elbow", "hands", "hand_head", "hand_hip",
    "hand_cross",
    "hand_depth", "hand_higher", "thigh", "knee", "feet", "foot_front", "foot_off",
)  # fmt: skip


def _merge(facts: list[Fact]) -> list[Fact]:
    out: list[Fact] = []
    by_key = {}
    for f in facts:
        if f.kind in _MERGEABLE and f.side in ("left", "right"):
            other = by_key.get((f.kind, f.value, _OTHER[f.side]))
            if other is not None:
                out[out.index(other)] = Fact(
                    f.kind, "both", f.value, max(f.salience, other.salience)
                )
                del by_key[(other.kind, other.value, other.side)]
                continue
            by_key[(f.kind, f.value, f.side)] = f
        out.append(f)
    return out


def _ordered(facts: list[Fact]) -> list[Fact]:
    return sorted(facts, key=lambda f: (-f.salience, _KIND_ORDER.index(f.kind), f.side, f.value))


# --- phrasing ---------------------------------------------------------------------------------
# (kind, value) -> (templates for one side, templates for both). {side}/{other} are side words;
# {subject}/{their} the subject. Every template is a clause; sentences are assembled later.

_PHRASES: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("posture", "sitting"): (
        (),
        ("{subject} is in a sitting position", "{subject} is sitting, thighs level"),
    ),
    ("posture", "crouching"): ((), ("{subject} is crouching low", "{subject} is squatting down")),
    ("kneel", "on the knee"): (
        ("{subject} is kneeling on {their} {side} knee", "the {side} knee is on the ground"),
        ("{subject} is kneeling on both knees", "both knees are on the ground"),
    ),
    ("ground", "hand on the ground"): (
        ("the {side} hand touches the ground", "the {side} hand is on the floor"),
        ("both hands are on the ground", "both hands touch the floor"),
    ),
    ("one_leg", "standing on the leg"): (
        ("{subject} is standing on {their} {side} leg", "{subject} balances on the {side} foot"),
        (),
    ),
    ("foot_off", "off the ground"): (
        ("the {side} foot is off the ground", "the {side} foot is lifted"),
        (),
    ),
    ("torso", "upside down"): (
        (),
        ("the upper body points down towards the ground", "the torso is upside down"),
    ),
    ("torso", "bent over"): (
        (),
        ("{subject} is bent over at the hips", "the upper body is bent far forward"),
    ),
    ("torso", "leaning forward"): (
        (),
        ("{subject} is leaning forward", "the upper body leans forward"),
    ),
    ("torso", "leaning back"): ((), ("{subject} is leaning back", "the upper body leans back")),
    ("torso_side", "leaning"): (
        ("the upper body leans to the {side}", "{subject} is leaning to {their} {side}"),
        (),
    ),
    ("twist", "twisted"): (
        ("the torso is twisted to the {side}", "the chest is turned to the {side}"),
        (),
    ),
    ("head_turn", "turned"): (
        ("the head is turned to the {side}", "{subject} is looking to the {side}"),
        (),
    ),
    ("head_pitch", "looking down"): ((), ("{subject} is looking down", "the head is bowed")),
    ("head_pitch", "looking up"): ((), ("{subject} is looking up", "the head is tilted back")),
    ("hand_height", "above the head"): (
        ("the {side} hand is above the head", "the {side} hand is raised over the head"),
        ("both hands are above the head", "both hands are raised over the head"),
    ),
    ("hand_height", "above the shoulder"): (
        ("the {side} hand is raised above shoulder level", "the {side} hand is up high"),
        ("both hands are raised above shoulder level", "both hands are up high"),
    ),
    ("arm_direction", "out to the side"): (
        ("the {side} arm is stretched out to the side", "the {side} arm reaches out sideways"),
        ("both arms are stretched out to the sides", "the arms reach out sideways"),
    ),
    ("arm_direction", "forward"): (
        ("the {side} arm is stretched forward", "the {side} arm points forward"),
        ("both arms are stretched forward", "the arms point forward"),
    ),
    ("elbow", "straight"): (
        ("the {side} arm is straight", "the {side} elbow is straight"),
        ("both arms are straight", "both elbows are straight"),
    ),
    ("elbow", "slightly bent"): (
        ("the {side} elbow is slightly bent", "the {side} arm is a little bent"),
        ("both elbows are slightly bent", "both arms are a little bent"),
    ),
    ("elbow", "bent"): (
        ("the {side} elbow is bent", "the {side} arm is bent at the elbow"),
        ("both elbows are bent", "both arms are bent at the elbows"),
    ),
    ("elbow", "sharply bent"): (
        ("the {side} elbow is sharply bent", "the {side} arm is fully folded"),
        ("both elbows are sharply bent", "both arms are fully folded"),
    ),
    ("hands", "close together"): ((), ("the hands are close together", "the hands are touching")),
    ("hands", "wide apart"): (
        (),
        ("the hands are wide apart", "the hands are far from each other"),
    ),
    ("hand_head", "by the head"): (
        ("the {side} hand is by the head", "the {side} hand is close to the head"),
        ("both hands are by the head", "both hands are close to the head"),
    ),
    ("hand_hip", "on the hip"): (
        ("the {side} hand is on the hip", "the {side} hand rests on the waist"),
        ("both hands are on the hips", "the hands rest on the waist"),
    ),
    ("hand_cross", "across the body"): (
        (
            "the {side} hand is across the body, on the {other} side",
            "the {side} arm crosses over to the {other} side",
        ),
        ("the arms are crossed in front of the body", "the hands cross over to opposite sides"),
    ),
    ("hand_depth", "in front of the body"): (
        ("the {side} hand is in front of the body", "the {side} hand is held out in front"),
        ("both hands are in front of the body", "both hands are held out in front"),
    ),
    ("hand_depth", "behind the back"): (
        ("the {side} hand is behind the back", "the {side} hand is behind the body"),
        ("both hands are behind the back", "both hands are behind the body"),
    ),
    ("hand_higher", "higher"): (
        (
            "the {side} hand is higher than the {other} hand",
            "the {other} hand is lower than the {side} hand",
        ),
        (),
    ),
    ("thigh", "raised"): (
        ("the {side} thigh is raised level", "the {side} knee is lifted up to hip height"),
        ("both thighs are level", "both knees are up at hip height"),
    ),
    ("knee", "straight"): (
        ("the {side} leg is straight", "the {side} knee is straight"),
        ("both legs are straight", "both knees are straight"),
    ),
    ("knee", "slightly bent"): (
        ("the {side} knee is slightly bent", "the {side} leg is a little bent"),
        ("both knees are slightly bent", "both legs are a little bent"),
    ),
    ("knee", "bent"): (
        ("the {side} knee is bent", "the {side} leg is bent at the knee"),
        ("both knees are bent", "both legs are bent at the knees"),
    ),
    ("knee", "sharply bent"): (
        ("the {side} knee is sharply bent", "the {side} leg is fully folded"),
        ("both knees are sharply bent", "both legs are fully folded"),
    ),
    ("feet", "wide apart"): ((), ("the feet are wide apart", "the legs are spread wide")),
    ("foot_front", "in front"): (
        (
            "the {side} foot is in front of the {other} foot",
            "the {other} foot is behind the {side} foot",
        ),
        (),
    ),
}

_SUBJECTS = (("the person", "their"), ("someone", "their"), ("a man", "his"), ("a woman", "her"))


def _phrase(fact: Fact, rng: np.random.Generator | None, subject: str, their: str) -> str:
    single, both = _PHRASES[(fact.kind, fact.value)]
    options = both if fact.side in ("both", "") else single
    template = options[0] if rng is None else options[int(rng.integers(len(options)))]
    other = _OTHER.get(fact.side, "")
    return template.format(side=fact.side, other=other, subject=subject, their=their)


def caption_pose(
    axis_angle,
    rng: np.random.Generator | None = None,
    *,
    max_facts: int = 6,
    rest_joints=None,
) -> str:
    """A caption for one pose: up to ``max_facts`` facts as sentences.

    The facts with salience ≥ 0.5 come first (most salient first); remaining slots go to minor
    facts (chosen by the rng, or the first ones without it). The facts are then told in a fixed
    body order: posture, torso and head, arms, legs.
    """
    if isinstance(max_facts, bool) or not isinstance(max_facts, int) or max_facts < 1:
        raise ValueError(f"max_facts: expected a positive integer, got {max_facts!r}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng: expected a numpy Generator or None, got {type(rng).__name__}")
    facts = pose_facts(axis_angle, rest_joints)
    major = [f for f in facts if f.salience >= 0.5][:max_facts]
    minor = [f for f in facts if f.salience < 0.5]
    room = max_facts - len(major)
    if room > 0 and minor:
        if rng is None:
            chosen = minor[:room]
        else:
            picks = rng.choice(len(minor), size=min(room, len(minor)), replace=False)
            chosen = [minor[i] for i in sorted(picks)]
        major += chosen
    told = sorted(major, key=lambda f: (_KIND_ORDER.index(f.kind), f.side))
    subject, their = _SUBJECTS[0] if rng is None else _SUBJECTS[int(rng.integers(len(_SUBJECTS)))]
    clauses = [_phrase(f, rng, subject, their) for f in told]
    if not any(f.kind in ("posture", "kneel", "one_leg", "torso") for f in told):
        clauses.insert(0, f"{subject} is standing")
    sentences: list[str] = []
    i = 0
    while i < len(clauses):
        join = i + 1 < len(clauses) and (rng.random() < 0.4 if rng is not None else False)
        if join:
            sentences.append(f"{clauses[i]} and {clauses[i + 1]}")
            i += 2
        else:
            sentences.append(clauses[i])
            i += 1
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)
