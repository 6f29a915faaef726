"""Build the demo checkpoint from nothing, in one command (also `make demo-model`):

    python -m inference_service.training.build_demo [--preset demo|tiny] [--steps N]
        [--out inference_service/demo_checkpoint] [--work build/demo] [--docs docs]
        [--threads 2] [--seed 0] [--reuse-renders] [--set FIELD=VALUE] [--stop-after STAGE]

Stages (each one's wall time goes into OUT/build_info.json and docs/evaluation.md):

1. corpus: the synthetic pose–language corpus (`training/corpus.py`), seeded, its training
   phrasings varied with synonyms (`training/synonyms.py`);
2. render: image–pose pairs of the add-on's mannequin (`training/render_pairs.py`, Blender's
   Workbench in a subprocess) for poses of the train split, and for the test split's poses;
3. scaffold: a fresh model of the preset (`training/scaffold.py`) whose tokenizer is trained on
   the train split's captions;
4. words: `python -m inference_service.train --train-base embeddings` on the corpus's train
   split (text → pose, pose loss only): the base's token embeddings and the head learn what
   the caption words mean for a pose, through the bag-of-words LM (`condition_base`; with
   the preset's context layer, `--train-base context` trains its MLP too);
5. tower: the vision tower alone, trained directly on the rendered train pairs (image → pose,
   no LM, `training/tower.py`), as a CLIP is pretrained before LLaVA sees it;
6. align: `python -m inference_service.train --train-base projector` on the rendered train
   pairs: the projector and the head alone map the trained tower's image token into the LM
   (LLaVA's feature alignment), the tower frozen;
7. vision: `python -m inference_service.train --train-base vision` on the rendered train pairs
   (image → pose, pose loss only): the vision tower, the projector and the head learn to see
   the mannequin, through the LM's image heads (`condition_base`);
8. train: `python -m inference_service.train` (the project's training command, run in-process)
   from the vision stage's checkpoint, on the corpus's train split (text → pose, half the
   captions asked as a chat turn reads them) and the rendered train pairs (image → pose);
9. answer: `python -m inference_service.train --train-base lm_head`, the cross-entropy alone:
   the LM's output layer learns the answer ("sure, it is <POSE>."), half the prompts asked as a
   chat turn reads them (the caption alone), so that a chat turn ends in the pose token; no
   pose changes;
10. pack: the final checkpoint made self-contained: the LoRA and the pose token's rows merged into
   the weights (no adapter/, no training_state.pt), weights in safetensors (float16 by default;
   the service loads them as float32 on CPU), the head, the processor and tokenizer, plus
   build_info.json (the command, the settings, the timings, the bars);
11. evaluate: `inference_service.evaluate` on the packed checkpoint (test split, test pairs):
   WORK/report.json and .md;
12. docs: the tables and the timings into docs/evaluation.md (between the `results` markers)
   and a few rendered examples (prompt → picture of the predicted pose) into docs/images/.

`--preset tiny` is the same pipeline at toy sizes for the tests (seconds, not minutes).
For experiments, `--set FIELD=VALUE` changes a setting of the preset and `--stop-after STAGE`
ends the build after that stage with its model evaluated (`build`).
Everything is seeded: the same command on the same machine gives the same checkpoint (bit for
bit with the same thread count; float sums depend on it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference_service.commands import user_path
from inference_service.evaluate import jsonable
from shared_protocol.arrays import write_npz

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "inference_service" / "demo_checkpoint"
DEFAULT_WORK = ROOT / "build" / "demo"
DEFAULT_DOCS = ROOT / "docs"
MARK_START = "<!-- results:start (written by inference_service.training.build_demo) -->"
MARK_END = "<!-- results:end -->"


@dataclass(frozen=True)
class Preset:
    model_size: str  # scaffold.SIZES
    corpus_records: int
    synonym_rate: float  # generate_corpus: synonyms swapped into the training phrasings
    train_images: int  # rendered poses of the train split (at most the split's size)
    test_images: int  # rendered poses of the test split
    image_size: int  # rendered pixels (the processor resizes to the model's input)
    steps: int
    batch_size: int
    lr: float
    word_steps: int  # the words stage (0: none)
    word_batch_size: int
    tower_epochs: int  # the tower stage (0: none)
    align_steps: int  # the align stage (0: none)
    align_lr: float
    vision_steps: int  # the vision stage (0: none)
    vision_batch_size: int
    vision_lr: float
    warmup_steps: int
    lr_schedule: str  # the vision and train stages' --lr-schedule (words and align: constant)
    lora_rank: int  # the train stage's LoRA, without train_base
    lora_alpha: int
    mix: str  # text:image:chat
    save_every: int
    vocab_size: int | None = None
    train_base: str | None = None  # the train stage's --train-base (None: LoRA, the paper's)
    # The question/answer phrasing of the data (docs/training.md); the train and answer stages
    # ask their captions in "chat" phrasing instead.
    phrasing: str = "release"
    # The words stage's phrasing (None: `phrasing`). "chat" (half the captions alone) gains
    # paraphrases on the words stage alone, and the whole build loses them and left/right on
    # images (demo_model_experiments.md, 16th round).
    word_phrasing: str | None = None
    condition: bool = True  # condition_base: weight scales for a base whose layers stay frozen
    answer_steps: int = 0  # the answer stage (0: none)
    # The words stage's --action-weight (0: none). 0.003 gains paraphrases on the words stage
    # alone, and the whole build loses the image bars (demo_model_experiments.md, 15th round).
    word_action_weight: float = 0.0
    # The train stage's --action-weight (0: none). With word_action_weight 0.003 as well it
    # keeps no more than the words stage's alone (demo_model_experiments.md, 16th round).
    train_action_weight: float = 0.0
    # A context layer before the bag of words (condition_base), trained with the embeddings in
    # the words stage (`--train-base context`).
    context_layer: bool = False
    context_window: int = 4  # the context layer's head h reads the token h % window + 1 back

    def __post_init__(self) -> None:
        if self.context_window < 1:  # `--set context_window=0`: said before the build starts
            raise ValueError(f"context_window must be at least 1, got {self.context_window}")


PRESETS = {
    "demo": Preset(
        model_size="demo",
        corpus_records=12000,
        # Varied training phrasings: on a proxy of the words stage, paraphrases 18 -> 37 % on
        # the val phrasings, 26 -> 44 % on the test ones (docs/demo_model_experiments.md,
        # eighth round).
        synonym_rate=0.5,
        train_images=10000,  # every pose of the train split (9,557 of the 12,000 records)
        test_images=100000,
        image_size=128,
        steps=6000,
        batch_size=8,
        lr=1e-3,
        word_steps=12000,  # the context layer's MLP learns with the embeddings (20th round)
        word_batch_size=16,
        tower_epochs=70,
        # The projector alone first (LLaVA's feature alignment), at the rate of the words
        # stage: a random projector's first steps would otherwise send noise into the trained
        # tower (docs/demo_model_experiments.md, seventh round).
        align_steps=1000,
        align_lr=1e-3,
        # The loss still falls at 6,000 steps: images 39.7 -> 41.8 % at 9,000, left and right
        # on images 86.4 -> 87.7 % (docs/demo_model_experiments.md, 21st and 25th rounds).
        vision_steps=9000,
        vision_batch_size=32,
        vision_lr=3e-4,  # at 1e-3 a new ViT learns nothing (docs/demo_model_experiments.md)
        warmup_steps=100,
        lr_schedule="linear",
        lora_rank=64,
        lora_alpha=128,
        # Twice the text: with the longer vision stage the paraphrases fall 57.8 -> 52.6 % at
        # 1:1, and 2:1 gives them back (58.9 %) with the images (41.5 %) (25th round).
        mix="2:1:0",
        save_every=1000,
        # No LoRA: on this random base, any LoRA training (even at 2e-5) collapses the state
        # before the pose token onto one vector within a few hundred steps (it is the state
        # that must predict the pose token), and the head can then only give the mean pose
        # (docs/evaluation.md). In this stage the token embeddings (as in the words stage; LISA,
        # whose code ChatPose builds on, trains them too) and the head train on text and
        # images, through the conditioned base (condition_base) whose vision tower the tower
        # and vision stages trained; with them the context layer's MLP ("context").
        train_base="context",
        # The answer's words, for chat turns (train's --text-weight 0 leaves them untaught):
        # the cross-entropy falls from 7.5 to 0.02 in 2,000 steps (1.5 min), and all 1,189
        # test captions asked as chat turns end in a pose token (88 % when trained on the
        # service's question alone).
        answer_steps=2000,
        # A context layer before the bag of words, each head bringing the token one or two
        # places back: it reads the automatic captions ("the left elbow is bent"), text
        # PA-MPJPE 36 -> 42 % below the mean pose, past the bar, at the cost of
        # left and right on images, 86 to 89 % on two draws against the project's 90 %
        # (demo_model_experiments.md, 18th to 22nd rounds).
        context_layer=True,
        context_window=2,
    ),
    "tiny": Preset(
        model_size="tiny",
        corpus_records=240,
        synonym_rate=0.5,
        train_images=12,
        test_images=8,
        image_size=32,
        steps=2,
        batch_size=4,
        lr=1e-3,
        word_steps=2,
        word_batch_size=4,
        tower_epochs=1,
        align_steps=2,
        align_lr=1e-3,
        vision_steps=2,
        vision_batch_size=4,
        vision_lr=1e-3,
        warmup_steps=0,
        lr_schedule="linear",
        lora_rank=4,
        lora_alpha=8,
        mix="1:1:0",
        save_every=0,
        train_base="embeddings",
        answer_steps=2,
    ),
}


def with_overrides(preset: Preset, overrides: Sequence[str]) -> Preset:
    """`preset` with each "FIELD=VALUE" of `overrides` set (`--set word_steps=12000`), the
    value read as the field's type ("none" for a field that may be None)."""
    fields = {field.name: field.type for field in dataclasses.fields(Preset)}
    changes = {}
    for item in overrides:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise ValueError(
                f"--set {item!r}: expected FIELD=VALUE with a preset field, one of "
                f"{', '.join(fields)}"
            )
        kind = str(fields[name])
        if text.strip().lower() == "none" and kind.endswith("| None"):
            changes[name] = None
            continue
        convert = {"int": int, "float": float, "str": str, "bool": _boolean}[
            kind.removesuffix(" | None")
        ]
        try:
            changes[name] = convert(text.strip())
        except ValueError:
            raise ValueError(f"--set {item!r}: {name} takes a {kind}, not {text!r}") from None
    return dataclasses.replace(preset, **changes)


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


