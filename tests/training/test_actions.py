"""The action library: every action's pose is plausible, upright with zero yaw, and
geometrically what its name says (checked by forward kinematics), left and right being the
body's own; phrasings are varied and split so that some are never seen in training. Also the
joint limits and the random plausible-pose sampler the actions and the corpus build on."""

from __future__ import annotations

import functools
import os
import re
import zlib

import numpy as np
import pytest

from inference_service.training import actions as A
from inference_service.training import joint_limits as L
from inference_service.training.joint_limits import MIRROR_INDEX, limit_violation
from shared_protocol.pose import SOLE_DEPTH
from shared_protocol.skeleton import JOINT_NAMES, forward_kinematics

PELVIS, L_HIP, R_HIP, SPINE3 = 0, 1, 2, 9
L_KNEE, R_KNEE, L_ANKLE, R_ANKLE, L_FOOT, R_FOOT = 4, 5, 7, 8, 10, 11
HEAD = 15
L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 16, 17, 18, 19, 20, 21
X, Y, Z = 0, 1, 2
SIDE = {"left": dict(shoulder=16, elbow=18, wrist=20, hip=1, knee=4, ankle=7, foot=10, s=1.0)}
SIDE["right"] = dict(shoulder=17, elbow=19, wrist=21, hip=2, knee=5, ankle=8, foot=11, s=-1.0)
OTHER = {"left": "right", "right": "left"}
# Random variations checked per action besides the canonical pose (raise it for a stress run).
SAMPLES = int(os.environ.get("ACTION_TEST_SAMPLES", "6"))


@functools.cache
def poses_of(name: str) -> tuple[np.ndarray, ...]:
    action = A.get_action(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (action(None), *(action(rng) for _ in range(SAMPLES)))


def fk(pose):
    return forward_kinematics(pose)


def interior_angle(p, a: int, b: int, c: int) -> float:
    """Angle at joint b between the bones to a and to c, degrees (180 = straight; the rest
    skeleton's legs are at ~169°, its arms at ~173°)."""
    u, v = p[a] - p[b], p[c] - p[b]
    return float(np.degrees(np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v))))


def torso_incline(p) -> float:
    """Angle of pelvis -> neck from the vertical, degrees, signed: > 0 leaning forward."""
    v = p[12] - p[PELVIS]
    return float(np.degrees(np.arctan2(v[Z], v[Y])))


STANDING_HEAD_Y = fk(np.zeros((24, 3)))[0][HEAD, Y]

# How far the body's surface lies below a joint's centre where it touches the floor (the add-on's
# mannequin: the thigh's capsule is 0.065 thick at the knee, the shin's 0.05, a hand's 0.03;
# the soles lie SOLE_DEPTH below the foot's joints).
KNEE_DEPTH, SHIN_DEPTH, HAND_DEPTH = 0.065, 0.05, 0.03
ON_THE_FLOOR = 0.03  # a part this close to the floor's level rests on it


