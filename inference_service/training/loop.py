"""The training loop (`train`): a run from its settings to its last checkpoint, with exact
resume, a stop on NaN, the log and the lock on OUT. The command line is
`python -m inference_service.train`.

Its parts: `config` (`TrainConfig`, the errors), `sampling` (the batch mix), `training_model`
(what trains: LoRA, the pose token's rows and the SMPL head; the forward pass), `checkpoints`
(OUT's layout, saving, the training state) and `fingerprints` (what a resume compares).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from inference_service.checkpoint import CONFIG_NAME, HEAD_NAME, Checkpoint
from inference_service.errors import CheckpointError
from inference_service.files import unwritable, write_folder_whole, write_text_atomically
from inference_service.loading import select_device
from inference_service.training.baselines import mean_pose_6d
from inference_service.training.checkpoints import (
    DIVERGED_NAME,
    LATEST_NAME,
    LOG_NAME,
    STATE_NAME,
    earlier_one,
    latest_checkpoint,
    load_state,
    run_files,
    save_checkpoint,
    step_dir_name,
    steps_before,
)
from inference_service.training.config import TrainConfig, TrainingDiverged, TrainingError
from inference_service.training.datasets import KINDS, DatasetError, Example, load_data
from inference_service.training.encoding import EncodedExample, Encoder
from inference_service.training.fingerprints import (
    base_fingerprint,
    base_weights_sample,
    data_change,
    fingerprint,
)
from inference_service.training.sampling import MixedSampler, unused_kinds
from inference_service.training.training_model import TrainingModel, load_training_model

LOCK_NAME = ".lock"  # held by the run that writes the folder


@dataclass
class TrainResult:
    step: int  # the last completed step
    checkpoint: Path | None  # the newest checkpoint written
    losses: list[tuple[int, float, float, float]]  # (step, total, ce, pose_l1) of this process


def learning_rate(config: TrainConfig, step: int) -> float:
    """The rate for optimizer step `step` (1-based): linear warmup, then constant or falling
    linearly to lr / (steps - warmup) at the last step."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.lr_schedule == "linear":
        after = config.steps - config.warmup_steps
        return config.lr * (config.steps - step + 1) / after
    return config.lr


def train(config: TrainConfig, examples: Sequence[Example] | None = None) -> TrainResult:
    """Run (or resume) training; `examples` replaces config.data (tests, generated data)."""
    with _out_held(config.out):
        return _train(config, examples)


@contextlib.contextmanager
def _out_held(out: Path) -> Iterator[None]:
    """The run's hold on `out` (a lock on OUT/.lock) for as long as it runs: a second run on
    the same --out, started before the first wrote anything (minutes of loading a 13B model),
    would write over its checkpoints, both ending 'done'. The lock file goes at the end, and
    folders made for the hold go if the run left them empty, as a run that fails to start
    leaves --out as it found it."""
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    if unwritable(out):  # the run's own checks say why
        yield
        return
    for _ in range(3):  # a run ending meanwhile may take a folder it made away: made again
        try:
            out.mkdir(parents=True, exist_ok=True)
            handle = _locked_file(out / LOCK_NAME)
            break
        except FileNotFoundError:
            continue
        except OSError:  # a file there, or no permission: the run's own checks say so
            yield
            return
    else:
        raise TrainingError(f"--out: {out} keeps disappearing; is another run removing it?")
    if handle is None:  # nothing here is ours to clean up
        raise TrainingError(
            f"{out} is in use by another training run (it holds {out / LOCK_NAME}); wait for "
            "it to end, or choose another --out"
        )
    try:
        yield
    finally:
        if os.name == "nt":  # Windows deletes no open file, so it is closed first there
            handle.close()
        with contextlib.suppress(OSError):  # elsewhere while still locked: no run locks it
            (out / LOCK_NAME).unlink()  # between the unlock and the unlink
        handle.close()
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: the run's, or someone else's
                folder.rmdir()


