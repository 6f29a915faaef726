"""The checkpoint directory format (documented in docs/checkpoints.md).

    my-checkpoint/
        chatpose.json            ChatPoseConfig below
        base/                    the transformers model and its processor (or a path elsewhere)
        adapter/                 optional: a peft LoRA adapter for the base model
        pose_head.safetensors    the SMPL head (see pose_head.py)

This module only reads, validates and writes that layout; it loads no weights.
"""

import dataclasses
import json
import logging
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from inference_service.errors import CheckpointError
from inference_service.prompts import TEMPLATES, WORDINGS
from shared_protocol.skeleton import NUM_JOINTS

log = logging.getLogger(__name__)

CONFIG_NAME = "chatpose.json"
HEAD_NAME = "pose_head.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft saves
FORMAT_VERSION = 1
# The 6D layout of the release (HMR2): the first two columns of the matrix, one after the other.
ROTATION_LAYOUT = "6d_two_columns"


POSE_ORIENTATIONS = ("upright", "camera")
# chatpose.json's name for `pose_orientation` before it was known to hold for text poses too:
# the release's (the only "camera" head) gives every pose in the camera's frame.
RENAMED_FIELDS = {"image_orientation": "pose_orientation"}


@dataclass(frozen=True)
class ChatPoseConfig:
    """What chatpose.json holds. Construction validates every field."""

    hidden_size: int  # the LLM's hidden size: the pose head's input
    head_hidden_size: int  # the pose head's inner width (the release: = hidden_size)
    head_output_size: int = NUM_JOINTS * 6
    rotation_layout: str = ROTATION_LAYOUT
    pose_token: str = "<POSE>"  # the official release uses "[SEG]"
    conversation_template: str = "llava_v1"
    image_size: int = 336  # side of the square the processor crops images to
    mm_use_im_start_end: bool = False  # wrap each image marker in <im_start>...<im_end>
    max_images: int = 1  # images per request the model was trained for
    # Joints 0..posed_joints-1 come from the head; the rest are put at rest (zero rotation):
    # the release trained SMPL-H finger joints where SMPL's hands (22, 23) are.
    posed_joints: int = NUM_JOINTS
    # The frame of every pose's global orientation, as the head was trained: "upright" (+Y up;
    # an image's pose facing the camera's heading: docs/evaluation.md) or "camera" (HMR's: +Y
    # down, +Z into the scene; the release trained its text poses in it too), turned to
    # "upright" when served.
    pose_orientation: str = "upright"
    # The words a pose request is asked and answered in (prompts.WORDINGS): "paper" (the
    # paper's, which this project trains with) or "release" (the release's training code's).
    prompt_wording: str = "paper"
    base_model: str = "base"  # a directory: relative to the checkpoint, or absolute
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_type(field.name, getattr(self, field.name), _TYPES[field.name])
        for name in ("hidden_size", "head_hidden_size", "image_size", "max_images"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"field '{name}' must be positive, got {getattr(self, name)}")
        if self.pose_orientation not in POSE_ORIENTATIONS:
            raise CheckpointError(
                f"field 'pose_orientation' must be one of {list(POSE_ORIENTATIONS)}, "
                f"got {self.pose_orientation!r}"
            )
        if self.prompt_wording not in WORDINGS:
            raise CheckpointError(
                f"field 'prompt_wording' must be one of {list(WORDINGS)}, "
                f"got {self.prompt_wording!r}"
            )
        if not 1 <= self.posed_joints <= NUM_JOINTS:
            raise CheckpointError(
                f"field 'posed_joints' must be 1 to {NUM_JOINTS}, got {self.posed_joints}"
            )
        if self.head_output_size != NUM_JOINTS * 6:
            raise CheckpointError(
                f"field 'head_output_size' must be {NUM_JOINTS * 6} ({NUM_JOINTS} joints x 6D), "
                f"got {self.head_output_size}"
            )
        if self.rotation_layout != ROTATION_LAYOUT:
            raise CheckpointError(
                f"field 'rotation_layout' must be {ROTATION_LAYOUT!r}, got {self.rotation_layout!r}"
            )
        if not self.pose_token or self.pose_token != self.pose_token.strip():
            raise CheckpointError(
                f"field 'pose_token' must be a non-empty token without spaces around it, "
                f"got {self.pose_token!r}"
            )
        if self.conversation_template not in TEMPLATES:
            raise CheckpointError(
                f"field 'conversation_template' must be one of {sorted(TEMPLATES)}, "
                f"got {self.conversation_template!r}"
            )
        if not self.base_model:
            raise CheckpointError("field 'base_model' must name a directory")
        if self.format_version != FORMAT_VERSION:
            raise CheckpointError(
                f"field 'format_version' must be {FORMAT_VERSION}, got {self.format_version}"
            )

    @classmethod
    def load(cls, path: str | Path) -> "ChatPoseConfig":
        """Read a chatpose.json file (or the one inside a checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        data = read_json_object(path)
        if data.get("image_orientation") == "camera" and "prompt_wording" not in data:
            log.warning(
                "%s: a release converted before its text poses, prompts and tokenizer were read "
                "as the release's own code does; its text poses are turned upright now, but run "
                "convert_official again for the rest (docs/checkpoints.md)",
                path,
                extra={"event": "old_conversion"},
            )
        for old, new in RENAMED_FIELDS.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path}: unknown field '{unknown[0]}'")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
            raise CheckpointError(f"{path}: missing field '{missing[0]}'") from exc
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    def save(self, directory: str | Path) -> Path:
        """Write chatpose.json into `directory`; returns the file's path."""
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")
        return path


