"""`chatpose demo`, what `make demo` runs: the whole system end to end on the bundled demo model.

1. starts `chatpose-serve` with the checkpoint on a free loopback port, as a child process
   whose log goes to OUT/chatpose-serve.log (the add-on's own `ServiceProcess`);
2. renders a reference picture of the add-on's mannequin in a known pose (Blender's Workbench),
   the input of the image prompt;
3. sends through the real ZeroMQ protocol (`shared_protocol.client.Client`): a pose prompt, a
   chat turn, the image, and a short batch streamed item by item;
4. in headless Blender (bpy) builds the add-on's SMPL armature with its mannequin mesh: the
   batch keyed on it as an animation, each single answer on an armature of its own beside it;
5. writes OUT/demo.blend, OUT/contact_sheet.png (one panel per prompt, the prompt under it),
   OUT/animation.npz (AMASS layout, read back from the keys) and OUT/reference.png;
6. stops the service, also when a step fails.

Blender runs in this process (bpy); torch only in the service's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inference_service.commands import EXIT_USAGE
from shared_protocol.client import Client
from shared_protocol.pose import Pose
from shared_protocol.protocol import (
    BatchItemReply,
    BatchRequest,
    ErrorCode,
    ErrorReply,
    PoseReply,
    PoseRequest,
    ProtocolError,
    StatusReply,
    readable_text,
)

# Waiting for the service to answer at all; once it answers that its model is loading, it is
# waited for as long as the load takes (the demo model takes seconds, a 13B one minutes).
READY_TIMEOUT_S = 180.0
LOADING_NOTE_EVERY_S = 30.0  # how often a long load is said, so that a hung one shows
STOP_TIMEOUT_S = 15.0


class DemoError(Exception):
    """A step of the demo could not run; the message says which and why."""


class DemoSetupError(DemoError):
    """What the demo needs is not installed (bpy, the add-on's modules): the setup's to mend."""


class DemoConfigError(DemoError):
    """chatpose-serve refused what the demo gave it (--checkpoint, --device)."""


class DemoOutputError(DemoError):
    """A file the demo writes could not be written (a full disk, a folder in its place)."""


# What chatpose-serve imports to run the model (pyproject's `service` extra).
SERVICE_MODULES = ("torch", "transformers", "PIL", "safetensors")
# What writing a file raises: OSError from Python, RuntimeError from Blender's operators.
WRITE_ERRORS = (OSError, RuntimeError)


@dataclass(frozen=True)
class DemoScript:
    """What the demo asks. The demo model knows the synthetic corpus's actions and phrasings
    (docs/evaluation.md), not language at large, so the prompts stay close to them."""

    pose_prompt: str = "The person kneels on the right knee."
    chat_prompt: str = "Show me someone standing with their hands on their hips."
    image_prompt: str = ""  # image only: the service asks for the pose in the picture
    image_action: str = "raise_left_arm"  # the pose the reference picture shows
    image_yaw_deg: float = 20.0  # seen a little from the body's left
    image_pitch_deg: float = 8.0
    batch_prompts: tuple[str, ...] = (
        "Stand in a T-pose.",
        "Raise your left arm above your head.",
        "Raise both arms above your head.",
        "The person squats down.",
        "The person bends forward at the hips.",
    )
    frame_step: int = 12  # frames between batch keys
    fps: int = 24


@dataclass
class Answer:
    """One prompt and what came back."""

    kind: str  # "pose", "chat", "image" or "batch"
    prompt: str
    text: str = ""
    poses: tuple[Pose, ...] = ()
    error: str = ""
    code: ErrorCode | None = None  # the error's, for the exit code

    @property
    def caption(self) -> str:
        line = f"{self.kind}: {self.prompt or '(the picture alone)'}"
        if self.error:
            return f"{line} [failed: {self.error}]"
        if not self.poses:
            line += " [no pose in the reply]"
        if self.kind == "chat" and self.text:
            reply = " ".join(readable_text(self.text).split())
            line += f' reply: "{reply if len(reply) <= 60 else reply[:57] + "..."}"'
        return line


@dataclass
class DemoResult:
    out: Path
    blend: Path
    contact_sheet: Path
    animation: Path | None  # None when the batch got no pose
    reference: Path
    panels: Path  # each answer's picture alone
    service_log: Path
    address: str  # where the service listened
    answers: list[Answer] = field(default_factory=list)
    keyed_frames: list[int] = field(default_factory=list)


# --- the service --------------------------------------------------------------------------------


def free_loopback_address() -> str:
    """A loopback address on a port free now (the demo must not take a running service's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


class LocalService:
    """`chatpose-serve` in a child process for the length of a `with` block; stopped (SIGTERM,
    then killed after a grace time) on the way out, whatever happened inside."""

    def __init__(self, checkpoint: Path, log_dir: Path, device: str = "cpu"):
        from .addon_import import ensure_addon_importable

        ensure_addon_importable()
        from blender_addon.core.service_process import ServiceProcess, child_environment

        self.checkpoint = checkpoint
        self.device = device
        self.address = free_loopback_address()
        self.process = ServiceProcess(str(log_dir))
        self.log_path = Path(self.process.log_path)
        self._environment = child_environment(dict(os.environ))

    def __enter__(self) -> LocalService:
        from blender_addon.core.service_process import ServiceProcessError, serve_command

        argv = serve_command(sys.executable, str(self.checkpoint), self.address, self.device)
        try:
            self.process.start(argv, env=self._environment)
        except ServiceProcessError as exc:
            raise DemoError(f"could not start chatpose-serve: {exc}") from None
        return self

    def __exit__(self, *exc_info) -> None:
        self.process.stop(wait=True, timeout_s=STOP_TIMEOUT_S)

    def wait_ready(self, client: Client, timeout_s: float = READY_TIMEOUT_S) -> StatusReply:
        """The service's status once it serves; DemoError when it exits, or when it has not
        answered for ``timeout_s`` (loading, it answers `busy`: waited for)."""

        def gone() -> str | None:
            state = self.process.poll()
            return None if state.alive else f"chatpose-serve {state.describe()}"

        try:
            return client.wait_serving(timeout_s, gone=gone, loading=loading_notes(_say))
        except ProtocolError as exc:
            state = self.process.poll()
            if not state.alive and state.returncode == EXIT_USAGE:  # not the service's failure
                raise DemoConfigError(
                    f"chatpose-serve {state.describe()} (log: {self.log_path})"
                ) from None
            raise DemoError(f"{exc} (log: {self.log_path})") from None


def loading_notes(
    say: Callable[[str], None], every_s: float = LOADING_NOTE_EVERY_S
) -> Callable[[str], None]:
    """What `Client.wait_serving` calls with each `busy` reply while the model loads: says so
    to ``say`` every ``every_s`` seconds, and how to stop waiting."""
    started = time.monotonic()
    next_note = started + every_s

    def note(_message: str) -> None:
        nonlocal next_note
        now = time.monotonic()
        if now >= next_note:
            next_note = now + every_s
            say(
                f"chatpose-serve is still loading the model ({now - started:.0f} s so far); "
                "Ctrl-C stops the demo"
            )

    return note


def ask(client: Client, script: DemoScript, reference: bytes, timeout_s: float) -> list[Answer]:
    """The demo's requests, in order: pose, chat, image, then the batch item by item. A failed
    request, one that timed out included, is kept as an Answer with its error, so the others
    still show; once the service is unreachable the rest are not sent."""
    singles = [
        ("pose", script.pose_prompt, (), "pose"),
        ("chat", script.chat_prompt, (), "chat"),
        ("image", script.image_prompt, (reference,), "pose"),
    ]
    answers = []
    gone = None  # why the service cannot be reached any more
    for kind, prompt, images, mode in singles:
        if gone:
            answers.append(Answer(kind, prompt, error=gone, code=ErrorCode.UNREACHABLE))
            continue
        request = PoseRequest(client.new_id(), prompt, images=images, mode=mode)
        try:
            reply = client.request(request, timeout_s)
        except ProtocolError as exc:
            reply = ErrorReply(request.id, request.op, exc.code, exc.message, None)
            gone = _error_text(reply) if exc.code == ErrorCode.UNREACHABLE else None
        if isinstance(reply, PoseReply):
            answers.append(Answer(kind, prompt, reply.text, reply.poses))
        else:
            answers.append(Answer(kind, prompt, error=_error_text(reply), code=reply.code))
        _say(answers[-1].caption)
    batch = [
        Answer("batch", prompt, error=gone, code=ErrorCode.UNREACHABLE if gone else None)
        for prompt in script.batch_prompts
    ]
    if not gone:
        request = BatchRequest(client.new_id(), tuple(script.batch_prompts))
        try:
            for reply in client.stream(request, timeout_s):
                if isinstance(reply, BatchItemReply):
                    batch[reply.index].text, batch[reply.index].poses = reply.text, reply.poses
                elif isinstance(reply, ErrorReply) and reply.index is not None:
                    batch[reply.index].error = _error_text(reply)
                    batch[reply.index].code = reply.code
                elif isinstance(reply, ErrorReply):
                    raise ProtocolError(reply.code, reply.message)
        except ProtocolError as exc:
            for answer in batch:
                if not answer.poses and not answer.error:
                    answer.error = f"{exc.code.value}: {exc.message}"
                    answer.code = exc.code
    for k, answer in enumerate(batch, start=1):
        _say(f"{answer.caption} ({k} of {len(batch)})")
    return answers + batch


def _error_text(reply) -> str:
    return f"{reply.code.value}: {reply.message}" if isinstance(reply, ErrorReply) else str(reply)


# --- Blender ------------------------------------------------------------------------------------


class DemoScene:
    """The Blender side: a fresh scene with the add-on's armature and mannequin (the one
    `render_pairs.MannequinRenderer` renders), the reference picture, the panels, the keys and
    the saved files."""

    def __init__(self, size: int):
        from .training.render_pairs import MannequinRenderer

        self.renderer = MannequinRenderer(size)
        self.bpy = self.renderer.bpy
        self.armature = self.renderer.armature
        old_name, self.armature.name = self.armature.name, "ChatPose batch"
        self._labels: dict[int, str] = {}  # each batch frame's prompt (`build`)
        for child in self.armature.children:  # its mannequin, named after it
            child.name = child.name.replace(old_name, self.armature.name, 1)

    def reference_picture(self, script: DemoScript, path: Path) -> bytes:
        from .training.actions import ACTIONS
        from .training.render_pairs import CameraView

        pose = ACTIONS[script.image_action]()
        view = CameraView(script.image_yaw_deg, script.image_pitch_deg, 1.1, 0.2)
        try:
            self.renderer.render(pose, view, path)
            return path.read_bytes()
        except WRITE_ERRORS as exc:
            raise DemoOutputError(f"could not write the reference picture {path} ({exc})") from None

    def panels(self, answers: Sequence[Answer], folder: Path) -> list[Path | None]:
        """A picture of each answer's first pose from a fixed three-quarter view (None when the
        answer has no pose)."""
        from .training.render_pairs import fixed_view

        folder.mkdir(parents=True, exist_ok=True)
        for earlier in folder.glob("[0-9][0-9]_*.png"):  # an earlier run's, of other answers
            earlier.unlink()
        pictures: list[Path | None] = []
        with self._mannequin_alone():
            for k, answer in enumerate(answers):
                if not answer.poses:
                    pictures.append(None)
                    continue
                path = folder / f"{k:02d}_{answer.kind}.png"
                self.renderer.render(answer.poses[0].axis_angle, fixed_view(), path)
                pictures.append(path)
        return pictures

    @contextlib.contextmanager
    def _mannequin_alone(self) -> Iterator[None]:
        """After `build`, the batch's keys would put their pose back on the mannequin at render
        time, and the other answers' armatures would stand in the picture: while the panels
        are drawn, the mannequin has no action and the others are out of the render."""
        mannequin = self.armature
        anim = mannequin.animation_data
        action = anim.action if anim is not None else None
        keep = {mannequin, *mannequin.children_recursive}
        others = [
            o
            for o in self.bpy.context.scene.objects
            if o.type in {"ARMATURE", "MESH"} and o not in keep and not o.hide_render
        ]
        if anim is not None:
            anim.action = None
        for obj in others:
            obj.hide_render = True
        try:
            yield
        finally:
            for obj in others:
                obj.hide_render = False
            if anim is not None:
                anim.action = action

    def build(self, answers: Sequence[Answer], script: DemoScript) -> list[int]:
        """Keys the batch on the main armature and puts each single answer on an armature of its
        own, side by side; returns the keyed frames. Every pose stands on the floor, as the
        add-on's Keep on Floor puts it: the answers carry no translation, and a kneeling one
        would float at standing height."""
        addon = _addon()

        bpy, scene = self.bpy, self.bpy.context.scene
        singles = [a for a in answers if a.kind != "batch"]
        for k, answer in enumerate(singles, start=1):
            for j, pose in enumerate(answer.poses):
                obj = addon.create_smpl_armature(
                    bpy.context,
                    name=f"ChatPose {answer.kind}" + (f" {j + 1}" if j else ""),
                    location=(1.2 * k, 0.8 * j, 0.0),
                )
                (placed,) = addon.placed_on_floor(obj, [pose])
                addon.apply_pose(obj, placed, use_translation=True)
        batch = [a for a in answers if a.kind == "batch" and a.poses]
        frames = [1 + script.frame_step * i for i in range(len(batch))]
        self._labels = {frame: a.prompt for frame, a in zip(frames, batch, strict=True)}
        if batch:
            poses = addon.placed_on_floor(self.armature, [a.poses[0] for a in batch])
            addon.key_poses(self.armature, poses, frames, use_translation=True)
            scene.frame_start, scene.frame_end = frames[0], frames[-1]
        scene.render.fps = script.fps
        scene.frame_set(scene.frame_start)
        self._frame_everything()
        return frames

    def _frame_everything(self) -> None:
        """Points the scene camera at all the armatures, for whoever opens the .blend."""
        from mathutils import Vector

        objects = [o for o in self.bpy.context.scene.objects if o.type == "ARMATURE"]
        centre = sum((o.matrix_world.translation for o in objects), Vector()) / len(objects)
        camera = self.renderer.camera
        camera.location = centre + Vector((0.0, -6.0, 1.5))
        camera.rotation_euler = (
            (centre + Vector((0, 0, 0.9)) - camera.location).to_track_quat("-Z", "Y").to_euler()
        )

    def save(self, blend: Path, animation: Path | None, script: DemoScript) -> None:
        """The scene, and the batch's animation when it has keys (None: no batch pose);
        DemoOutputError naming the file that could not be written."""
        if animation is not None:
            try:
                _addon().export_npz(self.armature, animation, fps=script.fps, labels=self._labels)
            except WRITE_ERRORS as exc:
                raise DemoOutputError(f"could not write {animation} ({exc})") from None
        try:
            self.bpy.ops.wm.save_as_mainfile(filepath=str(blend))
        except WRITE_ERRORS as exc:
            why = str(exc).strip()  # Blender's message ends in a newline
            if "No such file or directory" in why:  # Blender's words for a full disk too
                why += "; a full disk, or no write access?"
            written = f"; written: {animation}" if animation is not None else ""
            raise DemoOutputError(f"could not save {blend} ({why}){written}") from None


@dataclass(frozen=True)
class _AddonFunctions:
    create_smpl_armature: Callable
    apply_pose: Callable
    key_poses: Callable
    export_npz: Callable
    placed_on_floor: Callable


def _addon() -> _AddonFunctions:
    from .addon_import import ensure_addon_importable

    ensure_addon_importable()
    from blender_addon.blender.armature import create_smpl_armature
    from blender_addon.blender.keyframes import export_npz, key_poses
    from blender_addon.blender.posing import apply_pose, placed_on_floor

    return _AddonFunctions(create_smpl_armature, apply_pose, key_poses, export_npz, placed_on_floor)


# --- the contact sheet --------------------------------------------------------------------------


def contact_sheet(
    pictures: Sequence[Path | None],
    captions: Sequence[str],
    path: Path,
    *,
    panel: int,
    inset: dict[int, Path] | None = None,
    columns: int = 4,
) -> Path:
    """One panel per picture with its caption under it (a grey panel where there is none);
    `inset` puts a small picture in a panel's corner (the image prompt's reference)."""
    from PIL import Image, ImageDraw, ImageFont

    font_size = max(10, panel // 18)
    try:
        font = ImageFont.load_default(size=font_size)
    except (OSError, TypeError, ValueError):  # a Pillow built without FreeType
        font = ImageFont.load_default()
    chars_per_line = max(12, int(panel / (0.55 * font_size)))
    wrapped = [textwrap.wrap(c, chars_per_line)[:5] for c in captions]
    caption_height = int(font_size * 1.3) * max(map(len, wrapped), default=1) + font_size
    columns = max(1, min(columns, len(pictures)))
    rows = math.ceil(len(pictures) / columns)
    sheet = Image.new("RGB", (columns * panel, rows * (panel + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (picture, lines) in enumerate(zip(pictures, wrapped, strict=True)):
        x, y = (k % columns) * panel, (k // columns) * (panel + caption_height)
        if picture is None:
            draw.rectangle((x, y, x + panel - 1, y + panel - 1), fill=(200, 200, 200))
        else:
            with Image.open(picture) as image:
                sheet.paste(image.convert("RGB").resize((panel, panel)), (x, y))
        if inset and k in inset:
            side = panel // 3
            with Image.open(inset[k]) as image:
                sheet.paste(image.convert("RGB").resize((side, side)), (x + 2, y + 2))
            draw.rectangle((x + 2, y + 2, x + 2 + side, y + 2 + side), outline="white")
        for i, line in enumerate(lines):
            draw.text((x + 4, y + panel + 4 + i * int(font_size * 1.3)), line, "black", font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# --- the whole demo -----------------------------------------------------------------------------


def _check_setup(checkpoint: Path) -> None:
    """DemoError or DemoSetupError, before anything starts, for what the demo cannot run
    without: the checkpoint, headless Blender, the service's packages, the add-on."""
    if not (checkpoint / "chatpose.json").is_file():
        raise DemoError(f"no checkpoint at {checkpoint} (chatpose.json missing)")
    try:
        import bpy  # noqa: F401
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "bpy":
            raise DemoSetupError(
                "bpy is not installed: the demo needs the project's `blender` extra (make setup)"
            ) from None
        # Installed, but something it loads is missing: a system library, most often.
        raise DemoSetupError(
            f"headless Blender (bpy) cannot start: {exc}; a minimal Linux lacks the X11 and "
            "OpenGL libraries it loads (README.md, Setup in detail, lists them)"
        ) from None
    for module in SERVICE_MODULES:  # the service would exit 2 for it, as for a bad checkpoint
        if importlib.util.find_spec(module) is None:
            from .cli import missing_service_package

            raise DemoSetupError(missing_service_package(ModuleNotFoundError(name=module)))
    try:
        from .addon_import import ensure_addon_importable

        ensure_addon_importable()
    except ImportError as exc:  # installed from a wheel: the add-on ships apart (a Blender zip)
        raise DemoSetupError(str(exc)) from None


def run_demo(
    checkpoint: Path,
    out: Path,
    *,
    script: DemoScript | None = None,
    size: int = 256,
    device: str = "cpu",
    timeout_s: float = 120.0,
) -> DemoResult:
    """Runs every step (module docstring); raises DemoError or ProtocolError on a failure,
    after stopping the service."""
    script = script or DemoScript()
    checkpoint, out = Path(checkpoint), Path(out)
    _check_setup(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    service = LocalService(checkpoint, out, device)
    result = DemoResult(
        out=out,
        blend=out / "demo.blend",
        contact_sheet=out / "contact_sheet.png",
        animation=out / "animation.npz",
        reference=out / "reference.png",
        panels=out / "panels",
        service_log=service.log_path,
        address=service.address,
    )
    _say(f"starting chatpose-serve on {service.address} with {checkpoint}")
    with service, Client(service.address) as client:
        scene = DemoScene(size)
        reference = scene.reference_picture(script, result.reference)
        status = service.wait_ready(client)
        _say(f"service ready: {status.model} on {status.device} ({status.dtype})")
        result.answers = ask(client, script, reference, timeout_s)
        state = service.process.poll()
        if not state.alive:  # it died under the demo: say how, and where its log is
            for answer in result.answers:
                if answer.error:
                    answer.error += f" (chatpose-serve {state.describe()}; log: {service.log_path})"
    _say("service stopped")
    # What needs no rendering is written first, so a rendering failure loses neither.
    result.keyed_frames = scene.build(result.answers, script)
    if not result.keyed_frames:  # no batch pose: no animation, nor an earlier run's
        result.animation.unlink(missing_ok=True)
        result.animation = None
    scene.save(result.blend, result.animation, script)
    try:
        pictures = scene.panels(result.answers, result.panels)
        image_panel = {
            k: result.reference for k, a in enumerate(result.answers) if a.kind == "image"
        }
        contact_sheet(
            pictures, [a.caption for a in result.answers], result.contact_sheet, panel=size,
            inset=image_panel,
        )  # fmt: skip
    except (RuntimeError, OSError, ValueError) as exc:
        raise DemoError(
            f"rendering the panels failed ({exc}); written: "
            + " and ".join(str(f) for f in (result.blend, result.animation) if f)
        ) from None
    return result


def _say(message: str) -> None:
    if sys.stderr is not None:  # closed (`2>&-`): print would write to stdout instead
        print(f"[demo] {message}", file=sys.stderr, flush=True)
