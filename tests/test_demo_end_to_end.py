"""`chatpose demo` end to end at reduced size: a real chatpose-serve child process on loopback
with a tiny model, real ZeroMQ requests, headless Blender, and the files it writes."""

from __future__ import annotations

import builtins
import importlib.util
import json
import sys

import bpy
import numpy as np
import pytest

from inference_service import cli, demo, serve
from shared_protocol.client import Client
from shared_protocol.pose import Motion, Pose
from shared_protocol.protocol import ErrorCode, ProtocolError, StatusRequest

SCRIPT = demo.DemoScript(
    batch_prompts=("Stand in a T-pose.", "Raise your left arm.", "The person squats down."),
    frame_step=5,
    fps=20,
)
PANEL = 48


@pytest.fixture(scope="module")
def demo_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-out")
    return demo.run_demo(tiny_checkpoint, out, script=SCRIPT, size=PANEL, timeout_s=60)


def assert_service_gone(address: str) -> None:
    with Client(address) as client, pytest.raises(ProtocolError) as info:
        client.request(StatusRequest(client.new_id()), timeout_s=1.0)
    assert info.value.code == ErrorCode.UNREACHABLE


def test_every_prompt_goes_through_the_service(demo_run):
    kinds = [a.kind for a in demo_run.answers]
    assert kinds == ["pose", "chat", "image", "batch", "batch", "batch"]
    assert [a.prompt for a in demo_run.answers[3:]] == list(SCRIPT.batch_prompts)
    assert all(not a.error for a in demo_run.answers)
    # The fast path always yields one pose; a random tiny model's free chat may yield none.
    for answer in demo_run.answers:
        if answer.kind != "chat":
            assert len(answer.poses) == 1, answer
    assert demo_run.reference.read_bytes().startswith(b"\x89PNG")


def test_the_service_is_stopped_afterwards_and_logged_its_work(demo_run):
    assert_service_gone(demo_run.address)
    events = [json.loads(line) for line in demo_run.service_log.read_text().splitlines()]
    ops = [e.get("op") for e in events if e.get("event") == "request"]
    assert ops.count("pose") == 3 and ops.count("batch") == 1
    assert events[-1]["event"] == "stop"


def test_each_answer_with_a_pose_has_its_own_panel_picture(demo_run):
    posed = [a for a in demo_run.answers if a.poses]
    assert len(list(demo_run.panels.glob("*.png"))) == len(posed) > 0


def test_each_panel_shows_its_answer_s_pose_on_the_mannequin_alone(demo_run, tmp_path):
    # The panels are drawn after the scene is built: the batch's keys and the other answers'
    # armatures must not get into them. Each must be what the mannequin alone renders.
    from PIL import Image

    from inference_service.training.render_pairs import MannequinRenderer, fixed_view

    renderer = MannequinRenderer(PANEL)
    for k, answer in enumerate(demo_run.answers):
        if not answer.poses:
            continue
        alone = tmp_path / f"{k}.png"
        renderer.render(answer.poses[0].axis_angle, fixed_view(), alone)
        with (
            Image.open(demo_run.panels / f"{k:02d}_{answer.kind}.png") as got,
            Image.open(alone) as want,
        ):
            difference = np.abs(np.asarray(got, float) - np.asarray(want, float)).mean()
        assert difference < 1.0, (k, answer.kind, difference)


def test_the_animation_npz_holds_the_batch_poses(demo_run):
    motion = Motion.load_npz(demo_run.animation)
    expected = np.stack([a.poses[0].axis_angle for a in demo_run.answers if a.kind == "batch"])
    got = np.stack([p.axis_angle for p in motion.poses()])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert motion.fps == pytest.approx(SCRIPT.fps / SCRIPT.frame_step)
    assert motion.labels == tuple(a.prompt for a in demo_run.answers if a.kind == "batch")


