"""The "ChatPose" tab in the 3D View sidebar: only what works today."""

from __future__ import annotations

import bpy

from .blender.armature import find_smpl_armature


class VIEW3D_PT_chatpose(bpy.types.Panel):  # noqa: N801
    bl_label = "ChatPose"
    bl_idname = "VIEW3D_PT_chatpose"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ChatPose"

    def draw(self, context):
        layout = self.layout
        obj = find_smpl_armature(context)
        col = layout.column(align=True)
        col.operator("chatpose.create_armature", icon="ARMATURE_DATA")
        if obj is None:
            layout.label(text="No SMPL armature selected", icon="INFO")
        else:
            layout.label(text=obj.name, icon="OUTLINER_OB_ARMATURE")
            layout.operator("chatpose.rest_pose", icon="LOOP_BACK")
        col = layout.column(align=True)
        col.operator("chatpose.import_npz", icon="IMPORT")
        col.operator("chatpose.export_npz", icon="EXPORT")


CLASSES = (VIEW3D_PT_chatpose,)