def _locked_file(path: Path):
    """`path` opened and locked, or None when another run holds it. A file another run
    removed, ending, while this one waited to lock it is no lock: opened afresh (a few times
    at most; a file system without steady inode numbers keeps the last)."""
    for attempt in range(10):
        handle = open(path, "a+b")  # noqa: SIM115 (held until the run ends)
        if not _try_lock(handle):
            handle.close()
            return None
        try:
            named = os.stat(path).st_ino
        except FileNotFoundError:
            named = None
        if named == os.fstat(handle.fileno()).st_ino or attempt == 9:
            return handle
        handle.close()
    return None


def _try_lock(handle) -> bool:
    """An exclusive lock on the open file, taken now; False when another process holds it. A
    file system that cannot lock (some network ones) runs unguarded rather than refuse."""
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)  # the byte locked: the same one for every run
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)
    return True


def _resume_point(config: TrainConfig, checkpoint: Checkpoint) -> Path | None:
    """The checkpoint a --resume run goes on from (None: a new run), once --out is found fit
    for the run; TrainingError naming what is wrong with it, before the model loads."""
    out = config.out
    resume_from = None
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out: {out} is a file; name a folder for the run")
    if problem := unwritable(out):  # now, not once the model has loaded
        raise TrainingError(f"--out: {problem}")
    if config.resume:
        resume_from = latest_checkpoint(out) if out.is_dir() else None
        if resume_from is None:
            raise TrainingError(f"--resume: {out} holds no checkpoint to resume from")
    elif out.is_dir() and ((out / CONFIG_NAME).is_file() or any(run_files(out))):
        # A run's files, even of one stopped before its first checkpoint: its base/ copy
        # would otherwise be taken for this run's --base. A checkpoint (a run's step-N too).
        files = ", ".join(sorted(run_files(out))) or CONFIG_NAME
        base = config.base.expanduser().resolve()
        if out.expanduser().resolve() in (base, *base.parents):
            raise TrainingError(
                f"--out {out} holds the --base model ({config.base}), whose files ({files}) "
                "would be taken for a run's; choose an --out outside it"
            )
        if (out / CONFIG_NAME).is_file():  # the demo, a converted release: not a run
            raise TrainingError(
                f"--out {out} is a checkpoint (it holds {CONFIG_NAME}), not a run's folder; "
                "choose another --out"
            )
        if latest_checkpoint(out) is None:
            raise TrainingError(
                f"{out} holds a run that stopped before its first checkpoint ({files}): "
                "nothing to resume; delete the folder or choose another --out"
            )
        raise TrainingError(
            f"{out} already holds a training run ({files}); "
            "pass --resume to continue it or choose another --out"
        )
    base_dir, out_dir = checkpoint.base_dir.resolve(), out.expanduser().resolve()
    if config.copy_base and base_dir in (out_dir, *out_dir.parents):
        raise TrainingError(
            f"--copy-base: --out {out} lies inside the base model's folder ({base_dir}), which "
            "would be copied into itself; choose an --out outside it"
        )
    return resume_from


def _examples_for(
    config: TrainConfig, checkpoint: Checkpoint, examples: Sequence[Example] | None
) -> list[Example]:
    """``examples``, or those of --data; DatasetError naming at once every record the
    checkpoint cannot take (before the model loads: minutes for a large one)."""
    if examples is None:
        if not config.data:
            raise TrainingError("no training data: give at least one --data")
        examples = []
        for spec in config.data:
            examples.extend(load_data(spec, config.seed, checkpoint.config.prompt_wording))
    examples = list(examples)
    if not examples:
        raise DatasetError("the data files hold no examples")
    max_images = checkpoint.config.max_images
    _refuse_examples(
        f"{e.source or 'example'}: {len(e.images)} images; the checkpoint's chatpose.json "
        f"allows max_images={max_images}"
        for e in examples
        if len(e.images) > max_images
    )
    return examples


def _optimizer(config: TrainConfig, named) -> tuple[torch.optim.AdamW, float]:
    """AdamW over the trainable ``named`` parameters, and the adapter's rate as a share of
    --lr. Two groups: the head at --lr, everything else (LoRA, the pose token's rows) at
    --adapter-lr (the same by default)."""
    head_params = [p for name, p in named if name.startswith("head.")]
    other_params = [p for name, p in named if not name.startswith("head.")]
    adapter_lr = config.lr if config.adapter_lr is None else config.adapter_lr
    adapter_scale = adapter_lr / config.lr
    groups = [{"params": head_params, "lr_scale": 1.0}]
    if other_params:
        groups.append({"params": other_params, "lr_scale": adapter_scale})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, adapter_scale


