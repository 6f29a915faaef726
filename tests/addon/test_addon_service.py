"""The add-on against a real `chatpose-serve` process on loopback running the tiny model, and
against a scripted service process that is killed mid-batch and restarted.

Headless Blender runs no timers: the tests call the timer's callback (``drive``) as Blender
would, and every call must come back quickly.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

import bpy
import numpy as np
import pytest

from blender_addon.blender import answers, batch_store, live, props, sending
from blender_addon.blender.armature import create_smpl_armature
from blender_addon.blender.keyframes import keyed_frames
from blender_addon.blender.posing import read_pose
from blender_addon.core import batch_plan
from blender_addon.core.session import Session
from blender_addon.core.timeline import frames_for
from shared_protocol.client import Client
from shared_protocol.protocol import PoseRequest
from tests.service.scripted_backend import pose_for, start_scripted_server

from .helpers import drive, free_port, idle, start_tiny_service, use_service

TIMEOUT_S = 30.0


@pytest.fixture
def armature(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    bpy.context.scene.chatpose.target = obj
    return obj


def reference_pose(address: str, prompt: str, images=()):
    """What the service answers to a plain request, for comparison."""
    with Client(address) as client:
        reply = client.request(PoseRequest(client.new_id(), prompt, tuple(images)), TIMEOUT_S)
    return reply.poses[0]


def assert_pose(obj, pose, frame=None, atol=1e-4):
    np.testing.assert_allclose(read_pose(obj, frame).axis_angle, pose.axis_angle, atol=atol)


@pytest.fixture
def keyed_lines(monkeypatch):
    """Counts how often each batch line is keyed (over every run of a test)."""
    counts: Counter = Counter()
    original = batch_store.key_batch_lines

    def counting(obj, items, **options):
        record = original(obj, items, **options)
        counts.update(line.line for line, _ in items)
        return record

    monkeypatch.setattr(answers, "key_batch_lines", counting)
    return counts


@pytest.fixture
def batch_requests(monkeypatch):
    """The prompts of every batch request sent."""
    sent: list[list[str]] = []
    original = Session.request_batch

    def recording(self, prompts):
        sent.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(Session, "request_batch", recording)
    return sent


def batch_text(lines: list[str]) -> bpy.types.Text:
    text = bpy.data.texts.new("moves")
    text.write("\n".join(lines))
    settings = bpy.context.scene.chatpose
    settings.batch_source = "TEXT"
    settings.batch_text = text
    return text


def assert_every_line_keyed_once(obj, lines, start, step, counts):
    frames = frames_for(len(lines), start, step)
    assert counts == Counter(range(len(lines))), "a line was keyed twice or not at all"
    assert keyed_frames(obj) == frames  # no gaps, nothing extra
    record = batch_store.load_record(obj)
    assert record.pending(lines, start, step) == []
    assert [(e.line, e.frame) for e in record.entries] == list(enumerate(frames))


# --- the tiny model -------------------------------------------------------------------------


def test_a_prompt_puts_the_models_pose_on_the_armature(armature, tiny_service):
    use_service(tiny_service, TIMEOUT_S)
    settings = bpy.context.scene.chatpose
    settings.insert_keyframe = True
    bpy.context.scene.frame_current = 12
    settings.prompt = "a man raising both arms"
    assert bpy.ops.chatpose.send() == {"FINISHED"}
    drive(idle)
    expected = reference_pose(tiny_service, "a man raising both arms")
    assert_pose(armature, expected)
    assert_pose(armature, expected, frame=12)
    assert keyed_frames(armature) == [12]
    user, reply = props.history_messages(bpy.context.scene)
    assert (user.text, reply.role, reply.poses) == ("a man raising both arms", "assistant", 1)

    settings.chat_mode = True  # the tiny model chats (random words), with the history
    settings.insert_keyframe = False
    settings.prompt = "and now?"
    bpy.ops.chatpose.send()
    drive(idle)
    messages = props.history_messages(bpy.context.scene)
    assert [m.role for m in messages] == ["user", "assistant"] * 2
    assert messages[2].text == "and now?"


def test_an_image_prompt(armature, tiny_service, tmp_path):
    from tests.service.tiny_llava import image_bytes

    use_service(tiny_service, TIMEOUT_S)
    image = image_bytes((200, 120, 40))
    path = tmp_path / "reference.png"
    path.write_bytes(image)
    bpy.context.scene.chatpose.prompt = "this person"
    assert bpy.ops.chatpose.pose_from_image(filepath=str(path)) == {"FINISHED"}
    drive(idle)
    assert_pose(armature, reference_pose(tiny_service, "this person", [image]))
    assert props.history_messages(bpy.context.scene)[0].attachment == "image: reference.png"


def test_a_batch_cancelled_then_resumed_keys_every_line_once(
    armature, tiny_service, keyed_lines, batch_requests
):
    """270 lines: two batch requests (the protocol caps one at 256 prompts). Cancelled after
    the first item, then run again: the rerun asks for the remaining lines only."""
    use_service(tiny_service, TIMEOUT_S)
    lines = [f"pose {i}: lift the left leg" + "!" * (i % 7) for i in range(270)]
    batch_text(lines)
    settings = bpy.context.scene.chatpose
    settings.batch_start, settings.batch_step = 5, 2
    assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
    run = live.current_batch()
    assert [len(p) for p in batch_requests] == [256]
    # Another Batch Keyframe, from this scene or another, is told which run holds it back.
    with pytest.raises(live.UserError, match=r"^A batch from text '.*' is running on SMPL: "):
        sending._checked_batch(bpy.context)
    drive(lambda: run.keyed >= 1)
    assert bpy.ops.chatpose.cancel() == {"FINISHED"}
    drive(idle)
    assert run.state == batch_plan.CANCELLED and run.closed
    assert 1 <= run.keyed < 270 and len(batch_requests) == 1  # the second request never went
    assert "cancelled" in live.last_message()[0]
    done = set(keyed_lines)
    assert sorted(e.line for e in batch_store.load_record(armature).entries) == sorted(done)

    assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
    rerun = live.current_batch()
    assert rerun.already_keyed == len(done)
    drive(idle, timeout_s=120)
    assert rerun.state == batch_plan.FINISHED and rerun.remaining == 0
    rest = [line for i, line in enumerate(lines) if i not in done]
    assert [p for request in batch_requests[1:] for p in request] == rest
    assert all(len(request) <= 256 for request in batch_requests)
    assert_every_line_keyed_once(armature, lines, 5, 2, keyed_lines)
    for i in (0, 269):
        assert_pose(armature, reference_pose(tiny_service, lines[i]), frame=5 + 2 * i)

    sent = len(batch_requests)
    assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}  # a third run: nothing to do
    assert len(batch_requests) == sent and "keyed on SMPL already" in live.last_message()[0]


# --- a service that dies mid-batch ----------------------------------------------------------


def test_a_service_killed_mid_batch_then_restarted(armature, keyed_lines, reports):
    """SIGKILL after 5 lines (the scripted service stalls on the 6th, so the kill is always
    mid-batch): the run stops with a clear report; after a restart on the same address (no
    Blender restart) a rerun keys the other 7 lines: no gaps, no duplicates."""
    address = f"tcp://127.0.0.1:{free_port()}"
    use_service(address, TIMEOUT_S)
    lines = [f"line {i}" for i in range(12)]
    batch_text(lines)
    settings = bpy.context.scene.chatpose
    settings.batch_start, settings.batch_step = 1, 3
    process = start_scripted_server(address, "--stall-after", "5")
    try:
        bpy.ops.chatpose.batch_keyframe()
        run = live.current_batch()
        drive(lambda: run.keyed == 5)
        process.send_signal(signal.SIGKILL)
        process.wait(TIMEOUT_S)
        drive(idle, timeout_s=10)
        assert run.state == batch_plan.FAILED
        message, level = live.last_message()
        assert level == "ERROR"
        assert "stopped: the service at" in message and "went away" in message
        assert "5 lines keyed on SMPL; 7 of 12 still to key" in message
        assert "Run Batch Keyframe again" in message
        assert reports[-1] == ("ERROR", message)
        assert len(batch_store.load_record(armature).entries) == 5

        process = start_scripted_server(address)  # the same address
        assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
        rerun = live.current_batch()
        assert [line.line for line in rerun.pending] == list(range(5, 12))
        drive(idle)
        assert rerun.state == batch_plan.FINISHED
        assert_every_line_keyed_once(armature, lines, 1, 3, keyed_lines)
        for i, line in enumerate(lines):
            assert_pose(armature, pose_for(line), frame=1 + 3 * i, atol=1e-5)
    finally:
        process.kill()
        process.wait(TIMEOUT_S)


def test_the_real_service_killed_mid_batch_then_restarted(
    armature, tiny_checkpoint, tmp_path, keyed_lines, reports
):
    """The same against `chatpose-serve` with the tiny model: frozen (SIGSTOP) once a few of
    256 lines are keyed, so the kill always lands mid-batch, then killed; restarted on the same
    address, a rerun keys exactly the lines still missing."""
    address = f"tcp://127.0.0.1:{free_port()}"
    use_service(address, TIMEOUT_S)
    lines = [f"step {i}: raise the right arm" + "." * (i % 5) for i in range(256)]
    batch_text(lines)
    settings = bpy.context.scene.chatpose
    settings.batch_start, settings.batch_step = 10, 1
    # One line a pass: in batches of 8 the tiny model could answer all 256 before the freeze
    # (a CI run on a loaded machine), and none was left to lose.
    service = start_tiny_service(
        tiny_checkpoint, address, tmp_path / "first", options=("--max-batch", "1")
    )
    try:
        bpy.ops.chatpose.batch_keyframe()
        run = live.current_batch()
        drive(lambda: run.keyed >= 3)
        os.kill(service.pid, signal.SIGSTOP)
        os.kill(service.pid, signal.SIGKILL)
        service.stop(wait=True)
        drive(idle, timeout_s=TIMEOUT_S + 10)
    finally:
        service.stop(wait=True)
    message = run.summary()
    assert run.state == batch_plan.FAILED, message
    keyed_before = run.keyed
    assert 3 <= keyed_before < 256, message
    assert "went away" in message and f"{256 - keyed_before} of 256 still to key" in message
    assert ("ERROR", message) in reports, reports
    missing = sorted(set(range(256)) - {e.line for e in batch_store.load_record(armature).entries})
    assert len(missing) == 256 - keyed_before

    service = start_tiny_service(tiny_checkpoint, address, tmp_path / "second")
    try:
        assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
        rerun = live.current_batch()
        assert [line.line for line in rerun.pending] == missing
        drive(idle, timeout_s=120)
        assert rerun.state == batch_plan.FINISHED
        assert_every_line_keyed_once(armature, lines, 10, 1, keyed_lines)
        for i in sorted({0, max(0, missing[0] - 1), missing[0], 255}):
            assert_pose(armature, reference_pose(address, lines[i]), frame=10 + i)
    finally:
        service.stop(wait=True)