# The stages a build can stop after (`--stop-after`), in build order.
STOP_POINTS = ("corpus", "scaffold", "words", "tower", "align", "vision", "train", "answer")


# Docs examples: held-out phrasings (the test split's) of a few actions, and free prompts.
EXAMPLE_ACTIONS = (
    "raise_left_arm",
    "raise_right_arm",
    "kneel_on_right_knee",
    "squat",
    "t_pose",
    "lunge_left",
)
EXAMPLE_PROMPTS = (
    "A woman stands with her hands on her hips.",
    "The person bends forward at the hips with the arms hanging down.",
)
EXAMPLE_IMAGES = 3


def log(message: str) -> None:
    print(f"[build_demo] {message}", file=sys.stderr, flush=True)


class Stages:
    """Wall time of each stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, function, *args, **kwargs):
        log(f"stage {name} ...")
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        log(f"stage {name} done in {self.seconds[name]:.1f} s")
        return result


# --- stages ------------------------------------------------------------------------------------


def make_corpus(work: Path, records: int, seed: int, synonym_rate: float) -> Path:
    from inference_service.training.corpus import corpus_summary, generate_corpus, save_corpus

    path = work / "corpus.npz"
    corpus = generate_corpus(seed, records, synonym_rate=synonym_rate)
    save_corpus(corpus, path, seed)
    summary = corpus_summary(corpus)
    log(f"corpus: {dict(summary['splits'])}, {dict(summary['sources'])}")
    return path


RENDER_KEY = "render_key.json"


def render(work: Path, corpus: Path, split: str, count: int, seed: int, size: int) -> Path:
    """Render the split's image–pose pairs into `work`/pairs_SPLIT, with their `render_key`."""
    out = work / f"pairs_{split}"
    if out.exists():
        shutil.rmtree(out)
    command = [
        sys.executable,
        "-m",
        "inference_service.training.render_pairs",
        str(out),
        "--corpus",
        str(corpus),
        "--split",
        split,
        "--count",
        str(count),
        "--seed",
        str(seed),
        "--size",
        str(size),
    ]
    _subprocess(command)
    key = render_key(corpus, split, count, seed, size)
    (out / RENDER_KEY).write_text(json.dumps(key, indent=2) + "\n")
    return out


def renders_match(work: Path, corpus: Path, split: str, count: int, seed: int, size: int) -> bool:
    """Whether `work` holds the renders that `render` would make now (`build --reuse-renders`)."""
    out = work / f"pairs_{split}"
    if not ((out / "pairs.npz").is_file() and (out / RENDER_KEY).is_file()):
        return False
    return json.loads((out / RENDER_KEY).read_text()) == render_key(
        corpus, split, count, seed, size
    )


def render_key(corpus: Path, split: str, count: int, seed: int, size: int) -> dict:
    """What decides the renders: the records rendered (their poses, actions and indices, not
    their captions, which synonyms vary), the settings, and the renderer (Blender's version and
    the code that builds, poses and renders the mannequin: the add-on and shared_protocol in
    full, and render_pairs)."""
    from inference_service.training.render_pairs import corpus_selection

    poses, actions, ids = corpus_selection(corpus, split, count)
    records = hashlib.sha256(np.ascontiguousarray(poses, dtype=np.float64).tobytes())
    records.update("\0".join(actions).encode() + b"\0" + np.asarray(ids, np.int64).tobytes())
    code = hashlib.sha256()
    sources = [
        *sorted((ROOT / "blender_addon").rglob("*.py")),
        *sorted((ROOT / "shared_protocol").rglob("*.py")),
        ROOT / "inference_service" / "training" / "render_pairs.py",
    ]
    for path in sources:
        code.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return {
        "records_sha256": records.hexdigest(),
        "split": split,
        "count": count,
        "seed": seed,
        "size": size,
        "bpy": importlib.metadata.version("bpy"),
        "code_sha256": code.hexdigest(),
    }


def _subprocess(command: Sequence[str]) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    for line in result.stderr.splitlines()[-5:]:
        log(f"  {line}")
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed (exit {result.returncode})")


