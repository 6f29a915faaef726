"""The evaluation command and its baselines: TF-IDF retrieval, the mean pose, nearest action,
and a report with every section on a tiny checkpoint."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference_service import evaluate as ev
from inference_service import files
from inference_service.checkpoint import Checkpoint, CheckpointError
from inference_service.errors import ModelOutOfMemoryError
from inference_service.evaluation_report import METRIC_NAMES, markdown_summary
from inference_service.metrics import mpjpe
from inference_service.training.actions import ACTIONS
from inference_service.training.baselines import (
    ActionClassifier,
    CaptionOracle,
    TfidfRetrieval,
    action_mean_poses,
    fact_key,
    mean_pose,
    project_to_rotation,
    rotation_distance,
)
from inference_service.training.corpus import generate_corpus, load_corpus, save_corpus
from inference_service.training.datasets import (
    examples_from_caption_pose_pairs,
    image_bytes,
    read_image_pose_pairs,
)
from inference_service.training.scaffold import scaffold_checkpoint
from shared_protocol.rotations import axis_angle_to_matrix


def test_tfidf_returns_the_pose_of_an_exact_training_caption():
    rng = np.random.default_rng(0)
    captions = [
        "The person raises the left arm above the head.",
        "The person raises the right arm above the head.",
        "Someone kneels on one knee.",
        "A woman sits with crossed legs.",
    ]
    poses = rng.normal(size=(4, 24, 3)) * 0.3
    retrieval = TfidfRetrieval(captions, poses)
    for k, caption in enumerate(captions):
        np.testing.assert_array_equal(retrieval.predict([caption])[0], poses[k])
    # Words decide: "left" is rarer than "person" so it picks the left-arm caption.
    assert retrieval.nearest(["lift your LEFT arm"])[0].tolist() == [0]
    assert retrieval.nearest(["kneeling on one knee"])[0].tolist() == [2]
    # "the arm above the head" is as near to both raises: their mean, not the first of them.
    assert retrieval.nearest(["the arm above the head"])[0].tolist() == [0, 1]
    np.testing.assert_allclose(
        retrieval.predict(["the arm above the head"])[0], mean_pose(poses[:2]), atol=1e-12
    )


def test_mean_pose_of_rotations_about_one_axis_is_the_mean_angle():
    poses = np.zeros((2, 24, 3))
    poses[0, 5] = [0, 0, 0.2]
    poses[1, 5] = [0, 0, 1.0]
    poses[0, 0] = [0.5, 0, 0]
    poses[1, 0] = [-0.5, 0, 0]
    mean = mean_pose(poses)
    np.testing.assert_allclose(mean[5], [0, 0, 0.6], atol=1e-12)
    np.testing.assert_allclose(mean[0], 0, atol=1e-12)
    np.testing.assert_allclose(mean[1:5], 0, atol=1e-12)
    # Near ±π an axis-angle average would be wrong; the matrix mean is not.
    flip = np.zeros((2, 24, 3))
    flip[0, 0] = [0, np.pi - 0.1, 0]
    flip[1, 0] = [0, -(np.pi - 0.1), 0]
    assert np.linalg.norm(mean_pose(flip)[0]) == pytest.approx(np.pi, abs=1e-9)


def test_the_action_oracle_gives_each_actions_mean_pose():
    poses = np.zeros((4, 24, 3))
    poses[0, 18] = [0, 0, 0.4]  # "bend": elbow at 0.4 and 0.8 rad
    poses[1, 18] = [0, 0, 0.8]
    poses[3, 18] = [0, 0, -1.2]  # an automatic caption's pose
    actions = ["bend", "bend", "stand", None]
    predicted = action_mean_poses(actions, poses, ["bend", "stand", None, "unseen"])
    np.testing.assert_allclose(predicted[0, 18], [0, 0, 0.6], atol=1e-12)
    np.testing.assert_allclose(predicted[1], 0, atol=1e-12)
    for row in (2, 3):  # no label, or one never seen in training: the overall mean
        np.testing.assert_allclose(predicted[row], mean_pose(poses), atol=1e-12)


def test_the_caption_oracle_answers_the_mean_pose_of_the_same_caption_facts():
    def varied(name, joint, angles):  # small turns of one joint leave the facts as they are
        poses = np.repeat(ACTIONS[name](None)[None], len(angles), axis=0)
        poses[:, joint, 1] += angles
        return poses

    squats = varied("squat", 15, [0.0, 0.1, 0.2])  # the head
    t_poses = varied("t_pose", 20, [0.0, -0.2])  # the left wrist
    assert len({fact_key(p) for p in squats}) == len({fact_key(p) for p in t_poses}) == 1
    assert fact_key(squats[0]) != fact_key(t_poses[0])
    pool = np.concatenate([squats, t_poses])
    oracle = CaptionOracle(pool, min_group=1)
    answers = oracle.predict([ACTIONS["squat"](None), t_poses[1]])
    np.testing.assert_allclose(answers[0], mean_pose(squats), atol=1e-9)
    np.testing.assert_allclose(answers[1], mean_pose(t_poses), atol=1e-9)
    # Fewer than min_group poses share the facts: the nearest facts join in, here all of them.
    wide = CaptionOracle(pool, min_group=4).predict(t_poses[:1])
    np.testing.assert_allclose(wide[0], mean_pose(pool), atol=1e-9)
    with pytest.raises(ValueError, match="min_group"):
        CaptionOracle(pool, min_group=0)


def test_projection_gives_a_rotation():
    m = np.random.default_rng(1).normal(size=(5, 3, 3))
    r = project_to_rotation(m)
    np.testing.assert_allclose(
        r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(r), 1.0)
    rot = axis_angle_to_matrix(np.array([0.3, -0.2, 0.9]))
    np.testing.assert_allclose(project_to_rotation(rot), rot, atol=1e-12)


def test_nearest_action_of_canonical_poses_and_mirror_names():
    names = ["raise_left_arm", "raise_right_arm", "squat", "t_pose"]
    classifier = ActionClassifier(names, samples=2)
    poses = np.stack([ACTIONS[n](None) for n in names])
    assert classifier.classify(poses) == names
    assert ev.swap_side("raise_left_arm") == "raise_right_arm"
    assert ev.swap_side("lunge_right") == "lunge_left"
    assert ev.swap_side("squat") is None
    assert all(ev.swap_side(n) is not None for n in ev.sided_actions())


def test_left_and_right_are_told_apart_by_rotations_where_positions_cannot():
    left, right = ACTIONS["turn_head_left"](None), ACTIONS["turn_head_right"](None)
    assert mpjpe(left, right, ignore_global_orient=True) < 2.0  # mm: the head is a leaf
    assert rotation_distance(left[None], right[None])[0] > 2.0  # degrees, over 23 joints
    np.testing.assert_allclose(rotation_distance(left[None], left[None]), 0.0, atol=1e-9)
    twin = ev._left_right(
        ["turn_head_left", "turn_head_right"],
        {"model": np.stack([left, right])},
        {name: ACTIONS[name](None) for name in ("turn_head_left", "turn_head_right")},
    )
    assert twin["model"] == 1.0 and twin["interval"][1] == 1.0


def test_paraphrase_prompts_are_never_training_phrasings():
    train = {t for a in ACTIONS.values() for t in a.phrasings("train")}
    assert not {t for a in ACTIONS.values() for t in a.phrasings("test")} & train
    prompts = ev.action_prompts("test")
    assert {name for name, _ in prompts} == set(ACTIONS)
    asked_in_training = {text for _, text in ev.action_prompts("train")}
    assert not {text for _, text in prompts} & asked_in_training  # the prompts themselves
    assert len(prompts) == len(set(prompts))


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    records = generate_corpus(7, 160)
    save_corpus(records, root / "corpus.npz", 7)
    checkpoint = scaffold_checkpoint(root / "ckpt", "tiny", [r.caption for r in records])
    pairs = root / "pairs"
    (pairs / "images").mkdir(parents=True)
    actions = ["raise_left_arm", "raise_right_arm", "squat", ""]
    poses = np.stack([ACTIONS[a](None) if a else np.zeros((24, 3)) for a in actions])
    names = []
    for k in range(len(actions)):
        (pairs / "images" / f"{k}.png").write_bytes(_png(40 * k))
        names.append(f"images/{k}.png")
    np.savez(
        pairs / "pairs.npz",
        poses=poses.reshape(-1, 72),
        images=np.array(names),
        actions=np.array(actions),
    )
    return root, checkpoint, pairs


def test_the_command_writes_a_report_with_every_section(tiny, capsys):
    root, checkpoint, pairs = tiny
    out = root / "report.json"
    code = ev.main(
        ["--checkpoint", str(checkpoint), "--data", "corpus", str(root / "corpus.npz"),
         "--pairs", str(pairs), "--split", "test", "--out", str(out), "--limit", "12"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text(), parse_constant=_no_nan)  # strict JSON: null, not NaN
    for section in ("text_to_pose", "paraphrases", "left_right", "images", "bars"):
        assert section in report
    assert report["warnings"] == []
    assert 0.0 <= report["paraphrases"]["top1_per_phrasing"] <= 1.0
    text = report["text_to_pose"]["by_caption"]["all"]
    assert set(text) == {"count", "model", "mean_pose", "tfidf", "action_oracle"}
    assert set(text["model"]) == set(METRIC_NAMES)
    assert report["paraphrases"]["top1"]["oracle"] > 0.8
    assert report["left_right"]["text"]["oracle"] == 1.0
    assert report["left_right"]["images"]["count"] == 2
    assert report["images"]["count"] == 4
    assert {b["bar"].split(":")[0] for b in report["bars"]} >= {"text", "images", "left/right"}
    for item in report["bars"]:  # accuracies come with their 95 % interval, around the value
        if item["bar"].startswith(("paraphrases", "left/right")):
            low, high = item["interval"]
            assert 0 <= low <= item["value"] <= high <= 1 and low < high
        else:
            assert "interval" not in item
    # What was measured, so that a report read later says it.
    assert report["checkpoint"] == str(checkpoint.resolve()) and report["limit"] == 12
    assert report["device"] == "cpu (float32)"  # what "auto" ran on, not "auto"
    assert report["date"].endswith("+00:00")
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith(f"Checkpoint `{checkpoint.resolve()}` on the test split of ")
    assert ", its first 12 records and the image pairs " in markdown.splitlines()[0]
    for heading in ("Text to pose", "Paraphrases", "Mannequin images", "Left and right",
                    "Quality bars", "95 % interval"):  # fmt: skip
        assert heading in markdown
    err = capsys.readouterr().err
    assert "FAIL" in err  # an untrained model fails the bars
    # Each in the report's units, as the Markdown gives them: percent, and millimetres.
    assert re.search(
        r"text: PA-MPJPE \(mm\) reduction vs mean pose: -?[\d.]+ % \(bar 40.0 %\)", err
    )
    assert re.search(r"paraphrases: top-1 action accuracy: [\d.]+ % \(bar 75.0 %\)", err)
    assert re.search(r"below TF-IDF retrieval \([\d.]+\): [\d.]+ \(bar [\d.]+\)\n", err)


def _no_nan(constant: str):
    raise ValueError(f"{constant} is no JSON")


def test_figures_that_mean_less_than_their_headings_come_with_a_warning(tiny, tmp_path, capsys):
    root, checkpoint, pairs = tiny
    trained_on = tmp_path / "pairs"
    trained_on.mkdir()
    (trained_on / "images").symlink_to(pairs / "images")
    with np.load(pairs / "pairs.npz") as data:
        np.savez(trained_on / "pairs.npz", **data, split=np.array(["train", "test"] * 2))
    out = tmp_path / "report.json"
    code = ev.main(
        ["--checkpoint", str(checkpoint), "--data", "corpus", str(root / "corpus.npz"),
         "--pairs", str(trained_on), "--split", "train", "--out", str(out), "--limit", "4"]
    )  # fmt: skip
    assert code == 0
    warnings = json.loads(out.read_text())["warnings"]
    assert "TF-IDF finds each caption itself" in warnings[0]
    assert "warning: the train split holds" in capsys.readouterr().err
    code = ev.main(
        ["--checkpoint", str(checkpoint), "--data", "corpus", str(root / "corpus.npz"),
         "--pairs", str(trained_on), "--split", "test", "--out", str(out), "--limit", "4"]
    )  # fmt: skip
    assert json.loads(out.read_text())["warnings"] == [
        "the image pairs hold poses of the train split, not only of the test one"
    ]
    assert "**Warning:** the image pairs hold poses" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no images", "no 'images' (or 'imgname') array"),
        ("empty file", "not an .npz file (an .npz is a zip archive)"),
        ("not an image", "frame 1"),
        ("NaN pose", "NaN"),
        ("actions short", "'actions' must be one string per frame"),
        ("actions as objects", "'actions' cannot be read: Object arrays cannot be loaded"),
        ("AMASS-wide poses", None),  # (N, 156), as training reads them: no damage
        # SPIN's layout: scored uncropped, its camera-frame root taken as upright, no word.
        ("HMR boxes", "HMR-style data ('center', 'scale'), not render_pairs' renders"),
    ],
)
def test_damaged_pairs_are_named_before_the_model_loads(tiny, tmp_path, capsys, damage, message):
    root, checkpoint, pairs = tiny
    broken = tmp_path / "pairs"
    broken.mkdir()
    (broken / "images").symlink_to(pairs / "images")
    with np.load(pairs / "pairs.npz") as data:
        arrays = dict(data)
    if damage == "no images":
        del arrays["images"]
    elif damage == "not an image":
        (broken / "text.png").write_text("not a picture")
        arrays["images"] = arrays["images"].copy()
        arrays["images"][1] = "text.png"
    elif damage == "NaN pose":
        arrays["poses"] = arrays["poses"].copy()
        arrays["poses"][2, 5] = np.nan
    elif damage == "actions short":
        arrays["actions"] = arrays["actions"][:2]
    elif damage == "actions as objects":
        arrays["actions"] = arrays["actions"].astype(object)
    elif damage == "HMR boxes":
        arrays["center"] = np.full((len(arrays["poses"]), 2), 24.0)
        arrays["scale"] = np.full(len(arrays["poses"]), 0.2)
    elif damage == "AMASS-wide poses":
        wide = np.zeros((len(arrays["poses"]), 156))
        wide[:, :72] = arrays["poses"].reshape(len(wide), 72)
        arrays["poses"] = wide
    if damage == "empty file":
        (broken / "pairs.npz").write_bytes(b"")
    else:
        np.savez(broken / "pairs.npz", **arrays)
    argv = ["--checkpoint", str(tmp_path / "no model"), "--data", "corpus",
            str(root / "corpus.npz"), "--pairs", str(broken),
            "--out", str(tmp_path / "r.json")]  # fmt: skip
    if message is None:
        assert len(ev.read_image_pairs(broken)[1]) == len(arrays["poses"])
        return
    assert ev.main(argv) == 2  # the checkpoint is never opened: the pairs fail first
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err and "pairs.npz" in err
    if damage == "not an image":  # a pair past --limit is not read
        assert len(ev.read_image_pairs(broken, limit=1)[0]) == 1


def test_a_corpus_that_is_not_there_is_named_as_training_names_it(tiny, tmp_path, capsys):
    _, checkpoint, _ = tiny
    missing = tmp_path / "corpus.npz"
    assert ev.main(["--checkpoint", str(checkpoint), "--data", "corpus", str(missing)]) == 2
    assert f"error: {missing}: file not found\n" in capsys.readouterr().err


def test_a_split_the_corpus_lacks_names_the_flag_and_what_it_holds(tiny, tmp_path, capsys):
    from inference_service.training.corpus import generate_corpus, save_corpus

    _, checkpoint, _ = tiny
    corpus = tmp_path / "train_only.npz"
    save_corpus(generate_corpus(0, 12, val_fraction=0, test_fraction=0), corpus)
    assert ev.main(["--checkpoint", str(checkpoint), "--data", "corpus", str(corpus)]) == 2
    err = capsys.readouterr().err  # the split came from a default the user never typed
    assert "no records in split 'test' (--split, default test); it holds train 12" in err


def test_the_caption_oracle_joins_the_report_on_request(tiny, capsys):
    root, checkpoint, _ = tiny
    out = root / "oracle.json"
    argv = ["--checkpoint", str(checkpoint), "--data", "corpus", str(root / "corpus.npz"),
            "--out", str(out), "--caption-oracle", "40"]  # fmt: skip
    assert ev.main(argv) == 0
    by_caption = json.loads(out.read_text())["text_to_pose"]["by_caption"]
    assert by_caption["action"]["count"] and by_caption["auto"]["count"]
    # On the action phrasings it is the action oracle; the automatic captions it reads itself.
    assert by_caption["action"]["caption_oracle"] == by_caption["action"]["action_oracle"]
    assert by_caption["auto"]["caption_oracle"] != by_caption["auto"]["action_oracle"]
    markdown = out.with_suffix(".md").read_text()
    assert "The caption oracle reads every caption perfectly" in markdown
    report = json.loads(out.read_text())
    ceilings = {b["bar"]: b["ceiling"] for b in report["bars"] if "ceiling" in b}
    assert len(ceilings) == 2 and all(name.startswith("text:") for name in ceilings)
    overall = by_caption["all"]
    assert ceilings["text: MPJRE (°) reduction vs mean pose"] == pytest.approx(
        1 - overall["caption_oracle"]["mpjre_deg"] / overall["mean_pose"]["mpjre_deg"]
    )
    out_of_reach = [name for name, ceiling in ceilings.items() if ceiling < ev.REDUCTION_BAR]
    assert ("out of reach of any model" in markdown) == bool(out_of_reach)
    assert all(name in markdown for name in out_of_reach)
    assert capsys.readouterr().err.count(", ceiling ") == 2


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        (["mocap", "x.npz"], [], "unknown data format 'mocap'"),
        (["posescript", "c.json"], [], "needs poses=POSES.npz"),
        (["corpus", "corpus.npz", "split=val"], [], "takes no KEY=VALUE: --split picks"),
        (["corpus", "corpus.npz"], ["--fit", "llava", "c.json"], "--fit goes with other --data"),
        (["posescript", "c.json", "poses=p.npz"], ["--split", "val"], "--split goes with --data "
         "corpus; --data posescript picks its examples with its own options"),
        (["llava", "c.json"], ["--pairs", "pairs"], "--pairs goes with --data corpus"),
        (["corpus", "corpus.npz"], ["--data", "llava", "c.json"], "is scored alone"),
    ],
)  # fmt: skip
def test_bad_data_options_are_refused(tiny, capsys, data, extra, message):
    _, checkpoint, _ = tiny
    with pytest.raises(SystemExit) as info:
        ev.main(["--checkpoint", str(checkpoint), "--data", *data, *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def _posescript(folder: Path, records) -> list[str]:
    """PoseScript-style files of corpus records: captions.json and poses.npz."""
    folder.mkdir(exist_ok=True)
    np.savez(folder / "poses.npz", poses=np.stack([r.pose for r in records]).reshape(-1, 72))
    captions = {str(k): r.caption for k, r in enumerate(records)}
    (folder / "captions.json").write_text(json.dumps(captions), encoding="utf-8")
    return ["posescript", str(folder / "captions.json"), f"poses={folder / 'poses.npz'}",
            "z_up=false"]  # fmt: skip


def test_any_training_data_is_scored_against_the_data_the_model_trained_on(tiny, tmp_path):
    root, checkpoint, _ = tiny
    records = load_corpus(root / "corpus.npz")
    test = _posescript(tmp_path / "test", [r for r in records if r.split == "test"][:6])
    train = _posescript(tmp_path / "train", [r for r in records if r.split == "train"])
    out = tmp_path / "report.json"
    code = ev.main(["--checkpoint", str(checkpoint), "--data", *test, "--fit", *train,
                    "--out", str(out), "--limit", "5"])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text(), parse_constant=_no_nan)
    assert report["warnings"] == [] and report["examples"] == 5 and report["limit"] == 5
    assert report["data"] == " ".join(test)
    poses = report["poses"]
    assert poses["count"] == 5 and set(poses["by_kind"]) == {"all", "text_to_pose"}
    text = poses["by_kind"]["text_to_pose"]
    assert set(text) == {"count", "model", "mean_pose", "tfidf"}
    fit_poses = np.stack([r.pose for r in records if r.split == "train"])
    true = np.stack([r.pose for r in records if r.split == "test"][:5])
    expected = ev._metrics(np.broadcast_to(mean_pose(fit_poses), true.shape), true)
    assert text["mean_pose"] == pytest.approx(expected)
    assert [b["bar"] for b in report["bars"]] == [
        "poses: PA-MPJPE (mm) reduction vs mean pose",
        "poses: MPJRE (°) reduction vs mean pose",
    ]
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith(f"Checkpoint `{checkpoint.resolve()}` on `posescript ")
    assert ", its first 5 examples, the baselines fitted on `posescript " in markdown
    assert "### Poses (5 in 5 examples)" in markdown and "| text_to_pose | 5 | TF-IDF" in markdown
    # --data and --fit given again: all of them (a second one replaced the first, silently); a
    # corpus's split to fit on too; the paths recorded absolute, to be found from anywhere.
    more = _posescript(tmp_path / "more", [r for r in records if r.split == "val"][:3])
    relative = [more[0], os.path.relpath(more[1]), *more[2:]]
    code = ev.main(["--checkpoint", str(checkpoint), "--data", *test, "--data", *relative,
                    "--fit", "corpus", str(root / "corpus.npz"), "split=train",
                    "--out", str(out), "--limit", "8"])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text(), parse_constant=_no_nan)
    assert report["examples"] == 8 and report["data"] == " ".join(test) + " + " + " ".join(more)
    assert report["fit"] == f"corpus {root / 'corpus.npz'} split=train"
    text = report["poses"]["by_kind"]["text_to_pose"]
    assert text["mean_pose"] != pytest.approx(expected)  # other poses scored
    true = np.stack(
        [r.pose for r in records if r.split == "test"][:6]
        + [r.pose for r in records if r.split == "val"][:2]
    )
    corpus_mean = np.broadcast_to(mean_pose(fit_poses), true.shape)
    assert text["mean_pose"] == pytest.approx(ev._metrics(corpus_mean, true))


def test_without_fit_data_the_mean_pose_is_the_scored_poses_own_and_said_so(tiny, tmp_path):
    root, checkpoint, _ = tiny
    (tmp_path / "p.png").write_bytes(_png(90))
    conversations = [
        {"id": "a", "image": "p.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the person doing?"},
            {"from": "gpt", "value": "Waving."},
            {"from": "human", "value": "Give the SMPL pose."},
            {"from": "gpt", "value": "Sure, it is <POSE>."}]},
        {"id": "b", "conversations": [
            {"from": "human", "value": "Two poses: sitting, then standing."},
            {"from": "gpt", "value": "First <POSE>, then <POSE>."}]},
        {"id": "c", "conversations": [
            {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}]},
    ]  # fmt: skip
    (tmp_path / "conv.json").write_text(json.dumps(conversations))
    poses = np.stack([ACTIONS[name](None) for name in ("wave_right_hand", "sit", "t_pose")])
    np.savez(tmp_path / "poses.npz", poses=poses.reshape(3, 72), ids=np.array(["a", "b", "b"]))
    out = tmp_path / "report.json"
    data = ["llava", str(tmp_path / "conv.json"), f"poses={tmp_path / 'poses.npz'}", "z_up=false"]
    fit = _posescript(tmp_path / "train", load_corpus(root / "corpus.npz")[:20])
    fitted = tmp_path / "fitted.json"
    argv = ["--checkpoint", str(checkpoint), "--data", *data, "--out"]
    assert ev.main([*argv, str(fitted), "--fit", *fit]) == 0  # "b": two poses, one question
    text = json.loads(fitted.read_text(), parse_constant=_no_nan)["poses"]["by_kind"]
    assert text["text_to_pose"]["count"] == 2 and "tfidf" in text["text_to_pose"]
    assert ev.main([*argv, str(out)]) == 0
    report = json.loads(out.read_text(), parse_constant=_no_nan)
    assert report["examples"] == 2 and report["without_pose"] == 1
    assert report["poses"]["count"] == 3
    assert set(report["poses"]["by_kind"]) == {"all", "image_to_pose", "text_to_pose"}
    assert "tfidf" not in report["poses"]["by_kind"]["text_to_pose"]
    assert report["warnings"] == [
        "no --fit data: the mean pose is the scored poses' own mean, a baseline that has seen "
        "them, and there is no TF-IDF baseline"
    ]
    assert report["poses"]["by_kind"]["all"]["mean_pose"] == pytest.approx(
        ev._metrics(np.broadcast_to(mean_pose(poses), poses.shape), poses)
    )


def test_examples_read_with_their_answers_given_are_what_the_service_answers(tiny):
    # For a caption or an image asked in the service's own words, the forced answer is the
    # fast path's: the same states, the same poses.
    root, checkpoint, pairs = tiny
    predictor = ev.ModelPredictor(checkpoint)
    wording = predictor.model.config.prompt_wording
    captions = [r.caption for r in load_corpus(root / "corpus.npz")[:5]]
    texts = examples_from_caption_pose_pairs(
        [(c, np.zeros((24, 3))) for c in captions], phrasing="release", wording=wording
    )
    np.testing.assert_allclose(
        np.concatenate(predictor.examples(texts)), predictor.text(captions), atol=1e-5
    )
    images = read_image_pose_pairs(
        pairs / "pairs.npz", camera_frame=False, crop="none", phrasing="release", wording=wording
    )
    np.testing.assert_allclose(
        np.concatenate(predictor.examples(images)),
        predictor.images([image_bytes(e.images[0]) for e in images]),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--limit", "-1"], "--limit: expected a whole number of at least 1, got '-1'"),
        (["--batch-size", "0"], "--batch-size: expected a whole number of at least 1"),
        (["--threads", "-1"], "--threads: expected a whole number"),
        (["--out", "rep.md"], "--out: name a .json file for the report, got rep.md"),
        (["--out", "r.json", "--markdown", "r.json"], "--markdown: name a .md file other than"),
        (["--out", "r.json", "--markdown", "corpus.npz"], "--markdown: name a .md file other"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tiny, extra, message, capsys, monkeypatch):
    root, checkpoint, _ = tiny
    monkeypatch.chdir(root)  # the relative names: nothing written where the tests run
    argv = ["--checkpoint", str(checkpoint), "--data", "corpus", str(root / "corpus.npz")]
    with pytest.raises(SystemExit) as info:
        ev.main([*argv, *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "where",
    [
        "under a file",
        "read-only",
        "markdown read-only",
        "through a broken link",
        "a link to a missing folder",
        "a link to a device",
    ],
)
def test_a_report_that_cannot_be_written_is_refused_before_any_work(
    tiny, tmp_path, monkeypatch, capsys, read_only, where
):
    """Not once hours of evaluation are done: they would be lost."""
    root, checkpoint, _ = tiny
    monkeypatch.setattr(ev, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated"))
    (tmp_path / "a file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    out, extra = tmp_path / "r.json", []
    if where == "under a file":
        out = tmp_path / "a file" / "r.json"
        option, path, problem = "--out", out, f"{tmp_path / 'a file'} is a file"
    elif where == "through a broken link":  # a drive not mounted: it evaluated, then failed
        (tmp_path / "drive").symlink_to(tmp_path / "not mounted")
        out = tmp_path / "drive" / "reports" / "r.json"
        option, path = "--out", out
        problem = f"{tmp_path / 'drive'} is a link to {tmp_path / 'not mounted'}, which does not"
    elif where == "a link to a missing folder":  # it is written through, as open would
        out = tmp_path / "r.json"
        out.symlink_to(tmp_path / "gone" / "r.json")
        option, path, problem = "--out", out, "No such file or directory"
    elif where == "a link to a device":
        out = tmp_path / "r.json"
        out.symlink_to(os.devnull)
        option, path, problem = "--out", out, "not a regular file"
    elif where == "read-only":
        out = locked / "reports" / "r.json"
        option, path, problem = "--out", out, f"cannot write in {locked}"
    else:
        extra = ["--markdown", str(locked / "r.md")]
        option, path, problem = "--markdown", locked / "r.md", f"cannot write in {locked}"
    argv = ["--checkpoint", str(checkpoint), "--data", "corpus", str(root / "corpus.npz"),
            "--out", str(out), *extra]  # fmt: skip
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {option} {path}: ")
    assert problem in err


def test_a_report_is_never_written_into_the_checkpoint_or_under_a_name_too_long(
    tiny, tmp_path, monkeypatch, capsys
):
    root, checkpoint, _ = tiny
    monkeypatch.setattr(ev, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated"))
    argv = ["--checkpoint", str(checkpoint), "--data", "corpus", str(root / "corpus.npz")]
    with pytest.raises(SystemExit) as info:  # its chatpose.json would go
        ev.main([*argv, "--out", str(checkpoint / "chatpose.json")])
    assert info.value.code == 2 and "is inside the checkpoint" in capsys.readouterr().err
    assert (checkpoint / "chatpose.json").read_text().startswith("{")
    for length in (246, 300):  # fits (its temporary file's name does not); does not fit
        long = tmp_path / ("r" * length + ".json")
        assert ev.main([*argv, "--out", str(long)]) == 2
        assert "a name too long for this disk (.rrr" in capsys.readouterr().err


def test_a_run_stopped_by_a_signal_says_so_without_a_traceback(tiny, tmp_path, monkeypatch, capsys):
    root, checkpoint, _ = tiny
    reached_outside = []

    def terminated(*args, **kwargs):  # `kill`, or the terminal closing, mid-evaluation
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs between bytecodes: the evaluation goes on until then

    monkeypatch.setattr(ev, "evaluate", terminated)
    previous = signal.signal(signal.SIGTERM, lambda n, frame: reached_outside.append(n))
    try:
        code = ev.main(["--checkpoint", str(checkpoint), "--data", "corpus",
                        str(root / "corpus.npz"), "--out", str(tmp_path / "r.json")])  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and reached_outside == []
    assert capsys.readouterr().err == "interrupted; no report was written\n"
    assert list(tmp_path.iterdir()) == []


def _full_disk_stream(descriptor, *args, **kwargs):
    stream = open(descriptor, *args, **kwargs)  # noqa: SIM115 (closed by its caller's with)
    write = stream.write

    def half_then_full(text):
        write(text[: len(text) // 2])
        stream.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    stream.write = half_then_full
    return stream


def test_a_report_cut_short_by_a_full_disk_leaves_the_earlier_one_whole(
    tiny, tmp_path, monkeypatch, capsys
):
    root, checkpoint, _ = tiny
    out = tmp_path / "r.json"
    argv = ["--checkpoint", str(checkpoint), "--data", "corpus", str(root / "corpus.npz"),
            "--out", str(out), "--limit", "4"]  # fmt: skip
    report = ev.evaluate(checkpoint, root / "corpus.npz", limit=4)
    monkeypatch.setattr(ev, "evaluate", lambda *args, **kwargs: report)
    assert ev.main(argv) == 0
    earlier = {path: path.read_text() for path in (out, out.with_suffix(".md"))}
    write_atomically = files.write_atomically

    def fills_the_disk(stream):
        stream.write(b'{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_full(path, write):
        write_atomically(path, fills_the_disk if path.parent == tmp_path else write)

    monkeypatch.setattr(files, "write_atomically", disk_full)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))
    (tmp_path / "temporary").mkdir()
    planted = tmp_path / "temporary" / f"chatpose-report-{os.getpid()}.json"
    planted.symlink_to(tmp_path / "victim.txt")  # another user's link, at a name foreseen
    assert ev.main(argv) == 2
    planted.unlink()
    assert not (tmp_path / "victim.txt").exists()
    [rescued] = (tmp_path / "temporary").glob("chatpose-report-*.json")
    err = capsys.readouterr().err
    assert "error: cannot write the report" in err
    assert f"; the JSON report is in {rescued} instead; its bars follow" in err
    assert json.loads(rescued.read_text())["bars"] == ev.jsonable(report)["bars"]
    rescued.unlink()
    # The temporary folder full too: said, and no part of a report left there.
    monkeypatch.setattr(os, "fdopen", _full_disk_stream)
    assert ev.main(argv) == 2
    assert "; nor could a file in the temporary folder (No space left on device)" in (
        capsys.readouterr().err
    )
    assert list((tmp_path / "temporary").iterdir()) == []
    (tmp_path / "temporary").rmdir()
    monkeypatch.undo()
    assert {path: path.read_text() for path in earlier} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no leftovers

    def markdown_disk_full(path, write):
        write_atomically(path, fills_the_disk if path.suffix == ".md" else write)

    monkeypatch.setattr(files, "write_atomically", markdown_disk_full)
    assert ev.main(argv) == 2  # the JSON written, the tables not: said so
    assert f"No space left on device); {out} was written; its bars" in capsys.readouterr().err
    # Asked of the train split, the phrasings are the training ones: not called held-out.
    trained_on = markdown_summary(dict(report, split="train"))
    assert "training prompts" in trained_on and "held-out" not in trained_on


def test_a_large_checkpoint_can_be_scored_as_the_service_serves_it(tiny, monkeypatch, tmp_path):
    # The service's device and 8 or 4 bits (a converted 13B release on a 24 GB card).
    root, checkpoint, _ = tiny
    loaded = []
    monkeypatch.setattr(
        ev, "ModelPredictor", lambda *args, **options: loaded.append((args, options)) or 1 / 0
    )
    argv = ["--checkpoint", str(checkpoint), "--data", "corpus", str(root / "corpus.npz")]
    with pytest.raises(ZeroDivisionError):
        ev.main([*argv, "--load-in-8bit", "--out", str(tmp_path / "r.json")])
    (_, device, _), options = loaded[0]
    assert device == "auto" and options == {"load_in_4bit": False, "load_in_8bit": True}


def test_the_pairs_file_is_taken_as_its_folder_is(tiny):
    _, _, pairs = tiny
    by_folder, by_file = ev.read_image_pairs(pairs), ev.read_image_pairs(pairs / "pairs.npz")
    assert by_folder[0] == by_file[0] and len(by_file[0]) == 4
    np.testing.assert_array_equal(by_folder[1], by_file[1])


def test_a_file_of_another_kind_given_as_the_corpus_is_named_by_its_format(tiny, tmp_path):
    _, _, pairs = tiny
    np.savez(tmp_path / "pairs.npz", format=np.array("chatpose-pairs-v1"), poses=np.zeros((1, 72)))
    with pytest.raises(ValueError, match="format: expected 'chatpose-corpus-v1', got"):
        load_corpus(tmp_path / "pairs.npz")


def test_a_training_run_s_folder_given_as_the_checkpoint_names_its_last_step(tiny, tmp_path):
    _, checkpoint, _ = tiny
    run = tmp_path / "run"
    for step in ("step-000010", "step-000020"):
        (run / step).mkdir(parents=True)
        (run / step / "chatpose.json").write_text((checkpoint / "chatpose.json").read_text())
    (run / "latest").write_text("step-000020")
    said = "a training run's folder, not a checkpoint; its checkpoints are its step folders"
    with pytest.raises(CheckpointError, match=f"{said}, the last .*run/step-000020$"):
        Checkpoint.open(run)


def test_a_batch_out_of_gpu_memory_is_asked_again_in_halves_not_the_run_lost(capsys):
    predictor = ev.ModelPredictor.__new__(ev.ModelPredictor)  # no model: `run` stands for it
    predictor.batch_size = 8
    seen = []

    def run(chunk):
        seen.append(len(chunk))
        if len(chunk) > 2:
            raise ModelOutOfMemoryError("out of GPU memory: send fewer or shorter requests")
        return [10 * item for item in chunk]

    assert predictor._in_batches(list(range(7)), run) == [10 * item for item in range(7)]
    assert seen == [7, 4, 2, 2, 2, 1] and predictor.batch_size == 2
    assert "out of GPU memory: batches of 2 from now on" in capsys.readouterr().err

    def never_fits(chunk):
        raise ModelOutOfMemoryError("out of GPU memory: send fewer or shorter requests")

    with pytest.raises(ModelOutOfMemoryError, match="with one request at a time: --load-in-8bit"):
        predictor._in_batches([1, 2, 3], never_fits)