def _train(config: TrainConfig, examples: Sequence[Example] | None) -> TrainResult:
    checkpoint = Checkpoint.open(config.base)
    shows_progress = sys.stderr.isatty() if config.progress is None else config.progress
    if not shows_progress:  # transformers' own bars too (loading, writing shards): a log file
        hf_logging.disable_progress_bar()  # gets the lines alone
    if config.threads:
        torch.set_num_threads(config.threads)
    resume_from = _resume_point(config, checkpoint)
    select_device(config.device)  # and the GPU asked for is there, before the data loads
    examples = _examples_for(config, checkpoint, examples)
    kinds = [example.kind for example in examples]
    _note_settings(config, kinds)
    # Now, not once the model has loaded: it refuses a mix that leaves nothing to train on.
    sampler = MixedSampler(kinds, config.mix, config.batch_size, config.seed)
    data_hash, data_files = fingerprint(examples)
    if not config.train_base:  # LoRA trains: an adapter already there sets its shape
        existing = resume_from / "adapter" if resume_from is not None else checkpoint.adapter_dir
        config = _with_adapter_shape(config, existing, note=resume_from is None)
    state = None
    if resume_from is not None:
        state = _saved_state(config, checkpoint, resume_from, (data_hash, data_files))

    tm, head_path = _model_to_train(config, checkpoint, resume_from, examples, sampler)
    encoder, encoded = _encoded_examples(tm, config, examples)
    _set_up_heads(tm, config, state, encoder, encoded, head_path)
    named = tm.named_trainable()
    optimizer, adapter_scale = _optimizer(config, named)
    start = 0
    if state is not None:
        if state["param_names"] != [name for name, _ in named]:
            raise TrainingError(
                f"{resume_from}: the trainable parameters differ from the saved run's"
            )
        start = _resumed(state, config, tm, optimizer, adapter_scale, sampler)
        _forget_logged_steps_after(config.out, start)
    # Only now, with the data, the model and the device ready: a run that fails to start
    # leaves --out as it found it.
    config.out.mkdir(parents=True, exist_ok=True)
    base_model = str(checkpoint.base_dir.resolve())
    if config.copy_base:
        if not (config.out / "base").exists():
            _copy_base(checkpoint.base_dir, config.out)
        base_model = "../base"
    state_extra = {
        "run": config.run_settings(),
        "data_fingerprint": data_hash,
        "data_files": data_files,
        "base_fingerprint": base_fingerprint(checkpoint),
        "base_weights": base_weights_sample(checkpoint),
    }
    run = _Run(config, tm, encoder, encoded, sampler, optimizer, named, base_model, state_extra)
    print(
        f"training {sum(p.numel() for _, p in named):,} parameters on {len(examples)} examples "
        f"({', '.join(f'{k} {kinds.count(k)}' for k in KINDS)}), steps {start + 1}..{config.steps}"
        f", device {tm.device.type}",
        file=sys.stderr,
    )
    return _run_steps(run, start, resume_from)


def _note_settings(config: TrainConfig, kinds: Sequence[str]) -> None:
    """Says which settings do not do what they may seem to: a mix that leaves out the data
    given, a warmup longer than the run."""
    for note in unused_kinds(kinds, config.mix):
        print(f"note: the mix leaves out {note}", file=sys.stderr)
    if config.warmup_steps > config.steps:
        print(
            f"note: --warmup-steps {config.warmup_steps} is more than --steps {config.steps}: "
            f"the run ends in its warmup, its learning rate rising to "
            f"{learning_rate(config, config.steps):.3g}, not --lr {config.lr:g}",
            file=sys.stderr,
        )