def test_the_blend_file_reloads_with_the_keyed_batch_and_every_answer(demo_run):
    from blender_addon.blender.keyframes import keyed_frames
    from blender_addon.blender.posing import read_pose

    assert demo_run.keyed_frames == [1, 6, 11]
    bpy.ops.wm.open_mainfile(filepath=str(demo_run.blend))
    try:
        animated = bpy.data.objects["ChatPose batch"]
        assert keyed_frames(animated) == [1, 6, 11]
        assert [c.name for c in animated.children] == ["ChatPose batch_mannequin"]
        batch = [a for a in demo_run.answers if a.kind == "batch"]
        for frame, answer in zip([1, 6, 11], batch, strict=True):
            np.testing.assert_allclose(
                read_pose(animated, frame).axis_angle, answer.poses[0].axis_angle, atol=1e-5
            )
        assert bpy.context.scene.frame_start == 1 and bpy.context.scene.frame_end == 11
        for answer in demo_run.answers[:3]:
            if answer.poses:
                obj = bpy.data.objects[f"ChatPose {answer.kind}"]
                assert any(c.type == "MESH" for c in obj.children)  # the mannequin
                np.testing.assert_allclose(
                    read_pose(obj).axis_angle, answer.poses[0].axis_angle, atol=1e-5
                )
        # Every figure's mannequin on the floor, z = 0, where its soles are at rest (the
        # answers carry no translation: a kneeling one stayed at standing height). Within the
        # capsules' facets (12 around, 4 rings a half).
        bpy.context.scene.frame_set(6)
        depsgraph = bpy.context.evaluated_depsgraph_get()
        for obj in (o for o in bpy.data.objects if o.type == "ARMATURE"):
            [mesh] = [c.evaluated_get(depsgraph) for c in obj.children if c.type == "MESH"]
            posed = mesh.to_mesh()
            lowest = min((mesh.matrix_world @ v.co).z for v in posed.vertices)
            mesh.to_mesh_clear()
            assert lowest == pytest.approx(0.0, abs=4e-3), obj.name
    finally:
        bpy.ops.wm.read_factory_settings(use_empty=True)


