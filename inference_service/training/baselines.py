"""Baselines a pose model must beat, and the nearest-action classifier. numpy only.

- `mean_pose(poses)`: the mean pose of a training set, every joint's rotation averaged properly:
  the arithmetic mean of the rotation *matrices*, projected back onto SO(3) by SVD (the chordal
  L2 mean; for rotations about one axis it is the rotation by the mean angle). Averaging
  axis-angle vectors instead would be wrong near ±π and for spread-out rotations.
  `mean_pose_6d(poses)` is the same as a pose head's 144 outputs: a head whose output bias it
  is starts at the mean pose.
- `TfidfRetrieval(captions, poses)`: nearest-neighbour caption retrieval. A query is compared
  with every training caption by the cosine of their TF-IDF vectors (lower-cased words,
  smooth idf = ln((1 + N) / (1 + df)) + 1, L2-normalised, as scikit-learn's default) and gets the
  pose of the most similar caption (ties: the mean pose of the tied ones).
- `CaptionOracle(poses)`: the ceiling of reading an automatic caption perfectly: for a pose, the
  mean pose of the sample poses whose caption facts (``captions.pose_facts``: what an
  automatic caption can say) are the same, or differ in the fewest facts.
- `ActionClassifier`: which named action (``actions.py``) a pose is: the action with the nearest
  prototype (its canonical pose and `samples` random variations, seeded) by MPJPE on the joint
  positions, pelvis-relative, global orientation included (or left out with `no_root`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from shared_protocol.rotations import (
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    matrix_to_rotation_6d,
)
from shared_protocol.skeleton import forward_kinematics

from .captions import pose_facts

_WORD = re.compile(r"[a-z0-9]+")


def project_to_rotation(matrix: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> the nearest rotation matrices (Frobenius norm), det +1."""
    u, _, vt = np.linalg.svd(matrix)
    d = np.sign(np.linalg.det(u @ vt))
    d = np.where(d == 0, 1.0, d)
    fix = np.ones((*d.shape, 3))
    fix[..., 2] = d
    return (u * fix[..., None, :]) @ vt


def mean_pose(poses) -> np.ndarray:
    """(N, 24, 3) axis-angle -> (24, 3): per joint, the chordal L2 mean rotation."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 24, 3)
    if not len(poses):
        raise ValueError("poses: empty")
    mean = axis_angle_to_matrix(poses).mean(axis=0)
    return matrix_to_axis_angle(project_to_rotation(mean))


def mean_pose_6d(poses) -> np.ndarray:
    """(N, 24, 3) axis-angle -> (144,): `mean_pose` in the pose head's 6D layout."""
    return matrix_to_rotation_6d(axis_angle_to_matrix(mean_pose(poses))).reshape(-1)


def action_mean_poses(
    actions: Sequence[str | None], poses, queries: Sequence[str | None]
) -> np.ndarray:
    """An oracle, not a predictor: for each query action (a record's label, which a model never
    sees) the mean pose of the training poses of that action; the overall mean pose for
    records without one (automatic captions of random poses) or for an action never seen. It
    shows how far knowing the action takes a predictor below the mean pose."""
    poses = np.asarray(poses, dtype=np.float64)
    overall = mean_pose(poses)
    labels = np.array([a or "" for a in actions])
    means = {a: mean_pose(poses[labels == a]) for a in set(labels) - {""}}
    return np.stack([means.get(q, overall) if q else overall for q in queries])


def fact_key(pose) -> frozenset[tuple[str, str, str]]:
    """The facts an automatic caption of `pose` draws on, as (kind, side, value)."""
    return frozenset((f.kind, f.side, f.value) for f in pose_facts(pose))


