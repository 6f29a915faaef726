"""The "ChatPose" tab in the 3D View sidebar: the target armature, the chat (prompt, Send, the
pictures, keying, the history), batch keyframes from text, the service, motion files.

Drawing reads state only: nothing here talks to the service or waits.
"""

from __future__ import annotations

import bpy

from .blender import live
from .blender.answers import find_by_uid
from .blender.armature import find_smpl_armature
from .blender.props import checked_target, history_messages
from .core import chat, wording
from .preferences import draw_local_service, service_settings

_LEVEL_ICONS = {"INFO": "INFO", "WARNING": "ERROR", "ERROR": "CANCEL"}


def _chars_per_line(context) -> int:
    region = getattr(context, "region", None)
    width = region.width if region is not None else 300
    scale = context.preferences.view.ui_scale if context.preferences else 1.0
    return max(20, int(width / (7.0 * scale)) - 4)


def _wrapped(layout, text: str, width: int, icon: str = "NONE", cut: bool = False) -> None:
    """``text`` in lines of ``width``; with ``cut``, a message's few lines at most
    (`wording.message_lines`: `feedback.set_message` printed it whole)."""
    lines = wording.message_lines(text, width) if cut else wording.wrap(text, width)
    for i, line in enumerate(lines):
        layout.label(text=line, icon=icon if i == 0 else "BLANK1")


class VIEW3D_PT_chatpose(bpy.types.Panel):  # noqa: N801
    bl_label = "ChatPose"
    bl_idname = "VIEW3D_PT_chatpose"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ChatPose"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.chatpose
        layout.prop(settings, "target", icon="OUTLINER_OB_ARMATURE")
        target, problem = checked_target(context)
        row = layout.row(align=True)
        row.operator("chatpose.create_armature", icon="ARMATURE_DATA")
        if target is not None:
            row.operator("chatpose.rest_pose", icon="LOOP_BACK", text="")
        if problem:
            _wrapped(layout, problem, _chars_per_line(context), "ERROR")
        elif settings.target is None:
            layout.label(text=f"Using the selected {target.name}", icon="RESTRICT_SELECT_OFF")
        message, level = live.last_message()
        if message:
            box = layout.box()
            icon = _LEVEL_ICONS.get(level, "INFO")
            _wrapped(box, message, _chars_per_line(context), icon, cut=True)


class VIEW3D_PT_chatpose_chat(bpy.types.Panel):  # noqa: N801
    bl_label = "Chat"
    bl_idname = "VIEW3D_PT_chatpose_chat"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ChatPose"
    bl_parent_id = "VIEW3D_PT_chatpose"

    def draw(self, context):
        layout = self.layout
        scene = context.scene
        settings = scene.chatpose
        layout.prop(settings, "prompt", text="", icon="OUTLINER_DATA_GP_LAYER")
        row = layout.row(align=True)
        row.prop(settings, "chat_mode", toggle=True, icon="OUTLINER_DATA_SPEAKER")
        row.operator("chatpose.send", icon="PLAY")
        row = layout.row(align=True)
        row.operator("chatpose.pose_from_viewport", icon="RESTRICT_VIEW_OFF")
        row.operator("chatpose.pose_from_image", icon="IMAGE_DATA", text="Pose from Image...")

        col = layout.column(align=True)
        col.prop(settings, "insert_keyframe", icon="KEY_HLT")
        if settings.insert_keyframe:
            row = col.row(align=True)
            row.prop(settings, "key_current_frame")
            sub = row.row(align=True)
            sub.enabled = not settings.key_current_frame
            sub.prop(settings, "key_frame")
        row = layout.row(align=True)
        row.prop(settings, "use_translation")
        row.prop(settings, "keep_on_floor")
        layout.prop(settings, "person_spacing")

        waiting = live.pending_requests()
        if waiting:
            box = layout.box()
            for request_id, job in waiting[-3:]:
                what = job.prompt or job.attachment or "image"
                row = box.row()
                row.label(text=f"Waiting: {what[:60]}", icon="SORTTIME")
                row.operator("chatpose.cancel_request", text="", icon="X").request_id = request_id
            several = len(waiting) > 1 or live.batch_running()  # Cancel stops a batch too
            label = "Cancel All" if several else "Cancel"
            box.operator("chatpose.cancel", text=label, icon="CANCEL")

        width = _chars_per_line(context)
        shown = settings.history_lines  # each message is a line at least
        lines = chat.display_lines(history_messages(scene, last=shown), width, shown)
        box = layout.box()
        header = box.row()
        header.label(text=f"History ({len(settings.history)} messages)", icon="TEXT")
        header.prop(settings, "history_lines")
        icons = {chat.USER: "USER", chat.ASSISTANT: "OUTLINER_OB_ARMATURE", chat.ERROR: "ERROR"}
        previous = None
        for role, line in lines:
            icon = icons.get(role, "DOT") if role != previous else "BLANK1"
            box.label(text=line, icon=icon)
            previous = role
        if not lines:
            box.label(text="Nothing yet")
        box.operator("chatpose.clear_history", icon="TRASH")


