"""Loading a LLaVA-family base model for this project: the checks a checkpoint's base folder
must pass (files, model type, tokenizer, vocabulary, the pose token), the device and dtype
(`select_device`), 8- and 4-bit quantization, the host and GPU memory checks made before a
load, and the LoRA adapter (peft). `ChatPoseModel.from_checkpoint` (the service), the
training loop, the demo build and the official-release converter all load through here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from inference_service.checkpoint import read_json_object, refuse_lfs_pointers
from inference_service.errors import (
    CheckpointError,
    MissingDependencyError,
    ModelError,
    ModelOutOfMemoryError,
    UnsupportedInputError,
)
from inference_service.prompts import pose_exchange

log = logging.getLogger(__name__)


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


def select_device(device: str) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype for `device` as --device takes it (every command that loads a
    model has that flag, so its refusals name it)."""
    asked = device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise UnsupportedInputError(
            f"--device must be auto, cpu or cuda[:N], got {device!r}"
        ) from None
    if torch_device.type == "cpu":
        return torch_device, torch.float32
    if torch_device.type != "cuda":
        raise UnsupportedInputError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if not torch.cuda.is_available():
        raise UnsupportedInputError(
            f"--device {device}: CUDA is not available here (no GPU, or a CPU build of torch); "
            "use --device cpu or auto, or a CUDA build of torch (README, Setup in detail)"
        )
    count = torch.cuda.device_count()
    if torch_device.index is not None and torch_device.index >= count:
        raise UnsupportedInputError(
            f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}"
        )
    try:
        if torch_device.index is None:
            # A bare "cuda" is the current device for torch, but cuda:$LOCAL_RANK for
            # transformers' device_map: named, the model and what is put beside it share one.
            torch_device = torch.device("cuda", torch.cuda.current_device())
        # bf16 in hardware from compute capability 8.0 (Ampere); older cards (V100, T4) only
        # emulate it, far slower than their float16.
        native_bf16 = torch.cuda.get_device_capability(torch_device) >= (8, 0)
        torch.cuda.mem_get_info(torch_device)  # the card's context: a busy card fails here
    except RuntimeError as exc:  # torch's AcceleratorError too: a card there but not usable
        problem = str(exc).strip().split("\n")[0]
        shown = device if asked == device else f"{asked}, which chose {torch_device}"
        raise UnsupportedInputError(
            f"--device {shown} cannot be used ({problem}): nvidia-smi shows who holds it (a "
            "card in exclusive mode takes one process); choose another with --device cuda:N, "
            "or --device cpu"
        ) from None
    return torch_device, torch.bfloat16 if native_bf16 else torch.float16


# The vision side and the output layer stay unquantized, as in the release. transformers 5
# matches these from the start of a module's name (model.vision_tower...), or as its end.
UNQUANTIZED_MODULES = (r".*vision_tower", r".*multi_modal_projector", "lm_head")


