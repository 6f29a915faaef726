"""Tests for shared_protocol.rotations: round trips, a scipy oracle, edge angles and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation, Slerp

from shared_protocol import rotations as rot

PROPERTY = settings(max_examples=200, deadline=None)

# Angles that stress the edge cases, mixed with generic ones.
EDGE_ANGLES = [0.0, 1e-12, 1e-9, 1e-7, 1e-4]
EDGE_ANGLES += [math.pi - 1e-4, math.pi - 1e-7, math.pi - 1e-9, math.pi]
angles = st.one_of(st.sampled_from(EDGE_ANGLES), st.floats(0.0, math.pi))
axes = (
    st.tuples(*[st.floats(-1.0, 1.0)] * 3)
    .map(np.array)
    .filter(lambda v: np.linalg.norm(v) > 1e-3)
    .map(lambda v: v / np.linalg.norm(v))
)
rotvecs = st.builds(lambda axis, angle: axis * angle, axes, angles)
rotvec_batches = st.lists(rotvecs, min_size=1, max_size=4).map(np.array)


def scipy_quat_wxyz(r: Rotation) -> np.ndarray:
    xyzw = r.as_quat()
    return np.concatenate([xyzw[..., 3:], xyzw[..., :3]], axis=-1)


def assert_same_quaternion(q1, q2, atol=1e-12):
    """Equal up to the q / −q sign."""
    sign = np.sign(np.sum(q1 * q2, axis=-1, keepdims=True))
    np.testing.assert_allclose(q1, sign * q2, atol=atol)


# --- round trips (compared as matrices: axis-angle at π has a sign ambiguity) --------------


@PROPERTY
@given(rotvec_batches)
def test_axis_angle_matrix_round_trip(aa):
    m = rot.axis_angle_to_matrix(aa)
    back = rot.matrix_to_axis_angle(m)
    np.testing.assert_allclose(rot.axis_angle_to_matrix(back), m, atol=1e-12)
    angle_back, angle = np.linalg.norm(back, axis=-1), np.linalg.norm(aa, axis=-1)
    np.testing.assert_allclose(angle_back, angle, atol=1e-9)
    assert np.all(np.linalg.norm(back, axis=-1) <= math.pi + 1e-12)


@PROPERTY
@given(rotvec_batches)
def test_axis_angle_quaternion_round_trip(aa):
    q = rot.axis_angle_to_quaternion(aa)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-12)
    assert np.all(q[..., 0] >= 0)
    back = rot.quaternion_to_axis_angle(q)
    np.testing.assert_allclose(
        rot.axis_angle_to_matrix(back), rot.axis_angle_to_matrix(aa), atol=1e-12
    )


@PROPERTY
@given(rotvec_batches)
def test_matrix_quaternion_round_trip(aa):
    m = rot.axis_angle_to_matrix(aa)
    q = rot.matrix_to_quaternion(m)
    assert np.all(q[..., 0] >= 0)
    np.testing.assert_allclose(rot.quaternion_to_matrix(q), m, atol=1e-12)
    assert_same_quaternion(q, rot.axis_angle_to_quaternion(aa))


@PROPERTY
@given(rotvec_batches)
def test_matrix_6d_round_trip(aa):
    m = rot.axis_angle_to_matrix(aa)
    six = rot.matrix_to_rotation_6d(m)
    assert six.shape == (*aa.shape[:-1], 6)
    np.testing.assert_allclose(rot.rotation_6d_to_matrix(six), m, atol=1e-12)


@PROPERTY
@given(rotvec_batches, st.floats(0.1, 10.0), st.floats(-0.5, 0.5))
def test_6d_decode_ignores_scale_and_skew(aa, scale, skew):
    """Gram-Schmidt: scaling column 1 and adding some of column 1 to column 2 changes nothing."""
    m = rot.axis_angle_to_matrix(aa)
    c1, c2 = m[..., :, 0], m[..., :, 1]
    six = np.concatenate([scale * c1, c2 + skew * c1], axis=-1)
    np.testing.assert_allclose(rot.rotation_6d_to_matrix(six), m, atol=1e-12)


# --- scipy as an independent oracle --------------------------------------------------------


@PROPERTY
@given(rotvec_batches)
def test_against_scipy(aa):
    r = Rotation.from_rotvec(aa)
    m_ref = r.as_matrix()
    m = rot.axis_angle_to_matrix(aa)
    np.testing.assert_allclose(m, m_ref, atol=1e-12)
    assert_same_quaternion(rot.axis_angle_to_quaternion(aa), scipy_quat_wxyz(r))
    assert_same_quaternion(rot.matrix_to_quaternion(m_ref), scipy_quat_wxyz(r))
    np.testing.assert_allclose(rot.quaternion_to_matrix(scipy_quat_wxyz(r)), m_ref, atol=1e-12)
    # Axis-angle back: compare through scipy's matrices (sign ambiguity at π).
    back = rot.matrix_to_axis_angle(m_ref)
    np.testing.assert_allclose(Rotation.from_rotvec(back).as_matrix(), m_ref, atol=1e-12)
    back_q = rot.quaternion_to_axis_angle(scipy_quat_wxyz(r))
    np.testing.assert_allclose(Rotation.from_rotvec(back_q).as_matrix(), m_ref, atol=1e-12)
    np.testing.assert_allclose(rot.rotation_angle(m_ref), r.magnitude(), atol=1e-9)
    np.testing.assert_allclose(
        rot.matrix_to_rotation_6d(m_ref),
        np.concatenate([m_ref[..., :, 0], m_ref[..., :, 1]], axis=-1),
        atol=0,
    )


def test_against_scipy_random_rotations():
    r = Rotation.random(500, random_state=0)
    m = r.as_matrix()
    np.testing.assert_allclose(rot.axis_angle_to_matrix(r.as_rotvec()), m, atol=1e-12)
    np.testing.assert_allclose(rot.matrix_to_axis_angle(m), r.as_rotvec(), atol=1e-9)
    assert_same_quaternion(rot.matrix_to_quaternion(m), scipy_quat_wxyz(r))
    r2 = Rotation.random(500, random_state=1)
    np.testing.assert_allclose(
        rot.geodesic_distance(m, r2.as_matrix()), (r.inv() * r2).magnitude(), atol=1e-9
    )


# --- accuracy near 0 and π -----------------------------------------------------------------


@pytest.mark.parametrize("angle", [1e-12, 1e-9, 1e-6, 1e-4, 1e-3])
def test_small_angles_recovered_accurately(angle):
    aa = angle * np.array([0.48, -0.6, 0.64])
    m = rot.axis_angle_to_matrix(aa)
    # arccos of the trace would return 0 here.
    np.testing.assert_allclose(rot.matrix_to_axis_angle(m), aa, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(
        rot.quaternion_to_axis_angle(rot.axis_angle_to_quaternion(aa)), aa, rtol=1e-12
    )
    assert rot.rotation_angle(m) == pytest.approx(angle, rel=1e-6)


@pytest.mark.parametrize("eps", [1e-4, 1e-7, 1e-9])
def test_near_pi_keeps_axis_sign(eps):
    aa = (math.pi - eps) * np.array([0.48, -0.6, 0.64])
    m = rot.axis_angle_to_matrix(aa)
    np.testing.assert_allclose(rot.matrix_to_axis_angle(m), aa, atol=1e-12)
    assert rot.rotation_angle(m) == pytest.approx(math.pi - eps, abs=1e-13)


def test_exactly_pi():
    for axis in np.eye(3):
        m = rot.axis_angle_to_matrix(math.pi * axis)
        np.testing.assert_allclose(m, 2 * np.outer(axis, axis) - np.eye(3), atol=1e-15)
        back = rot.matrix_to_axis_angle(m)
        assert np.allclose(back, math.pi * axis) or np.allclose(back, -math.pi * axis)
        assert rot.rotation_angle(m) == pytest.approx(math.pi)


def test_axis_angle_beyond_pi_is_wrapped():
    aa = np.array([0.0, 0.0, 1.5 * math.pi])  # same rotation as −π/2 about z
    np.testing.assert_allclose(
        rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(aa)), [0, 0, -math.pi / 2], atol=1e-12
    )
    q = rot.axis_angle_to_quaternion(aa)
    assert q[0] >= 0
    np.testing.assert_allclose(rot.quaternion_to_axis_angle(q), [0, 0, -math.pi / 2], atol=1e-12)


# --- hand-checkable cases ------------------------------------------------------------------


def test_hand_checked_90_degrees_about_z():
    m = rot.axis_angle_to_matrix([0, 0, math.pi / 2])
    expected = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(m, expected, atol=1e-15)
    np.testing.assert_allclose(m @ [1, 0, 0], [0, 1, 0], atol=1e-15)  # x -> y
    s = math.sqrt(0.5)
    np.testing.assert_allclose(rot.axis_angle_to_quaternion([0, 0, math.pi / 2]), [s, 0, 0, s])
    np.testing.assert_allclose(rot.matrix_to_quaternion(expected), [s, 0, 0, s])


def test_6d_layout_is_columns_one_after_the_other():
    # 45° about z: columns (c, s, 0), (−s, c, 0), (0, 0, 1).
    c = s = math.sqrt(0.5)
    m = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    six = rot.matrix_to_rotation_6d(m)
    np.testing.assert_allclose(six, [c, s, 0, -s, c, 0], atol=1e-15)
    np.testing.assert_allclose(rot.rotation_6d_to_matrix([c, s, 0, -s, c, 0]), m, atol=1e-15)
    # The interleaved (SPIN/VPoser) layout gives other numbers, and decoding them as ours fails.
    interleaved = m[:, :2].reshape(6)  # [c, −s, s, c, 0, 0]
    assert not np.allclose(six, interleaved)
    assert not np.allclose(rot.rotation_6d_to_matrix(interleaved), m, atol=1e-3)
    # The row (pytorch3d) layout [c, −s, 0, s, c, 0] decodes to the transpose: −45° about z.
    rows = m[:2, :].reshape(6)
    assert not np.allclose(six, rows)
    np.testing.assert_allclose(rot.rotation_6d_to_matrix(rows), m.T, atol=1e-15)


def test_6d_gram_schmidt_by_hand():
    # First column (2, 0, 0) -> x; second (1, 3, 0) minus its x part -> y; third x × y = z.
    np.testing.assert_allclose(rot.rotation_6d_to_matrix([2, 0, 0, 1, 3, 0]), np.eye(3))
    # Second column along −z: third column = x × (−z) = +y.
    np.testing.assert_allclose(
        rot.rotation_6d_to_matrix([1, 0, 0, 0, 0, -5]), [[1, 0, 0], [0, 0, 1], [0, -1, 0]]
    )


def test_geodesic_distance_by_hand():
    a = rot.axis_angle_to_matrix([0, 0.3, 0])
    b = rot.axis_angle_to_matrix([0, -0.5, 0])
    assert rot.geodesic_distance(a, b) == pytest.approx(0.8)
    assert rot.geodesic_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    # Broadcasting one matrix against a batch.
    assert rot.geodesic_distance(np.eye(3), np.stack([a, b])) == pytest.approx([0.3, 0.5])


def test_quaternion_inputs_are_normalised_and_sign_free():
    q = rot.axis_angle_to_quaternion([0.3, -0.2, 1.1])
    m = rot.quaternion_to_matrix(q)
    np.testing.assert_allclose(rot.quaternion_to_matrix(7.5 * q), m, atol=1e-14)
    np.testing.assert_allclose(rot.quaternion_to_matrix(-q), m, atol=1e-14)
    np.testing.assert_allclose(rot.quaternion_to_axis_angle(-3 * q), [0.3, -0.2, 1.1], atol=1e-14)


def test_float32_model_output_is_accepted():
    m = Rotation.random(50, random_state=2).as_matrix().astype(np.float32)
    m = m + np.float32(1e-5)  # a little off orthonormal, as network output can be
    aa = rot.matrix_to_axis_angle(m)
    assert aa.dtype == np.float64
    np.testing.assert_allclose(rot.axis_angle_to_matrix(aa), m, atol=1e-4)
    assert rot.matrix_to_rotation_6d(m).dtype == np.float64


def test_batch_shapes_lists_and_empty_batches():
    aa = np.zeros((2, 5, 3))
    assert rot.axis_angle_to_matrix(aa).shape == (2, 5, 3, 3)
    assert rot.axis_angle_to_quaternion(aa).shape == (2, 5, 4)
    assert rot.rotation_angle(np.broadcast_to(np.eye(3), (2, 5, 3, 3))).shape == (2, 5)
    assert rot.axis_angle_to_matrix([0.0, 0.0, 0.0]).shape == (3, 3)  # plain list, no batch
    assert rot.rotation_angle(np.eye(3)).shape == ()
    empties = {
        rot.axis_angle_to_matrix: ((0, 3), (0, 3, 3)),
        rot.axis_angle_to_quaternion: ((0, 3), (0, 4)),
        rot.matrix_to_axis_angle: ((0, 3, 3), (0, 3)),
        rot.matrix_to_quaternion: ((0, 3, 3), (0, 4)),
        rot.quaternion_to_axis_angle: ((0, 4), (0, 3)),
        rot.quaternion_to_matrix: ((0, 4), (0, 3, 3)),
        rot.matrix_to_rotation_6d: ((0, 3, 3), (0, 6)),
        rot.rotation_6d_to_matrix: ((0, 6), (0, 3, 3)),
        rot.rotation_angle: ((0, 3, 3), (0,)),
    }
    for fn, (shape_in, shape_out) in empties.items():
        out = fn(np.zeros(shape_in))
        assert out.shape == shape_out and out.dtype == np.float64, fn.__name__
    assert rot.geodesic_distance(np.zeros((0, 3, 3)), np.zeros((0, 3, 3))).shape == (0,)


def test_outputs_are_new_arrays():
    m = np.eye(3)
    six = rot.matrix_to_rotation_6d(m)
    six[0] = 5.0
    assert m[0, 0] == 1.0


# --- bad input -----------------------------------------------------------------------------

NON_ROTATION = np.diag([1.0, 1.0, 1.3])
REFLECTION = np.diag([1.0, 1.0, -1.0])

BAD_INPUTS = [
    # (function, bad argument, argument name expected in the message, words expected)
    (rot.axis_angle_to_matrix, np.zeros((4, 2)), "axis_angle", "(..., 3)"),
    (rot.axis_angle_to_matrix, [0.0, np.nan, 0.0], "axis_angle", "NaN"),
    (rot.axis_angle_to_matrix, [0.0, np.inf, 0.0], "axis_angle", "inf"),
    (rot.axis_angle_to_matrix, 1.0, "axis_angle", "shape"),
    (rot.axis_angle_to_matrix, "abc", "axis_angle", "numeric"),
    (rot.axis_angle_to_quaternion, np.zeros(4), "axis_angle", "(..., 3)"),
    (rot.axis_angle_to_quaternion, [np.nan, 0.0, 0.0], "axis_angle", "NaN"),
    (rot.matrix_to_axis_angle, np.zeros((3, 4)), "matrix", "(..., 3, 3)"),
    (rot.matrix_to_axis_angle, np.full((3, 3), np.nan), "matrix", "NaN"),
    (rot.matrix_to_axis_angle, NON_ROTATION, "matrix", "not a rotation"),
    (rot.matrix_to_axis_angle, REFLECTION, "matrix", "reflection"),
    (rot.matrix_to_quaternion, np.eye(4), "matrix", "(..., 3, 3)"),
    (rot.matrix_to_quaternion, NON_ROTATION, "matrix", "not a rotation"),
    (rot.matrix_to_quaternion, np.full((3, 3), np.inf), "matrix", "inf"),
    (rot.quaternion_to_axis_angle, np.zeros(3), "quaternion", "(..., 4)"),
    (rot.quaternion_to_axis_angle, np.zeros(4), "quaternion", "zero"),
    (rot.quaternion_to_axis_angle, [1.0, np.nan, 0, 0], "quaternion", "NaN"),
    (rot.quaternion_to_matrix, np.zeros((2, 5)), "quaternion", "(..., 4)"),
    (rot.quaternion_to_matrix, [[1.0, 0, 0, 0], [0, 0, 0, 0]], "quaternion", "zero"),
    (rot.quaternion_to_matrix, [np.inf, 0, 0, 0], "quaternion", "inf"),
    (rot.axis_angle_to_matrix, [1e200, 0, 0], "axis_angle", "too large to compute"),
    (rot.axis_angle_to_quaternion, [1e160, 1e160, 0], "axis_angle", "too large to compute"),
    (rot.matrix_to_rotation_6d, np.zeros((2, 3)), "matrix", "(..., 3, 3)"),
    (rot.matrix_to_rotation_6d, NON_ROTATION, "matrix", "not a rotation"),
    (rot.matrix_to_rotation_6d, [REFLECTION], "matrix", "reflection"),
    (rot.rotation_6d_to_matrix, np.zeros(9), "rot6d", "(..., 6)"),
    (rot.rotation_6d_to_matrix, np.zeros(6), "rot6d", "degenerate"),
    (rot.rotation_6d_to_matrix, [1.0, 0, 0, 0, 0, 0], "rot6d", "zero column"),
    (rot.rotation_6d_to_matrix, [1.0, 2, 3, -2, -4, -6], "rot6d", "collinear"),
    (rot.rotation_6d_to_matrix, [1.0, 0, 0, np.nan, 1, 0], "rot6d", "NaN"),
    (rot.rotation_angle, np.zeros((3,)), "matrix", "(..., 3, 3)"),
    (rot.rotation_angle, NON_ROTATION, "matrix", "not a rotation"),
    (rot.rotation_angle, np.full((3, 3), np.nan), "matrix", "NaN"),
]


@pytest.mark.parametrize(
    ("fn", "arg", "name", "words"),
    BAD_INPUTS,
    ids=[f"{case[0].__name__}-{i}" for i, case in enumerate(BAD_INPUTS)],
)
def test_bad_input_raises_value_error_naming_the_argument(fn, arg, name, words):
    with pytest.raises(ValueError) as info:
        fn(arg)
    message = str(info.value)
    assert message.startswith(name + ":"), message
    assert words in message, message


def test_a_huge_quaternion_is_normalised_not_taken_for_the_identity():
    # Its norm overflows to inf: divided by it, every entry became 0, the identity.
    for q in ([1e200, 1e200, 0, 0], [0, 0, 0, 1e308]):
        expected = rot.quaternion_to_matrix(np.array(q) / np.abs(q).max())
        np.testing.assert_allclose(rot.quaternion_to_matrix(q), expected, atol=1e-15)
        assert np.isfinite(rot.quaternion_to_axis_angle(q)).all()


def test_shape_message_format():
    with pytest.raises(ValueError, match=r"axis_angle: expected shape \(\.\.\., 3\), got \(4, 2\)"):
        rot.axis_angle_to_matrix(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"max \|RᵀR − I\| = 0\.69"):
        rot.matrix_to_axis_angle(NON_ROTATION)


@pytest.mark.parametrize(
    ("a", "b", "name"),
    [
        (NON_ROTATION, np.eye(3), "matrix_a"),
        (np.eye(3), NON_ROTATION, "matrix_b"),
        (np.eye(3), np.zeros((3, 2)), "matrix_b"),
        (np.full((3, 3), np.nan), np.eye(3), "matrix_a"),
        (np.eye(3), REFLECTION, "matrix_b"),
        (np.zeros((2, 3, 3)) + np.eye(3), np.zeros((4, 3, 3)) + np.eye(3), "matrix_a, matrix_b"),
    ],
)
def test_geodesic_distance_bad_input(a, b, name):
    with pytest.raises(ValueError, match="^" + name):
        rot.geodesic_distance(a, b)


def test_6d_decode_of_huge_columns_is_still_a_rotation():
    m = rot.rotation_6d_to_matrix(np.array([1e200, 0.0, 0.0, 0.0, 1e200, 0.0]))
    np.testing.assert_allclose(m, np.eye(3))


def test_slerp_matches_scipy_s_and_takes_the_shorter_arc():
    rng = np.random.default_rng(7)
    start, end = Rotation.random(50, random_state=1), Rotation.random(50, random_state=2)
    fractions = rng.uniform(0, 1, 50)
    wxyz = lambda r: np.roll(r.as_quat(), 1, axis=-1)  # noqa: E731  scipy's is (x, y, z, w)
    got = rot.slerp(wxyz(start), wxyz(end), fractions)
    for k in range(50):
        expected = Slerp([0, 1], Rotation.concatenate([start[k], end[k]]))(fractions[k])
        angle = (Rotation.from_quat(np.roll(got[k], -1)) * expected.inv()).magnitude()
        assert angle < 1e-9
    # -q is q: the way from it is as short, not a turn the long way round.
    np.testing.assert_allclose(rot.slerp(wxyz(start), -wxyz(end), fractions), got, atol=1e-12)
    canonical_start = wxyz(start) * np.sign(wxyz(start)[:, :1])
    np.testing.assert_allclose(rot.slerp(wxyz(start), wxyz(end), 0.0), canonical_start, atol=1e-12)
    same = rot.slerp([1, 0, 0, 0], [1, 0, 0, 1e-9], 0.5)  # nearly one rotation: no 0 / 0
    assert np.isfinite(same).all() and abs(np.linalg.norm(same) - 1) < 1e-12
    with pytest.raises(ValueError, match="fraction"):
        rot.slerp([1, 0, 0, 0], [0, 1, 0, 0], np.nan)
