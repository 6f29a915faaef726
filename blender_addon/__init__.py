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


def register() -> None:
    from . import registration

    registration.register()


def unregister() -> None:
    from . import registration

    registration.unregister()