def quantization_config(
    load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    if load_in_4bit and load_in_8bit:
        raise UnsupportedInputError("choose one of load_in_4bit and load_in_8bit")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401  (only to check it is installed)
    except ImportError as exc:
        flag = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"  # as the user typed it
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


# This project's pose token and the official release's.
KNOWN_POSE_TOKENS = ("<POSE>", "[SEG]")


def check_pose_token_known(tokenizer, pose_token: str, checkpoint) -> None:
    """For a pose token the tokenizer lacks and no `adapter/` trained (`ensure_pose_token`
    adds it with a row no training has seen): CheckpointError when the tokenizer has the other
    known pose token (chatpose.json left at its default, or mistyped, for a release's
    `[SEG]`), else a warning. Either way the poses would be read at a token the model never
    learnt: plausible, and wrong."""
    if pose_token in tokenizer.get_vocab() or checkpoint.adapter_dir is not None:
        return
    if known := [token for token in KNOWN_POSE_TOKENS if token in tokenizer.get_vocab()]:
        raise CheckpointError(
            f"chatpose.json: pose_token is {pose_token!r}, which the tokenizer lacks, but it "
            f"has {known[0]!r}: set pose_token to {known[0]!r} if that is the model's pose token"
        )
    log.warning(
        "%s: the tokenizer has no pose token %r (chatpose.json's pose_token); it is added "
        "with an embedding row no training has seen, and no adapter/ brings a trained one: "
        "unless the model learnt its poses at this new token, they will be wrong",
        checkpoint.base_dir,
        pose_token,
    )


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
    _warn_if_space_before_release_token(tokenizer, pose_token_id, ids, config.pose_token)


def _warn_if_space_before_release_token(tokenizer, pose_token_id: int, ids, pose_token) -> None:
    """The release read its pose at "▁is" before "[SEG]" (`convert_official` keeps it so). A
    base converted otherwise (llava-hf's scripts) may keep the space as a token of its own,
    whose state the head would read instead: plausible poses, wrong."""
    at = ids.index(pose_token_id)
    if pose_token != "[SEG]" or at == 0:
        return
    before = tokenizer.convert_ids_to_tokens(ids[at - 1])
    if not tokenizer.convert_tokens_to_string([before]).strip():
        log.warning(
            "the tokenizer reads a whitespace token %r before %s, where the official release "
            "read the word before it: a release converted other than by convert_official "
            "would give wrong poses (convert the release with python -m "
            "inference_service.convert_official)",
            before,
            pose_token,
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
    quantized load."""
    needed = weights_bytes(base_dir, dtype, bits)
    if needed is None:
        return
    if bits == 4:  # already the least
        advice = "use a card with more memory free (other processes on it hold some)"
    elif bits == 8:
        advice = "--load-in-4bit needs less, or use a card with more memory"
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= free:
        return
    how = f"{bits}-bit" if bits else str(dtype).removeprefix("torch.")
    raise ModelOutOfMemoryError(
        f"{base_dir}: the weights need about {needed / 1e9:.1f} GB in {how}, and {device} has "
        f"{free / 1e9:.1f} GB free; {advice}"
    )


# Weights a quantized load keeps in its dtype besides UNQUANTIZED_MODULES: bitsandbytes
# quantizes linear layers only, and the token embeddings are none (13B: 0.16B weights).
_NOT_LINEAR = ("embed_tokens",)


def weights_bytes(base_dir: Path, dtype: torch.dtype, bits: int | None = None) -> int | None:
    """What the base model's safetensors weights take in `dtype`, from their headers alone,
    the language model's linear weights in `bits` when quantized (8 or 4: the vision side, the
    output layer, the embeddings, norms and biases stay in `dtype`, some 1.3 GB of a 13B
    model); None for weights in another format, or whose headers do not read
    (`check_base_files` names those)."""
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        return None
    kept = [re.compile(pattern.removeprefix(".*")) for pattern in UNQUANTIZED_MODULES]
    full, quantized = 0, 0
    try:
        for file in files:
            with safe_open(file, framework="pt") as weights:
                for name in weights.keys():
                    shape = weights.get_slice(name).get_shape()
                    linear = len(shape) == 2 and not any(part in name for part in _NOT_LINEAR)
                    if bits and linear and not any(p.search(name) for p in kept):
                        quantized += math.prod(shape)
                    else:
                        full += math.prod(shape)
    except (OSError, SafetensorError):
        return None
    return full * dtype.itemsize + quantized * (bits or 8 * dtype.itemsize) // 8


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
    check_model_type(base_dir / "config.json")  # first: a language model alone lacks the rest
    check_tokenizer_files(base_dir)
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


# The files an image processor's settings are read from (save_pretrained writes the first,
# older transformers the second): transformers' error without them sends the user to the Hub.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def check_tokenizer_files(base_dir: Path) -> None:
    """CheckpointError naming the file that `base_dir` lacks of those its tokenizer and image
    processor are read from: a vocabulary, the tokenizer's settings, the processor's."""
    base_dir = Path(base_dir)
    if not any((base_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{base_dir / TOKENIZER_FILES[0]}: file not found (the tokenizer's vocabulary: "
            "tokenizer.json, or a SentencePiece tokenizer.model, as save_pretrained writes it)"
        )
    if not (base_dir / "tokenizer_config.json").is_file():
        raise CheckpointError(
            f"{base_dir / 'tokenizer_config.json'}: file not found (the tokenizer's settings: "
            "its special tokens, as save_pretrained writes them)"
        )
    if not any((base_dir / name).is_file() for name in PROCESSOR_FILES):
        raise CheckpointError(
            f"{base_dir / PROCESSOR_FILES[0]}: file not found (the image processor's settings, "
            "as the processor's save_pretrained writes them)"
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