def many_poses_of(name: str, n: int = 30) -> tuple[np.ndarray, ...]:
    action = A.get_action(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    return (action(None), *(action(rng) for _ in range(n)))


def sole(p, s) -> float:
    """Height of a foot's sole: its lowest joint less the sole's depth."""
    return min(p[s["ankle"], Y], p[s["foot"], Y]) - SOLE_DEPTH


def elevation(p, a: int, b: int) -> float:
    """Angle of the bone a -> b above the horizontal, degrees."""
    v = p[b] - p[a]
    return float(np.degrees(np.arcsin(v[Y] / np.linalg.norm(v))))


# --- every action ------------------------------------------------------------------------------


def test_library_size_and_required_actions():
    names = set(A.action_names())
    assert len(names) >= 40
    required = [
        *(
            f"{v}_{s}_arm"
            for v in ("raise", "lower", "bend", "straighten", "spread", "cross", "reach")
            for s in ("left", "right")
        ),
        *(
            f"{v}_both_arms"
            for v in ("raise", "lower", "bend", "straighten", "spread", "cross", "reach")
        ),
        "raise_left_leg",
        "bend_both_knees",
        "straighten_right_leg",
        "spread_both_legs",
        "sit",
        "kneel_on_left_knee",
        "kneel_on_right_knee",
        "kneel_on_both_knees",
        "squat",
        "lunge_left",
        "lunge_right",
        "stand_on_left_leg",
        "stand_on_right_leg",
        "bend_forward",
        "lean_back",
        "twist_left",
        "twist_right",
        "turn_head_left",
        "turn_head_right",
        "t_pose",
        "a_pose",
        "wave_left_hand",
        "point_right_hand",
        "salute",
        "hands_on_hips",
        "arms_crossed",
        "hands_behind_head",
        "clap",
        "bow",
        "stretch",
        "jump",
        "run",
        "walk",
        "fighting_stance",
        "tree_pose",
        "warrior_ii",
        "downward_dog",
    ]
    assert not [n for n in required if n not in names]


@pytest.mark.parametrize("name", A.action_names())
def test_action_pose_is_valid_upright_and_within_limits(name):
    for pose in poses_of(name):
        assert pose.shape == (24, 3) and np.all(np.isfinite(pose))
        assert limit_violation(pose) < 1e-6
        rotations = fk(pose)[1]
        forward = rotations[PELVIS] @ np.array([0.0, 0.0, 1.0])
        assert abs(forward[X]) < 1e-9, "global orientation must have zero yaw"
        if name != "downward_dog":  # the only action that tips the pelvis past the horizontal
            assert forward[Z] > 0


@pytest.mark.parametrize("name", A.action_names())
def test_action_phrasings_and_splits(name):
    action = A.get_action(name)
    assert len(action.templates) >= 5
    train, val, test = (action.phrasings(s) for s in A.SPLITS)
    assert len(train) >= 3 and len(val) == 1 and len(test) == 1
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert set(train) | set(val) | set(test) == set(action.templates)
    for text in action.templates:
        assert "{" not in text.replace("{subject}", "").replace("{their}", "")
    if action.side in ("left", "right"):  # sided phrasings name their side
        assert all(action.side in t for t in action.templates), action.templates
        # The other side's word only ever names the other limb ("... the right foot in front").
        other = OTHER[action.side]
        for text in action.templates:
            for match in re.finditer(rf"\b{other}\b(\s\w+)?", text):
                assert match.group(1) in (" side", " foot", " knee", " leg", " one"), text
    rendered = action.render(np.random.default_rng(0), "test")
    assert rendered[0].isupper() and rendered.endswith(".") and "{" not in rendered


def test_sampling_is_deterministic_and_varied():
    action = A.get_action("raise_left_arm")
    a = action(np.random.default_rng(5))
    b = action(np.random.default_rng(5))
    c = action(np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(action(None), action(None))
    with pytest.raises(ValueError, match="rng"):
        action(42)
    with pytest.raises(ValueError, match="unknown action"):
        A.get_action("moonwalk")


@pytest.mark.parametrize(
    "left_name",
    [n for n in A.action_names() if A.get_action(n).side == "left"],
)
def test_right_action_is_the_mirror_of_the_left_one(left_name):
    right_name = left_name.replace("left", "right")
    p_left = fk(A.get_action(left_name)(None))[0]
    p_right = fk(A.get_action(right_name)(None))[0]
    mirrored = p_left[list(MIRROR_INDEX)] * np.array([-1.0, 1.0, 1.0])
    # The built-in skeleton is not exactly symmetric: allow a few centimetres.
    assert np.abs(mirrored - p_right).max() < 0.06


# --- limb-level actions ------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_raise_arm_moves_the_named_arm_only(side):
    s, o = SIDE[side], SIDE[OTHER[side]]
    for pose in poses_of(f"raise_{side}_arm"):
        p = fk(pose)[0]
        assert p[s["wrist"], Y] > p[s["shoulder"], Y] + 0.35
        assert p[s["wrist"], Y] > p[HEAD, Y]
        assert p[o["wrist"], Y] < p[o["shoulder"], Y] - 0.25
    # "left" means the body's own left: joint 20 sits at x > 0.
    p = fk(A.get_action(f"raise_{side}_arm")(None))[0]
    assert np.sign(p[s["wrist"], X]) == s["s"]


def test_raise_both_arms():
    for pose in poses_of("raise_both_arms"):
        p = fk(pose)[0]
        assert p[L_WRIST, Y] > p[HEAD, Y] + 0.1 and p[R_WRIST, Y] > p[HEAD, Y] + 0.1


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_lower_bend_straighten_spread_arms(side):
    sides = ("left", "right") if side == "both" else (side,)
    plural = "arms" if side == "both" else "arm"
    for verb, check in (
        (
            "lower",
            lambda p, s: (
                p[s["wrist"], Y] < p[s["shoulder"], Y] - 0.45
                and abs(p[s["wrist"], X] - p[s["shoulder"], X]) < 0.2
            ),
        ),
        (
            "bend",
            lambda p, s: (
                50 < interior_angle(p, s["shoulder"], s["elbow"], s["wrist"]) < 130
                and p[s["wrist"], Z] > p[s["elbow"], Z] + 0.1
            ),
        ),
        (
            "straighten",
            lambda p, s: (
                interior_angle(p, s["shoulder"], s["elbow"], s["wrist"]) > 165
                and p[s["wrist"], Z] > p[s["shoulder"], Z] + 0.2
                and p[s["wrist"], Y] < p[s["shoulder"], Y]
            ),
        ),
        (
            "spread",
            lambda p, s: (
                abs(p[s["wrist"], Y] - p[s["shoulder"], Y]) < 0.15
                and s["s"] * (p[s["wrist"], X] - p[s["shoulder"], X]) > 0.45
            ),
        ),
        (
            "cross",
            lambda p, s: (
                s["s"] * (p[s["wrist"], X] - p[PELVIS, X]) < -0.03
                and p[s["wrist"], Z] > p[PELVIS, Z] + 0.2
            ),
        ),
        (
            "reach",
            lambda p, s: (
                p[s["wrist"], Y] > p[s["shoulder"], Y] + 0.25
                and p[s["wrist"], Z] > p[s["shoulder"], Z] + 0.2
            ),
        ),
    ):
        for pose in poses_of(f"{verb}_{side}_{plural}"):
            p = fk(pose)[0]
            for name in sides:
                assert check(p, SIDE[name]), (verb, side, name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_leg_actions(side):
    s, o = SIDE[side], SIDE[OTHER[side]]
    for pose in poses_of(f"raise_{side}_leg"):
        p = fk(pose)[0]
        assert p[s["ankle"], Z] > p[PELVIS, Z] + 0.3
        assert p[s["ankle"], Y] > p[o["ankle"], Y] + 0.2
        assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) > 155
    for pose in poses_of(f"bend_{side}_knee"):
        p = fk(pose)[0]
        assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) < 110
        assert p[s["ankle"], Y] > p[o["ankle"], Y] + 0.2
        assert p[s["ankle"], Z] < p[s["knee"], Z]  # the foot comes up behind
    for pose in poses_of(f"straighten_{side}_leg"):
        p = fk(pose)[0]
        assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) > 160
        assert interior_angle(p, o["hip"], o["knee"], o["ankle"]) < 160
        assert p[s["ankle"], Z] > p[o["ankle"], Z] + 0.15
    for pose in poses_of(f"spread_{side}_leg"):
        p = fk(pose)[0]
        assert s["s"] * (p[s["ankle"], X] - p[s["hip"], X]) > 0.2
        assert p[s["ankle"], Y] > p[o["ankle"], Y] + 0.05