def _with_adapter_shape(config: TrainConfig, adapter_dir: Path | None, note: bool) -> TrainConfig:
    """`config` with the LoRA rank, alpha and dropout of the adapter in `adapter_dir`, which
    trains on as it is (the --lora-* options shape a new adapter only), so that the run records
    what it trains; `note`: say so when the options asked for another shape."""
    path = adapter_dir / "adapter_config.json" if adapter_dir is not None else None
    if path is None or not path.is_file():
        return config
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        shape = {
            "lora_rank": int(saved["r"]),
            "lora_alpha": int(saved["lora_alpha"]),
            "lora_dropout": float(saved.get("lora_dropout", 0.0)),
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable LoRA adapter config ({exc})") from None
    asked = {key: getattr(config, key) for key in shape}
    if note and asked != shape:
        print(
            f"note: {adapter_dir} holds a LoRA adapter of rank {shape['lora_rank']}, alpha "
            f"{shape['lora_alpha']}, dropout {shape['lora_dropout']}, which trains on as it is; "
            "--lora-rank, --lora-alpha and --lora-dropout shape a new adapter only",
            file=sys.stderr,
        )
    return dataclasses.replace(config, **shape)


def _saved_state(
    config: TrainConfig, checkpoint: Checkpoint, resume_from: Path, data: tuple[str, list]
) -> dict:
    """The training state --resume goes on from, once it is known to fit this run."""
    try:
        state = load_state(resume_from)
    except TrainingError as exc:
        raise TrainingError(f"{exc}{earlier_one(resume_from)}") from None
    _check_resume(config, state, data, checkpoint, resume_from)
    if state["step"] >= config.steps:
        raise TrainingError(
            f"--resume: {resume_from} is at step {state['step']}; ask for more --steps"
        )
    return state


def _set_up_heads(
    tm: TrainingModel,
    config: TrainConfig,
    state: dict | None,
    encoder: Encoder,
    encoded: Sequence[EncodedExample],
    head_path: Path | None,
) -> None:
    """The SMPL head as the resumed run left it, or its input centred on this data; and the
    action classifier, when the data names actions."""
    if state is not None:
        tm.head.load_state_dict(state["head"])
        shift = state["head_input_shift"]  # saved on the CPU; the run may be on CUDA
        tm.head_input_shift = None if shift is None else shift.to(tm.device)
    elif config.center_head_input:
        tm.head_input_shift = _head_input_shift(tm, encoder, encoded, config)
        if head_path is not None and tm.head_input_shift is not None:
            tm.unfold_head_input_shift()
    if actions := encoder.actions:
        tm.action_classifier = torch.nn.Linear(tm.head[0].in_features, len(actions))
        tm.action_classifier.to(tm.device)
        if state is not None and state.get("action_classifier") is not None:
            tm.action_classifier.load_state_dict(state["action_classifier"])


def _copy_base(base_dir: Path, out: Path) -> None:
    """`--copy-base`: the base model into OUT/base, whole or not at all (a partial copy of a
    13B model would stay on a full disk)."""
    try:
        write_folder_whole(
            out / "base", lambda copy: shutil.copytree(base_dir, copy, dirs_exist_ok=True)
        )
    except shutil.Error as exc:  # one entry per file: (source, target, why)
        source, _, why = exc.args[0][0]
        raise OSError(f"--copy-base: cannot copy {source} into {out} ({why})") from None


@dataclass
class _Run:
    """What a run's steps need, once its data, model and optimizer are ready."""

    config: TrainConfig
    tm: TrainingModel
    encoder: Encoder
    encoded: Sequence[EncodedExample]
    sampler: MixedSampler
    optimizer: torch.optim.AdamW
    named: list[tuple[str, torch.nn.Parameter]]  # what it trains
    base_model: str  # what the run's checkpoints name as their base
    state_extra: dict  # what each checkpoint's state records besides the training state

    def names(self) -> list[str]:
        """Of the parameters trained, as checkpoints save them."""
        return [name for name, _ in self.named]

    def save(self, step: int) -> Path:
        return save_checkpoint(
            self.config.out,
            step,
            self.tm,
            self.optimizer,
            self.names(),
            self.base_model,
            self.state_extra,
            self.config.keep_last,
        )


def _run_steps(run: _Run, start: int, last_saved: Path | None) -> TrainResult:
    """The optimizer steps after ``start``, with the progress bar, the log and the periodic
    checkpoints; a NaN stops the run, keeping ``last_saved`` (or the latest saved since)."""
    config, tm, optimizer, out = run.config, run.tm, run.optimizer, run.config.out
    diverged_at = _diverged_step(out)
    losses: list[tuple[int, float, float, float]] = []
    window: list[tuple[float, float, float]] = []
    window_start = time.perf_counter()
    params = [p for _, p in run.named]
    bar = tqdm(
        total=config.steps,
        initial=start,
        unit="step",
        file=sys.stderr,
        disable=None if config.progress is None else not config.progress,
        dynamic_ncols=True,
    )
    with bar:  # closed before an error message is printed under it
        for step in range(start + 1, config.steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step) * group["lr_scale"]
            optimizer.zero_grad(set_to_none=True)
            totals = _accumulated_gradients(
                tm, config, run.encoder, run.encoded, run.sampler, step, last_saved
            )
            norm = torch.nn.utils.clip_grad_norm_(
                params, config.max_grad_norm if config.max_grad_norm > 0 else math.inf
            )
            if not torch.isfinite(norm):
                raise _stopped(out, step, _diverged(step, "gradient", tuple(totals), last_saved))
            optimizer.step()
            losses.append((step, *map(float, totals)))
            bar.set_postfix_str(_figures(*totals), refresh=False)
            bar.update()
            if diverged_at is not None and step >= diverged_at:  # past the NaN: a plain run
                (out / DIVERGED_NAME).unlink(missing_ok=True)
                diverged_at = None
            window.append(tuple(totals))
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - window_start
                rate = len(window) / elapsed
                lr = optimizer.param_groups[0]["lr"]
                _log(out, step, config.steps, np.mean(window, axis=0), rate, lr)
                window, window_start = [], time.perf_counter()
            if (config.save_every and step % config.save_every == 0) or step == config.steps:
                if not all(
                    bool(torch.isfinite(p).all()) for p in params + list(tm.head.parameters())
                ):
                    raise _stopped(out, step, _diverged(step, "weights", tuple(totals), last_saved))
                saving = time.perf_counter()
                last_saved = run.save(step)
                window_start += time.perf_counter() - saving  # steps/s counts training only
                tqdm.write(f"saved {last_saved}", file=sys.stderr)
    return TrainResult(config.steps, last_saved, losses)


def _model_to_train(
    config: TrainConfig,
    checkpoint: Checkpoint,
    resume_from: Path | None,
    examples: Sequence[Example],
    sampler: MixedSampler,
) -> tuple[TrainingModel, Path | None]:
    """The model as the run starts it: the base with its adapter, or a resumed run's saved
    one; and the SMPL head it starts from (None: a fresh one)."""
    model_source = checkpoint
    if resume_from is not None and config.train_base:
        # The whole model was saved: resume from its weights.
        model_source = Checkpoint.open(resume_from)
        adapter_dir, head_path = None, resume_from / HEAD_NAME
    elif resume_from is not None:
        adapter_dir, head_path = resume_from / "adapter", resume_from / HEAD_NAME
    else:
        adapter_dir = checkpoint.adapter_dir
        keep_head = _keeps_base_head(config, checkpoint, examples, sampler)
        head_path = checkpoint.head_path if keep_head else None
    tm = load_training_model(model_source, config, adapter_dir, head_path)
    if head_path is None:
        posed = [pose for e in examples if e.kind in sampler.kinds for pose in e.poses]
        tm.head.start_at(mean_pose_6d(np.stack(posed)))
    return tm, head_path


def _keeps_base_head(
    config: TrainConfig,
    checkpoint: Checkpoint,
    examples: Sequence[Example],
    sampler: MixedSampler,
) -> bool:
    """Whether the run starts from the base's SMPL head (`--head-init`). `auto` keeps the head
    of a training output (an adapter, or a training state: a `--train-base` run saves none),
    and trains a fresh one on any other base, as the paper does. A fresh head must train: it
    needs the pose loss, and poses in the examples of the kinds `sampler` draws."""
    if config.head_init == "auto":
        trained = checkpoint.adapter_dir is not None or (checkpoint.root / STATE_NAME).is_file()
        keep = trained
        if not trained:
            print(
                f"note: the SMPL head starts fresh, at the training data's mean pose: "
                f"{checkpoint.root} is not a training output (--head-init base keeps its head)",
                file=sys.stderr,
            )
    else:
        keep = config.head_init == "base"
    if not keep and config.pose_weight == 0:
        raise TrainingError(
            "--pose-weight 0 trains no SMPL head, and this one would start fresh: the "
            "checkpoint would give random poses; add --head-init base to keep the base's head"
        )
    if not keep and not any(e.poses for e in examples if e.kind in sampler.kinds):
        raise TrainingError(
            f"no example the mix draws carries a pose (it draws {', '.join(sampler.kinds)}), so "
            "the SMPL head, which would start fresh, never trains: the checkpoint would give "
            "random poses; add --head-init base to keep the base's head, or give data with poses"
        )
    return keep


def _encoded_examples(
    tm: TrainingModel, config: TrainConfig, examples: Sequence[Example]
) -> tuple[Encoder, list[EncodedExample]]:
    """Every example as the model reads it, checked all at once (every bad record named, not
    one a model load), with the actions the auxiliary action loss tells apart."""
    positions = _max_positions(tm.model)
    if config.max_length and config.max_length > positions:  # the service would refuse them
        raise TrainingError(
            f"--max-length {config.max_length}: this model reads at most {positions} tokens "
            "(its max_position_embeddings); longer examples could not be served"
        )
    max_length = config.max_length or positions
    actions = sorted({e.action for e in examples if e.action}) if config.action_weight else []
    if config.action_weight and not actions:
        print("note: --action-weight does nothing: no example names an action", file=sys.stderr)
    encoder = Encoder(tm.processor, tm.config, tm.pose_token_id, max_length, actions)
    encoded, problems = [], []
    for example in examples:
        try:
            encoded.append(encoder.encode(example))
        except DatasetError as exc:
            problems.append(str(exc))
    _refuse_examples(problems)
    _check_encoder(encoder, examples, encoded)
    return encoder, encoded


def _resumed(
    state: dict,
    config: TrainConfig,
    tm: TrainingModel,
    optimizer: torch.optim.Optimizer,
    adapter_scale: float,
    sampler: MixedSampler,
) -> int:
    """Puts the optimizer, the sampler and the random generators where the saved run left
    them, so that the resumed steps are the ones it would have taken; the step it is at."""
    optimizer.load_state_dict(state["optimizer"])
    for group, scale in zip(optimizer.param_groups, (1.0, adapter_scale), strict=False):
        group["lr_scale"] = scale  # this run's rates (a resume may lower --lr), not the saved
    for _ in range(state["step"] * config.grad_accum):
        sampler.next_batch()
    torch.set_rng_state(state["torch_rng"])
    cuda_rng = state["cuda_rng"]
    if isinstance(cuda_rng, list):  # saved by earlier runs: every card's, by index
        card = tm.device.index or 0
        cuda_rng = cuda_rng[card] if card < len(cuda_rng) else None
    if tm.device.type == "cuda" and cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, tm.device)
    return state["step"]


