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
    other = _other_copy_registered()
    if other:
        raise ImportError(other)
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    props.register()
    runtime.register()


def _other_copy_registered() -> str | None:
    """Why this copy must not register, or None: another copy of ChatPose (the legacy install
    beside the extension, say) is enabled. Both would own the same panels and scene settings,
    and disabling either would break the other."""
    other = bpy.types.PropertyGroup.bl_rna_get_subclass_py(props.SETTINGS_CLASS)
    package = other.__module__.removesuffix(".blender.props") if other is not None else None
    if package is None or package == __package__:
        return None
    return (
        f"another copy of ChatPose is enabled ({package}): disable it in Preferences > "
        "Add-ons (and remove it, if it is the legacy install), then enable this one"
    )


def unregister() -> None:
    runtime.unregister()  # stops the timer, the session and a local service started here
    props.unregister()
    for cls in reversed(CLASSES):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
