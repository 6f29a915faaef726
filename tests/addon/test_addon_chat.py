"""The chat panel inside headless Blender: registration, the history in the .blend, pictures,
several people, undo, a service that is down, the local service buttons. The service here is
the scripted stand-in (tests/service/scripted_backend.py); test_addon_service.py runs the real
chatpose-serve with the tiny model."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import socket
import sys
import threading
import time
import types

import bpy
import numpy as np
import pytest

from blender_addon import panel, preferences
from blender_addon.blender import (
    answers,
    batch_store,
    chat_operators,
    feedback,
    file_handlers,
    live,
    local_service,
    props,
    runtime,
    sending,
)
from blender_addon.blender.anim import action_fcurves
from blender_addon.blender.armature import create_smpl_armature, rest_joints
from blender_addon.blender.capture import CaptureError, capture_viewport, render_camera_snapshot
from blender_addon.blender.keyframes import key_poses, keyed_frames
from blender_addon.blender.live import UserError
from blender_addon.blender.posing import apply_pose, read_pose
from blender_addon.core import batch_plan, batch_record, chat, mannequin
from blender_addon.core.dispatch import StatusFailed, StatusJob
from blender_addon.core.images import encode_png, png_size
from blender_addon.core.service_process import ServiceProcess, last_line, serve_command
from shared_protocol.batch_text import MAX_FILE_BYTES
from shared_protocol.pose import Motion, Pose
from shared_protocol.protocol import ErrorCode, Turn
from tests.service.scripted_backend import SCRIPTED_SERVER, ScriptedBackend, pose_for

from .conftest import ADDON
from .helpers import draw_panels, drive, free_port, idle, random_pose, use_service


@pytest.fixture
def armature(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    bpy.context.scene.chatpose.target = obj
    return obj


def assert_pose(obj, pose, frame=None, atol=1e-5):
    np.testing.assert_allclose(read_pose(obj, frame).axis_angle, pose.axis_angle, atol=atol)


# --- registration ---------------------------------------------------------------------------


def test_one_timer_call_applies_answers_for_its_budget_then_yields(blender, monkeypatch):
    """Blender stays responsive: a call applies at least one waiting answer, then stops before
    one more, costing what the last did, would take it past TICK_BUDGET_S, and asks to be
    called again soon (a call went on while under it: two 16 ms groups held Blender 32 ms). A
    fake clock makes each answer take 10 ms."""
    clock = [100.0]
    applied = []

    def apply(outcome):
        applied.append(outcome)
        clock[0] += 0.010

    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(answers, "apply_outcome", apply)
    monkeypatch.setattr(live.state, "dispatcher", None)
    backlog = live.state.backlog
    backlog.clear()
    backlog.extend(f"answer {i}" for i in range(10))
    assert runtime.timer_tick() == 0.001  # more waiting: called again right away
    per_call = math.floor(runtime.TICK_BUDGET_S / 0.010)
    assert applied == [f"answer {i}" for i in range(per_call)]
    assert clock[0] - 100.0 <= runtime.TICK_BUDGET_S  # within the budget, not past it
    # An answer slower than the whole budget still goes through, one a call.
    monkeypatch.setattr(answers, "apply_outcome", lambda o: (apply(o), clock.__setitem__(0, 1e3)))
    runtime.timer_tick()
    assert applied[-1] == f"answer {per_call}" and len(backlog) == 10 - per_call - 1
    backlog.clear()


def test_batch_lines_slow_to_key_are_keyed_fewer_a_call(blender, monkeypatch):
    """Lines keyed slowly (1.5 ms each here): 32 in one call held Blender for 48 ms. After a
    group over TICK_BUDGET_S the next takes as many as fit in four fifths of it, and never
    fewer than MIN_LINES_PER_GROUP (a pass's fixed part stays)."""
    from blender_addon.core.dispatch import BatchLineReady

    clock, groups = [100.0], []

    def key(outcome):
        groups.append(len(outcome.items))
        clock[0] += 0.0015 * len(outcome.items)

    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(answers, "apply_outcome", key)
    monkeypatch.setattr(live.state, "dispatcher", None)
    run = object()  # one run's lines, in a row
    backlog = live.state.backlog
    backlog.clear()
    backlog.extend(BatchLineReady(run, None, ()) for _ in range(80))
    while backlog:
        runtime.timer_tick()
    per_group = int(0.8 * runtime.TICK_BUDGET_S / 0.0015)  # aiming below the budget
    assert groups[0] == runtime.MAX_LINES_PER_GROUP and sum(groups) == 80
    assert set(groups[1:-1]) == {per_group} and 0.0015 * per_group <= runtime.TICK_BUDGET_S
    assert runtime.lines_within_budget(1, 0.0005) == runtime.MAX_LINES_PER_GROUP  # fast again
    # A fixed part over the budget (lines between 5,000 keys): one line a pass was 10x slower.
    assert runtime.lines_within_budget(32, 10.0) == runtime.MIN_LINES_PER_GROUP


def test_lines_an_undo_took_back_are_keyed_again_first_in_groups_within_the_budget(
    blender, monkeypatch
):
    """Keyed again as lines that arrive are (1.5 ms a line here), before the run's end waiting
    in the backlog."""
    from blender_addon.core.batch_record import BatchRecord
    from blender_addon.core.dispatch import BatchEnded, Dispatcher

    clock, applied = [100.0], []

    def key(outcome):
        if isinstance(outcome, answers.BatchLines):
            applied.append([item.line.line for item in outcome.items])
            for item in outcome.items:
                item.run.item_keyed(item.line)
        else:
            applied.append(outcome)
        clock[0] += 0.0015 * len(getattr(outcome, "items", ()))

    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(answers, "apply_outcome", key)
    monkeypatch.setattr(runtime, "why_answers_wait_now", lambda: None)
    monkeypatch.setattr(live.state, "dispatcher", Dispatcher())
    monkeypatch.setattr(live.state, "lines_per_group", None)
    pending = BatchRecord().pending([f"pose {i}" for i in range(100)], 1)
    run = live.state.dispatcher.batch = batch_plan.BatchRun("SMPL", "text", pending, 100)
    run.next_prompts()
    for i in range(100):
        run.item_answered(run.line_for(i), pose_for(f"pose {i}"))
        run.item_keyed(run.line_for(i))
    run.recheck(lambda line: line.line >= 80)  # an undo took back the first 80
    live.state.backlog.append(BatchEnded(run))
    calls = []
    while live.state.backlog:
        began = clock[0]
        runtime.timer_tick()
        calls.append(clock[0] - began)
    groups = [len(group) for group in applied[:-1]]
    per_group = int(0.8 * runtime.TICK_BUDGET_S / 0.0015)
    assert groups[0] == runtime.MAX_LINES_PER_GROUP and set(groups[1:-1]) == {per_group}
    assert [line for group in applied[:-1] for line in group] == list(range(80))
    assert applied[-1] == BatchEnded(run) and (run.keyed, run.taken_back) == (100, 0)
    assert max(calls[1:]) <= runtime.TICK_BUDGET_S  # the first: one group, as ever


# --- the chat history -----------------------------------------------------------------------


def test_the_chat_history_is_saved_in_the_blend_file(blender, tmp_path):
    scene = bpy.context.scene
    props.append_history(scene, chat.exchange("wave", "Sure, <POSE>.", poses=1))
    props.append_history(
        scene, chat.exchange("now sit", "no service", attachment="viewport image", failed=True)
    )
    scene.chatpose.chat_mode = True
    path = str(tmp_path / "chat.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path)
    bpy.ops.wm.read_homefile(use_empty=True)  # a new file; the add-on stays enabled
    assert len(bpy.context.scene.chatpose.history) == 0
    bpy.ops.wm.open_mainfile(filepath=path)
    loaded = props.history_messages(bpy.context.scene)
    assert loaded == [
        chat.Message("user", "wave"),
        chat.Message("assistant", "Sure, <POSE>.", poses=1),
        chat.Message("user", "now sit", attachment="viewport image"),
        chat.Message("error", "no service"),
    ]
    assert props.history_messages(bpy.context.scene, last=2) == loaded[2:]  # what the panel reads
    assert props.history_messages(bpy.context.scene, last=9) == loaded
    assert bpy.context.scene.chatpose.chat_mode
    assert bpy.ops.chatpose.clear_history() == {"FINISHED"}
    assert len(bpy.context.scene.chatpose.history) == 0


def test_an_answer_that_fails_half_way_is_one_undo_step_of_its_own(
    armature, scripted_service, monkeypatch
):
    address, _ = scripted_service
    use_service(address)
    bpy.context.scene.chatpose.chat_mode = True  # two people: the second fails to be made
    from blender_addon.blender import people

    def no_second_person(*args, **kwargs):
        raise RuntimeError("the second person could not be made")

    monkeypatch.setattr(people, "person_armature", no_second_person)
    steps = []
    monkeypatch.setattr(feedback, "push_undo", steps.append)
    bpy.context.scene.chatpose.prompt = "two dancers"
    bpy.ops.chatpose.send()
    drive(idle)
    assert "could not apply an answer: the second person" in live.last_message()[0]
    assert steps == ["chat", "answer"]  # the exchange, then the posed target with the rest


def test_a_second_person_whose_name_a_mesh_holds_is_left_out_and_named(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    bpy.context.scene.chatpose.chat_mode = True  # two people: SMPL and SMPL.person2
    mesh = bpy.data.objects.new("SMPL.person2", bpy.data.meshes.new("taken"))
    bpy.context.scene.collection.objects.link(mesh)
    bpy.context.scene.chatpose.prompt = "two dancers"
    bpy.ops.chatpose.send()
    drive(idle)
    assert_pose(armature, pose_for("two dancers"))  # the first person still posed
    message, level = live.last_message()
    assert "Applied 1 pose(s) to SMPL" in message and level == "WARNING"
    assert "not applied: SMPL.person2 (the name is taken)" in message
    assert bpy.data.objects["SMPL.person2"] == mesh and mesh.type == "MESH"


def test_an_answer_that_cannot_be_placed_is_a_failed_exchange_and_its_prompt_comes_back(
    armature, scripted_service, monkeypatch
):
    address, _ = scripted_service
    use_service(address)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in finding the armature")

    monkeypatch.setattr(answers, "_where_to_apply", broken)
    bpy.context.scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    assert "a bug in finding the armature" in live.last_message()[0]
    history = props.history_messages(bpy.context.scene)
    assert [(m.role, m.text) for m in history] == [
        ("user", "wave"),
        ("error", "the answer was not applied (a bug in finding the armature)"),
    ]
    assert bpy.context.scene.chatpose.prompt == "wave"  # to send again


def test_a_reply_cut_at_the_service_s_token_limit_says_so(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    settings = bpy.context.scene.chatpose
    settings.chat_mode = True
    settings.prompt = "ramble on about a tired person"
    bpy.ops.chatpose.send()
    drive(idle)
    message, level = live.last_message()
    assert level == "WARNING"
    assert message == (
        "Reply without a pose: Well, a tired person would first; the reply was cut at the "
        "service's limit of new tokens (chatpose-serve --max-new-tokens), before the model "
        "ended it"
    )


def test_a_chat_whose_oldest_exchanges_the_model_did_not_see_says_so(armature, scripted_service):
    address, backend = scripted_service
    use_service(address)
    backend.context_turns = 2  # the model reads the last exchange of the history alone
    settings = bpy.context.scene.chatpose
    settings.chat_mode = True
    for prompt in ("wave", "sit", "now bow"):
        settings.prompt = prompt
        bpy.ops.chatpose.send()
        drive(idle)
    message, level = live.last_message()
    assert len(backend.items[-1].history) == 4
    assert message.endswith(
        "; the model did not see the chat's 1 oldest exchange(s) sent, which with the reply "
        "would not fit its context"
    )
    assert level == "INFO"  # a long chat's rule, not a fault
    settings.chat_mode, settings.prompt = False, "jump"  # pose mode: no history, no note
    bpy.ops.chatpose.send()
    drive(idle)
    assert "did not see" not in live.last_message()[0]


def test_a_chat_turn_waits_for_the_answer_before_it_to_go_with_it(armature, scripted_service):
    _, backend = _send_while_held(scripted_service, "how would a tired person stand?")
    settings = bpy.context.scene.chatpose
    assert live.pending_jobs()[0].mode == "pose"  # pose mode: several may be on their way
    backend.release()
    drive(idle)
    settings.chat_mode = True
    backend.hold()
    settings.prompt = "how would a tired person stand?"
    bpy.ops.chatpose.send()
    settings.prompt = "now make them sit"
    with pytest.raises(RuntimeError) as refused:
        bpy.ops.chatpose.send()
    assert str(refused.value).splitlines()[-1] == "Error: " + (
        "Wait for the answer to 'how would a tired person stand?', then send this"
    )
    assert settings.prompt == "now make them sit"  # kept, to send once the answer is in
    backend.release()
    drive(idle)
    assert bpy.ops.chatpose.send() == {"FINISHED"}
    drive(idle)
    asked = [(t.role, t.text) for t in backend.items[-1].history]
    assert ("user", "how would a tired person stand?") in asked


def test_a_chat_turn_waits_for_a_pose_mode_answer_and_one_that_came_and_waits_says_why(
    armature, scripted_service
):
    # Pose mode's exchanges go into the history too: a chat turn goes with them.
    _, backend = _send_while_held(scripted_service, "a tired person standing")
    settings = bpy.context.scene.chatpose
    settings.chat_mode = True
    settings.prompt = "now make them sit"
    with pytest.raises(RuntimeError, match="Wait for the answer to 'a tired person standing', "):
        bpy.ops.chatpose.send()
    bpy.ops.object.mode_set(mode="EDIT")  # the answer comes, and waits to be applied
    backend.release()
    drive(lambda: "waiting: leave Edit" in live.last_message()[0])
    with pytest.raises(RuntimeError) as refused:
        bpy.ops.chatpose.send()
    assert str(refused.value).splitlines()[-1] == "Error: " + (
        "Answers that came wait, the one to 'a tired person standing' among them: leave Edit "
        "Mode to apply them. Send this once it is applied"
    )
    bpy.ops.object.mode_set(mode="OBJECT")
    drive(idle)
    assert bpy.ops.chatpose.send() == {"FINISHED"}


def test_chat_mode_sends_the_history_and_several_people_get_armatures(armature, scripted_service):
    address, backend = scripted_service
    use_service(address)
    scene = bpy.context.scene
    settings = scene.chatpose
    armature.location = (2.0, 1.0, 0.0)
    settings.chat_mode = True
    settings.insert_keyframe = True
    settings.key_current_frame = False
    settings.key_frame = 7
    settings.prompt = "two people dancing"
    assert bpy.ops.chatpose.send() == {"FINISHED"}
    assert settings.prompt == ""  # sent; the history shows it when the answer is back
    assert [job.prompt for job in live.pending_jobs()] == ["two people dancing"]
    drive(idle)

    second = bpy.data.objects["SMPL.person2"]
    assert_pose(armature, pose_for("two people dancing"))  # the first person on the target
    assert_pose(second, pose_for("two people dancing (second person)"))
    assert_pose(second, pose_for("two people dancing (second person)"), frame=7)
    np.testing.assert_allclose(second.location, (3.0, 1.0, armature.location.z), atol=1e-6)
    assert bpy.context.view_layer.objects.active == armature  # selection left as it was
    messages = props.history_messages(scene)
    assert [m.role for m in messages] == ["user", "assistant"] and messages[1].poses == 2
    assert backend.items[-1].history == ()
    message = live.last_message()[0]
    assert "Applied 2 pose(s) to SMPL, SMPL.person2 (new), keyed at frame 7" in message

    second.location.x = 10.0  # moved by the user: reused where it is
    settings.prompt = "again"
    objects = len(bpy.data.objects)
    bpy.ops.chatpose.send()
    drive(idle)
    assert len(bpy.data.objects) == objects
    assert second.location.x == 10.0 and "(new)" not in live.last_message()[0]
    assert_pose(second, pose_for("again (second person)"))
    assert backend.items[-1].history == (
        Turn("user", "two people dancing"),
        Turn("assistant", messages[1].text),
    )

    settings.chat_mode = False  # pose mode: no history sent
    settings.prompt = "pose mode"
    bpy.ops.chatpose.send()
    drive(idle)
    assert backend.items[-1].history == () and backend.items[-1].mode == "pose"


def test_a_chat_turn_says_which_exchanges_are_too_long_for_its_context(armature, scripted_service):
    address, backend = scripted_service
    use_service(address)
    scene = bpy.context.scene
    props.append_history(scene, chat.exchange("wave", "sure, it is <POSE>.", poses=1))
    props.append_history(scene, chat.exchange("x" * 5000, "y" * 1200, poses=1))  # a long brief
    scene.chatpose.chat_mode = True
    scene.chatpose.prompt = "now raise the other arm"
    bpy.ops.chatpose.send()
    message = live.last_message()[0]
    assert message.endswith(
        "(chat mode; 1 of the chat's latest exchanges too long for its context (6,000 "
        "characters) not sent)"
    ), message
    drive(idle)
    assert backend.items[-1].history == (
        Turn("user", "wave"),
        Turn("assistant", "sure, it is <POSE>."),
    )


def test_auto_keying_keys_an_answer_at_the_current_frame(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    scene = bpy.context.scene
    scene.tool_settings.use_keyframe_insert_auto = True  # the record button
    scene.frame_set(12)
    scene.chatpose.insert_keyframe = False
    scene.chatpose.prompt = "keyed by auto keying"
    bpy.ops.chatpose.send()
    scene.frame_set(30)  # scrubbed on while it comes: keyed where it was asked
    drive(idle)
    assert "keyed at frame 12" in live.last_message()[0]
    scene.frame_set(12)  # not put back by the animation on the next scrub
    assert_pose(armature, pose_for("keyed by auto keying"))


def test_keys_into_muted_f_curves_are_named(armature, scripted_service):
    # Blender keys a muted F-curve without a word: the answer was "keyed", and never played.
    address, _ = scripted_service
    use_service(address)
    key_poses(armature, [random_pose(1)], [1])
    for fcurve in action_fcurves(armature):
        fcurve.mute = '"left_knee"' in fcurve.data_path
    scene = bpy.context.scene
    scene.frame_set(5)
    scene.chatpose.insert_keyframe = True
    scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    message, level = live.last_message()
    assert "keyed at frame 5" in message and level == "WARNING"
    assert "F-curves of left_knee are muted: keys go into them" in message
    scene.chatpose.insert_keyframe = False  # Auto Keying, Replace: nothing at frame 7 to replace
    scene.tool_settings.use_keyframe_insert_auto = True
    scene.tool_settings.auto_keying_mode = "REPLACE_KEYS"
    try:
        scene.frame_set(7)
        scene.chatpose.prompt = "wave"
        bpy.ops.chatpose.send()
        drive(idle)
    finally:
        scene.tool_settings.use_keyframe_insert_auto = False
        scene.tool_settings.auto_keying_mode = "ADD_REPLACE_KEYS"
    message = live.last_message()[0]
    assert "not keyed at frame 7" in message and "muted" not in message  # no key went in
    batch_of("kneel\nsit down", start=10, step=5)
    assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
    assert "F-curves of left_knee are muted" in live.last_message()[0]  # said before it runs
    drive(idle)
    message, level = live.last_message()
    assert "all 2 lines keyed" in message and level == "WARNING"
    assert "F-curves of left_knee are muted" in message


def test_an_unkeyed_answer_on_an_animated_rig_says_the_next_frame_change_takes_it(
    armature, scripted_service
):
    address, _ = scripted_service
    use_service(address)
    scene = bpy.context.scene
    scene.chatpose.insert_keyframe = False
    scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    assert "not keyed" not in live.last_message()[0]  # nothing animates it: the pose stays
    armature.keyframe_insert("location", frame=1)  # the object's own move: not its pose
    scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    assert "not keyed" not in live.last_message()[0]
    key_poses(armature, [random_pose(1), random_pose(2)], [1, 20])
    scene.chatpose.prompt = "wave again"
    bpy.ops.chatpose.send()
    drive(idle)
    message, level = live.last_message()
    assert "not keyed: SMPL's animation puts its own pose back at the next frame change" in message
    assert level == "INFO"  # trying poses before keying one is the usual way
    # In the NLA, as a strip: the same; muted too (Blender puts what it animates at rest).
    anim = armature.animation_data
    strip = anim.nla_tracks.new().strips.new("take", 1, anim.action)
    anim.action = None
    for mute in (False, True):
        strip.mute = mute
        scene.chatpose.prompt = "wave"
        bpy.ops.chatpose.send()
        drive(idle)
        assert "animation puts its own pose back" in live.last_message()[0]
    anim.use_nla = False  # the NLA off: nothing animates the rig
    scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    assert "not keyed" not in live.last_message()[0]


def test_an_answer_leaves_the_character_where_its_animation_has_it(armature, scripted_service):
    # The model answers joint rotations alone: a walk keyed on the pelvis keeps its path.
    address, _ = scripted_service
    use_service(address)
    scene = bpy.context.scene
    walk = [Pose(np.zeros((24, 3)), [0.0, 0.0, 0.5 * k]) for k in range(3)]
    key_poses(armature, walk, [1, 11, 21])
    location = [c for c in action_fcurves(armature) if c.data_path.endswith(".location")]
    path = [[tuple(p.co) for p in c.keyframe_points] for c in location]
    scene.frame_set(11)
    root = armature.pose.bones["pelvis"]
    there = tuple(root.location)
    assert np.linalg.norm(there) > 0.4 and scene.chatpose.use_translation  # the default
    scene.tool_settings.use_keyframe_insert_auto = True
    scene.chatpose.insert_keyframe = False
    scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    assert "keyed at frame 11" in live.last_message()[0]
    assert tuple(root.location) == pytest.approx(there)
    assert [[tuple(p.co) for p in c.keyframe_points] for c in location] == path


def _above_floor(obj) -> float:
    """How far the body's lowest point (the mannequin's surface) is above its floor, where its
    soles are at rest, as the armature is posed now (metres)."""
    pose, rest = read_pose(obj), rest_joints(obj)
    posed = mannequin.lowest_point(pose.axis_angle, rest) + pose.translation[1]
    return posed - mannequin.lowest_point(np.zeros((24, 3)), rest)


def test_keep_on_floor_puts_a_kneeling_answer_on_the_floor_where_the_character_is(
    armature, scripted_service
):
    address, _ = scripted_service
    use_service(address)
    settings = bpy.context.scene.chatpose
    root = armature.pose.bones["pelvis"]
    root.location = (0.3, 0.0, -0.2)  # moved across the floor (the rig's root: SMPL axes)
    # The scripted answer turns every joint by the prompt's length in hundredths of a radian.
    prompt = ("kneel " * 10).strip()
    settings.prompt = prompt
    bpy.ops.chatpose.send()
    drive(idle)
    floating = _above_floor(armature)
    assert abs(floating) > 0.05  # the answer alone leaves the body off the floor
    assert tuple(root.location) == pytest.approx((0.3, 0.0, -0.2))

    settings.keep_on_floor, settings.insert_keyframe = True, True
    settings.prompt = prompt
    bpy.ops.chatpose.send()
    drive(idle)
    assert_pose(armature, pose_for(prompt))
    assert _above_floor(armature) == pytest.approx(0.0, abs=1e-5)
    assert (root.location.x, root.location.z) == pytest.approx((0.3, -0.2))  # same place
    assert root.location.y == pytest.approx(-floating, abs=1e-5)
    location = [c for c in action_fcurves(armature) if c.data_path.endswith(".location")]
    assert len(location) == 3  # keyed with the pose


def test_keep_on_floor_keeps_a_pose_s_own_translation_where_translation_is_on(armature):
    from blender_addon.blender.posing import placed_on_floor

    own = Pose(random_pose(3).axis_angle, [0.1, 0.2, 0.3])
    without = Pose(random_pose(4).axis_angle)
    kept, placed = placed_on_floor(armature, [own, without], keep_translations=True)
    assert kept is own
    assert placed.translation[1] != 0 and (placed.translation[[0, 2]] == 0).all()
    replaced, _ = placed_on_floor(armature, [own, without])
    assert (replaced.translation[[0, 2]] == 0).all()  # its place: the root's, at rest
    assert replaced.translation[1] != pytest.approx(0.2)


def test_a_batch_with_keep_on_floor_keys_each_line_on_the_floor_along_the_root_s_path(
    armature, scripted_service, monkeypatch
):
    address, _ = scripted_service
    use_service(address)
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)  # one group of two lines a call: the
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)  # later ones come after keys went in
    walk = [Pose(np.zeros((24, 3)), [2.0 * k, 0.0, 0.0]) for k in range(2)]
    key_poses(armature, walk, [1, 21])  # a path across the floor, keyed on the root's ends
    root = armature.pose.bones["pelvis"]
    frames = [1, 6, 11, 16, 21]
    path = []
    for frame in frames:
        bpy.context.scene.frame_set(frame)
        path.append(root.location.x)
    settings = bpy.context.scene.chatpose
    settings.batch_keep_on_floor = True
    batch_of("kneel\nsit down\nlie on the side\ncrouch\nbow", start=1, step=5)
    assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
    drive(idle)
    assert "all 5 lines keyed" in live.last_message()[0]
    for frame, x in zip(frames, path, strict=True):
        bpy.context.scene.frame_set(frame)
        assert _above_floor(armature) == pytest.approx(0.0, abs=1e-5)
        assert root.location.x == pytest.approx(x, abs=1e-5)
    record = batch_store.load_record(armature)
    assert all(e.on_floor and not e.translation for e in record.entries)  # keyed on the floor


def test_an_answer_names_the_bones_a_constraint_a_driver_or_their_parent_decide(
    armature, scripted_service
):
    address, _ = scripted_service
    use_service(address)
    target = bpy.data.objects.new("foot target", None)
    bpy.context.scene.collection.objects.link(target)
    bones = armature.pose.bones
    ik = bones["left_knee"].constraints.new("IK")  # a leg IK: the knee and the hip
    ik.target, ik.chain_count = target, 2
    bones["right_elbow"].constraints.new("COPY_ROTATION").mute = True  # muted: no matter
    bones["left_elbow"].constraints.new("COPY_ROTATION")  # no target: Blender ignores it
    tail = bones["right_ankle"].constraints.new("IK")  # without Use Tail: from its parent up
    tail.target, tail.chain_count, tail.use_tail = target, 1, False
    bones["neck"].driver_add("rotation_quaternion", 1)
    bones["spine1"].driver_add("rotation_quaternion", 2).mute = True
    armature.data.bones["head"].use_inherit_rotation = False
    bpy.context.scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    message, level = live.last_message()
    assert level == "WARNING" and message.startswith("Applied 1 pose(s) to SMPL")
    assert (
        "on 'SMPL', left_hip (the constraint 'IK' on left_knee), left_knee (the constraint "
        "'IK'), right_knee (the constraint 'IK' on right_ankle), neck (a driver on "
        "rotation_quaternion) and 1 more decide those bones, not the answer set on their "
        "channels"
    ) in message


@pytest.mark.parametrize("setting", ["Replace", "Only Insert Available"])
def test_an_auto_keyed_answer_keys_only_what_auto_keying_s_own_settings_let_it(
    armature, scripted_service, setting
):
    address, _ = scripted_service
    use_service(address)
    scene, edit_prefs = bpy.context.scene, bpy.context.preferences.edit
    scene.tool_settings.use_keyframe_insert_auto = True
    scene.chatpose.insert_keyframe = False
    if setting == "Replace":
        scene.tool_settings.auto_keying_mode = "REPLACE_KEYS"  # only the keys there already
    else:
        edit_prefs.use_keyframe_insert_available = True  # only the F-curves there already

    def answer_at(frame: int, prompt: str) -> str:
        scene.frame_set(frame)
        scene.chatpose.prompt = prompt
        bpy.ops.chatpose.send()
        drive(idle)
        assert_pose(armature, pose_for(prompt))  # posed, keyed or not
        return live.last_message()[0]

    try:
        assert "not keyed at frame 10: Auto Keying keys only" in answer_at(10, "no keys yet")
        assert keyed_frames(armature) == []
        apply_pose(armature, random_pose(1), frame=10)  # the animator's key
        assert "keyed at frame 10" in answer_at(10, "a key to replace")
        at_20 = answer_at(20, "no key at 20")
        if setting == "Replace":
            assert "not keyed at frame 20" in at_20 and keyed_frames(armature) == [10]
        else:  # the curves are there: keyed
            assert "keyed at frame 20" in at_20 and keyed_frames(armature) == [10, 20]
    finally:
        edit_prefs.use_keyframe_insert_available = False


@pytest.mark.parametrize("keying", ["Auto Keying", "Insert Keyframe"])
def test_a_locked_channel_leaves_an_auto_keyed_answer_unkeyed_and_refuses_an_asked_key(
    armature, scripted_service, monkeypatch, keying
):
    address, _ = scripted_service
    use_service(address)
    scene = bpy.context.scene
    apply_pose(armature, pose_for("rest"), frame=1)  # an animated rig, one curve locked
    knee = 'pose.bones["left_knee"].rotation_quaternion'
    curve = next(c for c in action_fcurves(armature) if c.data_path == knee)
    curve.lock = True
    scene.tool_settings.use_keyframe_insert_auto = keying == "Auto Keying"
    scene.chatpose.insert_keyframe = keying == "Insert Keyframe"
    steps = []
    monkeypatch.setattr(feedback, "push_undo", steps.append)
    scene.chatpose.prompt = "with a locked knee"
    if keying == "Insert Keyframe":  # refused before the service computes it (a review)
        with pytest.raises(RuntimeError, match="Not sent: the .* channel of left_knee is locked"):
            bpy.ops.chatpose.send()
        assert scene.chatpose.prompt == "with a locked knee" and not live.pending_jobs()
        curve.lock = False  # and locked while the answer is on its way:
        bpy.ops.chatpose.send()
        curve.lock = True
    else:
        bpy.ops.chatpose.send()
    drive(idle)
    message = live.last_message()[0]
    if keying == "Auto Keying":  # posed, as Blender's own Auto Keying poses a locked rig
        assert "Applied 1 pose(s) to SMPL; not keyed (Auto Keying): " in message
        assert_pose(armature, pose_for("with a locked knee"))
        assert steps == ["chat", "answer"]
    else:
        assert message.startswith("The answer was not applied to 'SMPL': ") and "locked" in message
        assert scene.chatpose.prompt == "with a locked knee"  # given back, to send again
        assert steps == ["chat"]  # one step: the exchange and the prompt given back


def test_a_chat_turn_is_sent_with_insert_keyframe_and_a_locked_curve(armature, scripted_service):
    # The diff review: the check before sending refused a question whose answer holds words
    # alone; a pose in the answer is still refused when it comes (the test above).
    address, _ = scripted_service
    use_service(address)
    scene = bpy.context.scene
    apply_pose(armature, pose_for("rest"), frame=1)
    knee = 'pose.bones["left_knee"].rotation_quaternion'
    next(c for c in action_fcurves(armature) if c.data_path == knee).lock = True
    scene.chatpose.chat_mode = scene.chatpose.insert_keyframe = True
    scene.chatpose.prompt = "ramble about a tired person"  # the scripted model: words alone
    bpy.ops.chatpose.send()
    drive(idle)
    assert live.last_message()[0].startswith("Reply without a pose")


def _two_dancers(scripted_service) -> bpy.types.Object:
    """The armature of the second person of a chat answer, keyed at frame 1 (chat mode's
    scripted answers hold two people: SMPL and SMPL.person2)."""
    address, _ = scripted_service
    use_service(address)
    settings = bpy.context.scene.chatpose
    settings.chat_mode, settings.insert_keyframe = True, True
    settings.prompt = "two dancers"
    bpy.ops.chatpose.send()
    drive(idle)
    return bpy.data.objects["SMPL.person2"]


def test_keep_on_floor_places_each_person_where_that_person_stands(armature, scripted_service):
    second = _two_dancers(scripted_service)
    settings = bpy.context.scene.chatpose
    walk = [Pose(np.zeros((24, 3)), [1.0, 0.0, 0.5 * k]) for k in range(2)]
    key_poses(second, walk, [1, 13])  # the second dancer's own path
    bpy.context.scene.frame_set(7)
    there = tuple(second.pose.bones["pelvis"].location)
    settings.keep_on_floor = True
    settings.prompt = ("kneel " * 10).strip()
    bpy.ops.chatpose.send()
    drive(idle)
    assert "keyed at frame 7" in live.last_message()[0]
    for obj in (armature, second):
        assert _above_floor(obj) == pytest.approx(0.0, abs=1e-5), obj.name
    root = second.pose.bones["pelvis"]
    assert (root.location.x, root.location.z) == pytest.approx((there[0], there[2]))


def test_keep_on_floor_leaves_a_locked_root_location_and_keys_the_rotations(
    armature, scripted_service
):
    address, _ = scripted_service
    use_service(address)
    settings = bpy.context.scene.chatpose
    apply_pose(armature, Pose(np.zeros((24, 3)), [0.0, 0.0, 0.0]), frame=1)  # root keyed
    for curve in action_fcurves(armature):
        curve.lock = curve.data_path.endswith(".location")
    settings.keep_on_floor, settings.insert_keyframe = True, True
    settings.prompt = "kneel down on one knee"
    bpy.ops.chatpose.send()
    drive(idle)
    message = live.last_message()[0]
    assert "keyed at frame 1; 'SMPL' not put on the floor (Keep on Floor): " in message
    assert "locked" in message
    assert_pose(armature, pose_for("kneel down on one knee"), frame=1)
    assert tuple(armature.pose.bones["pelvis"].location) == (0.0, 0.0, 0.0)

    settings.batch_keep_on_floor = True
    batch_of("kneel")
    with pytest.raises(RuntimeError, match="Keep on Floor keys it: turn that off"):
        bpy.ops.chatpose.batch_keyframe()
    knee = 'pose.bones["left_knee"].rotation_quaternion'
    next(c for c in action_fcurves(armature) if c.data_path == knee).lock = True
    with pytest.raises(RuntimeError, match="left_knee") as refused:  # turning it off: no help
        bpy.ops.chatpose.batch_keyframe()
    assert "Keep on Floor" not in str(refused.value)


def test_a_person_whose_root_location_is_locked_leaves_the_others_on_the_floor(
    armature, scripted_service
):
    second = _two_dancers(scripted_service)
    settings = bpy.context.scene.chatpose
    apply_pose(second, Pose(np.zeros((24, 3)), [0.0, 0.0, 0.0]), frame=1)  # root keyed
    for curve in action_fcurves(second):
        curve.lock = curve.data_path.endswith(".location")
    settings.keep_on_floor = True
    prompt = ("kneel " * 10).strip()
    settings.prompt = prompt
    bpy.ops.chatpose.send()
    drive(idle)
    message = live.last_message()[0]
    assert "'SMPL.person2' not put on the floor (Keep on Floor): " in message
    assert "'SMPL' not put" not in message
    assert _above_floor(armature) == pytest.approx(0.0, abs=1e-5)
    assert_pose(
        second, pose_for(f"{prompt} (second person)"), frame=1
    )  # keyed all the same, off the floor


def test_a_locked_channel_on_an_extra_person_is_named_as_its(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    scene = bpy.context.scene
    scene.chatpose.chat_mode = True  # two people: SMPL and SMPL.person2
    scene.chatpose.insert_keyframe = True
    scene.chatpose.prompt = "two dancers"
    bpy.ops.chatpose.send()
    drive(idle)
    second = bpy.data.objects["SMPL.person2"]
    knee = 'pose.bones["left_knee"].rotation_quaternion'
    next(c for c in action_fcurves(second) if c.data_path == knee).lock = True
    scene.chatpose.prompt = "two dancers again"
    bpy.ops.chatpose.send()
    drive(idle)
    assert live.last_message()[0].startswith("The answer was not applied to 'SMPL': SMPL.person2: ")


def test_undoing_an_applied_answer_takes_its_pose_and_keeps_its_exchange(
    armature, scripted_service
):
    address, _ = scripted_service
    use_service(address)
    bpy.ops.ed.undo_push(message="before")
    before = read_pose(armature)
    bpy.context.scene.chatpose.prompt = "a pose to undo"
    bpy.ops.chatpose.send()
    drive(idle)
    assert_pose(armature, pose_for("a pose to undo"))
    bpy.ops.ed.undo()  # the animator does not want the pose
    obj = bpy.data.objects["SMPL"]  # undo rebuilt the data: look it up again
    np.testing.assert_allclose(read_pose(obj).axis_angle, before.axis_angle, atol=1e-6)
    history = props.history_messages(bpy.context.scene)
    assert [m.text for m in history][:1] == ["a pose to undo"]  # what was asked, kept
    bpy.ops.ed.undo()  # and the exchange, on a second Ctrl+Z
    assert not props.history_messages(bpy.context.scene)


def test_an_answer_follows_its_armature_through_a_rename(armature, scripted_service):
    address, backend = scripted_service
    use_service(address)
    other = create_smpl_armature(bpy.context, with_mesh=False)
    backend.hold()
    bpy.context.scene.chatpose.prompt = "renamed while asked"
    bpy.ops.chatpose.send()
    armature.name, other.name = "Hero", "SMPL"  # the old name now means another character
    bpy.context.scene.name = "Shot 2"
    before = read_pose(other)
    backend.release()
    drive(idle)
    assert_pose(bpy.data.objects["Hero"], pose_for("renamed while asked"))
    np.testing.assert_allclose(read_pose(other).axis_angle, before.axis_angle)
    assert "Applied 1 pose(s) to Hero" in live.last_message()[0]
    assert [m.text for m in props.history_messages(bpy.context.scene)][0] == "renamed while asked"


def delete_in_viewport(obj) -> None:
    """What X > Delete does: the object leaves every scene, and stays in bpy.data while the
    scene's Target still refers to it."""
    bpy.ops.object.select_all(action="DESELECT")
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    bpy.ops.object.delete()


def test_a_deleted_target_is_named_and_nothing_is_sent(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    delete_in_viewport(armature)
    assert bpy.data.objects.get("SMPL") is not None  # kept alive by the Target
    assert "The Target 'SMPL' was deleted" in props.target_problem(bpy.context)
    assert not bpy.ops.chatpose.send.poll() and not bpy.ops.chatpose.batch_keyframe.poll()


def test_deleted_means_in_no_scene_whether_shown_hidden_or_in_another_scene(armature):
    from blender_addon.blender.armature import is_deleted

    assert not is_deleted(armature)  # shown: answered without a walk of every object
    armature.hide_set(True)
    assert not is_deleted(armature)  # hidden: in the scene all the same
    armature.hide_set(False)
    other = bpy.data.scenes.new("Other")
    other.collection.objects.link(armature)
    bpy.context.scene.collection.objects.unlink(armature)
    assert not is_deleted(armature)  # in a scene the window does not show
    other.collection.objects.unlink(armature)
    assert is_deleted(armature)
    bpy.context.scene.collection.objects.link(armature)
    bpy.data.scenes.remove(other)
    delete_in_viewport(armature)
    assert is_deleted(armature)


def test_a_target_shown_only_through_a_collection_instance_is_not_called_deleted(armature):
    # The names review: "The Target 'SMPL' was deleted" for a character instanced in the shot.
    character, rig = bpy.data.collections.new("Character"), bpy.data.collections.new("Rig")
    character.children.link(rig)  # as characters are: the rig in a child collection
    rig.objects.link(armature)
    bpy.context.scene.collection.objects.unlink(armature)
    instance = bpy.data.objects.new("Character instance", None)
    instance.instance_type, instance.instance_collection = "COLLECTION", character
    bpy.context.scene.collection.objects.link(instance)
    problem = props.target_problem(bpy.context)
    assert problem.startswith(
        "The Target 'SMPL' is in no scene, only shown through the collection instance "
        "'Character instance': link it into a scene"
    )


def test_an_answer_for_an_armature_deleted_meanwhile_is_not_applied(armature, scripted_service):
    address, backend = scripted_service
    use_service(address)
    backend.hold()
    bpy.context.scene.chatpose.prompt = "for a rig about to go"
    bpy.ops.chatpose.send()
    delete_in_viewport(armature)
    objects = set(bpy.data.objects)
    backend.release()
    drive(idle)
    assert "The armature 'SMPL' is gone; the answer was not applied" in live.last_message()[0]
    assert set(bpy.data.objects) == objects  # nothing posed, nothing made beside it
    assert bpy.context.scene.chatpose.prompt == "for a rig about to go"  # to send again
    # A failed exchange: chat mode's next turns do not tell the model it was answered.
    history = props.history_messages(bpy.context.scene)
    assert [(m.role, m.text) for m in history] == [
        ("user", "for a rig about to go"),
        ("error", "the armature 'SMPL' is gone; the answer was not applied"),
    ]


def test_a_reply_stays_in_the_history_through_the_user_s_next_undo(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    bpy.ops.ed.undo_push(message="before")
    bpy.context.scene.chatpose.prompt = "explode"  # the model fails: a reply with no pose
    bpy.ops.chatpose.send()
    drive(idle)
    bpy.data.objects["SMPL"].location.x = 1.0  # the user's next change, and its undo step
    bpy.ops.ed.undo_push(message="move")
    bpy.ops.ed.undo()
    assert bpy.data.objects["SMPL"].location.x == 0.0
    history = props.history_messages(bpy.context.scene)
    assert [m.text for m in history][0] == "explode" and len(history) == 2


@pytest.mark.parametrize(
    ("mode", "locked", "tools", "reason"),
    [
        ("POSE", False, [], None),
        ("OBJECT", False, ["SCREENCAST_OT_keys"], None),  # an add-on's all-session tool
        ("EDIT_MESH", False, [], "leave Edit Mode to apply them"),
        ("PAINT_WEIGHT", False, [], "leave Weight Paint Mode to apply them"),  # as its menu
        ("WEIGHT_GREASE_PENCIL", False, [], "leave Weight Paint Mode to apply them"),
        ("PARTICLE", False, [], "leave Particle Edit Mode to apply them"),
        ("POSE", False, ["TRANSFORM_OT_rotate"], "they are applied when the transform ends"),
        # Sliders that put their starting keys back at every move would erase a batch's keys.
        ("POSE", False, ["GRAPH_OT_smooth"], "they are applied when the Graph Editor tool ends"),
        ("POSE", False, ["ACTION_OT_ease"], "they are applied when the Dope Sheet tool ends"),
        ("POSE", False, ["POSE_OT_push"], "they are applied when the pose slider ends"),
        (
            "POSE",
            False,
            ["POSELIB_OT_blend_pose_asset"],
            "they are applied when the pose asset blend ends",
        ),
        ("OBJECT", True, [], "they are applied when the render ends (the interface is locked)"),
    ],
)
def test_what_holds_answers_back(blender, mode, locked, tools, reason):
    assert runtime.why_answers_wait(mode, locked, tools) == reason


def test_answers_wait_while_the_user_can_redo(armature, scripted_service):
    address, backend = scripted_service
    use_service(address)
    bpy.ops.ed.undo_push(message="before")
    backend.hold()
    bpy.context.scene.chatpose.prompt = "while comparing"
    bpy.ops.chatpose.send()
    bpy.data.objects["SMPL"].location.x = 1.0
    bpy.ops.ed.undo_push(message="the user's move")
    bpy.ops.ed.undo()  # Ctrl+Z to compare with the state before the move
    backend.release()
    drive(lambda: "waiting: you have undone steps" in live.last_message()[0])
    bpy.ops.ed.redo()  # the move is still there to redo: the answer did not drop it
    assert bpy.data.objects["SMPL"].location.x == 1.0
    drive(idle)
    assert_pose(bpy.data.objects["SMPL"], pose_for("while comparing"))

    # Sending after an undo is an action of the user's: it drops the undone steps, as any
    # operator does, and its answer is applied.
    bpy.data.objects["SMPL"].location.x = 2.0
    bpy.ops.ed.undo_push(message="another move")
    bpy.ops.ed.undo()
    bpy.context.scene.chatpose.prompt = "after an undo"
    bpy.ops.chatpose.send("EXEC_DEFAULT", True)  # with an undo push, as the button is pressed
    drive(idle)
    assert_pose(bpy.data.objects["SMPL"], pose_for("after an undo"))


def test_answers_wait_while_the_user_edits_a_mesh(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    bpy.context.scene.chatpose.chat_mode = True  # two people: one armature is created
    bpy.ops.mesh.primitive_cube_add()
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.context.scene.chatpose.prompt = "two people"
    bpy.ops.chatpose.send()
    drive(lambda: "waiting: leave Edit Mode" in live.last_message()[0])
    assert bpy.context.mode == "EDIT_MESH"  # the user's edit session goes on
    assert "SMPL.person2" not in bpy.data.objects
    bpy.ops.object.mode_set(mode="OBJECT")
    bpy.ops.ed.undo_push(message="edited the cube")
    drive(idle)
    assert_pose(armature, pose_for("two people"))
    assert "SMPL.person2" in bpy.data.objects
    bpy.ops.ed.undo()  # the answer was its own undo step
    np.testing.assert_allclose(read_pose(bpy.data.objects["SMPL"]).axis_angle, 0.0, atol=1e-6)


def test_a_target_that_cannot_be_posed_is_named(armature, scripted_service, tmp_path):
    address, _ = scripted_service
    use_service(address)
    rig = bpy.data.objects.new("MyRig", bpy.data.armatures.new("MyRig"))
    bpy.context.scene.collection.objects.link(rig)
    bpy.context.scene.chatpose.target = rig
    bpy.context.scene.chatpose.prompt = "wave"
    assert not bpy.ops.chatpose.send.poll()
    with pytest.raises(UserError, match="The Target 'MyRig' is not an SMPL armature"):
        sending.send_pose(bpy.context, "wave")
    # An armature linked from another file: what is put on it would be lost on saving.
    library = tmp_path / "library.blend"
    bpy.context.scene.chatpose.target = armature
    bpy.ops.wm.save_as_mainfile(filepath=str(library))
    bpy.ops.wm.read_homefile(use_empty=True)
    with bpy.data.libraries.load(str(library), link=True) as (source, linked):
        linked.objects = ["SMPL"]
    obj = linked.objects[0]
    bpy.context.scene.collection.objects.link(obj)
    bpy.context.scene.chatpose.target = obj
    with pytest.raises(UserError, match="'SMPL' is linked from .*library.blend.*library override"):
        sending.send_pose(bpy.context, "wave")


def _send_while_held(scripted_service, prompt: str = "held"):
    """Sends `prompt` to the scripted service, held: the answer waits for `release()`."""
    address, backend = scripted_service
    use_service(address)
    backend.hold()
    bpy.context.scene.chatpose.prompt = prompt
    bpy.ops.chatpose.send()
    return address, backend


def test_the_user_s_own_cancel_is_no_error_and_gives_the_prompt_back(armature, scripted_service):
    _, backend = _send_while_held(scripted_service, "never mind")
    bpy.ops.chatpose.cancel()
    # The service answers a cancel at once; released before it has read it, the model's
    # answer could win the race and be applied.
    drive(lambda: live.last_message()[0].startswith("Cancelled"))
    backend.release()
    drive(idle)
    assert live.last_message() == ("Cancelled: 'never mind'", "INFO")
    assert bpy.context.scene.chatpose.prompt == "never mind"  # to send again


def test_a_long_prompt_is_shown_cut_in_the_messages_and_given_back_whole(
    armature, scripted_service
):
    # A pasted brief of 8,000 characters filled the panel's message box (215 lines) and the
    # Info report, from Send until the next message, and again when cancelled.
    brief = "raise the arm slowly, " * 360
    _send_while_held(scripted_service, brief)
    said = live.last_message()[0]
    assert said.startswith("Asked the service for 'raise the arm slowly, ") and len(said) < 120
    bpy.ops.chatpose.cancel()
    drive(lambda: live.last_message()[0].startswith("Cancelled"))
    said = live.last_message()[0]
    assert said.endswith("\u2026'") and len(said) < 80
    scripted_service[1].release()
    drive(idle)
    assert bpy.context.scene.chatpose.prompt == brief.strip()


def test_one_waiting_request_is_cancelled_from_its_row_and_the_other_goes_on(
    armature, scripted_service
):
    _, backend = _send_while_held(scripted_service, "never mind")
    bpy.context.scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    [(first_id, first), (second_id, second)] = live.pending_requests()
    assert (first.prompt, second.prompt) == ("never mind", "wave")
    assert _cancel_buttons() == [  # a button a row, and Cancel All
        ("chatpose.cancel_request", "", {"request_id": first_id}),
        ("chatpose.cancel_request", "", {"request_id": second_id}),
        ("chatpose.cancel", "Cancel All", {}),
    ]

    assert bpy.ops.chatpose.cancel_request(request_id=first_id) == {"FINISHED"}
    assert live.last_message()[0] == "Cancelling 'never mind'..."
    drive(lambda: live.last_message()[0].startswith("Cancelled"))
    assert [job.prompt for job in live.pending_jobs()] == ["wave"]  # still asked
    backend.release()
    drive(idle)
    history = props.history_messages(bpy.context.scene)
    assert [(m.role, m.text) for m in history] == [
        ("user", "never mind"),
        ("error", "cancelled by the client"),
        ("user", "wave"),
        ("assistant", "Sure, it is <POSE>. (wave)"),
    ]
    assert_pose(armature, pose_for("wave"))
    assert bpy.context.scene.chatpose.prompt == "never mind"  # to send again
    message = live.last_message()
    assert bpy.ops.chatpose.cancel_request(request_id=second_id) == {"FINISHED"}  # answered
    assert live.last_message() == message  # nothing cancelled, nothing said in the panel

    backend.hold()
    bpy.context.scene.chatpose.prompt = "sit"
    bpy.ops.chatpose.send()
    assert _cancel_buttons()[-1] == ("chatpose.cancel", "Cancel", {})  # one request: its own
    batch_of("bow", start=30)
    bpy.ops.chatpose.batch_keyframe()
    assert _cancel_buttons()[-1] == ("chatpose.cancel", "Cancel All", {})  # the batch too
    backend.release()
    drive(idle)


def _cancel_buttons() -> list:
    """The chat panel's cancel buttons: (operator, text, the properties set on it)."""
    buttons: list = []
    draw_panels([panel.VIEW3D_PT_chatpose_chat], bpy.context, buttons)
    return [(op, text, vars(props)) for op, text, props in buttons if "cancel" in op]


def test_check_service_says_a_model_still_loading_as_a_warning_not_an_error(blender):
    # The service is there and will serve: an ERROR (red) said it had failed.
    loading = "the model is still loading (3 s so far); ask again once it has loaded"
    job = StatusJob(False, "tcp://127.0.0.1:5555")
    answers.apply_outcome(StatusFailed(job, ErrorCode.BUSY, loading))
    assert live.last_message() == (f"Service: {loading}", "WARNING")
    answers.apply_outcome(StatusFailed(job, ErrorCode.MODEL_ERROR, "it failed"))
    assert live.last_message() == ("Service: it failed", "ERROR")


def test_check_service_while_the_old_address_is_busy_is_a_message(armature, scripted_service):
    address, backend = _send_while_held(scripted_service)
    use_service(f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(RuntimeError, match="Not asked: requests to the service as set before"):
        bpy.ops.chatpose.service_status()
    backend.release()
    use_service(address)
    drive(idle)


# --- pictures -------------------------------------------------------------------------------


def _add_camera():
    data = bpy.data.cameras.new("Camera")
    camera = bpy.data.objects.new("Camera", data)
    bpy.context.scene.collection.objects.link(camera)
    camera.location = (0.0, -6.0, 1.0)
    camera.rotation_euler = (np.pi / 2, 0.0, 0.0)
    bpy.context.scene.camera = camera
    return camera


def test_background_mode_takes_a_camera_snapshot(blender, tmp_path):
    assert bpy.app.background
    create_smpl_armature(bpy.context, with_mesh=True)  # the mannequin is what renders
    scene = bpy.context.scene
    with pytest.raises(CaptureError, match="no camera"):
        capture_viewport(bpy.context)
    _add_camera()
    scene.render.engine = "CYCLES"
    scene.render.resolution_x, scene.render.resolution_y = 1920, 1080
    scene.render.image_settings.file_format = "JPEG"
    scene.render.filepath = "//render_"
    data, label = capture_viewport(bpy.context)
    assert png_size(data) == (336, 189) and label == "camera snapshot"
    # The scene's own settings are back.
    assert scene.render.engine == "CYCLES" and scene.render.resolution_x == 1920
    assert scene.render.image_settings.file_format == "JPEG"
    assert scene.render.filepath == "//render_"
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.std() > 5.0  # the mannequin is in the picture, not a blank frame
    assert png_size(render_camera_snapshot(scene, max_side=64)) == (64, 36)
    # Turned away, it sees only the world's colour: no picture to guess a pose from.
    scene.camera.rotation_euler = (-np.pi / 2, 0.0, 0.0)
    with pytest.raises(CaptureError, match="camera sees nothing but the background"):
        render_camera_snapshot(scene, max_side=64)
    assert scene.render.engine == "CYCLES" and scene.render.filepath == "//render_"
    assert not [image for image in bpy.data.images if image.filepath.endswith("snapshot.png")]


def test_a_camera_snapshot_keeps_an_exr_output_s_colour_space(blender):
    # Setting the format back to OPEN_EXR reset its colour space: the user's later renders
    # were written in Linear Rec.709 instead of ACEScg, unsaid.
    create_smpl_armature(bpy.context, with_mesh=True)
    _add_camera()
    settings = bpy.context.scene.render.image_settings
    settings.file_format = "OPEN_EXR"
    settings.color_management = "OVERRIDE"
    settings.linear_colorspace_settings.name = "ACEScg"
    render_camera_snapshot(bpy.context.scene, max_side=64)
    assert settings.file_format == "OPEN_EXR" and settings.color_management == "OVERRIDE"
    assert settings.linear_colorspace_settings.name == "ACEScg"


def test_a_camera_snapshot_leaves_out_burnt_in_text_and_a_transparent_film(blender):
    create_smpl_armature(bpy.context, with_mesh=True)
    camera = _add_camera()
    world = bpy.context.scene.world = bpy.data.worlds.new("World")
    world.color = (0.5, 0.5, 0.5)
    render = bpy.context.scene.render
    render.use_stamp = render.film_transparent = True  # a review render's settings
    render.resolution_x, render.resolution_y = 1920, 1080
    import io

    from PIL import Image

    with Image.open(io.BytesIO(render_camera_snapshot(bpy.context.scene))) as image:
        corner = np.asarray(image.convert("RGB"))[0, 0]
    assert corner.min() > 20  # the world's colour, not the black of a transparent film
    camera.rotation_euler = (-np.pi / 2, 0.0, 0.0)  # nothing in view but the stamp's text
    with pytest.raises(CaptureError, match="camera sees nothing but the background"):
        render_camera_snapshot(bpy.context.scene, max_side=128)
    assert render.use_stamp and render.film_transparent  # put back


def test_a_camera_snapshot_with_the_character_outside_the_middle_is_refused(blender):
    # The model sees the middle square of a picture: a figure at the side of a wide frame
    # was sent, and the model saw only background.
    create_smpl_armature(bpy.context, location=(-3.1, 0.0, 0.0), with_mesh=True)
    camera = _add_camera()
    camera.location = (0.0, -12.0, 1.0)
    render = bpy.context.scene.render
    render.resolution_x, render.resolution_y = 2390, 1000
    with pytest.raises(CaptureError, match="the character is outside the middle of the camera"):
        render_camera_snapshot(bpy.context.scene)
    render.resolution_x = 1000  # a square frame: all of it is seen
    assert render_camera_snapshot(bpy.context.scene)[:4] == b"\x89PNG"


def test_a_camera_snapshot_takes_the_frame_s_shape_not_the_user_s_render_size(blender):
    create_smpl_armature(bpy.context, with_mesh=True)
    _add_camera()
    render = bpy.context.scene.render
    render.resolution_x, render.resolution_y, render.resolution_percentage = 1920, 1080, 1
    render.use_border, render.use_multiview = True, True
    render.border_max_x = 0.2  # a fifth of the frame
    data = render_camera_snapshot(bpy.context.scene)
    assert png_size(data) == (336, 189)  # the whole frame, at the snapshot's size
    assert render.resolution_percentage == 1 and render.use_border and render.use_multiview
    render.resolution_x, render.resolution_y = 10000, 400
    with pytest.raises(CaptureError, match="10000 x 400 pixels, its long side more than 20 times"):
        render_camera_snapshot(bpy.context.scene)


def test_a_camera_snapshot_of_non_square_pixels_shows_the_frame_as_the_camera_does(blender):
    # An anamorphic scene's pixel aspect was kept: the picture, read with square pixels by
    # the service, showed the body stretched twice as tall, its head and feet cut off.
    import io

    from PIL import Image

    create_smpl_armature(bpy.context, with_mesh=True)
    _add_camera()
    render = bpy.context.scene.render

    def snapshot():
        with Image.open(io.BytesIO(render_camera_snapshot(bpy.context.scene))) as image:
            return np.asarray(image.convert("L"), dtype=float)

    render.resolution_x, render.resolution_y = 1920, 1080
    square = snapshot()
    render.resolution_x, render.pixel_aspect_x = 960, 2.0  # the same frame, pixels twice as wide
    anamorphic = snapshot()
    assert anamorphic.shape == square.shape == (189, 336)
    assert np.abs(anamorphic - square).mean() < 2.0  # the same picture
    assert render.resolution_x == 960 and render.pixel_aspect_x == 2.0  # put back
    render.pixel_aspect_x, render.pixel_aspect_y = 1.0, 25.0  # shown 960 x 27,000
    with pytest.raises(CaptureError, match="960 x 27000 pixels, its long side more than 20 times"):
        render_camera_snapshot(bpy.context.scene)


def test_no_camera_snapshot_while_the_user_s_render_runs(blender, monkeypatch):
    from blender_addon.blender import capture

    _add_camera()
    monkeypatch.setattr(capture, "render_running", lambda: True)  # F12 in another window
    with pytest.raises(CaptureError, match="a render is running"):
        render_camera_snapshot(bpy.context.scene)


def test_a_camera_snapshot_writes_none_of_the_user_s_output_files(blender, tmp_path):
    create_smpl_armature(bpy.context, with_mesh=True)
    _add_camera()
    scene = bpy.context.scene
    # a compositor that writes every frame it sees to final_frames/
    if hasattr(scene, "compositing_node_group"):  # Blender 5.0+
        tree = bpy.data.node_groups.new("Compositor", "CompositorNodeTree")
        scene.compositing_node_group = tree
        layers = tree.nodes.new("CompositorNodeRLayers")
        output = tree.nodes.new("CompositorNodeOutputFile")
        output.directory = str(tmp_path / "final_frames")
        output.file_output_items.new("RGBA", "Image")
        tree.links.new(layers.outputs["Image"], output.inputs["Image"])
    else:  # 4.2-4.5
        scene.use_nodes = True
        tree = scene.node_tree
        output = tree.nodes.new("CompositorNodeOutputFile")
        output.base_path = str(tmp_path / "final_frames")
        tree.links.new(tree.nodes["Render Layers"].outputs["Image"], output.inputs[0])
    render_camera_snapshot(scene, max_side=64)
    assert not (tmp_path / "final_frames").exists()
    assert scene.render.use_compositing and scene.render.use_sequencer  # put back


@pytest.mark.parametrize("file_format", ["FFMPEG", "OPEN_EXR_MULTILAYER"])
def test_a_camera_snapshot_of_a_scene_that_renders_a_video_or_layers(blender, file_format):
    create_smpl_armature(bpy.context, with_mesh=True)
    _add_camera()
    settings = bpy.context.scene.render.image_settings
    if hasattr(settings, "media_type"):  # Blender 5.0+: the format's media type first
        settings.media_type = "VIDEO" if file_format == "FFMPEG" else "MULTI_LAYER_IMAGE"
    settings.file_format = file_format
    before = {
        n: getattr(settings, n)
        for n in ("media_type", "file_format", "color_depth")
        if hasattr(settings, n)
    }
    assert render_camera_snapshot(bpy.context.scene, max_side=64)[:4] == b"\x89PNG"
    assert {n: getattr(settings, n) for n in before} == before  # put back


class FakeGPU:
    """Stands in for Blender's `gpu` module, which background Blender refuses ("GPU functions
    for drawing are not available in background mode"): an offscreen whose framebuffer holds
    known pixels, bottom row first as OpenGL reads them, and a record of the calls."""

    def __init__(self, fail: bool = False, figure: bool = True):
        import types

        self.calls: list = []
        self.fail = fail
        self.figure = figure
        gpu = self

        class Buffer(bytearray):
            dimensions = None

        class Framebuffer:
            def read_color(self, x, y, width, height, channels, slot, fmt):
                gpu.calls.append(("read_color", x, y, width, height, channels, slot, fmt))
                rows = np.arange(height, dtype=np.uint8)[:, None, None]  # row index as colour
                pixels = np.broadcast_to(rows, (height, width, channels)).copy()
                if gpu.figure:  # else only the background's gradient
                    pixels[:, width // 2, 1] = 255
                pixels[..., 3] = 7  # not opaque: the capture must make it so
                return Buffer(pixels.tobytes())

        class Offscreen:
            def __init__(self, width, height):
                if gpu.fail:
                    raise RuntimeError("GPUOffScreen: failed to create a framebuffer")
                gpu.calls.append(("offscreen", width, height))

            def draw_view3d(self, scene, view_layer, space, region, view, window, **options):
                overlays = space.overlay.show_overlays
                gpu.calls.append(("draw_view3d", view, window, options, overlays))

            def bind(self):
                import contextlib

                return contextlib.nullcontext()

            def free(self):
                gpu.calls.append(("free",))

        self.module = types.SimpleNamespace(
            types=types.SimpleNamespace(GPUOffScreen=Offscreen),
            state=types.SimpleNamespace(active_framebuffer_get=Framebuffer),
        )


def test_the_viewport_is_drawn_offscreen_and_read_back_upright(blender, monkeypatch):
    import io
    import types

    from PIL import Image

    from blender_addon.blender.capture import draw_viewport

    fake = FakeGPU()
    monkeypatch.setitem(sys.modules, "gpu", fake.module)
    region = types.SimpleNamespace(width=1000, height=600)
    space = types.SimpleNamespace(
        region_3d=types.SimpleNamespace(view_matrix="V", window_matrix="W"),
        overlay=types.SimpleNamespace(show_overlays=True),
    )
    data = draw_viewport(bpy.context, region, space, max_side=100)
    assert fake.calls == [
        ("offscreen", 100, 60),
        ("draw_view3d", "V", "W", {"do_color_management": True}, False),  # no overlays drawn
        ("read_color", 0, 0, 100, 60, 4, 0, "UBYTE"),
        ("free",),
    ]
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (100, 60)
        pixels = np.asarray(image.convert("RGBA"))
    # The framebuffer's bottom row (0) is the picture's last row; the alpha is opaque.
    np.testing.assert_array_equal(pixels[:, 0, 0], np.arange(60)[::-1])
    assert (pixels[..., 3] == 255).all()
    assert space.overlay.show_overlays  # the user's setting, back

    empty = FakeGPU(figure=False)  # the viewport's gradient and nothing in front of it
    monkeypatch.setitem(sys.modules, "gpu", empty.module)
    with pytest.raises(CaptureError, match="the 3D viewport shows nothing but its background"):
        draw_viewport(bpy.context, region, space, max_side=100)
    with pytest.raises(CaptureError, match="an armature's bones alone do not show"):
        draw_viewport(bpy.context, region, space, max_side=100)
    assert space.overlay.show_overlays and empty.calls[-1] == ("free",)

    failing = FakeGPU(fail=True)
    monkeypatch.setitem(sys.modules, "gpu", failing.module)
    with pytest.raises(CaptureError, match="could not draw the viewport offscreen"):
        draw_viewport(bpy.context, region, space)
    # A viewport shrunk to a strip: refused before drawing, not by the service after sending.
    unused = FakeGPU()
    monkeypatch.setitem(sys.modules, "gpu", unused.module)
    thin = types.SimpleNamespace(width=1920, height=90)
    with pytest.raises(
        CaptureError, match="the 3D viewport is 1920 x 90 pixels, its long side more than 20"
    ):
        draw_viewport(bpy.context, thin, space)
    assert unused.calls == []  # nothing drawn


def test_pose_from_viewport_and_from_image_send_the_picture(blender, scripted_service, tmp_path):
    address, backend = scripted_service
    use_service(address)
    bpy.context.scene.chatpose.target = create_smpl_armature(bpy.context, with_mesh=True)
    _add_camera()
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 64, 64
    scene.chatpose.prompt = "like this"
    assert bpy.ops.chatpose.pose_from_viewport() == {"FINISHED"}
    drive(idle)
    [item] = backend.items
    # The frame's shape at the snapshot's size, whatever the scene renders at.
    assert len(item.images) == 1 and png_size(item.images[0]) == (336, 336)
    assert props.history_messages(scene)[0].attachment == "camera snapshot"

    bad = tmp_path / "photo.png"
    bad.write_bytes(b"GIF89a not a png")
    with pytest.raises(
        RuntimeError, match="photo.png is a GIF picture: save it as PNG or JPEG first"
    ):
        bpy.ops.chatpose.pose_from_image(filepath=str(bad))
    assert "photo.png is a GIF picture" in live.last_message()[0]
    assert len(backend.items) == 1  # nothing was sent

    good = tmp_path / "ref.png"
    good.write_bytes(encode_png(np.full((20, 30, 3), 128)))
    assert bpy.ops.chatpose.pose_from_image(filepath=str(good)) == {"FINISHED"}
    drive(idle)
    assert backend.items[-1].images == (good.read_bytes(),)
    assert props.history_messages(scene)[-2].attachment == "image: ref.png"
    # One the service cannot read is named by its file, not as the request's images[0].
    damaged = tmp_path / "half synced.png"
    damaged.write_bytes(good.read_bytes() + b"corrupt")  # the scripted model refuses it
    assert bpy.ops.chatpose.pose_from_image(filepath=str(damaged)) == {"FINISHED"}
    drive(idle)
    assert live.last_message() == (
        "Not answered: image: half synced.png: not a PNG or JPEG image",
        "ERROR",
    )


def test_a_chat_turn_without_an_image_sends_the_chat_s_image_again_kept_in_the_file(
    armature, scripted_service, tmp_path
):
    address, backend = scripted_service
    use_service(address)
    settings = bpy.context.scene.chatpose
    photo = tmp_path / "ref.png"
    photo.write_bytes(encode_png(np.full((20, 30, 3), 128)))
    settings.prompt = "like this"  # pose mode: its image is not kept
    assert bpy.ops.chatpose.pose_from_image(filepath=str(photo)) == {"FINISHED"}
    drive(idle)
    settings.chat_mode, settings.prompt = True, "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    assert backend.items[-1].images == ()
    settings.prompt = "copy her pose"
    assert bpy.ops.chatpose.pose_from_image(filepath=str(photo)) == {"FINISHED"}
    drive(idle)
    assert [m.image_kept for m in props.history_messages(bpy.context.scene)] == [False] * 4 + [
        True,
        False,
    ]
    path = str(tmp_path / "chat.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path)
    bpy.ops.wm.read_homefile(use_empty=True)  # a new file; the add-on stays enabled
    bpy.ops.wm.open_mainfile(filepath=path)

    settings = bpy.context.scene.chatpose
    preferences.get_preferences().history_pairs = 1  # the context: the last exchange alone
    for prompt in ("now raise her left arm", "and lower it"):  # the photo goes on with them
        settings.prompt = prompt
        assert bpy.ops.chatpose.send() == {"FINISHED"}
        assert "(chat mode, with image: ref.png of the chat)" in live.last_message()[0]
        drive(idle)
        item = backend.items[-1]
        assert item.prompt == prompt and item.images == (photo.read_bytes(),)
    assert [turn.text for turn in item.history][0] == "now raise her left arm"
    follow_up = props.history_messages(bpy.context.scene)[-2]
    assert follow_up.attachment == "image: ref.png" and follow_up.image_kept
    assert len({m.image for m in settings.history if m.image is not None}) == 1  # packed once

    other = tmp_path / "boxer.png"
    other.write_bytes(encode_png(np.full((20, 30, 3), 60)))
    settings.chat_mode, settings.prompt = False, "like him"  # the newest image, not kept
    assert bpy.ops.chatpose.pose_from_image(filepath=str(other)) == {"FINISHED"}
    drive(idle)
    settings.chat_mode, settings.prompt = True, "now sit"
    assert bpy.ops.chatpose.send() == {"FINISHED"}
    assert "the chat's image: boxer.png is not kept (sent in pose mode" in (live.last_message()[0])
    drive(idle)
    assert backend.items[-1].images == ()  # not the older photo, which the chat is no longer on
    assert bpy.ops.chatpose.clear_history() == {"FINISHED"}
    assert not [image for image in bpy.data.images if image.name.startswith("ChatPose")]


def test_a_refused_image_sent_again_says_it_is_the_chat_s_and_how_to_go_on(armature, tmp_path):
    import threading

    from inference_service.server import Server

    backend = ScriptedBackend()
    text_only = dataclasses.replace(backend.info, supports_images=False, max_images=0)
    server = Server(backend, text_only, "tcp://127.0.0.1:*", max_batch=4, max_wait_ms=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        use_service(server.address)
        scene = bpy.context.scene
        photo = encode_png(np.full((20, 30, 3), 128))  # kept by an earlier service's chat
        kept = props.pack_chat_image(photo, "image: ref.png")
        props.append_history(
            scene, chat.exchange("copy her", "Sure, <POSE>.", attachment="image: ref.png"), kept
        )
        scene.chatpose.chat_mode, scene.chatpose.prompt = True, "now raise her left arm"
        bpy.ops.chatpose.send()
        drive(idle)
        message = live.last_message()[0]
        assert message.startswith("Not answered, 'now raise her left arm': images: ")
        assert message.endswith(
            "(image: ref.png is the chat's image, sent again with this turn; the turns after "
            "it go without it)"
        )
        assert scene.chatpose.prompt == "now raise her left arm"  # given back: sent again
        bpy.ops.chatpose.send()
        assert (  # not "not kept (refused, sent in pose mode, or ...)": the one cause
            "the service refused the chat's image: ref.png (its failed exchange says why), so "
            "this turn goes without it" in live.last_message()[0]
        )
        drive(idle)
        answered = props.history_messages(scene)[-2:]
        assert [m.role for m in answered] == ["user", "assistant"]  # answered, no image sent
        assert not answered[0].attachment and not answered[0].image_kept
    finally:
        backend.release()
        server.stop()
        thread.join(5)


def test_a_chat_turn_s_own_image_goes_again_with_its_prompt_given_back_not_an_older_one(
    armature, scripted_service, tmp_path
):
    address, backend = scripted_service
    use_service(address)
    settings = bpy.context.scene.chatpose
    woman, boxer = tmp_path / "woman.png", tmp_path / "boxer.png"
    woman.write_bytes(encode_png(np.full((20, 30, 3), 128)))
    boxer.write_bytes(encode_png(np.full((20, 30, 3), 40)))
    settings.chat_mode, settings.prompt = True, "copy her pose"
    bpy.ops.chatpose.pose_from_image(filepath=str(woman))
    drive(idle)
    backend.hold()
    settings.prompt = "now copy the boxer"
    bpy.ops.chatpose.pose_from_image(filepath=str(boxer))
    bpy.ops.chatpose.cancel()
    drive(lambda: live.last_message()[0].startswith("Cancelled"))
    backend.release()
    drive(idle)
    assert settings.prompt == "now copy the boxer"  # given back, to send again
    assert bpy.ops.chatpose.send() == {"FINISHED"}
    assert "with image: boxer.png of the chat" in live.last_message()[0]  # not the woman's
    drive(idle)
    assert (backend.items[-1].prompt, backend.items[-1].images) == (
        "now copy the boxer",
        (boxer.read_bytes(),),
    )

    def chat_images():
        return sorted(image.name for image in bpy.data.images if image.name.startswith("ChatPose"))

    assert chat_images() == ["ChatPose image: boxer.png", "ChatPose image: woman.png"]  # once each
    backend.hold()  # a turn still waiting when the file is saved (and Blender quits)
    settings.prompt = "and now the woman"
    bpy.ops.chatpose.pose_from_image(filepath=str(woman))
    path = str(tmp_path / "waiting.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path)
    assert settings.prompt == "" and chat_images() == [  # taken back: the answer still comes
        "ChatPose image: boxer.png",
        "ChatPose image: woman.png",
    ]
    backend.release()
    drive(idle)
    assert len(chat_images()) == 2  # the woman's photo answered again: packed once still
    bpy.ops.wm.open_mainfile(filepath=path)
    settings = bpy.context.scene.chatpose
    assert settings.prompt == "and now the woman"  # kept in the file, with its image
    assert bpy.ops.chatpose.send() == {"FINISHED"}
    drive(idle)
    assert backend.items[-1].images == (woman.read_bytes(),)


# --- failures -------------------------------------------------------------------------------


def test_the_report_operator_goes_through_blenders_reports(blender):
    # Background Blender raises an operator's ERROR report as an exception: proof it reported.
    with pytest.raises(RuntimeError, match="the service went away"):
        bpy.ops.chatpose.report(level="ERROR", message="the service went away")
    assert bpy.ops.chatpose.report(level="INFO", message="applied") == {"FINISHED"}
    feedback.notify("the service went away", "ERROR")  # the exception stays inside notify
    assert live.last_message() == ("the service went away", "ERROR")


def test_a_service_that_is_down_is_a_clear_error_without_a_hang(armature, reports):
    use_service(f"tcp://127.0.0.1:{free_port()}", timeout_s=60)
    bpy.context.scene.chatpose.prompt = "wave"
    assert bpy.ops.chatpose.send() == {"FINISHED"}
    # The operator only queues the request; the failure comes through the timer.
    assert live.pending_jobs() and bpy.context.scene.chatpose.prompt == ""
    drive(idle, timeout_s=10)  # the 2 s connect timeout, not the 60 s request timeout
    message, level = live.last_message()
    assert level == "ERROR" and "is the service running? Start Local Service" in message
    assert reports[-1] == ("ERROR", message)  # in Blender's reports too, not only the panel
    assert props.history_messages(bpy.context.scene)[-1].role == "error"
    assert bpy.context.scene.chatpose.prompt == "wave"  # back, to send again
    bpy.ops.chatpose.send()
    bpy.context.scene.chatpose.prompt = "typed while it failed"
    drive(idle, timeout_s=10)
    assert bpy.context.scene.chatpose.prompt == "typed while it failed"  # never replaced


def test_requests_that_cannot_be_sent_are_reported_at_once(blender, monkeypatch):
    bpy.context.scene.chatpose.prompt = "wave"
    assert not bpy.ops.chatpose.send.poll()  # no armature
    create_smpl_armature(bpy.context, with_mesh=False)
    bpy.context.scene.chatpose.prompt = "   "
    with pytest.raises(RuntimeError, match="Type a prompt first"):
        bpy.ops.chatpose.send()
    use_service("tcp://10.9.8.7:5555")
    monkeypatch.setattr(preferences, "online_access", lambda: False)
    bpy.context.scene.chatpose.prompt = "wave"
    with pytest.raises(RuntimeError, match="online access is off"):
        bpy.ops.chatpose.send()
    pictures = []
    monkeypatch.setattr(chat_operators, "capture_viewport", lambda context: pictures.append(1))
    with pytest.raises(RuntimeError, match="online access is off"):
        bpy.ops.chatpose.pose_from_viewport()
    assert pictures == []  # refused before a picture was taken (a render, in the background)
    use_service("ipc:///tmp/" + "a" * 120)  # well formed, but too long for a socket path
    with pytest.raises(RuntimeError, match="Not sent: ZeroMQ cannot connect to"):
        bpy.ops.chatpose.send()
    assert live.pending_jobs() == []
    # What the protocol refuses, said without its code ("Not sent: too_large: prompt: ...").
    use_service(f"tcp://127.0.0.1:{free_port()}")
    bpy.context.scene.chatpose.prompt = "x" * 8001
    with pytest.raises(RuntimeError, match="Error: Not sent: prompt: has 8001 characters"):
        bpy.ops.chatpose.send()


@pytest.fixture
def curve_service(tmp_path):
    """A scripted service that lets in only the CURVE client 'animator'; yields (address, the
    key folder)."""
    from tests.service.scripted_backend import curve_service

    with curve_service(tmp_path) as address:
        yield address, tmp_path


def test_a_service_with_curve_keys_is_reached_with_the_keys_set_in_the_preferences(
    armature, curve_service
):
    from blender_addon.preferences import get_preferences

    address, keys = curve_service

    def send(prompt):
        bpy.context.scene.chatpose.prompt = prompt  # sending empties it
        bpy.ops.chatpose.send()

    use_service(address)
    prefs = get_preferences()
    prefs.curve_client_key = str(keys / "animator.key_secret")
    prefs.curve_server_key = str(keys / "server.key")
    send("wave")
    drive(idle)
    assert_pose(armature, pose_for("wave"))
    # Keys the service does not know: named in the failure, not only "no service".
    prefs.curve_server_key = str(keys / "authorized_clients" / "animator.key")
    send("wave")
    drive(idle)
    message = live.last_message()[0]
    # The likeliest cause first, the others after it, and what to check, each said apart.
    assert message == (
        f"Not answered, 'wave': {address} refused the connection: most likely, the server key "
        "given is not this service's. Other causes: the service has no CURVE keys; what "
        "listens there is not chatpose-serve. Check the Service Address, Client Key and "
        "Server Key in the add-on's preferences"
    )
    # A file that is no key, or one key alone: named when sending, nothing sent.
    prefs.curve_server_key = str(keys / "authorized_clients")
    with pytest.raises(RuntimeError, match="the server key .*authorized_clients cannot be read"):
        send("wave")
    prefs.curve_server_key = ""
    with pytest.raises(RuntimeError, match="set both the Client Key and the Server Key"):
        send("wave")
    assert live.pending_jobs() == []
    prefs.curve_client_key = ""  # no keys at all, for a service with keys: where to set them
    send("wave")
    drive(idle)
    # Which side sees the mismatch first is a race: ZeroMQ then says so, or only that the
    # service closed the connection (shared_protocol.client.HANDSHAKE_REFUSALS).
    assert re.search(
        "refused the connection: (one side has CURVE keys and the other has none|most likely, "
        "the service has CURVE keys and this client has none. Other cause: what listens there "
        r"is not chatpose-serve)\. Check the Service Address, Client Key and Server Key in the "
        "add-on's preferences$",
        live.last_message()[0],
    )
    prefs.curve_client_key = str(keys / "animator.key_secret")
    prefs.curve_server_key = str(keys / "server.key")
    with pytest.raises(RuntimeError, match="A local service has no CURVE keys"):
        bpy.ops.chatpose.service_start()


def test_a_service_off_this_machine_needs_keys(armature, monkeypatch):
    use_service("tcp://10.9.8.7:5555")
    monkeypatch.setattr(preferences, "online_access", lambda: True)
    bpy.context.scene.chatpose.prompt = "wave"
    with pytest.raises(RuntimeError, match="not on this machine: a service there needs CURVE"):
        bpy.ops.chatpose.send()
    labels = [n for k, n in draw_panels([panel.VIEW3D_PT_chatpose_service], bpy.context)
              if k == "label"]  # fmt: skip
    assert "needs CURVE keys" in " ".join(labels)  # wrapped over lines


def test_loading_a_file_drops_the_answers_in_flight(armature, scripted_service):
    _, backend = _send_while_held(scripted_service)
    assert live.pending_jobs()
    bpy.ops.wm.read_homefile(use_empty=True)  # load_post runs
    backend.release()
    assert live.pending_jobs() == []
    # The prompt, typed in the old file, is named: it could not go back into its field.
    assert "1 request(s) in flight were cancelled (asked: 'held')" in live.last_message()[0]
    drive(idle)
    assert "SMPL" not in bpy.data.objects


def test_loading_a_file_clears_what_the_panel_said_about_the_old_one(armature, scripted_service):
    # A batch reported "all lines keyed", then File > Revert threw its keys away.
    address, _ = scripted_service
    use_service(address)
    bpy.context.scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    assert live.last_message()[0]
    bpy.ops.wm.read_homefile(use_empty=True)
    assert live.last_message()[0] == ""


def test_loading_a_file_before_anything_was_sent_clears_the_panel_s_message(armature):
    bpy.ops.chatpose.clear_history()
    assert live.last_message()[0] == "Chat history cleared"
    bpy.ops.wm.read_homefile(use_empty=True)
    assert live.last_message()[0] == ""


def test_a_file_that_fails_to_load_leaves_the_open_one_s_requests_going(
    armature, scripted_service, tmp_path
):
    # Blender calls load_pre before it knows the file can be read: the answer, the prompt
    # (no longer in its field) and a batch were dropped, and "A file was loaded" said.
    _, backend = _send_while_held(scripted_service, "kneel on one knee")
    damaged = tmp_path / "damaged.blend"
    damaged.write_bytes(b"BLENDER-v405" + b"\0" * 64)
    with pytest.raises(RuntimeError):
        bpy.ops.wm.open_mainfile(filepath=str(damaged))
    assert "SMPL" in bpy.data.objects and live.pending_jobs()
    assert "A file was loaded" not in live.last_message()[0]
    backend.release()
    drive(idle)
    assert_pose(armature, pose_for("kneel on one knee"))


def test_a_file_saved_with_an_answer_to_come_keeps_its_prompt(armature, scripted_service, tmp_path):
    # Saved, then Blender quits before the answer: the file still holds what was asked.
    _, backend = _send_while_held(scripted_service, "kneel on one knee")
    scene = bpy.context.scene
    props.append_history(scene, chat.exchange("wave", "ok", poses=1))
    scene.chatpose.prompt = ""
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "saved.blend"))
    # In this session nothing changed: the field is as it was, the answer still comes.
    assert scene.chatpose.prompt == ""
    assert [m.text for m in props.history_messages(scene)] == ["wave", "ok"]
    backend.release()
    drive(idle)
    assert_pose(armature, pose_for("kneel on one knee"))
    name = armature.name
    assert [m.role for m in props.history_messages(scene)] == ["user", "assistant"] * 2

    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "saved.blend"))
    saved = bpy.context.scene
    assert saved.chatpose.prompt == "kneel on one knee"  # to send again
    messages = props.history_messages(saved)
    assert [(m.role, m.text) for m in messages[2:]] == [
        ("user", "kneel on one knee"),
        (chat.ERROR, file_handlers.UNANSWERED_AT_SAVE),
    ]
    np.testing.assert_allclose(read_pose(bpy.data.objects[name]).axis_angle, 0, atol=1e-6)


def test_an_image_request_saved_before_its_answer_keeps_its_image_in_the_file_alone(
    armature, scripted_service, tmp_path
):
    address, backend = scripted_service
    use_service(address)
    backend.hold()
    bpy.context.scene.chatpose.chat_mode = True  # a chat turn's image is kept for the next
    reference = tmp_path / "ref.png"
    reference.write_bytes(encode_png(np.full((20, 30, 3), 128)))
    images = set(bpy.data.images)
    bpy.ops.chatpose.pose_from_image(filepath=str(reference))
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "saved.blend"))
    # Packed for the file, then let go: the answer keeps the image it is given.
    assert set(bpy.data.images) == images
    backend.release()
    drive(idle)
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "saved.blend"))
    user, said = props.history_messages(bpy.context.scene)
    assert (user.attachment, said.text) == ("image: ref.png", file_handlers.UNANSWERED_AT_SAVE)
    [kept] = [m.image for m in bpy.context.scene.chatpose.history if m.image is not None]
    assert tuple(kept.size) == (30, 20)


def test_a_failed_save_and_the_startup_file_leave_the_scene_as_it_was(
    armature, scripted_service, tmp_path
):
    _, backend = _send_while_held(scripted_service, "kneel on one knee")
    scene = bpy.context.scene
    with pytest.raises(RuntimeError):  # a folder is no file: save_pre, then save_post_fail
        bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path))
    assert (scene.chatpose.prompt, len(scene.chatpose.history)) == ("", 0)
    # File > Defaults > Save Startup File saves with no path: every new file would start
    # with the prompt, so nothing is written (Blender's own save is not run here: it would
    # replace this machine's startup file).
    file_handlers._on_save_pre("")
    assert (scene.chatpose.prompt, len(scene.chatpose.history)) == ("", 0)
    file_handlers._on_save_post("")
    # And saving still works after both.
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "saved.blend"), copy=True)
    assert (scene.chatpose.prompt, len(scene.chatpose.history)) == ("", 0)
    backend.release()
    drive(idle)
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "saved.blend"))
    assert bpy.context.scene.chatpose.prompt == "kneel on one knee"


