"""The training loss, Eq. 1 of the ChatPose paper:

    L = λ_t · CE(text) + λ_θ · L1(pose),      λ_t = 1.0, λ_θ = 0.1

- CE: token-level cross-entropy over the assistant's answer tokens only (the prompt, the image
  tokens and the padding carry the label -100), averaged over all answer tokens of the batch.
  The pose token itself is one of the answer tokens: predicting it is learned here.
- L1(pose), as in the release: the head's 144 outputs are decoded as 24 6D rotations (HMR2
  layout: two columns, Gram-Schmidt) into rotation matrices, the ground-truth axis-angle is
  turned into matrices (Rodrigues), and the absolute differences of the matrix entries are
  averaged SEPARATELY for the global orientation (joint 0: mean over poses x 9 entries) and the
  body (joints 1..23: mean over poses x 23 joints x 9 entries); the two means are ADDED:

      L1(pose) = mean|R̂_0 − R_0| + mean|R̂_{1..23} − R_{1..23}|

  so the root counts as much as the 23 body joints together. A batch without poses has
  L1(pose) = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inference_service.pose_head import rotation_6d_to_matrix_torch
from shared_protocol.skeleton import NUM_JOINTS

TEXT_WEIGHT = 1.0  # λ_t
POSE_WEIGHT = 0.1  # λ_θ
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor
    pose_l1: torch.Tensor

    def floats(self) -> tuple[float, float, float]:
        return float(self.total.detach()), float(self.ce), float(self.pose_l1)


def axis_angle_to_matrix_torch(axis_angle: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) by Rodrigues' formula, stable near angle 0."""
    theta = axis_angle.norm(dim=-1)[..., None, None]
    small = theta < 1e-6
    safe = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, 1.0 - theta**2 / 6.0, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - theta**2 / 24.0, 2.0 * torch.sin(safe / 2) ** 2 / safe**2)
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack(
        [
            torch.stack([zero, -z, y], -1),
            torch.stack([z, zero, -x], -1),
            torch.stack([-y, x, zero], -1),
        ],
        dim=-2,
    )
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + a * k + b * (k @ k)


def pose_l1_loss(head_output: torch.Tensor, target_axis_angle: torch.Tensor) -> torch.Tensor:
    """(P, 144) head output, (P, 24, 3) axis-angle targets -> the scalar L1(pose) above."""
    if head_output.shape[0] == 0:
        return head_output.sum() * 0.0  # keeps the graph (and the device) for an empty batch
    predicted = rotation_6d_to_matrix_torch(head_output.reshape(-1, NUM_JOINTS, 6))
    target = axis_angle_to_matrix_torch(target_axis_angle.to(predicted.dtype))
    difference = (predicted - target).abs()
    return difference[:, 0].mean() + difference[:, 1:].mean()


def text_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of the answer positions and their (N,) next-token labels -> mean CE.

    Positions labelled IGNORE_INDEX are skipped; with none left the loss is 0.
    """
    keep = labels != IGNORE_INDEX
    if not keep.any():
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits[keep].float(), labels[keep])


def chatpose_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    head_output: torch.Tensor,
    target_axis_angle: torch.Tensor,
    *,
    text_weight: float = TEXT_WEIGHT,
    pose_weight: float = POSE_WEIGHT,
) -> LossTerms:
    """L = text_weight · CE + pose_weight · L1(pose), with the two terms for logging."""
    ce = text_ce_loss(logits, labels)
    pose = pose_l1_loss(head_output.float(), target_axis_angle)
    return LossTerms(text_weight * ce + pose_weight * pose, ce.detach(), pose.detach())
