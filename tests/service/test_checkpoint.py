import json
import shutil

import pytest

from inference_service.checkpoint import CONFIG_NAME, ChatPoseConfig, Checkpoint
from inference_service.errors import CheckpointError


def write_config(directory, **fields):
    data = {"hidden_size": 64, "head_hidden_size": 64, **fields}
    (directory / CONFIG_NAME).write_text(json.dumps(data))
    return directory / CONFIG_NAME


def test_save_then_load_round_trips(tmp_path):
    config = ChatPoseConfig(
        hidden_size=5120,
        head_hidden_size=5120,
        pose_token="[SEG]",
        mm_use_im_start_end=True,
        base_model="/models/llava",
    )
    config.save(tmp_path)
    assert ChatPoseConfig.load(tmp_path) == config
    assert ChatPoseConfig.load(tmp_path / CONFIG_NAME) == config


def test_defaults_follow_the_release():
    config = ChatPoseConfig(hidden_size=5120, head_hidden_size=5120)
    assert config.head_output_size == 144
    assert config.rotation_layout == "6d_two_columns"
    assert config.conversation_template == "llava_v1"
    assert config.image_size == 336
    assert config.base_model == "base"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"hidden_size": "64"}, "hidden_size"),
        ({"hidden_size": True}, "hidden_size"),
        ({"head_hidden_size": 0}, "head_hidden_size"),
        ({"head_output_size": 72}, "head_output_size"),
        ({"rotation_layout": "6d_interleaved"}, "rotation_layout"),
        ({"pose_token": " <POSE>"}, "pose_token"),
        ({"conversation_template": "vicuna"}, "conversation_template"),
        ({"mm_use_im_start_end": 1}, "mm_use_im_start_end"),
        ({"max_images": 0}, "max_images"),
        ({"posed_joints": 25}, "posed_joints"),
        ({"posed_joints": 0}, "posed_joints"),
        ({"pose_orientation": "world"}, "pose_orientation"),
        ({"prompt_wording": "LISA"}, "prompt_wording"),
        ({"base_model": ""}, "base_model"),
        ({"format_version": 2}, "format_version"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_field_names_the_field_and_the_file(tmp_path, fields, named):
    path = write_config(tmp_path, **fields)
    with pytest.raises(CheckpointError, match=f"'{named}'") as error:
        ChatPoseConfig.load(tmp_path)
    assert str(path) in str(error.value)


def test_the_older_name_of_pose_orientation_is_read(tmp_path, caplog):
    write_config(tmp_path, image_orientation="upright")  # any checkpoint from before the rename
    assert ChatPoseConfig.load(tmp_path).pose_orientation == "upright"
    assert not caplog.records
    write_config(tmp_path, image_orientation="camera")  # a release converted before the rename
    config = ChatPoseConfig.load(tmp_path)
    assert (config.pose_orientation, config.prompt_wording) == ("camera", "paper")
    assert "run convert_official again for the rest" in caplog.text


def test_missing_field_is_named(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(CheckpointError, match="missing field 'head_hidden_size'"):
        ChatPoseConfig.load(tmp_path)


def test_unreadable_config_names_the_file(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON file"):
        ChatPoseConfig.load(tmp_path)
    with pytest.raises(CheckpointError, match="file not found"):
        ChatPoseConfig.load(tmp_path / "elsewhere")


def make_checkpoint(root, base_model="base"):
    write_config(root, base_model=base_model)
    (root / "pose_head.safetensors").write_bytes(b"")
    return root


def test_open_resolves_relative_and_absolute_base(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    checkpoint = Checkpoint.open(make_checkpoint(tmp_path))
    assert checkpoint.base_dir == tmp_path / "base"
    assert checkpoint.adapter_dir is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_checkpoint(elsewhere, base_model=str(tmp_path / "base"))
    assert Checkpoint.open(elsewhere).base_dir == tmp_path / "base"


def test_a_folder_without_chatpose_json_is_named_as_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a ChatPose checkpoint \(no chatpose.json\)"):
        Checkpoint.open(tmp_path)


def test_open_reports_missing_parts(tmp_path):
    make_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="'base_model' points to .*no config.json"):
        Checkpoint.open(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(CheckpointError, match="without adapter_config.json"):
        Checkpoint.open(tmp_path)
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="without adapter_model.safetensors"):
        Checkpoint.open(tmp_path)  # peft would look for it on the Hub
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"adapter_config.json: no 'peft_type'"):
        Checkpoint.open(tmp_path)  # peft's own error reads "'peft_type'"
    (tmp_path / "adapter" / "adapter_config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"adapter_config.json: expected a JSON object"):
        Checkpoint.open(tmp_path)
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert Checkpoint.open(tmp_path).adapter_dir == tmp_path / "adapter"
    shutil.rmtree(tmp_path / "adapter")
    (tmp_path / "pose_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pose_head.safetensors: file not found"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="nowhere: no such folder"):
        Checkpoint.open(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="chatpose.json: a file, not a checkpoint's folder"):
        Checkpoint.open(tmp_path / "chatpose.json")


LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1842767\n"


@pytest.mark.parametrize("file", ["pose_head.safetensors", "adapter/adapter_model.safetensors"])
def test_a_git_lfs_pointer_for_the_head_or_the_adapter_is_named(tmp_path, file):
    make_checkpoint(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / file).write_text(LFS_POINTER)  # what safetensors reads as "header too large"
    with pytest.raises(CheckpointError, match=rf"{file}: a Git LFS pointer, not the file"):
        Checkpoint.open(tmp_path)