def test_saves_within_a_save_keep_every_prompt_and_the_scene_as_it_was(
    armature, scripted_service, tmp_path
):
    _, backend = _send_while_held(scripted_service, "kneel on one knee")
    scene = bpy.context.scene
    scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    scene.chatpose.prompt = "typed since"  # not overwritten, here or in the file
    backup = tmp_path / "backup.blend"

    backups = []

    def back_up(*_args):  # another add-on's backup: a save within the save
        if not backups:
            backups.append(backup)
            bpy.ops.wm.save_as_mainfile(filepath=str(backup), copy=True)

    bpy.app.handlers.save_pre.append(back_up)
    try:
        bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "saved.blend"))
    finally:
        bpy.app.handlers.save_pre.remove(back_up)
    assert backup.exists()
    assert scene.chatpose.prompt == "typed since"
    assert len(scene.chatpose.history) == 0
    backend.release()
    drive(idle)
    assert [m.role for m in props.history_messages(scene)] == ["user", "assistant"] * 2

    for path in (tmp_path / "saved.blend", backup):
        bpy.ops.wm.open_mainfile(filepath=str(path))
        saved = bpy.context.scene
        assert saved.chatpose.prompt == "typed since"
        assert [(m.role, m.text) for m in props.history_messages(saved)] == [
            ("user", "kneel on one knee"),
            (chat.ERROR, file_handlers.UNANSWERED_AT_SAVE),
            ("user", "wave"),
            (chat.ERROR, file_handlers.UNANSWERED_AT_SAVE),
        ]


