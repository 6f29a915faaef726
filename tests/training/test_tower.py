"""Pretraining the vision tower directly on image–pose pairs (training/tower.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from inference_service.modeling_chatpose import ChatPoseModel, PosePrompt
from inference_service.prompts import POSE_MARKER
from inference_service.training.build_demo import load_whole, write_whole
from inference_service.training.datasets import Example
from inference_service.training.scaffold import scaffold_checkpoint
from inference_service.training.tower import pretrain_tower


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _pairs() -> list[Example]:
    """Red pictures show one pose, blue ones another: learnable from the pixels alone."""
    rng = np.random.default_rng(0)
    examples = []
    for colour, angle in (((220, 30, 30), 1.2), ((30, 30, 220), -1.2)):
        pose = np.zeros((24, 3), np.float32)
        pose[16, 2] = angle  # the left shoulder, up or down
        for _ in range(16):
            shade = tuple(int(c + rng.integers(-20, 20)) for c in colour)
            examples.append(
                Example(
                    "image_to_pose",
                    "",
                    f"It is {POSE_MARKER}.",
                    images=(_png(shade),),
                    poses=(pose,),
                )
            )
    return examples


def test_pretraining_lowers_the_pose_loss_and_changes_only_the_tower(tmp_path):
    checkpoint = scaffold_checkpoint(tmp_path / "base", "tiny", ["a b c"])
    source, model, processor = load_whole(checkpoint)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = pretrain_tower(
        model, processor, _pairs(), epochs=20, batch_size=8, lr=1e-3, warmup_steps=0
    )
    assert result.epochs == 20 and result.steps == 20 * 4
    assert result.last_loss < 0.5 * result.first_loss
    after = dict(model.named_parameters())
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".vision_tower." in name for name in changed)
    # Written back, it is a checkpoint the service loads as it is.
    write_whole(source, model, processor, tmp_path / "tower")
    pose = ChatPoseModel.from_checkpoint(tmp_path / "tower", device="cpu").predict_poses(
        [PosePrompt(images=(_png((220, 30, 30)),))]
    )[0]
    assert pose.shape == (24, 3) and np.isfinite(pose).all()


def test_pretraining_needs_image_pose_pairs(tmp_path):
    _, model, processor = load_whole(scaffold_checkpoint(tmp_path / "base", "tiny", ["a b c"]))
    text_only = Example(
        "text_to_pose", "raise the arm", f"It is {POSE_MARKER}.", poses=(np.zeros((24, 3)),)
    )
    with pytest.raises(ValueError, match="no image-pose examples"):
        pretrain_tower(model, processor, [text_only], epochs=1)
