"""The training loss (Eq. 1) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inference_service.training.losses import (
    IGNORE_INDEX,
    axis_angle_to_matrix_torch,
    chatpose_loss,
    pose_l1_loss,
    text_ce_loss,
)
from shared_protocol.rotations import axis_angle_to_matrix, matrix_to_rotation_6d

IDENTITY_6D = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # columns (1,0,0) and (0,1,0)


def _identity_head_output(poses: int = 1) -> torch.Tensor:
    return torch.tensor([IDENTITY_6D * 24] * poses, dtype=torch.float32)


def test_pose_l1_hand_computed():
    # Prediction: every joint the identity. Target: the root turned 90 degrees about Z, joint 5
    # turned 180 degrees about X, all else identity.
    target = torch.zeros(1, 24, 3)
    target[0, 0] = torch.tensor([0.0, 0.0, math.pi / 2])  # R = [[0,-1,0],[1,0,0],[0,0,1]]
    target[0, 5] = torch.tensor([math.pi, 0.0, 0.0])  # R = diag(1, -1, -1)
    # |I - Rz(90)| = 1+1+1+1 over 9 entries; |I - diag(1,-1,-1)| = 2+2 over 9 entries, one of
    # 23 body joints. The two means are added.
    expected = 4 / 9 + 4 / (9 * 23)
    loss = pose_l1_loss(_identity_head_output(), target)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_pose_l1_averages_over_poses_and_is_zero_on_exact_prediction():
    rng = np.random.default_rng(0)
    poses = rng.normal(size=(3, 24, 3)) * 0.7
    sixd = matrix_to_rotation_6d(axis_angle_to_matrix(poses)).reshape(3, 144)
    # Unnormalised 6D (scaled columns) decodes to the same rotations.
    head_output = torch.tensor(sixd * 2.5, dtype=torch.float32)
    loss = pose_l1_loss(head_output, torch.tensor(poses, dtype=torch.float32))
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    target = torch.zeros(2, 24, 3)
    target[0, 0] = torch.tensor([0.0, 0.0, math.pi / 2])
    both = pose_l1_loss(_identity_head_output(2), target)
    assert float(both) == pytest.approx((4 / 9) / 2, abs=1e-6)  # the root mean over 2 poses


def test_axis_angle_to_matrix_matches_numpy_including_small_angles():
    rng = np.random.default_rng(1)
    aa = np.concatenate(
        [rng.normal(size=(20, 3)), rng.normal(size=(5, 3)) * 1e-8, np.zeros((1, 3))]
    )
    ours = axis_angle_to_matrix_torch(torch.tensor(aa)).numpy()
    np.testing.assert_allclose(ours, axis_angle_to_matrix(aa), atol=1e-12)


def test_ce_only_on_labelled_positions():
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, -5.0], [1.0, 1.0]])
    labels = torch.tensor([1, IGNORE_INDEX, 0])
    # softmax([0, ln 3]) = [1/4, 3/4]: -ln(3/4); row 3: -ln(1/2); row 2 ignored.
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(text_ce_loss(logits, labels)) == pytest.approx(expected, abs=1e-6)
    assert float(text_ce_loss(logits, torch.full((3,), IGNORE_INDEX))) == 0.0


def test_total_is_weighted_sum_and_gradients_reach_both_inputs():
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    labels = torch.tensor([1])
    head_output = _identity_head_output().requires_grad_(True)
    target = torch.zeros(1, 24, 3)
    target[0, 0] = torch.tensor([0.0, 0.0, math.pi / 2])
    terms = chatpose_loss(logits, labels, head_output, target)
    ce, pose = -math.log(0.75), 4 / 9
    assert terms.floats() == pytest.approx((1.0 * ce + 0.1 * pose, ce, pose), abs=1e-6)
    terms.total.backward()
    assert logits.grad is not None and head_output.grad is not None
    assert head_output.grad.abs().sum() > 0
    weighted = chatpose_loss(logits, labels, head_output, target, text_weight=0.5, pose_weight=2)
    assert weighted.floats()[0] == pytest.approx(0.5 * ce + 2 * pose, abs=1e-6)


def test_no_poses_in_batch_gives_zero_pose_term():
    terms = chatpose_loss(
        torch.zeros(1, 2), torch.tensor([0]), torch.zeros(0, 144), torch.zeros(0, 24, 3)
    )
    assert terms.floats() == pytest.approx((math.log(2), math.log(2), 0.0), abs=1e-6)