def scaffold(work: Path, corpus: Path, preset: Preset, seed: int) -> Path:
    from inference_service.training.corpus import load_corpus
    from inference_service.training.scaffold import SIZES, scaffold_checkpoint

    out = work / "base"
    if out.exists():
        shutil.rmtree(out)
    size = SIZES[preset.model_size]
    if preset.vocab_size is not None:
        size = dataclasses.replace(size, vocab_size=preset.vocab_size)
    if preset.context_layer:
        size = dataclasses.replace(size, num_layers=size.num_layers + 1)
    train_records = [r for r in load_corpus(corpus) if r.split == "train"]
    scaffold_checkpoint(out, size, [r.caption for r in train_records], seed)
    if preset.condition:
        condition_base(
            out / "base",
            seed,
            context_layer=preset.context_layer,
            context_window=preset.context_window,
        )
    head_at_mean_pose(out, np.stack([r.pose for r in train_records]))
    return out


def head_at_mean_pose(checkpoint: Path, poses: np.ndarray) -> None:
    """Make the checkpoint's SMPL head start at the mean pose of `poses` (`PoseHead.start_at`),
    as a fresh head in training does; every stage trains it on with `--head-init base`."""
    from inference_service.checkpoint import HEAD_NAME, ChatPoseConfig
    from inference_service.pose_head import PoseHead
    from inference_service.training.baselines import mean_pose_6d

    config = ChatPoseConfig.load(checkpoint)
    head = PoseHead.load(checkpoint / HEAD_NAME, config)
    head.start_at(mean_pose_6d(poses))
    head.save(checkpoint / HEAD_NAME)


# The embedding dimension that marks image tokens for the image heads (condition_base): the
# projector writes a constant into it, every text embedding starts at 0 there.
IMAGE_MARKER_DIM = 0
# The embedding dimension that weighs each token in the bag-of-words heads' mean
# (condition_base): 0 for every token at first (a plain mean); the words stage learns it.
SALIENCE_DIM = 1


def condition_base(
    base: Path,
    seed: int,
    output_std: float = 0.1,
    average_scale: float = 10.0,
    image_heads: Sequence[int] = (2, 3),
    image_focus: float = 16.0,
    image_marker: float = 5.0,
    salience_focus: float = 16.0,
    context_layer: bool = False,
    context_window: int = 4,
) -> None:
    """Re-draw the scaffold's random weights so that a random base whose layers stay frozen
    reads its prompt (the words stage then trains only its token embeddings).

    The scaffold initialises like a model about to be trained in full (every matrix N(0, 0.02),
    transformers' default). Frozen, that network passes almost nothing on: attention is uniform,
    each layer adds little to the residual stream, so the state before the pose token is nearly
    the same for every caption (cosine ~0.98). And after the final RMSNorm the hidden state has
    norm √H (16) while an output row has norm 0.32: no logit can exceed ~5, the cross-entropy of
    even a fixed answer cannot fall below ~1.7 nats, and its never-fading gradient drowns the
    pose loss. So, seeded:

    - token embeddings N(0, 1), the output layer N(0, `output_std`²);
    - the first layer of the LM becomes an exact bag of words: its query and key projections
      are zero, so every position attends uniformly to all before it; its value projection is
      `average_scale` × identity and its output projection the identity, so the state before
      the pose token is its own token plus the scaled mean of every token of the prompt (the
      caption's part of that mean has about the size of one token); every other layer's output
      projections (attention `o_proj`, MLP `down_proj`) are zero, so they pass the residual
      stream on unchanged (and LoRA on them starts from a clean identity);
    - the projector N(0, 1/fan_in), so image tokens are as large as text tokens;
    - CLIP's position embeddings N(0, 0.5²), as large as the patch embeddings (0.02 × √768), so
      each image token knows where its patch is (left and right in a picture).
    - with attention biases (the demo preset), the `image_heads` of the first layer look at the
      image instead: every text embedding is 0 in dimension `IMAGE_MARKER_DIM`, the projector
      writes `image_marker` there (its output bias), and those heads' query bias and key read
      it in their slowest rotary pair (which turns by 0.008 rad over 60 tokens, so position
      hardly matters): an image token scores about `image_focus` × 4.8 / 8 ≈ 10 against 0 for
      text, and takes ~99.9 % of those heads' attention. Without an image the heads stay
      uniform, a bag of words like the others. In a bag of words the one image token would be a
      sixtieth of the state before the pose token, too faint to learn from
      (docs/demo_model_experiments.md, third round); through these heads it is the whole of
      their quarter of it.
    - with attention biases, the other heads' mean is weighted by a score per token: their
      query bias (`salience_focus`) and key read dimension `SALIENCE_DIM` of the embeddings in
      their second-slowest rotary pair, so a token's weight is exp(`salience_focus` × that
      dimension, RMS-normalised, / √head_dim). It starts at 0 for every token (a plain mean,
      as before), and training the embeddings learns which words matter (attention pooling;
      `salience_focus` 0: none).
    - with `context_layer` (a scaffold with one layer more), the bag of words above is the
      second layer, and the first is a context layer: its head h attends to the token
      h % `context_window` + 1 places back (query and key biases only, `offset_query`),
      its value and output projections are the identity (the marker dimensions left out),
      so each position's state gains a slice of each of the text tokens before it (an image
      token is looked past, `CONTEXT_IMAGE_KEY`); its MLP's
      `down_proj` starts at zero (the model starts as the bag of words) and trains with the
      embeddings (`--train-base context`), so it can join a word to its neighbours ("left_elbow is
      straight"), which a bag of words cannot (docs/demo_model_experiments.md, eighteenth
      round).

    Measured on the demo corpus (4-layer LM, before the words stage existed; head alone, 2,000
    text steps): text PA-MPJPE 15 % below the mean pose and paraphrases 18 % right, against 8 %
    and 6 % after 6,000 steps on the previous all-random layers (docs/demo_model_experiments.md,
    first round). Everything else (norms, biases, the CLIP layers) is kept. A pretrained LLaVA,
    as ChatPose fine-tunes, needs none of this.
    """
    import torch
    from safetensors.torch import load_file, save_file

    text_config = json.loads((base / "config.json").read_text())["text_config"]
    head_dim = text_config["hidden_size"] // text_config["num_attention_heads"]
    group = text_config["num_attention_heads"] // text_config["num_key_value_heads"]
    rope_theta = text_config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    bag_layer = 1 if context_layer else 0
    generator = torch.Generator().manual_seed(seed + 7)
    for path in sorted(base.glob("*.safetensors")):
        tensors = load_file(str(path))
        biased = any(n.startswith("language_model.") and n.endswith("q_proj.bias") for n in tensors)
        readers = []  # the first layer's heads whose keys read one embedding dimension
        if biased and image_heads:
            readers.append(
                MarkedHeads(image_heads, head_dim, group, image_focus, IMAGE_MARKER_DIM, 1)
            )
        if biased and salience_focus:
            bag = [h for h in range(text_config["num_attention_heads"]) if h not in image_heads]
            readers.append(MarkedHeads(bag, head_dim, group, salience_focus, SALIENCE_DIM, 2))
        for name in sorted(tensors):
            weight = tensors[name]
            fresh = None
            if name.endswith("lm_head.weight"):
                fresh = torch.randn(weight.shape, generator=generator) * output_std
            elif name.endswith("embed_tokens.weight"):
                fresh = torch.randn(weight.shape, generator=generator)
                for reader in readers:
                    fresh[:, reader.dim] = 0.0
            elif context_layer and name.startswith("language_model.") and ".layers.0." in name:
                fresh = _context_weight(name, weight, head_dim, rope_theta, context_window)
            elif name.startswith("language_model.") and ".layers." in name:
                fresh = _bag_of_words_weight(name, weight, average_scale, readers, bag_layer)
            elif name.startswith("multi_modal_projector.") and name.endswith(".weight"):
                fresh = torch.randn(weight.shape, generator=generator) * weight.shape[1] ** -0.5
                if biased and salience_focus and name.endswith("linear_2.weight"):
                    fresh[SALIENCE_DIM] = 0.0  # image tokens too start at salience 0
            elif biased and image_heads and name == "multi_modal_projector.linear_2.bias":
                fresh = torch.zeros(weight.shape)
                fresh[IMAGE_MARKER_DIM] = image_marker
            elif name.endswith("embeddings.position_embedding.weight"):
                fresh = torch.randn(weight.shape, generator=generator) * 0.5
            if fresh is not None:
                tensors[name] = fresh.to(weight.dtype)
        save_file(tensors, str(path), metadata={"format": "pt"})