def test_loading_a_file_names_the_answers_that_waited(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    bpy.ops.mesh.primitive_cube_add()
    bpy.ops.object.mode_set(mode="EDIT")  # the answer waits for Object mode
    bpy.context.scene.chatpose.prompt = "waits"
    bpy.ops.chatpose.send()
    drive(lambda: "waiting: leave Edit Mode" in live.last_message()[0])
    bpy.ops.object.mode_set(mode="OBJECT")
    bpy.ops.wm.read_homefile(use_empty=True)  # before the timer applied it
    assert "1 answer(s) not yet applied were dropped (asked: 'waits')" in live.last_message()[0]
    drive(idle)
    assert "SMPL" not in bpy.data.objects


def test_a_status_reply_is_applied_at_once_in_edit_mode(armature, scripted_service):
    # It changes no scene data (it waited with the answers, "waiting: leave Edit Mode").
    address, _ = scripted_service
    use_service(address)
    bpy.ops.mesh.primitive_cube_add()
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.ops.chatpose.service_status()
    drive(idle)
    assert live.last_message()[0].startswith("Service: scripted on cpu")
    bpy.ops.object.mode_set(mode="OBJECT")


def test_an_import_into_the_take_a_batch_keys_is_refused(armature, scripted_service, tmp_path):
    # Its keys replaced the batch's, which the record still counted, and the batch's next
    # lines went over the import's: "all 12 lines keyed" on a take of both.
    address, _ = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(12)))
    assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
    path = tmp_path / "take.npz"
    Motion.from_poses([random_pose(i) for i in range(3)], fps=30.0).save_npz(path)
    with pytest.raises(RuntimeError, match="a batch is keying SMPL's take; cancel it, or import"):
        bpy.ops.chatpose.import_npz(filepath=str(path), new_take=False)
    drive(idle)
    assert "all 12 lines keyed" in live.last_message()[0]
    assert bpy.ops.chatpose.import_npz(filepath=str(path), new_take=False) == {"FINISHED"}


