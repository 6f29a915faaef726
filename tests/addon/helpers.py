"""Shared helpers of the bpy tests: random poses and the forward-kinematics check."""

from __future__ import annotations

import types

import bpy
import numpy as np
from mathutils import Euler, Matrix

from shared_protocol.pose import Pose
from shared_protocol.skeleton import JOINT_NAMES

from .reference import expected_heads

FK_TOLERANCE = 1e-4  # metres


def random_pose(seed: int, max_angle: float = np.pi / 2, translation: bool = True) -> Pose:
    """Random axes, angles up to ``max_angle`` on every joint; a random root translation."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(24, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    aa = axes * rng.uniform(0, max_angle, size=(24, 1))
    return Pose(aa, rng.normal(size=3) * 0.5 if translation else None)


def world_heads(obj) -> np.ndarray:
    """(24, 3) pose-bone heads in world space, in SMPL joint order."""
    bpy.context.view_layer.update()
    return np.array([tuple(obj.matrix_world @ obj.pose.bones[n].head) for n in JOINT_NAMES])


def fk_error(obj, pose: Pose, rest=None) -> float:
    """Max distance (m) between the bone heads and the pose's forward kinematics, in world space."""
    bpy.context.view_layer.update()  # matrix_world too
    expected = expected_heads(pose.axis_angle, rest, pose.translation, np.array(obj.matrix_world))
    return float(np.abs(world_heads(obj) - expected).max())


def transform(obj) -> None:
    """Rotated, uniformly scaled and moved."""
    obj.matrix_world = Matrix.LocRotScale((1.5, -2.0, 0.7), Euler((0.4, -0.3, 2.1)), (1.8,) * 3)


class FakeLayout:
    """Stands in for UILayout in draw tests: records operators, properties and labels, and
    checks that every property drawn exists on its data."""

    def __init__(self, calls: list, buttons: list | None = None, icons: list | None = None):
        self.calls = calls
        self.buttons = [] if buttons is None else buttons  # (idname, text, properties)
        self.icons = [] if icons is None else icons  # (label text, its icon)
        self.enabled = True
        self.active = True

    def _child(self, *_, **__):
        return self

    column = row = box = split = column_flow = grid_flow = _child

    def operator(self, idname, **kwargs):
        self.calls.append(("operator", idname))
        properties = types.SimpleNamespace()  # the button's, which draw may set
        self.buttons.append((idname, kwargs.get("text"), properties))
        return properties

    def prop(self, data, name, **_):
        rna = getattr(data, "bl_rna", None)
        assert rna is None or rna.properties.get(name) is not None, f"{data!r} has no {name!r}"
        self.calls.append(("prop", name))

    def label(self, **kwargs):
        self.calls.append(("label", kwargs.get("text")))
        self.icons.append((kwargs.get("text"), kwargs.get("icon", "NONE")))

    def progress(self, **kwargs):
        self.calls.append(("progress", kwargs.get("factor")))
        self.calls.append(("progress text", kwargs.get("text")))

    def separator(self, **_):
        pass


def linked_from_library(datablock, library):
    """``datablock`` (an action, object or collection) written to the library file ``library``,
    removed here, and linked back from there, as a studio's shared file gives it."""
    data = {"ACTION": "actions", "OBJECT": "objects", "COLLECTION": "collections"}[
        datablock.id_type
    ]
    name = datablock.name
    bpy.data.libraries.write(str(library), {datablock}, fake_user=True)
    getattr(bpy.data, data).remove(datablock)
    with bpy.data.libraries.load(str(library), link=True) as (_, target):
        setattr(target, data, [name])
    return getattr(target, data)[0]


def draw_panels(panels, context, buttons: list | None = None, icons: list | None = None) -> list:
    """Draws each panel class with a FakeLayout; the calls of all of them, in order. With
    ``buttons``, each operator button drawn is added to it: (idname, text, its properties);
    with ``icons``, each label: (text, icon)."""
    calls: list = []
    for cls in panels:
        cls.draw(type("P", (), {"layout": FakeLayout(calls, buttons, icons)})(), context)
    return calls


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drive(until, timeout_s: float = 60.0) -> None:
    """Runs the add-on's timer callback as Blender would (headless Blender runs no timers) until
    ``until()`` is true. That one call keeps to its time budget is tested with a fake clock
    (test_addon_chat.py), not by timing calls here: wall time on a busy machine is no test."""
    import time

    from blender_addon.blender import live, runtime

    deadline = time.monotonic() + timeout_s
    while True:
        runtime.timer_tick()
        if until():
            return
        assert time.monotonic() < deadline, f"gave up; last message: {live.last_message()}"
        time.sleep(0.01)


def idle() -> bool:
    from blender_addon.blender import live

    return not live.busy()


def use_service(address: str, timeout_s: float = 30.0) -> None:
    from blender_addon import preferences

    prefs = preferences.get_preferences()
    prefs.service_address = address
    prefs.request_timeout = timeout_s


def start_tiny_service(
    checkpoint, address: str, log_dir, timeout_s: float = 120.0, options: tuple[str, ...] = ()
):
    """A real `chatpose-serve` subprocess serving `checkpoint` at `address` (with its command
    line `options`), started with the add-on's own process manager and answering: its
    ServiceProcess."""
    import os
    import sys

    from blender_addon.core.service_process import ServiceProcess, serve_command
    from shared_protocol.client import Client
    from shared_protocol.protocol import ProtocolError

    manager = ServiceProcess(str(log_dir))
    # One torch thread: the tiny model gains nothing from more, and on a small shared machine
    # extra threads only wait on each other.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [*serve_command(sys.executable, str(checkpoint), address, "cpu"), *options]
    manager.start(argv, env=env)
    with Client(address) as client:
        try:  # the model takes a few seconds to load
            client.wait_serving(timeout_s, gone=lambda: None if manager.poll().alive else "exited")
            return manager
        except ProtocolError:
            state = manager.poll()
            manager.stop(wait=True)
            raise AssertionError(f"chatpose-serve did not come up: {state.describe()}") from None