def _accumulated_gradients(
    tm: TrainingModel,
    config: TrainConfig,
    encoder: Encoder,
    encoded: Sequence[EncodedExample],
    sampler: MixedSampler,
    step: int,
    last_saved: Path | None,
) -> np.ndarray:
    """The gradients of one optimizer step, over ``config.grad_accum`` batches; returns the
    step's mean (total, text, pose) losses. A NaN stops the run (``_stopped``)."""
    totals = np.zeros(3)
    for _ in range(config.grad_accum):
        try:
            batch = encoder.collate([encoded[i] for i in sampler.next_batch()])
        except DatasetError as exc:  # an image file removed or changed since it was read
            kept = (
                f"the last checkpoint {last_saved} is kept; with the file as it was, "
                "--resume continues from it"
                if last_saved is not None
                else "no checkpoint was saved yet"
            )
            raise DatasetError(f"step {step}: {exc}; training stopped, {kept}") from None
        terms = tm.forward(
            batch.to(tm.device, tm.dtype),
            config.text_weight,
            config.pose_weight,
            config.action_weight,
        )
        figures = terms.floats()
        if not all(math.isfinite(x) for x in figures):
            raise _stopped(config.out, step, _diverged(step, "loss", figures, last_saved))
        if terms.total.requires_grad:  # a head-only run on a batch without poses
            (terms.total / config.grad_accum).backward()
        totals += np.array(figures) / config.grad_accum
    return totals


