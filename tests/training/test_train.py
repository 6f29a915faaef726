"""Training end to end on the tiny scaffolded model: loss goes down, checkpoints serve, resume is
exact, a NaN stops the run; plus the encoding of examples and the batch mix."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from inference_service import files, loading
from inference_service import train as train_cli
from inference_service.checkpoint import HEAD_NAME, Checkpoint
from inference_service.errors import ChatPoseError, CheckpointError, ModelError
from inference_service.images import CropBox
from inference_service.modeling_chatpose import ChatPoseModel, PosePrompt
from inference_service.pose_head import decode_pose
from inference_service.prompts import Exchange, pose_exchange
from inference_service.training import loop, training_model
from inference_service.training.baselines import mean_pose_6d
from inference_service.training.checkpoints import (
    DIVERGED_NAME,
    LOG_NAME,
    STATE_NAME,
    earlier_one,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    step_dir_name,
)
from inference_service.training.config import (
    HEAD_INITS,
    LR_SCHEDULES,
    TRAIN_BASE_SCOPES,
    TrainConfig,
    TrainingError,
)
from inference_service.training.datasets import KINDS, DatasetError, Example, ImageFile
from inference_service.training.encoding import Encoder
from inference_service.training.fingerprints import data_change, fingerprint
from inference_service.training.losses import IGNORE_INDEX, LossTerms
from inference_service.training.sampling import MixedSampler
from inference_service.training.scaffold import scaffold_checkpoint
from inference_service.training.training_model import load_training_model
from shared_protocol.rotations import axis_angle_to_matrix

RNG = np.random.default_rng(0)
POSES = RNG.normal(size=(8, 24, 3)) * 0.4
CAPTIONS = [
    "a man raising both arms",
    "a woman kneeling on her left knee",
    "someone sitting cross-legged",
    "a person jumping with legs bent",
]


def png(color, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = png((220, 20, 20)), png((20, 20, 220))
BLUE_SQUARE = png((20, 20, 220), (40, 40))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return scaffold_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", "tiny", CAPTIONS)


@pytest.fixture(scope="module")
def examples():
    text = [
        Example(
            "text_to_pose",
            *pose_exchange(c, False),
            poses=(POSES[i],),
            source=f"data/text.json#{i}",
        )
        for i, c in enumerate(CAPTIONS)
    ]
    image = [
        Example(
            "image_to_pose",
            *pose_exchange(None, True),
            images=(img,),
            poses=(POSES[4 + i],),
            source=f"data/pairs.npz#{i}",
        )
        for i, img in enumerate((RED, BLUE))
    ]
    chat = [
        Example(
            "chat",
            "Hello, who are you?",
            "I am an assistant that knows about poses.",
            source="chat.json#0",
        ),
        Example(
            "chat",
            "And now show me a pose.",
            "Here it is: <POSE>.",
            history=(Exchange("What can you do?", "I can chat about human poses."),),
            source="chat.json#1",
        ),
    ]
    return text + image + chat


def settings(base, out, **overrides):
    values = dict(
        base=base,
        out=out,
        steps=6,
        batch_size=4,
        lr=1e-3,
        lora_rank=8,
        lora_alpha=16,
        save_every=3,
        log_every=3,
        device="cpu",
    )
    return TrainConfig(**{**values, **overrides})


def test_training_lowers_loss_and_the_checkpoint_serves(base, examples, tmp_path, capsys):
    out = tmp_path / "run"
    config = settings(base, out, steps=30, save_every=10, log_every=10, keep_last=2)
    result = loop.train(config, examples)
    totals = [total for _, total, _, _ in result.losses]
    poses = [pose for _, _, _, pose in result.losses]
    assert np.mean(totals[:5]) - np.mean(totals[-5:]) > 0.2
    assert np.mean(poses[:5]) > np.mean(poses[-5:])
    err = capsys.readouterr().err
    assert "step 30/30  loss " in err and " ce " in err and " pose_l1 " in err
    assert "steps/s" in err
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000020", "step-000030"]
    assert (out / "latest").read_text().strip() == "step-000030"
    assert result.checkpoint == out / "step-000030"
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3

    # The adapter holds LoRA for the language model only, and the pose token's two rows.
    adapter = load_file(result.checkpoint / "adapter" / "adapter_model.safetensors")
    lora = [k for k in adapter if "lora_" in k]
    assert lora and all("language_model" in k for k in lora)
    assert any(k.endswith("lora_B.weight") and adapter[k].abs().sum() > 0 for k in lora)
    assert not any("vision_tower" in k or "multi_modal_projector" in k for k in adapter)
    token_rows = [k for k in adapter if "trainable_tokens_delta" in k]
    assert len(token_rows) == 2  # embed_tokens and lm_head

    # It loads as it is in the service; vision tower and projector are the base's.
    served = ChatPoseModel.from_checkpoint(result.checkpoint, device="cpu")
    predicted = served.predict_poses([PosePrompt(CAPTIONS[0]), PosePrompt(images=(RED,))])
    assert all(p.shape == (24, 3) and np.isfinite(p).all() for p in predicted)
    original = AutoModelForImageTextToText.from_pretrained(Checkpoint.open(base).base_dir)
    trained_state = served.model.state_dict()
    for name, value in original.state_dict().items():
        if "vision_tower" in name or "multi_modal_projector" in name:
            torch.testing.assert_close(trained_state[name], value, rtol=0, atol=0)
    pose_id = served.pose_token_id
    trained_row = served.model.get_input_embeddings().weight[pose_id]
    assert not torch.allclose(trained_row, original.get_input_embeddings().weight[pose_id])

    # The training forward reads the same hidden state as the service's fast path.
    tm = load_training_model(
        Checkpoint.open(base),
        settings(base, out),
        result.checkpoint / "adapter",
        result.checkpoint / "pose_head.safetensors",
    )
    tm.model.eval()
    encoder = Encoder(tm.processor, tm.config, tm.pose_token_id, 512)
    batch = encoder.collate([encoder.encode(examples[0]), encoder.encode(examples[4])])
    with torch.no_grad():
        hidden = (
            tm.model.get_base_model()
            .base_model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
            )
            .last_hidden_state
        )
        head_out = tm.head(hidden[batch.pose_rows, batch.pose_positions - 1])
    np.testing.assert_allclose(decode_pose(head_out.numpy()), np.stack(predicted), atol=1e-4)


def test_a_progress_bar_shows_the_loss_on_a_terminal_and_log_files_get_lines(
    base, examples, tmp_path, capsys
):
    loop.train(settings(base, tmp_path / "bar", steps=4, log_every=2, progress=True), examples)
    drawn = capsys.readouterr().err
    assert "4/4 [" in drawn and "step/s" in drawn  # tqdm's count and rate
    assert re.search(r"loss \d+\.\d{4}  ce \d+\.\d{4}  pose_l1 \d+\.\d{4}", drawn)
    assert "step 4/4  loss" in drawn  # the log lines too, written above the bar

    loop.train(settings(base, tmp_path / "plain", steps=4, log_every=2), examples)
    logged = capsys.readouterr().err  # captured: not a terminal, so no bar
    assert "4/4 [" not in logged and "step/s" not in logged and "step 4/4  loss" in logged


def _snapshot(directory):
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_resume_continues_exactly_where_it_stopped(base, examples, tmp_path):
    common = dict(batch_size=3, grad_accum=2)  # 3 slots of a 1:2:1 mix: drawn remainders
    straight = loop.train(settings(base, tmp_path / "a", **common), examples)
    first = loop.train(settings(base, tmp_path / "b", steps=3, **common), examples)
    assert first.checkpoint.name == "step-000003"
    resumed = loop.train(settings(base, tmp_path / "b", resume=True, **common), examples)
    assert resumed.losses[0][0] == 4
    np.testing.assert_allclose(
        [x[1:] for x in resumed.losses], [x[1:] for x in straight.losses[3:]], rtol=1e-5
    )
    for name in ("adapter/adapter_model.safetensors", "pose_head.safetensors"):
        a = load_file(straight.checkpoint / name)
        b = load_file(resumed.checkpoint / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    state = torch.load(resumed.checkpoint / STATE_NAME, weights_only=True)
    assert state["step"] == 6

    with pytest.raises(TrainingError, match="already holds a training run"):
        loop.train(settings(base, tmp_path / "b", steps=9, **common), examples)
    with pytest.raises(TrainingError, match="batch_size is 4 but the run"):
        loop.train(settings(base, tmp_path / "b", steps=9, resume=True), examples)
    with pytest.raises(TrainingError, match="the training data differ"):
        loop.train(settings(base, tmp_path / "b", steps=9, resume=True, **common), examples[:-1])
    with pytest.raises(TrainingError, match="ask for more --steps"):
        loop.train(settings(base, tmp_path / "b", resume=True, **common), examples)
    swapped = [*examples[4:6], *examples[:4], *examples[6:]]  # the image file given first
    with pytest.raises(TrainingError, match="the same examples in another order") as refused:
        loop.train(settings(base, tmp_path / "b", steps=9, resume=True, **common), swapped)
    assert "(data/text.json, data/pairs.npz, chat.json)" in str(refused.value)
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        loop.train(settings(base, tmp_path / "c", resume=True), examples)


def test_a_run_resumes_from_its_base_moved_elsewhere_but_not_from_another_base(
    base, examples, tmp_path, capsys
):
    first, moved, other = tmp_path / "first", tmp_path / "moved", tmp_path / "other"
    shutil.copytree(base, first)
    loop.train(settings(first, tmp_path / "run", steps=2), examples)
    shutil.move(first, moved)  # another folder, another machine
    resumed = loop.train(settings(moved, tmp_path / "run", steps=3, resume=True), examples)
    assert resumed.step == 3
    assert f"note: --resume from {moved}, the run's base {first} moved" in capsys.readouterr().err
    shutil.copytree(moved, other)
    config = json.loads((other / "chatpose.json").read_text())
    (other / "chatpose.json").write_text(json.dumps({**config, "max_images": 2}))
    with pytest.raises(TrainingError, match=f"base is '{other}' but the run .* used '{moved}'"):
        loop.train(settings(other, tmp_path / "run", steps=4, resume=True), examples)
    # Another model of the same sizes, saved over the base in its folder or moved in its place.
    weights = next((moved / "base").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors = {name: t + 0.01 if t.is_floating_point() else t for name, t in tensors.items()}
    size = weights.stat().st_size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    for base_now in (moved, tmp_path / "moved again"):
        if base_now != moved:
            shutil.move(moved, base_now)
        with pytest.raises(TrainingError, match="weights of the base .* are not those the run"):
            loop.train(settings(base_now, tmp_path / "run", steps=4, resume=True), examples)


def test_a_run_inside_its_base_s_folder_resumes(base, examples, tmp_path):
    own = tmp_path / "base"
    shutil.copytree(base, own)
    out = own / "runs" / "ft"  # its checkpoints are no weights of the base
    loop.train(settings(own, out, steps=2), examples)
    assert loop.train(settings(own, out, steps=3, resume=True), examples).step == 3
    moved = tmp_path / "moved"
    shutil.move(own, moved)  # the base with its run in it, to another folder
    resumed = settings(moved, moved / "runs" / "ft", steps=4, resume=True)
    assert loop.train(resumed, examples).step == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")
def test_a_cuda_run_resumes_on_cuda_and_saves_its_state_on_the_cpu(base, examples, tmp_path):
    common = dict(device="cuda")
    loop.train(settings(base, tmp_path / "run", steps=3, **common), examples)
    resumed = loop.train(settings(base, tmp_path / "run", resume=True, **common), examples)
    assert resumed.losses[0][0] == 4 and np.isfinite(resumed.losses[-1][1])
    state = torch.load(resumed.checkpoint / STATE_NAME, weights_only=True)
    tensors = [state["head_input_shift"], *state["head"].values()]
    assert all(t.device.type == "cpu" for t in tensors), "a CPU machine must read the state"


def test_continue_from_a_trained_checkpoint_and_a_pose_token_new_to_the_base(
    base, examples, tmp_path, capsys
):
    first = loop.train(settings(base, tmp_path / "one", steps=3), examples)
    # A trained checkpoint as the base: its adapter (rank 8) is trained further, its head kept;
    # LoRA options for another shape are said to apply to a new adapter only.
    capsys.readouterr()
    asked = settings(first.checkpoint, tmp_path / "two", steps=2, lora_rank=16, lora_alpha=64)
    again = loop.train(asked, examples)
    assert "holds a LoRA adapter of rank 8, alpha 16" in capsys.readouterr().err
    recorded = load_state(again.checkpoint)["run"]
    assert (recorded["lora_rank"], recorded["lora_alpha"]) == (8, 16)
    saved = json.loads((again.checkpoint / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (8, 16)
    config = json.loads((again.checkpoint / "chatpose.json").read_text())
    assert config["base_model"] == str(Checkpoint.open(base).base_dir.resolve())
    assert again.losses[0][1] < first.losses[0][1]
    ChatPoseModel.from_checkpoint(again.checkpoint, device="cpu")

    # A base whose tokenizer lacks the pose token (like a converted release): the token is
    # added as the service adds it, and its rows are trained and served.
    renamed = tmp_path / "seg"
    shutil.copytree(base, renamed)
    config = json.loads((renamed / "chatpose.json").read_text())
    (renamed / "chatpose.json").write_text(json.dumps({**config, "pose_token": "[SEG]"}))
    result = loop.train(settings(renamed, tmp_path / "three", steps=2), examples)
    served = ChatPoseModel.from_checkpoint(result.checkpoint, device="cpu")
    assert served.pose_token_id == len(AutoProcessor.from_pretrained(base / "base").tokenizer)
    adapter_config = json.loads((result.checkpoint / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["trainable_token_indices"]["embed_tokens"] == [served.pose_token_id]
    assert np.isfinite(served.predict_poses([PosePrompt("kneeling")])[0]).all()


def _write_data(root):
    np.savez(root / "poses.npz", poses=POSES.reshape(8, 72))
    (root / "captions.json").write_text(
        json.dumps({str(i): c for i, c in enumerate(CAPTIONS)}), encoding="utf-8"
    )
    (root / "red.png").write_bytes(RED)
    (root / "blue.png").write_bytes(BLUE)
    np.savez(root / "pairs.npz", poses=POSES[:2].reshape(2, 72), images=["red.png", "blue.png"])
    conversations = [
        {
            "id": "c1",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture."},
                {"from": "gpt", "value": "A red rectangle."},
            ],
        }
    ]
    (root / "chat.json").write_text(json.dumps(conversations), encoding="utf-8")
    return [
        *("--data", "posescript", str(root / "captions.json"), f"poses={root / 'poses.npz'}"),
        *("--data", "pairs", str(root / "pairs.npz")),
        *("--data", "llava", str(root / "chat.json")),
    ]


def test_a_run_shorter_than_its_warmup_says_so(base, examples, tmp_path, capsys):
    loop.train(settings(base, tmp_path / "run", steps=2, warmup_steps=50), examples)
    assert (
        "note: --warmup-steps 50 is more than --steps 2: the run ends in its warmup, its "
        "learning rate rising to 4e-05, not --lr 0.001"
    ) in capsys.readouterr().err
    loop.train(settings(base, tmp_path / "long", steps=2, warmup_steps=2), examples)
    assert "warmup" not in capsys.readouterr().err


def test_a_mix_that_leaves_out_data_given_says_so(base, examples, tmp_path, capsys):
    text = [e for e in examples if e.kind == "text_to_pose"]
    loop.train(settings(base, tmp_path / "run", steps=1, mix=(1, 1, 0)), text)
    assert "note: the mix leaves out image_to_pose (no examples)" in capsys.readouterr().err


def test_a_linear_schedule_warms_up_then_falls_to_zero_at_the_last_step(base, examples, tmp_path):
    run = tmp_path / "run"
    common = dict(warmup_steps=2, lr_schedule="linear", log_every=1, save_every=0)
    loop.train(settings(base, run, **common), examples)
    logged = [json.loads(line)["lr"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    # 6 steps: warmup to 1e-3 at step 2, then 4 steps falling by a quarter each
    np.testing.assert_allclose(logged, [5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4], rtol=1e-9)
    constant = loop.train(settings(base, tmp_path / "constant", steps=3, warmup_steps=2), examples)
    assert [loop.learning_rate(settings(base, run), step) for step in (1, 5)] == [1e-3, 1e-3]
    with pytest.raises(TrainingError, match="lr_schedule is 'linear' but the run"):
        loop.train(
            settings(base, constant.checkpoint.parent, steps=6, resume=True, **common), examples
        )
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        settings(base, tmp_path / "bad", lr_schedule="cosine")
    parse = train_cli.build_parser().parse_args
    required = ["--base", "b", "--out", "o", "--data", "corpus", "c.npz"]
    assert parse(required).lr_schedule == "constant"
    assert parse([*required, "--lr-schedule", "linear"]).lr_schedule == "linear"


def test_keep_last_goes_by_step_number_and_checkpoints_are_synced_to_disk(
    base, examples, tmp_path, monkeypatch
):
    for step in (999_998, 1_000_000, 1_000_001):  # by name, step-1000000 sorts first
        (tmp_path / step_dir_name(step)).mkdir()
    prune_checkpoints(tmp_path, 2, tmp_path / step_dir_name(1_000_001))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-1000000", "step-1000001"]

    synced = []
    fsync = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").symlink_to(tmp_path / "gone.txt")  # the user's, dangling
    loop.train(settings(base, out, steps=4, save_every=2), examples)
    state = str(out / ".step-000004.tmp" / STATE_NAME)
    assert state in synced and str(out) in synced  # the state, then the renames
    assert str(out / "step-000002" / STATE_NAME) not in synced  # saved ones, once


def test_a_run_that_recorded_its_lora_options_as_given_still_resumes(base, examples, tmp_path):
    out = tmp_path / "run"
    first = loop.train(settings(base, out, steps=3, save_every=3), examples)
    path = first.checkpoint / STATE_NAME
    state = torch.load(path, weights_only=True)
    state["run"]["lora_rank"] = 16  # what the trainer recorded before the adapter's shape
    torch.save(state, path)
    resumed = loop.train(settings(base, out, steps=4, lora_rank=16, resume=True), examples)
    assert resumed.step == 4


def test_cli_nan_stops_keeps_last_checkpoint_then_resumes(base, tmp_path, monkeypatch, capsys):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    argv = [
        *("--base", str(base), "--out", str(out), *data),
        *("--steps", "8", "--save-every", "2", "--batch-size", "2", "--lora-rank", "4"),
        *("--lora-alpha", "8", "--device", "cpu", "--log-every", "1", "--copy-base"),
        *("--adapter-lr", "1e-4"),  # the head at --lr (2e-4), the adapter at 1e-4
    ]
    calls = []
    real_loss, real_save = training_model.chatpose_loss, loop.save_checkpoint
    snapshots = {}

    def poisoned(*args, **kwargs):
        calls.append(1)
        terms = real_loss(*args, **kwargs)
        if len(calls) == 5:
            return LossTerms(terms.total * float("nan"), terms.ce, terms.pose_l1)
        return terms

    def recording_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        snapshots[path.name] = _snapshot(path)
        return path

    monkeypatch.setattr(training_model, "chatpose_loss", poisoned)
    monkeypatch.setattr(loop, "save_checkpoint", recording_save)
    assert train_cli.main(argv) == train_cli.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "step 5: the loss is not finite" in err
    # Step 4's weights gave that loss: resumed from them, step 5 would see the same batch.
    assert "step-000004 is kept untouched, but its weights gave this loss" in err
    assert f"write the name of an earlier one (step-000002) into {out / 'latest'}" in err
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002", "step-000004"]
    assert (out / "latest").read_text().strip() == "step-000004"
    assert _snapshot(out / "step-000004") == snapshots["step-000004"]

    assert (out / DIVERGED_NAME).is_file()

    monkeypatch.setattr(training_model, "chatpose_loss", real_loss)
    higher = [*argv, "--resume", "--steps", "6", "--lr", "1e-3"]
    assert train_cli.main(higher) == train_cli.EXIT_USAGE  # after a NaN: lower only
    assert "lr is 0.001 but the run" in capsys.readouterr().err
    rates = []
    real_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        rates.append([group["lr"] for group in optimizer.param_groups])
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    # To the step that gave the NaN and no further: past it all the same.
    lower = [*argv, "--resume", "--steps", "5", "--lr", "1e-4", "--adapter-lr", "5e-5"]
    assert train_cli.main(lower) == 0
    err = capsys.readouterr().err
    assert "note: --resume with lr 0.0001; the run in " in err and "used 0.0002" in err
    assert "note: --resume with adapter_lr 5e-05; the run in " in err
    assert "step 5/5" in err
    assert rates == [[1e-4, 5e-5]]  # the head's and the adapter's, both lowered
    assert not (out / DIVERGED_NAME).exists()  # past the NaN: a plain run again
    resumed = [*argv, "--resume", "--steps", "7", "--lr", "5e-5"]
    assert train_cli.main(resumed) == train_cli.EXIT_USAGE  # no NaN to get past: as it was
    assert "--resume: lr is 5e-05 but the run" in capsys.readouterr().err
    logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").open()]
    assert logged == [1, 2, 3, 4, 5]  # step 5 of the diverged run is not logged twice
    assert json.loads((out / "step-000005" / "chatpose.json").read_text())["base_model"] == (
        "../base"
    )
    served = ChatPoseModel.from_checkpoint(out / "step-000005", device="cpu")
    assert np.isfinite(served.predict_poses([PosePrompt("standing")])[0]).all()


def test_cli_reports_bad_data_and_arguments(base, tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"0": "ok", "99": "no such pose"}', encoding="utf-8")
    np.savez(tmp_path / "p.npz", poses=POSES.reshape(8, 72))
    argv = ["--base", str(base), "--out", str(tmp_path / "o"), "--device", "cpu"]
    spec = ["--data", "posescript", str(tmp_path / "c.json"), f"poses={tmp_path / 'p.npz'}"]
    assert train_cli.main([*argv, *spec]) == train_cli.EXIT_USAGE
    assert "c.json: pose id '99': no such pose" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        train_cli.main([*argv, *spec, "--mix", "1:2"])
    assert info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train_cli.main([*argv, "--data", "xml", "f.xml"])
    assert info.value.code == 2 and "unknown data format 'xml'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be at least 1"):
        TrainConfig(base=base, out=tmp_path, steps=0)
    capsys.readouterr()
    for option, value, expected in [
        ("--seed", "-1", "a whole number of 0 or more, got '-1'"),
        ("--lr", "abc", "a positive number, got 'abc'"),  # not argparse's "invalid _name value"
    ]:
        with pytest.raises(SystemExit) as info:
            train_cli.main([*argv, *spec, option, value])
        assert info.value.code == 2 and f"{option}: expected {expected}" in capsys.readouterr().err
    for name, text in [("huge.json", '{"0": ' + "9" * 5000 + "}"), ("deep.json", "[" * 100000)]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        bad = ["--data", "posescript", str(tmp_path / name), f"poses={tmp_path / 'p.npz'}"]
        assert train_cli.main([*argv, *bad]) == train_cli.EXIT_USAGE
        assert f"{name}: not a readable JSON file" in capsys.readouterr().err


@pytest.mark.parametrize("failure", ["device", "model"])
def test_a_run_that_fails_to_start_leaves_out_as_it_found_it(
    base, tmp_path, monkeypatch, capsys, failure
):
    """So that the same command, put right, runs: a base/ copy left behind would have been
    taken for a stopped run."""
    if failure == "device":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        option = ["--device", "cuda"]
    else:
        monkeypatch.setattr(loop, "load_training_model", _raise(ChatPoseError("no memory")))
        option = ["--device", "cpu"]
    out = tmp_path / "out"
    argv = ["--base", str(base), *_write_data(tmp_path), "--steps", "1", "--lora-rank", "4"]
    assert train_cli.main([*argv, "--out", str(out), "--copy-base", *option]) == 2
    assert not out.exists()
    monkeypatch.undo()
    assert train_cli.main([*argv, "--out", str(out), "--copy-base", "--device", "cpu"]) == 0
    assert (out / "base").is_dir() and (out / "latest").is_file()


def test_checkpoints_can_be_read_by_the_accounts_the_umask_lets_read(base, tmp_path):
    # safetensors 0.8 writes its files 0600: a shared folder's checkpoint served nowhere else.
    umask = os.umask(0o022)
    try:
        out = tmp_path / "out"
        argv = ["--base", str(base), *_write_data(tmp_path), "--steps", "1", "--lora-rank", "4"]
        assert train_cli.main([*argv, "--out", str(out), "--copy-base", "--device", "cpu"]) == 0
    finally:
        os.umask(umask)
    weights = sorted(out.rglob("*.safetensors"))
    assert {p.relative_to(out).parts[0] for p in weights} == {"base", "step-000001"}
    assert {oct(p.stat().st_mode & 0o777) for p in weights} == {"0o644"}
    scaffolded = {p.stat().st_mode & 0o777 for p in base.rglob("*.safetensors")}
    assert scaffolded == {0o666 & ~umask}  # made under the tests' own umask


def test_a_base_copy_that_fails_leaves_nothing_and_names_the_file(
    base, tmp_path, monkeypatch, capsys
):
    copytree = shutil.copytree

    def disk_full(source, target, **options):
        copytree(source, target, **options)  # most of it there, then the disk was full
        why = "[Errno 28] No space left on device"
        raise shutil.Error([(str(source / "model.safetensors"), str(target), why)])

    monkeypatch.setattr(shutil, "copytree", disk_full)
    out = tmp_path / "out"
    argv = ["--base", str(base), *_write_data(tmp_path), "--steps", "1", "--lora-rank", "4"]
    assert train_cli.main([*argv, "--out", str(out), "--copy-base", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--copy-base: cannot copy {base / 'base' / 'model.safetensors'} into {out}" in err
    assert "No space left on device" in err and not (out / ".base.tmp").exists()


def test_a_log_file_gets_no_progress_bars_of_transformers_either(base, tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(hf_logging, "disable_progress_bar", lambda: disabled.append(True))
    disabled = []
    argv = ["--base", str(base), *_write_data(tmp_path), "--steps", "1", "--lora-rank", "4"]
    assert train_cli.main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert disabled  # pytest's stderr is no terminal: the loading bar would go into the log


def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(base, tmp_path, capsys):
    # Before the first run writes anything, the folder held nothing to tell it by.
    out = tmp_path / "runs" / "out"
    argv = ["--base", str(base), *_write_data(tmp_path), "--steps", "1", "--lora-rank", "4"]
    with loop._out_held(out):  # the first run, loading its model
        assert train_cli.main([*argv, "--out", str(out), "--device", "cpu"]) == 2
        assert f"{out} is in use by another training run" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == [loop.LOCK_NAME]
    assert not out.parent.exists()  # made for the hold alone: gone with it
    assert train_cli.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    assert not (out / loop.LOCK_NAME).exists()  # the run's folder as it left it
    mine = tmp_path / "mine"
    mine.mkdir()  # the user's own folder: a run that fails to start leaves it as it was
    assert train_cli.main(["--base", str(tmp_path / "nowhere"), *argv[2:], "--out", str(mine)]) == 2
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_a_folder_another_run_removed_meanwhile_is_made_again_and_held(tmp_path, monkeypatch):
    out = tmp_path / "out"
    locked_file = loop._locked_file
    gone = []

    def the_other_run_ended(path):  # it made the folder, and removed it ending
        if not gone:
            gone.append(path)
            path.parent.rmdir()
        return locked_file(path)

    monkeypatch.setattr(loop, "_locked_file", the_other_run_ended)
    with loop._out_held(out):
        assert locked_file(out / loop.LOCK_NAME) is None  # held: not run unguarded
    assert gone and not out.exists()


def test_a_lock_file_removed_while_waiting_for_it_is_taken_afresh(tmp_path, monkeypatch):
    path = tmp_path / loop.LOCK_NAME
    first = loop._locked_file(path)
    try_lock = loop._try_lock

    def the_first_run_ends(handle):  # between this run's open and its lock
        if first is not None and not first.closed:
            path.unlink()
            first.close()
        return try_lock(handle)

    monkeypatch.setattr(loop, "_try_lock", the_first_run_ends)
    second = loop._locked_file(path)
    assert os.fstat(second.fileno()).st_ino == os.stat(path).st_ino  # the file now named so
    monkeypatch.undo()
    assert loop._locked_file(path) is None  # held: a third run is refused
    second.close()


@pytest.mark.skipif(os.name == "nt", reason="flock is POSIX's")
def test_a_file_system_that_cannot_lock_runs_unguarded_rather_than_refuse(tmp_path, monkeypatch):
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")  # an NFS mount without lockd

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with loop._out_held(tmp_path / "out"):
        pass  # not "in use by another training run"


def test_a_home_folder_written_as_the_shell_leaves_it_is_expanded():
    config = TrainConfig(base="~/models/chatpose", out="~/runs/mine", data=[])
    assert config.base == Path.home() / "models" / "chatpose"
    assert config.out == Path.home() / "runs" / "mine"


def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(
    base, tmp_path, monkeypatch, capsys, read_only
):
    shared = tmp_path / "shared"
    shared.mkdir()
    read_only(shared)
    monkeypatch.setattr(loop, "load_training_model", _raise(AssertionError("loaded")))
    argv = ["--base", str(base), *_write_data(tmp_path), "--out", str(shared / "run" / "1")]
    assert train_cli.main(argv) == train_cli.EXIT_USAGE
    assert f"error: --out: cannot write in {shared}" in capsys.readouterr().err


def test_a_mix_that_leaves_nothing_to_train_on_is_refused_before_the_model_loads(
    base, examples, tmp_path, monkeypatch
):
    monkeypatch.setattr(loop, "load_training_model", _raise(AssertionError("loaded")))
    text = [e for e in examples if e.kind == "text_to_pose"]
    with pytest.raises(TrainingError, match="no examples to train on"):
        loop.train(settings(base, tmp_path / "run", mix=(0, 1, 1)), text)
    assert not (tmp_path / "run").exists()


def test_a_fresh_head_with_no_pose_in_the_mix_is_refused_before_the_model_loads(
    base, examples, tmp_path, monkeypatch
):
    """Its head would get no gradient: every checkpoint would give random poses."""
    monkeypatch.setattr(loop, "load_training_model", _raise(AssertionError("loaded")))
    chat = [e for e in examples if not e.poses]  # chat only, as a LLaVA file without <POSE>
    no_pose_kind = [(chat, {}), (examples, {"mix": (0, 0, 1)})]
    for data, options in no_pose_kind + [(chat, {"head_init": "fresh"})]:
        with pytest.raises(TrainingError) as info:
            loop.train(settings(base, tmp_path / "run", **options), data)
        message = str(info.value)
        assert "no example the mix draws carries a pose" in message
        assert "--head-init base" in message
        assert not (tmp_path / "run").exists()
    # The model loads when the head is kept, or when a chat example of the mix has a pose.
    posed_chat = Example("chat", "Show me a pose.", "Here it is: <POSE>.", poses=(POSES[0],))
    for data, options in [(chat, {"head_init": "base"}), ([*chat, posed_chat], {})]:
        with pytest.raises(AssertionError, match="loaded"):
            loop.train(settings(base, tmp_path / "run", **options), data)


def test_the_data_are_asked_in_the_base_s_prompt_wording(base, tmp_path, monkeypatch):
    released = tmp_path / "released"
    shutil.copytree(base, released)
    config = json.loads((released / "chatpose.json").read_text())
    (released / "chatpose.json").write_text(json.dumps({**config, "prompt_wording": "release"}))
    questions = []
    encode = Encoder.encode

    def recording(self, example):
        questions.append((example.question, example.answer))
        return encode(self, example)

    monkeypatch.setattr(Encoder, "encode", recording)
    data = _write_data(tmp_path)
    argv = ["--base", str(released), *data, "--out", str(tmp_path / "run"), "--steps", "1"]
    assert train_cli.main([*argv, "--device", "cpu", "--lora-rank", "4"]) == 0
    caption = next(q for q, _ in questions if q.startswith("There is a person: "))
    assert (caption, "Sure, it is <POSE>.") in questions
    assert (
        "Can you predict the SMPL pose of the person in this image?",
        "Sure, it is <POSE>.",
    ) in questions


def test_out_of_memory_names_the_settings_that_lower_it(base, tmp_path, monkeypatch, capsys):
    message = "CUDA out of memory. Tried to allocate 2.00 GiB\nsee the PyTorch docs"
    monkeypatch.setattr(loop, "load_training_model", _raise(torch.OutOfMemoryError(message)))
    argv = ["--base", str(base), *_write_data(tmp_path), "--out", str(tmp_path / "run")]
    assert train_cli.main(argv) == train_cli.EXIT_OUT_OF_MEMORY
    err = capsys.readouterr().err
    assert "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower" in err
    assert "--gradient-checkpointing" in err and "no checkpoint was saved yet" in err


def test_a_base_model_that_does_not_fit_the_gpu_is_out_of_memory_in_training_s_words(
    base, tmp_path, monkeypatch, capsys
):
    # Not the service's advice (--load-in-8bit, which train has not), nor a bad checkpoint.
    message = "CUDA out of memory. Tried to allocate 500.00 MiB"
    monkeypatch.setattr(
        loading.AutoModelForImageTextToText,
        "from_pretrained",
        _raise(torch.OutOfMemoryError(message)),
    )
    argv = ["--base", str(base), *_write_data(tmp_path), "--out", str(tmp_path / "run")]
    assert train_cli.main([*argv, "--device", "cpu"]) == train_cli.EXIT_OUT_OF_MEMORY
    err = capsys.readouterr().err
    assert "out of GPU memory loading the model; training loads the whole base model" in err
    assert "--load-in" not in err


def _raise(error):
    def raising(*args, **kwargs):
        raise error

    return raising


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_grad_norm", float("nan"), "max_grad_norm must be a finite number, got nan"),
        ("max_grad_norm", -1.0, "max_grad_norm must be 0 (no clipping) or more, got -1.0"),
        ("text_weight", float("inf"), "text_weight must be a finite number, got inf"),
        ("adapter_lr", float("inf"), "adapter_lr must be a finite number, got inf"),
        ("lr", 1e38, "lr must be at most 1 (AdamW moves each weight by about that much a step)"),
        ("adapter_lr", 2.0, "adapter_lr must be at most 1 (AdamW moves each weight by about"),
        ("action_weight", float("inf"), "action_weight must be a finite number, got inf"),
        ("seed", 2**64 - 1, "seed must be from 0 to 2**63 - 2, got 18446744073709551615"),
    ],
)
def test_numbers_that_would_silently_change_training_are_refused(
    base, tmp_path, field, value, message
):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(base=base, out=tmp_path, **{field: value})


def test_cli_refuses_an_out_with_a_stopped_run_and_numbers_that_are_not(base, tmp_path, capsys):
    data = _write_data(tmp_path)
    common = ["--base", str(base), *data, "--device", "cpu", "--steps", "2", "--lora-rank", "4"]
    stopped = tmp_path / "stopped"  # a run stopped before its first checkpoint
    (stopped / "base").mkdir(parents=True)
    (stopped / "train_log.jsonl").write_text("")
    assert train_cli.main([*common, "--out", str(stopped)]) == train_cli.EXIT_USAGE
    assert (
        "stopped holds a run that stopped before its first checkpoint (base, train_log.jsonl): "
        "nothing to resume; delete the folder or choose another --out"
    ) in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert train_cli.main([*common, "--out", str(tmp_path / "file")]) == train_cli.EXIT_USAGE
    assert "--out: " in capsys.readouterr().err
    under_a_file = tmp_path / "file" / "run" / "1"  # found before the model loads
    assert train_cli.main([*common, "--out", str(under_a_file)]) == train_cli.EXIT_USAGE
    assert f"--out: {tmp_path / 'file'} is a file, so {under_a_file}" in capsys.readouterr().err
    (tmp_path / "drive").symlink_to(tmp_path / "not mounted")  # once loaded: "File exists"
    assert train_cli.main([*common, "--out", str(tmp_path / "drive" / "run")]) == 2
    assert "is a link to" in capsys.readouterr().err
    for flag, value in (("--lr", "inf"), ("--mix", "inf:1:1"), ("--mix", "nan:1:1")):
        with pytest.raises(SystemExit) as info:
            train_cli.main([*common, "--out", str(tmp_path / "o"), flag, value])
        assert info.value.code == 2
    # Longer than the model reads: it could learn from them, but the service refuses them.
    assert train_cli.main([*common, "--out", str(tmp_path / "o"), "--max-length", "9999"]) == 2
    assert "--max-length 9999: this model reads at most 512 tokens" in capsys.readouterr().err


def test_a_missing_gpu_is_named_before_the_data_loads(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--base", str(base), "--data", "corpus", str(tmp_path / "absent.npz")]
    assert train_cli.main([*argv, "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "absent.npz" not in err


def test_an_out_that_holds_the_base_is_refused_without_being_called_a_stopped_run(
    base, tmp_path, capsys
):
    # The checkpoint layout has a base/ folder, as a run's --copy-base does: the message
    # told the user to delete the folder holding their model.
    data = _write_data(tmp_path)
    common = [*data, "--device", "cpu", "--steps", "1", "--lora-rank", "4"]
    shutil.copytree(base, tmp_path / "runs" / "base")  # the model where --copy-base puts it
    shutil.copytree(base, tmp_path / "copy")  # a checkpoint: its model is in its base/ too
    for out, model in ((tmp_path / "runs", tmp_path / "runs" / "base"), (tmp_path / "copy",) * 2):
        argv = ["--base", str(model), "--out", str(out), *common]
        assert train_cli.main(argv) == train_cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"--out {out} holds the --base model ({model})" in err and "delete" not in err
    # Another checkpoint (the demo's layout) as --out: not "a run that stopped".
    argv = ["--base", str(base), "--out", str(tmp_path / "copy"), *common]
    assert train_cli.main(argv) == train_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'copy'} is a checkpoint (it holds chatpose.json)" in err
    assert "delete" not in err
    # A run's own step-N checkpoint (an adapter, no base/): a run nested in it was made, which
    # the outer run's --keep-last could delete later (the training review).
    run = tmp_path / "run"
    assert train_cli.main(["--base", str(base), "--out", str(run), *common]) == 0
    step = next(run.glob("step-*"))
    assert train_cli.main(["--base", str(base), "--out", str(step), *common]) == 2
    assert f"--out {step} is a checkpoint (it holds chatpose.json)" in capsys.readouterr().err


def test_copy_base_into_a_folder_inside_the_base_is_refused_before_anything_is_copied(
    base, examples, tmp_path
):
    # copytree would copy the base into its own copy, level after level, until the disk filled.
    own = tmp_path / "base"
    shutil.copytree(base, own)
    out = Checkpoint.open(own).base_dir / "runs" / "ft"
    with pytest.raises(TrainingError, match="--copy-base: --out .* lies inside the base"):
        loop.train(settings(own, out, steps=1, copy_base=True), examples)
    assert not out.exists()


def test_the_checkpoint_before_a_damaged_one_is_found_by_its_step_not_its_name(tmp_path):
    # Past 999,999 steps the names have seven digits: as text, step-999999 sorts after them.
    for name in ("step-999998", "step-999999", "step-1000000", "step-1000001"):
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / STATE_NAME).write_bytes(b"")
        (tmp_path / name / HEAD_NAME).write_bytes(b"")
    assert "write step-1000000 into" in earlier_one(tmp_path / "step-1000001")
    assert "write step-999999 into" in earlier_one(tmp_path / "step-1000000")
    assert earlier_one(tmp_path / "elsewhere") == ""
    (tmp_path / "step-²").mkdir()  # a digit to str.isdigit, not to int()
    assert "write step-999999 into" in earlier_one(tmp_path / "step-1000000")


def test_a_resume_that_cannot_rewrite_its_log_keeps_the_whole_log(tmp_path, monkeypatch):
    # The lines past the resumed step are dropped by writing the log again: on a full disk
    # that write fails, and must not leave the log cut short.
    log = tmp_path / LOG_NAME
    log.write_text("".join(json.dumps({"step": step}) + "\n" for step in (1, 2, 3, 4)))
    before = log.read_text()
    write_atomically = files.write_atomically

    def fills_the_disk(stream):
        stream.write(b'{"step"')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(
        files, "write_atomically", lambda path, _: write_atomically(path, fills_the_disk)
    )
    with pytest.raises(OSError, match="No space"):
        loop._forget_logged_steps_after(tmp_path, 2)
    assert log.read_text() == before
    monkeypatch.undo()
    loop._forget_logged_steps_after(tmp_path, 2)
    assert [json.loads(line)["step"] for line in log.open()] == [1, 2]


def test_a_diverged_run_names_only_checkpoints_it_still_has(tmp_path):
    nan = (float("nan"),) * 3
    (tmp_path / "step-000004").mkdir()  # --keep-last 1 pruned the ones before
    message = loop._diverged(5, "loss", nan, tmp_path / "step-000004")
    assert "its weights gave this loss" in message and "no earlier one is kept" in message
    (tmp_path / "step-000002").mkdir()
    message = loop._diverged(5, "gradient", nan, tmp_path / "step-000004")
    assert "earlier one (step-000002)" in message
    # Weights that are not finite came from this step's update: the one before is good.
    message = loop._diverged(5, "weights", nan, tmp_path / "step-000004")
    assert "last good checkpoint" in message and "--resume with a lower --lr" in message
    assert "no checkpoint was saved yet" in loop._diverged(1, "loss", nan, None)
    # Past 999,999 steps, by number: as text, step-999999 sorted after step-1000000.
    (tmp_path / "step-999999").mkdir()
    (tmp_path / "step-1000000").mkdir()
    (tmp_path / "step-²").mkdir()  # a digit to str.isdigit, not to int()
    message = loop._diverged(1_000_001, "loss", nan, tmp_path / "step-1000000")
    assert "(step-000002, step-000004, step-999999)" in message
    prune_checkpoints(tmp_path, 2, tmp_path / "step-1000000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000", "step-999999", "step-²"]


def test_weights_that_are_not_finite_are_never_saved(base, tmp_path, monkeypatch, capsys):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    argv = [
        *("--base", str(base), "--out", str(out), *data),
        *("--steps", "4", "--save-every", "1", "--batch-size", "2", "--lora-rank", "4"),
        *("--lora-alpha", "8", "--device", "cpu"),
    ]
    real_step, steps = torch.optim.AdamW.step, []

    def poisoning_step(self, *args, **kwargs):  # step 2 leaves a NaN in a weight
        result = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            self.param_groups[-1]["params"][0].data.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    assert train_cli.main(argv) == train_cli.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "step 2: the weights are not finite" in err and "step-000001 is kept" in err
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001"]


def test_a_checkpoint_the_disk_cannot_hold_is_named_and_removed(
    base, tmp_path, monkeypatch, capsys
):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    argv = [
        *("--base", str(base), "--out", str(out), *data),
        *("--steps", "3", "--save-every", "1", "--batch-size", "2", "--lora-rank", "4"),
        *("--lora-alpha", "8", "--device", "cpu"),
    ]
    real_save, saves = torch.save, []

    def full_disk(obj, path, *args, **kwargs):  # what torch says when a write falls short
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 83712")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert train_cli.main(argv) == train_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "step-000002: the checkpoint could not be written (a full disk?): [enforce" in err
    assert f"the last checkpoint is {out / 'step-000001'}; --resume continues from it" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if "step" in p.name) == ["step-000001"]


def test_a_failure_of_another_kind_while_saving_keeps_its_traceback(
    base, examples, tmp_path, monkeypatch
):
    def a_bug(obj, path, *args, **kwargs):
        raise RuntimeError("The weights trying to be saved contained shared tensors")

    monkeypatch.setattr(torch, "save", a_bug)
    with pytest.raises(RuntimeError, match="shared tensors"):  # not taken for a full disk
        loop.train(settings(base, tmp_path / "run", steps=1), examples)
    assert not list((tmp_path / "run").glob(".step-*"))  # its half-written folder removed


def test_damaged_checkpoints_are_named_not_tracebacks(base, tmp_path, capsys):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    argv = [
        *("--base", str(base), "--out", str(out), *data, "--steps", "2", "--save-every", "1"),
        *("--batch-size", "2", "--lora-rank", "4", "--lora-alpha", "8", "--device", "cpu"),
    ]
    assert train_cli.main(argv) == 0
    capsys.readouterr()
    resume = [*argv, "--resume", "--steps", "3"]
    state_path = out / "step-000002" / "training_state.pt"
    good = torch.load(state_path, weights_only=True)
    for damaged, message in [
        ([1, 2], "not a training state: a list"),
        ({k: v for k, v in good.items() if k != "optimizer"}, "damaged: it has no 'optimizer'"),
        (good | {"step": "x"}, "damaged: 'step' is a str"),
    ]:
        torch.save(damaged, state_path)
        assert train_cli.main(resume) == train_cli.EXIT_USAGE
        assert f"{state_path}: {message}" in capsys.readouterr().err
    (out / "step-000002" / "training_state.pt").write_bytes(b"")
    assert train_cli.main(resume) == train_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot read the training state" in err
    # The intact checkpoint before it is named, with the way to resume from it.
    assert f"to resume from the one before it, write step-000001 into {out / 'latest'}" in err
    (out / "step-000002" / "training_state.pt").write_bytes(b"\x80\x04 not a pickle")
    assert train_cli.main(resume) == train_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "not a training state this project wrote" in err and "weights_only" not in err
    latest = (out / "latest").read_bytes()
    (out / "latest").write_bytes(b"\xff\xfe")
    assert train_cli.main(resume) == train_cli.EXIT_USAGE
    assert "latest: not a readable checkpoint pointer" in capsys.readouterr().err
    (out / "latest").write_bytes(latest)
    shutil.rmtree(out / "step-000002" / "adapter")
    assert train_cli.main(resume) == train_cli.EXIT_USAGE
    assert (
        "which is not a complete checkpoint; to resume from the one before it, write "
        + ("step-000001")
        in capsys.readouterr().err
    )
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    weights = next((broken / "base").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    named = f"{weights}: not a readable safetensors file"  # the file, which transformers omits
    with pytest.raises(CheckpointError, match=re.escape(named)):
        ChatPoseModel.from_checkpoint(broken, device="cpu")
    assert train_cli.main([*argv[2:], "--base", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("stop", ["Ctrl-C", "SIGTERM"])
def test_a_stop_names_the_checkpoint_to_resume_from(base, tmp_path, monkeypatch, capsys, stop):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    argv = ["--base", str(base), "--out", str(out), *data, "--steps", "1", "--device", "cpu"]
    assert train_cli.main([*argv, "--lora-rank", "4"]) == 0
    capsys.readouterr()

    def interrupted(config, examples=None):  # `kill`, a scheduler's preemption
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    killed = []  # SIGTERM's handler outside the run: the default would end pytest
    monkeypatch.setattr(loop, "train", interrupted)
    previous = signal.signal(signal.SIGTERM, lambda number, frame: killed.append(number))
    try:
        code = train_cli.main([*argv, "--resume", "--steps", "9"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == train_cli.EXIT_INTERRUPTED and killed == []
    err = capsys.readouterr().err
    assert "interrupted; the last checkpoint is" in err and "step-000001" in err
    assert "Traceback" not in err


def test_a_stop_before_the_first_checkpoint_says_how_to_start_again(tmp_path):
    # A review: the folder's log refused the same command again, which only then said why.
    assert train_cli._last_checkpoint(tmp_path / "never made") == "no checkpoint was saved yet"
    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (tmp_path / "notes.txt").write_text("the user's, beside the run")  # not to be deleted
    assert train_cli._last_checkpoint(tmp_path) == (
        f"no checkpoint was saved yet (delete train_log.jsonl from {tmp_path} to start again, "
        "or choose another --out)"
    )


def test_a_resume_forgets_the_logged_steps_it_will_run_again(tmp_path):
    lines = [json.dumps({"step": s, "loss": 0.1}) for s in range(1, 8)]
    (tmp_path / "train_log.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "lo')
    loop._forget_logged_steps_after(tmp_path, 4)  # the run resumes from step 4
    logged = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").open()]
    assert logged == [1, 2, 3, 4]


def test_encoding_labels_exactly_the_answers(base, examples):
    processor = AutoProcessor.from_pretrained(Checkpoint.open(base).base_dir)
    config = Checkpoint.open(base).config
    pose_id = processor.tokenizer.convert_tokens_to_ids(config.pose_token)
    encoder = Encoder(processor, config, pose_id, 512)
    chat = examples[-1]
    encoded = encoder.encode(chat)
    encoder.check_against_processor(chat, encoded)
    pairs = zip(encoded.input_ids, encoded.labels, strict=True)
    labelled = [token for token, label in pairs if label != IGNORE_INDEX]
    answers = " I can chat about human poses.</s> Here it is: <POSE>.</s>"
    assert labelled == processor.tokenizer(answers, add_special_tokens=False)["input_ids"]
    assert encoded.pose_positions == []  # a pose token without a target: CE only
    assert encoded.input_ids.count(pose_id) == 1

    # A tokenizer this trainer follows otherwise is a typed checkpoint error, not a traceback.
    skewed = dataclasses.replace(encoded, input_ids=encoded.input_ids[1:])
    with pytest.raises(CheckpointError, match="differs from what this checkpoint's processor"):
        encoder.check_against_processor(chat, skewed)

    image = examples[4]
    encoded = encoder.encode(image)
    encoder.check_against_processor(image, encoded)
    assert encoded.input_ids.count(encoder.image_token_id) == encoder.tokens_per_image == 16
    (position,) = encoded.pose_positions
    assert encoded.input_ids[position] == pose_id and encoded.labels[position] == pose_id
    np.testing.assert_allclose(encoded.poses[0], POSES[4], atol=1e-6)
    # A head that gives poses in the camera's frame (the converted release) learns them there,
    # text and image poses alike: the data's upright root, half turned about X.
    in_camera = Encoder(processor, dataclasses.replace(config, pose_orientation="camera"),
                        pose_id, 512)  # fmt: skip
    text = next(e for e in examples if e.poses and not e.images)
    for example in (image, text):
        upright, turned = encoder.encode(example).poses[0], in_camera.encode(example).poses[0]
        np.testing.assert_allclose(turned[1:], upright[1:], atol=1e-6)
        np.testing.assert_allclose(
            axis_angle_to_matrix(turned[0]),
            np.diag([1.0, -1.0, -1.0]) @ axis_angle_to_matrix(upright[0]),
            atol=1e-5,
        )

    short = Encoder(processor, config, pose_id, 20)
    with pytest.raises(
        DatasetError, match=r"data/text\.json#0: .* tokens, more than the maximum length 20"
    ):
        short.encode(examples[0])
    two_images = Example("image_to_pose", "q", "<POSE>", images=(RED, BLUE), poses=(POSES[0],))
    with pytest.raises(DatasetError, match="2 images; .* max_images=1"):
        encoder.encode(two_images)


def test_records_the_model_cannot_take_are_all_named_and_image_counts_before_it_loads(
    base, tmp_path, examples, monkeypatch
):
    def crowded(n):
        return Example("image_to_pose", "q", "<POSE>", (RED, BLUE), (POSES[0],), source=f"p{n}")

    real_load = loop.load_training_model
    monkeypatch.setattr(loop, "load_training_model", _raise(AssertionError("model loaded")))
    data = [*examples, *(crowded(n) for n in range(5))]
    with pytest.raises(DatasetError) as refused:  # max_images: chatpose.json says, not the model
        loop.train(settings(base, tmp_path / "a"), data)
    assert str(refused.value).startswith("5 examples cannot be trained on: p0: 2 images; the")
    assert "; p1: 2 images" in str(refused.value) and str(refused.value).endswith("; and 2 more")
    monkeypatch.setattr(loop, "load_training_model", real_load)
    with pytest.raises(DatasetError) as refused:  # tokens: after the model loads, all at once
        loop.train(settings(base, tmp_path / "b", max_length=20), examples)
    assert re.match(
        r"\d+ examples cannot be trained on: data/text\.json#0: \d+ tokens, more than",
        str(refused.value),
    )


def test_sampler_follows_the_mix_and_the_seed():
    kinds = ["text_to_pose"] * 3 + ["image_to_pose"] * 5 + ["chat"] * 2
    sampler = MixedSampler(kinds, (1, 2, 1), 8, seed=1)
    batches = [sampler.next_batch() for _ in range(5)]
    for batch in batches:
        assert [kinds[i] for i in batch] == ["text_to_pose"] * 2 + ["image_to_pose"] * 4 + [
            "chat"
        ] * 2
    image_draws = [i for batch in batches for i in batch if kinds[i] == "image_to_pose"]
    assert sorted(image_draws[:5]) == [3, 4, 5, 6, 7]  # each kind is walked before repeating
    again = MixedSampler(kinds, (1, 2, 1), 8, seed=1)
    assert [again.next_batch() for _ in range(5)] == batches
    no_chat = MixedSampler(kinds[:8], (1, 2, 1), 3, seed=0)
    assert all(len(no_chat.next_batch()) == 3 for _ in range(4))
    # A batch the ratio does not divide: over many batches, the shares are the ratio's.
    for mix, size in (((1, 2, 1), 3), ((1, 1, 3), 3), ((1, 1, 1), 2)):
        odd = MixedSampler(kinds, mix, size, seed=2)
        drawn = [kinds[i] for _ in range(20_000) for i in odd.next_batch()]
        shares = [drawn.count(kind) / len(drawn) for kind in KINDS]
        np.testing.assert_allclose(shares, np.array(mix) / sum(mix), atol=0.006)
    with pytest.raises(TrainingError, match="no examples to train on"):
        MixedSampler(["chat"], (1, 1, 0), 2, seed=0)


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_training_does_not_run_in_float16(base, monkeypatch, capsys, bf16, expected):
    # A card before compute capability 8.0 serves in float16; training has no loss scaling.
    monkeypatch.setattr(
        training_model, "select_device", lambda _: (torch.device("cpu"), torch.float16)
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: bf16)
    tm = load_training_model(Checkpoint.open(base), settings(base, "unused"), None, None)
    assert tm.dtype == expected
    assert tm.model.get_input_embeddings().weight.dtype == expected
    # The base's own weights, trained in bfloat16, have no float32 copy: said, not silent.
    trains_base = settings(base, "unused", train_base="embeddings")
    load_training_model(Checkpoint.open(base), trains_base, None, None)
    said = "note: --train-base trains the base's own weights in bfloat16" in capsys.readouterr().err
    assert said == (expected == torch.bfloat16)


def test_training_loads_the_base_straight_onto_its_device_after_a_memory_check(base, monkeypatch):
    loaded = []
    load = training_model.load_base
    monkeypatch.setattr(
        training_model,
        "load_base",
        lambda path, **options: loaded.append(options) or load(path, **options),
    )
    load_training_model(Checkpoint.open(base), settings(base, "unused"), None, None)
    assert loaded[-1]["device_map"] == "cpu"  # not loaded into memory, then moved
    # On the CPU, a model larger than the memory free is named before the system kills the run.
    monkeypatch.setattr(loading, "free_host_memory", lambda: 1024)
    with pytest.raises(ModelError, match=r"GB free; train it on a GPU \(--device cuda\)$"):
        load_training_model(Checkpoint.open(base), settings(base, "unused"), None, None)


def test_the_saved_head_reads_raw_states_as_the_trained_one_read_centred_ones(base, examples):
    tm = load_training_model(Checkpoint.open(base), settings(base, "unused"), None, None)
    encoder = Encoder(tm.processor, tm.config, tm.pose_token_id, 512)
    batch = encoder.collate([encoder.encode(e) for e in examples[:4]])
    shift = tm.mean_pose_state([batch])
    tm.head_input_shift = shift
    states = torch.randn(5, shift.shape[0]) + shift
    with torch.no_grad():
        trained = tm.head(states - shift)
        saved = tm.exported_head()(states)
    torch.testing.assert_close(saved, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tm.head(states), trained)  # the shift is not a no-op


def test_batches_train_on_an_image_file_cropped_to_its_box(base, tmp_path):
    # HMR-style data: the person's box, not the whole photo, is what the model sees.
    photo = Image.new("RGB", (120, 40), (220, 20, 20))
    photo.paste((20, 20, 220), (80, 0, 120, 40))  # the person, on the right
    photo.save(tmp_path / "photo.png")
    digest = hashlib.sha256((tmp_path / "photo.png").read_bytes()).hexdigest()
    boxed = ImageFile(tmp_path / "photo.png", digest, CropBox(100, 20, 40))
    tm = load_training_model(Checkpoint.open(base), settings(base, "unused"), None, None)
    encoder = Encoder(tm.processor, tm.config, tm.pose_token_id, 512)

    def pixels(image):
        example = Example(
            "image_to_pose", *pose_exchange(None, True), images=(image,), poses=(POSES[0],)
        )
        return encoder.collate([encoder.encode(example)]).pixel_values

    torch.testing.assert_close(pixels(boxed), pixels(BLUE_SQUARE))
    assert not torch.allclose(pixels(dataclasses.replace(boxed, box=None)), pixels(BLUE_SQUARE))


def test_a_head_loaded_from_a_checkpoint_keeps_its_outputs_when_centring_starts(
    base, examples, tmp_path
):
    # The loaded head reads raw states; the new run trains it on centred ones, so the shift
    # must go into its bias at the start (a step of ~0 lr then saves the same head back).
    first = loop.train(settings(base, tmp_path / "one", steps=3), examples)
    again = loop.train(
        settings(first.checkpoint, tmp_path / "two", steps=1, lr=1e-12, head_init="base"),
        examples,
    )
    before = load_file(first.checkpoint / "pose_head.safetensors")
    after = load_file(again.checkpoint / "pose_head.safetensors")
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-5)


def test_auto_keeps_the_head_of_a_training_output_and_a_fresh_one_must_train(
    base, examples, tmp_path, capsys
):
    first = loop.train(settings(base, tmp_path / "one", steps=3), examples)
    assert "the SMPL head starts fresh" in capsys.readouterr().err  # a scaffolded base
    # A --train-base run saves no adapter: its head is a trained one all the same.
    whole = loop.train(
        settings(first.checkpoint, tmp_path / "two", steps=1, train_base="embeddings"), examples
    )
    assert not (whole.checkpoint / "adapter").exists()
    again = loop.train(
        settings(whole.checkpoint, tmp_path / "three", steps=1, lr=1e-12, train_base="embeddings"),
        examples,
    )
    assert "starts fresh" not in capsys.readouterr().err
    before = load_file(whole.checkpoint / "pose_head.safetensors")
    after = load_file(again.checkpoint / "pose_head.safetensors")
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-5)
    # A head that starts fresh and has no pose loss would be saved random.
    untrained = settings(base, tmp_path / "four", steps=1, train_base="lm_head", pose_weight=0.0)
    with pytest.raises(TrainingError, match="--pose-weight 0 trains no SMPL head"):
        loop.train(untrained, examples)
    assert not (tmp_path / "four").exists()


def test_gradient_checkpointing_trains_the_same_run(base, examples, tmp_path, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaMLP

    layer_passes = []  # of each run: the layers' MLPs, which the checkpointing replays
    forward = LlamaMLP.forward

    def counted(self, *args, **kwargs):
        layer_passes[-1] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    runs = []
    for on in (False, True):
        layer_passes.append(0)
        config = settings(base, tmp_path / str(on), steps=3, gradient_checkpointing=on)
        runs.append(loop.train(config, examples))
    assert layer_passes[1] > layer_passes[0]  # the backward pass ran the layers again
    np.testing.assert_allclose(runs[1].losses, runs[0].losses, rtol=1e-5)
    adapters = [load_file(r.checkpoint / "adapter" / "adapter_model.safetensors") for r in runs]
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], rtol=1e-4, atol=1e-6)
    parse = train_cli.build_parser().parse_args
    required = ["--base", "b", "--out", "o", "--data", "corpus", "c.npz"]
    assert parse([*required, "--gradient-checkpointing"]).gradient_checkpointing


def test_centring_is_on_by_default_and_kept_across_a_resume(base, examples, tmp_path):
    loop.train(settings(base, tmp_path / "run", steps=3), examples)
    state = torch.load(tmp_path / "run" / "step-000003" / STATE_NAME, weights_only=True)
    assert state["head_input_shift"] is not None and state["head_input_shift"].abs().sum() > 0
    assert state["run"]["center_head_input"] is True
    loop.train(settings(base, tmp_path / "raw", steps=3, center_head_input=False), examples)
    raw = torch.load(tmp_path / "raw" / "step-000003" / STATE_NAME, weights_only=True)
    assert raw["head_input_shift"] is None


def test_adapter_lr_zero_trains_the_head_alone(base, examples, tmp_path):
    result = loop.train(settings(base, tmp_path / "run", steps=4, adapter_lr=0.0), examples)
    adapter = load_file(result.checkpoint / "adapter" / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert lora_b and all(adapter[k].abs().sum() == 0 for k in lora_b)  # still as initialised
    head = load_file(result.checkpoint / "pose_head.safetensors")
    fresh = load_training_model(
        Checkpoint.open(base), settings(base, "unused"), None, None
    ).head.state_dict()
    assert any(not torch.allclose(head[k], fresh[k]) for k in head)
    with pytest.raises(ValueError, match="adapter_lr"):
        settings(base, tmp_path / "bad", adapter_lr=-1.0)


def test_train_base_trains_every_weight_and_saves_whole_models(base, examples, tmp_path):
    straight = loop.train(settings(base, tmp_path / "a", steps=4, train_base="all"), examples)
    checkpoint = Checkpoint.open(straight.checkpoint)
    assert checkpoint.adapter_dir is None
    assert checkpoint.base_dir == straight.checkpoint / "base"
    assert json.loads((straight.checkpoint / "chatpose.json").read_text())["base_model"] == "base"

    # Every part of the base moved, the vision side included.
    original = AutoModelForImageTextToText.from_pretrained(Checkpoint.open(base).base_dir)
    served = ChatPoseModel.from_checkpoint(straight.checkpoint, device="cpu")
    trained = served.model.state_dict()
    for part in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        names = [n for n in original.state_dict() if part in n and n.endswith("weight")]
        assert names, part
        assert any(not torch.equal(trained[n], original.state_dict()[n]) for n in names), part
    predicted = served.predict_poses([PosePrompt(CAPTIONS[0]), PosePrompt(images=(RED,))])
    assert all(p.shape == (24, 3) and np.isfinite(p).all() for p in predicted)

    # Resume reads the saved whole model and continues exactly.
    loop.train(settings(base, tmp_path / "b", steps=2, train_base="all"), examples)
    resumed = loop.train(
        settings(base, tmp_path / "b", steps=4, train_base="all", resume=True), examples
    )
    np.testing.assert_allclose(
        [x[1:] for x in resumed.losses], [x[1:] for x in straight.losses[2:]], rtol=1e-5
    )
    with pytest.raises(TrainingError, match="train_base is None but the run"):
        loop.train(settings(base, tmp_path / "b", steps=6, resume=True), examples)
    # A run saved when train_base was a flag resumes under its scope's name.
    newest = tmp_path / "b" / (tmp_path / "b" / "latest").read_text().strip()
    state = torch.load(newest / STATE_NAME, weights_only=True)
    state["run"]["train_base"] = True
    torch.save(state, newest / STATE_NAME)
    loop.train(settings(base, tmp_path / "b", steps=5, train_base="all", resume=True), examples)
    with pytest.raises(ValueError, match="would train nothing"):
        settings(base, tmp_path / "bad", train_base="all", adapter_lr=0.0)
    with pytest.raises(ValueError, match="copy_base does nothing"):
        settings(base, tmp_path / "bad", train_base="all", copy_base=True)


def _changed_weights(base: Path, checkpoint: Path) -> set[str]:
    original = AutoModelForImageTextToText.from_pretrained(Checkpoint.open(base).base_dir)
    trained = ChatPoseModel.from_checkpoint(checkpoint, device="cpu").model
    return {
        name
        for name, weight in trained.state_dict().items()
        if not torch.equal(weight, original.state_dict()[name])
    }


def test_train_base_embeddings_trains_the_token_embeddings_alone(base, examples, tmp_path):
    text = [e for e in examples if e.kind == "text_to_pose"]
    result = loop.train(
        settings(base, tmp_path / "run", steps=3, train_base="embeddings", mix=(1, 0, 0)), text
    )
    changed = _changed_weights(base, result.checkpoint)
    assert changed and all("embed_tokens" in name for name in changed), changed
    with pytest.raises(ValueError, match="train_base must be one of"):
        settings(base, tmp_path / "bad", train_base="lora")
    parse = train_cli.build_parser().parse_args
    required = ["--base", "b", "--out", "o", "--data", "corpus", "c.npz"]
    assert parse(required).train_base is None
    assert parse([*required, "--train-base"]).train_base == "all"
    assert parse([*required, "--train-base", "embeddings"]).train_base == "embeddings"
    assert parse([*required, "--train-base", "vision"]).train_base == "vision"


def test_train_base_context_trains_the_embeddings_and_the_first_layer_s_mlp(
    base, examples, tmp_path
):
    text = [e for e in examples if e.kind == "text_to_pose"]
    result = loop.train(
        settings(base, tmp_path / "run", steps=3, train_base="context", mix=(1, 0, 0)), text
    )
    changed = _changed_weights(base, result.checkpoint)
    parts = {
        "embeddings" if "embed_tokens" in name else name.split("layers.")[1].rsplit(".", 1)[0]
        for name in changed
    }
    assert parts == {
        "embeddings",
        "0.mlp.gate_proj",
        "0.mlp.up_proj",
        "0.mlp.down_proj",
    }, changed
    parse = train_cli.build_parser().parse_args
    required = ["--base", "b", "--out", "o", "--data", "corpus", "c.npz"]
    assert parse([*required, "--train-base", "context"]).train_base == "context"


def test_train_base_vision_trains_the_tower_and_the_projector_alone(base, examples, tmp_path):
    images = [e for e in examples if e.kind == "image_to_pose"]
    result = loop.train(
        settings(base, tmp_path / "run", steps=3, train_base="vision", mix=(0, 1, 0)), images
    )
    changed = _changed_weights(base, result.checkpoint)
    sides = {name.split(".")[1] for name in changed}  # model.vision_tower.…
    assert sides == {"vision_tower", "multi_modal_projector"}, changed


def test_train_base_projector_trains_the_projector_alone(base, examples, tmp_path):
    images = [e for e in examples if e.kind == "image_to_pose"]
    result = loop.train(
        settings(base, tmp_path / "run", steps=3, train_base="projector", mix=(0, 1, 0)), images
    )
    changed = _changed_weights(base, result.checkpoint)
    assert {name.split(".")[1] for name in changed} == {"multi_modal_projector"}, changed
    parse = train_cli.build_parser().parse_args
    required = ["--base", "b", "--out", "o", "--data", "corpus", "c.npz"]
    assert parse([*required, "--train-base", "projector"]).train_base == "projector"


def test_train_base_lm_head_learns_the_answer_and_moves_no_pose(base, examples, tmp_path):
    # build_demo's answer stage: the output layer alone, on the cross-entropy alone.
    text = [e for e in examples if e.kind == "text_to_pose"]
    config = settings(
        base, tmp_path / "run", steps=12, lr=1e-2, save_every=0, mix=(1, 0, 0),
        train_base="lm_head", text_weight=1.0, pose_weight=0.0, center_head_input=False,
        head_init="base",
    )  # fmt: skip
    result = loop.train(config, text)
    changed = _changed_weights(base, result.checkpoint)
    assert changed and all("lm_head" in name for name in changed), changed
    ces = [ce for _, _, ce, _ in result.losses]
    assert np.mean(ces[-3:]) < np.mean(ces[:3]) - 0.5
    before, after = (Checkpoint.open(c) for c in (base, result.checkpoint))
    assert after.head_path.read_bytes() == before.head_path.read_bytes()
    parse = train_cli.build_parser().parse_args
    required = ["--base", "b", "--out", "o", "--data", "corpus", "c.npz"]
    assert parse([*required, "--train-base", "lm_head"]).train_base == "lm_head"


def test_loss_weights_are_checked_and_used(base, examples, tmp_path):
    pose_only = loop.train(
        settings(base, tmp_path / "pose", steps=1, text_weight=0.0, pose_weight=1.0), examples
    )
    _, total, ce, pose = pose_only.losses[0]
    assert ce > 0 and total == pytest.approx(pose, rel=1e-6)
    for weights in ((-1.0, 0.1), (0.0, 0.0)):
        with pytest.raises(ValueError, match="text_weight and pose_weight"):
            settings(base, tmp_path / "bad", text_weight=weights[0], pose_weight=weights[1])


def test_the_action_loss_trains_a_classifier_that_is_resumed_and_never_exported(
    base, examples, tmp_path
):
    text = [e for e in examples if e.kind == "text_to_pose"]
    named = [
        dataclasses.replace(e, action=a)
        for e, a in zip(text, ["up", "kneel", "up", ""], strict=True)
    ]
    processor = AutoProcessor.from_pretrained(Checkpoint.open(base).base_dir)
    config = Checkpoint.open(base).config
    pose_id = processor.tokenizer.convert_tokens_to_ids(config.pose_token)
    encoder = Encoder(processor, config, pose_id, 512, actions=("kneel", "up"))
    batch = encoder.collate([encoder.encode(e) for e in [*named, examples[-1]]])
    assert batch.pose_actions.tolist() == [1, 0, 1, IGNORE_INDEX]  # the chat turn: no pose

    common = dict(text_weight=0.0, pose_weight=1.0, action_weight=1.0, mix=(1, 0, 0))
    common |= dict(train_base="embeddings", lr=1e-2, save_every=3)
    straight = loop.train(settings(base, tmp_path / "a", steps=12, **common), named)
    # The total is the pose loss plus the classifier's cross-entropy, which falls as it learns.
    action_ce = [total - pose for _, total, _, pose in straight.losses]
    assert all(ce > 0 for ce in action_ce)
    assert np.mean(action_ce[-3:]) < np.mean(action_ce[:3]) - 0.1
    state = torch.load(straight.checkpoint / STATE_NAME, weights_only=True)
    assert state["action_classifier"]["weight"].shape[0] == 2  # "kneel" and "up"
    assert not any(
        "action" in key for key in load_file(straight.checkpoint / "pose_head.safetensors")
    )

    first = loop.train(settings(base, tmp_path / "b", steps=6, **common), named)
    resumed = loop.train(settings(base, tmp_path / "b", steps=12, resume=True, **common), named)
    np.testing.assert_allclose(
        [x[1:] for x in resumed.losses],
        [x[1:] for x in straight.losses[len(first.losses) :]],
        rtol=1e-5,
    )
    with pytest.raises(TrainingError, match="action_weight is 0.5 but the run"):
        loop.train(
            settings(
                base, tmp_path / "b", steps=15, resume=True, **{**common, "action_weight": 0.5}
            ),
            named,
        )
    with pytest.raises(ValueError, match="action_weight must be 0 or more"):
        settings(base, tmp_path / "bad", action_weight=-1.0)
    parse = train_cli.build_parser().parse_args
    required = ["--base", "b", "--out", "o", "--data", "corpus", "c.npz"]
    assert parse(required).action_weight == 0.0
    assert parse([*required, "--action-weight", "0.003"]).action_weight == 0.003


def test_the_command_line_offers_exactly_the_loops_choices():
    # train.py mirrors these by hand so that `--help` needs no torch; this keeps them equal.
    actions = {a.dest: a for a in train_cli.build_parser()._actions}
    assert tuple(actions["train_base"].choices) == tuple(s for s in TRAIN_BASE_SCOPES if s)
    assert tuple(actions["lr_schedule"].choices) == LR_SCHEDULES
    assert tuple(actions["head_init"].choices) == HEAD_INITS


def test_the_help_is_written_in_utf8_whatever_the_system_code_page():
    # Redirected on Windows, stdout takes the code page (cp1252), which has no λ: `--help`
    # stopped with a UnicodeEncodeError.
    import subprocess
    import sys

    ran = subprocess.run(
        [sys.executable, "-m", "inference_service.train", "--help"],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "cp1252"},
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr.decode(errors="replace")
    assert "λ_t, the weight of the answer's cross-entropy" in ran.stdout.decode("utf-8")


def test_an_image_changed_during_a_run_stops_it_and_keeps_the_last_checkpoint(
    base, tmp_path, monkeypatch, capsys
):
    # Images are read again for each batch, not held in memory: a file changed mid-run stops
    # the run with its name, and the progress saved so far stays.
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    saving = loop.save_checkpoint

    def save_then_change_the_images(*args, **kwargs):
        saved = saving(*args, **kwargs)
        (tmp_path / "red.png").write_bytes(BLUE)
        (tmp_path / "blue.png").write_bytes(RED)
        return saved

    monkeypatch.setattr(loop, "save_checkpoint", save_then_change_the_images)
    argv = ["--base", str(base), "--out", str(out), *data, "--device", "cpu", "--lora-rank", "4"]
    argv += ["--steps", "6", "--save-every", "1", "--mix", "0:1:0"]
    assert train_cli.main(argv) == train_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert re.search(r"step 2: .*png: the image file changed after the training data was read", err)
    assert "the last checkpoint" in err and "step-000001 is kept" in err
    assert latest_checkpoint(out).name == "step-000001"


def test_a_fresh_head_starts_at_the_mean_pose_of_the_poses_it_trains_on(base, examples, tmp_path):
    # Text only: the image examples' poses, which the mix never draws, count for nothing.
    run = loop.train(settings(base, tmp_path / "run", steps=1, lr=1e-12, mix=(1, 0, 0)), examples)
    bias = load_file(run.checkpoint / "pose_head.safetensors")["2.bias"].numpy()
    np.testing.assert_allclose(bias, mean_pose_6d(POSES[:4]), atol=1e-4)


def test_a_refused_resume_names_the_data_file_that_differs(examples):
    _, then = fingerprint(examples)
    text, image, chat = examples[:4], examples[4:6], examples[6:]
    changed = dataclasses.replace(text[0], question="a man raising one arm")
    elsewhere = [dataclasses.replace(e, source=f"/runs/{e.source}") for e in [changed, *text[1:]]]
    cases = [
        ("chat.json (2 examples) is no longer among them", text + image),
        ("data/text.json gives 3 examples, and gave 4", text[1:] + image + chat),
        ("data/text.json gives 1 example, and gave 4", text[:1] + image + chat),
        ("data/text.json's examples changed", [changed, *text[1:]] + image + chat),
        (
            "more.json was not among them",
            [*examples, dataclasses.replace(chat[0], source="more.json#0")],
        ),
        # Given from another folder, it is found by its name.
        ("data/text.json's examples changed", elsewhere + image + chat),
        # Swapped, files are told apart by their content, whatever their names.
        (
            "the same examples in another order: give --data in the run's order "
            "(data/text.json, data/pairs.npz, chat.json)",
            image + text + chat,
        ),
        (
            "the same examples in another order: give --data in the run's order "
            "(data/text.json, data/pairs.npz, chat.json)",
            [text[0], image[0], *text[1:], *image[1:], *chat],
        ),
    ]
    for change, data in cases:
        assert data_change(then, fingerprint(data)[1]) == change
    # Two files of the same content, one left out: the one no longer given is named.
    twins = [["a.json", 3, "same"], ["b.json", 3, "same"]]
    assert data_change(twins, twins[:1]) == "b.json (3 examples) is no longer among them"
    assert data_change(twins[:1], twins) == "b.json was not among them"