def test_both_legs_actions():
    for pose in poses_of("bend_both_knees"):
        p = fk(pose)[0]
        for s in SIDE.values():
            assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) < 140
        assert p[PELVIS, Y] - min(p[L_FOOT, Y], p[R_FOOT, Y]) < 0.85
    for pose in poses_of("straighten_both_legs"):
        p = fk(pose)[0]
        for s in SIDE.values():
            assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) > 160
    for pose in poses_of("spread_both_legs"):
        p = fk(pose)[0]
        assert p[L_ANKLE, X] - p[R_ANKLE, X] > 0.5


# --- whole-body actions ------------------------------------------------------------------------


def test_sit():
    for pose in poses_of("sit"):
        p = fk(pose)[0]
        for s in SIDE.values():
            hip_angle = interior_angle(p, 12, s["hip"], s["knee"])
            assert 65 < hip_angle < 115, hip_angle
            assert 65 < interior_angle(p, s["hip"], s["knee"], s["ankle"]) < 115
            assert p[s["knee"], Z] > p[PELVIS, Z] + 0.3  # knees forward of the pelvis


@pytest.mark.parametrize("side", ["left", "right"])
def test_kneel_on_one_knee(side):
    s, o = SIDE[side], SIDE[OTHER[side]]
    for pose in poses_of(f"kneel_on_{side}_knee"):
        p = fk(pose)[0]
        # The kneeling knee is on the floor: as low as the lowest joint (a sole's joint) but
        # for the knee's greater depth below its surface.
        assert p[s["knee"], Y] - p[:, Y].min() < KNEE_DEPTH - SOLE_DEPTH + 0.02
        assert p[o["knee"], Y] > p[s["knee"], Y] + 0.25
        assert p[o["foot"], Z] > p[s["knee"], Z] + 0.2  # the other foot is in front


