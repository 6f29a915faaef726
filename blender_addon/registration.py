"""Registers the add-on's classes (imported by ``register()``, so that importing the package
itself, e.g. for ``core``, needs no bpy)."""

from __future__ import annotations

import bpy

from . import panel, preferences
from .blender import chat_operators, operators, props, runtime

CLASSES = (
    preferences.ChatPosePreferences,
    *props.CLASSES,
    *operators.CLASSES,
    *chat_operators.CLASSES,
    *panel.CLASSES,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    props.register()
    runtime.register()


def unregister() -> None:
    runtime.unregister()  # stops the timer, the session and a local service started here
    props.unregister()
    for cls in reversed(CLASSES):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
