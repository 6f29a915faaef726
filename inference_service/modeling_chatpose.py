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
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import DynamicCache, DynamicLayer

from inference_service import loading
from inference_service.checkpoint import (
    ChatPoseConfig,
    Checkpoint,
)
from inference_service.errors import (
    CheckpointError,
    EmptyPromptError,
    ModelError,
    ModelOutOfMemoryError,
    UnsupportedInputError,
)
from inference_service.images import decode_image, refuse_flat
from inference_service.pose_head import PoseHead, decode_pose
from inference_service.prompts import (
    IMAGE_WRAPPERS,
    POSE_MARKER,
    Exchange,
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
class PosePrompt:
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
    exchanges_left_out: int = 0  # exchanges of the history left out to fit the context


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
            # The client hears only that it ran out; the admin's log keeps torch's figures.
            log.warning(
                "out of GPU memory in %s (%s); chatpose-serve's --max-batch, "
                "--max-new-tokens, or --load-in-8bit / --load-in-4bit need less",
                method.__name__,
                (str(error).splitlines() or ["no detail"])[0],
                extra={"event": "out_of_memory"},
            )
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # for other processes on the card, too
        # Retried alone when it ran in a micro-batch (the scheduler): this request alone did
        # not fit, so what the client can change is its own length.
        raise ModelOutOfMemoryError(
            "the service ran out of GPU memory for this request: a shorter prompt or chat may "
            "fit; its log says which of its settings need less"
        )

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
        refuse_guesses: bool = False,
    ):
        self.model = model.eval()
        # The service refuses what an answer would only guess from: a picture of one flat
        # colour (`images.refuse_flat`), a prompt of words the tokenizer does not know and no
        # picture (`check_known_words`). Training and evaluation take what their data holds.
        self.refuse_guesses = refuse_guesses
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
        self.pose_token_id = loading.ensure_pose_token(self.tokenizer, model, config.pose_token)
        loading.check_pose_token(self.tokenizer, self.pose_token_id, config, self.image_token)
        image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        configured = getattr(model.config, "image_token_id", image_token_id)
        if configured != image_token_id:  # else every request with an image fails
            raise CheckpointError(
                f"base/config.json: image_token_id is {configured}, but the tokenizer's "
                f"{self.image_token} is {image_token_id} (a config of another tokenizer?)"
            )
        if config.mm_use_im_start_end:
            for token in IMAGE_WRAPPERS:
                if token not in self.tokenizer.get_vocab():
                    raise CheckpointError(
                        f"chatpose.json sets mm_use_im_start_end but the tokenizer has no {token}"
                    )
        _check_image_size(processor, model.config, config.image_size)
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
        refuse_guesses: bool = False,
    ) -> ChatPoseModel:
        """Load a checkpoint directory (docs/checkpoints.md), from local files only.

        device: "auto" (CUDA when available, else CPU), "cpu" or "cuda[:N]". CUDA runs in
        bfloat16 (float16 on cards before compute capability 8.0), CPU in float32.
        load_in_4bit/8bit quantize the LLM with bitsandbytes (CUDA only); a LoRA adapter is
        then applied unmerged.
        """
        checkpoint = Checkpoint.open(path)
        torch_device, dtype = loading.select_device(device)
        if (load_in_4bit or load_in_8bit) and torch_device.type != "cuda":
            flag = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"  # as the user typed it
            raise UnsupportedInputError(
                f"{flag}: 4-bit and 8-bit loading need a CUDA device, and this runs on the "
                f"{torch_device.type} (--device)"
            )
        quantization = loading.quantization_config(load_in_4bit, load_in_8bit, dtype)
        if torch_device.type == "cuda" and torch_device.index is not None:
            # Kernels that run on "the current device" (bitsandbytes') must find this one.
            torch.cuda.set_device(torch_device)
        if torch_device.type == "cpu":
            loading.check_host_memory(checkpoint.base_dir, dtype)
        else:
            bits = 4 if load_in_4bit else 8 if load_in_8bit else None
            loading.check_gpu_memory(checkpoint.base_dir, dtype, torch_device, bits)
        processor, model = loading.load_base(
            checkpoint.base_dir,
            dtype=dtype,
            device_map=str(torch_device),
            quantization_config=quantization,
        )
        # The pose token must exist before an adapter is loaded: the adapter may carry trained
        # rows for it in the resized embeddings.
        pose_token = checkpoint.config.pose_token
        loading.check_vocabulary(processor.tokenizer, model, pose_token, checkpoint.base_dir)
        loading.check_pose_token_known(processor.tokenizer, pose_token, checkpoint)
        try:  # a model that barely fits: each step below puts a little more on the card
            loading.ensure_pose_token(processor.tokenizer, model, pose_token)
            if checkpoint.adapter_dir is not None:
                try:
                    model = loading.apply_adapter(
                        model, checkpoint.adapter_dir, merge=quantization is None
                    )
                except torch.OutOfMemoryError:
                    raise ModelError(
                        f"{checkpoint.adapter_dir}: out of GPU memory merging the adapter into "
                        "the model; --load-in-8bit or --load-in-4bit apply it unmerged, in less "
                        "memory"
                    ) from None
            head = PoseHead.load(checkpoint.head_path, checkpoint.config)
            return cls(
                model,
                processor,
                head,
                checkpoint.config,
                max_new_tokens_limit,
                refuse_guesses,
            )
        except torch.OutOfMemoryError:
            raise ModelError(
                f"{path}: out of GPU memory setting up the loaded model (its pose token, its "
                "pose head); --load-in-8bit or --load-in-4bit need less, or use a card with "
                "more memory"
            ) from None

    # --- fast path ---------------------------------------------------------------------

    @_request_entry
    def predict_poses(self, requests: Sequence[PosePrompt]) -> list[np.ndarray]:
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
    def pose_states(self, requests: Sequence[PosePrompt]) -> torch.Tensor:
        """(len(requests), H): the final-layer state before each request's pose token, with the
        answer template forced (what the SMPL head reads on the fast path)."""
        texts: list[str] = []
        images: list[Image.Image] = []
        for request in requests:
            decoded = self._decode_images(request.images)
            self._check_text(request.text or "", "prompt")
            if not decoded:
                self.check_known_words(request.text or "", "prompt")
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
        history: Sequence[Exchange] = (),
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
        if not decoded:  # with history too: "again" reads as "dance" to a model that knows neither
            self.check_known_words(prompt, "prompt")
        for index, turn in enumerate(history):  # named as the request's turns are numbered
            self._check_text(turn.user, f"history[{2 * index}].text")
            self._check_text(turn.assistant, f"history[{2 * index + 1}].text")
        fitting = self.fitting_history(prompt, history, decoded, max_new_tokens)
        left_out, history = len(history) - len(fitting), fitting
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
            return ChatReply(self._render(generated.tolist()), [], exchanges_left_out=left_out)
        states = self._reply_pose_states(inputs, generated)
        poses = self._poses(states) if len(states) else []
        ended = len(generated) and int(generated[-1]) in self._end_token_ids()
        truncated = len(generated) >= max_new_tokens and not ended
        return ChatReply(self._render(generated.tolist()), poses, truncated, left_out)

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
        history: Sequence[Exchange],
        images: Sequence[Image.Image],
        max_new_tokens: int,
    ) -> Sequence[Exchange]:
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
        decoded = []
        for k, data in enumerate(images):
            image = decode_image(data, f"images[{k}]", min_side=self.config.image_size)
            if self.refuse_guesses:
                refuse_flat(image, f"images[{k}]")
            decoded.append(image)
        return decoded

    def _check_text(self, text: str, field: str) -> None:
        # A literal image marker would be expanded into image tokens with no image behind them.
        if self.image_token in text:
            raise UnsupportedInputError(
                f"{field}: must not contain the image marker {self.image_token!r}"
            )

    def check_known_words(self, text: str, field: str) -> None:
        """With ``refuse_guesses``: an error for text of which the tokenizer knows no word
        (words the model never saw, another language; punctuation is no word: "dance." reads
        as "dance"), which the model would answer with the same pose whatever it says. A
        tokenizer with no unknown token (byte fallback, as Llama's) reads every text."""
        unknown = self.tokenizer.unk_token_id
        if not self.refuse_guesses or unknown is None or not text.strip():
            return
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        known = [t for i, t in zip(ids, tokens, strict=True) if i != unknown and _has_word(t)]
        if unknown in ids and not known:  # punctuation alone, every word known, is no guess
            raise UnsupportedInputError(
                f"{field}: this model knows none of its words, so its answer would ignore "
                "them; say it in words it was trained on (the bundled demo model knows plain "
                "English about poses: raise, bend, kneel, sit, squat, wave, the left arm ...)"
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


def _has_word(token: str) -> bool:
    """Whether a token holds a letter or a digit (not punctuation alone)."""
    return any(character.isalnum() for character in token)


def _cache_keyword(backbone: torch.nn.Module) -> str:
    """The name `backbone.forward` takes a KV cache by: transformers 5.24 renamed
    `past_key_values` to `cache`."""
    parameters = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _check_image_size(processor, model_config, image_size: int) -> None:
    """CheckpointError when chatpose.json, the image processor and the vision tower disagree on
    the picture's size: text would be answered, and every image request fail in the tower."""
    crop = getattr(processor.image_processor, "crop_size", None)
    if crop is not None and {crop["height"], crop["width"]} != {image_size}:
        raise CheckpointError(
            f"chatpose.json says image_size {image_size} but the image processor crops to "
            f"{crop['height']}x{crop['width']}"
        )
    tower = getattr(getattr(model_config, "vision_config", None), "image_size", None)
    if isinstance(tower, int) and tower != image_size:
        raise CheckpointError(
            f"base/config.json: the vision tower takes {tower}x{tower} pictures, but chatpose.json "
            f"and the image processor say {image_size} (a processor of another tower?)"
        )
