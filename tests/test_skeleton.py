"""Tests for shared_protocol.skeleton: joint table, rest skeleton, forward kinematics, frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.transform import Rotation

from shared_protocol import skeleton as sk
from shared_protocol.rotations import axis_angle_to_matrix

PROPERTY = settings(max_examples=200, deadline=None)

poses = arrays(np.float64, (24, 3), elements=st.floats(-math.pi, math.pi))


def random_poses(n, seed, scale=1.0):
    return np.random.default_rng(seed).normal(scale=scale, size=(n, 24, 3))


# --- joint table ---------------------------------------------------------------------------


def test_joint_table():
    assert sk.NUM_JOINTS == 24
    assert len(sk.JOINT_NAMES) == 24 == len(set(sk.JOINT_NAMES))
    assert len(sk.PARENTS) == 24
    assert sk.PARENTS[0] == -1
    assert all(0 <= p < i for i, p in enumerate(sk.PARENTS) if i > 0)  # topological order
    assert sk.JOINT_NAMES[0] == "pelvis"
    assert sk.JOINT_NAMES[15] == "head"
    assert sk.JOINT_NAMES[22:] == ("left_hand", "right_hand")
    assert sk.JOINT_NAMES[sk.PARENTS[sk.joint_index("left_wrist")]] == "left_elbow"
    assert sk.JOINT_NAMES[sk.PARENTS[sk.joint_index("neck")]] == "spine3"
    assert sk.JOINT_NAMES[sk.PARENTS[sk.joint_index("left_foot")]] == "left_ankle"


def test_joint_index():
    for i, name in enumerate(sk.JOINT_NAMES):
        assert sk.joint_index(name) == i
    assert sk.joint_index("left_elbow") == 18


@pytest.mark.parametrize("bad", ["Pelvis", "l_wrist", "", "jaw"])
def test_joint_index_unknown_name_lists_valid_names(bad):
    with pytest.raises(ValueError) as info:
        sk.joint_index(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "left_wrist" in message and "right_hand" in message


def test_joint_index_non_string():
    with pytest.raises(ValueError, match="unknown joint name"):
        sk.joint_index(["pelvis"])


# --- rest skeleton -------------------------------------------------------------------------


def test_rest_arrays_are_read_only():
    for arr in (sk.REST_OFFSETS, sk.DEFAULT_REST_JOINTS, sk.SMPL_TO_BLENDER):
        assert arr.dtype == np.float64
        with pytest.raises(ValueError):
            arr[0, 0] = 1.0
    assert sk.REST_OFFSETS.shape == sk.DEFAULT_REST_JOINTS.shape == (24, 3)


def test_rest_skeleton_facts_from_conventions():
    j = sk.DEFAULT_REST_JOINTS
    np.testing.assert_array_equal(j[0], 0.0)
    assert j[sk.joint_index("left_wrist"), 0] == pytest.approx(0.72, abs=0.01)
    assert j[sk.joint_index("right_wrist"), 0] == pytest.approx(-0.72, abs=0.01)
    for foot in ("left_foot", "right_foot"):
        assert j[sk.joint_index(foot), 1] == pytest.approx(-0.96, abs=0.01)
    assert j[sk.joint_index("head"), 1] == pytest.approx(0.62, abs=0.01)
    # Body's left is +X, and the feet (toes) are in front of the ankles (+Z forward).
    assert j[sk.joint_index("left_hip"), 0] > 0 > j[sk.joint_index("right_hip"), 0]
    for side in ("left", "right"):
        assert j[sk.joint_index(f"{side}_foot"), 2] > j[sk.joint_index(f"{side}_ankle"), 2]


def test_offsets_and_rest_joints_are_inverse():
    np.testing.assert_allclose(
        sk.offsets_from_rest_joints(sk.DEFAULT_REST_JOINTS), sk.REST_OFFSETS, atol=1e-15
    )
    rng = np.random.default_rng(0)
    joints = rng.normal(size=(2, 3, 24, 3))
    np.testing.assert_allclose(
        sk.rest_joints_from_offsets(sk.offsets_from_rest_joints(joints)), joints, atol=1e-14
    )
    offsets = rng.normal(size=(5, 24, 3))
    np.testing.assert_allclose(
        sk.offsets_from_rest_joints(sk.rest_joints_from_offsets(offsets)), offsets, atol=1e-14
    )


def test_rest_joints_by_hand():
    # Left knee = pelvis + left_hip offset + left_knee offset.
    expected = sk.REST_OFFSETS[1] + sk.REST_OFFSETS[4]
    np.testing.assert_allclose(sk.DEFAULT_REST_JOINTS[4], expected, atol=1e-15)


def test_rest_helpers_do_not_modify_input():
    offsets = np.array(sk.REST_OFFSETS)
    sk.rest_joints_from_offsets(offsets)
    np.testing.assert_array_equal(offsets, sk.REST_OFFSETS)


# --- forward kinematics --------------------------------------------------------------------


def test_zero_pose_gives_rest_joints_and_identity():
    pos, rots = sk.forward_kinematics(np.zeros((24, 3)))
    assert pos.shape == (24, 3) and rots.shape == (24, 3, 3)
    np.testing.assert_allclose(pos, sk.DEFAULT_REST_JOINTS, atol=1e-15)
    np.testing.assert_allclose(rots, np.broadcast_to(np.eye(3), (24, 3, 3)), atol=1e-15)


def test_translation_shifts_every_joint():
    pose = random_poses(1, 1)[0]
    t = np.array([0.3, -1.2, 2.5])
    pos0, rots0 = sk.forward_kinematics(pose)
    pos1, rots1 = sk.forward_kinematics(pose, translation=t)
    np.testing.assert_allclose(pos1, pos0 + t, atol=1e-14)
    np.testing.assert_allclose(rots1, rots0, atol=0)


def test_pelvis_rest_position_is_kept():
    rest = sk.DEFAULT_REST_JOINTS + np.array([0.1, 0.9, -0.2])
    pos, _ = sk.forward_kinematics(random_poses(1, 2)[0], rest_joints=rest, translation=[1, 0, 0])
    np.testing.assert_allclose(pos[0], [1.1, 0.9, -0.2], atol=1e-15)


@PROPERTY
@given(poses)
def test_bone_lengths_preserved(pose):
    pos, rots = sk.forward_kinematics(pose)
    parents = list(sk.PARENTS[1:])
    lengths = np.linalg.norm(pos[1:] - pos[parents], axis=-1)
    rest_lengths = np.linalg.norm(sk.REST_OFFSETS[1:], axis=-1)
    np.testing.assert_allclose(lengths, rest_lengths, atol=1e-12)
    # World rotations stay rotations.
    identity = np.broadcast_to(np.eye(3), rots.shape)
    np.testing.assert_allclose(rots @ np.swapaxes(rots, -1, -2), identity, atol=1e-12)


def test_left_elbow_rotation_by_hand():
    """+90° about +Y at the left elbow turns the forearm from +X (body's left) to −Z (backward).

    Rz(+90°) would be the other obvious check; Ry(+90°) maps (x, y, z) -> (z, y, −x).
    """
    pose = np.zeros((24, 3))
    pose[sk.joint_index("left_elbow")] = [0.0, math.pi / 2, 0.0]
    pos, rots = sk.forward_kinematics(pose)
    rest = sk.DEFAULT_REST_JOINTS
    elbow, wrist, hand = (sk.joint_index(n) for n in ("left_elbow", "left_wrist", "left_hand"))
    # Everything up to and including the elbow joint itself does not move.
    np.testing.assert_allclose(pos[:wrist], rest[:wrist], atol=1e-15)
    # Wrist offset (0.26570925, 0.01269811, -0.00737473) -> (-0.00737473, 0.01269811, -0.26570925).
    expected_wrist = rest[elbow] + np.array([-0.00737473, 0.01269811, -0.26570925])
    np.testing.assert_allclose(pos[wrist], expected_wrist, atol=1e-12)
    # Hand offset (0.08669055, -0.01063603, -0.01559429) -> (-0.01559429, -0.01063603, -0.08669055).
    expected_hand = expected_wrist + np.array([-0.01559429, -0.01063603, -0.08669055])
    np.testing.assert_allclose(pos[hand], expected_hand, atol=1e-12)
    # Absolute numbers, summed by hand from the offset table: elbow at
    # x = 0.00443945 + 0.00448844 − 0.00226458 + 0.07170245 + 0.12292141 + 0.2553319 = 0.45661907.
    assert pos[hand, 0] == pytest.approx(0.45661907 - 0.00737473 - 0.01559429, abs=1e-8)
    ry = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])
    for j in (elbow, wrist, hand):
        np.testing.assert_allclose(rots[j], ry, atol=1e-15)
    # The right arm is untouched.
    right_hand = sk.joint_index("right_hand")
    np.testing.assert_allclose(pos[right_hand], rest[right_hand])


def test_global_orientation_rotates_about_the_pelvis():
    pose = random_poses(1, 3, scale=0.5)[0]
    pose[0] = 0.0
    rest = sk.DEFAULT_REST_JOINTS + np.array([0.0, 0.9, 0.0])  # pelvis off the origin
    pos0, rots0 = sk.forward_kinematics(pose, rest_joints=rest)
    g = np.array([0.4, -1.1, 0.7])
    pose[0] = g
    pos1, rots1 = sk.forward_kinematics(pose, rest_joints=rest)
    rg = axis_angle_to_matrix(g)
    np.testing.assert_allclose(pos1, rest[0] + (pos0 - rest[0]) @ rg.T, atol=1e-14)
    np.testing.assert_allclose(rots1, rg @ rots0, atol=1e-14)


def test_upside_down_global_orientation():
    """HMR-style camera-frame orientation: 180° about X puts the head below the pelvis."""
    pose = np.zeros((24, 3))
    pose[0] = [math.pi, 0, 0]
    pos, _ = sk.forward_kinematics(pose)
    head = sk.DEFAULT_REST_JOINTS[sk.joint_index("head")]
    np.testing.assert_allclose(pos[sk.joint_index("head")], head * [1, -1, -1], atol=1e-14)


def test_batched_equals_per_pose():
    batch = random_poses(6, 4).reshape(2, 3, 24, 3)
    trans = np.random.default_rng(5).normal(size=(2, 3, 3))
    pos, rots = sk.forward_kinematics(batch, translation=trans)
    assert pos.shape == (2, 3, 24, 3) and rots.shape == (2, 3, 24, 3, 3)
    for idx in np.ndindex(2, 3):
        p, r = sk.forward_kinematics(batch[idx], translation=trans[idx])
        np.testing.assert_allclose(pos[idx], p, atol=1e-15)
        np.testing.assert_allclose(rots[idx], r, atol=1e-15)


def test_broadcasting_of_rest_joints_and_translation():
    poses_ = random_poses(4, 6)
    rests = sk.DEFAULT_REST_JOINTS * np.array([0.9, 1.0, 1.1, 1.2])[:, None, None]
    pos, _ = sk.forward_kinematics(poses_[0], rest_joints=rests)  # one pose, four bodies
    assert pos.shape == (4, 24, 3)
    for k in range(4):
        np.testing.assert_allclose(pos[k], sk.forward_kinematics(poses_[0], rests[k])[0])
    pos, _ = sk.forward_kinematics(poses_, translation=[0.0, 1.0, 0.0])  # one translation for all
    assert pos.shape == (4, 24, 3)
    empty_pos, empty_rots = sk.forward_kinematics(np.zeros((0, 24, 3)))
    assert empty_pos.shape == (0, 24, 3) and empty_rots.shape == (0, 24, 3, 3)


def scipy_fk(pose, rest, translation):
    """Independent oracle: per-joint composition with scipy Rotation objects."""
    offsets = [rest[i] - rest[p] if p >= 0 else rest[i] for i, p in enumerate(sk.PARENTS)]
    world = [Rotation.from_rotvec(pose[0])]
    pos = [rest[0] + translation]
    for i in range(1, 24):
        p = sk.PARENTS[i]
        pos.append(pos[p] + world[p].apply(offsets[i]))
        world.append(world[p] * Rotation.from_rotvec(pose[i]))
    return np.array(pos), np.stack([w.as_matrix() for w in world])


def test_against_scipy_oracle():
    rng = np.random.default_rng(7)
    for k, pose in enumerate(random_poses(20, 8)):
        rest = sk.DEFAULT_REST_JOINTS + rng.normal(scale=0.02, size=(24, 3))
        t = rng.normal(size=3) if k % 2 else np.zeros(3)
        pos, rots = sk.forward_kinematics(pose, rest_joints=rest, translation=t)
        ref_pos, ref_rots = scipy_fk(pose, rest, t)
        np.testing.assert_allclose(pos, ref_pos, atol=1e-12)
        np.testing.assert_allclose(rots, ref_rots, atol=1e-12)


def test_fk_accepts_lists_and_returns_float64():
    pos, rots = sk.forward_kinematics(np.zeros((24, 3)).tolist(), translation=[0, 0, 0])
    assert pos.dtype == rots.dtype == np.float64


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"axis_angle": np.zeros((23, 3))}, "axis_angle"),
        ({"axis_angle": np.zeros(72)}, "axis_angle"),
        ({"axis_angle": np.full((24, 3), np.nan)}, "axis_angle"),
        ({"axis_angle": np.zeros((24, 3)), "rest_joints": np.zeros((22, 3))}, "rest_joints"),
        ({"axis_angle": np.zeros((24, 3)), "rest_joints": np.full((24, 3), np.inf)}, "rest_joints"),
        ({"axis_angle": np.zeros((24, 3)), "translation": np.zeros(2)}, "translation"),
        ({"axis_angle": np.zeros((24, 3)), "translation": [np.nan, 0, 0]}, "translation"),
        ({"axis_angle": np.zeros((2, 24, 3)), "translation": np.zeros((3, 3))}, "axis_angle, "),
        ({"axis_angle": np.zeros((2, 24, 3)), "rest_joints": np.zeros((3, 24, 3))}, "axis_angle, "),
    ],
)
def test_fk_bad_input(kwargs, name):
    with pytest.raises(ValueError) as info:
        sk.forward_kinematics(**kwargs)
    assert str(info.value).startswith(name), str(info.value)


@pytest.mark.parametrize(
    ("fn", "arg", "name"),
    [
        (sk.rest_joints_from_offsets, np.zeros((24, 2)), "offsets"),
        (sk.rest_joints_from_offsets, np.full((24, 3), np.nan), "offsets"),
        (sk.offsets_from_rest_joints, np.zeros((25, 3)), "rest_joints"),
        (sk.offsets_from_rest_joints, np.full((24, 3), np.inf), "rest_joints"),
        (sk.smpl_to_blender, np.zeros((5, 2)), "points"),
        (sk.smpl_to_blender, [np.nan, 0, 0], "points"),
    ],
)
def test_helpers_bad_input(fn, arg, name):
    with pytest.raises(ValueError, match="^" + name + ":"):
        fn(arg)


# --- frame mapping -------------------------------------------------------------------------


def test_smpl_to_blender_axes():
    up, forward, left = np.eye(3)[[1, 2, 0]]
    np.testing.assert_array_equal(sk.smpl_to_blender(up), [0, 0, 1])  # +Y up -> +Z up
    np.testing.assert_array_equal(sk.smpl_to_blender(forward), [0, -1, 0])  # +Z fwd -> −Y
    np.testing.assert_array_equal(sk.smpl_to_blender(left), [1, 0, 0])
    np.testing.assert_array_equal(sk.smpl_to_blender([1.0, 2.0, 3.0]), [1.0, -3.0, 2.0])
    np.testing.assert_array_equal(sk.SMPL_TO_BLENDER @ [1.0, 2.0, 3.0], [1.0, -3.0, 2.0])
    assert np.linalg.det(sk.SMPL_TO_BLENDER) == pytest.approx(1.0)  # a rotation, not a mirror


def test_smpl_to_blender_batched():
    pts = np.random.default_rng(9).normal(size=(4, 24, 3))
    out = sk.smpl_to_blender(pts)
    assert out.shape == pts.shape
    np.testing.assert_allclose(out, np.stack([pts[..., 0], -pts[..., 2], pts[..., 1]], -1))
    # The rest skeleton stands upright in Blender: head above the pelvis, feet below.
    b = sk.smpl_to_blender(sk.DEFAULT_REST_JOINTS)
    assert b[sk.joint_index("head"), 2] > 0.5 and b[sk.joint_index("left_foot"), 2] < -0.9
