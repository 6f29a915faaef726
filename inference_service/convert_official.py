"""Convert the official ChatPose release into this project's checkpoint format.

    python -m inference_service.convert_official SRC DST --vision-tower CLIP_DIR

SRC is the release's directory (LLaVA-original layout, as written by its
merge_lora_weights_and_save_hf_model.py): config.json with `mm_*` fields, the tokenizer with
`[SEG]` added, and weights named

    model.embed_tokens.*, model.layers.*, model.norm.*, lm_head.*      the Llama LLM
    model.mm_projector.0.*, model.mm_projector.2.*                     the 2-layer projector
    model.text_hidden_fcs.0.0.*, model.text_hidden_fcs.0.2.*           the SMPL head

The release saves no vision tower (its config names one, e.g. `mm_vision_tower`), and nothing
can be downloaded here, so CLIP_DIR is a local CLIP (vision) model directory, e.g. a copy of
openai/clip-vit-large-patch14-336. DST gets chatpose.json, base/ (a transformers
LlavaForConditionalGeneration with its processor) and pose_head.safetensors; see
docs/checkpoints.md. Peak memory is about the size of the model's weights.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import pickle
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.utils import logging as transformers_logging

from inference_service.checkpoint import (
    CONFIG_NAME,
    NUM_JOINTS,
    ChatPoseConfig,
    read_json_object,
    refuse_lfs_pointers,
    work_offline,
)
from inference_service.commands import EXIT_INTERRUPTED, EXIT_USAGE, stops_as_interrupts, user_path
from inference_service.errors import CheckpointError
from inference_service.files import (
    temporary_folder,
    unwritable,
    write_failure,
    write_folder_whole,
)
from inference_service.loading import (
    free_host_memory,
    refuse_custom_code,
    save_processor,
    settle_special_tokens,
)
from inference_service.pose_head import PoseHead
from inference_service.prompts import IMAGE_TOKEN, IMAGE_WRAPPERS

# Official name prefix -> transformers LlavaForConditionalGeneration name prefix.
RENAMES = {
    "model.embed_tokens.": "model.language_model.embed_tokens.",
    "model.layers.": "model.language_model.layers.",
    "model.norm.": "model.language_model.norm.",
    "lm_head.": "lm_head.",
    "model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
    "model.mm_projector.2.": "model.multi_modal_projector.linear_2.",
}
HEAD_PREFIXES = ("model.text_hidden_fcs.0.", "text_hidden_fcs.0.")
# Saved by the release but not needed: the vision tower comes from CLIP_DIR, SMPL-X buffers
# belong to its renderer, rotary frequencies are recomputed.
IGNORED = ("model.vision_tower.", "model.smplx.", "rotary_emb.inv_freq")
# LLaVA's `mm_vision_select_feature` -> transformers' `vision_feature_select_strategy`.
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# The release's prompts always wrap an image in these (its main_chat.py: `--use_mm_start_end`,
# default True), whatever `mm_use_im_start_end` in its config.json (LLaVA-1.5's false) says.
# The conversion wraps when the tokenizer has them: a checkpoint trained so must hold both, as
# its merged embeddings were saved with them (prompts.IMAGE_WRAPPERS).
# The release's body model is SMPL-X, of which it uses 21 body joints; its text data put SMPL-H
# finger joints in SMPL's hand slots (22, 23), which therefore mean nothing for an SMPL hand.
RELEASE_POSED_JOINTS = 22


def convert(source: Path, destination: Path, vision_tower: Path, pose_token: str = "[SEG]") -> Path:
    """Write the converted checkpoint to `destination`; returns it (as an absolute path).
    Everything is checked and written into a temporary folder first, so a failure leaves no
    half checkpoint."""
    source, vision_tower = source.expanduser(), vision_tower.expanduser()
    destination = destination.expanduser().resolve()
    _check_folders(source, destination, vision_tower)
    official = _read_config(source / "config.json")
    weights = _read_weights(source)
    _refuse_unmerged_lora(weights, source)  # before its base weights are missed under it
    tokenizer = _read_tokenizer(source, pose_token)
    model = _llava_model(official, weights, tokenizer, source, vision_tower)
    head = _pose_head(weights, source, hidden_size=official["hidden_size"])
    vision_config = model.config.vision_config
    processor = _processor(tokenizer, vision_config, model.config.vision_feature_select_strategy)
    config = ChatPoseConfig(
        hidden_size=official["hidden_size"],
        head_hidden_size=head[0].out_features,
        pose_token=pose_token,
        image_size=vision_config.image_size,
        mm_use_im_start_end=set(IMAGE_WRAPPERS) <= set(tokenizer.get_vocab()),
        posed_joints=RELEASE_POSED_JOINTS,
        # Its image targets are HMR 2.0's, in the camera's frame, and its PoseScript loader
        # turns the text ones into it too (Rx(+90°) after AMASS's Z-up root: a half turn).
        pose_orientation="camera",
        prompt_wording="release",  # its training code's questions, not the paper's
    )

    def write(folder: Path) -> None:
        base = folder / "base"
        model.save_pretrained(base)
        save_processor(processor, base)
        _check_saved_tokenizer(base, source, tokenizer, pose_token)
        head.save(folder / "pose_head.safetensors")
        config.save(folder)

    _write_whole(destination, write)
    _report_unused(weights)
    return destination


def _check_folders(source: Path, destination: Path, vision_tower: Path) -> None:
    """Checks the folders given, before the weights are read: a 13B model takes minutes to
    load."""
    # An empty folder the user made (a link's target, a mount, ".") is kept, and filled from a
    # temporary folder inside it, on its disk; a new one is a temporary folder renamed.
    writing = temporary_folder(destination, fill=True)
    if destination.exists() and not destination.is_dir():
        what = "a file, not a folder" if destination.is_file() else "not a folder"
        raise CheckpointError(
            f"{destination}: {what}; DST is the folder the checkpoint is written to (a new "
            "one, or an empty one)"
        )
    if destination.exists() and any(p != writing for p in destination.iterdir()):
        raise CheckpointError(f"{destination}: exists and is not empty")
    if problem := unwritable(writing.parent):  # now, not once the weights are in memory
        raise CheckpointError(f"{destination}: {problem}")
    if not vision_tower.is_dir():
        raise CheckpointError(
            f"--vision-tower {vision_tower}: no such folder (a local copy of the CLIP vision "
            "model the release names)"
        )
    if not (vision_tower / "config.json").is_file():  # else CLIP's defaults: a 224-px model
        raise CheckpointError(
            f"--vision-tower {vision_tower}: no config.json (in a Hugging Face cache folder, "
            "the model's files are in snapshots/<hash>/)"
        )
    if (source / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{source}: already a ChatPose checkpoint ({CONFIG_NAME}); chatpose-serve "
            "--checkpoint loads it as it is"
        )
    _check_source_folder(source)
    refuse_lfs_pointers(source)
    refuse_lfs_pointers(vision_tower)


def _llava_model(
    official: dict, weights: dict, tokenizer, source: Path, vision_tower: Path
) -> LlavaForConditionalGeneration:
    """Transformers' LLaVA model holding the release's language model and projector and the
    CLIP vision tower's weights, checked to fit it exactly."""
    vision_config = CLIPVisionConfig.from_pretrained(vision_tower, local_files_only=True)
    _check_vision_size(official, vision_config, source, vision_tower)
    embed = _required(weights, "model.embed_tokens.weight", source)
    vocab_size = max(embed.shape[0], len(tokenizer))
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_llama_config(official, vocab_size, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        vision_feature_layer=official.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=SELECT_FEATURE[
            official.get("mm_vision_select_feature", "patch")
        ],
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    state = _language_and_projector(weights, source, vocab_size)
    with _quiet_load_report():
        vision, loading = CLIPVisionModel.from_pretrained(
            vision_tower, local_files_only=True, dtype=embed.dtype, output_loading_info=True
        )
    if loading["missing_keys"]:  # transformers would start them at random, with a notice
        raise CheckpointError(
            f"--vision-tower {vision_tower}: no weights for "
            f"{sorted(loading['missing_keys'])[0]} (a damaged or partial download?)"
        )
    state.update({f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()})

    # Built on the meta device, the model allocates nothing until the converted tensors are
    # assigned, so conversion needs about one copy of the weights in memory.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{source}: no weights for {_official_name(missing[0])}")
    _refuse_unplaced(sorted(set(state) - expected), source)
    try:
        model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    except RuntimeError as exc:  # a weight of the wrong shape: another CLIP, say
        raise CheckpointError(
            f"{source} with {vision_tower}: the weights do not fit ({exc})"
        ) from None
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _write_whole(destination: Path, write) -> None:
    """`write(folder)`, and the folder becomes `destination` (or, when that is the user's empty
    folder, what it holds moves into it): nothing of a failed write is left behind
    (`write_folder_whole`), and one that fell short is a CheckpointError naming it."""
    try:
        write_folder_whole(destination, write, fill=True)
    except Exception as exc:
        if problem := write_failure(exc):  # the libraries' own words for a full disk
            raise CheckpointError(
                f"{destination}: could not be written (a full disk?): {problem}"
            ) from exc
        if isinstance(exc, OSError):  # "[Errno 28] No space left on device": but where?
            raise CheckpointError(f"{destination}: could not be written: {exc}") from exc
        raise


def _check_vision_size(official: dict, vision_config, source: Path, vision_tower: Path) -> None:
    """CheckpointError when the CLIP folder is not of the resolution that the release's
    `mm_vision_tower` names (OpenAI's names end in it: "clip-vit-large-patch14-336"; without
    the number, 224). The 224-px CLIP of the same width loads and runs, on features the
    projector never saw."""
    named = str(official.get("mm_vision_tower", ""))
    openai = re.search(r"clip-vit-[a-z]+-patch\d+(?:-(\d+))?$", named.rstrip("/"), re.I)
    if openai is None:  # another maker's name: it says no size
        return
    size = int(openai.group(1) or 224)
    if size != vision_config.image_size:
        raise CheckpointError(
            f"{source / 'config.json'} names the vision tower {named} ({size} px), but "
            f"--vision-tower {vision_tower} takes {vision_config.image_size} px images"
        )


# The official config's fields the conversion reads, and their JSON types.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "hidden_size": (int,),
    "intermediate_size": (int,),
    "num_hidden_layers": (int,),
    "num_attention_heads": (int,),
    "num_key_value_heads": (int,),
    "max_position_embeddings": (int,),
    "vocab_size": (int,),
    "mm_vision_select_layer": (int,),
    "rms_norm_eps": (float, int),
    "rope_theta": (float, int),
    "mm_projector_type": (str,),
    "mm_vision_select_feature": (str,),
}


