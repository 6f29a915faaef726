"""Operators of the chat panel: send a prompt (text, viewport picture, reference image), clear
the history, batch keyframes from text, cancel, and the local service's Start/Stop/Check.

They only queue requests (``sending``, ``local_service``) and return at once; answers are
applied by the timer (``runtime``), whose messages reach Blender's reports through the internal
``chatpose.report``.
"""

from __future__ import annotations

import os

import bpy
from bpy_extras.io_utils import ImportHelper

from ..core.images import read_reference_image
from . import feedback, live, local_service, sending
from .anim import linked_action_problem
from .batch_store import clear_record
from .capture import CaptureError, capture_viewport
from .props import checked_target, clear_history, target_armature


def _run(op: bpy.types.Operator, fn, *args) -> set[str]:
    try:
        fn(*args)
    except live.UserError as exc:
        op.report({"ERROR"}, str(exc))
        feedback.set_message(str(exc), "ERROR")
        return {"CANCELLED"}
    message, level = live.last_message()
    op.report({level}, message)
    return {"FINISHED"}


class _NeedsTarget:
    @classmethod
    def poll(cls, context):
        _, problem = checked_target(context)
        if problem:
            cls.poll_message_set(problem)
        return not problem


# Sending is an undo step, as any action the user takes: it drops the steps they undid, so
# its answer is not held back for them (runtime.why_answers_wait). No REGISTER: "Adjust Last
# Operation" would send the request again.
SENDING_OPTIONS = {"UNDO"}


class CHATPOSE_OT_send(_NeedsTarget, bpy.types.Operator):  # noqa: N801
    """Send the prompt to the ChatPose service; the answer is put on the target armature"""

    bl_idname = "chatpose.send"
    bl_label = "Send"
    bl_options = SENDING_OPTIONS

    def execute(self, context):
        settings = context.scene.chatpose
        prompt = settings.prompt

        def send():
            sending.send_pose(context, prompt)
            settings.prompt = ""

        return _run(self, send)


class CHATPOSE_OT_pose_from_viewport(_NeedsTarget, bpy.types.Operator):  # noqa: N801
    """Send a picture of the 3D viewport (in background mode: a Workbench render of the scene
    camera) with the prompt"""

    bl_idname = "chatpose.pose_from_viewport"
    bl_label = "Pose from Viewport"
    bl_options = SENDING_OPTIONS

    def execute(self, context):
        settings = context.scene.chatpose
        prompt = settings.prompt

        def send():
            live.service_for(context)  # first: no picture (a render) for what cannot be sent
            if settings.chat_mode:
                sending.refuse_chat_turn_yet(context.scene)
            try:
                image, label = capture_viewport(context)
            except CaptureError as exc:
                raise live.UserError(f"No picture: {exc}") from None
            sending.send_pose(context, prompt, [image], label)
            settings.prompt = ""

        return _run(self, send)


class CHATPOSE_OT_pose_from_image(_NeedsTarget, bpy.types.Operator, ImportHelper):  # noqa: N801
    """Send a reference picture (PNG or JPEG) with the prompt"""

    bl_idname = "chatpose.pose_from_image"
    bl_label = "Pose from Image"
    bl_options = SENDING_OPTIONS

    # .jfif and .jpe: JPEGs as some browsers save them (Chrome on Windows, "Save image as").
    filter_glob: bpy.props.StringProperty(
        default="*.png;*.jpg;*.jpeg;*.jfif;*.jpe;*.PNG;*.JPG;*.JPEG;*.JFIF;*.JPE",
        options={"HIDDEN"},
    )

    def execute(self, context):
        try:
            image = read_reference_image(self.filepath)
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            feedback.set_message(str(exc), "ERROR")
            return {"CANCELLED"}
        settings = context.scene.chatpose
        prompt = settings.prompt
        label = f"image: {os.path.basename(self.filepath)}"

        def send():
            sending.send_pose(context, prompt, [image], label)
            settings.prompt = ""

        return _run(self, send)


class CHATPOSE_OT_clear_history(bpy.types.Operator):  # noqa: N801
    """Forget this scene's chat history (it is no longer sent as context)"""

    bl_idname = "chatpose.clear_history"
    bl_label = "Clear History"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        clear_history(context.scene)
        feedback.set_message("Chat history cleared")
        return {"FINISHED"}


class CHATPOSE_OT_batch_keyframe(_NeedsTarget, bpy.types.Operator):  # noqa: N801
    """Key one pose per line of the text (or file) on the target armature, from the start frame
    every step frames; lines keyed before are skipped"""

    bl_idname = "chatpose.batch_keyframe"
    bl_label = "Batch Keyframe"
    bl_options = SENDING_OPTIONS

    @classmethod
    def poll(cls, context):
        if live.dispatcher().batch_running:
            cls.poll_message_set(live.dispatcher().batch.running_text())
            return False
        return super().poll(context)

    def invoke(self, context, event):
        replaced = sending.replace_keys_question(context)
        if not replaced:
            return self.execute(context)
        return context.window_manager.invoke_confirm(
            self,
            event,
            title="Replace Keys?",
            message=replaced,
            confirm_text="Batch Keyframe",
            icon="WARNING",
        )

    def execute(self, context):
        return _run(self, sending.start_batch, context)


