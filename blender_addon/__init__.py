"""ChatPose for Blender: put SMPL poses from the ChatPose service on an armature.

Importing this package needs no bpy: the bpy parts are imported by ``register()``, and the
Blender-free logic in ``core`` can be imported and tested on its own.
"""

# Used by legacy (pre-4.2 style) installs only; extensions read blender_manifest.toml.
bl_info = {
    "name": "ChatPose",
    "author": "ChatPose for Blender contributors",
    "version": (0, 1, 0),
    "blender": (4, 2, 0),
    "location": "View3D > Sidebar > ChatPose",
    "description": "Pose SMPL characters from text and images with a multimodal LLM",
    "category": "Animation",
}


# What the extension zip brings as wheels; a legacy install must add them to Blender's Python.
_NEEDED = (
    ("shared_protocol", "chatpose_shared_protocol-*.whl (next to the legacy zip)"),
    ("zmq", "pyzmq"),
)


def register() -> None:
    import importlib
    import os

    from .core import install_check

    install_check.forget_imported_shared_protocol(__package__)
    for module, wheel in _NEEDED:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            import bpy

            raise ImportError(
                f"ChatPose needs the {module} package in Blender {bpy.app.version_string}'s "
                f"Python, which did not set it up: reinstall the extension zip (it brings it; "
                f"Blender's console says why a wheel was skipped), or for a legacy install "
                f"pip-install {wheel} into Blender's Python (see docs/addon.md)"
            ) from exc
    stale = install_check.shadowed_shared_protocol(__package__, os.path.dirname(__file__))
    if stale:
        raise ImportError(stale)
    other = _other_copy_registered()
    if other:  # before the add-on's modules are imported: they may not fit the other's
        raise ImportError(other)
    from . import registration

    registration.register()


def _other_copy_registered() -> str | None:
    """Why this copy must not register, or None: another copy of ChatPose (the legacy install
    beside the extension, say) is enabled. Both would own the same panels and scene settings,
    and disabling either would break the other. Looked up by the settings class's name, with
    nothing of this copy imported."""
    import bpy

    from .core.install_check import SETTINGS_CLASS

    other = bpy.types.PropertyGroup.bl_rna_get_subclass_py(SETTINGS_CLASS)
    package = other.__module__.removesuffix(".blender.props") if other is not None else None
    if package is None or package == __package__:
        return None
    return (
        f"another copy of ChatPose is enabled ({package}): disable it in Preferences > "
        "Add-ons (and remove it, if it is the legacy install), then enable this one"
    )


def unregister() -> None:
    from . import registration

    registration.unregister()
