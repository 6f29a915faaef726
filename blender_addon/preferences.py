"""Add-on preferences: service address, its CURVE keys, request timeout, SMPL model file;
per-user data."""

from __future__ import annotations

import os
import tempfile
import time
from typing import NamedTuple

import bpy

from shared_protocol.client import DEFAULT_ADDRESS, secret_key_exposure

from .core.chat import DEFAULT_MAX_PAIRS
from .core.netpolicy import address_problem, curve_problem
from .core.paths import unquoted
from .core.paths import user_data_dir as _user_data_dir
from .core.smpl_model import SmplModel, load_smpl_model
from .core.wording import wrap

# The add-on's package: "bl_ext.<repo>.chatpose" as an extension, "chatpose" as a legacy
# add-on, "blender_addon" in the tests. AddonPreferences must use it as bl_idname.
ADDON_PACKAGE = __package__
DEFAULT_TIMEOUT_S = 60.0


class ChatPosePreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_PACKAGE

    service_address: bpy.props.StringProperty(
        name="Service Address",
        description="Where the ChatPose service listens, as tcp://host:port; an address off "
        "this machine needs Blender's online access and CURVE keys",
        default=DEFAULT_ADDRESS,
    )
    curve_client_key: bpy.props.StringProperty(
        name="Client Key",
        description="For a service off this machine (CURVE): your NAME.key_secret, made by "
        "python -m inference_service.keys; empty for a service on this machine",
        default="",
        subtype="FILE_PATH",
    )
    curve_server_key: bpy.props.StringProperty(
        name="Server Key",
        description="For a service off this machine (CURVE): the service's server.key",
        default="",
        subtype="FILE_PATH",
    )
    request_timeout: bpy.props.FloatProperty(
        name="Request Timeout",
        description="Seconds to wait for each answer from the service",
        default=DEFAULT_TIMEOUT_S,
        min=1.0,
        max=3600.0,
        unit="TIME_ABSOLUTE",
    )
    smpl_model_path: bpy.props.StringProperty(
        name="SMPL Model File",
        description="Optional SMPL model (.npz) for exact rest joints and the body mesh; "
        "empty uses the built-in skeleton and a mannequin",
        default="",
        subtype="FILE_PATH",
    )

    history_pairs: bpy.props.IntProperty(
        name="Chat Context",
        description="Earlier exchanges of the chat history sent with a prompt in chat mode "
        "(the latest ones; 0 sends none)",
        default=DEFAULT_MAX_PAIRS,
        min=0,
        max=32,
    )
    service_python: bpy.props.StringProperty(
        name="Python",
        description="Python interpreter that has chatpose-blender[service] installed, e.g. "
        "<repository>/.venv/bin/python, or <repository>\\.venv\\Scripts\\python.exe on "
        "Windows (not Blender's own Python)",
        default="",
        subtype="FILE_PATH",
    )
    service_checkpoint: bpy.props.StringProperty(
        name="Checkpoint",
        description="ChatPose checkpoint directory for the local service",
        default="",
        subtype="DIR_PATH",
    )
    service_device: bpy.props.EnumProperty(
        name="Device",
        items=[
            ("auto", "Auto", "CUDA when available, else CPU"),
            ("cpu", "CPU", ""),
            ("cuda", "CUDA", "The GPU set beside it"),
        ],
        default="auto",
    )
    service_gpu: bpy.props.IntProperty(
        name="GPU",
        description="Which CUDA GPU the service runs on (cuda:N; e.g. 1 to leave GPU 0 to "
        "Blender's own rendering)",
        default=0,
        min=0,
        max=63,
    )
    service_quantization: bpy.props.EnumProperty(
        name="Weights",
        description="Precision of the model's weights on a GPU: 8 or 4 bits make a 13B model "
        "fit a 24 GB or a 12 GB card (needs bitsandbytes in the service's Python)",
        items=[
            ("none", "As Stored", "16-bit on a GPU: a 13B model needs more than 26 GB"),
            ("8bit", "8-bit", "About 14 GB for a 13B model"),
            ("4bit", "4-bit", "About 8 GB for a 13B model"),
        ],
        default="none",
    )

    def service_device_arguments(self) -> tuple[str, str]:
        """chatpose-serve's device and quantization (``serve_command``) for these settings:
        8 or 4 bits only where a GPU may run it (on the CPU the service would refuse them)."""
        if self.service_device == "cpu":
            return "cpu", "none"
        device = f"cuda:{self.service_gpu}" if self.service_device == "cuda" else "auto"
        return device, self.service_quantization

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "service_address")
        layout.prop(self, "curve_client_key")
        layout.prop(self, "curve_server_key")
        settings = service_settings(context)
        # A secret key others may read: usable, and said here where it is set.
        warning = settings.problem or (settings.client_key and _key_exposure(settings.client_key))
        if warning:
            for i, line in enumerate(wrap(warning, 70)):
                layout.label(text=line, icon="ERROR" if i == 0 else "BLANK1")
        layout.prop(self, "request_timeout")
        layout.prop(self, "history_pairs")
        layout.prop(self, "smpl_model_path")
        box = layout.box()
        box.label(text="Local Service (optional)", icon="CONSOLE")
        box.prop(self, "service_python")
        box.prop(self, "service_checkpoint")
        row = box.row()
        row.prop(self, "service_device")
        if self.service_device == "cuda":
            row.prop(self, "service_gpu")
        if self.service_device != "cpu":
            box.prop(self, "service_quantization")
        draw_local_service(box)