class CaptionOracle:
    """An oracle, not a predictor: how far a perfect reader of the automatic captions gets.

    It is given the *true* pose and answers E[pose | its caption facts], estimated from a large
    sample (`corpus.sample_auto_poses`): the mean pose (`mean_pose`) of the sample poses with
    the same facts, or, where fewer than ``min_group`` have them, of those whose facts differ in
    the fewest. It knows every fact of the pose, where a caption tells at most six of them
    (`captions.caption_pose`), so it is, up to the sample's noise, a ceiling for any model that
    reads those captions.
    """

    def __init__(self, poses, min_group: int = 5):
        poses = np.asarray(poses, dtype=np.float64).reshape(-1, 24, 3)
        if not len(poses):
            raise ValueError("poses: empty")
        if min_group < 1:
            raise ValueError(f"min_group: expected at least 1, got {min_group}")
        self.min_group = min_group
        groups: dict[frozenset, list[int]] = {}
        for i, pose in enumerate(poses):
            groups.setdefault(fact_key(pose), []).append(i)
        self.facts = sorted(set().union(*groups))
        self._column = {fact: i for i, fact in enumerate(self.facts)}
        self.keys = np.array([self._vector(key) for key in groups], dtype=bool)
        matrices = axis_angle_to_matrix(poses)
        self.sums = np.stack([matrices[members].sum(axis=0) for members in groups.values()])
        self.counts = np.array([len(members) for members in groups.values()])

    def _vector(self, key) -> np.ndarray:
        vector = np.zeros(len(self.facts), dtype=bool)
        for fact in key:
            column = self._column.get(fact)
            if column is not None:  # a fact no sample pose has: it sets no group apart
                vector[column] = True
        return vector

    def predict(self, poses) -> np.ndarray:
        """(N, 24, 3): for each true pose, the mean sample pose of its caption facts."""
        poses = np.asarray(poses, dtype=np.float64).reshape(-1, 24, 3)
        answers = []
        for pose in poses:
            distance = (self.keys != self._vector(fact_key(pose))).sum(axis=1)
            order = np.unique(distance)  # sorted
            within = np.cumsum([self.counts[distance == d].sum() for d in order])
            radius = order[min(np.searchsorted(within, self.min_group), len(order) - 1)]
            chosen = distance <= radius
            mean = self.sums[chosen].sum(axis=0) / self.counts[chosen].sum()
            answers.append(matrix_to_axis_angle(project_to_rotation(mean)))
        return np.stack(answers) if answers else np.zeros((0, 24, 3))


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class TfidfRetrieval:
    """Nearest training caption by TF-IDF cosine similarity; returns its pose."""

    def __init__(self, captions: Sequence[str], poses):
        self.captions = list(captions)
        self.poses = np.asarray(poses, dtype=np.float64).reshape(-1, 24, 3)
        if len(self.captions) != len(self.poses) or not self.captions:
            raise ValueError("captions, poses: need the same non-zero number")
        tokenized = [words(c) for c in self.captions]
        vocabulary = sorted({w for ws in tokenized for w in ws})
        self.index = {w: i for i, w in enumerate(vocabulary)}
        counts = self._counts(tokenized)
        df = (counts > 0).sum(axis=0)
        n = len(self.captions)
        self.idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        self.matrix = self._normalise(counts * self.idf)

    def _counts(self, tokenized: Sequence[Sequence[str]]) -> np.ndarray:
        counts = np.zeros((len(tokenized), len(self.index)), dtype=np.float32)
        for row, ws in enumerate(tokenized):
            for w in ws:
                column = self.index.get(w)
                if column is not None:
                    counts[row, column] += 1.0
        return counts

    @staticmethod
    def _normalise(vectors: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1.0, norms)

    def nearest(self, queries: Sequence[str], chunk: int = 256) -> list[np.ndarray]:
        """For each query, the indices of the training captions most similar to it: often
        more than one, as many captions share their words (then none is nearer than another)."""
        found = []
        for start in range(0, len(queries), chunk):
            part = [words(q) for q in queries[start : start + chunk]]
            similarity = self._normalise(self._counts(part) * self.idf) @ self.matrix.T
            best = similarity.max(axis=1, keepdims=True)
            found += [np.flatnonzero(row) for row in similarity >= best - 1e-6]
        return found

    def predict(self, queries: Sequence[str]) -> np.ndarray:
        """(len(queries), 24, 3): the pose of each query's nearest training caption (the mean
        pose of the nearest ones when several tie, rather than the first of them)."""
        if not queries:
            return np.zeros((0, 24, 3))
        return np.stack(
            [
                self.poses[i[0]] if len(i) == 1 else mean_pose(self.poses[i])
                for i in self.nearest(queries)
            ]
        )


def _joints(poses, no_root: bool) -> np.ndarray:
    poses = np.array(poses, dtype=np.float64).reshape(-1, 24, 3)
    if no_root:
        poses[:, 0] = 0.0
    joints = forward_kinematics(poses)[0]
    return joints - joints[:, :1]


class ActionClassifier:
    """The nearest named action of a pose (see the module docstring)."""

    def __init__(
        self,
        names: Sequence[str] | None = None,
        samples: int = 16,
        seed: int = 0,
        no_root: bool = False,
    ):
        from inference_service.training.actions import ACTIONS

        self.names = list(names) if names is not None else list(ACTIONS)
        rng = np.random.default_rng(seed)
        prototypes, owners = [], []
        for k, name in enumerate(self.names):
            action = ACTIONS[name]
            prototypes.append(action(None))
            prototypes.extend(action(rng) for _ in range(samples))
            owners.extend([k] * (samples + 1))
        self.no_root = no_root
        self.owners = np.array(owners)
        self.joints = _joints(np.stack(prototypes), no_root)

    def distances(self, poses) -> np.ndarray:
        """(N, actions): the MPJPE (mm) from each pose to each action's nearest prototype."""
        joints = _joints(poses, self.no_root)
        per_prototype = np.concatenate(
            [
                np.linalg.norm(joints[start : start + 32, None] - self.joints[None], axis=-1).mean(
                    axis=-1
                )
                for start in range(0, len(joints), 32)
            ]
        )
        out = np.full((len(joints), len(self.names)), np.inf)
        for k in range(len(self.names)):
            out[:, k] = per_prototype[:, self.owners == k].min(axis=1)
        return out * 1000.0

    def classify(self, poses) -> list[str]:
        return [self.names[k] for k in np.argmin(self.distances(poses), axis=1)]


def rotation_distance(a, b) -> np.ndarray:
    """Mean geodesic angle (degrees) over the body's own joints (1-23) between poses a (N, 24,
    3) and b (N or 1, 24, 3): tells a head turned left from one turned right, which joint
    positions cannot (the head is a leaf)."""
    from inference_service.metrics import mpjre

    a = np.asarray(a, dtype=np.float64).reshape(-1, 24, 3)
    b = np.broadcast_to(np.asarray(b, dtype=np.float64).reshape(-1, 24, 3), a.shape)
    return mpjre(a, b, joints=range(1, 24))
