"""ChatPoseModel: a LLaVA-family model plus the SMPL pose head, loaded from a checkpoint.

Two ways to get poses:

- `predict_poses`, the fast path: the answer template ("Sure, it is <POSE>.") is appended to the
  prompt and the whole batch goes through ONE forward pass; no decoding.
- `chat`, the chat path: `generate` with the KV cache writes a free reply, and every pose token
  it emits yields a pose.

The fast path reads every prompt's shared beginning (the system prompt and the first user
role, more than half of a short text prompt) from key/value states computed once per model,
and runs the forward pass over the rest only.

Either way a pose comes from the final layer's hidden state (after the final norm) at the
position BEFORE a pose token, i.e. the state that predicts the pose token.

Any transformers image-text-to-text model whose processor expands its image marker into image
tokens (as LlavaProcessor does) and whose base model returns `last_hidden_state` works; the
reference is `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import DynamicCache, DynamicLayer

from inference_service.checkpoint import (
    ChatPoseConfig,
    Checkpoint,
    read_json_object,
    refuse_lfs_pointers,
)
from inference_service.errors import (
    CheckpointError,
    EmptyPromptError,
    MissingDependencyError,
    ModelError,
    ModelOutOfMemoryError,
    UnsupportedInputError,
)
from inference_service.images import decode_image
from inference_service.pose_head import PoseHead, decode_pose
from inference_service.prompts import (
    POSE_MARKER,
    Turn,
    build_prompt,
    conversation_prefix,
    get_template,
    image_prefix,
    pose_exchange,
    with_answer,
)
from shared_protocol.pose import camera_to_upright

log = logging.getLogger(__name__)
DEFAULT_MAX_NEW_TOKENS = 256
# The release generated up to 512 tokens; more is refused so one request cannot hog the GPU.
MAX_NEW_TOKENS_LIMIT = 512


@dataclass(frozen=True)
class PoseRequest:
    """One fast-path request: a description, PNG/JPEG image bytes, or both."""

    text: str | None = None
    images: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class PrefixStates:
    """The key/value states of the text every prompt starts with (`conversation_prefix`)."""

    input_ids: torch.Tensor  # (1, length)
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), batch 1

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def matches(self, input_ids: torch.Tensor) -> bool:
        """Whether every row starts with the prefix's tokens and has more after them."""
        n = self.length
        return input_ids.shape[1] > n and bool((input_ids[:, :n] == self.input_ids).all())

    def cache(self, batch: int, config) -> DynamicCache:
        """A cache holding the prefix for `batch` rows, which keeps nothing of the pass that
        reads it (`_PrefixLayer`)."""
        cache = DynamicCache(
            ddp_cache_data=[
                (keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
                for keys, values in self.layers
            ],
            config=config,
        )
        for layer in cache.layers:
            if type(layer) is DynamicLayer:  # a sliding-window layer stays as it is
                layer.__class__ = _PrefixLayer
        return cache


class _PrefixLayer(DynamicLayer):
    """A cache layer of the shared prefix. Attention reads the prefix's states with the new
    tokens' ones, which are not kept: nothing reads them again, and keeping them held every
    layer's keys and values of the batch to the end of the pass (gigabytes on a 13B model)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys = torch.cat([self.keys, key_states], dim=-2)
        return keys, torch.cat([self.values, value_states], dim=-2)


@dataclass(frozen=True)
class ChatReply:
    """The reply text (pose tokens written as POSE_MARKER) and one pose per pose token."""

    text: str
    poses: list[np.ndarray]  # each (24, 3) axis-angle; index 0 the global orientation
    truncated: bool = False  # cut at max_new_tokens before the model ended it


# What loading a damaged or mismatched checkpoint raises (a truncated safetensors file, a bad
# JSON config, a weight of the wrong shape, a config field of the wrong type, which
# huggingface_hub's strict config classes refuse with errors of their own), to be reported as
# a CheckpointError naming it.
LOAD_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    SafetensorError,
    StrictDataclassError,
)


class _StopWhen(StoppingCriteria):
    """Ends generation once `stop()` is true."""

    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.stop()), device=input_ids.device)


def _request_entry(method: Callable) -> Callable:
    """A method that answers requests: it runs with the model's GPU as the current one (the
    scheduler's thread is not the one that loaded the model, and the current device is per
    thread; bitsandbytes' kernels run on it), and its CUDA out-of-memory error (moving inputs,
    the LM, generation, the head) becomes a ModelError, after the failed pass's memory is let
    go, so that the next request, or the scheduler's one-by-one retry, has it back."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else None
        try:
            with on_device or contextlib.nullcontext():
                return method(self, *args, **kwargs)
        except torch.OutOfMemoryError as error:
            error.__traceback__ = None  # its frames hold the failed pass's tensors
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # for other processes on the card, too
        raise ModelOutOfMemoryError("out of GPU memory: send fewer or shorter requests")

    return guarded