def test_loading_a_file_names_a_batch_whose_lines_waited_and_forgets_it(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(4)))
    bpy.ops.chatpose.batch_keyframe()
    bpy.ops.mesh.primitive_cube_add()
    bpy.ops.object.mode_set(mode="EDIT")  # the lines wait for Object mode
    drive(lambda: "waiting: leave Edit Mode" in live.last_message()[0])
    drive(lambda: live.current_batch().ended)  # the service has answered every line
    bpy.ops.object.mode_set(mode="OBJECT")
    bpy.ops.wm.read_homefile(use_empty=True)  # before the timer keyed them
    message = live.last_message()[0]
    assert "4 answer(s) not yet applied were dropped" in message
    assert "the batch from text 'moves' on SMPL stopped: Batch Keyframe in this file" in message
    assert live.current_batch() is None  # the new file's panel shows no batch of the old
    drive(idle)
    assert "SMPL" not in bpy.data.objects


# --- the panel and the local service --------------------------------------------------------


def test_batch_progress_is_written_through_each_window(blender, monkeypatch):
    # Blender writes status text to the context window's workspace, whichever workspace it
    # is called on: from the timer (no window) it went to one window's at best.
    written = []

    def recording(workspace, text):
        written.append((workspace.name, bpy.context.window, text))

    monkeypatch.setattr(bpy.types.WorkSpace, "status_text_set", recording)
    with bpy.context.temp_override(window=None):  # as in a timer
        feedback.set_status_text("Batch 3/40")
    windows = list(bpy.context.window_manager.windows)
    assert windows and written == [(w.workspace.name, w, "Batch 3/40") for w in windows]


