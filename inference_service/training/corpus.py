"""The project's own synthetic pose–language corpus: deterministic given a seed. numpy only.

Each record pairs a pose with a caption:

- ``pose``: (24, 3) SMPL axis-angle (layout ``smpl24_axis_angle``: upright, facing +Z, zero yaw;
  see ``actions.py``);
- ``caption``: the text;
- ``source``: where the *caption* comes from: ``"action:<name>"`` (a phrasing of that named
  action) or ``"auto"`` (an automatic caption from the pose's geometry, ``captions.py``);
- ``action``: where the *pose* comes from: the name of the action it was sampled from, or None
  for a random plausible pose (``joint_limits.sample_plausible_poses``). An action pose may carry
  an automatic caption (source "auto", action set);
- ``split``: "train", "val" or "test".

Held out: every record draws its own pose (no pose is shared between splits), and an action
record's phrasing comes from its split's phrasings (``Action.phrasings(split)``), so the val and
test phrasings are paraphrases never seen in training. With ``synonym_rate`` > 0 the training
phrasings are further varied with synonyms (``synonyms.py``); the held-out ones never are.

Determinism: record ``i`` is generated from its own random stream, seeded by ``(seed, i)``, so the
same seed gives identical records, and ``generate_corpus(seed, n)`` is a prefix of
``generate_corpus(seed, n + k)``.

File format (``save_corpus`` / ``load_corpus``): one ``.npz`` (no pickles) that is also an
AMASS-layout motion file in the SMPL body frame, so ``shared_protocol.pose.Motion.load_npz(path,
z_up=False)`` reads its poses:

==================  ==========  ====================================================
key                 shape       content
==================  ==========  ====================================================
``format``          ()          ``"chatpose-corpus-v1"``
``poses``           (N, 72)     axis-angle, 24 joints × 3 (SMPL's layout)
``trans``           (N, 3)      zeros (AMASS layout)
``mocap_framerate`` ()          30.0 (AMASS layout; the records are not a sequence)
``gender``          ()          ``"neutral"``
``betas``           (10,)       zeros
``captions``        (N,)        unicode
``sources``         (N,)        unicode, ``"auto"`` or ``"action:<name>"``
``actions``         (N,)        unicode, the action name or ``""``
``splits``          (N,)        unicode, ``"train"`` / ``"val"`` / ``"test"``
``seed``            ()          int64, the generating seed (-1 if unknown)
==================  ==========  ====================================================

``load_corpus`` validates everything and raises ValueError naming the file, and the record
(index) and field where one is bad.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from shared_protocol.arrays import NPZ_READ_ERRORS, open_npz, write_npz
from shared_protocol.skeleton import NUM_JOINTS

from .actions import ACTIONS, SPLITS, action_names, held_out_sentences
from .captions import caption_pose
from .joint_limits import sample_plausible_poses
from .synonyms import swap_synonyms

__all__ = [
    "FORMAT",
    "CorpusRecord",
    "corpus_summary",
    "generate_corpus",
    "load_corpus",
    "read_npz",
    "sample_auto_poses",
    "save_corpus",
]

FORMAT = "chatpose-corpus-v1"
_POSE_WIDTH = NUM_JOINTS * 3


@dataclass(frozen=True, eq=False)
class CorpusRecord:
    """One pose–caption pair. Construction validates and freezes the pose."""

    pose: np.ndarray
    caption: str
    source: str
    action: str | None
    split: str

    def __post_init__(self) -> None:
        try:
            pose = np.array(self.pose, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"pose: not an array of numbers ({exc})") from None
        if pose.shape == (_POSE_WIDTH,):
            pose = pose.reshape(NUM_JOINTS, 3)
        if pose.shape != (NUM_JOINTS, 3):
            raise ValueError(f"pose: expected shape (24, 3), got {pose.shape}")
        if not np.all(np.isfinite(pose)):
            raise ValueError("pose: contains NaN or inf")
        pose.setflags(write=False)
        object.__setattr__(self, "pose", pose)
        if not isinstance(self.caption, str) or not self.caption.strip():
            raise ValueError("caption: expected a non-empty string")
        if self.split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {self.split!r}")
        if self.action is not None and self.action not in ACTIONS:
            raise ValueError(f"action: unknown action {self.action!r}")
        if self.source == "auto":
            pass
        elif isinstance(self.source, str) and self.source.startswith("action:"):
            if self.source[len("action:") :] != self.action:
                raise ValueError(f"source: {self.source!r} does not match action {self.action!r}")
        else:
            raise ValueError(f"source: expected 'auto' or 'action:<name>', got {self.source!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CorpusRecord):
            return NotImplemented
        return np.array_equal(self.pose, other.pose) and (
            self.caption,
            self.source,
            self.action,
            self.split,
        ) == (other.caption, other.source, other.action, other.split)

    __hash__ = None  # equality is by value


def _fraction(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def generate_corpus(
    seed: int,
    n: int,
    *,
    action_fraction: float = 0.5,
    describe_actions: float = 0.2,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    variation: float = 1.0,
    max_facts: int = 6,
    actions: Sequence[str] | None = None,
    synonym_rate: float = 0.0,
) -> list[CorpusRecord]:
    """``n`` records, deterministic given ``seed`` (see the module docstring).

    action_fraction: share of records whose pose comes from a named action (the rest are random
        plausible poses with automatic captions).
    describe_actions: share of those action poses captioned automatically instead of by one of
        the action's phrasings.
    val_fraction, test_fraction: expected shares of the held-out splits (each record draws its
        split).
    variation: the actions' random variation (1 = as designed; 0 = canonical poses, which are
        then shared between splits).
    actions: restrict the named actions to these (default: all of them).
    synonym_rate: in a train-split action phrasing, the chance that each phrase of the synonym
        lexicon is swapped for one of its alternatives (``synonyms.swap_synonyms``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n!r}")
    action_fraction = _fraction(action_fraction, "action_fraction")
    describe_actions = _fraction(describe_actions, "describe_actions")
    synonym_rate = _fraction(synonym_rate, "synonym_rate")
    val_fraction = _fraction(val_fraction, "val_fraction")
    test_fraction = _fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction > 1:
        raise ValueError("val_fraction, test_fraction: their sum exceeds 1")
    if (
        isinstance(variation, bool)
        or not isinstance(variation, int | float)
        or not (math.isfinite(variation) and variation >= 0)
    ):
        raise ValueError(f"variation: expected a non-negative number, got {variation!r}")
    names = action_names() if actions is None else tuple(actions)
    unknown = [a for a in names if a not in ACTIONS]
    if unknown or not names:
        raise ValueError(f"actions: unknown or empty: {unknown or 'no actions'}")

    records = []
    for i in range(int(n)):
        rng = np.random.default_rng([int(seed), i])
        u = rng.random()
        if u < test_fraction:
            split = "test"
        elif u < test_fraction + val_fraction:
            split = "val"
        else:
            split = "train"
        if rng.random() < action_fraction:
            action, pose = _action_pose(rng, names, variation)
            if rng.random() < describe_actions:
                caption = caption_pose(pose, rng, max_facts=max_facts)
                source = "auto"
            else:
                caption = action.render(rng, split)
                if split == "train" and synonym_rate > 0:
                    swapped = swap_synonyms(caption, rng, synonym_rate)
                    # Swaps may write a held-out phrasing word for word ("cross the left arm"
                    # -> "move the left arm", a test one): that one stays unswapped.
                    if swapped.casefold() not in held_out_sentences():
                        caption = swapped
                source = f"action:{action.name}"
            records.append(CorpusRecord(pose, caption, source, action.name, split))
        else:
            pose = sample_plausible_poses(rng, 1)[0]
            caption = caption_pose(pose, rng, max_facts=max_facts)
            records.append(CorpusRecord(pose, caption, "auto", None, split))
    return records