class ChatPoseModel:
    """Load with `ChatPoseModel.from_checkpoint(path)`; the constructor takes loaded parts."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        head: PoseHead,
        config: ChatPoseConfig,
        max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
    ):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Right padding keeps every row's positions as if it were alone, so a batched row gives
        # the same hidden states as the same request on its own (causal attention never looks
        # at the padding to the right).
        self.tokenizer.padding_side = "right"
        self.config = config
        self.template = get_template(config.conversation_template)
        self.max_new_tokens_limit = max_new_tokens_limit
        self.device = model.device
        self.dtype = model.dtype
        self.head = head.to(self.device).eval()
        self.image_token = processor.image_token
        self.pose_token_id = ensure_pose_token(self.tokenizer, model, config.pose_token)
        check_pose_token(self.tokenizer, self.pose_token_id, config, self.image_token)
        image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        configured = getattr(model.config, "image_token_id", image_token_id)
        if configured != image_token_id:  # else every request with an image fails
            raise CheckpointError(
                f"base/config.json: image_token_id is {configured}, but the tokenizer's "
                f"{self.image_token} is {image_token_id} (a config of another tokenizer?)"
            )
        if config.mm_use_im_start_end:
            for token in ("<im_start>", "<im_end>"):
                if token not in self.tokenizer.get_vocab():
                    raise CheckpointError(
                        f"chatpose.json sets mm_use_im_start_end but the tokenizer has no {token}"
                    )
        _check_image_size(processor, config.image_size)
        lm_width = model.config.text_config.hidden_size
        if config.hidden_size != lm_width:  # else every request fails in the head's first layer
            raise CheckpointError(
                f"chatpose.json: hidden_size is {config.hidden_size}, but the language model's "
                f"states are {lm_width} wide"
            )
        # The backbone returns the final norm's output without computing logits for every
        # position; under a peft wrapper the LoRA layers sit inside it, so it still applies them.
        language_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._backbone = language_model.base_model
        self._prefix: PrefixStates | None = None  # computed on first use; the weights are fixed
        self._cache_keyword = _cache_keyword(self._backbone)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
    ) -> ChatPoseModel:
        """Load a checkpoint directory (docs/checkpoints.md), from local files only.

        device: "auto" (CUDA when available, else CPU), "cpu" or "cuda[:N]". CUDA runs in
        bfloat16 (float16 on cards before compute capability 8.0), CPU in float32.
        load_in_4bit/8bit quantize the LLM with bitsandbytes (CUDA only); a LoRA adapter is
        then applied unmerged.
        """
        checkpoint = Checkpoint.open(path)
        torch_device, dtype = select_device(device)
        if (load_in_4bit or load_in_8bit) and torch_device.type != "cuda":
            raise UnsupportedInputError("4-bit and 8-bit loading need a CUDA device")
        quantization = _quantization_config(load_in_4bit, load_in_8bit, dtype)
        if torch_device.type == "cuda" and torch_device.index is not None:
            # Kernels that run on "the current device" (bitsandbytes') must find this one.
            torch.cuda.set_device(torch_device)
        if torch_device.type == "cpu":
            check_host_memory(checkpoint.base_dir, dtype)
        else:
            bits = 4 if load_in_4bit else 8 if load_in_8bit else None
            check_gpu_memory(checkpoint.base_dir, dtype, torch_device, bits)
        processor, model = load_base(
            checkpoint.base_dir,
            dtype=dtype,
            device_map=str(torch_device),
            quantization_config=quantization,
        )
        # The pose token must exist before an adapter is loaded: the adapter may carry trained
        # rows for it in the resized embeddings.
        pose_token = checkpoint.config.pose_token
        check_vocabulary(processor.tokenizer, model, pose_token, checkpoint.base_dir)
        try:  # a model that barely fits: each step below puts a little more on the card
            ensure_pose_token(processor.tokenizer, model, pose_token)
            if checkpoint.adapter_dir is not None:
                try:
                    model = apply_adapter(model, checkpoint.adapter_dir, merge=quantization is None)
                except torch.OutOfMemoryError:
                    raise ModelError(
                        f"{checkpoint.adapter_dir}: out of GPU memory merging the adapter into "
                        "the model; --load-in-8bit or --load-in-4bit apply it unmerged, in less "
                        "memory"
                    ) from None
            head = PoseHead.load(checkpoint.head_path, checkpoint.config)
            return cls(model, processor, head, checkpoint.config, max_new_tokens_limit)
        except torch.OutOfMemoryError:
            raise ModelError(
                f"{path}: out of GPU memory setting up the loaded model (its pose token, its "
                "pose head); --load-in-8bit or --load-in-4bit need less, or use a card with "
                "more memory"
            ) from None

    # --- fast path ---------------------------------------------------------------------

    @_request_entry
    def predict_poses(self, requests: Sequence[PoseRequest]) -> list[np.ndarray]:
        """One (24, 3) axis-angle pose per request, from one forward pass over the batch."""
        if not requests:
            return []
        return self._poses(self.pose_states(requests))

    @_request_entry
    def given_answer_poses(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        rows: torch.Tensor,
        positions: torch.Tensor,
    ) -> list[np.ndarray]:
        """The poses of the pose tokens at (`rows`, `positions`) of token rows that hold whole
        exchanges, their answers given (as training encodes examples): each from the state
        before its token, as the fast path reads it after its forced answer template."""
        pixels = None if pixel_values is None else pixel_values.to(self.device, self.dtype)
        with torch.inference_mode():
            hidden = self._backbone(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                pixel_values=pixels,
                use_cache=False,
            ).last_hidden_state
        return self._poses(hidden[rows.to(self.device), positions.to(self.device) - 1])

    @_request_entry
    def pose_states(self, requests: Sequence[PoseRequest]) -> torch.Tensor:
        """(len(requests), H): the final-layer state before each request's pose token, with the
        answer template forced (what the SMPL head reads on the fast path)."""
        texts: list[str] = []
        images: list[Image.Image] = []
        for request in requests:
            decoded = self._decode_images(request.images)
            self._check_text(request.text or "", "prompt")
            try:
                question, answer = pose_exchange(
                    request.text, bool(decoded), self.config.pose_token, self.config.prompt_wording
                )
            except ValueError as exc:
                raise EmptyPromptError(str(exc)) from None
            prompt = build_prompt(
                self.template,
                question,
                image_markers=self._image_markers(len(decoded)),
                pose_token=self.config.pose_token,
            )
            texts.append(with_answer(prompt, answer))
            images.extend(decoded)
        if not texts:
            return torch.zeros((0, self.config.hidden_size), device=self.device)
        inputs = self._encode(texts, images)
        input_ids = inputs["input_ids"]
        lengths = inputs["attention_mask"].sum(dim=1)
        if int(lengths.max()) > self.context_length:  # the scheduler retries the others alone
            raise UnsupportedInputError(
                f"prompt: {int(lengths.max())} tokens with the answer and its images; this "
                f"model reads {self.context_length}"
            )
        # The answer template ends with the only pose token of the answer: take each row's last
        # pose token, so one typed by the user in the description cannot be picked instead.
        is_pose = input_ids == self.pose_token_id
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(is_pose, positions, -1).max(dim=1).values
        if (last < 1).any():
            raise ModelError("the tokenized answer template has no pose token")
        # Attention is causal, so the states read never depend on the tokens from the pose
        # token on: the pass stops before them.
        end = int(last.max())
        inputs = dict(inputs, input_ids=input_ids[:, :end])
        inputs["attention_mask"] = inputs["attention_mask"][:, :end]
        with torch.inference_mode():
            hidden, offset = self._final_states(inputs)
        return hidden[torch.arange(len(texts), device=hidden.device), last - 1 - offset]

    def _final_states(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The backbone's final states and the position of their first column: past the shared
        prefix when every row starts with it, else 0 (the whole input is run)."""
        prefix = self._prefix_states()
        input_ids = inputs["input_ids"]
        if not prefix.matches(input_ids):  # no cache: nothing reads these states again
            return self._backbone(**inputs, use_cache=False).last_hidden_state, 0
        rest = dict(inputs, input_ids=input_ids[:, prefix.length :])
        rest[self._cache_keyword] = prefix.cache(input_ids.shape[0], self.model.config)
        return self._backbone(**rest).last_hidden_state, prefix.length

    @property
    def cached_prefix_length(self) -> int:
        """Tokens at the start of every prompt whose states the fast path computes once per
        model (computing them on first use)."""
        return self._prefix_states().length

    def _prefix_states(self) -> PrefixStates:
        if self._prefix is None:
            text = conversation_prefix(self.template)
            input_ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(self.device)
            cache = DynamicCache(config=self.model.config)
            self._backbone(input_ids=input_ids, use_cache=True, **{self._cache_keyword: cache})
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            self._prefix = PrefixStates(input_ids, layers)
        return self._prefix

    # --- chat path ---------------------------------------------------------------------

    @_request_entry
    def chat(
        self,
        prompt: str,
        images: Sequence[bytes] = (),
        history: Sequence[Turn] = (),
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        logits_processor: Sequence[LogitsProcessor] = (),
        stop: Callable[[], bool] | None = None,
    ) -> ChatReply:
        """A free reply to `prompt` after `history` (greedy decoding, KV cache on).

        The server is stateless: `images` are the conversation's images, re-sent every turn, and
        go into its first user message. The oldest turns of `history` are left out when the
        conversation and the reply would not fit the model's context (`fitting_history`).
        `logits_processor` lets a caller steer decoding (tests force an answer with it).
        `stop`, asked before each new token, ends the reply early when true (its request was
        cancelled: a long reply would hold the model, and every request behind it, for nothing).
        """
        if not 1 <= max_new_tokens <= self.max_new_tokens_limit:
            raise UnsupportedInputError(
                f"max_new_tokens must be between 1 and {self.max_new_tokens_limit}, "
                f"got {max_new_tokens}"
            )
        decoded = self._decode_images(images)
        if not prompt.strip() and not decoded:
            raise EmptyPromptError("a chat message needs text, an image, or both")
        self._check_text(prompt, "prompt")
        for index, turn in enumerate(history):  # named as the request's turns are numbered
            self._check_text(turn.user, f"history[{2 * index}].text")
            self._check_text(turn.assistant, f"history[{2 * index + 1}].text")
        history = self.fitting_history(prompt, history, decoded, max_new_tokens)
        text = build_prompt(
            self.template,
            prompt,
            history,
            self._image_markers(len(decoded)),
            self.config.pose_token,
        )
        inputs = self._encode([text], decoded)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,  # whatever the base's generation config says: one reply
                use_cache=True,
                output_hidden_states=False,  # every layer at every step: 0.5 GB on a 13B model
                return_dict_in_generate=True,
                logits_processor=LogitsProcessorList(logits_processor),
                stopping_criteria=StoppingCriteriaList([_StopWhen(stop)] if stop else []),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        generated = output.sequences[0, inputs["input_ids"].shape[1] :]
        if stop is not None and stop():  # cancelled: no pass over the prompt for its poses
            return ChatReply(self._render(generated.tolist()), [])
        states = self._reply_pose_states(inputs, generated)
        poses = self._poses(states) if len(states) else []
        ended = len(generated) and int(generated[-1]) in self._end_token_ids()
        truncated = len(generated) >= max_new_tokens and not ended
        return ChatReply(self._render(generated.tolist()), poses, truncated)

    def _end_token_ids(self) -> set[int]:
        """The tokens that end a reply: the tokenizer's end of sequence, and the generation
        config's (one id or several)."""
        ends = self.model.generation_config.eos_token_id
        ends = set(ends if isinstance(ends, list | tuple) else [ends])
        return {int(i) for i in ends | {self.tokenizer.eos_token_id} if i is not None}

    def _reply_pose_states(
        self, inputs: dict[str, torch.Tensor], generated: torch.Tensor
    ) -> torch.Tensor:
        """(pose tokens in the reply, H): the final-layer state before each pose token the reply
        generated, from a pass over the prompt (with its images) and then, on its key/value
        cache, one over the reply up to its last pose token, as generation reads them.

        Generation could keep these states itself, but only by keeping every layer's states at
        every step; and how many forwards a generation makes (a chunked prefill, prompt lookup)
        is the generation config's business, while one token's position in the sequence is not.
        """
        is_pose = (generated == self.pose_token_id).nonzero().flatten()
        if not len(is_pose):
            return torch.zeros((0, self.config.hidden_size), device=self.device)
        reply = generated[None, : int(is_pose[-1])]  # causal: the last pose token is not needed
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            prompt = self._backbone(**inputs, use_cache=True, **{self._cache_keyword: cache})
            states = [prompt.last_hidden_state[:, -1:]]  # the state before the reply's first token
            if reply.shape[1]:
                # No images here: the reply's tokens are text, whatever they spell (an image
                # token in it is an embedding, as in generation).
                mask = torch.ones(
                    (1, inputs["input_ids"].shape[1] + reply.shape[1]),
                    dtype=inputs["attention_mask"].dtype,
                    device=reply.device,
                )
                rest = self._backbone(
                    input_ids=reply, attention_mask=mask, use_cache=True,
                    **{self._cache_keyword: cache},
                )  # fmt: skip
                states.append(rest.last_hidden_state)
        return torch.cat(states, dim=1)[0, is_pose]

    @property
    def context_length(self) -> int:
        """The most tokens the LM reads: a chat's prompt and its reply together."""
        return self.model.config.text_config.max_position_embeddings

    def fitting_history(
        self,
        prompt: str,
        history: Sequence[Turn],
        images: Sequence[Image.Image],
        max_new_tokens: int,
    ) -> Sequence[Turn]:
        """The latest turns of `history` that leave `max_new_tokens` of the context for the
        reply; the oldest go first, as chat front-ends do (the images move to the first turn
        kept). UnsupportedInputError when the message alone, with its images, leaves no room."""
        budget = self.context_length - max_new_tokens

        def length(kept: int) -> int:
            text = build_prompt(
                self.template,
                prompt,
                history[len(history) - kept :],
                self._image_markers(len(images)),
                self.config.pose_token,
            )
            encoded = self.processor(text=[text], images=list(images) or None, return_tensors="pt")
            return encoded["input_ids"].shape[1]

        if length(len(history)) <= budget:
            return history
        if (alone := length(0)) > budget:
            raise UnsupportedInputError(
                f"prompt: the message is {alone} tokens with its images; this model reads "
                f"{self.context_length}, of which {max_new_tokens} are kept for the reply"
            )
        fits, too_long = 0, len(history)  # turns kept: a binary search between the two
        while too_long - fits > 1:
            middle = (fits + too_long) // 2
            if length(middle) <= budget:
                fits = middle
            else:
                too_long = middle
        # In the service's log: the client's own limits are not the model's context.
        log.info(
            "chat: the %d latest of %d earlier exchanges fit this model's context of %d tokens",
            fits,
            len(history),
            self.context_length,
        )
        return history[len(history) - fits :]

    # --- helpers -----------------------------------------------------------------------

    def _decode_images(self, images: Sequence[bytes]) -> list[Image.Image]:
        if len(images) > self.config.max_images:
            raise UnsupportedInputError(
                f"{len(images)} images given; this model takes at most {self.config.max_images}"
            )
        return [
            decode_image(data, f"images[{k}]", min_side=self.config.image_size)
            for k, data in enumerate(images)
        ]

    def _check_text(self, text: str, field: str) -> None:
        # A literal image marker would be expanded into image tokens with no image behind them.
        if self.image_token in text:
            raise UnsupportedInputError(
                f"{field}: must not contain the image marker {self.image_token!r}"
            )

    def _image_markers(self, count: int) -> str:
        return image_prefix(count, self.image_token, self.config.mm_use_im_start_end)

    def _encode(self, texts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        encoded = self.processor(
            text=texts, images=images or None, padding=True, return_tensors="pt"
        )
        inputs = {name: value.to(self.device) for name, value in encoded.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _poses(self, states: torch.Tensor) -> list[np.ndarray]:
        """The poses of pose states, upright whatever frame the head gives them in."""
        # The head runs in float32 whatever the LLM's dtype: it is small, and bf16 rounding
        # would show in the rotations.
        with torch.inference_mode():
            output = self.head(states.to(self.device, torch.float32))
        poses = decode_pose(output.cpu().numpy())
        poses[:, self.config.posed_joints :] = 0.0  # joints the head was not trained for
        if self.config.pose_orientation == "camera":
            poses[:, 0] = camera_to_upright(poses[:, 0])
        return list(poses)

    def _render(self, token_ids: list[int]) -> str:
        """Reply text without end-of-sequence/padding, pose tokens written as POSE_MARKER."""
        hidden = set(self.tokenizer.all_special_ids) - {self.pose_token_id}
        text = self.tokenizer.decode(
            [t for t in token_ids if t not in hidden], skip_special_tokens=False
        )
        text = text.replace(self.config.pose_token, POSE_MARKER)
        # A pose token that takes the spaces around it (the release's does) still reads as a
        # word in English text.
        marker = re.escape(POSE_MARKER)
        text = re.sub(rf"(?<=[A-Za-z0-9]){marker}", f" {POSE_MARKER}", text)
        return re.sub(rf"{marker}(?=[A-Za-z0-9])", f"{POSE_MARKER} ", text).strip()


def _cache_keyword(backbone: torch.nn.Module) -> str:
    """The name `backbone.forward` takes a KV cache by: transformers 5.24 renamed
    `past_key_values` to `cache`."""
    parameters = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def select_device(device: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise UnsupportedInputError(
            f"device must be auto, cpu or cuda[:N], got {device!r}"
        ) from None
    if torch_device.type == "cpu":
        return torch_device, torch.float32
    if torch_device.type != "cuda":
        raise UnsupportedInputError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if not torch.cuda.is_available():
        raise UnsupportedInputError(
            f"device {device!r} requested but CUDA is not available (no GPU, or a CPU build of "
            "torch); use --device cpu or auto, or a CUDA build of torch (README, Setup in detail)"
        )
    count = torch.cuda.device_count()
    if torch_device.index is None:
        # A bare "cuda" is the current device for torch, but cuda:$LOCAL_RANK for transformers'
        # device_map: named, the model and what is put beside it share one card.
        torch_device = torch.device("cuda", torch.cuda.current_device())
    if torch_device.index >= count:
        raise UnsupportedInputError(
            f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}"
        )
    # bf16 in hardware from compute capability 8.0 (Ampere); older cards (V100, T4) only
    # emulate it, far slower than their float16.
    native_bf16 = torch.cuda.get_device_capability(torch_device) >= (8, 0)
    return torch_device, torch.bfloat16 if native_bf16 else torch.float16


# The vision side and the output layer stay unquantized, as in the release. transformers 5
# matches these from the start of a module's name (model.vision_tower...), or as its end.
UNQUANTIZED_MODULES = (r".*vision_tower", r".*multi_modal_projector", "lm_head")


def _quantization_config(
    load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    if load_in_4bit and load_in_8bit:
        raise UnsupportedInputError("choose one of load_in_4bit and load_in_8bit")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401  (only to check it is installed)
    except ImportError as exc:
        flag = "load_in_4bit" if load_in_4bit else "load_in_8bit"
        raise MissingDependencyError(
            f"{flag} needs the 'bitsandbytes' package, which is not installed "
            f"(pip install bitsandbytes)"
        ) from exc
    skip = list(UNQUANTIZED_MODULES)
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def ensure_pose_token(tokenizer, model: torch.nn.Module, token: str) -> int:
    """The id of `token`, adding it (and an embedding row) when the tokenizer lacks it.

    The id comes from convert_tokens_to_ids: tokenizing the string can return a "▁" piece
    instead of the added id with SentencePiece tokenizers.
    """
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    old_size = model.get_input_embeddings().weight.shape[0]
    if token_id >= old_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # New rows start as the mean of the old ones: deterministic, so two loads of the same
        # checkpoint agree, and a neutral start for an untrained token.
        with torch.no_grad():
            for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
                weight = embedding.weight
                weight[old_size:] = weight[:old_size].mean(dim=0)
    return token_id


def check_pose_token(tokenizer, pose_token_id: int, config, image_token: str) -> None:
    """CheckpointError when chatpose.json's pose token cannot mark the state the head reads: a
    token the tokenizer uses for something else (padding: a short row of a batch would read a
    padding position; the image marker; the sequence's start or end), or one the answer
    templates do not tokenize to exactly once (an ordinary word, split otherwise in context)."""
    roles = {
        "padding": tokenizer.pad_token_id,
        "beginning-of-sequence": tokenizer.bos_token_id,
        "end-of-sequence": tokenizer.eos_token_id,
        "image": tokenizer.convert_tokens_to_ids(image_token),
    }
    for role, token_id in roles.items():
        if token_id == pose_token_id:
            raise CheckpointError(
                f"chatpose.json: pose_token {config.pose_token!r} is the tokenizer's {role} "
                "token; give the pose its own token (the release's: <POSE>)"
            )
    for has_image in (False, True):
        _, answer = pose_exchange("x", has_image, config.pose_token, config.prompt_wording)
        ids = tokenizer(answer, add_special_tokens=False).input_ids
        if ids.count(pose_token_id) != 1:
            raise CheckpointError(
                f"chatpose.json: pose_token {config.pose_token!r} is not one token of the "
                f"answer {answer!r} (tokenized, it appears {ids.count(pose_token_id)} times); "
                "give the pose a token of its own (the release's: <POSE>)"
            )


SERVE_ON_GPU = "run it on a GPU (--device cuda, with --load-in-8bit or --load-in-4bit for less)"
QUANTIZE_ON_GPU = "--load-in-8bit or --load-in-4bit need less, or use a card with more memory"


def check_host_memory(base_dir: Path, dtype: torch.dtype, advice: str = SERVE_ON_GPU) -> None:
    """A ModelError, before loading, when the weights in `dtype` need more memory than the
    machine has free: the operating system would otherwise kill the process midway, with no
    word on why (a 13B model is 52 GB in float32, the CPU's dtype). `advice`: what to do
    instead, in the words of the command that loads it."""
    needed = weights_bytes(base_dir, dtype)
    free = free_host_memory()
    if needed is None or free is None or needed <= free:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    raise ModelError(
        f"{base_dir}: the model needs about {needed / 1e9:.1f} GB of memory in {dtype_name} "
        f"on the CPU, and this machine has {free / 1e9:.1f} GB free; {advice}"
    )


def check_gpu_memory(
    base_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    bits: int | None = None,
    advice: str = QUANTIZE_ON_GPU,
) -> None:
    """A ModelOutOfMemoryError, before loading, when the weights alone need more than the card
    has free: a full load would fail midway, and a quantized one is reported by transformers as
    a failed weight conversion, as if the checkpoint were broken. `bits`: 8 or 4 for a
    quantized load (counted for every weight: the vision side left in `dtype` is small)."""
    needed = weights_bytes(base_dir, dtype)
    if needed is None:
        return
    if bits:
        needed = needed * bits // (8 * dtype.itemsize)
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= free:
        return
    how = f"{bits}-bit" if bits else str(dtype).removeprefix("torch.")
    raise ModelOutOfMemoryError(
        f"{base_dir}: the weights need about {needed / 1e9:.1f} GB in {how}, and {device} has "
        f"{free / 1e9:.1f} GB free; {advice}"
    )


def weights_bytes(base_dir: Path, dtype: torch.dtype) -> int | None:
    """What the base model's safetensors weights take in `dtype`, from their headers alone;
    None for weights in another format, or whose headers do not read (`check_base_files`
    names those)."""
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        return None
    elements = 0
    try:
        for file in files:
            with safe_open(file, framework="pt") as weights:
                for name in weights.keys():
                    elements += math.prod(weights.get_slice(name).get_shape())
    except (OSError, SafetensorError):
        return None
    return elements * dtype.itemsize


def check_base_files(base_dir: Path) -> None:
    """A CheckpointError naming a file of `base_dir` that transformers would fail on without
    naming it: a JSON file that does not parse or is no object (a list read with .get), a
    safetensors file whose header does not read (truncated, empty)."""
    for file in sorted(Path(base_dir).glob("*.json")):
        read_json_object(file)
    for file in sorted(Path(base_dir).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def free_host_memory() -> int | None:
    """Bytes the machine can still give a process, swap included, and no more than its cgroup
    allows (a container's memory limit, which /proc/meminfo does not show: the kernel kills
    the process there); Linux only, None elsewhere."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE))
    if "MemAvailable" not in fields:
        return None
    free = (int(fields["MemAvailable"]) + int(fields.get("SwapFree", 0))) * 1024
    left = cgroup_memory_left()
    return free if left is None else min(free, left)


# A cgroup limit past this is none (v1 writes its "unlimited" as a page-rounded 2**63).
_NO_LIMIT = 1 << 60


def cgroup_memory_left(
    root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup"
) -> int | None:
    """Bytes this process's memory cgroups still allow it, or None when none sets a limit (or
    none can be read): the least, over its group and each group above it (a parent's limit
    holds its other groups' use too), of the limit minus what is charged there, less the file
    cache the kernel reclaims first (``inactive_file``, as kubelet counts a working set: the
    cache a model's earlier load left is charged, and free to use). /proc/self/cgroup names
    the group; inside a container the group is the root of its own view."""
    try:  # a group's name is bytes, as a file name is
        lines = os.fsdecode(Path(membership).read_bytes()).splitlines()
    except OSError:
        return None
    lefts = []
    for line in lines:
        hierarchy, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:  # v2's one hierarchy
            base, files = Path(root), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = Path(root, "memory")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        if ".." in Path(group).parts:  # outside this namespace's view: nothing to read
            continue
        folder = base / group.strip("/")
        for level in dict.fromkeys([folder, *folder.parents]):
            if level == base or base in level.parents:
                lefts.append(_cgroup_left(level, *files))
    lefts = [left for left in lefts if left is not None]
    return min(lefts, default=None)


def _cgroup_left(folder: Path, limit_name: str, usage_name: str, cache_key: str) -> int | None:
    """What the cgroup at ``folder`` still allows (see ``cgroup_memory_left``); None without
    a limit or files to read."""
    try:
        limit_text = (folder / limit_name).read_text().strip()
        usage = int((folder / usage_name).read_text())
    except (OSError, ValueError):  # ValueError: not a number, or not UTF-8
        return None
    try:
        text = (folder / "memory.stat").read_text()
    except (OSError, ValueError):  # no cache to take off
        text = ""
    stat = dict(fields[:2] for fields in map(str.split, text.splitlines()) if len(fields) >= 2)
    limit = int(limit_text) if limit_text.isdigit() else _NO_LIMIT
    if limit >= _NO_LIMIT:
        return None
    cache = int(stat[cache_key]) if stat.get(cache_key, "").isdigit() else 0
    return max(0, limit - max(0, usage - cache))


def load_base(
    base_dir: Path, *, advice: str = QUANTIZE_ON_GPU, **options
) -> tuple[object, torch.nn.Module]:
    """The processor and the LLaVA model in `base_dir`, from local files only; `options` go to
    `from_pretrained` (dtype, device_map, quantization_config). `advice`: what needs less
    memory when the model does not fit on the GPU, in the words of the command loading it.

    A CheckpointError names what is wrong, including a weight the files lack: transformers
    would start it at random, and the model would answer with nonsense poses.
    """
    refuse_lfs_pointers(base_dir)
    check_base_files(base_dir)
    check_tokenizer_files(base_dir)
    check_model_type(base_dir / "config.json")
    try:
        # trust_remote_code=False: a checkpoint's own Python (`auto_map`) is never run, and
        # transformers does not ask on stdin whether to run it (the add-on's stdin is a pipe).
        processor = AutoProcessor.from_pretrained(
            base_dir, local_files_only=True, trust_remote_code=False
        )
        # Mismatched sizes load (the weight started anew) only to be named below: transformers'
        # own error says "look at the above report", a log the user may never see.
        model, loading = AutoModelForImageTextToText.from_pretrained(
            base_dir,
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **options,
        )
    except torch.OutOfMemoryError:
        raise ModelOutOfMemoryError(
            f"{base_dir}: out of GPU memory loading the model; {advice}"
        ) from None
    except LOAD_ERRORS as exc:
        refuse_custom_code(base_dir, exc)
        raise CheckpointError(f"{base_dir}: cannot load the base model ({exc})") from exc
    missing = sorted(loading["missing_keys"])
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{base_dir}: the weights have no {missing[0]}{more} (an incomplete or "
            "mismatched model file)"
        )
    # Weights the configured model has no place for would be dropped: a config.json of fewer
    # layers than its weights would serve a cut-down model. (Old Llama files keep RoPE's
    # inv_freq buffer, which the model computes anyway.)
    unexpected = sorted(k for k in loading["unexpected_keys"] if not k.endswith(".inv_freq"))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{base_dir}: the weights hold {unexpected[0]}{more}, which the model config.json "
            "describes has no place for (a config.json of another model?)"
        )
    mismatched = sorted(loading["mismatched_keys"])
    if mismatched:
        name, saved, expected = mismatched[0]
        others = len(mismatched) - 1
        more = f", and {others} more tensor(s) of other sizes" if others else ""
        raise CheckpointError(
            f"{base_dir}: the weights' {name} is {tuple(saved)}, but config.json makes it "
            f"{tuple(expected)}{more} (a config.json of another model?)"
        )
    check_interfaces(processor, model, base_dir)
    settle_special_tokens(processor.tokenizer, base_dir / "tokenizer_config.json")
    return processor, model


# The files a tokenizer's vocabulary is read from, one of which `base/` must hold: transformers'
# error without them is about sentencepiece and tiktoken.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)


def check_tokenizer_files(base_dir: Path) -> None:
    """CheckpointError naming tokenizer.json when `base_dir` holds no tokenizer vocabulary."""
    if not any((Path(base_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{Path(base_dir) / TOKENIZER_FILES[0]}: file not found (the tokenizer's vocabulary: "
            "tokenizer.json, or a SentencePiece tokenizer.model, as save_pretrained writes it)"
        )


def check_model_type(config_file: Path) -> None:
    """CheckpointError naming `config_file` when its model_type is one transformers knows but
    not as a model of images and text (a plain Llama folder, say): transformers' own error
    lists over a hundred model types. Unknown types and custom code are left to the loader,
    whose errors name them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = read_json_object(config_file)
    kind = config.get("model_type")
    if config.get("auto_map") or kind not in CONFIG_MAPPING_NAMES:
        return
    if kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise CheckpointError(
            f"{config_file}: model_type {kind!r} is not a model of images and text; base/ "
            "must hold a LLaVA-family model (model_type 'llava'). A language model alone "
            "cannot be the base; the official ChatPose release is converted with "
            "`python -m inference_service.convert_official`"
        )


def refuse_custom_code(folder: Path, exc: Exception) -> None:
    """CheckpointError naming the JSON file of `folder` (config.json first) whose `auto_map`
    names Python of the checkpoint's own, when that is why transformers refused to load
    (`exc`, with trust_remote_code=False); else nothing."""
    if "trust_remote_code" not in str(exc):
        return
    files = sorted(Path(folder).glob("*.json"), key=lambda f: (f.name != "config.json", f.name))
    for file in files:
        try:
            auto_map = json.loads(file.read_text("utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            named = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
            raise CheckpointError(
                f"{file}: auto_map names custom code ({', '.join(str(n) for n in named)}), "
                "which is not supported: only transformers' own classes are loaded, never a "
                "checkpoint's Python"
            ) from None


def check_interfaces(processor, model: torch.nn.Module, base_dir: Path) -> None:
    """CheckpointError naming the model's class and what it lacks of what ChatPoseModel uses:
    an image-text-to-text model of another kind (BLIP's, say) would load, and fail later with
    an AttributeError."""
    lacks = []
    for side in ("input", "output"):
        layer = getattr(model, f"get_{side}_embeddings", lambda: None)()
        if getattr(layer, "weight", None) is None:  # a pose token needs a row in both
            lacks.append(f"{side} embeddings (get_{side}_embeddings() is {layer!r})")
    text = getattr(model.config, "text_config", None)
    for field in ("hidden_size", "max_position_embeddings"):
        if not isinstance(getattr(text, field, None), int):
            lacks.append(f"a language model config's {field} (config.text_config.{field})")
    if getattr(model, "base_model", model) is model:  # its last_hidden_state is what is read
        lacks.append("a base model apart from its output layer (model.base_model)")
    if getattr(processor, "tokenizer", None) is None:
        lacks.append("a tokenizer in its processor (processor.tokenizer)")
    if not isinstance(getattr(processor, "image_token", None), str):
        lacks.append("an image token its processor expands (processor.image_token)")
    if lacks:
        raise CheckpointError(
            f"{base_dir}: {type(model).__name__} (with {type(processor).__name__}) lacks what "
            f"ChatPose needs: {'; '.join(lacks)}. The reference model is "
            "LlavaForConditionalGeneration with LlavaProcessor"
        )


def settle_special_tokens(tokenizer, config_file: Path) -> None:
    """A padding token for a tokenizer without one, as the release's code makes it: <unk>,
    else the end-of-sequence token (batches and the chat path pad). CheckpointError naming
    `config_file` (tokenizer_config.json) for a tokenizer without an end-of-sequence token: a
    chat reply could never end."""
    if tokenizer.eos_token is None:
        raise CheckpointError(
            f"{config_file}: the tokenizer has no end-of-sequence token (eos_token), so a chat "
            "reply could never end"
        )
    if tokenizer.pad_token is None:
        unk = tokenizer.unk_token
        tokenizer.pad_token = unk if unk is not None else tokenizer.eos_token


def check_vocabulary(tokenizer, model: torch.nn.Module, pose_token: str, base_dir: Path) -> None:
    """CheckpointError when the tokenizer has tokens the embeddings have no row for, but the
    pose token (`ensure_pose_token` adds its row): every request holding one would fail with
    an IndexError."""
    tokens, rows = len(tokenizer), model.get_input_embeddings().num_embeddings
    beyond = [t for t in tokenizer.convert_ids_to_tokens(range(rows, tokens)) if t != pose_token]
    if beyond:
        raise CheckpointError(
            f"{base_dir}: the tokenizer has {tokens} tokens and the model's embeddings {rows} "
            f"rows, none for {beyond[0]!r} and {len(beyond) - 1} more (a tokenizer of another "
            "model?)"
        )


def save_processor(processor, directory: Path) -> None:
    """`processor.save_pretrained(directory)`, keeping a SentencePiece tokenizer's legacy mode
    (the converted release's): transformers saves none, and reads a Llama tokenizer back in its
    own default, which splits the word after an added token ("<im_end>Can": "C", "an")."""
    processor.save_pretrained(directory)
    legacy = getattr(processor.tokenizer, "legacy", None)
    if legacy is None:
        return
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text("utf-8"))
    config["legacy"] = bool(legacy)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


def load_adapter(model: torch.nn.Module, adapter_dir: Path, trainable: bool) -> torch.nn.Module:
    """`model` wrapped with the peft adapter in `adapter_dir`. A CheckpointError names an
    adapter that does not load, that lacks tensors for layers its config adapts (peft would
    leave those at their initial values, random for some adapters), or that holds tensors the
    base has no place for (peft would drop them: an adapter of another base)."""
    from peft import PeftModel  # imported here: only checkpoints with an adapter need peft
    from peft.utils import get_peft_model_state_dict

    try:
        with quiet_peft(), warnings.catch_warnings():
            warnings.filterwarnings("error", "Found missing adapter keys", UserWarning)
            wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except UserWarning as warning:
        missing = re.search(r"\['([^']+)'", str(warning))
        named = f"no weights for {missing.group(1)}" if missing else str(warning)
        raise CheckpointError(
            f"{adapter_dir}: the LoRA adapter does not fit the base model ({named})"
        ) from None
    except LOAD_ERRORS as exc:
        # torch's message lists every tensor of another size, with the whole state_dict's name
        mismatched = _SIZE_MISMATCH.findall(str(exc))
        if mismatched:
            name, saved, expected = mismatched[0]
            more = f", and {len(mismatched) - 1} more tensor(s)" if len(mismatched) > 1 else ""
            raise CheckpointError(
                f"{adapter_dir}: the LoRA adapter's {name} is ({saved}), the base model's "
                f"({expected}){more}: an adapter of another base, or of a tokenizer with other "
                "tokens"
            ) from None
        raise CheckpointError(f"{adapter_dir}: cannot load the LoRA adapter ({exc})") from exc
    # Tensors for layers or modules the base does not have: peft drops them without a word
    # (an adapter trained on another base would run as half of itself). What the adapter may
    # hold is what peft would save of it, embeddings included (saved when training resized
    # them, and loaded back): told so, peft does not look up the base named in
    # adapter_config.json to find out whether they were resized, which for a name that is
    # not a folder here (a Hub id, a relative path) is a request to the Hugging Face Hub.
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(weights, framework="pt") as saved:
            expected = get_peft_model_state_dict(wrapped, save_embedding_layers=True)
            stray = sorted(set(saved.keys()) - set(expected))
        if stray:
            more = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
            raise CheckpointError(
                f"{adapter_dir}: the LoRA adapter holds {stray[0]}{more}, which the base model "
                "has no place for (an adapter of another base?)"
            )
    return wrapped


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)


def apply_adapter(model: torch.nn.Module, adapter_dir: Path, merge: bool) -> torch.nn.Module:
    """`model` with the peft adapter in `adapter_dir`, merged into its weights or kept beside."""
    model = load_adapter(model, adapter_dir, trainable=False)
    # Merged weights run at the base model's speed; quantized weights cannot take a merge
    # without losing precision, so they keep the adapter alongside.
    return model.merge_and_unload() if merge else model


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft asks transformers a question (`is_gradient_checkpointing`) that transformers 5 has
    renamed: a harmless FutureWarning on every adapter load, hidden here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield


def _check_image_size(processor, image_size: int) -> None:
    crop = getattr(processor.image_processor, "crop_size", None)
    if crop is None:
        return
    sides = {crop["height"], crop["width"]}
    if sides != {image_size}:
        raise CheckpointError(
            f"chatpose.json says image_size {image_size} but the image processor crops to "
            f"{crop['height']}x{crop['width']}"
        )