def test_the_panel_draws_every_state(armature, scripted_service, monkeypatch):
    address, backend = scripted_service
    status_bar = []
    original = feedback.set_status_text

    def recording(text):
        status_bar.append(text)
        original(text)

    monkeypatch.setattr(feedback, "set_status_text", recording)
    use_service(address)
    scene = bpy.context.scene
    props.append_history(scene, chat.exchange("wave " * 40, "ok", poses=1))
    text = bpy.data.texts.new("moves")
    text.write("\n".join(f"move {i}" for i in range(20)))
    scene.chatpose.batch_text = text
    scene.chatpose.insert_keyframe = True
    calls = draw_panels(panel.CLASSES, bpy.context)
    drawn = [n for k, n in calls if k == "operator"]
    for idname in (
        "chatpose.send",
        "chatpose.pose_from_viewport",
        "chatpose.pose_from_image",
        "chatpose.clear_history",
        "chatpose.batch_keyframe",
        "chatpose.service_status",
        "chatpose.service_start",
    ):
        assert idname in drawn
    assert any(k == "label" and n and n.startswith("You: wave") for k, n in calls)

    backend.hold()
    scene.chatpose.prompt = "waiting one"
    bpy.ops.chatpose.send()
    bpy.ops.chatpose.batch_keyframe()
    calls = draw_panels(panel.CLASSES, bpy.context)
    assert ("label", "Waiting: waiting one") in calls
    assert ("progress", 0.0) in calls and "chatpose.cancel" in [n for k, n in calls]
    assert not bpy.ops.chatpose.batch_keyframe.poll()  # one batch at a time
    assert status_bar[-1] == "ChatPose batch: 0/20 lines keyed on SMPL"
    shown = len(status_bar)
    for _ in range(3):
        runtime.timer_tick()
    assert len(status_bar) == shown  # unchanged: not set (and redrawn) on every timer call
    backend.release()
    drive(idle)
    assert status_bar[-1] is None  # cleared at the end
    calls = draw_panels(panel.CLASSES, bpy.context)
    assert not any(k == "progress" for k, _ in calls)
    assert any(k == "label" and n and "all 20 lines keyed" in n for k, n in calls)


def test_another_scene_s_batch_panel_names_the_scene_of_the_run_and_not_its_summary(
    armature, scripted_service
):
    # The stress review: the second scene's panel showed the first scene's run as its own.
    address, backend = scripted_service
    use_service(address)
    window = bpy.context.window_manager.windows[0]
    home = window.scene
    batch_of("walk\nrun")
    backend.hold()
    bpy.ops.chatpose.batch_keyframe()
    window.scene = bpy.data.scenes.new("Other")
    try:
        calls = draw_panels([panel.VIEW3D_PT_chatpose_batch], bpy.context)
        assert (
            "progress text",
            "ChatPose batch: 0/2 lines keyed on SMPL in scene 'Scene'",
        ) in calls
        assert ("operator", "chatpose.cancel") in calls  # it can be stopped from here too
        backend.release()
        drive(idle)
        calls = draw_panels([panel.VIEW3D_PT_chatpose_batch], bpy.context)
        assert not any(kind == "label" and "keyed" in text for kind, text in calls), calls
    finally:
        window.scene = home
    calls = draw_panels([panel.VIEW3D_PT_chatpose_batch], bpy.context)
    assert any(kind == "label" and "all 2 lines keyed" in text for kind, text in calls), calls


def _start_local_service(monkeypatch, tmp_path, address: str, code: str) -> None:
    """Start Local Service on ``address`` with ``python -c code`` standing in for
    chatpose-serve."""
    use_service(address)
    prefs = preferences.get_preferences()
    prefs.service_python, prefs.service_checkpoint = sys.executable, str(tmp_path)
    monkeypatch.setattr(
        local_service, "serve_command", lambda python, *a, **kw: [python, "-c", code]
    )
    live.state.process = ServiceProcess(str(tmp_path / "logs"))
    assert bpy.ops.chatpose.service_start() == {"FINISHED"}


def test_another_service_answering_where_ours_failed_to_listen_is_not_called_ours(
    armature, scripted_service, monkeypatch, tmp_path, reports
):
    # One started in a terminal, on an address the add-on's check missed (an ipc:// path,
    # until it was checked; Windows' port sharing): its answer to the ready probe said "Local
    # service ready", and ours exited. The answer names the service by its start's token.
    address, _ = scripted_service
    failing = (  # still starting when the other one answers the ready probe
        "import sys, time; time.sleep(1.5); "
        "print('cannot listen: the address is already in use'); sys.exit(2)"
    )
    monkeypatch.setattr(local_service, "address_in_use", lambda address: False)
    _start_local_service(monkeypatch, tmp_path, address, failing)
    drive(lambda: not live.waiting_for_service(), timeout_s=30)
    assert not any("service ready" in message for _, message in reports), reports
    log = live.service_process().log_path
    assert live.last_message() == (
        "Local service exited with code 2: cannot listen: the address is already in use; "
        f"its log: {log}",
        "ERROR",
    )


def test_a_local_service_run_by_a_launcher_is_ready_when_it_answers(
    armature, monkeypatch, tmp_path
):
    # A Windows venv's python.exe runs the real interpreter as its child: the service's
    # process is not the one started, and it is still ours.
    address = f"tcp://127.0.0.1:{free_port()}"
    launcher = (  # which ends its child with itself, as Windows' does (a job object)
        "import signal, subprocess, sys; "
        f"child = subprocess.Popen([sys.executable, {str(SCRIPTED_SERVER)!r}, {address!r}]); "
        "signal.signal(signal.SIGTERM, lambda *_: (child.kill(), child.wait(), sys.exit(0))); "
        "sys.exit(child.wait())"
    )
    try:
        _start_local_service(monkeypatch, tmp_path, address, launcher)
        drive(lambda: not live.waiting_for_service(), timeout_s=30)
        assert live.last_message()[0].startswith("Local service ready: scripted on cpu")
    finally:
        live.service_process().stop(wait=True)