def _action_pose(rng: np.random.Generator, names: Sequence[str], variation: float):
    action = ACTIONS[names[int(rng.integers(len(names)))]]
    return action, action(rng, variation)


def sample_auto_poses(
    seed: int,
    n: int,
    *,
    action_fraction: float = 0.5,
    describe_actions: float = 0.2,
    variation: float = 1.0,
) -> np.ndarray:
    """(n, 24, 3) poses drawn as the automatically captioned records of `generate_corpus` with
    the same settings are: random plausible poses, and action poses in the share
    action_fraction · describe_actions : (1 − action_fraction). Deterministic given ``seed``;
    no captions are made (the caption oracle, ``baselines.CaptionOracle``, reads the facts)."""
    action_fraction = _fraction(action_fraction, "action_fraction")
    describe_actions = _fraction(describe_actions, "describe_actions")
    described = action_fraction * describe_actions
    if described + (1.0 - action_fraction) == 0:
        raise ValueError("action_fraction, describe_actions: no record is captioned automatically")
    action_share = described / (described + 1.0 - action_fraction)
    rng = np.random.default_rng(seed)
    names = action_names()
    from_actions = rng.random(int(n)) < action_share
    poses = sample_plausible_poses(rng, int(n))
    for i in np.flatnonzero(from_actions):
        poses[i] = _action_pose(rng, names, variation)[1]
    return poses


def corpus_summary(records: Iterable[CorpusRecord]) -> dict[str, Counter]:
    """Counts per split, per caption source kind ("action"/"auto") and per action."""
    splits: Counter = Counter()
    sources: Counter = Counter()
    actions: Counter = Counter()
    for r in records:
        splits[r.split] += 1
        sources["auto" if r.source == "auto" else "action"] += 1
        actions[r.action or "(random pose)"] += 1
    return {"splits": splits, "sources": sources, "actions": actions}