def test_kneel_on_both_knees():
    for pose in poses_of("kneel_on_both_knees"):
        p = fk(pose)[0]
        for s in SIDE.values():  # both knees on the floor (see test_kneel_on_one_knee)
            assert p[s["knee"], Y] - p[:, Y].min() < KNEE_DEPTH - SOLE_DEPTH + 0.02
        assert p[PELVIS, Y] > max(p[L_KNEE, Y], p[R_KNEE, Y]) + 0.3  # kneeling upright


def assert_shin_along_the_floor(p, s):
    # Kneeling: the knee on the floor, the shin lying back along it, the toes pointing back.
    floor = p[s["knee"], Y] - KNEE_DEPTH
    assert abs(p[s["ankle"], Y] - SHIN_DEPTH - floor) < ON_THE_FLOOR, "shin along the floor"
    assert abs(p[s["foot"], Y] - SOLE_DEPTH - floor) < ON_THE_FLOOR, "toes on the floor"
    assert p[s["foot"], Z] < p[s["ankle"], Z] < p[s["knee"], Z] - 0.3


@pytest.mark.parametrize("side", ["left", "right"])
def test_kneeling_on_one_knee_the_other_foot_is_flat_on_the_floor(side):
    s, o = SIDE[side], SIDE[OTHER[side]]
    for pose in many_poses_of(f"kneel_on_{side}_knee"):
        p = fk(pose)[0]
        floor = p[s["knee"], Y] - KNEE_DEPTH
        assert abs(sole(p, o) - floor) < ON_THE_FLOOR, sole(p, o) - floor
        assert abs(elevation(p, o["knee"], o["ankle"]) + 90) < 20  # the front shin upright
        assert abs(elevation(p, o["hip"], o["knee"])) < 25  # the front thigh about level
        assert_shin_along_the_floor(p, s)


def test_kneeling_on_both_knees_the_shins_lie_along_the_floor():
    for pose in many_poses_of("kneel_on_both_knees"):
        p = fk(pose)[0]
        for s in SIDE.values():
            assert_shin_along_the_floor(p, s)


def test_downward_dog_hands_and_feet_on_the_floor():
    for pose in many_poses_of("downward_dog"):
        p = fk(pose)[0]
        floor = min(p[[L_WRIST, R_WRIST, 22, 23], Y]) - HAND_DEPTH
        for s in SIDE.values():
            assert abs(sole(p, s) - floor) < ON_THE_FLOOR, sole(p, s) - floor
            assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) > 155  # legs straight
        assert p[PELVIS, Y] > floor + 0.6  # hips high


def test_sit_hands_rest_on_the_thighs():
    for pose in many_poses_of("sit"):
        p = fk(pose)[0]
        for s in SIDE.values():
            hip, knee = p[s["hip"]], p[s["knee"]]
            axis = knee - hip
            for joint in (s["wrist"], s["wrist"] + 2):  # the wrist and the hand
                t = float((p[joint] - hip) @ axis / (axis @ axis))
                nearest = hip + np.clip(t, 0.0, 1.0) * axis
                # On the thigh's top (its capsule is 0.065 thick, a hand's 0.03), between the
                # hip and the knee.
                assert np.linalg.norm(p[joint] - nearest) < 0.065 + 0.03 + 0.04
                assert 0.2 < t < 1.0 and p[joint, Y] > nearest[Y]


