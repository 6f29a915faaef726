"""Automatic captions: the facts name the right side and the right relation for constructed
poses (left and right being the body's own), and captions are deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.training import actions as A
from inference_service.training import captions as C
from inference_service.training.captions import Fact, caption_pose, pose_facts
from inference_service.training.corpus import sample_auto_poses
from inference_service.training.joint_limits import (
    mirror_pose,
    sample_plausible_poses,
    upright_orientation,
)
from shared_protocol.skeleton import DEFAULT_REST_JOINTS, forward_kinematics


def facts_of(pose) -> set[tuple[str, str, str]]:
    return {(f.kind, f.side, f.value) for f in pose_facts(pose)}


def canonical(name: str) -> np.ndarray:
    return A.get_action(name)(None)


def test_rest_pose_is_a_standing_t_pose():
    facts = facts_of(np.zeros((24, 3)))
    assert ("elbow", "both", "straight") in facts and ("knee", "both", "straight") in facts
    assert ("arm_direction", "both", "out to the side") in facts
    assert ("hands", "both", "wide apart") in facts
    assert not any(kind in ("torso", "kneel", "one_leg", "posture") for kind, _, _ in facts)
    assert caption_pose(np.zeros((24, 3))).startswith("The person is standing.")


def test_single_joint_rotations():
    # Left elbow bent by 90° (−Y for the left elbow): only the left elbow is bent.
    pose = np.zeros((24, 3))
    pose[18] = [0.0, -np.pi / 2, 0.0]
    facts = facts_of(pose)
    assert ("elbow", "left", "bent") in facts and ("elbow", "right", "straight") in facts
    # Right knee bent by 130° (+X): the right knee is sharply bent, the right foot is lifted.
    pose = np.zeros((24, 3))
    pose[5] = [np.radians(130), 0.0, 0.0]
    facts = facts_of(pose)
    assert ("knee", "right", "sharply bent") in facts and ("knee", "left", "straight") in facts
    assert ("one_leg", "left", "standing on the leg") in facts
    assert ("foot_off", "right", "off the ground") in facts
    # The left arm raised by +90° about Z: the left hand is above the head.
    pose = np.zeros((24, 3))
    pose[16] = [0.0, 0.0, np.pi / 2]
    facts = facts_of(pose)
    assert ("hand_height", "left", "above the head") in facts
    assert not any(kind == "hand_height" and side != "left" for kind, side, _ in facts)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sided_actions_are_described_on_their_side(side):
    other = "right" if side == "left" else "left"
    cases = {
        f"raise_{side}_arm": ("hand_height", side, "above the head"),
        f"bend_{side}_arm": ("elbow", side, "bent"),
        f"kneel_on_{side}_knee": ("kneel", side, "on the knee"),
        f"lunge_{side}": ("foot_front", side, "in front"),
        f"stand_on_{side}_leg": ("one_leg", side, "standing on the leg"),
        f"cross_{side}_arm": ("hand_cross", side, "across the body"),
        f"spread_{side}_arm": ("arm_direction", side, "out to the side"),
        f"point_{side}_hand": ("arm_direction", side, "forward"),
        f"lean_{side}": ("torso_side", side, "leaning"),
        f"twist_{side}": ("twist", side, "twisted"),
        f"turn_head_{side}": ("head_turn", side, "turned"),
    }
    for name, fact in cases.items():
        facts = facts_of(canonical(name))
        assert fact in facts, (name, sorted(facts))
        assert (fact[0], other, fact[2]) not in facts, name
        assert (fact[0], "both", fact[2]) not in facts, name
    text = caption_pose(canonical(f"kneel_on_{side}_knee"))
    assert f"kneeling on their {side} knee" in text
    text = caption_pose(canonical(f"raise_{side}_arm"))
    assert f"The {side} hand is above the head." in text
    assert f"The {other} hand is above the head." not in text


def test_whole_body_relations():
    assert ("torso", "", "bent over") in facts_of(canonical("bend_forward"))
    assert ("torso", "", "leaning back") in facts_of(canonical("lean_back"))
    assert ("kneel", "both", "on the knee") in facts_of(canonical("kneel_on_both_knees"))
    assert ("posture", "", "crouching") in facts_of(canonical("squat"))
    assert ("posture", "", "sitting") in facts_of(canonical("sit"))
    assert ("hands", "both", "close together") in facts_of(canonical("clap"))
    assert ("hand_hip", "both", "on the hip") in facts_of(canonical("hands_on_hips"))
    assert ("hand_cross", "both", "across the body") in facts_of(canonical("arms_crossed"))
    assert ("hand_height", "both", "above the head") in facts_of(canonical("stretch"))
    assert ("feet", "both", "wide apart") in facts_of(canonical("spread_both_legs"))
    dog = facts_of(canonical("downward_dog"))
    assert ("ground", "both", "hand on the ground") in dog
    salute = facts_of(canonical("salute"))
    assert ("hand_head", "right", "by the head") in salute
    assert not any(side == "left" and kind.startswith("hand") for kind, side, _ in salute)


def test_a_low_body_leaning_back_is_not_said_to_crouch():
    # A crouch bends forward over the feet; low and tipped back is another posture.
    squat = canonical("squat")
    for back, crouching in ((0.3, True), (0.4, False)):  # torso pitch -13° and -23°
        pose = squat.copy()
        pose[[3, 6, 9], 0] -= back  # the three spine joints bent backwards
        facts = facts_of(pose)
        assert (("posture", "", "crouching") in facts) == crouching, back
        assert (("torso", "", "leaning back") in facts) != crouching, back


def test_mirrored_pose_swaps_the_sides():
    swap = {"left": "right", "right": "left", "both": "both", "": ""}
    for name in ("raise_left_arm", "kneel_on_left_knee", "stand_on_left_leg", "wave_left_hand"):
        pose = canonical(name)
        mirrored = {(k, swap[s], v) for k, s, v in facts_of(pose)}
        assert facts_of(mirror_pose(pose)) == mirrored, name


def test_caption_is_deterministic_given_rng_and_varies_with_it():
    pose = canonical("tree_pose")
    a = caption_pose(pose, np.random.default_rng(3))
    b = caption_pose(pose, np.random.default_rng(3))
    assert a == b
    assert caption_pose(pose) == caption_pose(pose)
    texts = {caption_pose(pose, np.random.default_rng(seed)) for seed in range(10)}
    assert len(texts) > 3
    for text in texts:
        assert text.endswith(".") and "{" not in text


def test_random_poses_get_captions_with_bounded_facts():
    rng = np.random.default_rng(0)
    for pose in sample_plausible_poses(rng, 50):
        text = caption_pose(pose, rng, max_facts=4)
        sentences = text.count(".")
        assert 1 <= sentences <= 5  # at most 4 facts, plus "is standing"
        facts = pose_facts(pose)
        assert all(isinstance(f, Fact) for f in facts)
        saliences = [f.salience for f in facts]
        assert saliences == sorted(saliences, reverse=True)


def test_every_phrase_formats():
    for (kind, value), (single, both) in C._PHRASES.items():
        assert single or both, (kind, value)
        for template in (*single, *both):
            text = template.format(side="left", other="right", subject="someone", their="her")
            assert "{" not in text and text == text.strip()


def test_validation():
    with pytest.raises(ValueError, match="axis_angle"):
        pose_facts(np.zeros((2, 24, 3)))
    with pytest.raises(ValueError, match="axis_angle"):
        pose_facts(np.full((24, 3), np.nan))
    with pytest.raises(ValueError, match="max_facts"):
        caption_pose(np.zeros((24, 3)), max_facts=0)
    with pytest.raises(ValueError, match="rng"):
        caption_pose(np.zeros((24, 3)), rng=7)


def _sideways_tilt(pose) -> float:
    """The true sideways tilt of pelvis -> neck out of the body's sagittal plane, degrees, > 0
    to the body's left, relative to the rest skeleton's own (its neck is a little to the right)."""

    def tilt(p):
        t = p[12] - p[0]
        return np.degrees(np.arcsin(t[0] / np.linalg.norm(t)))

    return tilt(forward_kinematics(pose)[0]) - tilt(DEFAULT_REST_JOINTS)


def test_sitting_needs_an_upright_torso_and_both_knees_bent():
    # A seated pose tipped 40 degrees sideways, or with one leg straight, is no "sitting".
    from shared_protocol.rotations import axis_angle_to_matrix, matrix_to_axis_angle

    def postures(pose):
        return [f.value for f in pose_facts(pose) if f.kind == "posture"]

    seated = np.asarray(A.get_action("sit").sample(np.random.default_rng(0), 0.0))
    assert postures(seated) == ["sitting"]
    tipped = seated.copy()
    roll = axis_angle_to_matrix(np.array([0.0, 0.0, np.radians(40)]))
    tipped[0] = matrix_to_axis_angle(roll @ axis_angle_to_matrix(seated[0]))
    facts = {(f.kind, f.value) for f in pose_facts(tipped)}
    assert ("thigh", "raised") in facts and "sitting" not in postures(tipped)
    one_leg_straight = seated.copy()
    one_leg_straight[5] = 0.0  # the right knee
    facts = {(f.kind, f.value) for f in pose_facts(one_leg_straight)}
    assert ("thigh", "raised") in facts and "sitting" not in postures(one_leg_straight)


def test_an_upside_down_body_is_not_also_said_to_lean_sideways():
    from shared_protocol.rotations import axis_angle_to_matrix, matrix_to_axis_angle

    pose = np.zeros((24, 3))
    tilt = axis_angle_to_matrix(np.array([0.0, 0.0, np.radians(30)]))
    pose[0] = matrix_to_axis_angle(tilt @ axis_angle_to_matrix(np.array([np.radians(160), 0, 0])))
    torso = [(f.kind, f.value) for f in pose_facts(pose) if f.kind.startswith("torso")]
    assert torso == [("torso", "upside down")]


def test_sideways_lean_is_a_true_sideways_tilt_at_any_bend():
    # The rest skeleton folded forward at the hips, with no sideways tilt at all: past the
    # horizontal the rest neck's small offset to the right once read as a lean to the right.
    for pitch in range(0, 116):
        pose = np.zeros((24, 3))
        pose[0] = upright_orientation(np.radians(pitch), 0.0)
        assert not any(kind == "torso_side" for kind, _, _ in facts_of(pose)), pitch
        # A fold not much past the horizontal is bent over, not upside down.
        if 70 <= pitch <= 105:
            assert ("torso", "", "bent over") in facts_of(pose), pitch
    pose = np.zeros((24, 3))
    pose[0] = upright_orientation(np.radians(150), 0.0)
    assert ("torso", "", "upside down") in facts_of(pose)
    # A real sideways tilt is still told, on the body's own side, bent over or not.
    for pitch in (0, 45, 85):
        for roll, side in ((-0.45, "left"), (0.45, "right")):  # roll > 0 tips to the right
            pose = np.zeros((24, 3))
            pose[0] = upright_orientation(np.radians(pitch), roll)
            assert ("torso_side", side, "leaning") in facts_of(pose), (pitch, side)
    # Bent forward: a lean to one side is told only where the torso truly tilts that way.
    action, rng = A.get_action("bend_forward"), np.random.default_rng(7)
    for _ in range(150):
        pose = action(rng)
        sideways = [f for f in pose_facts(pose) if f.kind == "torso_side"]
        tilt = _sideways_tilt(pose)
        assert not sideways or abs(tilt) > 10, (tilt, sideways)
        for f in sideways:
            assert (f.side == "left") == (tilt > 0)


def test_a_hand_above_the_head_is_above_its_crown():
    # The saluting hand at the brow and the hands clasped behind the head are by the head, not
    # above it (the head's top is ~0.19 m above the head joint); a raised arm is above it.
    rng = np.random.default_rng(11)
    for name in ("salute", "hands_behind_head"):
        action = A.get_action(name)
        for pose in (action(None), *(action(rng) for _ in range(60))):
            facts = facts_of(pose)
            assert not any(v == "above the head" for _, _, v in facts), (name, sorted(facts))
            assert any(k == "hand_head" and s in ("right", "both") for k, s, _ in facts), name
    for name in ("raise_left_arm", "raise_both_arms", "stretch"):
        action = A.get_action(name)
        for pose in (action(None), *(action(rng) for _ in range(20))):
            assert any(v == "above the head" for _, _, v in facts_of(pose)), name


def test_a_stretched_arm_is_not_bent():
    # "Stretched forward / out to the side" goes with a straight or slightly bent elbow; the
    # clap's bent arms hold the hands in front of the body instead.
    facts = facts_of(canonical("clap"))
    assert not any(kind == "arm_direction" for kind, _, _ in facts), sorted(facts)
    assert ("hand_depth", "both", "in front of the body") in facts
    assert "stretched" not in caption_pose(canonical("fighting_stance"))
    for pose in sample_auto_poses(2, 600):
        elbows, directions = {}, {}
        for f in pose_facts(pose):
            for side in ("left", "right") if f.side == "both" else (f.side,):
                if f.kind == "elbow":
                    elbows[side] = f.value
                elif f.kind == "arm_direction":
                    directions[side] = f.value
        for side in directions:
            assert elbows[side] in ("straight", "slightly bent"), (directions, elbows)
