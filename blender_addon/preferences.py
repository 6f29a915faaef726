"""Add-on preferences: service address, request timeout, SMPL model file; per-user data."""

from __future__ import annotations

import os
import tempfile

import bpy

from .core.netpolicy import DEFAULT_SERVICE_ADDRESS, address_problem
from .core.paths import user_data_dir as _user_data_dir

# The add-on's package: "bl_ext.<repo>.chatpose" as an extension, "chatpose" as a legacy
# add-on, "blender_addon" in the tests. AddonPreferences must use it as bl_idname.
ADDON_PACKAGE = __package__
DEFAULT_TIMEOUT_S = 60.0


class ChatPosePreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_PACKAGE

    service_address: bpy.props.StringProperty(
        name="Service Address",
        description="ZeroMQ address of chatpose-serve; addresses off this machine need "
        "Blender's online access",
        default=DEFAULT_SERVICE_ADDRESS,
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

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "service_address")
        problem = address_problem(self.service_address, online_access())
        if problem:
            layout.label(text=problem, icon="ERROR")
        layout.prop(self, "request_timeout")
        layout.prop(self, "smpl_model_path")


def online_access() -> bool:
    """Blender's "Allow Online Access" (always allowed before 4.2, which had no such switch)."""
    return bool(getattr(bpy.app, "online_access", True))


def get_preferences(context: bpy.types.Context | None = None) -> ChatPosePreferences | None:
    """The add-on's preferences, or None when it is registered without being enabled as an
    add-on (e.g. ``register()`` called directly)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_PACKAGE)
    return addon.preferences if addon is not None else None


def service_settings(context: bpy.types.Context | None = None) -> tuple[str, float, str | None]:
    """(address, timeout in seconds, problem or None): what a service client should use.

    ``problem`` says why the address must not be used now (see ``core.netpolicy``)."""
    prefs = get_preferences(context)
    address = prefs.service_address if prefs else DEFAULT_SERVICE_ADDRESS
    timeout = prefs.request_timeout if prefs else DEFAULT_TIMEOUT_S
    return address, timeout, address_problem(address, online_access())


def smpl_model_path(context: bpy.types.Context | None = None) -> str:
    prefs = get_preferences(context)
    return bpy.path.abspath(prefs.smpl_model_path) if prefs and prefs.smpl_model_path else ""


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