@pytest.fixture
def local_scripted(armature, monkeypatch, tmp_path):
    """The Start button with the scripted server standing in for chatpose-serve (the real one
    is started by the tiny_service fixture with the same process manager), up and answering;
    yields (address, the commands Start ran)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    use_service(address)
    prefs = preferences.get_preferences()
    prefs.service_python = sys.executable
    prefs.service_checkpoint = str(tmp_path)
    commands = []

    def scripted_command(python, checkpoint, bind, device="auto", quantization="none"):
        commands.append((python, checkpoint, bind, device, quantization))
        return [python, str(SCRIPTED_SERVER), bind]

    monkeypatch.setattr(local_service, "serve_command", scripted_command)
    live.state.process = ServiceProcess(str(tmp_path / "logs"))
    assert bpy.ops.chatpose.service_start() == {"FINISHED"}
    assert local_service.local_service_state().alive and live.waiting_for_service()
    port = address.rsplit(":", 1)[1]  # one log per port: two Blenders' services keep theirs
    assert live.service_process().log_path == str(tmp_path / "logs" / f"chatpose-serve-{port}.log")
    drive(lambda: not live.waiting_for_service(), timeout_s=30)
    assert live.last_message()[0].startswith("Local service ready: scripted on cpu")
    yield address, commands
    live.service_process().stop(wait=True)


def test_requests_that_fail_together_make_one_popup(armature, monkeypatch):
    shown = []
    monkeypatch.setattr(feedback, "show_popup", lambda text, level: shown.append((text, level)))
    use_service(f"tcp://127.0.0.1:{free_port()}")  # nothing listens there
    for prompt in ("wave", "bow", "sit"):
        bpy.context.scene.chatpose.prompt = prompt
        bpy.ops.chatpose.send()
    drive(idle)
    [(text, level)] = shown  # the three failed in one tick
    assert level == "ERROR" and text.startswith("Not answered, 'wave': no service at")
    # The failures are in the chat history, undone as such (its Undo History name).
    assert bpy.context.window_manager.operators[-1].bl_idname == "CHATPOSE_OT_chat_step"
    assert text.endswith("(and 2 more: see the history and the Info editor)")


def test_a_refused_prompt_is_named_in_the_user_s_words(armature, scripted_service):
    # "Request failed (unsupported_input): prompt: ..." named the protocol's error code and
    # field, not the prompt the user typed.
    use_service(scripted_service[0])
    bpy.context.scene.chatpose.prompt = "zzxq"
    bpy.ops.chatpose.send()
    drive(idle)
    assert live.last_message() == (
        "Not answered, 'zzxq': this model knows none of its words",
        "ERROR",
    )
    batch_of("wave\nzzxq")
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    message = live.last_message()[0]
    assert message.startswith("Batch from text 'moves': 1 line keyed on SMPL; 1 of 2 still to key.")
    assert "1 failed (line 2 at frame " in message and "): this model knows none of its" in message


def _ticks_for(seconds: float) -> None:
    """Runs the timer as Blender would for ``seconds``."""
    deadline = time.monotonic() + seconds
    drive(lambda: time.monotonic() >= deadline)


def test_a_check_while_the_local_service_loads_says_it_is_still_starting(
    armature, monkeypatch, tmp_path
):
    address = f"tcp://127.0.0.1:{free_port()}"
    loading = "import time; time.sleep(60)"  # a model that takes its time
    _start_local_service(monkeypatch, tmp_path, address, loading)
    try:
        assert bpy.ops.chatpose.service_status() == {"FINISHED"}
        drive(lambda: live.last_message()[0].startswith("Service: "))
        # Not "no service at ...; Start Local Service ..." as well, which contradicts it; and
        # a warning, as a model still loading is: it is no failure.
        assert live.last_message() == (
            "Service: the local service is still starting (loading its model); try again once "
            "it is ready",
            "WARNING",
        )
    finally:
        live.service_process().stop(wait=True)


def test_a_send_and_a_batch_while_the_local_service_loads_wait_until_it_is_stopped(
    armature, monkeypatch, tmp_path
):
    # They failed 3 s later, "the local service is still starting; try again once it is ready".
    address = f"tcp://127.0.0.1:{free_port()}"
    _start_local_service(monkeypatch, tmp_path, address, "import time; time.sleep(60)")
    try:
        scene = bpy.context.scene
        scene.chatpose.prompt = "wave"
        assert bpy.ops.chatpose.send() == {"FINISHED"}
        assert live.last_message()[0] == (
            "The local service is loading its model: 'wave' (pose mode) is sent once it is ready"
        )
        batch_of("walk\nrun")
        assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
        assert live.last_message()[0].endswith("; sent once the local service has loaded its model")
        _ticks_for(4)  # past the 3 s in which a service must be found
        assert [job.prompt for job in live.pending_jobs()] == ["wave"]
        assert live.batch_running() and live.current_batch().keyed == 0
        calls = draw_panels(panel.CLASSES, bpy.context)
        assert ("label", "Waiting: wave") in calls
        progress = "ChatPose batch: 0/2 lines keyed on SMPL (waiting for the local service"
        assert any(kind == "progress text" and text.startswith(progress) for kind, text in calls)

        bpy.ops.chatpose.service_stop()
        drive(idle)
        [*_, asked, answer] = props.history_messages(scene)
        assert (asked.text, answer.text) == (
            "wave",
            "cancelled: the local service was stopped before it was ready",
        )
        assert scene.chatpose.prompt == "wave"  # to send again
        assert live.current_batch().summary().startswith("Batch from text 'moves' cancelled")
    finally:
        live.service_process().stop(wait=True)


def test_a_send_and_a_batch_while_the_local_service_loads_go_once_it_is_ready(
    armature, monkeypatch, tmp_path
):
    address = f"tcp://127.0.0.1:{free_port()}"
    slow_start = (  # listens 4 s after it starts: past the 3 s in which a service must be found
        f"import runpy, sys, time; time.sleep(4); sys.argv = ['serve', {address!r}]; "
        f"runpy.run_path({str(SCRIPTED_SERVER)!r}, run_name='__main__')"
    )
    _start_local_service(monkeypatch, tmp_path, address, slow_start)
    try:
        bpy.context.scene.chatpose.prompt = "wave"
        bpy.ops.chatpose.send()
        batch_of("walk\nrun")
        bpy.ops.chatpose.batch_keyframe()
        drive(lambda: not live.waiting_for_service() and idle(), timeout_s=30)
        assert live.current_batch().summary() == (
            "Batch from text 'moves' done: 2 lines keyed on SMPL; all 2 lines keyed"
        )
        [*_, asked, answer] = props.history_messages(bpy.context.scene)
        assert (asked.role, asked.text, answer.role) == (chat.USER, "wave", chat.ASSISTANT)
        assert answer.poses  # answered, not failed
    finally:
        live.service_process().stop(wait=True)


def test_a_batch_waiting_for_the_local_service_goes_once_it_is_ready_even_in_edit_mode(
    armature, monkeypatch, tmp_path
):
    # The hold's review: the service's ready answer waited to be applied with the others,
    # so nothing was sent until the user left Edit Mode (and "ready" was said once a second).
    address = f"tcp://127.0.0.1:{free_port()}"
    slow_start = (
        f"import runpy, sys, time; time.sleep(2); sys.argv = ['serve', {address!r}]; "
        f"runpy.run_path({str(SCRIPTED_SERVER)!r}, run_name='__main__')"
    )
    _start_local_service(monkeypatch, tmp_path, address, slow_start)
    try:
        batch_of("walk\nrun")
        bpy.ops.chatpose.batch_keyframe()
        bpy.ops.object.mode_set(mode="EDIT")
        # Sent once ready, answered, and the answers wait to be keyed.
        drive(lambda: len(live.state.backlog) >= 2, timeout_s=30)
        assert live.last_message()[0].startswith("2 answer(s) waiting: leave Edit Mode")
        bpy.ops.object.mode_set(mode="OBJECT")
        drive(idle)
        assert live.current_batch().summary().endswith("all 2 lines keyed")
    finally:
        live.service_process().stop(wait=True)


def test_a_send_waiting_for_a_local_service_that_exits_fails_saying_how_it_ended(
    armature, monkeypatch, tmp_path
):
    address = f"tcp://127.0.0.1:{free_port()}"
    exits = "import sys, time; time.sleep(1); sys.exit('no model here')"
    _start_local_service(monkeypatch, tmp_path, address, exits)
    bpy.context.scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle, timeout_s=30)
    assert live.last_message() == (
        "Not answered, 'wave': not sent: the local service it waited for did not start (the "
        f"local service exited with code 1: no model here; its log: "
        f"{live.service_process().log_path})",
        "ERROR",
    )


def test_a_local_service_that_exited_while_loading_is_not_said_to_be_still_starting(
    armature, monkeypatch, tmp_path
):
    # Exited, and a failure at its address comes before the timer has seen it go (in the same
    # tick): "still starting; try again once it is ready" would have the user wait for it.
    monkeypatch.setattr(runtime, "watch_local_service", lambda: None)  # it has not looked yet
    address = f"tcp://127.0.0.1:{free_port()}"
    _start_local_service(monkeypatch, tmp_path, address, "import sys; sys.exit('no model here')")
    deadline = time.monotonic() + 30
    while local_service.local_service_state().alive:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert live.waiting_for_service()  # as the timer left it
    bpy.ops.chatpose.service_status()
    drive(lambda: live.last_message()[0].startswith("Service: "))
    message, level = live.last_message()
    assert "still starting" not in message and level == "ERROR"
    assert message.startswith(f"Service: no service at {address}")
    assert message.endswith(
        " (the local service exited with code 1: no model here; its log: "
        f"{live.service_process().log_path})"
    )


def test_a_failure_at_another_address_is_not_blamed_on_the_local_service_starting(
    armature, monkeypatch, tmp_path
):
    # The local service loads on one address, and a request to another finds nothing there:
    # that says nothing of the local one. (The timer ends the wait once the Service Address
    # changes; until it has looked, the failure must not say "still starting" either.)
    monkeypatch.setattr(runtime, "watch_local_service", lambda: None)  # it has not looked yet
    started_on = f"tcp://127.0.0.1:{free_port()}"
    try:
        _start_local_service(monkeypatch, tmp_path, started_on, "import time; time.sleep(60)")
        elsewhere = f"tcp://127.0.0.1:{free_port()}"
        use_service(elsewhere)
        assert live.waiting_for_service() and local_service.local_service_state().alive
        bpy.ops.chatpose.service_status()
        drive(lambda: live.last_message()[0].startswith("Service: "))
        message, level = live.last_message()
        assert "still starting" not in message and level == "ERROR"
        assert message.startswith(f"Service: no service at {elsewhere}")
        assert f"(the local service started here listens on {started_on}: set that" in message
    finally:
        live.service_process().stop(wait=True)


def test_a_service_address_changed_while_the_local_service_loads_stops_and_resumes_the_wait(
    armature, monkeypatch, tmp_path
):
    # The readiness check asked the new address: "loading the model..." for ever, and every
    # failure called the local service "still starting". Then (the hold's review) the address
    # set back as advised left requests unheld: they failed as the model still loading.
    started_on = f"tcp://127.0.0.1:{free_port()}"
    try:
        _start_local_service(monkeypatch, tmp_path, started_on, "import time; time.sleep(60)")
        bpy.context.scene.chatpose.prompt = "wave"
        bpy.ops.chatpose.send()  # held for the local service
        elsewhere = f"tcp://127.0.0.1:{free_port()}"
        use_service(elsewhere)
        drive(lambda: live.last_message()[0].startswith("The Service Address is now"))
        assert live.last_message() == (
            f"The Service Address is now {elsewhere}; the local service started on {started_on} "
            "goes on there (Stop it, or set that address again)",
            "WARNING",
        )
        assert local_service.local_service_state().alive
        drive(idle)  # what was held for it is not sent there, nor to the new address
        assert live.last_message() == (
            f"Not answered, 'wave': not sent: it waited for the local service on {started_on}, "
            f"and the Service Address is now {elsewhere}",
            "ERROR",
        )
        use_service(started_on)  # set again, as the warning advises
        drive(lambda: "again" in live.last_message()[0])
        assert live.last_message()[0] == (
            "The Service Address is the local service's again; it is loading its model"
        )
        bpy.ops.chatpose.send()
        assert live.last_message()[0].startswith("The local service is loading its model: 'wave'")
    finally:
        live.service_process().stop(wait=True)


def _service_panel_text() -> str:
    icons: list = []
    draw_panels([panel.VIEW3D_PT_chatpose_service], bpy.context, [], icons)
    return " ".join(text for text, _ in icons)


def test_the_service_panel_and_failures_name_the_address_the_local_service_listens_on(
    armature, local_scripted
):
    # Once the Service Address changed, every Send failed with "no service at" the new one
    # while the panel showed the old address's model under it with a check mark, and Start
    # said "already running" without saying where.
    address, _ = local_scripted
    bpy.ops.chatpose.service_status()
    drive(idle)
    assert "scripted on cpu" in _service_panel_text()
    assert f"running (pid {live.service_process().pid}) on {address}" in _service_panel_text()
    other = f"tcp://127.0.0.1:{free_port()}"
    use_service(other)
    assert "scripted on cpu" not in _service_panel_text()  # it was of the address before
    with pytest.raises(RuntimeError, match=f"already running .* on {address}: Stop it to start"):
        bpy.ops.chatpose.service_start()
    bpy.context.scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    message = live.last_message()[0]
    assert f"no service at {other}" in message
    assert f"(the local service started here listens on {address}: set that" in message
    batch_of("walk\nrun")
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    message = live.last_message()[0]
    assert message.startswith("Batch from text 'moves' stopped: no service at")
    assert f"(the local service started here listens on {address}: set that" in message
    use_service(address)
    bpy.ops.chatpose.service_status()
    drive(idle)
    assert "scripted on cpu" in _service_panel_text()
    bpy.context.scene.chatpose.prompt = "wave"
    bpy.ops.chatpose.send()
    drive(idle)
    assert "listens on" not in live.last_message()[0]


def test_a_ready_message_does_not_outlive_the_local_service(armature, local_scripted):
    # Killed while Blender was idle (the system's OOM killer), the panel still said "Local
    # service ready" until the next Send failed.
    import os
    import signal

    os.kill(live.service_process().pid, signal.SIGKILL)
    drive(lambda: not live.service_process().poll().alive)
    message, level = live.last_message()
    assert message == (
        "Local service exited: killed by SIGKILL; often the system ran out of memory; "
        f"its log: {live.service_process().log_path}"
    )
    assert level == "ERROR"
    feedback.set_message("something else")
    assert live.last_message() == ("something else", "INFO")


def test_a_request_that_finds_the_local_service_gone_says_how_it_ended(armature, local_scripted):
    import os
    import signal

    def service_panel():
        buttons, icons = [], []
        draw_panels([panel.VIEW3D_PT_chatpose_service], bpy.context, buttons, icons)
        return buttons, icons

    bpy.ops.chatpose.service_status()
    drive(idle)
    buttons, icons = service_panel()
    assert ("scripted on cpu (float32), chatpose", "CHECKMARK") in icons
    [log] = [properties.filepath for name, _, properties in buttons if name == "wm.path_open"]
    assert log == live.service_process().log_path  # Open Log, not a path past the panel's edge
    os.kill(live.service_process().pid, signal.SIGKILL)  # as a crash, past its own handlers
    drive(lambda: local_service.local_service_state().state == "exited")
    _, icons = service_panel()
    assert not [text for text, _ in icons if text.startswith("scripted on cpu")]  # it was
    text = " ".join(text for text, _ in icons[1:])
    assert text.startswith(
        "Local service: exited: killed by SIGKILL; often the system ran out of memory"
    )
    assert icons[1][1] == "ERROR"
    assert all(len(text) <= panel._chars_per_line(bpy.context) for text, _ in icons[1:])
    bpy.ops.chatpose.service_status()
    drive(idle)
    assert live.last_message() == (live.last_message()[0], "ERROR")
    _, icons = service_panel()
    assert icons[1][0].startswith("unavailable: no service") and icons[1][1] == "ERROR"
    bpy.context.scene.chatpose.prompt = "after the crash"
    bpy.ops.chatpose.send()
    drive(idle)
    message = live.last_message()[0]
    assert "no service at" in message
    assert message.endswith(
        " (the local service exited: killed by SIGKILL; often the system ran out of memory; "
        f"its log: {live.service_process().log_path})"
    )
    # Another service's failure says nothing of it: its log was named for a remote one's.
    use_service(f"tcp://127.0.0.1:{free_port()}")
    bpy.context.scene.chatpose.prompt = "elsewhere"
    bpy.ops.chatpose.send()
    drive(idle)
    message = live.last_message()[0]
    assert message.startswith("Not answered, 'elsewhere': no service at")
    assert "local service" not in message
    batch_of("walk\nrun")
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    message = live.last_message()[0]
    assert "stopped: no service at" in message and "local service" not in message


def test_start_and_stop_the_local_service_from_blender(
    armature, local_scripted, monkeypatch, tmp_path
):
    address, commands = local_scripted
    assert commands == [(sys.executable, str(tmp_path), address, "auto", "none")]
    bpy.context.scene.chatpose.prompt = "from the local service"
    bpy.ops.chatpose.send()
    drive(idle)
    assert_pose(armature, pose_for("from the local service"))
    # An internal error's message says "see the service log": the failure says where it is.
    log = live.service_process().log_path
    assert (
        answers._why_unreachable(ErrorCode.INTERNAL_ERROR) == f" (the local service's log: {log})"
    )
    with pytest.raises(RuntimeError, match="already running"):
        bpy.ops.chatpose.service_start()
    assert bpy.ops.chatpose.service_stop() == {"FINISHED"}
    drive(lambda: local_service.local_service_state().state == "stopped")  # the button alone
    prefs = preferences.get_preferences()  # a 13B model on a studio's second, 24 GB card
    prefs.service_device, prefs.service_gpu, prefs.service_quantization = "cuda", 1, "8bit"
    try:
        assert bpy.ops.chatpose.service_start() == {"FINISHED"}
        assert commands[-1] == (sys.executable, str(tmp_path), address, "cuda:1", "8bit")
        assert bpy.ops.chatpose.service_stop() == {"FINISHED"}
        drive(lambda: local_service.local_service_state().state == "stopped")
        prefs.service_device = "cpu"  # where the service would refuse 8 bits: not passed
        assert bpy.ops.chatpose.service_start() == {"FINISHED"}
        assert commands[-1][3:] == ("cpu", "none")
        assert bpy.ops.chatpose.service_stop() == {"FINISHED"}
        drive(lambda: local_service.local_service_state().state == "stopped")
    finally:
        prefs.service_device, prefs.service_quantization = "auto", "none"
    monkeypatch.setattr(local_service, "serve_command", serve_command)  # the real one checks
    preferences.get_preferences().service_python = ""
    with pytest.raises(RuntimeError, match="set the Python interpreter"):
        bpy.ops.chatpose.service_start()
    host, port = address.removeprefix("tcp://").split(":")
    with socket.socket() as other:  # someone else's service on the address
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past our own's TIME_WAIT
        other.bind((host, int(port)))
        other.listen()
        with pytest.raises(RuntimeError, match=f"something already listens on {address}"):
            bpy.ops.chatpose.service_start()
    use_service("tcp://127.0.0.1:*")  # a wildcard port: the service would listen anywhere
    with pytest.raises(RuntimeError, match="Local service not started: .* is for listening"):
        bpy.ops.chatpose.service_start()
    use_service("tcp://127.0.0.1:99999")  # its fault named, not "must be on this machine"
    with pytest.raises(RuntimeError, match="Local service not started: .*99999.* 1 to 65535"):
        bpy.ops.chatpose.service_start()


def _stubborn_local_service(tmp_path) -> ServiceProcess:
    """A local service that ignores SIGTERM, set as the add-on's own."""
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring SIGTERM', flush=True); time.sleep(60)"
    )
    manager = ServiceProcess(str(tmp_path / "logs"), grace_s=0.5)
    manager.start([sys.executable, "-c", stubborn])
    drive(lambda: last_line(manager.log_path) == "ignoring SIGTERM")  # its handler is set
    live.state.process = manager
    return manager


def test_the_stop_button_kills_a_local_service_that_does_not_stop(blender, tmp_path):
    process = _stubborn_local_service(tmp_path)._process
    assert bpy.ops.chatpose.service_stop() == {"FINISHED"}
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        assert runtime.timer_tick() is not None  # Blender keeps calling it meanwhile
        time.sleep(0.05)
    assert process.returncode == -9
    runtime.timer_tick()
    assert live.last_message()[0].startswith("Local service stopped")
    assert runtime.timer_tick() is None  # nothing left to watch


def test_prompts_not_answered_when_the_add_on_is_disabled_are_kept(
    armature, scripted_service, monkeypatch
):
    import addon_utils

    address, backend = scripted_service
    use_service(address)
    bpy.ops.mesh.primitive_cube_add()
    bpy.ops.object.mode_set(mode="EDIT")  # the first answer comes and waits for Object mode
    scene = bpy.context.scene
    failing = ScriptedBackend.failing_prompt
    for prompt in ("wave", failing):
        scene.chatpose.prompt = prompt
        bpy.ops.chatpose.send()
    drive(lambda: len(live.state.backlog) == 2)  # both came, and wait
    backend.hold()  # the next two stay on their way
    for prompt in ("sit down", "jump high"):
        scene.chatpose.prompt = prompt
        bpy.ops.chatpose.send()
    assert scene.chatpose.prompt == ""  # sending empties it
    bpy.ops.object.mode_set(mode="OBJECT")
    steps = []  # without an undo step, a file saved just before did not count as changed:
    monkeypatch.setattr(feedback, "push_undo", steps.append)  # closing it lost what was kept
    addon_utils.disable(ADDON, default_set=True)  # as users do to "restart" it
    assert steps == ["chat"]
    backend.release()
    addon_utils.enable(ADDON, default_set=True)
    messages = [(m.role, m.text) for m in props.history_messages(scene)]
    kept = dict(zip([text for _, text in messages[0::2]], messages[1::2], strict=True))
    assert sorted(kept) == sorted(["wave", failing, "sit down", "jump high"])
    for prompt in ("wave", "sit down", "jump high"):
        assert kept[prompt] == (chat.ERROR, file_handlers.UNANSWERED_AT_DISABLE)
    assert "exploded" in kept[failing][1]  # a failure keeps its own message
    assert scene.chatpose.prompt in kept  # one back to send


def test_disabling_the_add_on_mid_batch_keeps_the_lines_keyed_in_an_undo_step(
    armature, scripted_service, monkeypatch, capsys
):
    import addon_utils

    address, _ = scripted_service
    use_service(address)
    settings = bpy.context.scene.chatpose
    text = bpy.data.texts.new("moves")
    text.write("\n".join(f"pose {i}" for i in range(12)))
    settings.batch_source, settings.batch_text = "TEXT", text
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)  # keyed a few at a time
    bpy.ops.chatpose.batch_keyframe()
    drive(lambda: live.current_batch().keyed >= 4)
    keyed = live.current_batch().keyed
    steps = []
    monkeypatch.setattr(feedback, "push_undo", steps.append)
    addon_utils.disable(ADDON, default_set=True)
    assert steps == ["batch"]  # without it, undo then redo lost every key of the run
    said = capsys.readouterr().out
    assert f"Blender quit): {keyed} lines keyed on SMPL, {12 - keyed} still to key; " in said
    addon_utils.enable(ADDON, default_set=True)


def test_disabling_the_add_on_with_every_line_of_a_batch_undone_says_the_batch_stopped(
    armature, scripted_service, monkeypatch, capsys
):
    # The undo review: with the lines keyed so far all taken back by an undo (none keyed),
    # the run ended without a word.
    import addon_utils

    _twelve_lines_keyed_two_a_call(scripted_service[0], monkeypatch)
    drive(lambda: live.current_batch().keyed >= 4)
    bpy.ops.ed.undo()
    runtime.timer_tick()  # the recount: every line keyed so far taken back
    assert live.current_batch().keyed == 0 and live.current_batch().taken_back
    addon_utils.disable(ADDON, default_set=True)
    said = capsys.readouterr().out
    assert "Blender quit): 0 lines keyed on SMPL, 12 still to key; Batch Keyframe keys" in said
    addon_utils.enable(ADDON, default_set=True)


def test_unregister_kills_a_local_service_that_does_not_stop(blender, tmp_path):
    import addon_utils

    process = _stubborn_local_service(tmp_path)._process
    addon_utils.disable(ADDON, default_set=True)  # asks it to stop, and a thread kills it later
    assert process.wait(timeout=30) == -9
    addon_utils.enable(ADDON, default_set=True)


def test_unregister_stops_the_local_service(armature, local_scripted):
    import addon_utils

    process = live.service_process()._process
    addon_utils.disable(ADDON, default_set=True)  # asks it to stop, without waiting
    assert process.wait(timeout=30) is not None
    addon_utils.enable(ADDON, default_set=True)


def test_file_settings_take_the_home_folder_as_typed(blender, tmp_path, monkeypatch):
    # "~" worked for the Python setting only: a Client Key or batch file typed so was not found.
    from blender_addon.preferences import get_preferences, service_settings

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "shots.txt").write_text("wave\n")
    settings = bpy.context.scene.chatpose
    settings.batch_source, settings.batch_file = "FILE", "~/shots.txt"
    assert sending.read_batch_lines(bpy.context) == ([(1, "wave")], "shots.txt")
    prefs = get_preferences()
    prefs.curve_client_key, prefs.curve_server_key = "~/me.key_secret", "~/server.key"
    keys = service_settings(bpy.context)
    assert (keys.client_key, keys.server_key) == (
        str(tmp_path / "me.key_secret"),
        str(tmp_path / "server.key"),
    )


def test_a_utf16_file_opened_in_the_text_editor_is_refused_not_keyed_garbled(blender, tmp_path):
    # Blender reads Notepad's "Unicode" as Latin-1 and drops its NULs: the '# shot 1' heading
    # became the prompt 'ÿþ# shot 1', and every frame after it moved.
    shots = tmp_path / "shots.txt"
    shots.write_bytes("# shot 1\r\nraise your left arm\r\n".encode("utf-16"))
    settings = bpy.context.scene.chatpose
    settings.batch_source, settings.batch_text = "TEXT", bpy.data.texts.load(str(shots))
    with pytest.raises(live.UserError, match="text 'shots.txt' holds a UTF-16 or UTF-32 file"):
        sending.read_batch_lines(bpy.context)
    settings.batch_source, settings.batch_file = "FILE", str(shots)  # the remedy it names
    assert sending.read_batch_lines(bpy.context) == ([(2, "raise your left arm")], "shots.txt")


