"""Forcing `generate` to write a chosen answer, so the chat path can be compared exactly."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from inference_service.modeling_chatpose import ChatPoseModel
from inference_service.prompts import build_prompt, image_prefix, with_answer


class ForceTokens(LogitsProcessor):
    """Makes `generate` emit exactly `tokens`, whatever the model prefers."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.start: int | None = None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.start, len(self.tokens) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[step]] = 0.0
        return forced


def answer_ids(model: ChatPoseModel, question: str, answer: str, n_images: int = 0) -> list[int]:
    """The ids of `answer` as the fast path tokenizes it after the prompt, then EOS."""
    markers = image_prefix(n_images, model.image_token, model.config.mm_use_im_start_end)
    prompt = build_prompt(
        model.template, question, image_markers=markers, pose_token=model.config.pose_token
    )
    prompt_ids = model.tokenizer(prompt).input_ids
    full_ids = model.tokenizer(with_answer(prompt, answer)).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    return full_ids[len(prompt_ids) :] + [model.tokenizer.eos_token_id]
