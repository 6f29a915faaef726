"""Shared pieces of the inference-service benchmarks: model sizes, timing, machine facts, docs.

The benchmarks are plain scripts (`.venv/bin/python benchmarks/NAME.py --help`), never tests.
They build a randomly initialised LLaVA in-process with the test suite's builders
(`tests/service/tiny_llava.py`), save it as a ChatPose checkpoint in a temporary directory and
load it back with `ChatPoseModel.from_checkpoint`, exactly as `chatpose-serve` loads a model.
Random weights are fine here: speed does not depend on what the model says, and where the
output length matters the answer is forced.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers.utils import logging as hf_logging

from inference_service.modeling_chatpose import ChatPoseModel
from inference_service.training.build_demo import cpu_name

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
if str(ROOT) not in sys.path:  # the builders live in the test tree, which is not installed
    sys.path.insert(0, str(ROOT))
tiny_llava = importlib.import_module("tests.service.tiny_llava")
forcing = importlib.import_module("tests.service.forcing")

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

# A text description and an image request, used by every benchmark.
DESCRIPTION = "a man kneeling on his left knee with the right arm stretched forward"
DESCRIPTIONS = [  # 32 different lengths, as a real batch would have
    "a man raising both arms",
    "a woman sitting cross-legged on the floor",
    "a person kneeling on the left knee with the right arm stretched forward",
    "someone waving hello with the right hand",
    "a dancer standing on one leg, arms above the head",
    "a runner in mid stride",
    "a man bending forward to touch his toes",
    "a child jumping with both arms up",
    "a person lying on the back, knees bent",
    "a boxer in a guard stance",
    "a woman doing a squat, arms forward for balance",
    "a man sitting on a chair with legs crossed",
    "someone pointing to the left",
    "a person standing up straight",
    "a golfer at the top of the swing",
    "a man doing a push-up",
    "a woman stretching her arms above her head and leaning to the right",
    "a person crouching low, ready to sprint",
    "a man throwing a ball overhand",
    "a woman holding a phone to her ear with the left hand",
    "a person walking while looking down at the ground",
    "someone kicking a ball with the right foot",
    "a man leaning on a wall with one shoulder",
    "a yoga warrior pose",
    "a person climbing a ladder",
    "a woman carrying a box in front of her chest",
    "a man saluting",
    "a person sitting on the ground hugging the knees",
    "a skier in a tuck position",
    "a woman dancing with both arms out to the sides and one knee lifted",
    "a man shrugging",
    "a person bowing deeply",
]


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The sizes of a benchmark model (a Llama-like LM plus a CLIP-like vision tower)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


SIZES = {
    # The test suite's model (tests/service/tiny_llava.py).
    "tiny": ModelSize("tiny", 64, 128, 2, 4, 2, 32, 64, 2, 2, 32, 8),
    # "Demo-sized": a fixed stand-in (not the shipped demo checkpoint, whose LM has 1 layer
    # and whose tower 16 image tokens), kept so the figures stay comparable. A small
    # Llama-like LM (hidden 256, MLP 1024, 4 layers, 4 heads, no GQA, vocabulary of the
    # in-process tokenizer) and a small CLIP-like tower (hidden 128, 2 layers, 64 px images in
    # 8 px patches: 64 image tokens). Random weights.
    "demo": ModelSize("demo", 256, 1024, 4, 4, 4, 128, 512, 2, 4, 64, 8),
    # The released ChatPose model's sizes: LLaVA-1.5-13B, a Llama-2-13B LM and CLIP ViT-L/14 at
    # 336 px (576 image tokens). For a GPU; with --layers N the LM keeps its width and has N of
    # its 40 layers, so the checkpoint fits a benchmark's temporary directory.
    "13b": ModelSize("13b", 5120, 13824, 40, 40, 40, 1024, 4096, 24, 16, 336, 14),
}


def add_common_arguments(parser: argparse.ArgumentParser, *, repeats: int, warmup: int) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="demo", help="model preset")
    parser.add_argument("--layers", type=int, help="override the preset's LM layers")
    parser.add_argument("--hidden", type=int, help="override the preset's LM hidden size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads"
    )
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per case")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed runs per case")
    parser.add_argument(
        "--write-doc", action="store_true", help=f"update this script's block in {DOC}"
    )


def model_size(args: argparse.Namespace) -> ModelSize:
    size = SIZES[args.size]
    changes = {}
    if args.layers:
        changes["layers"] = args.layers
    if args.hidden:
        changes["hidden"] = args.hidden
        changes["intermediate"] = 4 * args.hidden
    if changes:
        size = dataclasses.replace(size, name=f"{size.name} (modified)", **changes)
    return size


def setup_torch(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def build_model(size: ModelSize, device: str, workdir: Path) -> ChatPoseModel:
    """A random LLaVA of `size`, written as a checkpoint and loaded as the service loads it."""
    return ChatPoseModel.from_checkpoint(write_checkpoint(size, workdir), device=device)


def write_checkpoint(size: ModelSize, workdir: Path) -> Path:
    """A random LLaVA of `size` as a checkpoint directory under `workdir`."""
    tokenizer = tiny_llava.build_tokenizer()
    vision = tiny_llava.vision_config(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_layers=size.vision_layers,
        num_heads=size.vision_heads,
        image_size=size.image_size,
        patch=size.patch,
    )
    text = tiny_llava.text_config(
        len(tokenizer),
        tokenizer,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_layers=size.layers,
        num_heads=size.heads,
        num_kv_heads=size.kv_heads,
    )
    text.max_position_embeddings = 2048
    return tiny_llava.write_checkpoint(
        workdir / "checkpoint",
        tiny_llava.build_llava(tokenizer, vision=vision, text=text),
        tiny_llava.build_processor(tokenizer, image_size=size.image_size, patch=size.patch),
        tiny_llava.build_head(hidden_size=size.hidden),
        hidden_size=size.hidden,
        head_hidden_size=size.hidden,
        image_size=size.image_size,
    )


def temporary_directory() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="chatpose-bench-")


def image_bytes() -> bytes:
    return tiny_llava.image_bytes((200, 120, 40), size=(160, 120))


# --- facts reported with every figure ---------------------------------------------------------


def machine_facts(model: ChatPoseModel) -> dict[str, str]:
    facts = {
        "CPU": f"{cpu_name()}, {os.cpu_count()} logical cores",
        "torch threads": f"{torch.get_num_threads()} intra-op",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    if model.device.type == "cuda":
        facts["GPU"] = torch.cuda.get_device_name(model.device)
    return facts


def model_facts(model: ChatPoseModel, size: ModelSize) -> dict[str, str]:
    llm = sum(p.numel() for p in model.model.model.language_model.parameters())
    llm += sum(p.numel() for p in model.model.lm_head.parameters())
    vision = sum(p.numel() for p in model.model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.model.multi_modal_projector.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    total = llm + vision + projector + head
    return {
        "model": f"{size.name} (random weights)",
        "parameters": (
            f"{total:,} total: LM {llm:,}, vision {vision:,}, projector {projector:,}, "
            f"pose head {head:,}"
        ),
        "LM": (
            f"Llama-like, hidden {size.hidden}, MLP {size.intermediate}, {size.layers} layers, "
            f"{size.heads} heads ({size.kv_heads} KV), vocabulary {len(model.tokenizer)}"
        ),
        "vision": (
            f"CLIP-like, hidden {size.vision_hidden}, {size.vision_layers} layers, "
            f"{size.image_size} px images, {size.patch} px patches: {size.image_tokens} image "
            "tokens"
        ),
    }


def sequence_length(model: ChatPoseModel, with_image: bool, description: str = DESCRIPTION) -> int:
    """Tokens the fast path feeds the LM for one request (prompt + forced answer)."""
    from inference_service.prompts import build_prompt, image_prefix, pose_exchange, with_answer

    pose_token = model.config.pose_token
    question, answer = pose_exchange(description, with_image, pose_token)
    markers = image_prefix(int(with_image), model.image_token, model.config.mm_use_im_start_end)
    prompt = build_prompt(model.template, question, image_markers=markers, pose_token=pose_token)
    text = with_answer(prompt, answer)
    images = [Image.new("RGB", (8, 8))] if with_image else None
    encoded = model.processor(text=[text], images=images, return_tensors="pt")
    return int(encoded["input_ids"].shape[1])


class LoadMonitor:
    """How much CPU other processes used while the benchmark ran (Linux /proc/stat).

    On a small shared machine a concurrent job (a test run, a build) can slow the benchmark by
    several times; this makes that visible next to the figures instead of silently skewing them.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        values = [int(v) for v in fields]
        busy = sum(values[:8]) - values[3] - values[4]  # all but idle and iowait (no guest)
        return busy / os.sysconf("SC_CLK_TCK")

    def _sample(self) -> tuple[float, float | None, float]:
        times = os.times()
        return time.monotonic(), self._busy_seconds(), times.user + times.system

    def others_share(self) -> float | None:
        """Other processes' CPU time / (wall time x logical cores), since construction."""
        wall0, busy0, own0 = self._start
        wall1, busy1, own1 = self._sample()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return None
        others = (busy1 - busy0) - (own1 - own0)
        return max(0.0, others / ((wall1 - wall0) * (os.cpu_count() or 1)))

    def facts(self) -> dict[str, str]:
        share = self.others_share()
        if share is None:
            return {}
        if share > 0.10:
            print(
                f"warning: other processes used {share:.0%} of the CPU during the measurement; "
                "the figures are skewed, run again on a quiet machine",
                file=sys.stderr,
            )
        load = os.getloadavg()[0]
        return {
            "other processes' CPU use during the measurement": (
                f"{share:.0%} of the machine (1-minute load average at the end {load:.2f})"
            )
        }


