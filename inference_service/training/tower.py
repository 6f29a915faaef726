"""Pretrain a LLaVA's vision tower on image–pose pairs directly, without the LM:

    image -> the tower -> the image tokens LLaVA would take (its feature layer and selection)
          -> their mean -> a temporary projector and pose head -> the pose loss (L1 on rotation
             matrices, `losses.pose_l1_loss`)

ChatPose freezes a CLIP tower that was pretrained elsewhere. The demo's tower starts random, and
taught through the LM (`build_demo.learn_vision`) each step costs about four times as much, because
the LM reads the whole prompt around the image for every picture. So the demo build first teaches
the tower to see the mannequin here, on pixels decoded and preprocessed once, then aligns the
projector and the head through the LM. Only the tower's weights change; the temporary projector
and head are dropped. The build loads and writes the checkpoint around it
(`build_demo.learn_tower`).

Measured on the demo's renders (docs/demo_model_experiments.md, fifth and sixth rounds): the
one-patch tower this way reaches PA-MPJPE 7.5 % below the mean pose after 10 epochs and 16 % after
20, the same curve as through the LM at a quarter of the cost, and 43 % after 70, the build's count.
Then the align stage (the projector alone) and 10 epochs of the vision stage through the LM give 42
%, where 20 epochs through the LM alone gave 14 %.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from inference_service.pose_head import PoseHead
from inference_service.training.baselines import mean_pose_6d
from inference_service.training.datasets import Example, load_image
from inference_service.training.losses import pose_l1_loss


@dataclass(frozen=True)
class TowerResult:
    epochs: int
    steps: int
    seconds: float
    first_loss: float  # the mean pose loss of the first epoch
    last_loss: float  # ... and of the last


class TowerPoseModel(torch.nn.Module):
    """The tower with a temporary projector and head: image -> 6D pose (P, 144)."""

    def __init__(self, llava, poses: np.ndarray) -> None:
        super().__init__()
        config = llava.config
        self.tower = llava.model.vision_tower
        self.feature_layer = config.vision_feature_layer
        self.drop_class_token = config.vision_feature_select_strategy == "default"
        width, hidden = config.vision_config.hidden_size, config.text_config.hidden_size
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
        )
        self.head = PoseHead(hidden, hidden)
        self.head.start_at(mean_pose_6d(poses))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.tower(pixel_values, output_hidden_states=True).hidden_states
        tokens = states[self.feature_layer]
        if self.drop_class_token:
            tokens = tokens[:, 1:]
        return self.head(self.projector(tokens).mean(dim=1))


def pixel_values(
    processor, examples: list[Example], min_side: int, chunk: int = 256
) -> torch.Tensor:
    """Every example's first image through the checkpoint's image processor, once (float16:
    half the memory; 9,557 demo renders at 64 px take 235 MB), decoded as a batch decodes it
    (`min_side` the tower's input size)."""
    values = []
    for start in range(0, len(examples), chunk):
        batch_examples = examples[start : start + chunk]
        images = [load_image(e.images[0], min_side) for e in batch_examples]
        batch = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        values.append(batch.to(torch.float16))
    return torch.cat(values)


def pretrain_tower(
    llava,
    processor,
    examples: list[Example],
    *,
    epochs: int,
    batch_size: int = 32,
    lr: float = 3e-4,
    warmup_steps: int = 100,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> TowerResult:
    """Train `llava`'s vision tower, in place, on `examples` (image_to_pose: the first image
    and pose of each), its images through `processor`. Nothing else of `llava` changes."""
    log = log or (lambda message: None)
    examples = [e for e in examples if e.images and e.poses]
    if not examples:
        raise ValueError("no image-pose examples to pretrain the vision tower on")
    poses = np.stack([e.poses[0] for e in examples]).astype(np.float32)
    torch.manual_seed(seed)
    model = TowerPoseModel(llava, poses).train()
    pixels = pixel_values(processor, examples, llava.config.vision_config.image_size)
    targets = torch.from_numpy(poses)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    batches = max(1, len(examples) // batch_size)
    started, step, epoch_losses = time.perf_counter(), 0, []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(examples), generator=generator)
        losses = []
        for index in range(batches):
            rows = order[index * batch_size : (index + 1) * batch_size]
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, step / warmup_steps) if warmup_steps else lr
            loss = pose_l1_loss(model(pixels[rows].float()), targets[rows])
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"tower pretraining: the loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(float(np.mean(losses)))
        log(f"tower epoch {epoch}/{epochs}: pose loss {epoch_losses[-1]:.4f}")
    llava.eval()
    seconds = round(time.perf_counter() - started, 1)
    return TowerResult(epochs, step, seconds, epoch_losses[0], epoch_losses[-1])
