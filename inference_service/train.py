"""`python -m inference_service.train`: fine-tune a ChatPose checkpoint (docs/training.md).

    python -m inference_service.train --base CHECKPOINT_DIR --out DIR
        --data FORMAT PATH [KEY=VALUE ...] [--data ...]
        [--steps N] [--batch-size B] [--lr 2e-4] [--lora-rank 128] [--lora-alpha 256]
        [--mix 1:2:1] [--save-every N] [--resume] [--seed S] [--device auto|cpu|cuda]

Data formats (`--data`, repeatable):

    posescript CAPTIONS.json poses=POSES.npz [z_up=true|false] [ids=SPLIT.json] [phrasing=...]
    posescript CAPTIONS.json amass=AMASS_DIR index=INDEX.json [ids=SPLIT.json]
        [missing=error|skip] [phrasing=...]   (PoseScript's release, its poses read from AMASS)
    pairs POSES.npz [images=DIR] [frame=upright|camera] [crop=auto|hmr|pixels|none] [phrasing=...]
    llava CONVERSATIONS.json [poses=POSES.npz] [images=DIR] [missing=error|skip]
        [z_up=true|false]
    corpus CORPUS.npz [split=train|val|test|all] [phrasing=mixed|release|chat]

Exit status: 0 done, 2 bad arguments, data or checkpoint, 3 stopped on a NaN/inf loss (the
last good checkpoint is kept), 4 out of memory, 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from inference_service.commands import (
    DEVICE_HELP,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    device_argument,
    non_negative_int,
    positive_float,
    positive_int,
    stops_as_interrupts,
    user_path,
    utf8_output,
)
from inference_service.errors import ChatPoseError, ModelOutOfMemoryError

EXIT_DIVERGED = 3  # not 1: Python exits 1 on an unexpected error (a bug), with its traceback
EXIT_OUT_OF_MEMORY = 4


def _mix(text: str) -> tuple[float, float, float]:
    parts = text.split(":")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    finite = all(math.isfinite(v) for v in values)
    if len(values) != 3 or not finite or any(not v >= 0 for v in values) or not sum(values) > 0:
        raise argparse.ArgumentTypeError(
            f"expected three ratios text:image:chat such as 1:2:1, got {text!r}"
        )
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inference_service.train",
        description="Fine-tune a ChatPose checkpoint: LoRA on the LLM, the pose token's "
        "embedding rows and the SMPL head (vision tower and projector frozen).",
    )
    parser.add_argument(
        "--base", type=user_path, required=True, help="checkpoint directory to train"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        action="append",
        metavar="WORD",
        default=[],
        help="FORMAT PATH [KEY=VALUE ...]: posescript CAPTIONS.json poses=POSES.npz"
        " [z_up=true|false] [ids=SPLIT.json] | posescript CAPTIONS.json amass=AMASS_DIR"
        " index=INDEX.json [ids=SPLIT.json] [missing=error|skip] | pairs POSES.npz [images=DIR]"
        " [frame=upright|camera] [crop=auto|hmr|pixels|none]"
        " | llava CONVERSATIONS.json [poses=NPZ] [images=DIR] [missing=error|skip]"
        " [z_up=true|false]"
        " | corpus CORPUS.npz [split=train|val|test|all]; posescript, pairs and corpus also"
        " take [phrasing=mixed|release|chat] (docs/training.md); repeatable",
    )
    parser.add_argument("--out", type=user_path, required=True, help="output directory")
    parser.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument(
        "--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step"
    )
    parser.add_argument("--lr", type=positive_float, default=2e-4)
    parser.add_argument(
        "--adapter-lr",
        type=float,
        help="learning rate of the LoRA layers and the pose token's rows, or of the base "
        "weights --train-base trains (default: --lr; 0 keeps them as they are); the SMPL head "
        "always trains at --lr",
    )
    parser.add_argument(
        "--text-weight",
        type=float,
        help="λ_t, the weight of the answer's cross-entropy (default 1.0, the paper's)",
    )
    parser.add_argument(
        "--pose-weight",
        type=float,
        help="λ_θ, the weight of the pose L1 loss (default 0.1, the paper's)",
    )
    parser.add_argument(
        "--action-weight",
        type=float,
        default=0.0,
        help="weight of an auxiliary loss, not the paper's: a linear classifier on the head's "
        "input names the action of the examples that carry one (the synthetic corpus's action "
        "phrasings); the logged loss includes it (default 0: off)",
    )
    parser.add_argument("--warmup-steps", type=non_negative_int, default=0)
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "linear"),  # config.LR_SCHEDULES
        default="constant",
        help="after the warmup: constant, or falling linearly towards zero over the remaining "
        "steps, the last at lr / their number (LISA's WarmupDecayLR, which ChatPose trains with)",
    )
    parser.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)"
    )
    parser.add_argument("--lora-rank", type=positive_int, default=128)
    parser.add_argument("--lora-alpha", type=positive_int, default=256)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--mix",
        type=_mix,
        default=(1.0, 2.0, 1.0),
        help="examples per batch text_to_pose:image_to_pose:chat (default 1:2:1, the paper's "
        "image:text:VQA = 2:1:1)",
    )
    parser.add_argument(
        "--save-every", type=non_negative_int, default=100, help="checkpoint period (0: at end)"
    )
    parser.add_argument(
        "--keep-last", type=non_negative_int, default=0, help="checkpoints kept (0: all)"
    )
    parser.add_argument("--log-every", type=positive_int, default=10)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--device", default="auto", type=device_argument, help=DEVICE_HELP)
    parser.add_argument(
        "--head-init",
        choices=("auto", "fresh", "base"),
        default="auto",
        help="SMPL head start: fresh (seeded), the base checkpoint's, or auto (the base's when "
        "the base is a training output, else fresh)",
    )
    parser.add_argument(
        "--copy-base",
        action="store_true",
        help="copy the base model into OUT/base (self-contained checkpoints) instead of "
        "referring to it by absolute path",
    )
    parser.add_argument("--max-length", type=positive_int, help="longest example in tokens")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less GPU memory, slower steps",
    )
    parser.add_argument(
        "--no-center-head-input",
        dest="center_head_input",
        action="store_false",
        help="train the SMPL head on raw states instead of states centred on their mean at "
        "the start (the shift is folded into the saved head either way)",
    )
    parser.add_argument(
        "--train-base",
        nargs="?",
        const="all",
        # config.TRAIN_BASE_SCOPES
        choices=("all", "embeddings", "context", "vision", "projector", "lm_head"),
        help="train the base's own weights instead of LoRA, and save whole models: every "
        "weight (all, the default; language model, projector, vision tower), the language "
        "model's token embeddings, those and the LM's first layer's MLP (context: the demo "
        "base's context layer), the vision tower and the projector, the projector alone "
        "(LLaVA's feature alignment), or the LM's output layer alone (lm_head: the answer's "
        "words, not the states the head reads); for a base that was never trained, like the "
        "demo scaffold. "
        "The paper's recipe (LoRA, frozen vision side) is the default",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    utf8_output(sys.stdout)  # its help holds λ, which Windows' code pages lack
    parser = build_parser()
    args = parser.parse_args(argv)
    from inference_service.checkpoint import work_offline

    work_offline()  # before transformers is imported: no request to the Hub, ever
    # Imported here so that --help works without loading torch.
    try:
        import torch

        from inference_service.training.config import TrainConfig, TrainingDiverged, TrainingError
        from inference_service.training.datasets import DatasetError, DataSpec, parse_data_spec
        from inference_service.training.loop import train
    except ModuleNotFoundError as exc:  # a client-only install (`pip install .`)
        from inference_service.cli import missing_service_package

        print(f"error: {missing_service_package(exc)}", file=sys.stderr)
        return EXIT_USAGE

    try:
        specs: list[DataSpec] = [parse_data_spec(words) for words in args.data]
        config = TrainConfig(
            base=args.base,
            out=args.out,
            data=specs,
            steps=args.steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            adapter_lr=args.adapter_lr,
            warmup_steps=args.warmup_steps,
            lr_schedule=args.lr_schedule,
            max_grad_norm=args.max_grad_norm,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            mix=args.mix,
            save_every=args.save_every,
            keep_last=args.keep_last,
            log_every=args.log_every,
            resume=args.resume,
            seed=args.seed,
            device=args.device,
            head_init=args.head_init,
            copy_base=args.copy_base,
            max_length=args.max_length,
            threads=args.threads,
            gradient_checkpointing=args.gradient_checkpointing,
            center_head_input=args.center_head_input,
            train_base=args.train_base,
            action_weight=args.action_weight,
            **{
                name: value
                for name in ("text_weight", "pose_weight")
                if (value := getattr(args, name)) is not None
            },
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        with stops_as_interrupts():  # `kill`, a closed terminal: said as Ctrl-C is
            result = train(config)
    except KeyboardInterrupt:
        print(f"interrupted; {_last_checkpoint(config.out)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except ModelOutOfMemoryError as exc:  # the base model itself: no setting of the run helps
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except (TrainingError, DatasetError, ChatPoseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, torch.OutOfMemoryError) as exc:
        problem = str(exc).split("\n")[0] or type(exc).__name__
        print(
            f"error: out of memory ({problem}); lower --batch-size (a higher --grad-accum keeps "
            "the batch), add --gradient-checkpointing, or lower --max-length; "
            f"{_last_checkpoint(config.out)}",
            file=sys.stderr,
        )
        return EXIT_OUT_OF_MEMORY
    except OSError as exc:  # --out under a file, read-only, or a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"error: {where}{exc.strerror or exc}; {_last_checkpoint(config.out)}", file=sys.stderr
        )
        return EXIT_USAGE
    print(f"done: step {result.step}, checkpoint {result.checkpoint}", file=sys.stderr)
    return 0


def _last_checkpoint(out: Path) -> str:
    from inference_service.training.checkpoints import latest_checkpoint, run_files
    from inference_service.training.config import TrainingError

    try:
        latest = latest_checkpoint(out) if out.is_dir() else None
    except TrainingError:
        latest = None
    ours = run_files(out) if latest is None and out.is_dir() else []
    if ours:  # they would refuse the same command again: said now
        return (
            f"no checkpoint was saved yet (delete {', '.join(sorted(ours))} from {out} to start "
            "again, or choose another --out)"
        )
    if latest is None:
        return "no checkpoint was saved yet"
    return f"the last checkpoint is {latest}; --resume continues from it"


if __name__ == "__main__":
    sys.exit(main())