def test_batch_lines_from_a_txt_file(blender, tmp_path):
    settings = bpy.context.scene.chatpose
    settings.batch_source = "FILE"
    with pytest.raises(live.UserError, match="Pick a .txt file"):
        sending.read_batch_lines(bpy.context)
    shots = tmp_path / "shots.txt"
    shots.write_bytes("\ufeffwave hello\n\n  sit down  \r\nbow\n".encode())
    settings.batch_file = str(shots)
    expected = [(1, "wave hello"), (3, "sit down"), (4, "bow")]
    assert sending.read_batch_lines(bpy.context) == (expected, "shots.txt")
    settings.batch_file = str(tmp_path / "missing.txt")
    with pytest.raises(live.UserError, match="missing.txt: no such file"):
        sending.read_batch_lines(bpy.context)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 pose\n".encode("latin-1"))
    settings.batch_file = str(tmp_path / "latin1.txt")
    with pytest.raises(live.UserError, match="is not UTF-8 text .* save it as UTF-8"):
        sending.read_batch_lines(bpy.context)
    with open(tmp_path / "take.mov", "wb") as file:  # picked by mistake: refused unread
        file.truncate(MAX_FILE_BYTES + 1)
    settings.batch_file = str(tmp_path / "take.mov")
    with pytest.raises(live.UserError, match=r"take\.mov is larger than 32 MiB"):
        sending.read_batch_lines(bpy.context)
    (tmp_path / "blank.txt").write_text("\n  \n")
    settings.batch_file = str(tmp_path / "blank.txt")
    with pytest.raises(live.UserError, match="blank.txt has no prompts"):
        sending.read_batch_lines(bpy.context)
    # A .blend from elsewhere may name a pipe or a terminal: reading would wait for ever.
    if hasattr(os, "mkfifo"):
        pipe = tmp_path / "pipe.txt"
        os.mkfifo(pipe)

        def end_a_read_that_waits():  # read, the pipe would hang the test, not fail it
            with contextlib.suppress(OSError):  # no reader: nothing to end
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))

        ender = threading.Timer(5.0, end_a_read_that_waits)
        ender.start()
        try:
            for path in (pipe, tmp_path):
                settings.batch_file = str(path)
                with pytest.raises(live.UserError, match="is not a file .*a pipe.*: pick a .txt"):
                    sending.read_batch_lines(bpy.context)
        finally:
            ender.cancel()


def batch_of(lines: str, start: int = 1, step: int = 1) -> bpy.types.Text:
    """A text "moves" holding `lines`, as the scene's batch source keyed from `start` every
    `step` frames."""
    settings = bpy.context.scene.chatpose
    text = bpy.data.texts.new("moves")
    text.write(lines)
    settings.batch_text, settings.batch_start, settings.batch_step = text, start, step
    return text


def _twelve_lines_keyed_two_a_call(address, monkeypatch) -> None:
    """A batch of 12 lines "pose 0" ... "pose 11" keyed at frames 1 to 12, two lines a timer
    call, after two undo steps of the user's (the text, then the settings)."""
    use_service(address)
    settings = bpy.context.scene.chatpose
    text = bpy.data.texts.new("moves")
    text.write("\n".join(f"pose {i}" for i in range(12)))
    settings.batch_text, settings.batch_step = text, 1
    bpy.ops.ed.undo_push(message="text")
    settings.batch_start = 1
    bpy.ops.ed.undo_push(message="set up")
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)  # one group of two lines a call
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)
    bpy.ops.chatpose.batch_keyframe()


def _assert_every_line_keyed(lines: int) -> None:
    """Each line "pose i" keyed at frame i + 1 on 'SMPL', with the service's pose, and in the
    record of its action. Looked up anew: an undo leaves references from before invalid."""
    obj = bpy.data.objects["SMPL"]
    assert keyed_frames(obj) == list(range(1, lines + 1))
    for i in range(lines):
        assert_pose(obj, pose_for(f"pose {i}"), i + 1)
    record = batch_store.load_record(obj)
    assert all(record.is_keyed(i, f"pose {i}", i + 1) for i in range(lines))


def test_lines_an_undo_takes_back_during_a_batch_are_keyed_again(
    armature, scripted_service, monkeypatch, reports
):
    # The run makes its undo step when it ends: an undo in between went back past the lines
    # keyed since the step before, and the run ended with them missing ("4 of 12 still to
    # key"), for a rerun to key.
    _twelve_lines_keyed_two_a_call(scripted_service[0], monkeypatch)
    drive(lambda: live.current_batch().keyed >= 4)
    run = live.current_batch()
    keyed = run.keyed
    bpy.ops.ed.undo()  # Ctrl+Z while the batch runs: back past the lines keyed so far
    drive(lambda: "waiting: you have undone steps" in live.last_message()[0])
    # Counted as they are, and not keyed again while the user can redo.
    assert (run.keyed, run.remaining) == (0, 12)
    assert run.taken_back == keyed
    assert f"0/12 lines keyed on SMPL, {keyed} taken back by an undo" in run.status_text()
    assert keyed_frames(bpy.data.objects["SMPL"]) == []
    bpy.ops.ed.undo_push(message="a change")  # the batch goes on after the user's next change
    drive(idle)
    assert run.state == batch_plan.FINISHED and (run.keyed, run.taken_back) == (12, 0)
    summaries = [text for _, text in reports if text.startswith("Batch from")]
    assert summaries == ["Batch from text 'moves' done: 12 lines keyed on SMPL; all 12 lines keyed"]
    _assert_every_line_keyed(12)
    # The run's own undo step holds every line: undoing a change made after it keeps them.
    assert bpy.context.window_manager.operators[-1].bl_idname == "CHATPOSE_OT_batch_step"
    bpy.context.scene.frame_current = 30
    bpy.ops.ed.undo_push(message="after the batch")
    bpy.ops.ed.undo()
    assert bpy.context.scene.frame_current != 30
    _assert_every_line_keyed(12)


@pytest.mark.parametrize("animation_data", [False, True])
def test_ctrl_z_of_batch_keyframe_s_own_step_while_it_runs_does_not_crash_blender(
    armature, scripted_service, monkeypatch, animation_data
):
    # The undo review: Batch Keyframe's undo step (pushed once it returns, as the UI does)
    # held no action, the run's first keys made one, and Ctrl+Z then left the armature,
    # unchanged between the two steps and so kept as it was, pointing at the freed action:
    # Blender crashed (a segfault ends this test run).
    if animation_data:  # an armature whose action was unassigned: the same
        armature.animation_data_create()
    _twelve_lines_keyed_two_a_call(scripted_service[0], monkeypatch)
    bpy.ops.ed.undo_push(message="Batch Keyframe")
    drive(lambda: live.current_batch().keyed >= 4)
    bpy.ops.ed.undo()
    bpy.ops.ed.undo_push(message="a change")
    drive(idle)
    _assert_every_line_keyed(12)


def test_an_undo_past_an_earlier_run_s_step_counts_its_lines_still_to_key(
    armature, scripted_service, monkeypatch
):
    # The undo review: the second run ended "done ... all 12 lines keyed" with the first
    # run's six lines undone (the run checked only the lines it keyed itself).
    use_service(scripted_service[0])
    text = batch_of("\n".join(f"pose {i}" for i in range(6)))
    bpy.ops.ed.undo_push(message="text")
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)  # lines 0-5 keyed, in the run's own undo step
    text.clear()
    text.write("\n".join(f"pose {i}" for i in range(12)))
    bpy.ops.ed.undo_push(message="text of 12")
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)
    bpy.ops.chatpose.batch_keyframe()  # lines 6-11
    drive(lambda: live.current_batch().keyed >= 2)
    bpy.ops.ed.undo()
    bpy.ops.ed.undo()  # back past the first run's step: its lines are gone
    bpy.ops.ed.undo_push(message="a change")
    drive(idle)
    assert keyed_frames(bpy.data.objects["SMPL"]) == list(range(7, 13))
    assert live.last_message() == (
        "Batch from text 'moves': 6 lines keyed on SMPL; 6 of 12 still to key. 6 lines keyed "
        "before this run taken back by an undo. Run Batch Keyframe again to key the rest "
        "(nothing is keyed twice).",
        "WARNING",
    )


def test_lines_a_redo_brings_back_during_a_batch_are_not_keyed_twice(
    armature, scripted_service, monkeypatch, reports
):
    _twelve_lines_keyed_two_a_call(scripted_service[0], monkeypatch)
    drive(lambda: live.current_batch().keyed >= 4)
    run = live.current_batch()
    bpy.context.scene.frame_current = 40
    bpy.ops.ed.undo_push(message="a change")  # holds the lines keyed so far
    in_the_step = run.keyed
    drive(lambda: run.keyed >= in_the_step + 2)
    keying = []
    original = batch_store.key_batch_lines
    monkeypatch.setattr(
        answers,
        "key_batch_lines",
        lambda obj, items, **kw: (
            keying.append([line.line for line, _ in items]),
            original(obj, items, **kw),
        )[1],
    )
    bpy.ops.ed.undo()  # the change undone: back past every line keyed
    drive(lambda: "waiting: you have undone steps" in live.last_message()[0])
    assert run.keyed == 0 and keyed_frames(bpy.data.objects["SMPL"]) == []
    bpy.ops.ed.redo()  # the change again: the lines keyed before it come back with it
    drive(idle)
    assert bpy.context.scene.frame_current == 40
    assert run.state == batch_plan.FINISHED and run.keyed == 12
    keyed_again = sorted(line for group in keying for line in group)
    assert keyed_again == list(range(in_the_step, 12))  # those the redo brought back: not again
    summaries = [text for _, text in reports if text.startswith("Batch from")]
    assert summaries == ["Batch from text 'moves' done: 12 lines keyed on SMPL; all 12 lines keyed"]
    _assert_every_line_keyed(12)


def test_an_answer_for_an_armature_changed_meanwhile_names_it_as_it_is_now(
    armature, scripted_service
):
    address, backend = scripted_service
    use_service(address)
    backend.hold()
    bpy.context.scene.chatpose.prompt = "for a rig about to change"
    bpy.ops.chatpose.send()
    armature.name = "Hero"
    armature.data.bones["head"].name = "Head"  # no SMPL armature any more, still in the scene
    backend.release()
    drive(idle)
    message = live.last_message()[0]
    assert "is gone" not in message
    assert message.startswith("The armature 'Hero' is no longer an SMPL armature: it has no bone")
    assert message.endswith("; the answer was not applied")
    assert bpy.context.scene.chatpose.prompt == "for a rig about to change"  # to send again


def _batch_part_keyed(scripted_service, monkeypatch) -> None:
    """A batch of 12 lines, keyed 2 a tick, 4 or more of them keyed."""
    address, _ = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(12)))
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)
    bpy.ops.chatpose.batch_keyframe()
    drive(lambda: live.current_batch().keyed >= 4)


def test_a_batch_whose_armature_is_deleted_makes_no_undo_step_after_the_delete_s(
    armature, scripted_service, monkeypatch
):
    # A review: the run's step came after the user's delete, and the first Ctrl+Z changed
    # nothing visible; the next brought the armature back.
    _batch_part_keyed(scripted_service, monkeypatch)
    steps = []
    monkeypatch.setattr(feedback, "push_undo", steps.append)
    delete_in_viewport(armature)
    drive(idle)
    assert "the armature 'SMPL' is gone" in live.last_message()[0]
    assert "batch" not in steps


def test_a_stopped_batch_s_armature_brought_back_by_an_undo_is_told_without_its_lines(
    armature, scripted_service, monkeypatch
):
    # The armature deleted mid-batch came back with an undo without the lines keyed before
    # the delete (they were in no undo step), and the panel still said they were keyed.
    bpy.ops.ed.undo_push(message="set up")  # the undo system started, as in Blender's UI
    _batch_part_keyed(scripted_service, monkeypatch)
    delete_in_viewport(armature)
    bpy.ops.ed.undo_push(message="Delete")  # as the operator's own step in Blender's UI
    drive(idle)
    run = live.current_batch()
    keyed = run.keyed
    told = f"{keyed} lines keyed on SMPL; {12 - keyed} of 12 still to key."
    assert "the armature 'SMPL' is gone" in live.last_message()[0] and told in run.summary()
    bpy.ops.ed.undo()  # the delete undone
    drive(idle)
    assert keyed_frames(bpy.data.objects["SMPL"]) == []
    message, level = live.last_message()
    for said in (message, run.summary()):  # the message box and the batch panel
        assert said.startswith("Batch from text 'moves' stopped: the armature 'SMPL' is gone.")
        assert (
            f"0 lines keyed on SMPL; 12 of 12 still to key. {keyed} lines it keyed were taken "
            "back by an undo." in said
        )
        assert said.endswith("Run Batch Keyframe again to key the rest (nothing is keyed twice).")
    assert level == "ERROR"
    bpy.ops.ed.redo()  # deleted again, with its lines
    drive(idle)
    assert told in live.last_message()[0] and told in run.summary()
    assert "taken back" not in run.summary()


def test_a_batch_whose_armature_is_replaced_by_one_of_its_name_says_so(
    armature, scripted_service, monkeypatch
):
    # A review: it said "'SMPL' is gone" with an 'SMPL' in the viewport.
    _batch_part_keyed(scripted_service, monkeypatch)
    bpy.context.scene.chatpose.target = None
    bpy.data.objects.remove(armature)
    assert create_smpl_armature(bpy.context, with_mesh=False).name == "SMPL"
    drive(idle)
    message = live.last_message()[0]
    assert (
        "stopped: the armature 'SMPL' it went out for was deleted; this 'SMPL' is another"
        in message
    )


@pytest.mark.parametrize("change", ["armature renamed", "take renamed", "bone renamed"])
def test_a_batch_names_its_armature_as_it_is_now(armature, scripted_service, monkeypatch, change):
    address, _ = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(12)))
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)  # one group of two lines a call
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)
    bpy.ops.chatpose.batch_keyframe()
    drive(lambda: live.current_batch().keyed >= 4)
    if change == "armature renamed":
        armature.name = "Hero"
    elif change == "take renamed":  # named while it is made: the same take
        armature.animation_data.action.name = "Take 1"
    else:
        armature.data.bones["head"].name = "Head"  # a rename the user did not mean for SMPL
    drive(idle)
    message = live.last_message()[0]
    if change == "armature renamed":
        assert "12 lines keyed on Hero; all 12 lines keyed" in message, message
    elif change == "take renamed":
        assert "12 lines keyed on SMPL; all 12 lines keyed" in message, message
    else:
        assert "is gone" not in message
        assert "the armature 'SMPL' is no longer an SMPL armature: it has no bone head" in message


def test_a_locked_curve_stops_a_batch_before_the_service_computes_it(
    armature, scripted_service, monkeypatch
):
    address, backend = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(40)))
    apply_pose(armature, pose_for("rest"), frame=1)  # an action with curves, one locked
    knee = 'pose.bones["left_knee"].rotation_quaternion'
    [curve] = [c for c in action_fcurves(armature) if c.data_path == knee][:1]
    curve.lock = True
    with pytest.raises(RuntimeError, match="Batch not sent: .* channel of left_knee is locked"):
        bpy.ops.chatpose.batch_keyframe()
    assert backend.batch_sizes == []

    curve.lock = False
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)  # one group of two lines a call
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)
    answer = backend.answer_poses

    def answer_then_hold(items):  # the first micro-batch (4 lines) only, until released
        answers = answer(items)
        backend.hold()
        return answers

    monkeypatch.setattr(backend, "answer_poses", answer_then_hold)
    try:
        bpy.ops.chatpose.batch_keyframe()
        drive(lambda: live.current_batch().keyed >= 2)
        # A group is the lines that arrived by a tick, at most two: one or two at first.
        keyed = live.current_batch().keyed
        curve.lock = True  # locked while the batch runs: the rest is cancelled, not computed
        drive(idle)
    finally:
        backend.release()
    run = live.current_batch()
    assert run.state == batch_plan.FAILED and run.keyed == keyed  # none keyed after
    assert len(backend.items) <= 8  # the answered micro-batch and the one held
    assert "stopped: " in live.last_message()[0] and "is locked" in live.last_message()[0]


@pytest.mark.parametrize("when", ["after its first keys", "before its first keys"])
def test_a_batch_keys_no_other_take_than_its_own(armature, scripted_service, monkeypatch, when):
    address, backend = scripted_service
    use_service(address)
    hand = {frame: random_pose(frame) for frame in range(1, 13)}  # the animator's take
    for frame, pose in hand.items():
        apply_pose(armature, pose, frame=frame)
    walk = armature.animation_data.action
    walk.name, walk.use_fake_user = "Walk", True
    armature.animation_data.action = None  # a new take for the batch
    batch_of("\n".join(f"pose {i}" for i in range(12)))
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)  # one group of two lines a call
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)
    if when == "before its first keys":
        backend.hold()  # the lines are still being computed
    bpy.ops.chatpose.batch_keyframe()
    if when == "after its first keys":
        drive(lambda: live.current_batch().keyed >= 4)
    take = armature.animation_data.action
    armature.animation_data.action = walk  # a look at another take while the batch runs
    if getattr(armature.animation_data, "action_slot", walk) is None:
        armature.animation_data.action_slot = walk.slots[0]
    backend.release()
    drive(idle)
    run = live.current_batch()
    assert run.state == batch_plan.FAILED
    keying = f"the take '{take.name}'"  # made by Batch Keyframe, before its first keys too
    assert (
        f"stopped: the armature now shows the take 'Walk', and this run was keying {keying}"
        in live.last_message()[0]
    )
    for frame, pose in hand.items():  # not one of the animator's keys replaced
        np.testing.assert_allclose(read_pose_of(walk, armature, frame), pose.axis_angle, atol=1e-5)
    assert not any(key.startswith("chatpose_batch_record") for key in walk.keys())
    if when == "after its first keys":
        record = batch_store.BatchRecord.from_json(next(v for k, v in take.items()))
        assert len(record.entries) == run.keyed >= 4  # the lines keyed before stay, recorded


def read_pose_of(action, obj, frame):
    """The pose `action` gives `obj` at `frame`, whatever the object shows now."""
    shown = obj.animation_data.action
    obj.animation_data.action = action
    if getattr(obj.animation_data, "action_slot", action) is None:
        obj.animation_data.action_slot = action.slots[0]
    try:
        return read_pose(obj, frame).axis_angle
    finally:
        obj.animation_data.action = shown


def test_an_exported_batch_take_is_labelled_with_its_prompts(armature, scripted_service, tmp_path):
    address, _ = scripted_service
    use_service(address)
    text = batch_of("wave\n# a note\nsit down\nbow", start=1, step=5)
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    text.clear()
    text.write("wave\n# a note\nsit on the floor\nbow")  # edited since it was keyed
    out = tmp_path / "take.npz"
    assert bpy.ops.chatpose.export_npz(filepath=str(out)) == {"FINISHED"}
    motion = Motion.load_npz(out)
    assert len(motion) == 3  # frames 1, 6, 11
    assert motion.labels == ("wave", "", "bow")  # as `chatpose batch --out` labels its frames


def test_the_batch_record_is_not_cleared_while_a_batch_runs(armature, scripted_service):
    address, backend = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(4)))
    backend.hold()
    try:
        bpy.ops.chatpose.batch_keyframe()
        assert not bpy.ops.chatpose.clear_batch_record.poll()
    finally:
        backend.release()
    drive(idle)
    assert len(batch_store.load_record(armature).entries) == 4
    assert bpy.ops.chatpose.clear_batch_record() == {"FINISHED"}
    assert not batch_store.load_record(armature).entries


def test_the_file_counts_as_saved_when_blender_says_it_holds_no_changes(monkeypatch):
    # What the next test stands in for: background Blender's file is "changed" at all times.
    for dirty in (False, True):
        fake = types.SimpleNamespace(data=types.SimpleNamespace(is_dirty=dirty))
        monkeypatch.setattr(answers, "bpy", fake)
        assert answers._file_saved() is not dirty


def test_a_file_saved_while_a_batch_runs_is_marked_changed_again(
    armature, scripted_service, monkeypatch
):
    address, _ = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(6)))
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)  # one group of two lines a call
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)
    steps = []
    monkeypatch.setattr(feedback, "push_undo", steps.append)
    # Background Blender counts its file as changed at all times; in a window a save clears
    # that, and only an undo step sets it again.
    saved = iter([False, True])
    monkeypatch.setattr(answers, "_file_saved", lambda: next(saved, False))
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    assert "all 6 lines keyed" in live.last_message()[0]
    assert steps == ["batch", "batch"]  # after the group keyed past the save, and at the end


def _handles_settled(obj=None, curves=None) -> bool:
    """Whether every key's handles (of ``obj``'s take, or of ``curves``) are where Blender's
    own update puts them."""
    curves = list(action_fcurves(obj)) if curves is None else curves

    def handles():
        return [
            tuple(p.handle_left) + tuple(p.handle_right) for c in curves for p in c.keyframe_points
        ]

    before = handles()
    for fcurve in curves:
        fcurve.update()
    return np.allclose(before, handles(), atol=1e-6)