# Both feet stand on one floor: one foot hanging above the other's floor, or sunk below it,
# is not the pose the phrasings say ("seated, feet flat on the floor", "plants both feet").
BOTH_FEET_ON_THE_FLOOR = [
    "sit",
    "squat",
    "bend_both_knees",
    "spread_both_legs",
    "straighten_left_leg",
    "straighten_right_leg",
    "lunge_left",
    "lunge_right",
    "fighting_stance",
    "warrior_ii",
    "chair_pose",
]


@pytest.mark.parametrize("name", BOTH_FEET_ON_THE_FLOOR)
def test_both_feet_stand_on_one_floor(name):
    for pose in many_poses_of(name):
        p = fk(pose)[0]
        difference = sole(p, SIDE["left"]) - sole(p, SIDE["right"])
        # Placed exactly; within a centimetre where the joint limits clip an ankle.
        assert abs(difference) < 0.01, difference


def test_knees_stay_soft_in_the_fighting_stance_and_straight_in_the_wide_one():
    rest = fk(np.zeros((24, 3)))[0]
    for name, most in (("fighting_stance", 35), ("spread_both_legs", 8)):
        for pose in many_poses_of(name):
            p = fk(pose)[0]
            for s in SIDE.values():
                joints = s["hip"], s["knee"], s["ankle"]
                bend = interior_angle(rest, *joints) - interior_angle(p, *joints)  # from rest
                assert bend < most, (name, bend)


@pytest.mark.parametrize("side", ["left", "right"])
def test_lunge_back_foot_on_its_toes_knee_low(side):
    s, o = SIDE[side], SIDE[OTHER[side]]
    for pose in many_poses_of(f"lunge_{side}"):
        p = fk(pose)[0]
        floor = sole(p, s)
        assert p[o["ankle"], Y] > p[o["foot"], Y] + 0.05  # the heel up, on the toes
        knee = p[o["knee"], Y] - KNEE_DEPTH - floor
        assert 0.0 < knee < 0.25, knee  # low, off the floor


def test_squat():
    for pose in poses_of("squat"):
        p = fk(pose)[0]
        assert p[PELVIS, Y] - min(p[L_FOOT, Y], p[R_FOOT, Y]) < 0.55
        assert int(np.argmin(p[:, Y])) in (L_FOOT, R_FOOT, L_ANKLE, R_ANKLE)
        for s in SIDE.values():
            assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) < 70
            assert p[s["knee"], Z] > p[PELVIS, Z] + 0.2


@pytest.mark.parametrize("side", ["left", "right"])
def test_lunge_and_stand_on_one_leg(side):
    s, o = SIDE[side], SIDE[OTHER[side]]
    for pose in poses_of(f"lunge_{side}"):
        p = fk(pose)[0]
        assert p[s["foot"], Z] > p[o["foot"], Z] + 0.5
        assert 65 < interior_angle(p, s["hip"], s["knee"], s["ankle"]) < 115
        assert p[o["knee"], Y] < p[s["knee"], Y] - 0.2
    for pose in poses_of(f"stand_on_{side}_leg"):
        p = fk(pose)[0]
        assert p[o["foot"], Y] > p[s["foot"], Y] + 0.15
        assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) > 160


def test_bend_forward_lean_back_and_bow():
    for pose in poses_of("bend_forward"):
        p = fk(pose)[0]
        assert p[HEAD, Z] > p[PELVIS, Z] + 0.3  # head forward ...
        assert p[HEAD, Y] < STANDING_HEAD_Y - 0.3  # ... and lower
        assert torso_incline(p) > 50
    for pose in poses_of("lean_back"):
        p = fk(pose)[0]
        assert p[HEAD, Z] < p[PELVIS, Z] - 0.1
        assert torso_incline(p) < -10
    for pose in poses_of("bow"):
        p = fk(pose)[0]
        assert 20 < torso_incline(p) < 60
        assert p[HEAD, Y] < STANDING_HEAD_Y - 0.05


@pytest.mark.parametrize("side", ["left", "right"])
def test_lean_twist_and_turn_head(side):
    sign = SIDE[side]["s"]
    for pose in poses_of(f"lean_{side}"):
        p = fk(pose)[0]
        assert sign * (p[HEAD, X] - p[PELVIS, X]) > 0.15
    for pose in poses_of(f"twist_{side}"):
        chest_forward = fk(pose)[1][SPINE3] @ np.array([0.0, 0.0, 1.0])
        assert sign * chest_forward[X] > 0.4
    for pose in poses_of(f"turn_head_{side}"):
        positions, rotations = fk(pose)
        face = rotations[HEAD] @ np.array([0.0, 0.0, 1.0])
        assert sign * face[X] > 0.5  # turn head left => the face points towards +X
        nose = positions[HEAD] + 0.1 * face
        assert sign * (nose[X] - positions[HEAD, X]) > 0.05


