"""Whether this install of the add-on runs on its own shared_protocol: run by ``register()``
before anything else of the add-on is imported. No bpy (``registration`` checks what needs it)."""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import os
import re
import sys

from .paths import is_extension_package

# The scene settings' class, by whose module another enabled copy of the add-on is found.
SETTINGS_CLASS = "ChatPoseSceneSettings"


def forget_imported_shared_protocol(package: str) -> None:
    """An extension updated in a running Blender gets its new wheels installed, but a module
    imported already is not imported again: the new add-on would run on the old
    shared_protocol, and fail on, or misread, what changed. It is pure Python and only this
    add-on imports it, so an extension's registration imports it afresh. (pyzmq, compiled,
    cannot be; a new pyzmq needs Blender restarted, docs/addon.md.)"""
    if not is_extension_package(package):  # a legacy install or the tests: one copy
        return
    for name in [n for n in sys.modules if n.partition(".")[0] == "shared_protocol"]:
        del sys.modules[name]
    importlib.invalidate_caches()


def shadowed_shared_protocol(package: str, addon_folder: str) -> str | None:
    """Why the shared_protocol Python imports is not the one this extension's wheel brings,
    or None; `package` and `addon_folder` are the add-on's. Blender puts the extensions'
    wheels last on sys.path: a copy installed into Blender's own Python earlier (a legacy
    install's) would be used, unseen, with its old code."""
    manifest = os.path.join(addon_folder, "blender_manifest.toml")
    if not is_extension_package(package) or not os.path.isfile(manifest):
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
