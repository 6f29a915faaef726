"""A tiny LLaVA built in-process (nothing downloaded), saved as a ChatPose checkpoint.

CLIP vision: 32 px images, 8 px patches -> 16 patches; Llama: hidden 64, 2 layers; a byte-level
BPE tokenizer trained here on a few sentences. Random weights: the tests check plumbing and
numerics, not what the model says.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from inference_service.checkpoint import ChatPoseConfig
from inference_service.pose_head import PoseHead
from inference_service.prompts import LLAVA_V1

HIDDEN = 64
IMAGE_SIZE = 32
PATCH = 8
BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>")
# What the official release's tokenizer adds to LLaVA's (which has no "<image>" token).
OFFICIAL_EXTRA_TOKENS = ("[SEG]", "<im_start>", "<im_end>")

_CORPUS = [
    LLAVA_V1.system,
    "USER: a man raising both arms, can you give the SMPL pose of this person? ASSISTANT:",
    "Sure, it is <POSE>. Sure, the SMPL pose of this person is <POSE>.",
    "Can you provide the SMPL pose of the person in the center of this image?",
    "The person is kneeling on the left knee with the right arm stretched forward.",
    "Two poses: first sitting, then standing up straight and waving hello.",
]


def build_tokenizer(
    special_tokens: tuple[str, ...] = BASE_SPECIAL_TOKENS,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (so any text encodes and decodes exactly), a BOS added like Llama's."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # as in the release
        additional_special_tokens=[t for t in special_tokens if t not in ("<unk>", "<s>", "</s>")],
    )


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )


def text_config(vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def build_llava(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config(len(tokenizer), tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def build_head(seed: int = 1) -> PoseHead:
    torch.manual_seed(seed)
    return PoseHead(HIDDEN, HIDDEN)


def write_checkpoint(
    root: Path,
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    head: PoseHead,
    **config_fields,
) -> Path:
    """Save a checkpoint in this project's format: chatpose.json, base/, pose_head.safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    head.save(root / "pose_head.safetensors")
    config = ChatPoseConfig(
        hidden_size=HIDDEN, head_hidden_size=HIDDEN, image_size=IMAGE_SIZE, **config_fields
    )
    config.save(root)
    return root


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt="PNG") -> bytes:
    """A small two-tone image (not square, so resize and crop both do something)."""
    image = Image.new("RGB", size, color)
    image.paste(
        (255 - color[0], 255 - color[1], 255 - color[2]), (0, 0, size[0] // 2, size[1] // 3)
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