def test_look_up_and_down():
    for name, sign in (("look_up", 1.0), ("look_down", -1.0)):
        for pose in poses_of(name):
            face = fk(pose)[1][HEAD] @ np.array([0.0, 0.0, 1.0])
            assert sign * face[Y] > 0.25


def test_t_pose_and_a_pose():
    for pose in poses_of("t_pose"):
        p = fk(pose)[0]
        for s in SIDE.values():
            assert abs(p[s["wrist"], Y] - p[s["shoulder"], Y]) < 0.12
        assert p[L_WRIST, X] - p[R_WRIST, X] > 1.3
    for pose in poses_of("a_pose"):
        p = fk(pose)[0]
        for s in SIDE.values():
            assert p[s["wrist"], Y] < p[s["shoulder"], Y] - 0.25
            assert s["s"] * (p[s["wrist"], X] - p[s["shoulder"], X]) > 0.25


@pytest.mark.parametrize("side", ["left", "right"])
def test_wave_and_point(side):
    s, o = SIDE[side], SIDE[OTHER[side]]
    for pose in poses_of(f"wave_{side}_hand"):
        p = fk(pose)[0]
        assert p[s["wrist"], Y] > p[s["shoulder"], Y] + 0.15
        assert p[o["wrist"], Y] < p[o["shoulder"], Y] - 0.25
    for pose in poses_of(f"point_{side}_hand"):
        p = fk(pose)[0]
        assert p[s["wrist"], Z] > p[s["shoulder"], Z] + 0.45  # pointing forward: +Z
        assert abs(p[s["wrist"], Y] - p[s["shoulder"], Y]) < 0.15
        assert p[o["wrist"], Z] < p[s["wrist"], Z] - 0.3


def test_gestures():
    for pose in poses_of("salute"):
        p = fk(pose)[0]
        assert np.linalg.norm(p[R_WRIST] - p[HEAD]) < 0.2
        assert p[R_ELBOW, X] < p[R_SHOULDER, X]  # the right elbow out to the body's right
        assert p[L_WRIST, Y] < p[L_SHOULDER, Y] - 0.25
    for pose in poses_of("hands_on_hips"):
        p = fk(pose)[0]
        for s in SIDE.values():
            assert abs(p[s["wrist"], Y] - p[PELVIS, Y]) < 0.15
            assert s["s"] * (p[s["elbow"], X] - p[s["shoulder"], X]) > 0.08  # elbows out
    for pose in poses_of("arms_crossed"):
        p = fk(pose)[0]
        assert p[L_WRIST, X] < p[SPINE3, X] < p[R_WRIST, X]  # each hand past the midline
        for s in SIDE.values():
            assert p[s["wrist"], Z] > p[SPINE3, Z] + 0.08
            assert interior_angle(p, s["shoulder"], s["elbow"], s["wrist"]) < 120
    for pose in poses_of("hands_behind_head"):
        p = fk(pose)[0]
        for s in SIDE.values():
            assert p[s["wrist"], Y] > p[HEAD, Y] and p[s["wrist"], Z] < p[HEAD, Z]
            assert s["s"] * (p[s["elbow"], X] - p[s["shoulder"], X]) > 0.08  # elbows out
    for pose in poses_of("clap"):
        p = fk(pose)[0]
        assert np.linalg.norm(p[L_WRIST] - p[R_WRIST]) < 0.12
        assert min(p[L_WRIST, Z], p[R_WRIST, Z]) > p[SPINE3, Z] + 0.25
    for pose in poses_of("stretch"):
        p = fk(pose)[0]
        assert min(p[L_WRIST, Y], p[R_WRIST, Y]) > p[HEAD, Y] + 0.25
        assert np.linalg.norm(p[L_WRIST] - p[R_WRIST]) < 0.25


