"""Registers the add-on's classes (imported by ``register()``, so that importing the package
itself, e.g. for ``core``, needs no bpy)."""

from __future__ import annotations

try:
    import shared_protocol  # noqa: F401
except ImportError as exc:  # a legacy install without the wheels
    raise ImportError(
        "ChatPose needs the shared_protocol package in Blender's Python: install the extension "
        "zip (it brings it), or for a legacy install pip-install "
        "chatpose_shared_protocol-*.whl into Blender's Python (see docs/addon.md)"
    ) from exc

import bpy

from . import panel, preferences
from .blender import operators

CLASSES = (preferences.ChatPosePreferences, *operators.CLASSES, *panel.CLASSES)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
