"""Examples -> token ids, answer labels and pose positions; batches of them -> tensors.

An example is written exactly as the service writes a prompt (`prompts.build_prompt` with the
history, then `prompts.with_answer`), followed by the template's end-of-sequence string
("</s>"), so the model learns to stop after an answer:

    {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>

with one image marker per image at the start of the first user message and every POSE_MARKER
replaced by the checkpoint's pose token.

Labels: a token is an answer token (its label is its own id) when its characters overlap an
assistant answer: each answer of a multi-turn conversation, from the space after "ASSISTANT:"
to its "</s>". Every other position is -100, so only answers are learned. The pose targets go
to the answer's pose tokens, in order; the pose is read from the hidden state one position
before each of them, as `ChatPoseModel` does.

Text is tokenized once, up front (so a bad example fails before training starts); the processor
expands each image marker into its image tokens (here: the same count, done on the ids) and
images are decoded and preprocessed per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from inference_service.checkpoint import ChatPoseConfig
from inference_service.errors import CheckpointError
from inference_service.prompts import (
    POSE_MARKER,
    build_prompt,
    get_template,
    image_prefix,
    with_answer,
)
from inference_service.training.datasets import DatasetError, Example, ImageFile, load_image
from inference_service.training.losses import IGNORE_INDEX
from shared_protocol.pose import camera_to_upright


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]  # image markers already expanded into image tokens
    labels: list[int]  # = input_ids on answer tokens, IGNORE_INDEX elsewhere
    pose_positions: list[int]  # positions of the pose tokens that have a target
    poses: np.ndarray  # (len(pose_positions), 24, 3)
    images: tuple[bytes | ImageFile, ...]
    source: str
    action: int = IGNORE_INDEX  # the index of the example's action in `Encoder.actions`


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (images, 3, S, S)
    pose_rows: torch.Tensor  # (P,) batch row of each pose token
    pose_positions: torch.Tensor  # (P,) its position; the state read is at position - 1
    pose_targets: torch.Tensor  # (P, 24, 3) axis-angle, float32
    pose_actions: torch.Tensor  # (P,) each pose's action index, IGNORE_INDEX for none

    def to(self, device: torch.device, dtype: torch.dtype) -> Batch:
        move = {
            name: getattr(self, name).to(device)
            for name in (
                "input_ids",
                "attention_mask",
                "labels",
                "pose_rows",
                "pose_positions",
                "pose_targets",
                "pose_actions",
            )
        }
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, dtype)
        return Batch(pixel_values=pixels, **move)


def render(example: Example, config: ChatPoseConfig, image_token: str) -> tuple[str, list]:
    """The example's full text and the character spans [start, end) of its answers."""
    template = get_template(config.conversation_template)
    markers = image_prefix(len(example.images), image_token, config.mm_use_im_start_end)
    exchanges = [(t.user, t.assistant) for t in example.history]
    exchanges.append((example.question, example.answer))
    history = example.history
    spans = []
    for index, (user, answer) in enumerate(exchanges):
        prefix = build_prompt(template, user, history[:index], markers, config.pose_token)
        answer = answer.replace(POSE_MARKER, config.pose_token)
        # From the space with_answer puts after "ASSISTANT:": a tokenizer that makes it a
        # token of its own must learn to write it too.
        start = len(prefix)
        spans.append((start, start + 1 + len(answer) + len(template.sep2)))
    text = with_answer(prefix, answer) + template.sep2
    for start, end in spans:  # guards against a change in the template code
        if not text[start:end].endswith(template.sep2):
            raise RuntimeError(f"{example.source}: answer spans do not match the rendered text")
    return text, spans