HEAD_SHIFT_EXAMPLES = 256


def _head_input_shift(
    tm: TrainingModel, encoder: Encoder, encoded: Sequence[EncodedExample], config: TrainConfig
) -> torch.Tensor | None:
    """The mean pose state of the untrained model over up to HEAD_SHIFT_EXAMPLES examples with
    poses, spread over the data (a fixed stride, so every kind is in it). Training the head on
    centred states matters: the states before a pose token share one large vector (a random
    small LM's: norm ~16 against ~0.2 a dimension of prompt-dependent part); uncentred, Adam's
    steps on the first layer's weights move every unit along that vector at once, a random
    walk that drowns the prompt-dependent signal, and the loss stalls at the mean pose's
    (measured on the demo model: thousands of steps without progress; centred, it falls from
    the start). The shift is folded into the saved head, so checkpoints are unchanged."""
    with_poses = [item for item in encoded if item.pose_positions]
    if not with_poses:
        return None
    stride = max(1, len(with_poses) // HEAD_SHIFT_EXAMPLES)
    sample = with_poses[::stride][:HEAD_SHIFT_EXAMPLES]
    batches = [
        encoder.collate(sample[i : i + config.batch_size]).to(tm.device, tm.dtype)
        for i in range(0, len(sample), config.batch_size)
    ]
    return tm.mean_pose_state(batches)


def _diverged_step(out: Path) -> int | None:
    try:
        return int(json.loads((out / DIVERGED_NAME).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stopped(out: Path, step: int, message: str) -> TrainingDiverged:
    """The error that stops a diverged run, after marking OUT so that its resume may lower
    the rate or the clipping norm (`_check_resume`)."""
    (out / DIVERGED_NAME).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")
    return TrainingDiverged(message)


def _diverged(step: int, what: str, figures, last_saved: Path | None) -> str:
    total, ce, pose = figures
    lower = "a lower --lr (and --adapter-lr, if given) or --max-grad-norm"
    if last_saved is None:
        kept = "no checkpoint was saved yet"
    elif what != "weights" and last_saved.name == step_dir_name(step - 1):
        # Its weights gave this loss or gradient: a resume meets the same batch with them.
        earlier = [name for _, name in sorted(steps_before(last_saved))]
        instead = (
            f"write the name of an earlier one ({', '.join(earlier)}) into "
            f"{last_saved.parent / LATEST_NAME} and --resume with {lower}"
            if earlier
            else "no earlier one is kept (--keep-last)"
        )
        kept = (
            f"the last checkpoint {last_saved} is kept untouched, but its weights gave this "
            f"{what}, and a resume from it meets the same batch at step {step}: {instead}, or "
            f"start the run again with {lower}"
        )
    else:
        kept = (
            f"the last good checkpoint {last_saved} is kept untouched; --resume with {lower} "
            "continues from it"
        )
    what = "weights are" if what == "weights" else f"{what} is"
    return (
        f"step {step}: the {what} not finite (loss {total:.6g}, CE {ce:.6g}, pose L1 "
        f"{pose:.6g}); training stopped, {kept}"
    )


def _forget_logged_steps_after(out: Path, step: int) -> None:
    """Drops the log's lines past `step`: a resumed run logs those steps again."""
    path = out / LOG_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the interruption
    write_text_atomically(path, "".join(kept))  # a full disk keeps the whole log


def _figures(total: float, ce: float, pose: float) -> str:
    return f"loss {total:.4f}  ce {ce:.4f}  pose_l1 {pose:.4f}"


def _log(out: Path, step: int, steps: int, figures, rate: float, lr: float) -> None:
    total, ce, pose = (float(x) for x in figures)
    tqdm.write(  # above the progress bar, when one is drawn
        f"step {step}/{steps}  {_figures(total, ce, pose)}  lr {lr:.2e}  {rate:.2f} steps/s",
        file=sys.stderr,
    )
    record = {"step": step, "loss": total, "ce": ce, "pose_l1": pose, "lr": lr, "steps_per_s": rate}
    with open(out / LOG_NAME, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


# Settings a resume may change, with a note: what a diverged run needs to get past the step
# that gave a NaN (the rest would make the resumed run another run).
RESUME_MAY_LOWER = ("lr", "adapter_lr", "max_grad_norm")
# The adapter a run resumes sets its LoRA shape (`_with_adapter_shape`); runs saved before that
# recorded the options as given, which the adapter may not have.
RESUME_FROM_ADAPTER = ("lora_rank", "lora_alpha", "lora_dropout")


def _lower(key: str, value: float, saved: float) -> bool:
    if key == "max_grad_norm":  # 0: no clipping, the loosest
        return value > 0 and (saved == 0 or value < saved)
    if key == "adapter_lr":  # 0 would freeze what the run trains: another run
        return 0 < value < saved
    return value < saved


def _check_resume(
    config: TrainConfig,
    state: dict,
    data: tuple[str, list[list]],
    checkpoint: Checkpoint,
    path: Path,
) -> None:
    sampled = state.get("base_weights")  # none in runs saved before it was sampled
    if sampled is not None and sampled != base_weights_sample(checkpoint):
        raise TrainingError(
            f"--resume: the weights of the base {config.base} are not those the run in {path} "
            "was trained on (another model, or one saved over it); resume with that base"
        )
    saved = dict(state.get("run", {}))
    if isinstance(saved.get("train_base"), bool):  # saved before train_base took a scope
        saved["train_base"] = "all" if saved["train_base"] else None
    diverged = (config.out / DIVERGED_NAME).is_file()
    settings = config.run_settings()
    if (settings["adapter_lr"] is None) != (saved.get("adapter_lr") is None) and "lr" in saved:
        # One run gave --adapter-lr and the other not (the rate of --lr): compare the rates.
        for run in (settings, saved):
            run["adapter_lr"] = run["lr"] if run["adapter_lr"] is None else run["adapter_lr"]
    for key, value in settings.items():
        if key in RESUME_FROM_ADAPTER or key not in saved or saved[key] == value:
            continue
        if key == "base" and state.get("base_fingerprint") == base_fingerprint(checkpoint):
            print(
                f"note: --resume from {value}, the run's base {saved[key]} moved", file=sys.stderr
            )
            continue
        if key in RESUME_MAY_LOWER and diverged and _lower(key, value, saved[key]):
            print(
                f"note: --resume with {key} {value!r}; the run in {path} used {saved[key]!r}",
                file=sys.stderr,
            )
        else:
            after_nan = (
                " (after a NaN: a lower lr, adapter_lr or max_grad_norm)" if diverged else ""
            )
            raise TrainingError(
                f"--resume: {key} is {value!r} but the run in {path} used {saved[key]!r}; "
                f"resume with the same settings{after_nan}"
            )
    if state.get("data_fingerprint") != data[0]:
        files = state.get("data_files")  # none in runs saved before it was kept
        change = f": {data_change(files, data[1])}" if files else ""
        raise TrainingError(
            f"--resume: the training data differ from those of the run in {path}{change}"
        )


def _refuse_examples(problems: Iterable[str], shown: int = 3) -> None:
    """DatasetError naming the first ``shown`` of ``problems`` (one per example) and how many
    there are; nothing when there are none."""
    problems = list(problems)
    if len(problems) == 1:
        raise DatasetError(problems[0])
    if problems:
        more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
        raise DatasetError(
            f"{len(problems)} examples cannot be trained on: " + "; ".join(problems[:shown]) + more
        )


def _check_encoder(
    encoder: Encoder, examples: Sequence[Example], encoded: Sequence[EncodedExample]
) -> None:
    """Compare our tokenization with the processor's on one example with and one without
    images (the processor is what the service runs)."""
    checked = set()
    for example, item in zip(examples, encoded, strict=True):
        key = bool(example.images)
        if key not in checked:
            encoder.check_against_processor(example, item)
            checked.add(key)
        if len(checked) == 2:
            break


def _max_positions(model: torch.nn.Module) -> int:
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    config = model.config
    text = getattr(config, "text_config", config)
    return int(getattr(text, "max_position_embeddings", 2048))
