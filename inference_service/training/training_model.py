"""The model as it trains (`TrainingModel`, `load_training_model`): the base with LoRA or its
own weights made trainable, the SMPL head, and the forward pass that gives the loss.

What is trained (the paper, Sec. 3.2):

- LoRA (peft) on the language model's attention and MLP projections (q/k/v/o, gate/up/down of
  every layer); the vision tower and the projector are frozen, as is every base weight;
- the pose token's row of the input embeddings and of the output layer, through peft's
  `trainable_token_indices` (a LoRA adapter alone never trains a token's embedding, and a new
  token starts with no meaning). Only that row is trained and saved (2 x H numbers in the
  adapter), not the whole embedding matrices as `modules_to_save` would (2 x 32000 x 5120
  numbers for a 13B LLaVA); the service merges it like the LoRA weights;
- the SMPL head, from a fresh seeded initialisation that answers the mean pose of the
  training data (or, with head_init "base", from the base checkpoint's head).

With `train_base` (not the paper's recipe; for a base that was never trained) the base's own
weights train instead of LoRA, and checkpoints hold the whole model in `step-N/base/`: "all" of
them, only the LM's token "embeddings" (the demo's bag-of-words base learns its words that way,
docs/demo_model_experiments.md, second round), only the "vision" tower and the projector (the
demo's vision tower learns to see the mannequin that way), or only the "projector" (LLaVA's
first stage, feature alignment: a trained tower's tokens mapped into the LM).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from inference_service.checkpoint import ChatPoseConfig, Checkpoint
from inference_service.loading import (
    apply_adapter,
    check_gpu_memory,
    check_host_memory,
    check_vocabulary,
    ensure_pose_token,
    load_adapter,
    load_base,
    quiet_peft,
    select_device,
)
from inference_service.pose_head import PoseHead
from inference_service.training.config import TrainConfig, TrainingError
from inference_service.training.encoding import Batch
from inference_service.training.losses import IGNORE_INDEX, LossTerms, chatpose_loss

# LoRA targets: the projections of the language model's layers only (the CLIP tower has
# q/k/v projections too, which must stay frozen).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
FROZEN_PREFIXES = ("vision_tower", "multi_modal_projector")


@dataclass
class TrainingModel:
    model: torch.nn.Module  # the peft model
    head: PoseHead
    processor: object
    config: ChatPoseConfig
    pose_token_id: int
    device: torch.device
    dtype: torch.dtype
    base_dir: Path
    # Subtracted from the states before the head while training; folded into the head's first
    # bias when saved (`exported_head`), so a checkpoint's head reads raw states as usual.
    head_input_shift: torch.Tensor | None = None
    # The auxiliary action loss's classifier (`TrainConfig.action_weight`), training only.
    action_classifier: torch.nn.Linear | None = None

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        named = [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        if self.action_classifier is not None:
            named += [
                (f"head.action_classifier.{n}", p)
                for n, p in self.action_classifier.named_parameters()
            ]
        named += [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return named

    @property
    def trains_base(self) -> bool:
        """The base's own weights train (no peft wrapper): checkpoints hold the whole model."""
        return not hasattr(self.model, "get_base_model")

    def unwrapped(self) -> torch.nn.Module:
        """The LLaVA model itself (inside peft's wrapper unless the base's weights train)."""
        return self.model if self.trains_base else self.model.get_base_model()

    def forward(
        self, batch: Batch, text_weight: float, pose_weight: float, action_weight: float = 0.0
    ) -> LossTerms:
        language_model = self.unwrapped()
        hidden = language_model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            use_cache=False,  # no key/value cache to keep: nothing is generated
        ).last_hidden_state
        # The state at position t predicts token t + 1: logits only where an answer token
        # follows (the lm_head never sees the prompt positions).
        next_labels = batch.labels[:, 1:]
        keep = next_labels != -100
        logits = language_model.get_output_embeddings()(hidden[:, :-1][keep])
        states = hidden[batch.pose_rows, batch.pose_positions - 1].float()
        if self.head_input_shift is not None:
            states = states - self.head_input_shift
        head_output = self.head(states)
        terms = chatpose_loss(
            logits,
            next_labels[keep],
            head_output,
            batch.pose_targets,
            text_weight=text_weight,
            pose_weight=pose_weight,
        )
        named = batch.pose_actions != IGNORE_INDEX
        if self.action_classifier is None or not action_weight or not named.any():
            return terms
        action_ce = torch.nn.functional.cross_entropy(
            self.action_classifier(states[named]), batch.pose_actions[named]
        )
        return dataclasses.replace(terms, total=terms.total + action_weight * action_ce)

    def mean_pose_state(self, batches: Sequence[Batch]) -> torch.Tensor:
        """The mean final-layer state before the pose tokens of `batches` (no gradients)."""
        language_model = self.unwrapped()
        states = []
        self.model.eval()  # no LoRA dropout: a plain forward pass, and no random numbers drawn
        with torch.no_grad():
            for batch in batches:
                hidden = language_model.base_model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    pixel_values=batch.pixel_values,
                    use_cache=False,
                ).last_hidden_state
                states.append(hidden[batch.pose_rows, batch.pose_positions - 1].float())
        self.model.train()
        return torch.cat(states).mean(dim=0)

    def unfold_head_input_shift(self) -> None:
        """Make a head loaded from a checkpoint (it reads raw states) read centred ones with the
        same outputs: b ← b + W·μ, the inverse of `exported_head`'s fold."""
        with torch.no_grad():
            self.head[0].bias.add_(self.head[0].weight @ self.head_input_shift)

    def exported_head(self) -> PoseHead:
        """The head as a checkpoint stores it: reading raw states (the shift folded into the
        first layer's bias: W·(s − μ) + b = W·s + (b − W·μ))."""
        head = copy.deepcopy(self.head)
        if self.head_input_shift is not None:
            with torch.no_grad():
                head[0].bias.sub_(head[0].weight @ self.head_input_shift)
        return head