# --- timing -----------------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes, under inference_mode, synchronising a CUDA device."""
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def measure(
    fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int
) -> list[float]:
    for _ in range(warmup):
        timed(fn, device)
    return [timed(fn, device) for _ in range(repeats)]


def measure_interleaved(
    cases: dict[str, Callable[[], object]], device: torch.device, *, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Times every case once per round, for `repeats` rounds, rotating the order each round.

    On a shared machine the speed drifts over seconds; interleaving the cases exposes them all
    to the same drift, so their ratios (taken round by round) stay meaningful.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            timed(cases[name], device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(cases[name], device))
    return times


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between order statistics."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


# --- output -----------------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def facts_list(*groups: dict[str, str]) -> str:
    return "\n".join(f"- {key}: {value}" for group in groups for key, value in group.items())


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def block_name(script: str, device: torch.device, args: argparse.Namespace) -> str:
    """The doc block a run writes: one per script, device and model preset."""
    name = f"{script}-{device.type}"
    return name if args.size == "demo" else f"{name}-{args.size}"


def report(block: str, body: str, write_doc: bool) -> None:
    """Prints `body`; with write_doc, also puts it between this block's markers in the doc."""
    print(body)
    if not write_doc:
        return
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    stamp = time.strftime("%Y-%m-%d")
    content = f"{start}\n_Generated by `{command_line()}` on {stamp}._\n\n{body}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + content + after
    else:
        text = text.rstrip("\n") + "\n\n" + content + "\n"
    DOC.write_text(text)
    print(f"\n(updated the {block} block of {DOC.relative_to(ROOT)})")
