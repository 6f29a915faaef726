"""The synthetic corpus: deterministic given a seed, held-out phrasings and poses per split,
and a validated dataset file that AMASS-layout readers can open."""

from __future__ import annotations

import time

import numpy as np
import pytest

from inference_service.evaluate import action_prompts
from inference_service.training import actions as A
from inference_service.training import corpus as C
from shared_protocol.pose import Motion

N = 400


@pytest.fixture(scope="module")
def records():
    return C.generate_corpus(7, N)


def renderings(action: A.Action, split: str) -> set[str]:
    out = set()
    for template in action.phrasings(split):
        for subject, their in A.SUBJECTS:
            text = template.format(subject=subject, their=their)
            out.add(text[0].upper() + text[1:] + ".")
    return out


def test_same_seed_same_corpus_and_prefix_stability(records):
    again = C.generate_corpus(7, N)
    assert again == records
    assert C.generate_corpus(7, 50) == records[:50]
    other = C.generate_corpus(8, 50)
    assert other != records[:50]


def test_record_mix_and_splits(records):
    summary = C.corpus_summary(records)
    assert set(summary["splits"]) == {"train", "val", "test"}
    assert 0.7 < summary["splits"]["train"] / N < 0.9
    assert summary["sources"]["action"] > 0.3 * N and summary["sources"]["auto"] > 0.3 * N
    assert len([a for a in summary["actions"] if a != "(random pose)"]) > 40
    for r in records:
        assert r.pose.shape == (24, 3) and np.all(np.isfinite(r.pose))
        assert r.caption and r.caption.endswith(".")
        if r.source == "auto":
            assert r.action is None or r.action in A.ACTIONS
        else:
            assert r.source == f"action:{r.action}"


def test_phrasings_are_held_out_per_split(records):
    for r in records:
        if r.source.startswith("action:"):
            action = A.get_action(r.action)
            assert r.caption in renderings(action, r.split), (r.split, r.caption)
            if r.split != "train":
                assert r.caption not in renderings(action, "train")


def test_poses_are_not_shared_between_splits(records):
    by_split = {s: {r.pose.tobytes() for r in records if r.split == s} for s in A.SPLITS}
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]


def test_synonyms_vary_the_training_phrasings_alone(records):
    varied = C.generate_corpus(7, N, synonym_rate=1.0)
    changed = 0
    for plain, new in zip(records, varied, strict=True):
        np.testing.assert_array_equal(new.pose, plain.pose)
        assert (new.source, new.action, new.split) == (plain.source, plain.action, plain.split)
        if plain.split == "train" and plain.source.startswith("action:"):
            changed += new.caption != plain.caption
        else:
            assert new.caption == plain.caption  # held-out phrasings and automatic captions
    assert changed > 0.9 * sum(r.split == "train" and r.source != "auto" for r in records)
    assert C.generate_corpus(7, N, synonym_rate=0.0) == records


def test_no_training_caption_is_a_held_out_phrasing_word_for_word():
    # The crossing actions' train phrasings can be swapped into their test ones ("cross the
    # left arm" -> "move the left arm"), the chair pose's into its val one ("utkatasana").
    crossing = ["cross_left_arm", "cross_right_arm", "cross_both_arms", "chair_pose"]
    varied = C.generate_corpus(3, 600, actions=crossing, action_fraction=1.0, synonym_rate=1.0)
    train = [r.caption.casefold() for r in varied if r.split == "train"]
    assert len(train) > 400
    # What the evaluation asks as never seen (its own list, not the filter's).
    asked = {text.casefold() for split in ("val", "test") for _, text in action_prompts(split)}
    assert "move the left arm across the body towards the right side." in asked
    assert not set(train) & asked


def test_options_and_validation():
    only = C.generate_corpus(1, 30, action_fraction=1.0, describe_actions=0.0, actions=["clap"])
    assert all(r.source == "action:clap" and r.action == "clap" for r in only)
    auto = C.generate_corpus(1, 20, action_fraction=0.0)
    assert all(r.source == "auto" and r.action is None for r in auto)
    held = C.generate_corpus(1, 30, val_fraction=0.0, test_fraction=1.0)
    assert {r.split for r in held} == {"test"}
    for kwargs, name in (
        ({"seed": -1, "n": 3}, "seed"),
        ({"seed": 1, "n": -3}, "n"),
        ({"seed": 1, "n": 3, "action_fraction": 1.5}, "action_fraction"),
        ({"seed": 1, "n": 3, "val_fraction": 0.6, "test_fraction": 0.6}, "val_fraction"),
        ({"seed": 1, "n": 3, "actions": ["moonwalk"]}, "actions"),
        ({"seed": 1, "n": 3, "variation": float("nan")}, "variation"),
        ({"seed": 1, "n": 3, "synonym_rate": 2}, "synonym_rate"),
    ):
        with pytest.raises(ValueError, match=name):
            C.generate_corpus(**kwargs)


