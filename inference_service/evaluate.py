"""`python -m inference_service.evaluate`: a report on any checkpoint for a corpus split, or
for the examples of any data the trainer reads.

    python -m inference_service.evaluate --checkpoint DIR --data corpus CORPUS.npz
        [--pairs DIR] [--split test] [--out report.json] [--markdown report.md]
        [--batch-size 32] [--limit N] [--threads N] [--device auto] [--load-in-4bit|--load-in-8bit]
        [--caption-oracle N]
    python -m inference_service.evaluate --checkpoint DIR --data FORMAT PATH [KEY=VALUE ...]
        [--fit FORMAT PATH [KEY=VALUE ...]] [--out ...] [--limit N] ...

The second (`evaluate_examples`): every pose of the examples' answers, read with the answers
given, against the mean pose (and, for captions, TF-IDF retrieval) of `--fit`, by example kind.
For a corpus split, the report's sections (docs/evaluation.md explains each and the bars):

- ``text_to_pose``: every record of the split (its caption, asked with the service's own prompt
  through `ChatPoseModel.predict_poses`, the fast path, in batches) against its pose: MPJPE,
  PA-MPJPE and MPJRE, with and without the global orientation (`metrics.evaluate_poses`), for the
  model and two baselines fitted on the corpus's *train* split: the mean pose
  (`baselines.mean_pose`) and TF-IDF nearest-caption retrieval (`baselines.TfidfRetrieval`),
  and an oracle that knows each caption's action label (`baselines.action_mean_poses`);
  overall and by caption kind (a held-out phrasing of a named action, or an automatic caption).
  With ``--caption-oracle N``, also the ceiling of a perfect reader: the action oracle on the
  action phrasings, and on the automatic captions `baselines.CaptionOracle` fitted on N sample
  poses (`corpus.sample_auto_poses`; about 0.6 ms a pose).
- ``paraphrases``: every named action asked with its phrasings of the split (never seen in
  training: `Action.phrasings(split)`) and every subject ("the person", "a woman", ...); the
  prediction is classified as the nearest action (`baselines.ActionClassifier`); top-1 accuracy
  against chance, the baselines, and an oracle (a fresh random variation of the right action,
  classified the same way: the ceiling the confusable actions leave).
- ``left_right``: text: for every action with a side ("raise the left arm" / "... right ..."),
  the same prompts as above; correct when the prediction's joint rotations are closer (mean
  geodesic angle, without the global orientation) to the action's canonical pose than to its
  mirror action's. Images (with
  ``--pairs``): every pair whose pose comes from a sided action, the same test.
- ``images`` (with ``--pairs``, a directory `training/render_pairs.py` wrote): image -> pose
  against the targets (camera-relative global orientation), model vs the mean pose.
- ``bars``: the quality bars, each with its value, threshold and pass/fail.

Exit status: 0 written (whatever the bars say), 2 bad arguments or files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from inference_service.commands import (
    DEVICE_HELP,
    EXIT_INTERRUPTED,
    device_argument,
    positive_int,
    stops_as_interrupts,
    user_path,
)
from inference_service.errors import ModelOutOfMemoryError
from inference_service.evaluation_report import (
    METRIC_LABELS,
    METRIC_NAMES,
    figure_format,
    report_markdown,
)
from inference_service.metrics import accuracy_interval, evaluate_poses, reduction
from inference_service.training.actions import ACTIONS, SUBJECTS
from inference_service.training.baselines import (
    ActionClassifier,
    CaptionOracle,
    TfidfRetrieval,
    action_mean_poses,
    mean_pose,
    rotation_distance,
)
from inference_service.training.datasets import (
    FORMAT_OPTIONS,
    KINDS,
    DataSpec,
    Example,
    load_data,
    parse_data_spec,
)
from shared_protocol.arrays import open_npz

# Quality bars (docs/evaluation.md).
REDUCTION_BAR = 0.40  # at least 40 % below the mean pose
PARAPHRASE_BAR = 0.75  # top-1 accuracy of held-out phrasings
LEFT_RIGHT_BAR = 0.90  # share of sided prompts/images closer to the right side
CAPTION_ORACLE_SEED = 2024  # its sample poses: any fixed seed other than the corpus's


def swap_side(name: str) -> str | None:
    """The mirror action's name ("raise_left_arm" -> "raise_right_arm"), None if no side."""
    if "left" in name:
        other = name.replace("left", "right")
    elif "right" in name:
        other = name.replace("right", "left")
    else:
        return None
    return other if other in ACTIONS else None


def sided_actions() -> list[str]:
    return [name for name, action in ACTIONS.items() if action.side in ("left", "right")]


