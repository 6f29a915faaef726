"""A fresh, small LLaVA-family ChatPose model built in-process, written as a checkpoint.

    python -m inference_service.training.scaffold OUT [--size demo|tiny] [--texts FILE ...]
        [--vocab-size N] [--seed S]

What it builds (random weights, nothing downloaded):

- a CLIP-like vision tower (`CLIPVisionModel`) and LLaVA's two-layer projector;
- a Llama-like language model (`LlamaForCausalLM` inside `LlavaForConditionalGeneration`);
- its own word-level tokenizer (lower case, a side word bound to the next word), trained here
  with the `tokenizers` library on the prompt templates plus the given texts, with the special
  tokens `<unk>`, `<s>`, `</s>`, `<image>` and the pose token `<POSE>` (so loading never has to
  grow the embeddings);
- the LLaVA processor (resize shortest side, centre crop, CLIP normalisation);
- a random SMPL pose head `Linear(H, H) -> ReLU -> Linear(H, 144)`;

and writes them as a checkpoint directory in this project's format (docs/checkpoints.md):
chatpose.json, base/, pose_head.safetensors. `inference_service.train` then trains it.

Presets (`SIZES`): "tiny" for tests (about 150 k parameters) and "demo": hidden 256, 1 layer,
attention biases, 64 px images in one patch; 3.2 M parameters (13 MB of float32 safetensors)
with the demo corpus's 627-word vocabulary, 5.0 M at the full 4096-token one
(docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from inference_service.checkpoint import ChatPoseConfig, share_as_umask_allows
from inference_service.commands import user_path
from inference_service.pose_head import PoseHead
from inference_service.prompts import (
    IMAGE_TOKEN,
    LLAVA_V1,
    POSE_MARKER,
)

POSE_TOKEN = POSE_MARKER
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", IMAGE_TOKEN, POSE_TOKEN)


@dataclass(frozen=True)
class ModelSize:
    """Every size of a scaffolded model. `vocab_size` is the tokenizer's most: a small training
    text gives fewer tokens (the model's vocabulary is then the tokenizer's actual size)."""

    vocab_size: int
    hidden_size: int  # the LLM's width H: also the pose head's input and inner width
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    vision_feature_layer: int = -2  # the tower's layer the LM reads (LLaVA's default: -2)
    attention_bias: bool = False  # Llama's q/k/v/o biases


SIZES: dict[str, ModelSize] = {
    # For tests: builds, saves and trains a step in milliseconds.
    "tiny": ModelSize(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_positions=512,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_layers=2,
        vision_heads=2,
        image_size=32,
        patch_size=8,
    ),
    # The demo checkpoint: <= 5 M parameters (20 MB in float32), 64 px images in one patch.
    "demo": ModelSize(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        # One layer: the demo's LM reads its prompt as a bag of words in its first layer
        # (build_demo.condition_base) and further layers passed the stream on unchanged, at
        # 3x the training time. A preset's context layer (build_demo) adds one before it.
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        max_positions=1024,
        vision_hidden_size=128,
        vision_intermediate_size=512,
        vision_layers=2,
        vision_heads=4,
        image_size=64,
        # One patch, the whole picture: one image token, which two heads of the LM's first
        # layer read (build_demo.condition_base). Averaged, 16 patch tokens lose where each
        # patch is (docs/demo_model_experiments.md, third and fifth rounds).
        patch_size=64,
        vision_feature_layer=-1,  # the tower is trained for the LM (build_demo's vision stage)
        attention_bias=True,  # the image heads' query bias (build_demo.condition_base)
    ),
}

# Always in the tokenizer's training text: the conversation template and the pose prompts, so
# the strings the model reads most encode into few tokens. The prompts are written out as the
# demo checkpoint's tokenizer was trained on them, placeholders and all: any change to this
# text changes that tokenizer's vocabulary, and the demo build with it.
_BASE_TEXTS = (
    LLAVA_V1.system,
    "USER: ASSISTANT: USER: ASSISTANT:",
    "{description}, can you give the SMPL pose of this person?",
    "Sure, it is {pose}.",
    "Can you provide the SMPL pose of the person in the center of this image?",
    "Sure, the SMPL pose of this person is {pose}.",
    "{description} Can you provide the SMPL pose of this person?",
    "The person is standing with the left arm raised above the head and the right hand on the hip.",
    "Someone is kneeling on the right knee, the torso bent forward, both arms stretched out.",
    "A man sitting on the floor with crossed legs, his hands resting on his knees.",
    "A woman jumping with both legs bent and the arms spread to the sides.",
    "The figure leans backward, looking up, with the left leg lifted in front of the body.",
)


def template_texts() -> list[str]:
    """The texts every scaffolded tokenizer is trained on, including the training phrasings."""
    from inference_service.training.datasets import phrasing_texts  # no torch there

    return [*_BASE_TEXTS, *phrasing_texts()]


# Text as typed or pasted (a web page's no-break space, an input method's full-width letters
# and ideographic space, a zero-width space between words) reads as the plain text the corpus
# is: NFKC folds the wide and no-break forms, a zero-width space parts words as a space does,
# joiners go, and every run of white space is one space, which `_BIND_SIDES` needs.
_PLAIN_TEXT = [
    normalizers.NFKC(),
    normalizers.Replace(Regex("\u200b"), " "),
    normalizers.Replace(Regex("[\u200c\u200d\u2060\ufeff]"), ""),
    normalizers.Replace(Regex(r"\s+"), " "),
]
# A side word and the word after it become one word ("left arm" -> "left_arm"): the demo's LM
# reads its prompt as a bag of words (build_demo.condition_base), and bound like this "the left
# arm and the right knee" and "the right arm and the left knee" are different bags.
_BIND_SIDES = normalizers.Replace(Regex(r"(?<=\bleft|\bright|\bboth) (?=\p{L})"), "_")


def build_tokenizer(
    texts: Iterable[str] = (), vocab_size: int = SIZES["demo"].vocab_size
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on `texts` plus the template texts: lower case, each word
    and punctuation mark of the training text one token (the `vocab_size` most frequent), a side
    word bound to the word after it (`_BIND_SIDES`), and `<unk>` for a word never seen; text
    pasted with other spaces or wide letters reads as typed (`_PLAIN_TEXT`).

    Whole words, because the demo model learns its language from its corpus alone: the subword
    pieces of a word it never saw mislead it ("unbend" -> "un", "bend"), where `<unk>` says
    nothing (docs/demo_model_experiments.md, fourth round). Decoding joins the words with
    spaces (none before punctuation), so a reply of known words reads as it was, in lower case.
    A BOS is prepended as Llama's does; the pad token is `<unk>` as in the ChatPose release.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [*_PLAIN_TEXT, normalizers.Lowercase(), _BIND_SIDES]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("_", " "), decoders.WordPiece(cleanup=True)]
    )
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator([*template_texts(), *texts], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN, POSE_TOKEN],
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, size: ModelSize) -> LlavaProcessor:
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, size: ModelSize, seed: int = 0
) -> LlavaForConditionalGeneration:
    """A LLaVA of `size` with random weights (seeded), its vocabulary the tokenizer's."""
    if size.image_size % size.patch_size:
        raise ValueError(
            f"image_size {size.image_size} is not a multiple of patch_size {size.patch_size}"
        )
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden_size,
        intermediate_size=size.vision_intermediate_size,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
    )
    text = LlamaConfig(
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=size.max_positions,
        attention_bias=size.attention_bias,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(size.image_size // size.patch_size) ** 2,
        vision_feature_layer=size.vision_feature_layer,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def build_head(size: ModelSize, seed: int = 1) -> PoseHead:
    torch.manual_seed(seed)
    return PoseHead(size.hidden_size, size.hidden_size)


def scaffold_checkpoint(
    out: str | Path,
    size: str | ModelSize = "demo",
    texts: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Build a fresh model of `size` and write it as a checkpoint directory at `out`.

    `out` must not exist or be empty. Returns `out`.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory")
    size = SIZES[size] if isinstance(size, str) else size
    tokenizer = build_tokenizer(texts, size.vocab_size)
    model = build_model(tokenizer, size, seed)
    processor = build_processor(tokenizer, size)
    head = build_head(size, seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")
    head.save(out / "pose_head.safetensors")
    share_as_umask_allows(out)
    ChatPoseConfig(
        hidden_size=size.hidden_size,
        head_hidden_size=size.hidden_size,
        pose_token=POSE_TOKEN,
        image_size=size.image_size,
    ).save(out)
    (out / "scaffold.json").write_text(
        json.dumps({"size": asdict(size), "seed": seed}, indent=2) + "\n", encoding="utf-8"
    )
    return out


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """Tokenizer training text from files: .json files contribute every string inside them
    (captions files, conversation files), .npz files are synthetic-corpus files (their
    captions), anything else its lines."""
    texts: list[str] = []
    for path in paths:
        path = Path(path)
        if path.suffix == ".npz":
            from inference_service.training.corpus import load_corpus

            texts.extend(record.caption for record in load_corpus(path))
            continue
        if path.suffix == ".json":
            from inference_service.training.datasets import read_json

            stack = [read_json(path)]
            while stack:
                item = stack.pop()
                if isinstance(item, str):
                    texts.append(item)
                elif isinstance(item, dict):
                    stack.extend(item.values())
                elif isinstance(item, list):
                    stack.extend(item)
        else:
            try:
                raw = path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8") from None
            texts.extend(line for line in raw.splitlines() if line.strip())
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference_service.training.scaffold",
        description="Write a fresh small LLaVA-family ChatPose checkpoint (random weights).",
    )
    parser.add_argument("out", type=user_path, help="checkpoint directory to create")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument(
        "--texts",
        nargs="*",
        default=[],
        metavar="FILE",
        help="extra tokenizer training text: .json (every string in it), a corpus .npz (its "
        "captions) or plain text lines",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="largest vocabulary of the word-level tokenizer (preset's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    if args.vocab_size is not None:
        size = replace(size, vocab_size=args.vocab_size)
    try:
        out = scaffold_checkpoint(args.out, size, read_texts(args.texts), args.seed)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    weights = sum(f.stat().st_size for f in (out / "base").glob("*.safetensors"))
    print(f"wrote {out} ({args.size}, {weights / 1e6:.1f} MB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