_TYPES = typing.get_type_hints(ChatPoseConfig)

# What puts huggingface_hub (and transformers and peft, which ask it) in offline mode.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def work_offline() -> None:
    """Offline mode for this process: every request to the Hugging Face Hub fails at once,
    whatever the library code that would make it (a lookup of the base an adapter names,
    a file missing from a model folder). Loading reads local files only; the commands that
    load a model call this first, whatever the environment said (docs/checkpoints.md).

    huggingface_hub reads the variables when it is imported, so its flag is set too when it
    already is."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def share_as_umask_allows(folder: Path) -> None:
    """Gives every safetensors file under `folder` the mode a new file gets (0o666 less the
    umask), as its JSON files have: safetensors 0.8 writes them 0600, so another account (the
    animator's service, a shared folder) could not load a checkpoint written here."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*.safetensors"):
        os.chmod(path, 0o666 & ~umask)


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; CheckpointError naming the file when it is missing, does not
    read, or holds something else (a list read with .get fails far from the file's name)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# What a file of a repository cloned without git-lfs holds instead of its contents.
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# The files the loaders read (weights, configs, tokenizers); not other frameworks' weights
# (tf_model.h5, flax_model.msgpack), which a repository may hold unpulled and nobody reads.
_READ_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken")


def refuse_lfs_pointers(directory: Path) -> None:
    """CheckpointError naming a file of `directory` that the loaders read and that is a Git
    LFS pointer (a model repository cloned without git-lfs): read as weights or a tokenizer,
    it fails with messages about other things (a missing tiktoken, a bad safetensors header)."""
    directory = Path(directory)
    for path in sorted(directory.iterdir()) if directory.is_dir() else ():
        if path.suffix in _READ_SUFFIXES and path.is_file() and path.stat().st_size < 1024:
            with path.open("rb") as file:
                if file.read(len(_LFS_POINTER)) == _LFS_POINTER:
                    raise CheckpointError(
                        f"{path}: a Git LFS pointer, not the file (the repository was cloned "
                        "without git-lfs); run `git lfs pull` there"
                    )


def _check_type(name: str, value: object, expected: type) -> None:
    # bool is a subclass of int in Python, but `"hidden_size": true` is still a mistake.
    ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
    if not ok:
        raise CheckpointError(f"field '{name}' must be of type {expected.__name__}, got {value!r}")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory whose required files exist, with its paths resolved."""

    root: Path
    config: ChatPoseConfig
    base_dir: Path
    head_path: Path
    adapter_dir: Path | None

    @classmethod
    def open(cls, root: str | Path) -> "Checkpoint":
        root = Path(root).expanduser()
        if not root.is_dir():  # "not a directory" was said of a path that is not there at all
            what = "a file, not a checkpoint's folder" if root.exists() else "no such folder"
            raise CheckpointError(f"{root}: {what}")
        if not (root / CONFIG_NAME).exists():
            steps = sorted(p.name for p in root.glob("step-*") if (p / CONFIG_NAME).is_file())
            if steps:  # `train --out`'s folder: each step-N in it is a checkpoint
                raise CheckpointError(
                    f"{root}: a training run's folder, not a checkpoint; its checkpoints are "
                    f"its step folders, the last {root / steps[-1]}"
                )
            raise CheckpointError(
                f"{root}: not a ChatPose checkpoint (no {CONFIG_NAME}); an official release "
                "converts with python -m inference_service.convert_official (docs/checkpoints.md)"
            )
        refuse_lfs_pointers(root)  # the head and chatpose.json
        config = ChatPoseConfig.load(root / CONFIG_NAME)
        base_dir = root / Path(config.base_model).expanduser()  # absolute paths stay absolute
        if not (base_dir / "config.json").is_file():
            raise CheckpointError(
                f"{root / CONFIG_NAME}: field 'base_model' points to {base_dir}, "
                f"which has no config.json"
            )
        head_path = root / HEAD_NAME
        if not head_path.is_file():
            raise CheckpointError(f"{head_path}: file not found")
        adapter_dir = root / ADAPTER_DIR
        if adapter_dir.exists():
            # Both files, checked here: peft takes a folder without its weights for the name
            # of a model on the Hugging Face Hub and goes online for it.
            for name in ADAPTER_FILES:
                if not (adapter_dir / name).is_file():
                    raise CheckpointError(f"{adapter_dir}: adapter directory without {name}")
            refuse_lfs_pointers(adapter_dir)
            _check_adapter_config(adapter_dir / ADAPTER_FILES[0])
        return cls(root, config, base_dir, head_path, adapter_dir if adapter_dir.exists() else None)


def _check_adapter_config(path: Path) -> None:
    """CheckpointError for an adapter config that peft would fail on without naming it: not a
    JSON object, or without `peft_type` (peft's KeyError reads "'peft_type'")."""
    if "peft_type" not in read_json_object(path):
        raise CheckpointError(
            f"{path}: no 'peft_type' (peft saves it, e.g. \"LORA\"; a config of another tool?)"
        )