class Encoder:
    """Turns Examples into EncodedExamples and batches for one checkpoint's processor."""

    def __init__(
        self,
        processor,
        config: ChatPoseConfig,
        pose_token_id: int,
        max_length: int,
        actions: Sequence[str] = (),
    ) -> None:
        """`actions`: the action names the auxiliary action loss tells apart, in index order."""
        self.processor = processor
        self.actions = tuple(actions)
        self.tokenizer = processor.tokenizer
        self.config = config
        self.pose_token_id = pose_token_id
        self.max_length = max_length
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.tokens_per_image = self._count_image_tokens()

    def _count_image_tokens(self) -> int:
        side = self.config.image_size
        probe = self.processor(
            text=[self.image_token], images=[Image.new("RGB", (side, side))], return_tensors="pt"
        )
        return int((probe["input_ids"][0] == self.image_token_id).sum())

    def encode(self, example: Example) -> EncodedExample:
        where = example.source or "example"
        if len(example.images) > self.config.max_images:
            raise DatasetError(
                f"{where}: {len(example.images)} images; the checkpoint's chatpose.json allows "
                f"max_images={self.config.max_images}"
            )
        texts = [example.question, example.answer]
        texts += [t.user for t in example.history] + [t.assistant for t in example.history]
        if any(self.image_token in text for text in texts):
            raise DatasetError(f"{where}: the text contains the image marker {self.image_token!r}")
        text, spans = render(example, self.config, self.image_token)
        encoded = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        input_ids: list[int] = []
        labels: list[int] = []
        for token, (start, end) in zip(
            encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            if token == self.image_token_id:
                input_ids += [token] * self.tokens_per_image
                labels += [IGNORE_INDEX] * self.tokens_per_image
                continue
            in_answer = end > start and any(start < b and end > a for a, b in spans)
            input_ids.append(token)
            labels.append(token if in_answer else IGNORE_INDEX)
        if len(input_ids) > self.max_length:
            raise DatasetError(
                f"{where}: {len(input_ids)} tokens, more than the maximum length {self.max_length}"
            )
        pose_positions = [
            i
            for i, (token, label) in enumerate(zip(input_ids, labels, strict=True))
            if token == self.pose_token_id and label != IGNORE_INDEX
        ]
        markers = example.answer.count(POSE_MARKER) + sum(
            t.assistant.count(POSE_MARKER) for t in example.history
        )
        if len(pose_positions) != markers:
            raise DatasetError(
                f"{where}: {markers} pose markers became {len(pose_positions)} pose tokens "
                f"(is {self.config.pose_token!r} a single token of this tokenizer?)"
            )
        if not example.poses:
            pose_positions = []
        poses = (
            np.stack(example.poses).astype(np.float32)
            if example.poses
            else np.zeros((0, 24, 3), np.float32)
        )
        if self.config.pose_orientation == "camera":
            # The data's poses are upright; this head gives them in the camera's frame (the
            # service turns them back). The half turn is its own inverse.
            poses[:, 0] = camera_to_upright(poses[:, 0])
        action = (
            self.actions.index(example.action) if example.action in self.actions else IGNORE_INDEX
        )
        return EncodedExample(
            input_ids, labels, pose_positions, poses, example.images, where, action
        )

    def check_against_processor(self, example: Example, encoded: EncodedExample) -> None:
        """Our ids must be the processor's: it is what the service runs at inference."""
        text, _ = render(example, self.config, self.image_token)
        images = [self._decode(image) for image in example.images] or None
        reference = self.processor(text=[text], images=images, return_tensors="pt")["input_ids"]
        if reference[0].tolist() != encoded.input_ids:  # training would teach other tokens
            raise CheckpointError(
                f"{encoded.source}: the training tokenization differs from what this checkpoint's "
                "processor makes of the same prompt, which is what the service runs; its "
                "tokenizer is not one this trainer supports"
            )

    def _decode(self, image: bytes | ImageFile) -> Image.Image:
        return load_image(image, min_side=self.config.image_size)

    def collate(self, items: Sequence[EncodedExample]) -> Batch:
        length = max(len(item.input_ids) for item in items)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        input_ids = torch.full((len(items), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        rows, positions, targets, actions, images = [], [], [], [], []
        for row, item in enumerate(items):
            size = len(item.input_ids)
            input_ids[row, :size] = torch.tensor(item.input_ids)
            attention_mask[row, :size] = 1
            labels[row, :size] = torch.tensor(item.labels)
            rows += [row] * len(item.pose_positions)
            positions += item.pose_positions
            targets.append(item.poses)
            actions += [item.action] * len(item.pose_positions)
            images += [self._decode(image) for image in item.images]
        pixel_values = None
        if images:
            pixel_values = self.processor.image_processor(images=images, return_tensors="pt")[
                "pixel_values"
            ]
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            pixel_values=pixel_values,
            pose_rows=torch.tensor(rows, dtype=torch.long),
            pose_positions=torch.tensor(positions, dtype=torch.long),
            pose_targets=torch.from_numpy(np.concatenate(targets)).float(),
            pose_actions=torch.tensor(actions, dtype=torch.long),
        )