def test_dynamic_actions():
    for pose in poses_of("jump"):
        p = fk(pose)[0]
        for s in SIDE.values():
            assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) < 150
            assert p[s["wrist"], Y] > p[s["shoulder"], Y]
    for name, stride in (("run", 0.4), ("walk", 0.2)):
        for pose in poses_of(name):
            p = fk(pose)[0]
            lead = "left" if p[L_FOOT, Z] > p[R_FOOT, Z] else "right"
            s, o = SIDE[lead], SIDE[OTHER[lead]]
            assert p[s["foot"], Z] - p[o["foot"], Z] > stride
            assert p[o["wrist"], Z] > p[s["wrist"], Z]  # the opposite arm swings forward
            if name == "run":
                for side in SIDE.values():
                    assert interior_angle(p, side["shoulder"], side["elbow"], side["wrist"]) < 110
    for pose in poses_of("fighting_stance"):
        p = fk(pose)[0]
        assert p[L_FOOT, Z] > p[R_FOOT, Z] + 0.15
        for s in SIDE.values():
            assert p[s["wrist"], Y] > p[s["shoulder"], Y] - 0.05
            assert p[s["wrist"], Z] > p[SPINE3, Z] + 0.15


def test_yoga_poses():
    for pose in poses_of("tree_pose"):
        p = fk(pose)[0]
        stand = "left" if p[L_FOOT, Y] < p[R_FOOT, Y] else "right"
        s, o = SIDE[stand], SIDE[OTHER[stand]]
        assert p[o["ankle"], Y] > p[s["knee"], Y] - 0.05  # foot up by the standing thigh
        assert o["s"] * (p[o["knee"], X] - p[o["hip"], X]) > 0.2  # raised knee out sideways
        assert interior_angle(p, s["hip"], s["knee"], s["ankle"]) > 160
        assert min(p[L_WRIST, Y], p[R_WRIST, Y]) > p[HEAD, Y]
    for pose in poses_of("warrior_ii"):
        positions, rotations = fk(pose)
        p = positions
        bent = [
            name
            for name, s in SIDE.items()
            if interior_angle(p, s["hip"], s["knee"], s["ankle"]) < 130
        ]
        assert len(bent) == 1
        front, back = SIDE[bent[0]], SIDE[OTHER[bent[0]]]
        assert 70 < interior_angle(p, front["hip"], front["knee"], front["ankle"]) < 130
        assert interior_angle(p, back["hip"], back["knee"], back["ankle"]) > 160
        assert abs(p[L_ANKLE, X] - p[R_ANKLE, X]) > 0.75
        for s in SIDE.values():
            assert abs(p[s["wrist"], Y] - p[s["shoulder"], Y]) < 0.122
        face = rotations[HEAD] @ np.array([0.0, 0.0, 1.0])
        assert front["s"] * face[X] > 0.5  # looking over the front hand
    for pose in poses_of("downward_dog"):
        p = fk(pose)[0]
        assert p[PELVIS, Y] > p[HEAD, Y] + 0.2
        hands = min(p[L_WRIST, Y], p[R_WRIST, Y])
        feet = min(p[L_FOOT, Y], p[R_FOOT, Y])
        assert hands < p[PELVIS, Y] - 0.5 and feet < p[PELVIS, Y] - 0.5
        assert abs(hands - feet) < 0.2
        assert p[L_WRIST, Z] > p[PELVIS, Z] + 0.4 > p[L_FOOT, Z] + 0.4
    for pose in poses_of("chair_pose"):
        p = fk(pose)[0]
        for s in SIDE.values():
            assert 70 < interior_angle(p, s["hip"], s["knee"], s["ankle"]) < 140
        assert min(p[L_WRIST, Y], p[R_WRIST, Y]) > p[HEAD, Y]


# --- joint limits and the plausible-pose sampler -----------------------------------------------


def test_limit_tables_are_mirror_symmetric():
    for j, m in enumerate(MIRROR_INDEX):
        assert JOINT_NAMES[m] == JOINT_NAMES[j].replace("left", "@").replace(
            "right", "left"
        ).replace("@", "right")
        if j == 0:
            continue
        assert np.all(L.LIMITS[j, :, 0] < L.LIMITS[j, :, 1])
        mirrored = np.sort(L.LIMITS[m] * L.MIRROR_SIGNS[:, None], axis=1)
        np.testing.assert_allclose(L.LIMITS[j], mirrored)
    # Hinges: the knees bend one way only (flexion +X), the left elbow about −Y.
    assert L.LIMITS[4, 0, 0] > -0.1 and L.LIMITS[4, 0, 1] > 2.5
    assert L.LIMITS[18, 1, 1] < 0.1 and L.LIMITS[18, 1, 0] < -2.5
    assert L.LIMITS[19, 1, 0] > -0.1 and L.LIMITS[19, 1, 1] > 2.5