_KEY_CHECK_S = 10.0  # how long what a key file's permissions said holds, for the redraws
_key_checks: dict[str, tuple[float, str | None]] = {}


def _key_exposure(path: str) -> str | None:
    """`secret_key_exposure`, looked at once per _KEY_CHECK_S, not on each of the panel's
    redraws (a file on a slow network share would hold up each)."""
    checked = _key_checks.get(path)
    if checked is None or time.monotonic() - checked[0] > _KEY_CHECK_S:
        checked = _key_checks[path] = (time.monotonic(), secret_key_exposure(path))
    return checked[1]


def draw_local_service(layout, width: int = 70) -> None:
    """Start/Stop buttons and the local service's state, in lines of ``width`` characters
    (preferences and the panel), and a button opening its log once one was started here."""
    from .blender import live, local_service  # here: the add-on's bpy modules import this one

    state = local_service.local_service_state()
    row = layout.row(align=True)
    row.operator("chatpose.service_start", icon="PLAY")
    row.operator("chatpose.service_stop", icon="PAUSE")
    icon = {"running": "CHECKMARK", "exited": "ERROR"}.get(state.state, "DOT")
    text = state.describe()
    if state.alive:
        text += f" on {live.state.local_address}"
    if state.alive and live.waiting_for_service():
        text += ", loading the model..."
    for i, line in enumerate(wrap(f"Local service: {text}", width)):
        layout.label(text=line, icon=icon if i == 0 else "BLANK1")
    if live.service_process().pid is not None:  # one started here: where its output is
        log = live.service_process().log_path
        layout.operator("wm.path_open", text="Open Log", icon="TEXT").filepath = log


def online_access() -> bool:
    """Blender's "Allow Online Access" (always allowed before 4.2, which had no such switch)."""
    return bool(getattr(bpy.app, "online_access", True))


def get_preferences(context: bpy.types.Context | None = None) -> ChatPosePreferences | None:
    """The add-on's preferences, or None when it is registered without being enabled as an
    add-on (e.g. ``register()`` called directly)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_PACKAGE)
    return addon.preferences if addon is not None else None


class ServiceSettings(NamedTuple):
    address: str
    timeout_s: float
    client_key: str  # CURVE key files, absolute; both empty for a service on this machine
    server_key: str
    problem: str | None  # why the add-on must not connect now (``core.netpolicy``)


def service_settings(context: bpy.types.Context | None = None) -> ServiceSettings:
    """What a service client should use. The key files are not read here (the panel calls it
    on every redraw); ``netpolicy.curve_keys`` reads them when a request is sent."""
    prefs = get_preferences(context)
    address = prefs.service_address.strip() if prefs else DEFAULT_ADDRESS
    timeout = prefs.request_timeout if prefs else DEFAULT_TIMEOUT_S
    client_key = absolute_path(prefs.curve_client_key if prefs else "")
    server_key = absolute_path(prefs.curve_server_key if prefs else "")
    problem = curve_problem(client_key, server_key) or address_problem(
        address, online_access(), has_keys=bool(client_key)
    )
    return ServiceSettings(address, timeout, client_key, server_key, problem)


def smpl_model_path(context: bpy.types.Context | None = None) -> str:
    prefs = get_preferences(context)
    return absolute_path(prefs.smpl_model_path if prefs else "")


_loaded_models: dict[str, tuple[tuple[int, int], SmplModel]] = {}


def preferred_smpl_model(context: bpy.types.Context | None = None) -> SmplModel | None:
    """The SMPL model file set in the preferences, loaded (once per version of the file: the
    timer creates people with it); None when none is set. ValueError names a bad file."""
    path = smpl_model_path(context)
    if not path:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return load_smpl_model(path)  # its own message for a missing file
    stamp = (info.st_mtime_ns, info.st_size)
    cached = _loaded_models.get(path)
    if cached is None or cached[0] != stamp:
        _loaded_models.clear()  # one model at a time
        _loaded_models[path] = (stamp, load_smpl_model(path))
    return _loaded_models[path][1]


def absolute_path(path: str) -> str:
    """A file path setting as an absolute path ("//" is the .blend's folder, "~" the user's
    home; quotes pasted around it removed); empty stays so, and so does a bare program name
    (found on PATH)."""
    path = unquoted(path)
    return os.path.expanduser(bpy.path.abspath(path)) if path else ""


def _fallback_dir() -> str:
    base = bpy.utils.user_resource("CONFIG", path="chatpose", create=True)
    if base:
        return base
    path = os.path.join(tempfile.gettempdir(), "chatpose")
    os.makedirs(path, exist_ok=True)
    return path


def user_data_dir() -> str:
    """Per-user data directory: the extension's own user directory when installed as an
    extension, else Blender's config directory + "chatpose" (created if missing)."""
    return _user_data_dir(
        ADDON_PACKAGE, getattr(bpy.utils, "extension_path_user", None), _fallback_dir
    )