class VIEW3D_PT_chatpose_batch(bpy.types.Panel):  # noqa: N801
    bl_label = "Batch Keyframes from Text"
    bl_idname = "VIEW3D_PT_chatpose_batch"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ChatPose"
    bl_parent_id = "VIEW3D_PT_chatpose"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        settings = context.scene.chatpose
        layout.prop(settings, "batch_source", expand=True)
        if settings.batch_source == "TEXT":
            layout.prop(settings, "batch_text")
        else:
            layout.prop(settings, "batch_file")
        row = layout.row(align=True)
        row.prop(settings, "batch_start")
        row.prop(settings, "batch_step")
        row = layout.row(align=True)
        row.prop(settings, "batch_translation")
        row.prop(settings, "batch_keep_on_floor")
        run = live.current_batch()
        elsewhere = _scene_elsewhere(run, context.scene) if run is not None else None
        if run is not None and not run.closed:
            text = live.batch_progress(run) + (f" in scene '{elsewhere}'" if elsewhere else "")
            layout.progress(factor=run.fraction, type="BAR", text=text)
            layout.operator("chatpose.cancel", icon="CANCEL")
        else:
            row = layout.row(align=True)
            row.operator("chatpose.batch_keyframe", icon="KEYINGSET")
            row.operator("chatpose.clear_batch_record", icon="X", text="")
            if run is not None and elsewhere is None:  # another scene's last run is not this one's
                _wrapped(layout, run.summary(), _chars_per_line(context), "INFO")


def _scene_elsewhere(run, scene: bpy.types.Scene) -> str | None:
    """The name of the scene the run's armature is in when this scene does not hold it; None
    when it does, or when the armature is gone (its run's summary says so)."""
    obj = find_by_uid(bpy.data.objects, run.armature, run.armature_uid)
    if obj is None or scene.objects.get(obj.name) == obj:
        return None
    return next((other.name for other in obj.users_scene), None)


class VIEW3D_PT_chatpose_service(bpy.types.Panel):  # noqa: N801
    bl_label = "Service"
    bl_idname = "VIEW3D_PT_chatpose_service"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ChatPose"
    bl_parent_id = "VIEW3D_PT_chatpose"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        settings = service_settings(context)
        keys = ", CURVE keys" if settings.client_key else ""
        text = f"{settings.address} (timeout {settings.timeout_s:g} s{keys})"
        layout.label(text=text, icon="URL")
        if settings.problem:
            _wrapped(layout, settings.problem, _chars_per_line(context), "ERROR")
        line = live.service_line(settings.address)
        if line:
            icon = "ERROR" if line.startswith(live.UNAVAILABLE) else "CHECKMARK"
            _wrapped(layout, line, _chars_per_line(context), icon)
        layout.operator("chatpose.service_status", icon="FILE_REFRESH")
        draw_local_service(layout, _chars_per_line(context))


class VIEW3D_PT_chatpose_files(bpy.types.Panel):  # noqa: N801
    bl_label = "Motion Files"
    bl_idname = "VIEW3D_PT_chatpose_files"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ChatPose"
    bl_parent_id = "VIEW3D_PT_chatpose"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        col = self.layout.column(align=True)
        col.operator("chatpose.import_npz", icon="IMPORT")
        col.operator("chatpose.export_npz", icon="EXPORT")
        if find_smpl_armature(context) is None:
            col.label(text="Export: select an SMPL armature", icon="INFO")


CLASSES = (
    VIEW3D_PT_chatpose,
    VIEW3D_PT_chatpose_chat,
    VIEW3D_PT_chatpose_batch,
    VIEW3D_PT_chatpose_service,
    VIEW3D_PT_chatpose_files,
)
