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

    _forget_imported_shared_protocol()
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
    stale = _shadowed_shared_protocol()
    if stale:
        raise ImportError(stale)
    other = _other_copy_registered()
    if other:
        raise ImportError(other)
    from . import registration

    registration.register()


def _forget_imported_shared_protocol() -> None:
    """An extension updated in a running Blender gets its new wheels installed, but a module
    imported already is not imported again: the new add-on would run on the old
    shared_protocol, and fail on, or misread, what changed. It is pure Python and only this
    add-on imports it, so an extension's registration imports it afresh. (pyzmq, compiled,
    cannot be; a new pyzmq needs Blender restarted, docs/addon.md.)"""
    import importlib
    import sys

    from .core.paths import is_extension_package

    if not is_extension_package(__package__):  # a legacy install or the tests: one copy
        return
    for name in [n for n in sys.modules if n.partition(".")[0] == "shared_protocol"]:
        del sys.modules[name]
    importlib.invalidate_caches()


def _other_copy_registered() -> str | None:
    """Why this copy must not register, or None: another copy of ChatPose (the legacy install
    beside the extension, say) is enabled. Both would own the same panels and scene settings,
    and disabling either would break the other."""
    import bpy

    from .blender.props import SETTINGS_CLASS

    other = bpy.types.PropertyGroup.bl_rna_get_subclass_py(SETTINGS_CLASS)
    package = other.__module__.removesuffix(".blender.props") if other is not None else None
    if package is None or package == __package__:
        return None
    return (
        f"another copy of ChatPose is enabled ({package}): disable it in Preferences > "
        "Add-ons (and remove it, if it is the legacy install), then enable this one"
    )


def _shadowed_shared_protocol() -> str | None:
    """Why the shared_protocol Python imports is not the one this extension's wheel brings,
    or None. Blender puts the extensions' wheels last on sys.path: a copy installed into
    Blender's own Python earlier (a legacy install's) would be used, unseen, with its old
    code."""
    import importlib.metadata
    import os
    import re
    import sys

    from .core.paths import is_extension_package

    manifest = os.path.join(os.path.dirname(__file__), "blender_manifest.toml")
    if not is_extension_package(__package__) or not os.path.isfile(manifest):
        return None
    with open(manifest, encoding="utf-8") as stream:
        wanted = re.search(r"chatpose_shared_protocol-([^-]+)-py3-none-any\.whl", stream.read())
    ours = next(
        (
            dist
            for dist in importlib.metadata.distributions(name="chatpose-shared-protocol")
            if wanted is not None and dist.version == wanted.group(1)
        ),
        None,
    )
    if ours is None:  # Blender did not install the wheel: nothing to compare with
        return None
    import shared_protocol

    imported = os.path.realpath(shared_protocol.__file__)
    if imported == os.path.realpath(ours.locate_file("shared_protocol/__init__.py")):
        changed = _changed_files(ours)
        if not changed:
            return None
        return (
            f"ChatPose's shared_protocol files were changed since it was installed "
            f"({', '.join(changed)}): another extension with a package of that name replaces "
            "them in the extensions' shared folder. Reinstall ChatPose, and disable that "
            "extension or ask its makers to rename their package"
        )
    folder = os.path.dirname(os.path.dirname(imported))
    if os.path.isfile(os.path.join(folder, "pyproject.toml")):
        return (
            f"ChatPose brings its own shared_protocol ({ours.version}), but Blender's Python "
            f"imports the one of a source checkout, {folder}, which is on its path (PYTHONPATH, "
            "or the folder Blender was started in): start Blender from another folder, or "
            "without that PYTHONPATH"
        )
    return (
        f"ChatPose brings its own shared_protocol ({ours.version}), but Blender's Python "
        f"imports another copy, from {folder}, which comes first on its path (one installed "
        f"for a legacy install?): remove it (`{sys.executable} -m pip uninstall "
        "chatpose-shared-protocol` if pip installed it), then restart Blender"
    )


def _changed_files(dist) -> list[str]:
    """The Python files of the installed wheel `dist` whose contents are not those its RECORD
    lists (missing ones too)."""
    import base64
    import hashlib

    changed = []
    for file in dist.files or ():
        if file.suffix != ".py" or file.hash is None or file.hash.mode != "sha256":
            continue
        try:
            digest = hashlib.sha256(dist.locate_file(file).read_bytes()).digest()
        except OSError:
            digest = b""
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != file.hash.value:
            changed.append(str(file))
    return changed


def unregister() -> None:
    from . import registration

    registration.unregister()