def _on_vision_side(name: str) -> bool:
    """The parameter `name` belongs to the vision tower or the projector."""
    return any(f".{p}." in name or name.startswith(f"{p}.") for p in FROZEN_PREFIXES)


def load_training_model(
    checkpoint: Checkpoint,
    config: TrainConfig,
    adapter_dir: Path | None,
    head_path: Path | None,
) -> TrainingModel:
    """The base model with a trainable adapter (loaded from `adapter_dir`, else a new LoRA) and
    the head (from `head_path`, else fresh). Seeds torch first: the new weights follow the seed.
    """
    device, dtype = select_device(config.device)
    if dtype == torch.float16:  # no loss scaling here: AdamW's eps and small gradients vanish
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":  # the system would kill the run midway, without a word
        check_host_memory(checkpoint.base_dir, dtype, "train it on a GPU (--device cuda)")
    # Straight onto the device: a 13B model first loaded into memory needs 27 GB there.
    advice = "training loads the whole base model, unquantized: use a card with more memory"
    if device.type == "cuda":
        check_gpu_memory(checkpoint.base_dir, dtype, device, advice=advice)
    processor, model = load_base(
        checkpoint.base_dir, advice=advice, dtype=dtype, device_map=str(device)
    )
    pose_token = checkpoint.config.pose_token
    check_vocabulary(processor.tokenizer, model, pose_token, checkpoint.base_dir)
    pose_token_id = ensure_pose_token(processor.tokenizer, model, pose_token)
    torch.manual_seed(config.seed)
    if config.train_base and dtype != torch.float32:
        print(
            f"note: --train-base trains the base's own weights in {str(dtype).split('.')[-1]}, "
            "as loaded for this device, with no float32 copy: updates smaller than their "
            "rounding are lost (the demo's stages run on the CPU, in float32)",
            file=sys.stderr,
        )
    if config.train_base:
        if adapter_dir is not None:
            model = apply_adapter(model, adapter_dir, merge=True)
        model.requires_grad_(config.train_base == "all")
        if config.train_base in ("embeddings", "context"):
            model.get_input_embeddings().weight.requires_grad_(True)
            if config.train_base == "context":  # and the LM's first layer's MLP
                for name, parameter in model.named_parameters():
                    if "language_model" in name and ".layers.0.mlp." in name:
                        parameter.requires_grad_(True)
        elif config.train_base == "vision":
            for name, parameter in model.named_parameters():
                if _on_vision_side(name):
                    parameter.requires_grad_(True)
        elif config.train_base == "projector":
            for name, parameter in model.named_parameters():
                if "multi_modal_projector" in name:
                    parameter.requires_grad_(True)
        elif config.train_base == "lm_head":
            model.get_output_embeddings().weight.requires_grad_(True)
    else:
        with quiet_peft():
            model = _make_trainable(model, config, adapter_dir, pose_token_id)
    if config.adapter_lr == 0:
        # Kept as they are: no gradients at all, so backward stops at the head (3x faster).
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and _on_vision_side(name) and not config.train_base:
            raise TrainingError(f"{name} is trainable but the vision side must stay frozen")
    if config.gradient_checkpointing:
        _checkpoint_activations(model)
    base_config = checkpoint.config
    if head_path is not None:
        head = PoseHead.load(head_path, base_config)
    else:
        torch.manual_seed(config.seed + 1)
        head = PoseHead.from_config(base_config)
    head = head.to(device).float().train()
    model.train()
    return TrainingModel(
        model, head, processor, base_config, pose_token_id, device, dtype, checkpoint.base_dir
    )


def _checkpoint_activations(model) -> None:
    """Activation checkpointing, non-reentrant (frozen input embeddings need no gradient
    trick), by its transformers 5 name, or the older one a release before it has."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _make_trainable(model, config: TrainConfig, adapter_dir: Path | None, pose_token_id: int):
    """The peft model: the adapter in `adapter_dir` made trainable, or a new LoRA."""
    from peft import LoraConfig, get_peft_model

    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir, trainable=True)
        indices = getattr(model.peft_config["default"], "trainable_token_indices", None) or {}
        if not any(pose_token_id in ids for ids in _as_dict(indices).values()):
            print(
                f"warning: the adapter in {adapter_dir} does not train the pose token's "
                f"embedding rows",
                file=sys.stderr,
            )
    else:
        embed_name = _module_name(model, model.get_input_embeddings())
        output_name = _module_name(model, model.get_output_embeddings())
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=LORA_TARGETS,
            trainable_token_indices={embed_name: [pose_token_id], output_name: [pose_token_id]},
        )
        model = get_peft_model(model, lora)
    return model


def _as_dict(indices) -> dict:
    return indices if isinstance(indices, dict) else {"embed_tokens": list(indices)}


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """The last component of `module`'s name in `model` (what peft matches against)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    raise TrainingError("cannot find the embedding layers of the base model")