@dataclass(frozen=True)
class MarkedHeads:
    """First-layer heads whose keys read one embedding dimension (`condition_base`)."""

    heads: Sequence[int]
    head_dim: int
    group: int  # query heads per key/value head
    focus: float  # the query bias
    dim: int  # the embedding dimension the keys read
    pair: int  # 1: the slowest rotary pair, 2: the next, ...

    def rows(self, keys: bool = False) -> list[int]:
        """Each head's query (or key) row in its rotary pair (frequency base^(-2i/d) is lowest
        at i = d/2 - 1; rotate_half pairs row i with i + d/2), so that position hardly matters.
        Other heads' queries are 0 there, so a key they share changes nothing for them."""
        heads = sorted({h // self.group for h in self.heads}) if keys else self.heads
        return [h * self.head_dim + self.head_dim // 2 - self.pair for h in heads]


def _bag_of_words_weight(
    name: str, weight, average_scale: float, readers: list[MarkedHeads], bag_layer: int
):
    """The weight `condition_base` gives an LM layer's tensor `name`, or None to keep it."""
    import torch

    first_layer = f".layers.{bag_layer}." in name
    if readers and first_layer and name.endswith("k_proj.weight"):
        fresh = torch.zeros(weight.shape)
        for reader in readers:
            fresh[reader.rows(keys=True), reader.dim] = 1.0
        return fresh
    if readers and first_layer and name.endswith("q_proj.bias"):
        fresh = torch.zeros(weight.shape)
        for reader in readers:
            fresh[reader.rows()] = reader.focus
        return fresh
    if name.endswith("_proj.bias"):
        return torch.zeros(weight.shape)
    if first_layer and name.endswith(("q_proj.weight", "k_proj.weight")):
        return torch.zeros(weight.shape)
    if first_layer and name.endswith("v_proj.weight"):
        return torch.eye(*weight.shape) * average_scale
    if first_layer and name.endswith("o_proj.weight"):
        return torch.eye(*weight.shape)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return torch.zeros(weight.shape)
    return None


# How sharply a context head's score peaks at its offset (`offset_query`): at 80 the head
# gives its offset 99 % of its attention (68 % for offset 1, whose neighbour is the token
# itself) over prompts of up to 400 tokens.
CONTEXT_SHARPNESS = 80.0
CONTEXT_SPAN = 400  # the distances `offset_query` fits
# How far an image token's marker closes the context layer's MLP gates (`_context_weight`): the
# MLP learns from text alone, and an image token passes it unchanged. A text token's marker is
# about 0, so its gates stay open and that column of the weight hardly trains.
CONTEXT_IMAGE_GATE = 10.0
# How far the context heads look away from an image token (`_context_weight`): without it, the
# two tokens after the image read half of it each, and their MLP, which learns from text alone,
# writes it into the bag of words (docs/demo_model_experiments.md, 21st round). The score of an
# image token falls by this × its marker (about 5) / √head_dim. A text token's marker starts at
# 0; the words stage trains it (to 0.6 at most, seen), so that it too may learn to be looked
# past.
CONTEXT_IMAGE_KEY = 80.0


def offset_query(offset: int, head_dim: int, rope_theta: float) -> np.ndarray:
    """A query bias (one head's rows) that, against a key bias of 1 in the first row of every
    rotary pair, scores each earlier token by how close its distance is to `offset`.

    Rotated, that query and key score a token d places back Σ_p c_p cos(θ_p d) - s_p
    sin(θ_p d) (θ_p = rope_theta^(-2p / head_dim), c_p and s_p the query's rows p and
    p + head_dim / 2): a series fitted, by ridge least squares, to 0 at `offset` and -1
    elsewhere (the near distances weighed 6 times), then scaled by `CONTEXT_SHARPNESS`."""
    theta = rope_theta ** (-np.arange(0, head_dim, 2) / head_dim)
    distance = np.arange(CONTEXT_SPAN)
    angles = np.outer(distance, theta)
    basis = np.concatenate([np.cos(angles), np.sin(angles)], 1)
    target = np.where(distance == offset, 0.0, -1.0)
    weight = np.where(distance <= offset + 3, 6.0, 1.0)[:, None]
    system = basis * weight
    coefficients = np.linalg.solve(
        system.T @ system + 1e-3 * np.eye(head_dim), system.T @ (target[:, None] * weight)
    )[:, 0]
    cosines, sines = np.split(coefficients, 2)
    return np.concatenate([cosines, -sines]) * CONTEXT_SHARPNESS * head_dim**0.5


def _context_weight(name: str, weight, head_dim: int, rope_theta: float, window: int):
    """The weight `condition_base` gives the context layer's tensor `name`, or None to keep it
    (the norms, and the MLP's random `up_proj`; `gate_proj` is kept but for the image marker's
    column).

    Each head's last query and key row (the second row of the slowest rotary pair, which turns
    by under 0.06 rad over `CONTEXT_SPAN` tokens, so its score hardly depends on position)
    keep the image token out (`CONTEXT_IMAGE_KEY`): the key reads the image marker there,
    negated, against a query bias that replaces the fit's coefficient (-14 to 14 by offset;
    against the key bias of 1 it multiplies a sine under 0.06, so a text token's score moves
    by under a unit)."""
    import torch

    if name.endswith("q_proj.bias"):
        fresh = torch.cat(
            [
                torch.as_tensor(
                    offset_query(head % window + 1, head_dim, rope_theta), dtype=torch.float32
                )
                for head in range(weight.shape[0] // head_dim)
            ]
        )
        fresh.view(-1, head_dim)[:, head_dim - 1] = CONTEXT_IMAGE_KEY
        return fresh
    if name.endswith("k_proj.weight"):
        fresh = torch.zeros(weight.shape)
        fresh.view(-1, head_dim, weight.shape[1])[:, head_dim - 1, IMAGE_MARKER_DIM] = -1.0
        return fresh
    if name.endswith("k_proj.bias"):
        fresh = torch.zeros(weight.shape).view(-1, head_dim)
        fresh[:, : head_dim // 2] = 1.0
        return fresh.view(-1)
    if name.endswith("gate_proj.weight"):
        fresh = weight.clone()
        fresh[:, IMAGE_MARKER_DIM] = -CONTEXT_IMAGE_GATE
        return fresh
    if name.endswith("v_proj.weight"):
        return torch.eye(*weight.shape)
    if name.endswith("o_proj.weight"):
        fresh = torch.eye(*weight.shape)
        fresh[[IMAGE_MARKER_DIM, SALIENCE_DIM]] = 0.0  # what the bag layer reads stays the token's
        return fresh
    if name.endswith(("_proj.bias", "q_proj.weight", "down_proj.weight")):
        return torch.zeros(weight.shape)
    return None


def learn_words(
    work: Path, base: Path, corpus: Path, preset: Preset, seed: int, threads: int
) -> Path:
    """The words stage: the base's token embeddings (and its context layer's MLP, if it has
    one) and the head, trained on text → pose with the pose loss alone (the template's
    cross-entropy would only pull the embeddings towards the fixed answer), without gradient
    clipping. Through the bag-of-words LM the state before the pose token is the mean of the
    prompt's embeddings (each joined to its neighbours by the context layer), so this is the
    head-alone training of `train` plus words that learn their meaning for a pose
    (docs/evaluation.md, *What limits the demo model*). Returns the run's last checkpoint (a
    whole model)."""
    argv = [
        "--steps", str(preset.word_steps), "--batch-size", str(preset.word_batch_size),
        "--train-base", "context" if preset.context_layer else "embeddings",
        "--text-weight", "0", "--max-grad-norm", "0",
        "--mix", "1:0:0", "--save-every", "0", "--action-weight", str(preset.word_action_weight),
        "--log-every", "250" if preset.word_steps >= 1000 else "1",
    ]  # fmt: skip
    return _train(
        work / "words", base, corpus, preset, seed, threads, argv, phrasing=preset.word_phrasing
    )


def learn_tower(
    work: Path, base: Path, pairs: Path, preset: Preset, seed: int, threads: int
) -> tuple[Path, dict]:
    """The tower stage: the vision tower alone, trained directly on the rendered pairs (image →
    pose, no LM; `training/tower.py`), at a quarter of the cost of a step through the LM. The
    vision stage then aligns the projector and the head through the LM. Returns the checkpoint
    with the trained tower and the figures for build_info.json."""
    import torch

    from inference_service.training.datasets import read_image_pose_pairs
    from inference_service.training.tower import pretrain_tower

    torch.set_num_threads(threads)
    source, model, processor = load_whole(base)
    result = pretrain_tower(
        model,
        processor,
        read_image_pose_pairs(pairs / "pairs.npz"),
        epochs=preset.tower_epochs,
        batch_size=preset.vision_batch_size,
        lr=preset.vision_lr,
        warmup_steps=preset.warmup_steps,
        seed=seed,
        log=log,
    )
    out = write_whole(source, model, processor, work / "tower")
    figures = {
        "epochs": result.epochs,
        "steps": result.steps,
        "batch_size": preset.vision_batch_size,
        "seconds_per_step": result.seconds / result.steps,
        "first_epoch_loss": result.first_loss,
        "last_epoch_loss": result.last_loss,
    }
    return out, figures


def learn_alignment(
    work: Path, base: Path, corpus: Path, pairs: Path, preset: Preset, seed: int, threads: int
) -> Path:
    """The align stage: the projector alone and the head, on the rendered pairs through the LM
    (`--train-base projector`), the trained tower frozen: LLaVA's first stage, which maps a
    trained tower's tokens into the LM before anything else moves. Returns the run's last
    checkpoint (a whole model)."""
    argv = [
        "--data", "pairs", str(pairs / "pairs.npz"), f"phrasing={preset.phrasing}",
        "--steps", str(preset.align_steps), "--batch-size", str(preset.vision_batch_size),
        "--train-base", "projector", "--text-weight", "0", "--mix", "0:1:0",
        "--save-every", "0", "--log-every", "250" if preset.align_steps >= 1000 else "1",
    ]  # fmt: skip
    return _train(work / "align", base, corpus, preset, seed, threads, argv, preset.align_lr)


def learn_vision(
    work: Path, base: Path, corpus: Path, pairs: Path, preset: Preset, seed: int, threads: int
) -> Path:
    """The vision stage: the vision tower, the projector and the head, trained on the rendered
    pairs (image → pose, pose loss only) through the LM as it is, whose image heads read the
    one image token (`condition_base`). ChatPose freezes a pretrained CLIP; the demo's tower is
    pretrained by the tower stage (random without it), goes on learning here, and `train` keeps
    it frozen, as the paper does. Returns the run's last checkpoint (a whole model)."""
    argv = [
        "--data", "pairs", str(pairs / "pairs.npz"), f"phrasing={preset.phrasing}",
        "--steps", str(preset.vision_steps), "--batch-size", str(preset.vision_batch_size),
        "--train-base", "vision", "--text-weight", "0", "--mix", "0:1:0", "--save-every", "0",
        "--log-every", "250" if preset.vision_steps >= 1000 else "1",
        "--lr-schedule", preset.lr_schedule,
    ]  # fmt: skip
    return _train(work / "vision", base, corpus, preset, seed, threads, argv, preset.vision_lr)


def train(
    work: Path,
    base: Path,
    corpus: Path,
    pairs: Path,
    preset: Preset,
    steps: int,
    seed: int,
    threads: int,
) -> Path:
    """The train stage: text and images together. Half its text examples are asked as a chat
    turn reads them (`phrasing=chat`: the caption alone), so that the head also knows the
    states of prompts without the service's question: a chat turn's pose is then as good as
    the pose path's (docs/demo_model_experiments.md, eleventh round). Returns the last
    checkpoint."""
    argv = [
        "--data", "pairs", str(pairs / "pairs.npz"), f"phrasing={preset.phrasing}",
        "--steps", str(steps), "--batch-size", str(preset.batch_size),
        "--mix", preset.mix, "--save-every", str(preset.save_every), "--keep-last", "2",
        "--log-every", "50" if steps >= 200 else "1", "--lr-schedule", preset.lr_schedule,
        "--action-weight", str(preset.train_action_weight),
    ]  # fmt: skip
    if preset.train_base:  # as the words stage: the pose loss alone, no clipping
        argv += ["--train-base", preset.train_base, "--text-weight", "0", "--max-grad-norm", "0"]
    else:
        argv += ["--lora-rank", str(preset.lora_rank), "--lora-alpha", str(preset.lora_alpha)]
    return _train(work / "run", base, corpus, preset, seed, threads, argv, phrasing="chat")


def learn_answer(
    work: Path, base: Path, corpus: Path, pairs: Path, preset: Preset, seed: int, threads: int
) -> Path:
    """The answer stage: the LM's output layer alone (`--train-base lm_head`) learns the
    answer's words from the cross-entropy alone, so that a chat turn, which the model answers
    freely, writes the answer and its pose token ("sure, it is <POSE>.") and so gets a pose.
    Half its examples are asked as a chat turn reads them (`phrasing=chat`: the caption
    alone), since a prompt without the service's question otherwise stops short of the pose
    token. The states the head reads and the head do not change, so neither does any pose.
    Returns the run's last checkpoint (a whole model)."""
    argv = [
        "--data", "pairs", str(pairs / "pairs.npz"), "phrasing=chat",
        "--steps", str(preset.answer_steps), "--batch-size", str(preset.batch_size),
        "--train-base", "lm_head", "--text-weight", "1", "--pose-weight", "0",
        "--max-grad-norm", "0", "--no-center-head-input", "--mix", preset.mix,
        "--save-every", "0", "--log-every", "250" if preset.answer_steps >= 1000 else "1",
    ]  # fmt: skip
    return _train(work / "answer", base, corpus, preset, seed, threads, argv, phrasing="chat")


def _train(
    run: Path,
    base: Path,
    corpus: Path,
    preset: Preset,
    seed: int,
    threads: int,
    argv: list[str],
    lr: float | None = None,
    phrasing: str | None = None,
) -> Path:
    """`python -m inference_service.train` in-process into a fresh RUN, from `base` (its head
    too), on the corpus's train split plus the stage's own `argv`, at `lr` and in `phrasing`
    (the preset's by default); returns the last checkpoint."""
    from inference_service import train as train_cli

    if run.exists():
        shutil.rmtree(run)
    argv = [
        "--base", str(base), "--out", str(run), "--head-init", "base",
        "--data", "corpus", str(corpus), "split=train", f"phrasing={phrasing or preset.phrasing}",
        "--lr", str(lr or preset.lr), "--warmup-steps", str(preset.warmup_steps),
        "--seed", str(seed), "--threads", str(threads), "--device", "cpu",
        *argv,
    ]  # fmt: skip
    log("python -m inference_service.train " + " ".join(argv))
    code = train_cli.main(argv)
    if code != 0:
        raise RuntimeError(f"training failed (exit {code})")
    return run / (run / "latest").read_text(encoding="utf-8").strip()


def pack(checkpoint: Path, out: Path, dtype: str = "float16") -> Path:
    """A self-contained copy of `checkpoint` at `out`: adapter merged into base/, no training
    state; weights saved as `dtype`."""
    import torch

    source, model, processor = load_whole(checkpoint)
    return write_whole(source, model.to(getattr(torch, dtype)), processor, out)


def load_whole(checkpoint: Path):
    """(the Checkpoint, its LLaVA in float32 with any adapter merged, its processor)."""
    import torch

    from inference_service.checkpoint import Checkpoint
    from inference_service.loading import apply_adapter, ensure_pose_token, load_base

    source = Checkpoint.open(checkpoint)
    processor, model = load_base(source.base_dir, dtype=torch.float32)
    ensure_pose_token(processor.tokenizer, model, source.config.pose_token)
    if source.adapter_dir is not None:
        model = apply_adapter(model, source.adapter_dir, merge=True)
    return source, model, processor


def write_whole(source, model, processor, out: Path) -> Path:
    """`source`'s head and settings with `model` as its whole base, written to `out` (replaced)
    whole or not at all (`write_folder_whole`): an interrupted write leaves no half checkpoint."""
    from inference_service.checkpoint import HEAD_NAME
    from inference_service.files import write_folder_whole
    from inference_service.loading import save_processor

    def write(folder: Path) -> None:
        model.save_pretrained(folder / "base")
        save_processor(processor, folder / "base")
        shutil.copyfile(source.head_path, folder / HEAD_NAME)
        dataclasses.replace(source.config, base_model="base").save(folder)

    write_folder_whole(out, write)
    return out


def check_pack(original: Path, packed: Path, corpus: Path, tolerance_mm: float = 5.0) -> float:
    """The packed model predicts what the trained checkpoint predicts (fp16 rounding aside):
    the largest MPJPE (mm) between them on a few captions."""
    from inference_service.metrics import mpjpe
    from inference_service.modeling_chatpose import ChatPoseModel, PosePrompt
    from inference_service.training.corpus import load_corpus

    captions = [r.caption for r in load_corpus(corpus)[:8]]
    requests = [PosePrompt(text=c) for c in captions]
    a = np.stack(ChatPoseModel.from_checkpoint(original, device="cpu").predict_poses(requests))
    b = np.stack(ChatPoseModel.from_checkpoint(packed, device="cpu").predict_poses(requests))
    worst = float(mpjpe(a, b).max())
    if worst > tolerance_mm:
        raise RuntimeError(f"the packed checkpoint differs from the trained one by {worst:.1f} mm")
    return worst


def evaluate(work: Path, packed: Path, corpus: Path, pairs: Path) -> dict:
    from inference_service.evaluate import evaluate as run_evaluation
    from inference_service.evaluation_report import markdown_summary

    # On the CPU wherever the build runs: a GPU's bfloat16 would give other figures.
    report = run_evaluation(packed, corpus, split="test", pairs=pairs, device="cpu", log=log)
    (work / "report.json").write_text(json.dumps(jsonable(report), indent=2) + "\n")
    (work / "report.md").write_text(markdown_summary(report), encoding="utf-8")
    return report


def stage_report(
    work: Path,
    stage: str,
    checkpoint: Path | None,
    corpus: Path,
    pairs: Path | None,
    preset: Preset,
    seconds: dict[str, float],
) -> dict:
    """The end of a build stopped after `stage`: its model evaluated on the test split (with the
    test renders, if any) and on the val split (text only; the split to choose settings on,
    keeping the test split for the figures) into WORK/report_STAGE_SPLIT.json and .md. (After
    the tower stage the images still reach the LM through the scaffold's projector: the tower's
    own figure is its loss, `learn_tower`'s log.)"""
    from inference_service.evaluate import evaluate as run_evaluation
    from inference_service.evaluation_report import markdown_summary

    summary = {
        "stopped_after": stage,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "settings": dataclasses.asdict(preset),
        "seconds": dict(seconds),
        "reports": {},
    }
    if checkpoint is None:
        return summary
    for split, split_pairs in (("test", pairs), ("val", None)):
        report = run_evaluation(
            checkpoint, corpus, split=split, pairs=split_pairs, device="cpu", log=log
        )
        path = work / f"report_{stage}_{split}.json"
        path.write_text(json.dumps(jsonable(report), indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown_summary(report), encoding="utf-8")
        summary["reports"][split] = str(path)
        log_bars(report, f"{split}: ")
    return summary


def log_bars(report: dict, prefix: str = "") -> None:
    for item in report["bars"]:
        log(f"{prefix}{'pass' if item['pass'] else 'FAIL'}  {item['bar']}: {item['value']:.3f}")


def examples(work: Path, packed: Path, pairs: Path, images_dir: Path) -> list[dict]:
    """Render prompt -> predicted pose pictures (and image -> pose for a few test pairs) into
    `images_dir`; returns their descriptions for the docs."""
    from inference_service.evaluate import action_prompts
    from inference_service.modeling_chatpose import ChatPoseModel, PosePrompt
    from inference_service.training.render_pairs import fixed_view, read_pairs

    first: dict[str, str] = {}
    for name, text in action_prompts("test", EXAMPLE_ACTIONS):
        first.setdefault(name, text)
    prompts = [*first.values(), *EXAMPLE_PROMPTS]
    model = ChatPoseModel.from_checkpoint(packed, device="cpu")
    text_poses = model.predict_poses([PosePrompt(text=p) for p in prompts])
    arrays = read_pairs(pairs / "pairs.npz")
    picked = np.linspace(0, len(arrays["poses"]) - 1, EXAMPLE_IMAGES).astype(int)
    inputs = [(pairs / str(arrays["images"][i])).read_bytes() for i in picked]
    image_poses = model.predict_poses([PosePrompt(images=(data,)) for data in inputs])
    view = fixed_view()
    poses, names, views, entries = [], [], [], []
    for k, (prompt, pose) in enumerate(zip(prompts, text_poses, strict=True)):
        poses.append(pose)
        names.append(f"text_{k:02d}")
        views.append(dataclasses.astuple(view))
        entries.append({"kind": "text", "prompt": prompt, "picture": f"text_{k:02d}.png"})
    for k, (i, pose) in enumerate(zip(picked, image_poses, strict=True)):
        # The prediction is camera-relative: seen from yaw 0 at the input's pitch it should
        # look like the input.
        pitch = float(arrays["camera_pitch_deg"][i])
        poses.append(pose)
        names.append(f"image_{k:02d}_pred")
        views.append((0.0, pitch, 1.1, 0.2))
        poses.append(arrays["poses"][i])
        names.append(f"image_{k:02d}_true")
        views.append((0.0, pitch, 1.1, 0.2))
        entries.append(
            {
                "kind": "image",
                "input": f"image_{k:02d}_input.png",
                "picture": f"image_{k:02d}_pred.png",
                "truth": f"image_{k:02d}_true.png",
                "action": str(arrays["actions"][i]) or "random pose",
            }
        )
    render_dir = work / "examples"
    if render_dir.exists():
        shutil.rmtree(render_dir)
    render_dir.mkdir(parents=True)
    poses_path = render_dir / "poses.npz"
    with open(poses_path, "wb") as stream:
        write_npz(
            stream,
            {
                "poses": np.stack(poses).reshape(-1, 72),
                "names": np.array(names),
                "views": np.array(views, dtype=np.float64),
            },
        )
    _subprocess(
        [
            sys.executable,
            "-m",
            "inference_service.training.render_pairs",
            str(render_dir / "out"),
            "--poses",
            str(poses_path),
            "--size",
            "128",
        ]
    )
    images_dir.mkdir(parents=True, exist_ok=True)
    for old in images_dir.glob("*.png"):
        if old.name.startswith(("text_", "image_")):
            old.unlink()
    for name in names:
        shutil.copyfile(render_dir / "out" / "images" / f"{name}.png", images_dir / f"{name}.png")
    for k, i in enumerate(picked):
        shutil.copyfile(pairs / str(arrays["images"][i]), images_dir / f"image_{k:02d}_input.png")
    return entries


def write_docs(
    docs: Path, report: dict, entries: list[dict], info: dict, markdown_summary: str
) -> Path:
    """Put the generated section between the markers of docs/evaluation.md (the whole file when
    it has none)."""
    lines = [MARK_START, "", "## Results of the shipped demo checkpoint", ""]
    lines += [
        f"Built by `{info['command']}` on {info['machine']} ({info['date']}); "
        f"total {info['seconds_total'] / 60:.1f} min.",
        "",
        "| stage | wall time |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.0f} s ({v / 60:.1f} min) |" for k, v in info["seconds"].items()]
    reuse_note = "reused from an earlier build (`--reuse-renders`)"
    lines += [f"| {k} | {reuse_note} |" for k in info.get("reused", ())]
    lines.append("")
    words = "token embeddings and head"
    if info["settings"].get("context_layer"):
        words = "token embeddings, the context layer's MLP and head"
    for stage, what in (
        ("words", f"{words}, text only"),
        ("tower", "the vision tower alone, images only, no LM"),
        ("align", "projector and head, images only"),
        ("vision", "vision tower, projector and head, images only"),
        ("answer", "the LM's output layer, the answer's cross-entropy alone"),
    ):
        if stage in info:
            run = info[stage]
            lines += [
                f"{stage.capitalize()} ({what}): {run['steps']} steps of batch "
                f"{run['batch_size']}, {run['seconds_per_step']:.2f} s a step.",
                "",
            ]
    lines += [
        f"Training: {info['train']['steps']} steps of batch {info['train']['batch_size']} "
        f"(mix {info['train']['mix']}), {info['train']['seconds_per_step']:.2f} s a step, on "
        f"{info['train']['examples']} examples. Checkpoint: {info['size_mb']:.1f} MB "
        f"({info['dtype']} safetensors, self-contained).",
        "",
        markdown_summary,
        "### Examples",
        "",
        "Text → pose (held-out phrasings and free prompts; the predicted pose on the add-on's "
        "mannequin, rendered with Workbench from a fixed three-quarter view):",
        "",
        "| prompt | predicted pose |",
        "|---|---|",
    ]
    for entry in entries:
        if entry["kind"] == "text":
            lines.append(f"| {entry['prompt']} | ![](images/{entry['picture']}) |")
    lines += [
        "",
        "Image → pose (held-out test renders; prediction and truth seen from the camera's "
        "heading, as the camera-relative convention defines them):",
        "",
        "| input | predicted | truth | pose source |",
        "|---|---|---|---|",
    ]
    for entry in entries:
        if entry["kind"] == "image":
            lines.append(
                f"| ![](images/{entry['input']}) | ![](images/{entry['picture']}) | "
                f"![](images/{entry['truth']}) | {entry['action']} |"
            )
    lines += ["", MARK_END]
    generated = "\n".join(lines) + "\n"
    path = docs / "evaluation.md"
    docs.mkdir(parents=True, exist_ok=True)
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if MARK_START in text and MARK_END in text:
            head = text[: text.index(MARK_START)]
            tail = text[text.index(MARK_END) + len(MARK_END) :].lstrip("\n")
            path.write_text(head + generated + ("\n" + tail if tail else ""), encoding="utf-8")
            return path
    path.write_text("# Evaluation\n\n" + generated, encoding="utf-8")
    return path


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- the command -------------------------------------------------------------------------------


def build(
    preset_name: str = "demo",
    *,
    steps: int | None = None,
    out: Path = DEFAULT_OUT,
    work: Path = DEFAULT_WORK,
    docs: Path | None = DEFAULT_DOCS,
    threads: int = 2,
    seed: int = 0,
    dtype: str = "float16",
    command: str = "",
    reuse_renders: bool = False,
    stop_after: str | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """The whole build (the module docstring). `reuse_renders` keeps renders that an earlier
    build left in `work` when nothing that decides them changed (`renders_match`): for trying
    changes to the later stages; reused stages are listed in `"reused"`, not timed.

    For experiments: `overrides` ("FIELD=VALUE", `with_overrides`) change the preset, and
    `stop_after` (one of `STOP_POINTS`) ends the build after that stage: its model is
    evaluated into WORK/report_STAGE_SPLIT.json (`stage_report`), nothing is packed and
    neither `out` nor the docs are touched. Stages before the tower skip the renders."""
    preset = with_overrides(PRESETS[preset_name], overrides)
    if stop_after is not None and stop_after not in STOP_POINTS:
        raise ValueError(f"unknown stage {stop_after!r} to stop after; one of {STOP_POINTS}")
    steps = steps or preset.steps
    out, work = Path(out).resolve(), Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    total_start = time.perf_counter()

    def stop(stage: str, checkpoint: Path | None, pairs: Path | None = None) -> dict | None:
        if stage != stop_after:
            return None
        return stage_report(work, stage, checkpoint, corpus, pairs, preset, stages.seconds)

    corpus = stages.run(
        "corpus", make_corpus, work, preset.corpus_records, seed, preset.synonym_rate
    )
    if report := stop("corpus", None):
        return report
    train_pairs = test_pairs = None
    reused: list[str] = []
    if STOP_POINTS.index(stop_after or "answer") >= STOP_POINTS.index("tower"):  # uses them
        train_pairs, test_pairs, reused = _render_stages(
            stages, work, corpus, preset, seed, reuse_renders
        )
    base = stages.run("scaffold", scaffold, work, corpus, preset, seed)
    if report := stop("scaffold", base):
        return report
    if preset.word_steps:
        base = stages.run("words", learn_words, work, base, corpus, preset, seed, threads)
    if report := stop("words", base):
        return report
    tower = None
    if preset.tower_epochs:
        base, tower = stages.run(
            "tower", learn_tower, work, base, train_pairs, preset, seed, threads
        )
    if report := stop("tower", base, test_pairs):
        return report
    if preset.align_steps:
        base = stages.run(
            "align", learn_alignment, work, base, corpus, train_pairs, preset, seed, threads
        )
    if report := stop("align", base, test_pairs):
        return report
    if preset.vision_steps:
        base = stages.run(
            "vision", learn_vision, work, base, corpus, train_pairs, preset, seed, threads
        )
    if report := stop("vision", base, test_pairs):
        return report
    trained = stages.run(
        "train", train, work, base, corpus, train_pairs, preset, steps, seed, threads
    )
    if report := stop("train", trained, test_pairs):
        return report
    if preset.answer_steps:
        trained = stages.run(
            "answer", learn_answer, work, trained, corpus, train_pairs, preset, seed, threads
        )
    if report := stop("answer", trained, test_pairs):
        return report
    packed = stages.run("pack", pack, trained, out, dtype)
    drift = check_pack(trained, packed, corpus)
    log(f"packed checkpoint agrees with the trained one to {drift:.2f} mm")
    report = stages.run("evaluate", evaluate, work, packed, corpus, test_pairs)
    info = {
        "command": command
        or f"python -m inference_service.training.build_demo --preset {preset_name}",
        "preset": preset_name,
        "settings": dataclasses.asdict(preset) | {"steps": steps, "seed": seed},
        "threads": threads,
        "dtype": dtype,
        "machine": f"{platform.machine()} ({cpu_name()}), {os.cpu_count()} CPU cores "
        "(shared), no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": dict(stages.seconds),
        "reused": reused,
        "train": _train_stage_info(work, preset, steps, stages, corpus, train_pairs),
        "bars": report["bars"],
        **_other_stage_info(preset, stages),
    }
    if tower is not None:
        info["tower"] = tower

    def finish_info() -> None:
        info["seconds"] = dict(stages.seconds)
        info["seconds_total"] = round(time.perf_counter() - total_start, 1)
        info["size_mb"] = directory_size(packed) / 1e6

    info["size_mb"] = 0.0
    _write_build_info(packed, info)  # first, so that the size counts it
    if docs is not None:
        from inference_service.evaluation_report import markdown_summary

        entries = stages.run("examples", examples, work, packed, test_pairs, docs / "images")
        finish_info()
        write_docs(docs, report, entries, info, markdown_summary(report))
    finish_info()
    _write_build_info(packed, info)
    log(f"done in {info['seconds_total'] / 60:.1f} min: {packed} ({info['size_mb']:.1f} MB)")
    log_bars(report)
    return info


def _render_stages(
    stages: Stages, work: Path, corpus: Path, preset: Preset, seed: int, reuse_renders: bool
) -> tuple[Path, Path, list[str]]:
    """The train and test renders' folders, and the render stages reused (`reuse_renders`
    and `renders_match`)."""
    folders, reused = [], []
    for split, count, split_seed in (
        ("train", preset.train_images, seed),
        ("test", preset.test_images, seed + 1),
    ):
        name, settings = f"render {split} pairs", (split, count, split_seed, preset.image_size)
        if reuse_renders and renders_match(work, corpus, *settings):
            folders.append(work / f"pairs_{split}")
            log(f"stage {name}: reusing {folders[-1]} (nothing that decides it changed)")
            reused.append(name)
        else:
            folders.append(stages.run(name, render, work, corpus, *settings))
    return folders[0], folders[1], reused


def _train_stage_info(
    work: Path, preset: Preset, steps: int, stages: Stages, corpus: Path, train_pairs: Path
) -> dict:
    """build_info.json's figures of the train stage: steps, batch size, time a step, its data
    and final loss."""
    train_log = [
        json.loads(line)
        for line in (work / "run" / "train_log.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return {
        "steps": steps,
        "batch_size": preset.batch_size,
        "mix": preset.mix,
        "seconds_per_step": stages.seconds["train"] / steps,
        "examples": _count_examples(corpus, train_pairs),
        "final_loss": train_log[-1] if train_log else None,
    }


def _other_stage_info(preset: Preset, stages: Stages) -> dict:
    """build_info.json's figures of the other training stages that ran: steps, batch size,
    time a step."""
    info = {}
    for stage, stage_steps, batch_size in (
        ("words", preset.word_steps, preset.word_batch_size),
        ("align", preset.align_steps, preset.vision_batch_size),
        ("vision", preset.vision_steps, preset.vision_batch_size),
        ("answer", preset.answer_steps, preset.batch_size),
    ):
        if stage_steps:
            info[stage] = {
                "steps": stage_steps,
                "batch_size": batch_size,
                "seconds_per_step": stages.seconds[stage] / stage_steps,
            }
    return info


def _write_build_info(packed: Path, info: dict) -> None:
    (packed / "build_info.json").write_text(json.dumps(jsonable(info), indent=2) + "\n")


def cpu_name() -> str:
    """The CPU's model name: builds on different CPUs round float sums otherwise and give other
    weights (docs/demo_model_experiments.md, thirteenth round), so build_info.json names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _count_examples(corpus: Path, pairs: Path) -> int:
    from inference_service.training.corpus import load_corpus

    with np.load(pairs / "pairs.npz") as data:
        images = len(data["poses"])
    return sum(r.split == "train" for r in load_corpus(corpus)) + images


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference_service.training.build_demo",
        description="Build the demo checkpoint: corpus, renders, scaffold, training, packing, "
        "evaluation and docs.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--steps", type=int, help="training steps (the preset's by default)")
    parser.add_argument(
        "--out",
        type=user_path,
        help="the packed checkpoint (default: the shipped demo_checkpoint for the demo preset "
        "as it is, else WORK/checkpoint)",
    )
    parser.add_argument("--work", type=user_path, default=DEFAULT_WORK, help="intermediate files")
    parser.add_argument(
        "--docs",
        type=user_path,
        help="docs folder to write the results into (default: docs/ for the demo preset as it "
        "is, else none)",
    )
    parser.add_argument("--no-docs", action="store_true", help="leave the docs alone")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument(
        "--reuse-renders",
        action="store_true",
        help="keep the renders in --work when the corpus, the settings and the renderer are "
        "the same (to try changes to the later stages; the build time then leaves them out)",
    )
    parser.add_argument(
        "--stop-after",
        choices=STOP_POINTS,
        help="end after this stage: its model is evaluated into WORK/report_STAGE_test.json "
        "and _val.json; nothing is packed, OUT and the docs are left alone (for experiments)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one setting of the preset, e.g. --set word_steps=12000 (repeatable)",
    )
    args = parser.parse_args(argv)
    from inference_service.checkpoint import work_offline

    work_offline()  # before transformers is imported: no request to the Hub, ever
    # Only the demo preset as it is may replace the shipped checkpoint and its docs by default:
    # a toy or changed build would otherwise overwrite them.
    ships = args.preset == "demo" and not args.overrides
    out = args.out or (DEFAULT_OUT if ships else args.work / "checkpoint")
    docs = None if args.no_docs else args.docs or (DEFAULT_DOCS if ships else None)
    command = "python -m inference_service.training.build_demo" + (
        " " + " ".join(argv) if argv else " " + " ".join(sys.argv[1:])
    )
    try:
        result = build(
            args.preset,
            steps=args.steps,
            out=out,
            work=args.work,
            docs=docs,
            threads=args.threads,
            seed=args.seed,
            dtype=args.dtype,
            command=command.strip(),
            reuse_renders=args.reuse_renders,
            stop_after=args.stop_after,
            overrides=args.overrides,
        )
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.stop_after:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
