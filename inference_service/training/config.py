"""A training run's settings (`TrainConfig`) and the errors that refuse or stop a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from inference_service.training.datasets import DataSpec
from inference_service.training.losses import POSE_WEIGHT, TEXT_WEIGHT

HEAD_INITS = ("auto", "fresh", "base")
# After the warmup: constant, or falling linearly towards zero, the last step at
# lr / (steps - warmup) (LISA's WarmupDecayLR, which ChatPose's training code uses).
LR_SCHEDULES = ("constant", "linear")
MAX_LR = 1.0  # no AdamW run learns at more; the demo's stages use 1e-3 at most
# None: LoRA (the paper's)
TRAIN_BASE_SCOPES = (None, "all", "embeddings", "context", "vision", "projector", "lm_head")


class TrainingError(RuntimeError):
    """The run cannot start or continue (bad settings, nothing to resume, ...)."""


class TrainingDiverged(TrainingError):
    """A NaN or infinite loss or gradient; the message names the step and the last checkpoint."""


@dataclass
class TrainConfig:
    base: Path  # a checkpoint directory (docs/checkpoints.md)
    out: Path
    data: list[DataSpec] = field(default_factory=list)
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    adapter_lr: float | None = None  # LoRA and pose-token rows (with train_base: the base
    # weights it trains); None: lr; 0: kept as they are
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after the warmup: LR_SCHEDULES
    max_grad_norm: float = 1.0  # 0 = no clipping
    lora_rank: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    mix: tuple[float, float, float] = (1.0, 2.0, 1.0)  # text_to_pose : image_to_pose : chat
    text_weight: float = TEXT_WEIGHT
    pose_weight: float = POSE_WEIGHT
    # λ of an auxiliary loss (not the paper's): the cross-entropy of a linear classifier that
    # reads the head's input and names the action of examples that carry one (the synthetic
    # corpus's action phrasings). The classifier trains with the head and is not exported.
    action_weight: float = 0.0
    save_every: int = 100  # 0 = only at the end
    keep_last: int = 0  # checkpoints kept; 0 = all
    log_every: int = 10
    # A progress bar with the loss figures on stderr: None draws it when stderr is a terminal
    # (a log file gets the log lines alone).
    progress: bool | None = None
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    head_init: str = "auto"  # auto: the base's head if the base is a training output, else fresh
    copy_base: bool = False
    max_length: int | None = None  # default: the LLM's max_position_embeddings
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    # Recompute each layer's activations in the backward pass instead of keeping them: a
    # 13B model's batch of images fits a GPU, for about a third more time a step.
    gradient_checkpointing: bool = False
    center_head_input: bool = True  # train the head on centred states (_head_input_shift)
    # The base's own weights train (no LoRA), and checkpoints hold the whole model: for a base
    # that was never trained, like the demo's scaffold. "all" (the vision side too) or
    # "embeddings" (the LM's input embeddings), "context" (those and the LM's first layer's
    # MLP, which build_demo.condition_base's context layer trains), "vision", "projector", or
    # "lm_head" (the LM's output layer, which writes the answer and not the states the head
    # reads); None: the paper's recipe (LoRA, frozen vision).
    train_base: str | None = None

    def __post_init__(self) -> None:
        # expanduser: the shell leaves `--out=~/runs` as it is.
        self.base, self.out = Path(self.base).expanduser(), Path(self.out).expanduser()
        self.mix = tuple(float(x) for x in self.mix)
        positive = ("steps", "batch_size", "grad_accum", "lora_rank", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "keep_last", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        finite = (
            "lr",
            "adapter_lr",
            "max_grad_norm",
            "text_weight",
            "pose_weight",
            "action_weight",
        )
        for name in finite:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # nan would pass every test below
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("lr", "adapter_lr"):
            value = getattr(self, name)
            if value is not None and value > MAX_LR:  # past about 1e38 AdamW's step overflows
                raise ValueError(
                    f"{name} must be at most {MAX_LR:g} (AdamW moves each weight by about "
                    f"that much a step), got {value:g}"
                )
        if not self.max_grad_norm >= 0:
            raise ValueError(
                f"max_grad_norm must be 0 (no clipping) or more, got {self.max_grad_norm}"
            )
        if self.adapter_lr is not None and not self.adapter_lr >= 0:
            raise ValueError(f"adapter_lr must be 0 or more, got {self.adapter_lr}")
        if len(self.mix) != 3 or any(not x >= 0 for x in self.mix) or not sum(self.mix) > 0:
            raise ValueError(f"mix must be three ratios >= 0, not all 0, got {self.mix}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not (self.text_weight >= 0 and self.pose_weight >= 0) or not (
            self.text_weight + self.pose_weight > 0
        ):
            raise ValueError(
                f"text_weight and pose_weight must be >= 0 and not both 0, got "
                f"{self.text_weight} and {self.pose_weight}"
            )
        if not self.action_weight >= 0:
            raise ValueError(f"action_weight must be 0 or more, got {self.action_weight}")
        if not 0 <= self.seed < 2**63 - 1:  # torch's seeds are 64-bit; the run seeds seed + 1
            raise ValueError(f"seed must be from 0 to 2**63 - 2, got {self.seed}")
        if self.train_base not in TRAIN_BASE_SCOPES:
            raise ValueError(
                f"train_base must be one of {TRAIN_BASE_SCOPES}, got {self.train_base!r}"
            )
        if self.train_base and self.adapter_lr == 0:
            raise ValueError("train_base with adapter_lr 0 would train nothing of the base")
        if self.train_base and self.copy_base:
            raise ValueError("copy_base does nothing with train_base: checkpoints hold the model")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}")

    def run_settings(self) -> dict:
        """What must not change between a run and its resume (the data go by fingerprint)."""
        keys = (
            "batch_size",
            "grad_accum",
            "lr",
            "adapter_lr",
            "weight_decay",
            "warmup_steps",
            "lr_schedule",
            "max_grad_norm",
            "lora_rank",
            "lora_alpha",
            "lora_dropout",
            "mix",
            "text_weight",
            "pose_weight",
            "action_weight",
            "seed",
            "head_init",
            "copy_base",
            "center_head_input",
            "train_base",
        )
        settings = {key: getattr(self, key) for key in keys}
        settings["mix"] = list(self.mix)
        settings["base"] = str(self.base.resolve())
        return settings