def _check_source_folder(source: Path) -> None:
    """SRC must be the release's own folder, the one holding its config.json: a mistake
    (its parent, a Hugging Face cache's top, one weights file) is named with where to look."""
    if source.is_file():
        raise CheckpointError(f"{source}: a file; SRC is the release's folder (its config.json)")
    if not source.is_dir() or (source / "config.json").is_file():
        return  # the config's reading names a missing folder
    below = sorted(p.parent for p in source.glob("*/config.json"))
    below += sorted(p.parent for p in source.glob("snapshots/*/config.json"))  # a Hub cache
    shown = ", ".join(str(folder) for folder in below[:3]) + (", ..." if len(below) > 3 else "")
    hint = f"; folders in it that hold one: {shown}" if below else " (SRC is the release's folder)"
    raise CheckpointError(f"{source}: no config.json{hint}")


def _read_config(path: Path) -> dict:
    official = read_json_object(path)
    _refuse_transformers_layout(official, path)
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if name not in official:
            raise CheckpointError(f"{path}: missing field '{name}'")
    for name, kinds in _FIELD_TYPES.items():  # transformers' configs refuse others, deep inside
        value = official.get(name)
        if name in official and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise CheckpointError(f"{path}: field '{name}' is {value!r}, not {kinds[0].__name__}")
    projector = official.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise CheckpointError(
            f"{path}: field 'mm_projector_type' is {projector!r}; only 'mlp2x_gelu' (LLaVA-1.5) "
            f"converts to transformers' Llava"
        )
    feature = official.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise CheckpointError(
            f"{path}: field 'mm_vision_select_feature' must be one of {sorted(SELECT_FEATURE)}, "
            f"got {feature!r}"
        )
    return official