def action_prompts(split: str, names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(action name, prompt) for every action of `names` (default all), every phrasing of
    `split` and every subject; imperative phrasings (no subject) once."""
    return [(name, text) for name, text, _ in _phrased_prompts(split, names)]


def _phrased_prompts(split: str, names: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """`action_prompts` with the phrasing (template) each prompt comes from. The prompts of one
    phrasing mostly share their answer, so an accuracy's interval counts phrasings
    (`accuracy_interval`); the accuracy itself is over prompts, a phrasing with a subject
    asked once per subject, and the paraphrases also report it per phrasing."""
    prompts = []
    for name in names if names is not None else ACTIONS:
        for template in ACTIONS[name].phrasings(split):
            seen = set()
            for subject, their in SUBJECTS:
                text = template.format(subject=subject, their=their)
                text = text[0].upper() + text[1:] + "."
                if text not in seen:
                    seen.add(text)
                    prompts.append((name, text, template))
    return prompts


def _metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    if not len(true):
        return {name: math.nan for name in METRIC_NAMES}
    means = evaluate_poses(pred, true).means()
    return {name: means[name] for name in METRIC_NAMES}


def _per_cluster_mean(correct: np.ndarray, clusters: Sequence) -> float:
    """The mean over clusters (phrasings) of each one's accuracy: every phrasing counts once,
    however many subjects it was asked with."""
    by_cluster: dict = {}
    for right, cluster in zip(correct.tolist(), clusters, strict=True):
        by_cluster.setdefault(cluster, []).append(right)
    return float(np.mean([np.mean(v) for v in by_cluster.values()])) if by_cluster else math.nan


class ModelPredictor:
    """The checkpoint through `ChatPoseModel.predict_poses` (the service's fast path)."""

    def __init__(
        self, checkpoint: str | Path, device: str = "auto", batch_size: int = 32, **quantization
    ):
        from inference_service.modeling_chatpose import ChatPoseModel

        # quantization: load_in_4bit / load_in_8bit, as chatpose-serve takes them
        self.model = ChatPoseModel.from_checkpoint(checkpoint, device=device, **quantization)
        self.batch_size = batch_size
        # What ran, for the report: "auto" was CUDA or the CPU, in some precision.
        self.device = f"{self.model.device} ({str(self.model.dtype).removeprefix('torch.')})"

    def _run(self, requests) -> np.ndarray:
        out = self._in_batches(requests, self.model.predict_poses)
        return np.stack(out) if out else np.zeros((0, 24, 3))

    def _in_batches(self, items: Sequence, run: Callable[[Sequence], list]) -> list:
        """``run`` over ``items`` in batches of ``batch_size``, halved for good when one runs
        out of GPU memory (image batches need far more than text ones): a long evaluation is
        not lost to its one largest batch."""
        out: list = []
        start = 0
        while start < len(items):
            try:
                out.extend(run(items[start : start + self.batch_size]))
            except ModelOutOfMemoryError:
                if self.batch_size == 1:
                    raise ModelOutOfMemoryError(
                        "out of GPU memory with one request at a time: --load-in-8bit or "
                        "--load-in-4bit need less, or use a card with more memory"
                    ) from None
                self.batch_size //= 2
                _log(f"out of GPU memory: batches of {self.batch_size} from now on")
                continue
            start += self.batch_size
        return out

    def text(self, texts: Sequence[str]) -> np.ndarray:
        from inference_service.modeling_chatpose import PosePrompt

        return self._run([PosePrompt(text=t) for t in texts])

    def images(self, images: Sequence[bytes]) -> np.ndarray:
        from inference_service.modeling_chatpose import PosePrompt

        return self._run([PosePrompt(images=(data,)) for data in images])

    def examples(self, examples: Sequence[Example]) -> list[np.ndarray]:
        """Each example's poses, (len(example.poses), 24, 3), read with its answers given: the
        whole exchange (history, images, answers) encoded as training encodes it, each pose
        from the state before its pose token. For a text or image asked in the service's own
        words that is what the fast path answers."""
        from inference_service.training.encoding import Encoder

        model = self.model
        encoder = Encoder(model.processor, model.config, model.pose_token_id, model.context_length)

        def run(chunk: Sequence[Example]) -> list[np.ndarray]:
            batch = encoder.collate([encoder.encode(example) for example in chunk])
            poses = np.stack(
                model.given_answer_poses(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.pixel_values,
                    batch.pose_rows,
                    batch.pose_positions,
                )
            )
            ends = np.cumsum([len(example.poses) for example in chunk])
            return np.split(poses, ends[:-1])

        return self._in_batches(examples, run)


def read_image_pairs(pairs: str | Path, limit: int | None = None):
    """(image bytes, true poses (N, 24, 3), action names or "", the render size or None, the
    corpus splits the poses come from, where said) of the first ``limit`` pairs of a
    render_pairs output directory (or its pairs.npz), checked as training reads pairs
    (`datasets.read_image_pose_pairs`: a DatasetError names the file, the frame and the
    field)."""
    from inference_service.training.datasets import (
        DatasetError,
        image_bytes,
        read_image_pose_pairs,
    )

    path = Path(pairs) if Path(pairs).suffix == ".npz" else Path(pairs) / "pairs.npz"
    hmr = []
    with contextlib.suppress(OSError, ValueError), open_npz(path) as archive:  # else read below
        hmr = [key for key in ("center", "scale", "imgname") if key in archive.files]
    if hmr:  # boxes to crop to and a camera-frame root: scored here as renders, wrongly
        raise DatasetError(
            f"{path}: HMR-style data ({', '.join(map(repr, hmr))}), not render_pairs' renders "
            "of the mannequin, which are scored whole and upright"
        )
    examples = read_image_pose_pairs(path, camera_frame=False, crop="none", limit=limit)
    rows = [int(example.source.rpartition("#")[2]) for example in examples]
    arrays = {}  # the optional arrays render_pairs adds (the file loads: read above)
    with open_npz(path) as archive:
        for key in {"actions", "size", "split"}.intersection(archive.files):
            try:
                arrays[key] = archive[key]
            except ValueError as exc:  # an object array, which would need a pickle
                raise DatasetError(f"{path}: {key!r} cannot be read: {exc}") from None
    actions = arrays.get("actions")
    if actions is None:
        actions = np.full(max(rows, default=-1) + 1, "")
    if actions.ndim != 1 or actions.dtype.kind != "U" or len(actions) <= max(rows, default=-1):
        raise DatasetError(f"{path}: 'actions' must be one string per frame, got {actions.shape}")
    size = arrays.get("size")
    if size is not None and (size.shape != () or size.dtype.kind not in "iu"):
        raise DatasetError(f"{path}: 'size' must be one integer, got shape {size.shape}")
    split = arrays.get("split")
    if split is not None and (
        split.ndim != 1 or split.dtype.kind != "U" or len(split) <= max(rows, default=-1)
    ):
        raise DatasetError(f"{path}: 'split' must be one string per frame, got {split.shape}")
    images = [image_bytes(example.images[0]) for example in examples]
    poses = (
        np.stack([example.poses[0] for example in examples]) if examples else np.zeros((0, 24, 3))
    )
    return (
        images,
        poses,
        [str(actions[row]) for row in rows],
        None if size is None else int(size),
        sorted({str(split[row]) for row in rows} - {""}) if split is not None else [],
    )


def evaluate(
    checkpoint: str | Path,
    corpus: str | Path,
    *,
    split: str = "test",
    pairs: str | Path | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    device: str = "auto",
    quantization: dict | None = None,
    predictor=None,
    caption_oracle_samples: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The report (a JSON-ready dict; sections in the module docstring)."""
    from inference_service.training.corpus import load_corpus

    log = log or (lambda message: None)
    started = time.perf_counter()
    try:
        records = load_corpus(corpus)
    except FileNotFoundError:
        raise ValueError(f"{corpus}: file not found") from None
    train = [r for r in records if r.split == "train"]
    chosen = [r for r in records if split == "all" or r.split == split]
    if limit is not None:
        chosen = chosen[:limit]
    if not train:
        raise ValueError(f"{corpus}: no train records to fit the baselines on")
    if not chosen:
        held = Counter(r.split for r in records)
        holds = ", ".join(f"{name} {count}" for name, count in sorted(held.items()))
        raise ValueError(
            f"{corpus}: no records in split {split!r} (--split, default test); it holds {holds}"
        )
    image_pairs = None if pairs is None else read_image_pairs(pairs, limit)  # before the model
    warnings = []  # what makes the figures mean less than their headings say
    if split in ("train", "all"):
        warnings.append(
            f"the {split} split holds the records the baselines are fitted on (and the demo "
            "model trained on): TF-IDF finds each caption itself, so its bars mean nothing here"
        )
    other_splits = [] if pairs is None or split == "all" else sorted(set(image_pairs[4]) - {split})
    if other_splits:
        warnings.append(
            f"the image pairs hold poses of the {' and '.join(other_splits)} split, not only of "
            f"the {split} one"
        )
    for warning in warnings:
        log(f"warning: {warning}")
    predictor = predictor or ModelPredictor(checkpoint, device, batch_size, **(quantization or {}))
    train_poses = np.stack([r.pose for r in train])
    average = mean_pose(train_poses)
    tfidf = TfidfRetrieval([r.caption for r in train], train_poses)
    report: dict = {
        "checkpoint": str(checkpoint),
        "device": getattr(predictor, "device", device),
        "corpus": str(corpus),
        "split": split,
        "pairs": str(pairs) if pairs is not None else None,
        "train_records": len(train),
        "warnings": warnings,
    }

    report["text_to_pose"] = _text_to_pose(
        predictor, train, train_poses, average, tfidf, chosen, caption_oracle_samples, log
    )
    phrase_split = split if split in ("train", "val", "test") else "test"
    phrased = _answer_phrasings(predictor, tfidf, phrase_split, log)
    report["paraphrases"] = _paraphrases(phrased, average, phrase_split)
    canonical = {name: ACTIONS[name](None) for name in ACTIONS}
    sided = sided_actions()
    left_right = {"text": _left_right_text(phrased, sided, canonical)}
    if image_pairs is not None:
        report["images"], left_right_images = _images(
            predictor, image_pairs, average, sided, canonical, log
        )
        if left_right_images is not None:
            left_right["images"] = left_right_images
    report["left_right"] = left_right
    report["bars"] = quality_bars(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _text_to_pose(
    predictor, train, train_poses, average, tfidf, chosen, caption_oracle_samples: int, log
) -> dict:
    """The report's ``text_to_pose``: the model against the baselines on the split's
    captions, all of them and by kind (an action's phrasing, a caption of the pose's
    geometry)."""
    from inference_service.training.corpus import sample_auto_poses

    log(f"text to pose: {len(chosen)} captions")
    captions = [r.caption for r in chosen]
    true = np.stack([r.pose for r in chosen])
    predictions = {
        "model": predictor.text(captions),
        "mean_pose": np.broadcast_to(average, true.shape),
        "tfidf": tfidf.predict(captions),
        "action_oracle": action_mean_poses(
            [r.action for r in train], train_poses, [r.action for r in chosen]
        ),
    }
    kinds = np.array(["auto" if r.source == "auto" else "action" for r in chosen])
    if caption_oracle_samples:
        log(f"caption oracle: the facts of {caption_oracle_samples} sample poses")
        oracle = CaptionOracle(sample_auto_poses(CAPTION_ORACLE_SEED, caption_oracle_samples))
        ceiling = predictions["action_oracle"].copy()
        ceiling[kinds == "auto"] = oracle.predict(true[kinds == "auto"])
        predictions["caption_oracle"] = ceiling
    by_kind = {}
    for kind, mask in (
        ("all", np.ones(len(chosen), bool)),
        ("action", kinds == "action"),
        ("auto", kinds == "auto"),
    ):
        by_kind[kind] = {
            "count": int(mask.sum()),
            **{name: _metrics(pred[mask], true[mask]) for name, pred in predictions.items()},
        }
    overall = by_kind["all"]
    return {
        "count": len(chosen),
        "by_caption": by_kind,
        "reduction_vs_mean_pose": {
            m: reduction(overall["model"][m], overall["mean_pose"][m]) for m in METRIC_NAMES
        },
    }


@dataclasses.dataclass(frozen=True)
class _PhrasingAnswers:
    """Every named action asked with the split's phrasings, and what each answerer gave."""

    names: list[str]  # the action each prompt asks for
    texts: list[str]  # the prompts
    templates: list  # (action, phrasing template) of each prompt: its cluster
    model: np.ndarray  # (n, 24, 3) poses
    tfidf: np.ndarray
    oracle: np.ndarray  # a pose of the asked action itself


def _answer_phrasings(predictor, tfidf, phrase_split: str, log) -> _PhrasingAnswers:
    phrased = _phrased_prompts(phrase_split)
    log(f"paraphrases: {len(phrased)} prompts")
    names = [name for name, _, _ in phrased]
    texts = [text for _, text, _ in phrased]
    rng = np.random.default_rng(12345)
    return _PhrasingAnswers(
        names=names,
        texts=texts,
        templates=[(name, template) for name, _, template in phrased],
        model=predictor.text(texts),
        tfidf=tfidf.predict(texts),
        oracle=np.stack([ACTIONS[name](rng) for name in names]),
    )


def _paraphrases(phrased: _PhrasingAnswers, average, phrase_split: str) -> dict:
    """The report's ``paraphrases``: the action each answer shows, by the classifier."""
    names, texts = phrased.names, phrased.texts
    classifier = ActionClassifier()
    labels = {
        "model": classifier.classify(phrased.model),
        "tfidf": classifier.classify(phrased.tfidf),
        "mean_pose": classifier.classify(average[None])[0:1] * len(names),
        "oracle": classifier.classify(phrased.oracle),
    }
    correct = {
        key: np.array([a == b for a, b in zip(got, names, strict=True)])
        for key, got in labels.items()
    }
    per_action = {
        name: float(np.mean([c for c, n in zip(correct["model"], names, strict=True) if n == name]))
        for name in ACTIONS
    }
    confusions: dict[str, int] = {}
    for got, want in zip(labels["model"], names, strict=True):
        if got != want:
            key = f"{want} -> {got}"
            confusions[key] = confusions.get(key, 0) + 1
    return {
        "split": phrase_split,
        "count": len(texts),
        "actions": len(ACTIONS),
        "chance": 1.0 / len(ACTIONS),
        "top1": {key: float(value.mean()) for key, value in correct.items()},
        "top1_per_phrasing": _per_cluster_mean(correct["model"], phrased.templates),
        "interval": accuracy_interval(correct["model"], phrased.templates),
        "per_action": per_action,
        "confusions": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:15]),
        "examples": [
            {"prompt": t, "action": n, "predicted": p}
            for t, n, p in list(zip(texts, names, labels["model"], strict=True))[
                :: max(1, len(texts) // 12)
            ]
        ],
    }


def _left_right_text(phrased: _PhrasingAnswers, sided, canonical) -> dict:
    """The report's ``left_right.text``: the answers to the phrasings of sided actions."""
    index = [i for i, name in enumerate(phrased.names) if name in sided]
    return _left_right(
        [phrased.names[i] for i in index],
        {
            "model": phrased.model[index],
            "tfidf": phrased.tfidf[index],
            "oracle": phrased.oracle[index],
        },
        canonical,
        clusters=[phrased.templates[i] for i in index],
    )


def _images(predictor, image_pairs, average, sided, canonical, log) -> tuple[dict, dict | None]:
    """The report's ``images``, and its ``left_right.images`` (None without sided actions)."""
    images, image_true, actions, image_size, _ = image_pairs
    count = len(images)
    log(f"images: {count} pairs")
    image_pred = predictor.images(images)
    image_mean = np.broadcast_to(average, image_true.shape)
    model_metrics = _metrics(image_pred, image_true)
    mean_metrics = _metrics(image_mean, image_true)
    section = {
        "count": count,
        "image_size": image_size,
        "model": model_metrics,
        "mean_pose": mean_metrics,
        "reduction_vs_mean_pose": {
            m: reduction(model_metrics[m], mean_metrics[m]) for m in METRIC_NAMES
        },
    }
    picked = [i for i, a in enumerate(actions) if a in sided]
    if not picked:
        return section, None
    left_right = _left_right(
        [actions[i] for i in picked],
        {"model": image_pred[picked], "oracle": image_true[picked]},
        canonical,
    )
    return section, left_right


def evaluate_examples(
    checkpoint: str | Path,
    examples: Sequence[Example],
    *,
    data: str,
    fit: Sequence[Example] = (),
    fit_data: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    quantization: dict | None = None,
    predictor=None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The report on examples of any dataset (`--data posescript|pairs|llava ...`): every pose
    their answers hold (`ModelPredictor.examples`) against the mean pose of `fit`, the data
    the model was trained on (without it, the poses' own mean, said in `warnings`), and on
    text-to-pose examples against TF-IDF retrieval over fit's text-to-pose questions (each
    example's last question retrieving one pose for every pose of its answers); by example
    kind and overall."""
    log = log or (lambda message: None)
    started = time.perf_counter()
    posed = [example for example in examples if example.poses]
    if not posed:
        raise ValueError(f"--data {data}: no example's answer holds a pose to score")
    fitted = [example for example in fit if example.poses]
    if fit and not fitted:
        raise ValueError(f"--fit {fit_data}: no example's answer holds a pose")
    warnings = []
    if not fitted:
        warnings.append(
            "no --fit data: the mean pose is the scored poses' own mean, a baseline that has "
            "seen them, and there is no TF-IDF baseline"
        )
    for warning in warnings:
        log(f"warning: {warning}")
    true = np.concatenate([np.stack(example.poses) for example in posed])
    kinds = np.array([example.kind for example in posed for _ in example.poses])
    fit_poses = np.concatenate([np.stack(example.poses) for example in fitted or posed])
    predictor = predictor or ModelPredictor(checkpoint, device, batch_size, **(quantization or {}))
    log(f"{len(true)} poses in {len(posed)} examples")
    predictions = {
        "model": np.concatenate(predictor.examples(posed)),
        "mean_pose": np.broadcast_to(mean_pose(fit_poses), true.shape),
    }
    # TF-IDF: the last question of each text example retrieves one pose for all its poses.
    texts = [e for e in posed if e.kind == "text_to_pose"]
    fit_texts = [e for e in fitted if e.kind == "text_to_pose"]
    tfidf = None
    if texts and fit_texts:
        retrieval = TfidfRetrieval([e.question for e in fit_texts], [e.pose for e in fit_texts])
        retrieved = retrieval.predict([e.question for e in texts])
        tfidf = np.repeat(retrieved, [len(e.poses) for e in texts], axis=0)
    by_kind = {}
    for kind in ("all", *KINDS):
        mask = np.ones(len(true), bool) if kind == "all" else kinds == kind
        if not mask.any():
            continue
        by_kind[kind] = {
            "count": int(mask.sum()),
            **{name: _metrics(pred[mask], true[mask]) for name, pred in predictions.items()},
        }
    if tfidf is not None:
        by_kind["text_to_pose"]["tfidf"] = _metrics(tfidf, true[kinds == "text_to_pose"])
    overall = by_kind["all"]
    report: dict = {
        "checkpoint": str(checkpoint),
        "device": getattr(predictor, "device", device),
        "data": data,
        "fit": fit_data,
        "examples": len(posed),
        "without_pose": len(examples) - len(posed),
        "warnings": warnings,
        "poses": {
            "count": len(true),
            "by_kind": by_kind,
            "reduction_vs_mean_pose": {
                m: reduction(overall["model"][m], overall["mean_pose"][m]) for m in METRIC_NAMES
            },
        },
    }
    report["bars"] = [
        {
            "bar": f"poses: {METRIC_LABELS[metric]} reduction vs mean pose",
            "value": value,
            "threshold": REDUCTION_BAR,
            "pass": bool(value >= REDUCTION_BAR),
        }
        for metric in ("pa_mpjpe_mm", "mpjre_deg")
        for value in [report["poses"]["reduction_vs_mean_pose"][metric]]
    ]
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _left_right(
    names: Sequence[str], predictions: dict[str, np.ndarray], canonical, clusters=None
) -> dict:
    """Share of predictions closer to their action's canonical pose than to the mirror
    action's, by the body's joint rotations (`rotation_distance`: a head turned left and one
    turned right put every joint in the same place); per predictor, and for the first
    ("model") per pair and its interval (`clusters`: the prompts' phrasings, as for the
    paraphrases; each render its own)."""
    own = np.stack([canonical[n] for n in names])
    mirror = np.stack([canonical[swap_side(n)] for n in names])
    result: dict = {"count": len(names)}
    for key, poses in predictions.items():
        closer = rotation_distance(poses, own) < rotation_distance(poses, mirror)
        result[key] = float(closer.mean())
        if key == "model":
            result["interval"] = accuracy_interval(closer, clusters)
            pairs: dict[str, list[bool]] = {}
            for name, ok in zip(names, closer, strict=True):
                stem = name if "left" in name else swap_side(name)
                pairs.setdefault(stem.replace("left", "left/right"), []).append(bool(ok))
            result["per_pair"] = {k: float(np.mean(v)) for k, v in sorted(pairs.items())}
    return result


def quality_bars(report: dict) -> list[dict]:
    bars = []

    def bar(name: str, value: float, threshold: float, higher: bool = True, interval=None) -> None:
        ok = bool(value >= threshold) if higher else bool(value < threshold)
        item = {"bar": name, "value": value, "threshold": threshold, "pass": ok}
        if interval is not None:  # an accuracy: its 95 % interval
            item["interval"] = list(interval)
        bars.append(item)

    text = report["text_to_pose"]
    overall = text["by_caption"]["all"]
    for metric in ("pa_mpjpe_mm", "mpjre_deg"):
        bar(
            f"text: {METRIC_LABELS[metric]} reduction vs mean pose",
            text["reduction_vs_mean_pose"][metric],
            REDUCTION_BAR,
        )
        if "caption_oracle" in overall:  # how far these captions let any model go
            bars[-1]["ceiling"] = reduction(
                overall["caption_oracle"][metric], overall["mean_pose"][metric]
            )
        bar(
            f"text: {METRIC_LABELS[metric]} below TF-IDF retrieval "
            f"({overall['tfidf'][metric]:.1f})",
            overall["model"][metric],
            overall["tfidf"][metric],
            higher=False,
        )
    paraphrases = report["paraphrases"]
    bar(
        "paraphrases: top-1 action accuracy",
        paraphrases["top1"]["model"],
        PARAPHRASE_BAR,
        interval=paraphrases["interval"],
    )
    if "images" in report:
        bar(
            "images: PA-MPJPE reduction vs mean pose",
            report["images"]["reduction_vs_mean_pose"]["pa_mpjpe_mm"],
            REDUCTION_BAR,
        )
    for key in ("text", "images"):
        if key in report["left_right"]:
            block = report["left_right"][key]
            bar(f"left/right: {key}", block["model"], LEFT_RIGHT_BAR, interval=block["interval"])
    return bars


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inference_service.evaluate",
        description="Evaluate a ChatPose checkpoint on a synthetic-corpus split (and rendered "
        "image pairs): metrics against the mean-pose and TF-IDF baselines, paraphrases, left "
        "and right; or on the examples of any training data format: the poses of their "
        "answers against the mean pose (and TF-IDF) of --fit data.",
    )
    parser.add_argument("--checkpoint", type=user_path, required=True)
    parser.add_argument(
        "--data",
        nargs="+",
        action="append",
        metavar="WORD",
        required=True,
        help="FORMAT PATH [KEY=VALUE ...]: corpus CORPUS.npz, the synthetic corpus "
        "(baselines fit on its train split); or any format `python -m inference_service.train "
        "--data` reads (posescript, pairs, llava), with its options: posescript CAPTIONS.json "
        "poses=POSES.npz ids=TEST_IDS.json, "
        "say (asked in the service's own words unless phrasing= says otherwise); given "
        "again, the examples of each (not with corpus)",
    )
    parser.add_argument(
        "--fit",
        nargs="+",
        action="append",
        metavar="WORD",
        help="FORMAT PATH [KEY=VALUE ...], with --data other than corpus: the data the model "
        "trained on, to fit the mean pose and TF-IDF baselines on (else the mean of the scored "
        "poses themselves); given again, on all of them; corpus CORPUS.npz split=train too",
    )
    parser.add_argument(
        "--pairs", type=user_path, help="a render_pairs output directory (images), or its pairs.npz"
    )
    parser.add_argument(
        "--split", choices=("train", "val", "test", "all"), help="the corpus's (default test)"
    )
    parser.add_argument("--out", type=user_path, default=Path("report.json"))
    parser.add_argument("--markdown", type=user_path, help="also write the tables (default OUT.md)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument(
        "--limit",
        type=positive_int,
        help="at most this many records, pairs or examples (the paraphrase and left/right "
        "prompts are asked in full)",
    )
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    parser.add_argument("--device", default="auto", type=device_argument, help=DEVICE_HELP)
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-4bit", action="store_true", help="needs bitsandbytes")
    quantize.add_argument("--load-in-8bit", action="store_true", help="needs bitsandbytes")
    parser.add_argument(
        "--caption-oracle",
        type=positive_int,
        metavar="N",
        help="also the ceiling of reading the captions perfectly, from N sample poses "
        "(200000: about 3 minutes)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from inference_service.checkpoint import work_offline

    work_offline()  # before transformers is imported: no request to the Hub, ever
    specs, fit = _data_specs(parser, args)
    markdown = args.markdown or args.out.with_suffix(".md")
    # os.path.isdir: a name too long for the disk is no folder (Path's raises), and is said below.
    if args.out.suffix != ".json" or os.path.isdir(args.out):
        parser.error(f"--out: name a .json file for the report, got {args.out}")
    if markdown == args.out or markdown.suffix != ".md" or os.path.isdir(markdown):
        parser.error(f"--markdown: name a .md file other than --out, got {markdown}")
    checkpoint = args.checkpoint.resolve()
    for option, path in (("--out", args.out), ("--markdown", markdown)):
        if checkpoint in path.resolve().parents:  # its chatpose.json, say
            parser.error(f"{option}: {path} is inside the checkpoint; write the report elsewhere")
    from inference_service.files import unwritable, write_text_atomically

    for option, path in (("--out", args.out), ("--markdown", markdown)):
        # Now: a report that cannot be written once evaluated would lose hours of work.
        if problem := unwritable(path.parent, [path]):
            print(f"error: {option} {path}: {problem}", file=sys.stderr)
            return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from inference_service.errors import ChatPoseError

    try:
        with stops_as_interrupts():  # a closed terminal, `kill`: said as Ctrl-C is
            report = _evaluated(args, specs, fit)
    except KeyboardInterrupt:
        print("interrupted; no report was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, ValueError, ChatPoseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report_json = json.dumps(jsonable(report), indent=2) + "\n"
    written = []
    try:
        # Each whole or not at all: a full disk never cuts an earlier report short.
        for path, text in (
            (args.out, report_json),
            (markdown, report_markdown(report)),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, text)
            written.append(path)
    except OSError as exc:
        kept = f"{written[0]} was written" if written else _rescued(report_json)
        print(f"error: cannot write the report ({exc}); {kept}; its bars follow", file=sys.stderr)
    for item in report["bars"]:
        status, show = "pass" if item["pass"] else "FAIL", figure_format(item)
        ceiling = f", ceiling {show(item['ceiling'])}" if "ceiling" in item else ""
        print(
            f"{status}  {item['bar']}: {show(item['value'])} (bar {show(item['threshold'])}"
            f"{ceiling})",
            file=sys.stderr,
        )
    if len(written) < 2:
        return 2
    print(f"wrote {args.out} and {markdown} ({report['seconds']} s)", file=sys.stderr)
    return 0


def _data_specs(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[DataSpec], list[DataSpec]]:
    """--data and --fit, each given once or more, checked with the options that go with their
    formats."""
    try:
        specs = [parse_data_spec(words) for words in args.data]
        fit = [parse_data_spec(words) for words in args.fit or ()]
    except ValueError as exc:
        parser.error(str(exc))
    data = specs[0]
    if any(spec.format == "corpus" for spec in specs):
        if len(specs) > 1:
            parser.error("--data corpus CORPUS.npz is scored alone: give it without other --data")
        if data.options:  # the corpus's own options are the ones below
            parser.error("--data corpus CORPUS.npz takes no KEY=VALUE: --split picks the split")
        if fit:
            parser.error("--fit goes with other --data than corpus: a corpus fits on its train")
        args.split = args.split or "test"
        return specs, []
    for option, given in (
        ("--pairs", args.pairs),
        ("--caption-oracle", args.caption_oracle),
        ("--split", args.split),
    ):
        if given:
            parser.error(
                f"{option} goes with --data corpus; --data {data.format} picks its examples "
                "with its own options (posescript: ids=SPLIT_IDS.json)"
            )
    return specs, fit


def _read_examples(
    specs: Sequence[DataSpec], wording: str, limit: int | None = None
) -> list[Example]:
    """The specs' examples, the first `limit` of them, asked in the service's own words
    (`wording`, the checkpoint's) unless a spec's phrasing= says otherwise."""
    examples: list[Example] = []
    for spec in specs:
        if "phrasing" in FORMAT_OPTIONS[spec.format]:
            spec = dataclasses.replace(spec, options={"phrasing": "release", **spec.options})
        left = None if limit is None else limit - len(examples)
        if left == 0:
            break
        examples += load_data(spec, wording=wording, limit=left)
    return examples


def _described(specs: Sequence[DataSpec]) -> str:
    """What a report says it measured: the specs with absolute paths."""
    return " + ".join(spec.absolute().describe() for spec in specs)


def _evaluated(args: argparse.Namespace, specs: list[DataSpec], fit: list[DataSpec]) -> dict:
    """`evaluate` or `evaluate_examples` as the command asked for it, the report saying what
    it measured: absolute paths, the limit, device and quantization, and when."""
    quantization = {"load_in_4bit": args.load_in_4bit, "load_in_8bit": args.load_in_8bit}
    data = specs[0]
    if data.format == "corpus":
        report = evaluate(
            args.checkpoint,
            data.path,
            split=args.split,
            pairs=args.pairs,
            batch_size=args.batch_size,
            limit=args.limit,
            device=args.device,
            quantization=quantization,
            caption_oracle_samples=args.caption_oracle or 0,
            log=_log,
        )
    else:
        from inference_service.checkpoint import Checkpoint

        config = Checkpoint.open(args.checkpoint).config
        examples = _read_examples(specs, config.prompt_wording, args.limit)
        for example in examples:  # before the model loads: minutes for a large one
            if len(example.images) > config.max_images:
                raise ValueError(
                    f"{example.source}: {len(example.images)} images; the checkpoint's "
                    f"chatpose.json allows max_images={config.max_images}"
                )
        report = evaluate_examples(
            args.checkpoint,
            examples,
            data=_described(specs),
            fit=_read_examples(fit, config.prompt_wording),
            fit_data=_described(fit) if fit else None,
            batch_size=args.batch_size,
            device=args.device,
            quantization=quantization,
            log=_log,
        )
    for key in ("checkpoint", "corpus", "pairs"):
        if report.get(key) is not None:
            report[key] = str(Path(report[key]).expanduser().resolve())
    report["limit"] = args.limit
    report["quantization"] = next((k for k, on in quantization.items() if on), None)
    report["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rescued(report_json: str) -> str:
    """Where the JSON report went when --out could not take it, said as a clause."""
    rescue = None
    try:  # a new file of a name no one could foresee: a shared folder's link is not followed
        descriptor, rescue = tempfile.mkstemp(prefix="chatpose-report-", suffix=".json")
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(report_json)
    except OSError as exc:  # a full disk there too, or no temporary folder at all
        if rescue is not None:
            with contextlib.suppress(OSError):
                os.unlink(rescue)  # not a part of the report left behind
        return f"nor could a file in the temporary folder ({exc.strerror or exc})"
    return f"the JSON report is in {rescue} instead"


def jsonable(value):
    """`value` with NaN and infinity as None (null): what has no value (a caption kind the
    split lacks), which json.dumps would write as NaN, which is no JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