def test_a_batch_s_keys_have_their_handles_at_its_end_and_in_a_file_saved_during_it(
    armature, scripted_service, monkeypatch, tmp_path
):
    address, _ = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(6)), step=5)
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)  # one group of two lines a call
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)
    bpy.ops.chatpose.batch_keyframe()
    drive(lambda: len(batch_store.load_record(armature).entries) >= 2)
    assert live.busy()  # the run goes on
    saved = tmp_path / "during.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(saved), copy=True)
    keyed = len(batch_store.load_record(armature).entries)
    assert 2 <= keyed < 6 and _handles_settled(armature)
    drive(idle)
    assert "all 6 lines keyed" in live.last_message()[0]
    assert _handles_settled(armature)


@pytest.mark.parametrize("change", ["pushed down", "renamed and pushed down", "swapped"])
def test_a_take_the_armature_leaves_during_a_batch_gets_its_handles_too(
    armature, scripted_service, monkeypatch, change
):
    from blender_addon.blender.anim import take_fcurves

    address, _ = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(8)), step=5)
    monkeypatch.setattr(runtime, "TICK_BUDGET_S", 0.0)  # one group of two lines a call
    monkeypatch.setattr(runtime, "MAX_LINES_PER_GROUP", 2)
    bpy.ops.chatpose.batch_keyframe()
    drive(lambda: len(batch_store.load_record(armature).entries) >= 4)
    anim = armature.animation_data
    first, slot = anim.action, getattr(anim, "action_slot", None)
    if change == "renamed and pushed down":  # a second review: taken for undone, it went on
        first.name = "Hero_walk_v2"
    if change != "swapped":  # the NLA's Push Down: the run stops, its lines in the strip
        anim.nla_tracks.new().strips.new(first.name, 1, first)
        anim.action = None
    else:  # another take assigned: the run stops, its lines kept in its own take
        anim.action = bpy.data.actions.new("other")
    drive(idle)
    assert _handles_settled(curves=take_fcurves(first, slot))
    message = live.last_message()[0]
    assert "stopped: " in message and f"the take '{first.name}'" in message
    # A review: pushed down, the run went on in a new take; its end said "done" with lines
    # still to key, and a rerun keyed the first lines again there.
    assert anim.action is None or anim.action.name == "other"


def test_lines_keyed_without_keep_on_floor_are_put_on_the_floor_as_keyed_when_it_is_on(
    armature, scripted_service
):
    address, backend = scripted_service
    use_service(address)
    settings = bpy.context.scene.chatpose
    root = armature.pose.bones["pelvis"]
    text = batch_of("kneel down low\nsit", step=10)  # frames 1 and 11
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    assert not [c for c in action_fcurves(armature) if c.data_path.endswith("location")]
    edited = random_pose(5, translation=False)
    apply_pose(armature, edited, frame=11)  # the animator reposes the second line by hand
    root.location = (0.3, 0.0, -0.2)  # and stands the character elsewhere (not keyed)
    text.write("\nbow")  # a line not keyed yet

    settings.batch_keep_on_floor = True
    assert sending.replace_keys_question(bpy.context) == ""  # none of the animator's
    assert bpy.ops.chatpose.batch_keyframe("INVOKE_DEFAULT") == {"FINISHED"}
    message = live.last_message()[0]
    assert "1 lines to key" in message and "(2 keyed before)" in message
    assert "2 line(s) keyed before without Keep on Floor are put on the floor from their" in message
    drive(idle)
    assert "all 3 lines keyed" in live.last_message()[0]
    assert [item.prompt for item in backend.items[2:]] == ["bow"]  # the others not asked again
    for frame, pose in ((1, pose_for("kneel down low")), (11, edited), (21, pose_for("bow"))):
        assert_pose(armature, pose, frame)  # rotations as keyed, the edit kept
        bpy.context.scene.frame_set(frame)
        assert _above_floor(armature) == pytest.approx(0.0, abs=1e-5)
        assert (root.location.x, root.location.z) == pytest.approx((0.3, -0.2))  # its place
    record = batch_store.load_record(armature)
    assert all(e.on_floor and not e.translation for e in record.entries)
    assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
    assert "are keyed on" in live.last_message()[0]  # placed once: nothing to do now

    bpy.context.scene.frame_set(11)
    root.location.y += 0.5  # a jump, keyed by hand
    root.keyframe_insert("location", frame=11)
    settings.batch_translation = True  # on the floor already: only recorded with it
    assert bpy.ops.chatpose.batch_keyframe() == {"FINISHED"}
    assert "put on the floor" not in live.last_message()[0] and len(backend.items) == 3
    assert batch_store.load_record(armature).pending(["kneel down low", "sit", "bow"], 1, 10) == []
    assert all(e.on_floor and e.translation for e in batch_store.load_record(armature).entries)
    bpy.context.scene.frame_set(1)
    bpy.context.scene.frame_set(11)
    assert _above_floor(armature) == pytest.approx(0.5, abs=1e-5)  # the jump kept

    settings.batch_keep_on_floor = False
    bpy.ops.chatpose.clear_batch_record()
    batch_store.save_record(  # keyed on the floor, not with Translation
        armature, batch_store.load_record(armature).recorded_lines([(1, "sit", 11)], False, True)
    )
    question = sending.replace_keys_question(bpy.context)
    # The record cleared: lines 1 and 3's keys are not recorded now, and the jump keyed by hand
    # on the line placed before.
    assert question.startswith("2 line(s) go on frames where SMPL has keys not keyed from these")
    assert ". 1 line(s) keyed before have root location keys at their frames that " in question


def test_translation_keys_lines_keyed_without_it_at_rest_asking_first_over_own_keys(
    armature, scripted_service
):
    address, backend = scripted_service
    use_service(address)
    settings = bpy.context.scene.chatpose
    root = armature.pose.bones["pelvis"]
    batch_of("walk\nrun\nbow", step=10)  # frames 1, 11 and 21
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    root.location = (1.0, 0.0, 2.0)
    root.keyframe_insert("location", frame=11)  # the animator's own place for the second line
    settings.batch_translation = True
    assert sending.replace_keys_question(bpy.context) == (
        "1 line(s) keyed before have root location keys at their frames that Translation "
        "replaces with the rest location (their rotations are kept)"
    )
    location = next(c for c in action_fcurves(armature) if c.data_path.endswith("location"))
    location.lock = True  # the batch is refused: said at once, not after the question
    assert sending.replace_keys_question(bpy.context) == ""
    with pytest.raises(RuntimeError, match="Batch not sent: .*pelvis.* is locked"):
        bpy.ops.chatpose.batch_keyframe("INVOKE_DEFAULT")
    location.lock = False
    # Background Blender shows no dialog: its confirmation runs the batch at once.
    assert bpy.ops.chatpose.batch_keyframe("INVOKE_DEFAULT") == {"FINISHED"}
    message = live.last_message()[0]
    assert "3 line(s) keyed before without Translation get the root's location keyed at rest" in (
        message
    )
    assert len(backend.items) == 3  # nothing asked again
    for frame, prompt in ((1, "walk"), (11, "run"), (21, "bow")):
        assert_pose(armature, pose_for(prompt), frame)
        bpy.context.scene.frame_set(frame)
        assert tuple(root.location) == pytest.approx((0.0, 0.0, 0.0))  # at rest: the origin
    assert all(e.translation and not e.on_floor for e in batch_store.load_record(armature).entries)
    assert sending.replace_keys_question(bpy.context) == ""


def test_a_batch_keys_an_armature_of_a_long_name(armature, scripted_service):
    # A review: past 39 characters the record's property name passed Blender's 63 bytes, and
    # every line failed ("the length of IDProperty names is limited to 63 characters").
    address, _ = scripted_service
    use_service(address)
    armature.name = "Shot010_CharacterRig_MainDancer_Performance_Take03"
    batch_of("walk\nrun")
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    assert "all 2 lines keyed" in live.last_message()[0]
    assert_pose(armature, pose_for("run"), 2)
    assert len(batch_store.load_record(armature).entries) == 2


@pytest.mark.parametrize("change", ["slot renamed", "a record of Blender 4.2"])
def test_a_record_is_found_after_a_slot_rename_and_from_before_slots(
    armature, scripted_service, change
):
    # The record review: a rename of the action's slot lost the record (named by the slot's
    # identifier), and so did opening a file keyed in 4.2 or 4.3 (no slots then) in 4.4+;
    # the next run asked the service for every line again and offered to replace the keys.
    address, backend = scripted_service
    use_service(address)
    batch_of("walk\nrun\nbow")
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    action = armature.animation_data.action
    slot = armature.animation_data.action_slot
    if change == "slot renamed":
        slot.name_display = "Hero"
    else:  # as 4.4 opens a file of 4.2: the record without a slot's name, one slot
        [name] = [key for key in action.keys() if key.startswith("chatpose_batch_record")]
        action["chatpose_batch_record"] = action[name]
        del action[name]
    asked = len(backend.items)
    assert sending.replace_keys_question(bpy.context) == ""
    bpy.ops.chatpose.batch_keyframe()
    assert "All 3 lines of text 'moves' are keyed on SMPL already" in live.last_message()[0]
    assert len(backend.items) == asked
    batch_store.save_record(armature, batch_store.load_record(armature))  # written: moved
    assert [key for key in action.keys() if key.startswith("chatpose_batch_record")] == [
        f"chatpose_batch_record:#{slot.handle}"
    ]


def test_a_batch_asks_before_replacing_keys_no_batch_made(armature, scripted_service):
    # A review: a first run replaced the animator's key at a line's frame without a word.
    address, _ = scripted_service
    use_service(address)
    text = batch_of("walk\nrun\nbow", step=10)  # frames 1, 11 and 21
    hand = random_pose(3, translation=False)
    apply_pose(armature, hand, frame=11)  # the animator's key
    apply_pose(armature, hand, frame=15)  # one between the lines: not replaced
    assert sending.replace_keys_question(bpy.context) == (
        "1 line(s) go on frames where SMPL has keys not keyed from these lines (frame 11): they "
        "replace them (Undo brings them back)"
    )
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    assert_pose(armature, pose_for("run"), 11)
    assert_pose(armature, hand, 15)
    # A line edited: its own key at its frame is replaced, as a rerun does, without asking.
    text.from_string("walk\njog\nbow")
    assert sending.replace_keys_question(bpy.context) == ""
    bpy.context.scene.chatpose.batch_start = 5  # frames 5, 15, 25: the key at 15 is in the way
    assert sending.replace_keys_question(bpy.context).startswith(
        "1 line(s) go on frames where SMPL has keys not keyed from these lines (frame 15)"
    )


def test_a_run_whose_connection_ends_after_its_last_line_is_keyed_is_done(armature):
    line = batch_record.PendingLine(0, "wave", 1)
    run = batch_plan.BatchRun(
        armature=armature.name,
        source="text 'moves'",
        pending=[line],
        total_lines=1,
        armature_uid=armature.session_uid,
    )
    batch_store.key_batch_lines(armature, [(line, random_pose(0))])
    run.item_keyed(line)
    run.fail("the service went away during the request")  # before its batch_done came
    answers._batch_ended(run)
    message, level = live.last_message()
    assert "done: 1 line keyed on SMPL; all 1 lines keyed" in message and level == "INFO"


def test_a_batch_past_blender_s_last_frame_is_refused_before_it_is_sent(armature, scripted_service):
    address, backend = scripted_service
    use_service(address)
    batch_of("\n".join(f"pose {i}" for i in range(4)), start=20_000_001, step=10)
    assert bpy.context.scene.chatpose.batch_start == 1_048_574  # it holds Blender's frames only
    with pytest.raises(RuntimeError, match="Batch not sent: text 'moves': 4 poses from frame"):
        bpy.ops.chatpose.batch_keyframe()
    assert backend.batch_sizes == [] and batch_store.load_record(armature).entries == ()


def _keyed_batch(scripted_service, lines: str):
    """`lines` keyed by a first batch run at frames 1, 11, 21, ...; returns its text."""
    address, _ = scripted_service
    use_service(address)
    text = batch_of(lines, start=1, step=10)
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    return text


def test_lines_deleted_from_the_text_are_forgotten_and_their_keys_left(armature, scripted_service):
    text = _keyed_batch(scripted_service, "a\nbb\nccc\ndddd")
    text.clear()
    text.write("a\nccc\ndddd")  # 'bb' deleted: the lines after it move up one frame slot
    address = preferences.get_preferences().service_address
    use_service("ipc:///tmp/" + "a" * 120)  # a first try that cannot be sent
    with pytest.raises(RuntimeError, match="Batch not sent"):
        bpy.ops.chatpose.batch_keyframe()
    use_service(address)
    bpy.ops.chatpose.batch_keyframe()  # the note is still there for the run that starts
    assert (
        "1 recorded line(s) are no longer in the text, their keys (frame 31)"
        in (live.last_message()[0])
    )
    drive(idle)
    record = batch_store.load_record(armature)
    assert [e.line for e in record.entries] == [0, 1, 2]
    assert_pose(armature, pose_for("dddd"), frame=21)
    assert_pose(armature, pose_for("dddd"), frame=31)  # the old key, left as it was


def test_a_new_step_keys_the_lines_again_and_names_the_keys_left_behind(armature, scripted_service):
    _keyed_batch(scripted_service, "a\nbb\nccc")
    bpy.context.scene.chatpose.batch_step = 5
    bpy.ops.chatpose.batch_keyframe()
    message = live.last_message()[0]
    assert "other lines now go where 1 old key(s) are (frame 11), and replace them" in message
    assert "the old keys at frame 21 are left as they are" in message
    drive(idle)
    assert [e.frame for e in batch_store.load_record(armature).entries] == [1, 6, 11]
    assert_pose(armature, pose_for("ccc"), frame=11)
    assert_pose(armature, pose_for("ccc"), frame=21)  # the old key, left as it was


def test_a_line_whose_old_key_another_line_replaced_is_keyed_again_when_start_goes_back(
    armature, scripted_service, monkeypatch
):
    _, backend = scripted_service
    text = _keyed_batch(scripted_service, "a\nbb\nccc")  # frames 1, 11, 21
    settings = bpy.context.scene.chatpose
    settings.batch_start = 11  # frames 11, 21, 31: 'a' replaces the key 'bb' had at 11
    monkeypatch.setattr(backend, "failing_prompt", "bb")  # and the run keys no 'bb'
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    monkeypatch.undo()
    assert_pose(armature, pose_for("a"), frame=11)
    settings.batch_start = 1  # back: 'bb' is not keyed at 11 any more, so it is asked again
    bpy.ops.chatpose.batch_keyframe()
    drive(idle)
    assert "all 3 lines keyed" in live.last_message()[0]
    for frame, prompt in ((1, "a"), (11, "bb"), (21, "ccc")):
        assert_pose(armature, pose_for(prompt), frame)
    assert batch_store.load_record(armature).labels(text.as_string().split("\n")) == {
        1: "a",
        11: "bb",
        21: "ccc",
    }

    text.clear()
    text.write("a\nbb")  # 'ccc' deleted, and the step halved: 'bb' goes where 'ccc' was keyed
    settings.batch_step = 20
    bpy.ops.chatpose.batch_keyframe()
    message = live.last_message()[0]
    assert "1 recorded line(s) are no longer in the text;" in message  # its key not left
    assert "other lines now go where 1 old key(s) are (frame 21), and replace them" in message


def test_a_person_made_with_nothing_active_leaves_nothing_active(armature, scripted_service):
    # The new person stayed active: Tab, the N panel and the Properties editor went to it.
    address, _ = scripted_service
    use_service(address)
    scene = bpy.context.scene
    scene.chatpose.chat_mode, scene.chatpose.target = True, armature  # two people
    bpy.context.view_layer.objects.active = None
    armature.select_set(False)
    scene.chatpose.prompt = "two dancers"
    bpy.ops.chatpose.send()
    drive(idle)
    assert "SMPL.person2" in bpy.data.objects
    assert bpy.context.view_layer.objects.active is None and not bpy.context.selected_objects


def test_a_person_brought_back_brings_its_body_alone(armature, scripted_service):
    address, _ = scripted_service
    use_service(address)
    home = bpy.context.scene
    home.chatpose.chat_mode, home.chatpose.target = True, armature
    home.chatpose.prompt = "two dancers"
    bpy.ops.chatpose.send()
    drive(idle)
    person = bpy.data.objects["SMPL.person2"]
    [body] = person.children
    props_scene = bpy.data.scenes.new("Props")  # a sword the user parented, kept elsewhere
    sword = bpy.data.objects.new("Sword", None)
    props_scene.collection.objects.link(sword)
    sword.parent = person
    stash = bpy.data.collections.new("Stash")  # in no scene; the target is in it too
    stash.use_fake_user = True
    stash.objects.link(armature)
    for item in (person, body):  # the person tidied into it, out of the scene
        for collection in item.users_collection:
            collection.objects.unlink(item)
        stash.objects.link(item)
    home.chatpose.prompt = "two dancers again"
    bpy.ops.chatpose.send()
    drive(idle)
    assert live.last_message()[0].startswith("Applied 2 pose(s)"), live.last_message()
    assert person.name in home.objects and body.name in home.objects
    assert sword.name not in home.objects  # not the user's other things parented to it


def test_extra_people_go_beside_their_target_in_its_scene(armature, scripted_service):
    address, backend = scripted_service
    use_service(address)
    window = bpy.context.window_manager.windows[0]
    home = window.scene
    home.chatpose.chat_mode = True  # two people: the second is made
    backend.hold()
    home.chatpose.prompt = "two dancers"
    bpy.ops.chatpose.send()
    window.scene = other = bpy.data.scenes.new("Other")  # the user looks at another scene
    backend.release()
    drive(idle)
    window.scene = home
    person = bpy.data.objects["SMPL.person2"]
    assert set(person.users_collection) == set(armature.users_collection)
    assert person.name not in other.objects and person.name in home.objects
    assert all(set(c.users_collection) == set(armature.users_collection) for c in person.children)

    crowd = bpy.data.collections.new("Crowd")  # the user tidies the second dancer away
    home.collection.children.link(crowd)
    for item in (person, *person.children):  # its body with it
        for collection in item.users_collection:
            collection.objects.unlink(item)
        crowd.objects.link(item)
    crowd.hide_viewport = True
    home.chatpose.prompt = "two dancers again"
    bpy.ops.chatpose.send()
    drive(idle)
    assert list(person.users_collection) == [crowd] and not person.visible_get()
    home.collection.children.unlink(crowd)  # out of the scene: the next answer brings it back
    home.chatpose.prompt = "and once more"
    bpy.ops.chatpose.send()
    drive(idle)
    assert set(person.users_collection) == {crowd, *armature.users_collection}
    assert all(c.name in home.objects for c in person.children)  # not a bare skeleton


def _adjust_last_operation(**values) -> None:
    """What changing a value in Blender's "Adjust Last Operation" panel (F9) does: the last
    registered operator's properties change, then Blender undoes back to before that
    operator's own undo step and runs it again (`ed.undo_redo`, with undo as from the UI, so
    the repeat pushes its step). It needs a region."""
    wm = bpy.context.window_manager
    window = wm.windows[0]
    area = next(a for a in window.screen.areas if a.type == "VIEW_3D")
    region = next(r for r in area.regions if r.type == "WINDOW")
    for name, value in values.items():
        setattr(wm.operators[-1].properties, name, value)
    with bpy.context.temp_override(window=window, screen=window.screen, area=area, region=region):
        assert bpy.ops.ed.undo_redo.poll()
        bpy.ops.ed.undo_redo("EXEC_DEFAULT", True)


def test_an_answer_survives_adjusting_the_operation_the_user_made_before_it(
    armature, scripted_service
):
    # The answer's undo step is the last operation: F9 adjusts it (nothing to adjust), not the
    # cube the user added before the answer came, which would undo the answer with the cube.
    address, _ = scripted_service
    use_service(address)
    bpy.ops.ed.undo_push(message="before")
    bpy.ops.mesh.primitive_cube_add("EXEC_DEFAULT", True, size=1.0)  # undo: as from the UI
    bpy.context.scene.chatpose.prompt = "after the cube"
    bpy.ops.chatpose.send()
    drive(idle)
    assert_pose(bpy.data.objects["SMPL"], pose_for("after the cube"))
    wm = bpy.context.window_manager
    assert [op.bl_idname for op in wm.operators][-3:] == [
        "MESH_OT_primitive_cube_add",
        "CHATPOSE_OT_chat_step",  # its exchange in the history
        "CHATPOSE_OT_answer_step",  # its poses
    ]
    _adjust_last_operation()
    assert_pose(bpy.data.objects["SMPL"], pose_for("after the cube"))
    bpy.ops.ed.undo()  # the poses are still one undo step
    np.testing.assert_allclose(read_pose(bpy.data.objects["SMPL"]).axis_angle, 0, atol=1e-6)
    assert "Cube" in bpy.data.objects