def _refuse_transformers_layout(official: dict, path: Path) -> None:
    """CheckpointError for a config.json that transformers wrote (a LLaVA of the Hugging Face
    Hub, llava-hf/...): its language model's settings are nested in `text_config`, where the
    release, in original LLaVA's layout, has them at the top; "missing field 'hidden_size'"
    said nothing of that."""
    architectures = official.get("architectures")
    nested = isinstance(official.get("text_config"), dict) or (
        isinstance(architectures, list)
        and any(str(name).endswith("ForConditionalGeneration") for name in architectures)
    )
    if not nested or "hidden_size" in official:
        return
    kind = official.get("model_type")
    named = f" {kind}" if isinstance(kind, str) and kind else ""
    raise CheckpointError(
        f"{path}: a Hugging Face transformers{named} checkpoint (its language model's settings "
        "in text_config), not the official ChatPose release, which this converts. The release "
        "(YaoFeng/CHATPOSE-V0) is in original LLaVA's layout: a config.json with the Llama "
        "fields at its top (hidden_size, intermediate_size, num_hidden_layers, "
        "num_attention_heads) and mm_vision_tower, and weights named model.embed_tokens.*, "
        "model.layers.*, lm_head.*, model.mm_projector.* and model.text_hidden_fcs.* (the SMPL "
        "pose head)"
    )