def save_corpus(records: Sequence[CorpusRecord], path: str | os.PathLike, seed: int = -1) -> None:
    """Write records as one ``.npz`` (format in the module docstring)."""
    records = list(records)
    if not all(isinstance(r, CorpusRecord) for r in records):
        raise ValueError("records: expected CorpusRecord values")
    n = len(records)
    poses = (
        np.stack([r.pose.reshape(_POSE_WIDTH) for r in records])
        if records
        else np.zeros((0, _POSE_WIDTH))
    )
    arrays = {
        "format": np.array(FORMAT),
        "poses": poses,
        "trans": np.zeros((n, 3)),
        "mocap_framerate": np.array(30.0),
        "gender": np.array("neutral"),
        "betas": np.zeros(10),
        "captions": np.array([r.caption for r in records], dtype=str).reshape(n),
        "sources": np.array([r.source for r in records], dtype=str).reshape(n),
        "actions": np.array([r.action or "" for r in records], dtype=str).reshape(n),
        "splits": np.array([r.split for r in records], dtype=str).reshape(n),
        "seed": np.array(int(seed), dtype=np.int64),
    }
    with open(path, "wb") as stream:
        write_npz(stream, arrays)


_TEXT_KEYS = ("captions", "sources", "actions", "splits")


def load_corpus(path: str | os.PathLike) -> list[CorpusRecord]:
    """Read a corpus file, validating it; ValueError names the file, the record and the field."""
    name = os.fspath(path)
    arrays = read_npz(path)
    if "format" not in arrays:
        raise ValueError(
            f"{name}: not a ChatPose corpus file (no 'format' array; `make demo-model` writes "
            "one to build/demo/corpus.npz)"
        )
    try:
        return _records_from_arrays(arrays)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def read_npz(path: str | os.PathLike, needed: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Every array of an .npz file, without pickles (other members, a readme say, are left
    out). ValueError names the file and what is wrong with it, including a `needed` member
    that is an object array: left out, the caller would go on as if the file had none.
    FileNotFoundError goes to the caller as it is."""
    name = os.fspath(path)
    unreadable = (*NPZ_READ_ERRORS, ValueError)
    try:
        data = open_npz(path)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    except NPZ_READ_ERRORS as exc:  # a damaged archive
        raise ValueError(f"{name}: not a readable .npz file ({exc})") from None
    members = {}
    pickled = []
    try:
        with data:
            npy_names = {m.removesuffix(".npy") for m in data.zip.namelist() if m.endswith(".npy")}
            for key in data.files:
                if key not in npy_names:  # a readme, say: left out, and not read
                    continue
                try:
                    members[key] = data[key]
                except ValueError as exc:
                    if "allow_pickle" not in str(exc):
                        raise
                    # An object array (it needs pickle, which is never loaded): left out like
                    # any other member that is not an array of numbers or text.
                    pickled.append(key)
    except unreadable as exc:  # a damaged member
        raise ValueError(f"{name}: not a readable .npz file ({exc})") from None
    refused = [key for key in pickled if key in needed]
    if refused:
        raise ValueError(
            f"{name}: {refused[0]!r} is an object (pickled) array, which is never loaded; save "
            "it with a text or number dtype (dtype=str)"
        )
    # A member named .npy that is none was refused by open_npz (numpy gives its bytes back).
    return {key: value for key, value in members.items() if isinstance(value, np.ndarray)}


def _records_from_arrays(arrays: dict[str, np.ndarray]) -> list[CorpusRecord]:
    fmt = arrays.get("format")  # first: another kind of file is named as such
    if fmt is None:
        raise ValueError("format: missing")
    if fmt.dtype.kind != "U" or fmt.shape != () or str(fmt) != FORMAT:
        raise ValueError(f"format: expected {FORMAT!r}, got {fmt!r}")
    for key in ("poses", *_TEXT_KEYS):
        if key not in arrays:
            raise ValueError(f"{key}: missing")
    poses = arrays["poses"]
    if poses.ndim != 2 or poses.shape[1] != _POSE_WIDTH or poses.dtype.kind not in "iuf":
        raise ValueError(f"poses: expected a (N, 72) array of numbers, got {poses.shape}")
    n = poses.shape[0]
    for key in _TEXT_KEYS:
        value = arrays[key]
        if value.dtype.kind != "U" or value.shape != (n,):
            raise ValueError(
                f"{key}: expected {n} strings (one per pose), got {value.dtype} {value.shape}"
            )
    records = []
    for i in range(n):
        action = str(arrays["actions"][i]) or None
        try:
            if not np.all(np.isfinite(poses[i])):
                raise ValueError("poses: contains NaN or inf")
            records.append(
                CorpusRecord(
                    poses[i].reshape(NUM_JOINTS, 3),
                    str(arrays["captions"][i]),
                    str(arrays["sources"][i]),
                    action,
                    str(arrays["splits"][i]),
                )
            )
        except ValueError as exc:
            raise ValueError(f"record {i}: {exc}") from None
    return records