def test_auto_poses_mix_random_and_action_poses_as_the_automatic_captions_do():
    # With no variation an action pose is its canonical pose, or a mirrored one (a stride).
    canonical = np.stack(
        [action(np.random.default_rng(k), 0.0) for action in A.ACTIONS.values() for k in range(8)]
    )

    def action_poses(poses):
        return sum(np.abs(canonical - pose).max(axis=(1, 2)).min() < 1e-12 for pose in poses)

    np.testing.assert_array_equal(C.sample_auto_poses(3, 50), C.sample_auto_poses(3, 50))
    assert not np.array_equal(C.sample_auto_poses(3, 50), C.sample_auto_poses(4, 50))
    only = C.sample_auto_poses(3, 40, action_fraction=1.0, describe_actions=1.0, variation=0.0)
    assert action_poses(only) == 40
    # The corpus's defaults caption 0.5 x 0.2 of the records from actions automatically, and all
    # of its random ones: a sixth of the automatic captions are of action poses.
    mixed = C.sample_auto_poses(3, 600, variation=0.0)
    assert 60 < action_poses(mixed) < 140
    with pytest.raises(ValueError, match="no record is captioned automatically"):
        C.sample_auto_poses(3, 10, action_fraction=1.0, describe_actions=0.0)
    with pytest.raises(ValueError, match="describe_actions"):
        C.sample_auto_poses(3, 10, describe_actions=-0.1)


def test_save_and_load_round_trip(records, tmp_path, monkeypatch):
    path = tmp_path / "corpus.npz"
    C.save_corpus(records, path, seed=7)
    assert C.load_corpus(path) == records
    # The file is also an AMASS-layout motion in the SMPL body frame: its poses read back with
    # shared_protocol.
    motion = Motion.load_npz(path, z_up=False)
    np.testing.assert_array_equal(motion.axis_angle, np.stack([r.pose for r in records]))
    empty = tmp_path / "empty.npz"
    C.save_corpus([], empty)
    assert C.load_corpus(empty) == []
    # The same records make the same bytes, whenever written: a rebuild's corpus file is the
    # same file.
    again = tmp_path / "again.npz"
    later = time.time() + 86_400 * 400
    monkeypatch.setattr(time, "time", lambda: later)  # a day over a year later
    C.save_corpus(records, again, seed=7)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {"captions": None}, r"captions: missing"),
        (lambda a: {"format": np.array("other-v9")}, r"format: expected"),
        (lambda a: {"poses": a["poses"][:, :70]}, r"poses: expected a \(N, 72\)"),
        (lambda a: {"splits": a["splits"][:3]}, r"splits: expected 5 strings"),
        (
            lambda a: {"poses": np.where(np.arange(5)[:, None] == 2, np.nan, a["poses"])},
            r"record 2: poses: contains NaN",
        ),
        (
            lambda a: {"splits": np.array(["train", "val", "test", "holdout", "train"])},
            r"record 3: split: expected one of",
        ),
        (
            lambda a: {"captions": np.array(["a", "b", " ", "d", "e"])},
            r"record 2: caption: expected a non-empty string",
        ),
        (
            lambda a: {
                "sources": np.array(["auto", "auto", "auto", "auto", "action:jump"]),
                "actions": np.array(["", "", "", "", "clap"]),
            },
            r"record 4: source: 'action:jump' does not match action 'clap'",
        ),
        (
            lambda a: {
                "actions": np.array(["", "moonwalk", "", "", ""]),
                "sources": np.array(["auto"] * 5),
            },
            r"record 1: action: unknown action 'moonwalk'",
        ),
    ],
)
def test_load_validation_names_file_record_and_field(tmp_path, change, message):
    path = tmp_path / "bad.npz"
    C.save_corpus(C.generate_corpus(3, 5), path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    for key, value in change(arrays).items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        C.load_corpus(path)
    assert str(info.value).startswith(str(path))


def test_load_rejects_unreadable_files(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz"):
        C.load_corpus(path)
    with pytest.raises(FileNotFoundError):
        C.load_corpus(tmp_path / "missing.npz")
    (tmp_path / "captions.json").write_text('{"0": "a man"}', encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"captions\.json: not an \.npz file \(an \.npz is a zip archive\)"
    ):
        C.load_corpus(tmp_path / "captions.json")
    np.savez(tmp_path / "poses.npz", poses=np.zeros((2, 72)))  # poses, not a corpus
    with pytest.raises(ValueError, match=r"poses\.npz: not a ChatPose corpus file"):
        C.load_corpus(tmp_path / "poses.npz")