def _read_weights(source: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    files = sorted(source.glob("*.safetensors")) or sorted(source.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{source}: no *.safetensors or pytorch_model*.bin weight files")
    _check_shards(source, files)
    _check_host_memory(files)
    for file in files:
        try:
            if file.suffix == ".safetensors":
                weights.update(load_file(str(file)))
            else:
                weights.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"{file}: cannot read the weights ({exc})") from exc
    return weights


def _check_host_memory(files: list[Path]) -> None:
    """CheckpointError, before reading, when the weights (one copy, as the release stores
    them) need more memory than the machine has free: the system would kill the conversion
    part way, with no word on why (Python's MemoryError rarely comes first on Linux)."""
    needed = sum(file.stat().st_size for file in files)
    free = free_host_memory()
    if free is not None and needed > free:
        raise CheckpointError(
            f"the weights take about {needed / 1e9:.1f} GB of memory to convert, and this "
            f"machine has {free / 1e9:.1f} GB free: close other programs, or convert on a "
            "machine with more memory"
        )


def _check_shards(source: Path, files: list[Path]) -> None:
    """CheckpointError naming a shard that the weights' index lists and the folder lacks (a
    download cut short): the weights in it would otherwise be named one by one as missing."""
    safetensors = files[0].suffix == ".safetensors"
    index = source / f"{'model.safetensors' if safetensors else 'pytorch_model.bin'}.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:
        raise CheckpointError(f"{index}: not a readable weights index ({exc!r})") from None
    absent = [name for name in shards if not (source / str(name)).is_file()]
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise CheckpointError(
            f"{source}: {index.name} lists the shard {absent[0]}{more}, which the folder lacks "
            "(a download cut short?)"
        )


def _read_tokenizer(source: Path, pose_token: str):
    sentencepiece_only = (source / "tokenizer.model").is_file() and not (
        source / "tokenizer.json"
    ).is_file()
    if sentencepiece_only and not all(map(_installed, ("sentencepiece", "google.protobuf"))):
        # transformers would go on to other readers and fail with a message about tiktoken.
        raise CheckpointError(
            f"{source}: the tokenizer is a SentencePiece model (tokenizer.model, as the release "
            "saves it, with no tokenizer.json); reading it needs two packages: pip install "
            "sentencepiece protobuf"
        )
    try:
        # trust_remote_code=False: the release's folder is read, its Python (`auto_map`) never
        # run, nor asked about on stdin.
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            local_files_only=True,
            trust_remote_code=False,
            legacy=_sentencepiece_legacy(source),
        )
    except (OSError, ValueError, ImportError) as exc:
        refuse_custom_code(source, exc)
        raise CheckpointError(f"{source}: cannot read the tokenizer ({exc})") from None
    if pose_token not in tokenizer.get_vocab():
        raise CheckpointError(
            f"{source}: the tokenizer has no pose token {pose_token!r} (see --pose-token)"
        )
    # The release's tokenizer (transformers 4.31, slow) stripped the whitespace on both sides
    # of an added token: "it is [SEG]" trained with "▁is" right before [SEG], whose state is
    # the pose. Today's tokenizers keep that space as a token of its own ("▁"), which would
    # put another state in front of the pose token; the same flags give the old tokens back.
    for token in (pose_token, *IMAGE_WRAPPERS):
        if token in tokenizer.get_vocab():
            special = token in tokenizer.all_special_tokens
            stripped = AddedToken(token, lstrip=True, rstrip=True, normalized=False)
            stripped.special = special
            tokenizer.add_tokens([stripped], special_tokens=special)
    # Original LLaVA splices image features in at a placeholder id outside the vocabulary;
    # transformers' Llava needs a real image token, which then gets an (unused) embedding row.
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    # No end-of-sequence token is refused; the padding is <unk> when there is none, as the
    # release pads (the service does the same for a base it loads).
    settle_special_tokens(tokenizer, source / "tokenizer_config.json")
    return tokenizer