class CHATPOSE_OT_cancel(bpy.types.Operator):  # noqa: N801
    """Stop the running batch and the requests waiting for an answer (what already came back
    stays keyed)"""

    bl_idname = "chatpose.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return live.busy()

    def execute(self, context):
        if not sending.cancel_all():
            self.report({"INFO"}, "Nothing to cancel")
        return {"FINISHED"}


class CHATPOSE_OT_cancel_request(bpy.types.Operator):  # noqa: N801
    """Stop this request: its prompt comes back to the prompt field where that is empty, the
    others go on"""

    bl_idname = "chatpose.cancel_request"
    bl_label = "Cancel Request"

    request_id: bpy.props.StringProperty(options={"HIDDEN", "SKIP_SAVE"})

    def execute(self, context):
        if not sending.cancel_request(self.request_id):
            self.report({"INFO"}, "That request is no longer waiting")
        return {"FINISHED"}


class CHATPOSE_OT_clear_batch_record(_NeedsTarget, bpy.types.Operator):  # noqa: N801
    """Forget which batch lines are keyed in the target armature's action: the next batch keys
    them all again (the keys themselves stay)"""

    bl_idname = "chatpose.clear_batch_record"
    bl_label = "Clear Batch Record"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if live.dispatcher().batch_running:  # it records each line it keys
            cls.poll_message_set(f"{live.dispatcher().batch.running_text()}: cancel it first")
            return False
        return super().poll(context)

    def execute(self, context):
        obj = target_armature(context)
        # Cleared in memory only, it would be back when the file is opened again.
        if problem := linked_action_problem(obj, "its batch record cannot be cleared"):
            self.report({"ERROR"}, problem[0].upper() + problem[1:])
            return {"CANCELLED"}
        clear_record(obj)
        self.report({"INFO"}, f"Batch record of {obj.name} cleared")
        return {"FINISHED"}


class CHATPOSE_OT_service_start(bpy.types.Operator):  # noqa: N801
    """Start chatpose-serve with the interpreter and checkpoint set in the preferences"""

    bl_idname = "chatpose.service_start"
    bl_label = "Start Local Service"

    def execute(self, context):
        return _run(self, local_service.start_service, context)


class CHATPOSE_OT_service_stop(bpy.types.Operator):  # noqa: N801
    """Stop the chatpose-serve process started here"""

    bl_idname = "chatpose.service_stop"
    bl_label = "Stop Local Service"

    @classmethod
    def poll(cls, context):
        return local_service.local_service_state().alive

    def execute(self, context):
        local_service.stop_service()
        return {"FINISHED"}


class CHATPOSE_OT_service_status(bpy.types.Operator):  # noqa: N801
    """Ask the service which model it runs"""

    bl_idname = "chatpose.service_status"
    bl_label = "Check Service"

    def execute(self, context):
        return _run(self, sending.request_status, context)


class CHATPOSE_OT_report(bpy.types.Operator):  # noqa: N801
    """Put a message of the service's answers into Blender's reports (status bar, Info editor):
    answers arrive on the timer, after the operator that asked has returned"""

    bl_idname = "chatpose.report"
    bl_label = "ChatPose Report"
    bl_options = {"INTERNAL"}

    level: bpy.props.EnumProperty(
        items=[(level, level.title(), "") for level in ("INFO", "WARNING", "ERROR")]
    )
    message: bpy.props.StringProperty()

    def execute(self, context):
        self.report({self.level}, self.message)
        return {"FINISHED"}


class _UndoStep:
    """Makes what the timer just applied one undo step, named after the class's label, that is
    also Blender's last operation (feedback.push_undo)"""

    # REGISTER and UNDO: Blender's last operation (what "Adjust Last Operation" and F9 act on)
    # is the last registered operator with both. No properties: they have nothing to show.
    bl_options = {"REGISTER", "UNDO", "INTERNAL"}

    def execute(self, context):
        # A repeat (Adjust Last Operation, Repeat Last) runs after Blender loaded the step
        # before this one: FINISHED would push that state, losing the answer; CANCELLED makes
        # Blender redo back to it.
        return {"FINISHED"} if feedback.pushing_undo() else {"CANCELLED"}


class CHATPOSE_OT_answer_step(_UndoStep, bpy.types.Operator):  # noqa: N801
    bl_idname = "chatpose.answer_step"
    bl_label = "ChatPose Answer"  # poses applied


class CHATPOSE_OT_chat_step(_UndoStep, bpy.types.Operator):  # noqa: N801
    bl_idname = "chatpose.chat_step"
    bl_label = "ChatPose Chat History"  # a reply without a pose, a failed request


class CHATPOSE_OT_batch_step(_UndoStep, bpy.types.Operator):  # noqa: N801
    bl_idname = "chatpose.batch_step"
    bl_label = "ChatPose Batch Keyframes"  # one batch run


CLASSES = (
    CHATPOSE_OT_answer_step,
    CHATPOSE_OT_chat_step,
    CHATPOSE_OT_batch_step,
    CHATPOSE_OT_report,
    CHATPOSE_OT_send,
    CHATPOSE_OT_pose_from_viewport,
    CHATPOSE_OT_pose_from_image,
    CHATPOSE_OT_clear_history,
    CHATPOSE_OT_batch_keyframe,
    CHATPOSE_OT_cancel,
    CHATPOSE_OT_cancel_request,
    CHATPOSE_OT_clear_batch_record,
    CHATPOSE_OT_service_start,
    CHATPOSE_OT_service_stop,
    CHATPOSE_OT_service_status,
)
