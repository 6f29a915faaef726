"""Pose-estimation metrics: MPJPE, PA-MPJPE and MPJRE. numpy only.

Definitions (the project's conventions, "Metrics"; docs/evaluation.md):

- MPJPE: mean over joints of the Euclidean distance between predicted and true joint positions,
  in millimetres, after subtracting the root joint (the pelvis) from each side by default.
- PA-MPJPE: the same after a similarity Procrustes alignment of the prediction onto the truth
  (rotation, uniform scale and translation fitted per sample by SVD, with the reflection fix:
  the fitted transform is never a mirror image).
- MPJRE: mean over the 24 joints of the geodesic angle of R_predᵀ · R_true between the *local*
  rotations (joint 0 is the global orientation), in degrees. ChatPose's tables report a value
  "×100"; ``mpjre(..., unit="rad_x100")`` is the mean angle in radians times 100, our reading of
  that column (10.4 there is then 0.104 rad ≈ 6.0°). Degrees are the primary unit.

Poses are (..., 24, 3) SMPL axis-angle; joint positions come from
``shared_protocol.skeleton.forward_kinematics`` on the built-in rest skeleton, or on given rest
joints (the predicted and the true body may differ). Positions are in metres, reported in mm.

"No root" variants (``ignore_global_orient=True``) zero the global orientation of both the
prediction and the truth before measuring, so a wrong global orientation (ChatPose's known weak
point) does not count. For MPJRE joint 0 then contributes 0 and the mean is still over 24 joints.

Every pose metric is batched over leading dimensions, returns per-sample values of the batch
shape (``.mean()`` gives the mean), and raises ValueError naming the bad argument.

``accuracy_interval`` gives the 95 % interval of an accuracy (the paraphrase and left/right bars),
so that a difference of a few prompts reads as what it is; prompts that come in clusters (one
phrasing asked with five subjects) count as their clusters, not as that many independent trials.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from shared_protocol.arrays import finite_array
from shared_protocol.rotations import axis_angle_to_matrix, geodesic_distance
from shared_protocol.skeleton import NUM_JOINTS, forward_kinematics

__all__ = [
    "MM_PER_METRE",
    "PoseMetrics",
    "evaluate_poses",
    "mpjpe",
    "mpjpe_from_joints",
    "mpjre",
    "pa_mpjpe",
    "pa_mpjpe_from_joints",
    "procrustes_align",
    "reduction",
]

MM_PER_METRE = 1000.0
_MPJRE_UNITS = ("deg", "rad", "rad_x100")


# --- validation ------------------------------------------------------------------------------


def _pair(pred, true, trailing: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    p = finite_array(pred, "pred", trailing)
    t = finite_array(true, "true", trailing)
    if p.shape != t.shape:
        raise ValueError(f"pred, true: shapes differ: {p.shape} and {t.shape}")
    return p, t


def _joint_pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    p, t = _pair(pred, true, (3,))
    if p.ndim < 2 or p.shape[-2] < 1:
        raise ValueError(f"pred: expected shape (..., J, 3) with J >= 1, got {p.shape}")
    return p, t


def _root_index(root_index, joints: int) -> int:
    if isinstance(root_index, bool) or not isinstance(root_index, int | np.integer):
        raise ValueError(f"root_index: expected an integer, got {root_index!r}")
    if not -joints <= root_index < joints:
        raise ValueError(f"root_index: {root_index} out of range for {joints} joints")
    return int(root_index) % joints


def _scale(unit_scale) -> float:
    if (
        isinstance(unit_scale, bool)
        or not isinstance(unit_scale, int | float)
        or not (math.isfinite(unit_scale) and unit_scale > 0)
    ):
        raise ValueError(f"unit_scale: expected a positive number, got {unit_scale!r}")
    return float(unit_scale)


def _subset(joints: Sequence[int] | None) -> list[int] | slice:
    if joints is None:
        return slice(None)
    try:
        chosen = [int(j) for j in joints]
    except (TypeError, ValueError):
        raise ValueError(f"joints: expected joint indices, got {joints!r}") from None
    if not chosen or any(not 0 <= j < NUM_JOINTS for j in chosen):
        raise ValueError(f"joints: expected indices in 0..{NUM_JOINTS - 1}, got {chosen}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"joints: repeated indices in {chosen}")
    return chosen


# --- on joint positions ----------------------------------------------------------------------


def mpjpe_from_joints(
    pred_joints,
    true_joints,
    *,
    root_relative: bool = True,
    root_index: int = 0,
    unit_scale: float = MM_PER_METRE,
) -> np.ndarray:
    """Mean per-joint position error of (..., J, 3) joint sets -> (...).

    root_relative: subtract joint ``root_index`` from each side first (the pelvis for SMPL).
    unit_scale: multiplies the result; the default turns metres into millimetres.
    """
    p, t = _joint_pair(pred_joints, true_joints)
    scale = _scale(unit_scale)
    if root_relative:
        r = _root_index(root_index, p.shape[-2])
        p = p - p[..., r : r + 1, :]
        t = t - t[..., r : r + 1, :]
    return np.linalg.norm(p - t, axis=-1).mean(axis=-1) * scale


def procrustes_align(pred_joints, true_joints, *, return_params: bool = False):
    """Similarity-align (..., J, 3) ``pred_joints`` onto ``true_joints`` (per sample).

    Finds s > 0, a rotation R (det +1) and t minimising Σ_j ‖s·R·p_j + t − y_j‖² (Umeyama, by
    SVD of the cross-covariance, with the reflection fix D = diag(1, 1, sign det(V Uᵀ)); without
    it the "rotation" may be a mirror image). Returns the aligned joints, and with
    ``return_params`` also ``(scale (...), rotation (..., 3, 3), translation (..., 3))``. A
    prediction whose joints all coincide gets scale 0 (it aligns to the truth's centroid).
    """
    p, t = _joint_pair(pred_joints, true_joints)
    mu_p = p.mean(axis=-2, keepdims=True)
    mu_t = t.mean(axis=-2, keepdims=True)
    x = p - mu_p
    y = t - mu_t
    h = np.swapaxes(x, -1, -2) @ y  # (..., 3, 3) = Σ_j x_j y_jᵀ
    u, sv, vt = np.linalg.svd(h)
    v = np.swapaxes(vt, -1, -2)
    ut = np.swapaxes(u, -1, -2)
    d = np.sign(np.linalg.det(v @ ut))
    d = np.where(d == 0, 1.0, d)
    fix = np.ones((*d.shape, 3))
    fix[..., 2] = d
    rotation = (v * fix[..., None, :]) @ ut
    var_p = np.sum(x * x, axis=(-2, -1))
    trace = np.sum(sv * fix, axis=-1)
    degenerate = var_p <= 1e-300
    scale = np.where(degenerate, 0.0, trace / np.where(degenerate, 1.0, var_p))
    rotation = np.where(degenerate[..., None, None], np.eye(3), rotation)
    translation = mu_t[..., 0, :] - scale[..., None] * (rotation @ mu_p[..., 0, :, None])[..., 0]
    aligned = (
        scale[..., None, None] * (p @ np.swapaxes(rotation, -1, -2)) + translation[..., None, :]
    )
    if return_params:
        return aligned, (scale, rotation, translation)
    return aligned


def pa_mpjpe_from_joints(
    pred_joints, true_joints, *, unit_scale: float = MM_PER_METRE
) -> np.ndarray:
    """MPJPE after ``procrustes_align`` of (..., J, 3) joint sets -> (...)."""
    aligned = procrustes_align(pred_joints, true_joints)
    return mpjpe_from_joints(aligned, true_joints, root_relative=False, unit_scale=unit_scale)


# --- on SMPL poses ---------------------------------------------------------------------------


def _poses(pred, true, ignore_global_orient: bool) -> tuple[np.ndarray, np.ndarray]:
    p, t = _pair(pred, true, (NUM_JOINTS, 3))
    if ignore_global_orient:
        p = p.copy()
        t = t.copy()
        p[..., 0, :] = 0.0
        t[..., 0, :] = 0.0
    return p, t


def _joints(pred, true, rest_joints, true_rest_joints, ignore_global_orient):
    p, t = _poses(pred, true, ignore_global_orient)
    rest_p = None if rest_joints is None else finite_array(rest_joints, "rest_joints", (24, 3))
    rest_t = (
        rest_p
        if true_rest_joints is None
        else finite_array(true_rest_joints, "true_rest_joints", (24, 3))
    )
    return forward_kinematics(p, rest_p)[0], forward_kinematics(t, rest_t)[0]


def mpjpe(
    pred,
    true,
    *,
    rest_joints=None,
    true_rest_joints=None,
    ignore_global_orient: bool = False,
    root_relative: bool = True,
    joints: Sequence[int] | None = None,
) -> np.ndarray:
    """MPJPE (mm) of (..., 24, 3) axis-angle poses -> (...).

    rest_joints: the predicted body's rest joints (default the built-in skeleton);
    true_rest_joints: the true body's (default: the same as ``rest_joints``).
    ignore_global_orient: zero the global orientation on both sides ("no root" variant).
    root_relative: subtract the pelvis first (the usual MPJPE).
    joints: indices of the joints to average over (default all 24; the pelvis is subtracted
        before the subset is taken).
    """
    jp, jt = _joints(pred, true, rest_joints, true_rest_joints, ignore_global_orient)
    if root_relative:
        jp = jp - jp[..., :1, :]
        jt = jt - jt[..., :1, :]
    chosen = _subset(joints)
    return mpjpe_from_joints(jp[..., chosen, :], jt[..., chosen, :], root_relative=False)


def pa_mpjpe(
    pred,
    true,
    *,
    rest_joints=None,
    true_rest_joints=None,
    ignore_global_orient: bool = False,
    joints: Sequence[int] | None = None,
) -> np.ndarray:
    """PA-MPJPE (mm) of (..., 24, 3) axis-angle poses -> (...); arguments as ``mpjpe``."""
    jp, jt = _joints(pred, true, rest_joints, true_rest_joints, ignore_global_orient)
    chosen = _subset(joints)
    return pa_mpjpe_from_joints(jp[..., chosen, :], jt[..., chosen, :])


def mpjre(
    pred,
    true,
    *,
    ignore_global_orient: bool = False,
    unit: str = "deg",
    joints: Sequence[int] | None = None,
) -> np.ndarray:
    """MPJRE of (..., 24, 3) axis-angle poses -> (...): the mean over joints of the geodesic
    angle between predicted and true local rotations.

    unit: "deg" (default), "rad", or "rad_x100" (radians × 100, the paper's "×100" column).
    """
    if unit not in _MPJRE_UNITS:
        raise ValueError(f"unit: expected one of {_MPJRE_UNITS}, got {unit!r}")
    p, t = _poses(pred, true, ignore_global_orient)
    chosen = _subset(joints)
    angles = geodesic_distance(axis_angle_to_matrix(p), axis_angle_to_matrix(t))
    mean = angles[..., chosen].mean(axis=-1)
    if unit == "deg":
        return np.degrees(mean)
    if unit == "rad_x100":
        return mean * 100.0
    return mean


# --- all of them -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PoseMetrics:
    """Per-sample metrics of a batch (arrays of the batch shape)."""

    mpjpe_mm: np.ndarray
    pa_mpjpe_mm: np.ndarray
    mpjre_deg: np.ndarray
    mpjre_rad_x100: np.ndarray
    mpjpe_mm_no_root: np.ndarray
    pa_mpjpe_mm_no_root: np.ndarray
    mpjre_deg_no_root: np.ndarray
    mpjre_rad_x100_no_root: np.ndarray

    def means(self) -> dict[str, float]:
        """Mean of each metric over the batch (NaN for an empty batch)."""
        return {
            f.name: float(np.mean(v)) if (v := getattr(self, f.name)).size else math.nan
            for f in fields(self)
        }


def evaluate_poses(
    pred,
    true,
    *,
    rest_joints=None,
    true_rest_joints=None,
    joints: Sequence[int] | None = None,
) -> PoseMetrics:
    """All metrics, with and without the global orientation, for (..., 24, 3) poses."""
    kwargs = {"rest_joints": rest_joints, "true_rest_joints": true_rest_joints, "joints": joints}
    values = {}
    for suffix, ignore in (("", False), ("_no_root", True)):
        values[f"mpjpe_mm{suffix}"] = mpjpe(pred, true, ignore_global_orient=ignore, **kwargs)
        values[f"pa_mpjpe_mm{suffix}"] = pa_mpjpe(pred, true, ignore_global_orient=ignore, **kwargs)
        values[f"mpjre_deg{suffix}"] = mpjre(pred, true, ignore_global_orient=ignore, joints=joints)
        values[f"mpjre_rad_x100{suffix}"] = mpjre(
            pred, true, ignore_global_orient=ignore, unit="rad_x100", joints=joints
        )
    return PoseMetrics(**values)


def reduction(model: float, baseline: float) -> float:
    """How far ``model``'s figure is below ``baseline``'s, as a fraction of it (0.4: 40 %
    lower); NaN without a positive baseline."""
    return 1.0 - model / baseline if baseline > 0 else math.nan


def accuracy_interval(correct, clusters=None, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (z = 1.96: 95 %) of the accuracy of `correct` (one bool per
    trial), counting clusters rather than trials: `clusters` gives each trial a hashable key
    (default: each trial its own). The trials of one cluster mostly share their outcome (the
    five subjects of one paraphrase), so n of them are closer to one trial than to n: the
    interval takes Kish's effective count (Σm)² / Σm² over the cluster sizes m, which is the
    number of clusters when they are of one size and favours none when they are not. Unlike
    p ± z·√(p(1−p)/n) it stays within [0, 1] and is not empty at 0 or 100 %."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 1 or not correct.size:
        raise ValueError("correct: expected a non-empty sequence of outcomes")
    keys = range(correct.size) if clusters is None else list(clusters)
    if len(keys) != correct.size:
        raise ValueError(f"clusters: expected {correct.size} keys, one per trial, got {len(keys)}")
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z: expected a positive number, got {z!r}")
    sizes = np.array(list(Counter(keys).values()), dtype=np.float64)
    p, n = float(correct.mean()), float(sizes.sum() ** 2 / (sizes**2).sum())
    spread = z * z / n
    centre = (p + spread / 2) / (1 + spread)
    half = z * math.sqrt(p * (1 - p) / n + spread / (4 * n)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)
