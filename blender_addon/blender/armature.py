"""Create the SMPL armature (and its mesh), and recognise SMPL armatures."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import bpy
import numpy as np

from shared_protocol.pose import SOLE_DEPTH
from shared_protocol.skeleton import PARENTS, SMPL_TO_BLENDER, smpl_to_blender

from ..core.mannequin import mannequin_mesh
from ..core.rig_spec import (
    RIG_PROPERTY,
    RIG_VERSION,
    armature_axes,
    hand_heads,
    missing_smpl_bones,
    rest_joints_from_heads,
    smpl_bone_names,
    smpl_bone_specs,
    units_per_metre,
)
from ..core.smpl_model import SmplModel
from ..core.wording import quoted
from .meshes import create_mannequin, create_smpl_body


def is_smpl_armature(obj: bpy.types.Object | None) -> bool:
    """An armature with a bone for every SMPL joint, under one of the names SMPL rigs use
    (`rig_spec.BONE_NAMINGS`: made here, the SMPL add-on, an SMPL FBX)."""
    if obj is None or obj.type != "ARMATURE":
        return False
    return smpl_bone_names(obj.data.bones.keys()) is not None


def why_not_smpl(obj: bpy.types.Object) -> str:
    """Why ``obj`` is not an SMPL armature, for a message."""
    if obj.type != "ARMATURE":
        return f"it is a {obj.type.lower()}, not an armature"
    missing = missing_smpl_bones(obj.data.bones.keys())
    listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (
        f"it has no bone {listed} (SMPL rigs name the 24 bones pelvis, left_hip, ...; "
        "Pelvis, L_Hip, ...; or m_avg_Pelvis, m_avg_L_Hip, ...)"
    )


def linked_problem(obj: bpy.types.Object) -> str | None:
    """Why what is put on ``obj`` would not be kept (it is linked from a library), or None."""
    if obj.library is None:
        return None
    return (
        f"{quoted(obj.name)} is linked from {obj.library.filepath}, so poses put on it would be "
        "lost on saving: make a library override (Object > Library Override > Make) and pose that"
    )


def missing_library(obj: bpy.types.Object) -> str | None:
    """Why ``obj`` shows no rig: the library file it, or its armature, comes from (directly or
    through a library override) was not found when this file was opened, and Blender put an
    empty stand-in there; None when nothing it stands on is missing."""
    shown = obj.instance_collection if obj.instance_type == "COLLECTION" else None
    data = obj.data if obj.type == "ARMATURE" else None  # a table's missing mesh: no rig's
    for block in (obj, data, shown):
        override = block.override_library if block is not None else None
        for source in (block, override.reference if override is not None else None):
            if source is not None and source.is_missing and source.library is not None:
                where = f"shows {quoted(source.name)} from" if block is shown else "comes from"
                return (
                    f"{quoted(obj.name)} {where} {source.library.filepath}, which was not found "
                    "when this file was opened: find it (File > External Data > Find Missing "
                    "Files, or Relocate the library in the Outliner's Blender File view)"
                )
    return None


def instance_problem(obj: bpy.types.Object | None) -> str | None:
    """Why ``obj``, an instance of a collection that holds an armature (a character put in a
    shot), does not pose that armature; None when ``obj`` is no such instance."""
    is_instance = obj is not None and obj.instance_type == "COLLECTION"
    collection = obj.instance_collection if is_instance else None
    if collection is None or not any(is_smpl_armature(o) for o in collection.all_objects):
        return None
    if collection.library is not None:
        remedy = "make a library override of it (Object > Library Override > Make) and pose that"
    else:
        remedy = (
            "select the armature in the collection itself (link the collection into the scene "
            "if it is in none, or Object > Apply > Make Instances Real)"
        )
    return (
        f"{quoted(obj.name)} is an instance of the collection {quoted(collection.name)}, which "
        f"shows its armature but does not pose it: {remedy}"
    )


def bone_names(obj: bpy.types.Object) -> tuple[str | None, ...]:
    """The armature's names for the 24 SMPL bones, in SMPL joint order; None for a hand an
    SMPL-H or SMPL-X rig does not have (``rig_spec.smpl_bone_names``)."""
    names = smpl_bone_names(obj.data.bones.keys())
    if names is None:
        raise ValueError(f"{quoted(obj.name)} is not an SMPL armature")
    return names


def is_deleted(obj: bpy.types.Object) -> bool:
    """Deleted by the user but still held by a property (the scene's Target, a request): Blender
    unlinks a deleted object from every scene and keeps it while something refers to it.

    Asked on every redraw (the panel, the operators' polls) and batch pass: an object visible in
    the current view layer is answered at once, as ``users_scene`` walks every object of every
    scene (4 ms a call among 40,000 objects)."""
    with contextlib.suppress(RuntimeError, AttributeError):  # no view layer in this context
        if obj.visible_get():
            return False
    return not obj.users_scene


def find_smpl_armature(context: bpy.types.Context) -> bpy.types.Object | None:
    """The active object if it is an SMPL armature, or the SMPL armature a selected mesh is
    parented to / deformed by."""
    obj = context.active_object
    if is_smpl_armature(obj):
        return obj
    if obj is not None:
        if is_smpl_armature(obj.parent):
            return obj.parent
        for mod in getattr(obj, "modifiers", ()):
            if mod.type == "ARMATURE" and is_smpl_armature(mod.object):
                return mod.object
    return None


def armature_meant(obj: bpy.types.Object | None) -> bpy.types.Object | None:
    """The armature the user means by selecting ``obj``: itself, or the one a mesh is parented
    to or deformed by (as ``find_smpl_armature`` looks), whatever its bones; None for none."""
    if obj is None or obj.type == "ARMATURE":
        return obj
    if obj.parent is not None and obj.parent.type == "ARMATURE":
        return obj.parent
    for mod in getattr(obj, "modifiers", ()):
        if mod.type == "ARMATURE" and mod.object is not None:
            return mod.object
    return None


@dataclass(frozen=True)
class RigGeometry:
    """What ``core.posing`` needs of a rig's rest pose, read from its bones in one pass.

    ``rest_rotations``: (24, 3, 3) rest rotation of each SMPL bone, in SMPL joint order, in
    armature space as ``core.posing`` takes it: Z-up. A rig whose armature data is Y-up (an
    imported SMPL FBX) is seen turned upright (``rig_spec.armature_axes``), so its poses come
    out the same.
    ``location_frame``: (3, 3) the frame Blender reads the root bone's ``location`` in, in the
    same space (``core.posing.root_location``): the root's own rest, or with Local Location
    off its parent's rest (taken at rest, as the rotations are), or the armature's axes for a
    root with no parent.
    ``units_per_metre``: how many of the armature's units make a metre
    (``rig_spec.units_per_metre``): 100 for a rig built in centimetres.
    """

    rest_rotations: np.ndarray
    location_frame: np.ndarray
    units_per_metre: float


def rig_geometry(obj: bpy.types.Object) -> RigGeometry:
    """The rig's ``RigGeometry``, as its rest pose is now (read on every call, not cached:
    the user may edit the rest pose)."""
    bones = obj.data.bones
    names = bone_names(obj)
    heads = _rest_heads(obj, names)
    up = _upright(heads)
    # A hand the rig lacks is never posed: its wrist's rest stands in for it.
    present = [n if n is not None else names[PARENTS[i]] for i, n in enumerate(names)]
    rests = _rest_matrices(bones)[[bones.find(n) for n in present], :3, :3]
    root = bones[names[0]]
    if root.use_local_location:
        frame = np.array(root.matrix_local.to_3x3())
    elif root.parent is not None:
        frame = np.array(root.parent.matrix_local.to_3x3())
    else:
        frame = np.eye(3)
    return RigGeometry(up @ rests, up @ frame, units_per_metre(heads))


def _rest_matrices(bones) -> np.ndarray:
    """(n, 4, 4) every bone's ``matrix_local``, in the order of ``bones``: one read, where a
    read per bone took a quarter of the time a pose took to apply."""
    flat = np.empty(len(bones) * 16, dtype=np.float32)
    bones.foreach_get("matrix_local", flat)
    return flat.astype(np.float64).reshape(-1, 4, 4).transpose(0, 2, 1)  # read column by column


def upright(obj: bpy.types.Object) -> np.ndarray:
    """Armature space -> the Z-up armature space ``core.posing`` takes (Y-up rig data, as an
    imported SMPL FBX has it, is seen turned upright: ``rig_spec.armature_axes``)."""
    return _upright(_rest_heads(obj))


def _upright(heads: np.ndarray) -> np.ndarray:
    return SMPL_TO_BLENDER @ armature_axes(heads).T


def rest_joints(obj: bpy.types.Object) -> np.ndarray:
    """(24, 3) rest joints in the SMPL frame, in metres, read back from the bone heads."""
    return rest_joints_from_heads(_rest_heads(obj))


def armature_units(obj: bpy.types.Object) -> float:
    """``RigGeometry.units_per_metre`` of the rig (without reading its rotations)."""
    return units_per_metre(_rest_heads(obj))


def _rest_heads(obj: bpy.types.Object, names=None) -> np.ndarray:
    bones = obj.data.bones
    missing = (np.nan,) * 3
    names = bone_names(obj) if names is None else names
    return hand_heads([tuple(bones[n].head_local) if n else missing for n in names])


def ensure_object_mode(context: bpy.types.Context) -> None:
    if context.mode != "OBJECT" and context.active_object is not None:
        bpy.ops.object.mode_set(mode="OBJECT")


def _add_bones_aside(context: bpy.types.Context, obj: bpy.types.Object, specs) -> None:
    """Makes the bones of ``specs`` in ``obj``'s armature, in Edit Mode in a scene of its own.
    Each switch of mode updates the whole view layer it happens in: in the user's, with
    10,000 objects, the two took over a second, and Blender froze for it."""
    aside = bpy.data.scenes.new(".chatpose building")
    try:
        aside.collection.objects.link(obj)
        layer = aside.view_layers[0]
        layer.objects.active = obj
        with context.temp_override(scene=aside, view_layer=layer, active_object=obj, object=obj):
            bpy.ops.object.mode_set(mode="EDIT")
            try:
                edit_bones = obj.data.edit_bones
                for spec in specs:
                    bone = edit_bones.new(spec.name)
                    bone.head = spec.head
                    bone.tail = spec.tail
                    bone.roll = spec.roll
                    bone.use_connect = False
                for spec in specs:
                    if spec.parent is not None:
                        edit_bones[spec.name].parent = edit_bones[spec.parent]
            finally:
                bpy.ops.object.mode_set(mode="OBJECT")
    finally:
        aside.collection.objects.unlink(obj)
        bpy.data.scenes.remove(aside)


def create_smpl_armature(
    context: bpy.types.Context,
    *,
    name: str = "SMPL",
    rest_joints_smpl=None,
    location=(0.0, 0.0, 0.0),
    on_ground: bool = True,
    with_mesh: bool = True,
    model: SmplModel | None = None,
    keep_pose_mode: bool = False,
) -> bpy.types.Object:
    """A new armature object with the 24 SMPL bones, linked to the active collection and made
    active; with a mesh child (the SMPL body when ``model`` has one, else the mannequin).
    The user's mode is left first (Edit and paint modes belong to the active object), but
    for ``keep_pose_mode`` Pose Mode: a switch updates the whole view layer, and a caller that
    puts the active object back (extra people) has it posed as it was.

    Bones: head at the rest joint (SMPL -> Blender (x, -z, y)), tail a step along +Z, roll 0
    (see ``core.rig_spec``). ``on_ground`` lifts the object so that the lowest point of the mesh,
    else the soles (``SOLE_DEPTH`` below the lowest joint), is at ``location``'s height.
    """
    if rest_joints_smpl is None and model is not None:
        rest_joints_smpl = model.rest_joints
    specs = smpl_bone_specs(rest_joints_smpl)
    if not (keep_pose_mode and context.mode == "POSE"):
        ensure_object_mode(context)

    arm = bpy.data.armatures.new(name)
    arm.display_type = "OCTAHEDRAL"
    arm[RIG_PROPERTY] = RIG_VERSION
    obj = bpy.data.objects.new(name, arm)
    obj.show_in_front = True
    try:
        _add_bones_aside(context, obj, specs)
    except BaseException:  # nothing half-made left holding the name, unseen
        bpy.data.objects.remove(obj)
        bpy.data.armatures.remove(arm)
        raise
    collection = context.collection or context.scene.collection
    if collection.library is not None or collection.override_library is not None:
        collection = context.scene.collection  # a linked collection takes no new objects
    collection.objects.link(obj)
    for other in context.selected_objects:  # not every object: a set may hold thousands
        other.select_set(False)
    context.view_layer.objects.active = obj
    obj.select_set(True)

    for pbone in obj.pose.bones:
        pbone.rotation_mode = "QUATERNION"

    heads = np.array([s.head for s in specs])
    has_body = model is not None and model.faces is not None and model.weights is not None
    mannequin = mannequin_mesh(heads) if with_mesh and not has_body else None
    lift = 0.0
    if on_ground:
        if with_mesh and has_body:
            lift = -smpl_to_blender(model.vertices)[:, 2].min()
        elif mannequin is not None:
            lift = -mannequin.vertices[:, 2].min()
        else:  # where its soles would be
            lift = SOLE_DEPTH - heads[:, 2].min()
    obj.location = (location[0], location[1], location[2] + lift)

    if with_mesh:
        if has_body:
            create_smpl_body(context, obj, model)
        else:
            create_mannequin(context, obj, mannequin)
    return obj
