"""A tiny LLaVA built in-process (nothing downloaded), saved as a ChatPose checkpoint.

CLIP vision: 32 px images, 8 px patches -> 16 patches; Llama: hidden 64, 2 layers; a byte-level
BPE tokenizer trained here on a few sentences. Random weights: the tests check plumbing and
numerics, not what the model says.
"""

from __future__ import annotations

import io
import struct
import zlib
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


def vision_config(
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    image_size: int = IMAGE_SIZE,
    patch: int = PATCH,
) -> CLIPVisionConfig:
    """The tiny CLIP tower; the keyword arguments let benchmarks build bigger ones."""
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch,
    )


def text_config(
    vocab_size: int,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = HIDDEN,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> LlamaConfig:
    """The tiny Llama; the keyword arguments let benchmarks build bigger ones."""
    return LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast, *, image_size: int = IMAGE_SIZE, patch: int = PATCH
) -> LlavaProcessor:
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def build_llava(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    *,
    vision: CLIPVisionConfig | None = None,
    text: LlamaConfig | None = None,
) -> LlavaForConditionalGeneration:
    """The tiny LLaVA, or one made of the given `vision` and `text` configs."""
    vision = vision if vision is not None else vision_config()
    text = text if text is not None else text_config(len(tokenizer), tokenizer)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def build_head(seed: int = 1, *, hidden_size: int = HIDDEN) -> PoseHead:
    torch.manual_seed(seed)
    return PoseHead(hidden_size, hidden_size)


def write_checkpoint(
    root: Path,
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    head: PoseHead,
    **config_fields,
) -> Path:
    """Save a checkpoint in this project's format: chatpose.json, base/, pose_head.safetensors.

    `config_fields` go into chatpose.json; hidden_size, head_hidden_size and image_size default
    to the tiny model's.
    """
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    head.save(root / "pose_head.safetensors")
    sizes = {"hidden_size": HIDDEN, "head_hidden_size": HIDDEN, "image_size": IMAGE_SIZE}
    config = ChatPoseConfig(**{**sizes, **config_fields})
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


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height in its header and holds no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"")
        + png_chunk(b"IEND", b"")
    )