def _sentencepiece_legacy(source: Path) -> bool:
    """SentencePiece's legacy mode as the release's transformers (4.31) read its tokenizer:
    its tokenizer_config.json's `legacy`, else True, 4.31's default (5's is False). In it, the
    text after an added token starts a word: "<im_end>Can" is "▁Can", not "C", "an"."""
    try:
        value = json.loads((source / "tokenizer_config.json").read_text("utf-8")).get("legacy")
    except (OSError, ValueError, AttributeError):
        value = None
    return True if value is None else bool(value)


# What a converted tokenizer must still read as it did before saving.
_CHECKED_TEXT = "USER: <im_start><image><im_end>\nCan you tell? ASSISTANT: Sure, it is {pose}."


def _check_saved_tokenizer(base: Path, source: Path, tokenizer, pose_token: str) -> None:
    """CheckpointError, before anything is moved in place, unless the tokenizer saved in
    `base` reads an image prompt and its answer as `tokenizer` does."""
    saved = AutoTokenizer.from_pretrained(base, local_files_only=True, trust_remote_code=False)
    text = _CHECKED_TEXT.format(pose=pose_token)
    before, after = tokenizer(text).input_ids, saved(text).input_ids
    if before != after:
        raise CheckpointError(
            f"{source}: the converted tokenizer reads {text!r} as "
            f"{saved.convert_ids_to_tokens(after)}, not as the release's did "
            f"({tokenizer.convert_ids_to_tokens(before)})"
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _llama_config(official: dict, vocab_size: int, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=official["hidden_size"],
        intermediate_size=official["intermediate_size"],
        num_hidden_layers=official["num_hidden_layers"],
        num_attention_heads=official["num_attention_heads"],
        num_key_value_heads=official.get("num_key_value_heads", official["num_attention_heads"]),
        max_position_embeddings=official.get("max_position_embeddings", 4096),
        rms_norm_eps=official.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": official.get("rope_theta", 10000.0)},
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _language_and_projector(
    weights: dict[str, torch.Tensor], source: Path, vocab_size: int
) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in weights.items():
        for old, new in RENAMES.items():
            if name.startswith(old) and "rotary_emb" not in name:
                state[new + name[len(old) :]] = tensor
                break
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            state[name] = _grow_rows(state[name], vocab_size)
    return state


def _grow_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows (the mean of the existing ones) up to `rows`: room for the image token."""
    extra = rows - matrix.shape[0]
    if extra <= 0:
        return matrix
    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(extra, -1)], dim=0)


def _pose_head(weights: dict[str, torch.Tensor], source: Path, hidden_size: int) -> PoseHead:
    for prefix in HEAD_PREFIXES:
        if f"{prefix}0.weight" in weights:
            break
    else:
        raise CheckpointError(
            f"{source}: no weights for {HEAD_PREFIXES[0]}0.weight (the SMPL head)"
        )
    state = {}
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        state[name] = _required(weights, prefix + name, source).float()
    reads = state["0.weight"].shape[-1]
    if reads != hidden_size:
        raise CheckpointError(
            f"{source}: the SMPL head ({prefix}0.weight) reads {reads} numbers, but the "
            f"language model's states are {hidden_size} wide"
        )
    outputs = state["2.weight"].shape[0]
    if outputs != NUM_JOINTS * 6:
        raise CheckpointError(
            f"{source}: the SMPL head ({prefix}2.weight) gives {outputs} numbers, not "
            f"{NUM_JOINTS * 6} ({NUM_JOINTS} joints x 6D)"
        )
    head = PoseHead(hidden_size, state["0.weight"].shape[0], outputs)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:  # a layer of another shape than its neighbours say
        raise CheckpointError(f"{source}: the SMPL head's weights do not fit ({exc})") from None
    return head


@contextlib.contextmanager
def _quiet_load_report():
    """Keeps transformers from listing the weights it did not load: for a full CLIP folder (the
    usual download) that is its whole text model, about 200 lines. The vision tower's own
    missing weights are checked and named instead. The tensor-parallel check is quieted too:
    transformers runs it, listing every layer "not sharded", once that report is quiet."""
    names = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
    loggers = [transformers_logging.get_logger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _processor(tokenizer, vision_config: CLIPVisionConfig, select_strategy: str) -> LlavaProcessor:
    # The release preprocesses with CLIP's processor: shortest side resized, then centre crop.
    size = vision_config.image_size
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token
    )


def _required(weights: dict[str, torch.Tensor], name: str, source: Path) -> torch.Tensor:
    if name not in weights:
        raise CheckpointError(f"{source}: no weights for {name}")
    return weights[name]


def _official_name(name: str) -> str:
    """The official name a missing transformers weight would have come from, for errors."""
    for old, new in RENAMES.items():
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def _refuse_unmerged_lora(weights: dict[str, torch.Tensor], source: Path) -> None:
    """Un-merged LoRA layers would be dropped, and the fine-tuning with them. peft names them
    `lora_A`/`lora_B`, moves the layer's own weight to `base_layer`, and a whole wrapped model's
    state (what zero_to_fp32 writes) starts `base_model.model.`."""
    marks = (".lora_", ".base_layer.")
    name = next((n for n in sorted(weights) if any(m in n for m in marks)), None)
    name = name or next((n for n in sorted(weights) if n.startswith("base_model.model.")), None)
    if name is not None:
        raise CheckpointError(
            f"{source}: {name} is a weight of an un-merged LoRA model; merge the adapter into the "
            "model (peft's merge_and_unload, or the release's merge script) and convert that"
        )


def _refuse_unplaced(names: list[str], source: Path) -> None:
    """Weights under a converted prefix that the model has no place for would be dropped, and
    what they carry lost with them."""
    if not names:
        return
    official = _official_name(names[0])
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    raise CheckpointError(
        f"{source}: {official}{more} have no place in a LLaVA-Llama model; is this the release?"
    )


def _report_unused(weights: dict[str, torch.Tensor]) -> None:
    converted = (*RENAMES, *HEAD_PREFIXES)
    unused = sorted(
        n for n in weights if not n.startswith(converted) and not any(p in n for p in IGNORED)
    )
    if unused:
        print(
            f"convert_official: ignored {len(unused)} unknown tensors, e.g. {unused[0]}",
            file=sys.stderr,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inference_service.convert_official",
        description="Convert the official ChatPose release to this project's checkpoint format.",
    )
    parser.add_argument("source", type=user_path, metavar="SRC", help="the release's directory")
    parser.add_argument(
        "destination", type=user_path, metavar="DST", help="new checkpoint directory"
    )
    parser.add_argument(
        "--vision-tower",
        type=user_path,
        required=True,
        metavar="DIR",
        help="a local CLIP vision model directory (the release names, not ships, it)",
    )
    parser.add_argument(
        "--pose-token",
        default="[SEG]",
        help="the release's pose token string (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work_offline()  # nothing is downloaded: SRC and CLIP_DIR are local folders
    try:
        with stops_as_interrupts():  # a closed terminal, `kill`: the copy is removed too
            written = convert(args.source, args.destination, args.vision_tower, args.pose_token)
    except KeyboardInterrupt:
        print("convert_official: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"convert_official: {exc}", file=sys.stderr)
        return EXIT_USAGE  # as every command here refuses its input
    except MemoryError:
        print(
            "convert_official: out of memory: the conversion holds one copy of the weights "
            "(a 13B release: about 26 GB, as the release stores them)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    config = ChatPoseConfig.load(written)
    wrapped = "wrapped in <im_start>...<im_end>" if config.mm_use_im_start_end else "not wrapped"
    print(
        f"wrote {written} (images {wrapped}; joints {config.posed_joints} to 23 at "
        "rest: see docs/checkpoints.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
