"""The SMPL pose head: LLM hidden state -> 24 joint rotations.

    Linear(H, H) -> ReLU -> Linear(H, 144)      144 = 24 joints x 6D, index 0 the global orient.

The module indices match the release's `text_hidden_fcs[0]` Sequential (0 = first Linear,
1 = ReLU, 2 = second Linear; its trailing Dropout(0.0) does nothing and is left out), so the
release's keys `model.text_hidden_fcs.0.0.weight` become `0.weight` here by dropping the prefix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from inference_service.checkpoint import NUM_JOINTS, ChatPoseConfig
from inference_service.errors import CheckpointError, ModelError
from shared_protocol.rotations import (
    matrix_to_axis_angle,
    rotation_6d_to_matrix,
)


class PoseHead(nn.Sequential):
    def __init__(self, input_size: int, hidden_size: int, output_size: int = NUM_JOINTS * 6):
        super().__init__(
            nn.Linear(input_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, output_size),
        )

    @classmethod
    def from_config(cls, config: ChatPoseConfig) -> PoseHead:
        return cls(config.hidden_size, config.head_hidden_size, config.head_output_size)

    @classmethod
    def load(cls, path: str | Path, config: ChatPoseConfig) -> PoseHead:
        """The head of `config`'s sizes with weights from a safetensors file, as float32. The
        file is checked against those sizes before the head is made: sizes the file does not
        have could ask for any amount of memory."""
        try:
            state = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        with torch.device("meta"):  # the shapes alone: nothing allocated
            expected = {n: tuple(t.shape) for n, t in cls.from_config(config).state_dict().items()}
        for name, shape in expected.items():
            if name not in state:
                raise CheckpointError(f"{path}: missing tensor '{name}'")
            if tuple(state[name].shape) != shape:
                raise CheckpointError(
                    f"{path}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                    f"chatpose.json says {shape}"
                )
            if not state[name].dtype.is_floating_point:  # integers, bools, complex: no weights
                raise CheckpointError(
                    f"{path}: tensor '{name}' is {str(state[name].dtype).removeprefix('torch.')}, "
                    "not floating point"
                )
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise CheckpointError(f"{path}: unexpected tensor '{unexpected[0]}'")
        head = cls.from_config(config)
        head.load_state_dict({name: t.float() for name, t in state.items()})
        return head.eval()

    def start_at(self, rotations_6d) -> None:
        """Make the last layer's bias `rotations_6d` (144 numbers, a pose in the head's 6D
        layout): the mean pose of the data a fresh head trains on. Its first answers are then
        near that pose, and it learns the deviations from it; from a random bias, the L1 loss
        on 6D rotations settles with some joints half a turn off, for good."""
        bias = self[2].bias
        with torch.no_grad():
            bias.copy_(torch.as_tensor(np.asarray(rotations_6d), dtype=bias.dtype).view(-1))

    def save(self, path: str | Path) -> None:
        save_file(
            {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()},
            str(path),
        )


def decode_pose(head_output: np.ndarray) -> np.ndarray:
    """(..., 144) head output -> (..., 24, 3) axis-angle; index 0 is the global orientation."""
    sixd = np.asarray(head_output, dtype=np.float64)
    sixd = sixd.reshape(*sixd.shape[:-1], NUM_JOINTS, 6)
    try:
        return matrix_to_axis_angle(rotation_6d_to_matrix(sixd))
    except ValueError as exc:  # NaN or a degenerate 6D vector: the model's fault, not the user's
        raise ModelError(f"the pose head produced an invalid rotation: {exc}") from exc


def rotation_6d_to_matrix_torch(sixd: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3), differentiable; the same layout and maths as
    shared_protocol.rotations.rotation_6d_to_matrix (Gram-Schmidt on two columns), for training.
    """
    a1, a2 = sixd[..., :3], sixd[..., 3:]
    b1 = nn.functional.normalize(a1, dim=-1)
    b2 = nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)