def test_limit_coordinates_round_trip_and_approximate_axis_angle():
    rng = np.random.default_rng(0)
    poses = rng.normal(scale=0.6, size=(50, 24, 3))
    coords = L.to_limit_coords(poses)
    back = L.from_limit_coords(coords)
    np.testing.assert_allclose(forward_kinematics(back)[1], forward_kinematics(poses)[1], atol=1e-9)
    small = rng.normal(scale=0.01, size=(24, 3))
    np.testing.assert_allclose(L.to_limit_coords(small), small, atol=1e-3)
    # A pure twist lands in the bone-axis slot, a pure swing in its own slot.
    pose = np.zeros((24, 3))
    pose[16] = [0.5, 0.0, 0.0]  # twist of the left upper arm (bone axis X)
    pose[1] = [-0.7, 0.0, 0.0]  # left hip flexion: a swing about X (bone axis Y)
    coords = L.to_limit_coords(pose)
    np.testing.assert_allclose(coords[16], [0.5, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(coords[1], [-0.7, 0.0, 0.0], atol=1e-12)


def test_clip_to_limits():
    rng = np.random.default_rng(1)
    wild = rng.normal(scale=1.5, size=(200, 24, 3))
    clipped = L.clip_to_limits(wild)
    assert np.all(L.within_limits(clipped))
    np.testing.assert_array_equal(L.clip_to_limits(clipped), clipped)  # idempotent
    np.testing.assert_array_equal(clipped[:, 0], wild[:, 0])  # global orientation untouched
    assert L.limit_violation(wild).max() > 0.5
    # A knee bent backwards is straightened; a plausible pose is left bit for bit.
    pose = np.zeros((24, 3))
    pose[4] = [-1.0, 0.0, 0.0]
    assert L.clip_to_limits(pose)[4, 0] == pytest.approx(L.LIMITS[4, 0, 0])
    plausible = L.sample_plausible_poses(rng, 20)
    np.testing.assert_array_equal(L.clip_to_limits(plausible), plausible)


def test_sample_plausible_poses():
    poses = L.sample_plausible_poses(np.random.default_rng(2), 300)
    assert poses.shape == (300, 24, 3)
    assert np.all(L.within_limits(poses))
    np.testing.assert_array_equal(poses, L.sample_plausible_poses(np.random.default_rng(2), 300))
    rotations = forward_kinematics(poses)[1]
    forward = rotations[:, 0] @ np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(forward[:, 0], 0.0, atol=1e-12)  # zero yaw
    up = rotations[:, 0] @ np.array([0.0, 1.0, 0.0])
    assert np.all(up[:, 1] > 0.8)  # upright, a little pitch and roll
    spread = poses.std(axis=0)
    assert np.all(spread[[16, 17], 2] > 0.2)  # the arms move a lot
    assert L.sample_plausible_poses(np.random.default_rng(2), 0).shape == (0, 24, 3)
    for kwargs, name in (({"n": -1}, "n"), ({"n": 2, "spread": -1.0}, "spread")):
        with pytest.raises(ValueError, match=name):
            L.sample_plausible_poses(np.random.default_rng(0), **kwargs)
    with pytest.raises(ValueError, match="rng"):
        L.sample_plausible_poses(3, 2)
    with pytest.raises(ValueError, match="axis_angle"):
        L.clip_to_limits(np.zeros((23, 3)))


def test_mirror_pose():
    poses = L.sample_plausible_poses(np.random.default_rng(3), 10)
    np.testing.assert_array_equal(L.mirror_pose(L.mirror_pose(poses)), poses)
    raised = A.get_action("raise_left_arm")(None)
    p = forward_kinematics(L.mirror_pose(raised))[0]
    assert p[R_WRIST, Y] > p[HEAD, Y] and p[L_WRIST, Y] < p[L_SHOULDER, Y]
