"""The demo build end to end at toy size, and the shipped demo checkpoint's left/right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inference_service.checkpoint import Checkpoint
from inference_service.modeling_chatpose import ChatPoseModel, PoseRequest
from inference_service.serve import DEMO_CHECKPOINT
from inference_service.training import build_demo
from inference_service.training.actions import ACTIONS
from inference_service.training.baselines import joint_distance


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_build_runs_end_to_end_and_the_packed_checkpoint_serves(tmp_path):
    pytest.importorskip("bpy")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "evaluation.md").write_text(
        f"# Evaluation\n\nprose before\n\n{build_demo.MARK_START}\nold\n{build_demo.MARK_END}\n"
        "\nprose after\n"
    )
    out = tmp_path / "ckpt"
    info = build_demo.build(
        "tiny", steps=2, out=out, work=tmp_path / "work", docs=docs, threads=1
    )
    assert set(info["seconds"]) >= {
        "corpus", "render train pairs", "render test pairs", "scaffold", "train", "pack",
        "evaluate", "examples",
    }  # fmt: skip
    # Self-contained: merged weights, no adapter, no optimizer state, safetensors only.
    checkpoint = Checkpoint.open(out)
    assert checkpoint.adapter_dir is None
    assert checkpoint.base_dir == out / "base"
    assert not list(out.rglob("training_state.pt"))
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    assert list((out / "base").glob("*.safetensors"))
    assert json.loads((out / "build_info.json").read_text())["train"]["steps"] == 2
    model = ChatPoseModel.from_checkpoint(out, device="cpu")
    assert model.dtype == torch.float32
    image = next((tmp_path / "work" / "pairs_test" / "images").glob("*.png")).read_bytes()
    poses = model.predict_poses(
        [PoseRequest(text="A man raises his left arm."), PoseRequest(images=(image,))]
    )
    assert len(poses) == 2 and all(p.shape == (24, 3) and np.isfinite(p).all() for p in poses)
    # The docs: the generated part replaced between the markers, the prose kept.
    text = (docs / "evaluation.md").read_text()
    assert "prose before" in text and "prose after" in text and "\nold\n" not in text
    assert "### Quality bars" in text and "Text to pose" in text
    for name in ("text_00.png", "image_00_input.png", "image_00_pred.png", "image_00_true.png"):
        assert (docs / "images" / name).is_file()
    assert (tmp_path / "work" / "report.json").is_file()


SIDED_PROMPTS = (
    ("Raise your left arm above your head.", "raise_left_arm", "raise_right_arm"),
    ("Raise your right arm above your head.", "raise_right_arm", "raise_left_arm"),
    ("The person kneels on the left knee.", "kneel_on_left_knee", "kneel_on_right_knee"),
    ("The person kneels on the right knee.", "kneel_on_right_knee", "kneel_on_left_knee"),
)


@pytest.mark.skipif(
    not (DEMO_CHECKPOINT / "chatpose.json").is_file(), reason="no demo checkpoint built yet"
)
def test_the_shipped_demo_checkpoint_tells_left_from_right():
    model = ChatPoseModel.from_checkpoint(DEMO_CHECKPOINT, device="cpu")
    assert Checkpoint.open(DEMO_CHECKPOINT).adapter_dir is None
    poses = np.stack(model.predict_poses([PoseRequest(text=p) for p, _, _ in SIDED_PROMPTS]))
    for pose, (prompt, right, wrong) in zip(poses, SIDED_PROMPTS, strict=True):
        near = joint_distance(pose[None], ACTIONS[right](None)[None])[0]
        far = joint_distance(pose[None], ACTIONS[wrong](None)[None])[0]
        assert near < far, f"{prompt!r}: {near:.0f} mm from {right}, {far:.0f} mm from {wrong}"
