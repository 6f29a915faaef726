"""Meshes skinned to the SMPL armature: the capsule mannequin or the user's SMPL body."""

from __future__ import annotations

import bpy
import numpy as np

from shared_protocol.skeleton import JOINT_NAMES, smpl_to_blender

from ..core.mannequin import PARTS, MeshData
from ..core.placement import suffixed_name
from ..core.smpl_model import SmplModel

_MIN_WEIGHT = 1e-4


def _skinned_mesh_object(
    context: bpy.types.Context, arm_obj: bpy.types.Object, name: str, vertices, faces, weights
) -> bpy.types.Object:
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata([tuple(v) for v in vertices], [], [tuple(int(i) for i in f) for f in faces])
    mesh.validate()
    mesh.polygons.foreach_set("use_smooth", [True] * len(mesh.polygons))
    mesh.update()
    obj = bpy.data.objects.new(name, mesh)
    for collection in arm_obj.users_collection:
        collection.objects.link(obj)
    obj.parent = arm_obj  # identity parent inverse: the mesh sits in armature space
    weights = np.asarray(weights)
    for j, bone in enumerate(JOINT_NAMES):
        group = obj.vertex_groups.new(name=bone)
        column = weights[:, j]
        nonzero = np.nonzero(column > _MIN_WEIGHT)[0]
        if nonzero.size == 0:
            continue
        values = column[nonzero]
        if np.all(values == values[0]):
            group.add(nonzero.tolist(), float(values[0]), "REPLACE")
        else:
            for index, value in zip(nonzero.tolist(), values.tolist(), strict=True):
                group.add([index], value, "REPLACE")
    modifier = obj.modifiers.new("Armature", "ARMATURE")
    modifier.object = arm_obj
    modifier.use_vertex_groups = True
    return obj


MANNEQUIN, SMPL_BODY = "_mannequin", "_body"  # what a body's name adds to its armature's


def body_name(armature_name: str, kind: str) -> str:
    """The name of an armature's body mesh of ``kind`` (MANNEQUIN, SMPL_BODY): a long armature
    name is shortened to fit, not cut by Blender into one like a person's name."""
    return suffixed_name(armature_name, kind)


def create_mannequin(
    context: bpy.types.Context, arm_obj: bpy.types.Object, data: MeshData
) -> bpy.types.Object:
    obj = _skinned_mesh_object(
        context,
        arm_obj,
        body_name(arm_obj.name, MANNEQUIN),
        data.vertices,
        data.faces,
        data.weights,
    )
    mesh = obj.data
    for part in PARTS:
        mesh.materials.append(_part_material(part))
    mesh.polygons.foreach_set("material_index", data.face_parts.astype(np.int32))
    mesh.update()
    return obj


def _part_material(part) -> bpy.types.Material:
    """The material of a mannequin part, shared by every mannequin in the file: a user who
    recolours it recolours them all."""
    name = f"ChatPose {part.name}"
    material = bpy.data.materials.get(name)
    if material is None:
        material = bpy.data.materials.new(name)
        material.diffuse_color = (*part.colour, 1.0)
    return material


def create_smpl_body(
    context: bpy.types.Context, arm_obj: bpy.types.Object, model: SmplModel
) -> bpy.types.Object:
    return _skinned_mesh_object(
        context,
        arm_obj,
        body_name(arm_obj.name, SMPL_BODY),
        smpl_to_blender(model.vertices),
        model.faces,
        model.weights,
    )
