"""Pose metrics against hand-computed cases: MPJPE, PA-MPJPE (with the reflection fix) and
MPJRE, with and without the global orientation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from inference_service import metrics as M
from shared_protocol.skeleton import DEFAULT_REST_JOINTS, forward_kinematics


def random_poses(n: int, seed: int, scale: float = 0.4) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=scale, size=(n, 24, 3))


# --- on joints: hand-computed ------------------------------------------------------------------


def test_mpjpe_from_joints_hand_computed():
    # Two joints, root at the origin on both sides; joint 1 is off by (0, 1, 0): errors 0 and
    # 1 m, mean 0.5 m = 500 mm.
    pred = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    true = np.array([[[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])
    np.testing.assert_allclose(M.mpjpe_from_joints(pred, true), [500.0])
    # Three joints, one off by (0.3, 0.4, 0) = 0.5 m: mean 0.5 / 3 m = 166.67 mm.
    pred = np.array([[0.0, 0.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 1.0]])
    true = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(M.mpjpe_from_joints(pred, true), 500.0 / 3)
    # unit_scale 1 gives metres.
    np.testing.assert_allclose(M.mpjpe_from_joints(pred, true, unit_scale=1.0), 0.5 / 3)


def test_mpjpe_from_joints_translation():
    true = np.random.default_rng(0).normal(size=(4, 24, 3))
    pred = true + np.array([0.1, 0.0, 0.0])
    np.testing.assert_allclose(M.mpjpe_from_joints(pred, true), 0.0, atol=1e-9)
    np.testing.assert_allclose(M.mpjpe_from_joints(pred, true, root_relative=False), 100.0)
    # Root-relative with another root: translation still cancels.
    np.testing.assert_allclose(M.mpjpe_from_joints(pred, true, root_index=-1), 0.0, atol=1e-9)


def test_pa_mpjpe_hand_computed():
    # true: three points on the x axis; pred: the middle one lifted by h = 3. By symmetry the
    # best rotation is the identity (up to a turn about x, which changes nothing), the centroids
    # match, and the scale is tr(S)/var = 2 / (2 + 2h²/3) = 1/4. Aligned: (−¼, −¼), (0, ½),
    # (¼, −¼); errors √0.625, 0.5, √0.625.
    true = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    pred = np.array([[-1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    aligned, (scale, rotation, _) = M.procrustes_align(pred, true, return_params=True)
    np.testing.assert_allclose(scale, 0.25)
    np.testing.assert_allclose(np.abs(aligned[:, 1:]).sum(axis=-1), [0.25, 0.5, 0.25])
    expected = (2 * math.sqrt(0.625) + 0.5) / 3 * 1000
    np.testing.assert_allclose(M.pa_mpjpe_from_joints(pred, true), expected)
    assert np.linalg.det(rotation) == pytest.approx(1.0)


def test_procrustes_recovers_a_similarity_transform():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(5, 24, 3))
    rot = Rotation.random(5, random_state=2).as_matrix()
    scale = rng.uniform(0.5, 2.0, size=5)
    shift = rng.normal(size=(5, 3))
    # pred = (true − shift) Rᵀ / scale: the inverse of s·R·p + t.
    pred = (
        np.einsum("nij,nkj->nki", rot.transpose(0, 2, 1), true - shift[:, None])
        / scale[:, None, None]
    )
    aligned, (s, r, t) = M.procrustes_align(pred, true, return_params=True)
    np.testing.assert_allclose(aligned, true, atol=1e-9)
    np.testing.assert_allclose(s, scale)
    np.testing.assert_allclose(r, rot, atol=1e-9)
    np.testing.assert_allclose(t, shift, atol=1e-9)
    np.testing.assert_allclose(M.pa_mpjpe_from_joints(pred, true), 0.0, atol=1e-6)


def test_procrustes_reflection_fix():
    # A non-planar, asymmetric set and its mirror image (x -> −x). A naive Procrustes (no
    # reflection fix) "aligns" them perfectly with a mirror; a rotation cannot.
    true = np.array(
        [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]
    )
    pred = true * np.array([-1.0, 1.0, 1.0])
    x = pred - pred.mean(0)
    y = true - true.mean(0)
    u, sv, vt = np.linalg.svd(x.T @ y)
    naive_r = vt.T @ u.T
    naive = sv.sum() / (x**2).sum() * x @ naive_r.T + true.mean(0)
    assert np.linalg.det(naive_r) < 0  # the naive fit is a reflection ...
    naive_error = np.linalg.norm(naive - true, axis=-1).mean() * 1000
    assert naive_error < 1e-6  # ... which wrongly claims a perfect match
    _, (_, rotation, _) = M.procrustes_align(pred, true, return_params=True)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    assert M.pa_mpjpe_from_joints(pred, true) > 100.0


def test_procrustes_degenerate_prediction():
    true = np.random.default_rng(3).normal(size=(24, 3))
    pred = np.ones((24, 3))
    aligned, (scale, rotation, _) = M.procrustes_align(pred, true, return_params=True)
    assert scale == 0.0
    np.testing.assert_allclose(rotation, np.eye(3))
    np.testing.assert_allclose(aligned, np.broadcast_to(true.mean(0), (24, 3)))


# --- on poses ----------------------------------------------------------------------------------


def test_identical_poses_give_zero():
    poses = random_poses(6, 4)
    result = M.evaluate_poses(poses, poses)
    for name, value in result.means().items():
        assert value == pytest.approx(0.0, abs=1e-6), name
    assert result.mpjpe_mm.shape == (6,)


def test_pure_global_rotation():
    true = random_poses(3, 5)
    true[:, 0] = 0.0
    pred = true.copy()
    pred[:, 0] = [0.0, math.pi / 2, 0.0]  # turned by 90° about the vertical
    assert np.all(M.mpjpe(pred, true) > 50.0)
    np.testing.assert_allclose(M.pa_mpjpe(pred, true), 0.0, atol=1e-6)
    np.testing.assert_allclose(M.mpjre(pred, true), 90.0 / 24)
    np.testing.assert_allclose(M.mpjpe(pred, true, ignore_global_orient=True), 0.0, atol=1e-9)
    np.testing.assert_allclose(M.mpjre(pred, true, ignore_global_orient=True), 0.0, atol=1e-9)


def test_root_removed_variants_ignore_global_orientation():
    body = random_poses(4, 6)
    other_body = random_poses(4, 7)
    a, b = body.copy(), other_body.copy()
    a[:, 0] = Rotation.random(4, random_state=8).as_rotvec()
    b[:, 0] = Rotation.random(4, random_state=9).as_rotvec()
    c, d = body.copy(), other_body.copy()
    c[:, 0] = 0.0
    d[:, 0] = 0.0
    with_root = M.evaluate_poses(a, b)
    without = M.evaluate_poses(c, d)
    for name in ("mpjpe_mm", "pa_mpjpe_mm", "mpjre_deg", "mpjre_rad_x100"):
        np.testing.assert_allclose(
            getattr(with_root, name + "_no_root"), getattr(without, name), atol=1e-9
        )
    assert not np.allclose(with_root.mpjpe_mm, with_root.mpjpe_mm_no_root)


def test_translation_of_the_rest_skeleton():
    # The whole true body shifted by 10 cm: root-relative MPJPE ignores it.
    poses = random_poses(2, 10)
    shifted = DEFAULT_REST_JOINTS + np.array([0.0, 0.1, 0.0])
    np.testing.assert_allclose(M.mpjpe(poses, poses, true_rest_joints=shifted), 0.0, atol=1e-9)
    np.testing.assert_allclose(
        M.mpjpe(poses, poses, true_rest_joints=shifted, root_relative=False), 100.0
    )


def test_scaled_skeleton_gives_zero_pa_mpjpe():
    poses = random_poses(3, 11)
    big = DEFAULT_REST_JOINTS * 1.25  # the prediction's body is 25% larger
    kwargs = {"rest_joints": big, "true_rest_joints": DEFAULT_REST_JOINTS}
    assert np.all(M.mpjpe(poses, poses, **kwargs) > 10.0)
    np.testing.assert_allclose(M.pa_mpjpe(poses, poses, **kwargs), 0.0, atol=1e-6)
    # Without true_rest_joints both sides use rest_joints: identical.
    np.testing.assert_allclose(M.mpjpe(poses, poses, rest_joints=big), 0.0, atol=1e-9)


def test_single_joint_rotation_mpjre_is_angle_over_24():
    true = random_poses(5, 12)
    pred = true.copy()
    angle = math.radians(36.0)
    # Rotate the left elbow (18) by exactly 36° more about its current axis-angle's frame:
    # R_pred = R_true · R_delta, so R_predᵀ R_true = R_deltaᵀ has angle 36°.
    delta = Rotation.from_rotvec([0.3, -0.8, 0.5] / np.linalg.norm([0.3, -0.8, 0.5]) * angle)
    pred[:, 18] = (Rotation.from_rotvec(true[:, 18]) * delta).as_rotvec()
    np.testing.assert_allclose(M.mpjre(pred, true), 36.0 / 24, rtol=1e-9)
    np.testing.assert_allclose(M.mpjre(pred, true, unit="rad"), angle / 24, rtol=1e-9)
    np.testing.assert_allclose(M.mpjre(pred, true, unit="rad_x100"), angle / 24 * 100, rtol=1e-9)
    # Only the elbow differs: restricting to the other joints gives 0.
    others = [j for j in range(24) if j != 18]
    np.testing.assert_allclose(M.mpjre(pred, true, joints=others), 0.0, atol=1e-9)
    # The elbow moves the wrist and hand (2 of 24 joints) only.
    positions_p = forward_kinematics(pred)[0]
    positions_t = forward_kinematics(true)[0]
    moved = np.linalg.norm(positions_p - positions_t, axis=-1) > 1e-9
    assert moved[:, [20, 22]].all() and moved.sum() == 2 * 5
    expected = np.linalg.norm(positions_p - positions_t, axis=-1).mean(axis=-1) * 1000
    np.testing.assert_allclose(M.mpjpe(pred, true), expected)


def test_batch_shapes_and_means():
    pred = random_poses(6, 13).reshape(2, 3, 24, 3)
    true = random_poses(6, 14).reshape(2, 3, 24, 3)
    result = M.evaluate_poses(pred, true)
    assert result.pa_mpjpe_mm.shape == (2, 3)
    flat = M.evaluate_poses(pred.reshape(6, 24, 3), true.reshape(6, 24, 3))
    np.testing.assert_allclose(result.mpjre_deg.reshape(6), flat.mpjre_deg)
    assert result.means()["mpjpe_mm"] == pytest.approx(float(flat.mpjpe_mm.mean()))
    assert all(v >= 0 for v in result.means().values())
    single = M.mpjpe(pred[0, 0], true[0, 0])
    assert single.shape == () and float(single) == pytest.approx(result.mpjpe_mm[0, 0])
    empty = M.evaluate_poses(np.zeros((0, 24, 3)), np.zeros((0, 24, 3)))
    assert empty.mpjpe_mm.shape == (0,) and math.isnan(empty.means()["mpjpe_mm"])


def test_accuracy_interval_hand_computed():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half-width
    # 1.96 * sqrt(0.016 + 0.009604) / 1.38416: 0.716738 -+ 0.226581
    low, high = M.accuracy_interval([True] * 8 + [False] * 2)
    assert low == pytest.approx(0.490157, abs=1e-6)
    assert high == pytest.approx(0.943319, abs=1e-6)
    # at the ends it is one-sided and not empty, and it narrows as the count grows
    assert M.accuracy_interval([False] * 5)[0] == 0.0 and M.accuracy_interval([False] * 5)[1] > 0.3
    assert M.accuracy_interval([True] * 5)[1] == 1.0 and M.accuracy_interval([True] * 5)[0] < 0.7
    wide = M.accuracy_interval([True] * 9 + [False])
    narrow = M.accuracy_interval([True] * 900 + [False] * 100)
    assert narrow[0] > wide[0] and narrow[1] < wide[1]


def test_accuracy_interval_counts_clusters_not_trials():
    outcomes = [True] * 8 + [False] * 2
    # Each outcome asked five times over, the five sharing it: ten clusters, the interval of ten
    # trials; taken as fifty independent ones it would be about √5 times narrower.
    repeated = np.repeat(outcomes, 5)
    low, high = M.accuracy_interval(repeated, np.repeat(np.arange(10), 5))
    assert (low, high) == pytest.approx(M.accuracy_interval(outcomes))
    naive = M.accuracy_interval(repeated)
    assert (naive[1] - naive[0]) < 0.6 * (high - low)
    # Clusters of unequal sizes count as Kish's (Σm)² / Σm²: 8 clusters of one and 2 of five,
    # 18 trials, are worth 324 / 58 = 5.6 trials, not 10.
    uneven = M.accuracy_interval([True] * 13 + [False] * 5, list(range(8)) + [8] * 5 + [9] * 5)
    like = M.accuracy_interval([True] * 13 + [False] * 5, [k % 6 for k in range(18)])  # 6 of 3
    assert uneven[1] - uneven[0] > like[1] - like[0]


@pytest.mark.parametrize(
    ("correct", "clusters", "z", "message"),
    [
        ([], None, 1.96, "correct"),
        ([True, False], ["a"], 1.96, "clusters: expected 2 keys"),
        ([True], None, math.nan, "z"),
    ],
)
def test_accuracy_interval_refuses_bad_input(correct, clusters, z, message):
    with pytest.raises(ValueError, match=message):
        M.accuracy_interval(correct, clusters, z)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: M.mpjpe(np.zeros((2, 24, 3)), np.zeros((3, 24, 3))), "pred, true"),
        (lambda: M.mpjpe(np.zeros((2, 23, 3)), np.zeros((2, 23, 3))), "pred"),
        (lambda: M.mpjre(np.zeros((24, 3)), np.full((24, 3), np.nan)), "true"),
        (lambda: M.mpjre(np.zeros((24, 3)), np.zeros((24, 3)), unit="grad"), "unit"),
        (lambda: M.pa_mpjpe(np.zeros((24, 3)), np.zeros((24, 3)), joints=[0, 24]), "joints"),
        (
            lambda: M.mpjpe(np.zeros((24, 3)), np.zeros((24, 3)), rest_joints=np.zeros(3)),
            "rest_joints",
        ),
        (
            lambda: M.mpjpe_from_joints(np.zeros((2, 3)), np.zeros((2, 3)), root_index=5),
            "root_index",
        ),
        (
            lambda: M.mpjpe_from_joints(np.zeros((2, 3)), np.zeros((2, 3)), unit_scale=0),
            "unit_scale",
        ),
        (lambda: M.procrustes_align("x", np.zeros((2, 3))), "pred"),
        (lambda: M.pa_mpjpe_from_joints(np.zeros(3), np.zeros(3)), "pred"),
    ],
)
def test_validation_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