def test_the_contact_sheet_has_a_panel_per_prompt_with_its_caption(demo_run):
    from PIL import Image

    with Image.open(demo_run.contact_sheet) as sheet:
        width, height = sheet.size
        pixels = np.asarray(sheet.convert("RGB"), dtype=np.int16)
    assert width == 4 * PANEL  # six panels: four columns, two rows
    caption = (height - 2 * PANEL) // 2
    assert caption > 0 and height == 2 * (PANEL + caption)
    # Under each panel, in its caption band, there is dark text on white.
    for k in range(6):
        x, y = (k % 4) * PANEL, (k // 4) * (PANEL + caption) + PANEL
        band = pixels[y : y + caption, x : x + PANEL]
        assert (band.sum(axis=2) < 200).sum() > 10, f"panel {k} has no caption"
    # A posed panel shows the grey mannequin, not a blank.
    first = pixels[PANEL // 3 : PANEL, PANEL // 3 : 2 * PANEL // 3]
    assert first.std() > 3


def test_the_service_stops_even_when_a_step_fails(tiny_checkpoint, tmp_path, monkeypatch):
    seen = {}

    def broken_ask(client, script, reference, timeout_s):
        seen["address"] = client.address
        raise RuntimeError("a step failed")

    monkeypatch.setattr(demo, "ask", broken_ask)
    with pytest.raises(RuntimeError, match="a step failed"):
        demo.run_demo(tiny_checkpoint, tmp_path, script=SCRIPT, size=PANEL)
    assert_service_gone(seen["address"])


def test_a_checkpoint_the_service_cannot_load_is_bad_input_not_a_hang(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "chatpose.json").write_text("{not json")
    code = cli.main(["demo", "--checkpoint", str(broken), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT  # as `chatpose pose --local` says of it
    assert "chatpose-serve exited with code 2" in err and "chatpose-serve.log" in err
    assert "chatpose.json" in err and "unreachable" not in err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    code = cli.main(["demo", "--checkpoint", str(tmp_path / "nowhere")])
    assert code == cli.EXIT_BAD_INPUT
    assert "nowhere" in capsys.readouterr().err


def test_a_missing_service_package_is_named_before_the_service_starts(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    # chatpose-serve would exit 2 for it, as for a checkpoint it cannot load: not bad input.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch" else find_spec(name, *a),
    )
    started = []
    monkeypatch.setattr(demo.LocalService, "__enter__", lambda self: started.append(self))
    argv = ["demo", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "needs the 'torch' package" in capsys.readouterr().err and not started


def test_without_the_bundled_model_the_demo_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve, "DEMO_CHECKPOINT", tmp_path / "demo_checkpoint")
    assert cli.main(["demo"]) == cli.EXIT_NOT_BUILT
    assert "make demo-model" in capsys.readouterr().err


class _FailingClient:
    """Answers the first pose request, then finds the service gone."""

    def __init__(self):
        self.calls = 0

    def new_id(self):
        return f"id-{self.calls}"

    def request(self, request, timeout_s):
        from shared_protocol.pose import Pose
        from shared_protocol.protocol import PoseReply

        self.calls += 1
        if self.calls == 1:
            return PoseReply(request.id, "Sure, it is <POSE>.", (Pose(np.zeros((24, 3))),))
        raise ProtocolError(ErrorCode.UNREACHABLE, "no service at tcp://127.0.0.1:9")

    def stream(self, request, timeout_s):
        raise AssertionError("nothing more is sent to a service that is gone")


def test_answers_already_received_are_kept_when_the_service_goes():
    client = _FailingClient()
    answers = demo.ask(client, SCRIPT, b"", timeout_s=1.0)
    assert [a.kind for a in answers] == ["pose", "chat", "image", "batch", "batch", "batch"]
    assert answers[0].poses and not answers[0].error
    assert all("unreachable: no service" in a.error for a in answers[1:])
    assert client.calls == 2  # the image request was not sent after the chat one failed


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (ModuleNotFoundError("No module named 'bpy'", name="bpy"), "bpy is not installed"),
        (ModuleNotFoundError("No module named 'numpy'", name="numpy"), "bpy\\) cannot start"),
        (
            ImportError("libXi.so.6: cannot open shared object file: No such file or directory"),
            "bpy\\) cannot start: libXi.so.6: cannot open .* X11 and OpenGL libraries",
        ),
    ],
)
def test_a_blender_that_cannot_start_is_named_before_the_service_starts(
    tiny_checkpoint, tmp_path, monkeypatch, failure, message
):
    monkeypatch.delitem(sys.modules, "bpy")
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "bpy":
            raise failure
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    monkeypatch.setattr(demo, "LocalService", None)  # would fail the test if it were started
    with pytest.raises(demo.DemoError, match=message):
        demo.run_demo(tiny_checkpoint, tmp_path, script=SCRIPT, size=PANEL, timeout_s=60)


def test_a_rendering_failure_still_leaves_the_blend_and_the_animation(
    tiny_checkpoint, tmp_path, monkeypatch
):
    def broken_panels(self, answers, folder):
        raise RuntimeError("the renderer failed")

    monkeypatch.setattr(demo.DemoScene, "panels", broken_panels)
    with pytest.raises(
        demo.DemoError,
        match="rendering the panels failed .*; written: .*demo.blend and .*animation.npz",
    ):
        demo.run_demo(tiny_checkpoint, tmp_path, script=SCRIPT, size=PANEL, timeout_s=60)
    assert (tmp_path / "demo.blend").is_file() and (tmp_path / "animation.npz").is_file()


@pytest.mark.parametrize("blocked", ["reference.png", "demo.blend"])
def test_a_file_the_demo_cannot_write_is_named_and_the_service_stops(
    tiny_checkpoint, tmp_path, monkeypatch, capsys, blocked
):
    (tmp_path / blocked).mkdir()  # a folder where the file goes: as a full disk, it cannot be
    seen = {}
    ask = demo.ask

    def asking(client, script, reference, timeout_s):
        seen["address"] = client.address
        return ask(client, script, reference, timeout_s)

    monkeypatch.setattr(demo, "ask", asking)
    monkeypatch.setattr(demo, "DemoScript", lambda: SCRIPT)
    argv = ["demo", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)]
    assert cli.main([*argv, "--size", str(PANEL), "--timeout", "60"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"could not {'write the reference picture' if 'png' in blocked else 'save'}" in err
    assert str(tmp_path / blocked) in err and "Traceback" not in err
    if blocked == "demo.blend":  # what was written before it is named
        assert f"written: {tmp_path / 'animation.npz'}" in err
        # Blender's reason as it says it, on one line, and no guess at another one.
        assert "is a directory)" in err and "full disk" not in err
        assert_service_gone(seen["address"])


def test_a_demo_whose_requests_time_out_exits_as_a_timeout_and_leaves_no_stale_output(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    (tmp_path / "panels").mkdir()
    (tmp_path / "panels" / "05_batch.png").write_bytes(b"an earlier run's picture")
    Motion.from_poses([Pose(np.zeros((24, 3)))]).save_npz(tmp_path / "animation.npz")

    def nothing_in_time(client, script, reference, timeout_s):
        prompts = [("pose", script.pose_prompt), *(("batch", p) for p in script.batch_prompts)]
        error = "timeout: no answer within 0.001 s"
        return [demo.Answer(k, p, error=error, code=ErrorCode.TIMEOUT) for k, p in prompts]

    monkeypatch.setattr(demo, "ask", nothing_in_time)
    monkeypatch.setattr(demo, "DemoScript", lambda: SCRIPT)
    argv = ["demo", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)]
    assert cli.main([*argv, "--size", str(PANEL)]) == cli.EXIT_TIMEOUT
    out = capsys.readouterr().out
    assert "(no animation.npz: the batch got no pose)" in out
    assert not (tmp_path / "animation.npz").exists()
    assert not list((tmp_path / "panels").iterdir())  # no answer has a picture
    assert (tmp_path / "demo.blend").is_file() and (tmp_path / "contact_sheet.png").is_file()


def test_exit_codes_of_several_failures_name_what_they_share():
    assert cli.exit_code_for_all([]) == cli.EXIT_OK
    assert cli.exit_code_for_all([ErrorCode.TIMEOUT] * 2) == cli.EXIT_TIMEOUT
    assert cli.exit_code_for_all([ErrorCode.EMPTY_PROMPT, ErrorCode.TOO_LARGE]) == 4
    assert cli.exit_code_for_all([ErrorCode.TIMEOUT, ErrorCode.TOO_LARGE]) == 7
