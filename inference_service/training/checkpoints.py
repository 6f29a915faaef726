"""A run's folder, OUT: the checkpoints it saves (whole or not at all, the newest named by
`latest`, the oldest pruned) and the training state that `--resume` reads back. The checkpoint
format itself is inference_service/checkpoint.py's.

Output directory:

    OUT/step-000100/     a checkpoint `chatpose-serve` loads as it is: chatpose.json (whose
                         base_model is the base's absolute path, or "../base" with copy_base),
                         adapter/, pose_head.safetensors, and training_state.pt (optimizer
                         state, step, RNG state, the run's settings) for resume
    OUT/latest           the name of the newest complete checkpoint ("step-000100")
    OUT/base/            a copy of the base model, with copy_base only
    OUT/train_log.jsonl  the logged loss figures
"""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import torch

from inference_service.checkpoint import HEAD_NAME
from inference_service.files import sync, write_failure, write_folder_whole, write_text_atomically
from inference_service.loading import save_processor
from inference_service.training.config import TrainingError
from inference_service.training.training_model import TrainingModel

STATE_NAME = "training_state.pt"
LATEST_NAME = "latest"
LOG_NAME = "train_log.jsonl"
DIVERGED_NAME = "diverged.json"  # in OUT while a run stopped on a NaN has not got past it
STATE_FORMAT = 1


def run_files(out: Path) -> list[str]:
    """What a run has written into `out`."""
    names = (LATEST_NAME, LOG_NAME, DIVERGED_NAME, "base", ".base.tmp")
    return [p.name for p in out.iterdir() if p.name in names or p.name.startswith("step-")]


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    latest = out / LATEST_NAME
    if not latest.is_file():
        return None
    try:
        path = out / latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(
            f"{latest}: not a readable checkpoint pointer ({exc}); write the name of one of "
            f"the step-* folders of {out} into it"
        ) from None
    if not _is_complete(path):
        raise TrainingError(
            f"{latest} names {path}, which is not a complete checkpoint{earlier_one(path)}"
        )
    return path


def _is_complete(path: Path) -> bool:
    weights = (path / "adapter").is_dir() or (path / "base").is_dir()
    return (path / STATE_NAME).is_file() and (path / HEAD_NAME).is_file() and weights


def earlier_one(path: Path) -> str:
    """How to resume from the newest complete checkpoint before the damaged `path`, or ""."""
    earlier = [(n, name) for n, name in steps_before(path) if _is_complete(path.parent / name)]
    if not earlier:
        return ""
    latest = path.parent / LATEST_NAME
    return f"; to resume from the one before it, write {max(earlier)[1]} into {latest}"


def steps_before(path: Path) -> list[tuple[int, str]]:
    """(N, name) of the step-N folders beside the step folder `path` that come before it."""
    step = _step_of(path)
    if step is None:
        return []
    return [
        (number, p.name)
        for p in path.parent.glob("step-*")
        if (number := _step_of(p)) is not None and number < step and p.is_dir()
    ]


def _step_of(path: Path) -> int | None:
    """N of a step-N folder, as a number: past 999,999 steps the names no longer sort."""
    number = path.name.removeprefix("step-")
    return int(number) if number.isascii() and number.isdigit() and number != path.name else None


def save_checkpoint(
    out: Path,
    step: int,
    tm: TrainingModel,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    base_model: str,
    state_extra: dict,
    keep_last: int,
) -> Path:
    """Write OUT/step-N whole or not at all (`write_folder_whole`), then point `latest` at it.
    A write that fails (a full disk) leaves nothing of it, and is an OSError naming the
    checkpoint: torch and safetensors say RuntimeError."""
    final = out / step_dir_name(step)

    def write(tmp: Path) -> None:
        _write_checkpoint(tmp, step, tm, optimizer, names, base_model, state_extra)

    try:
        write_folder_whole(final, write)
    except Exception as exc:
        if problem := write_failure(exc):
            raise OSError(
                f"{final}: the checkpoint could not be written (a full disk?): {problem}"
            ) from exc
        raise
    write_text_atomically(out / LATEST_NAME, final.name + "\n")
    sync(out)
    if keep_last:
        prune_checkpoints(out, keep_last, final)
    return final


def _write_checkpoint(
    tmp: Path,
    step: int,
    tm: TrainingModel,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    base_model: str,
    state_extra: dict,
) -> None:
    if tm.trains_base:
        tm.model.save_pretrained(str(tmp / "base"))
        save_processor(tm.processor, tmp / "base")
        base_model = "base"
    else:
        tm.model.save_pretrained(str(tmp / "adapter"), save_embedding_layers=False)
    tm.exported_head().save(tmp / HEAD_NAME)
    dataclasses.replace(tm.config, base_model=base_model).save(tmp)
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "param_names": names,
        # The head as trained (exactly, for resume) and the shift it is trained with.
        "head": {k: v.detach().cpu() for k, v in tm.head.state_dict().items()},
        "head_input_shift": None if tm.head_input_shift is None else tm.head_input_shift.cpu(),
        "action_classifier": (
            None
            if tm.action_classifier is None
            else {k: v.detach().cpu() for k, v in tm.action_classifier.state_dict().items()}
        ),
        "torch_rng": torch.get_rng_state(),
        # The training card's alone: a resume on a machine with other cards restores it there.
        "cuda_rng": torch.cuda.get_rng_state(tm.device) if tm.device.type == "cuda" else None,
        **state_extra,
    }
    torch.save(state, tmp / STATE_NAME)


def prune_checkpoints(out: Path, keep_last: int, newest: Path) -> None:
    """Delete all but the `keep_last` newest step-N folders of `out`, `newest` among them."""
    steps = sorted(
        (p for p in out.glob("step-*") if p.is_dir() and p != newest and _step_of(p) is not None),
        key=_step_of,  # by number: step-1000000 comes after step-999999
    )
    for old in steps[: max(0, len(steps) - (keep_last - 1))]:
        shutil.rmtree(old)


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message would advise weights_only=False: unsafe
        raise TrainingError(
            f"{path / STATE_NAME}: not a training state this project wrote, or a damaged one"
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise TrainingError(f"{path / STATE_NAME}: cannot read the training state ({exc})") from exc
    if not isinstance(state, dict):
        raise TrainingError(f"{path / STATE_NAME}: not a training state: a {type(state).__name__}")
    if state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path / STATE_NAME}: unknown format {state.get('format')!r}")
    for key, kinds in _STATE_FIELDS.items():
        if key not in state:
            raise TrainingError(f"{path / STATE_NAME}: damaged: it has no {key!r}")
        if not isinstance(state[key], kinds) or isinstance(state[key], bool):
            raise TrainingError(
                f"{path / STATE_NAME}: damaged: {key!r} is a {type(state[key]).__name__}"
            )
    if state["step"] < 0:
        raise TrainingError(f"{path / STATE_NAME}: damaged: step {state['step']}")
    return state


# What `save_checkpoint` writes into the training state, and the types a resume reads.
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "optimizer": dict,
    "param_names": list,
    "head": dict,
    "head_input_shift": (torch.Tensor, type(None)),
    "torch_rng": torch.Tensor,
    "cuda_rng": (torch.Tensor, list, type(None)),
}
