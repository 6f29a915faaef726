"""Per-scene settings of the ChatPose panel (``scene.chatpose``), saved in the .blend: the target
armature, the prompt, chat mode, keying, the chat history and the batch source."""

from __future__ import annotations

import bpy

from ..core import chat, install_check
from ..core.placement import DEFAULT_SPACING_M
from ..core.timeline import MAX_FRAME
from ..core.wording import quoted
from .armature import (
    armature_meant,
    find_smpl_armature,
    instance_problem,
    is_deleted,
    is_smpl_armature,
    linked_problem,
    missing_library,
    why_not_smpl,
)


def _is_armature(self, obj) -> bool:
    return obj.type == "ARMATURE"


class ChatPoseMessage(bpy.types.PropertyGroup):
    role: bpy.props.EnumProperty(
        name="Role",
        items=[
            (chat.USER, "User", "What was asked"),
            (chat.ASSISTANT, "Assistant", "The model's reply"),
            (chat.ERROR, "Error", "Why the request failed (not sent back as context)"),
        ],
        default=chat.USER,
    )
    text: bpy.props.StringProperty(name="Text")
    attachment: bpy.props.StringProperty(name="Attachment", description="An image sent along")
    poses: bpy.props.IntProperty(name="Poses", description="Poses in the reply", min=0)
    image: bpy.props.PointerProperty(
        type=bpy.types.Image,
        name="Image",
        description="The image a chat turn sent, packed in the .blend file: it goes again "
        "with the turns after it",
    )


# Its name in Blender, by which a copy of the add-on finds another copy's (`register`).
SETTINGS_CLASS = install_check.SETTINGS_CLASS


class ChatPoseSceneSettings(bpy.types.PropertyGroup):
    target: bpy.props.PointerProperty(
        name="Target",
        description="The SMPL armature that answers are put on (empty: the selected one)",
        type=bpy.types.Object,
        poll=_is_armature,
    )
    prompt: bpy.props.StringProperty(
        name="Prompt", description="What pose to make, e.g. 'a man waving with the right hand'"
    )
    chat_mode: bpy.props.BoolProperty(
        name="Chat",
        description="Chat mode: a free reply (with poses when the model gives some), the "
        "chat history sent as context. Off: pose mode, the fast path that always answers with "
        "one pose",
        default=False,
    )
    insert_keyframe: bpy.props.BoolProperty(
        name="Insert Keyframe", description="Key the poses that come back", default=False
    )
    key_current_frame: bpy.props.BoolProperty(
        name="Current Frame",
        description="Key at the current frame (off: at the frame set here)",
        default=True,
    )
    key_frame: bpy.props.IntProperty(
        name="Frame", description="Frame to key at", default=1, min=-MAX_FRAME, max=MAX_FRAME
    )
    use_translation: bpy.props.BoolProperty(
        name="Translation",
        description="Set the root bone's location from the pose's translation, when it has one "
        "(the model's poses have none: the character stays where it is)",
        default=True,
    )
    keep_on_floor: bpy.props.BoolProperty(
        name="Keep on Floor",
        description="Set the root bone's height so that the body's lowest point is on the "
        "floor, where its soles are at rest, for a pose without a translation or with "
        "Translation off (the model's have "
        "none: a kneeling answer would float at standing height); its place across the floor "
        "is kept, and the root's location is keyed with the pose",
        default=False,
    )
    person_spacing: bpy.props.FloatProperty(
        name="Spacing (m)",
        description="Distance along X between the armatures of several people in one answer, "
        "in metres of the character (a rig in centimetres counts 100 units a metre)",
        default=DEFAULT_SPACING_M,
        min=0.0,
        soft_max=5.0,
    )
    history: bpy.props.CollectionProperty(type=ChatPoseMessage)
    history_lines: bpy.props.IntProperty(
        name="Lines", description="History lines shown in the panel", default=12, min=2, max=200
    )
    batch_source: bpy.props.EnumProperty(
        name="Source",
        items=[
            ("TEXT", "Text", "A text datablock (Text Editor), one prompt per line"),
            ("FILE", "File", "A .txt file, one prompt per line"),
        ],
        default="TEXT",
    )
    batch_text: bpy.props.PointerProperty(name="Text", type=bpy.types.Text)
    batch_file: bpy.props.StringProperty(name="File", subtype="FILE_PATH")
    batch_start: bpy.props.IntProperty(
        name="Start",
        description="Frame of the first line",
        default=1,
        min=-MAX_FRAME,
        max=MAX_FRAME,
    )
    batch_step: bpy.props.IntProperty(
        name="Step", description="Frames between two lines", default=10, min=1
    )
    batch_translation: bpy.props.BoolProperty(
        name="Translation",
        description="Key the root bone's location too, from the pose's translation (at rest "
        "for a pose without one, the model's have none; or on the floor with Keep on Floor). "
        "Lines keyed without it get the root's location keyed at rest, their rotations kept",
        default=False,
    )
    batch_keep_on_floor: bpy.props.BoolProperty(
        name="Keep on Floor",
        description="Key each line's root height so that the body's lowest point is on the "
        "floor, where its soles are at rest, for a pose without a translation or with "
        "Translation off; its place across the floor is the root's at that frame when the run "
        "starts. Lines keyed without it are put on the floor as they are keyed (their "
        "rotations, edits included, kept), not asked again",
        default=False,
    )


CLASSES = (ChatPoseMessage, ChatPoseSceneSettings)


def register() -> None:
    bpy.types.Scene.chatpose = bpy.props.PointerProperty(type=ChatPoseSceneSettings)


def unregister() -> None:
    owner = bpy.types.PropertyGroup.bl_rna_get_subclass_py(SETTINGS_CLASS)
    if hasattr(bpy.types.Scene, "chatpose") and owner in (None, ChatPoseSceneSettings):
        del bpy.types.Scene.chatpose  # not another copy's, which would break it


def target_armature(context: bpy.types.Context) -> bpy.types.Object | None:
    """The armature requests pose: the scene's Target when set, else the selected SMPL
    armature. None when that is not an SMPL armature whose changes the file keeps
    (`target_problem` says why)."""
    return checked_target(context)[0]


def checked_target(context: bpy.types.Context) -> tuple[bpy.types.Object | None, str | None]:
    """(``target_armature``, ``target_problem``) in one look, for what needs both on every
    redraw (the panel, the operators' polls): each look checks the rig's bones."""
    problem = target_problem(context)
    return (None, problem) if problem else (_candidate(context), None)


def target_problem(context: bpy.types.Context) -> str | None:
    """Why there is no armature to pose, or None."""
    obj = _candidate(context)
    if obj is None:
        return selection_problem(context.active_object) or (
            "No SMPL armature: pick a target or create one (Create SMPL Armature)"
        )
    unread = is_deleted(obj) or not is_smpl_armature(obj)
    if unread and (missing := missing_library(obj)):  # not deleted, nor another armature
        return f"The Target {missing}"
    if is_deleted(obj):
        holders = set(obj.users_collection)  # and the collections they are in: Character/Rig
        holders |= {c for c in bpy.data.collections if holders & set(c.children_recursive)}
        instancer = next((o for c in holders for o in c.users_dupli_group if o.users_scene), None)
        if instancer is not None:  # in no scene, but not deleted: a character's instance
            remedy = (  # linked into a scene, a linked rig would be refused next: not ours
                "make the instance a library override"
                if obj.library is not None
                else "link it into a scene (or make the instance a library override)"
            )
            return (
                f"The Target {quoted(obj.name)} is in no scene, only shown through the collection "
                f"instance {quoted(instancer.name)}: {remedy} to pose it, or pick another Target"
            )
        return (
            f"The Target {quoted(obj.name)} was deleted: pick another armature as Target, or clear "
            "Target to use the selected SMPL armature"
        )
    if not is_smpl_armature(obj):
        return (
            f"The Target {quoted(obj.name)} is not an SMPL armature ({why_not_smpl(obj)}): pick "
            "one, or clear Target to use the selected SMPL armature"
        )
    return linked_problem(obj)  # what is put on a linked object is not saved


def selection_problem(active: bpy.types.Object | None) -> str | None:
    """Why the selected object gives no SMPL armature to pose: it is, or shows, one whose
    library file is missing; it is an armature (or a mesh of one) that is no SMPL one; it is
    a collection instance of a character. None when it is none of those."""
    if active is None:
        return None
    rig = armature_meant(active)
    if rig is not None:
        if problem := missing_library(rig):
            return problem
        return f"{quoted(rig.name)} is not an SMPL armature: {why_not_smpl(rig)}"
    return missing_library(active) or instance_problem(active)


def _candidate(context: bpy.types.Context) -> bpy.types.Object | None:
    scene = context.scene
    target = scene.chatpose.target if scene is not None else None
    return target if target is not None else find_smpl_armature(context)


def history_messages(scene: bpy.types.Scene, last: int | None = None) -> list[chat.Message]:
    """The chat history; with ``last``, only its last messages (the panel, which draws on
    every redraw, needs no more messages than the lines it shows)."""
    history = scene.chatpose.history
    first = 0 if last is None else max(0, len(history) - last)
    return [
        chat.Message(m.role, m.text, m.attachment, m.poses, _keeps_image(m))
        for m in (history[i] for i in range(first, len(history)))
    ]


def append_history(scene: bpy.types.Scene, messages, image: bpy.types.Image | None = None) -> None:
    """Adds ``messages`` (an exchange) to the scene's history; ``image``, sent with the
    first (the user's), is kept with it."""
    history = scene.chatpose.history
    first = len(history)
    for message in messages:
        item = history.add()
        item.role = message.role
        item.text = message.text
        item.attachment = message.attachment
        item.poses = message.poses
    if image is not None:
        history[first].image = image


_CHAT_IMAGE_PREFIX = "ChatPose "


def pack_chat_image(data: bytes, label: str) -> bpy.types.Image:
    """PNG or JPEG bytes a chat turn sent, as a Blender image packed into the .blend file;
    one already packed with the same bytes (a turn sent again) rather than a copy."""
    for image in bpy.data.images:
        packed = image.packed_file
        if (
            image.name.startswith(_CHAT_IMAGE_PREFIX)
            and packed is not None
            and packed.size == len(data)
            and bytes(packed.data) == data
        ):
            return image
    image = bpy.data.images.new(f"{_CHAT_IMAGE_PREFIX}{label or 'image'}", 1, 1)
    image.pack(data=data, data_len=len(data))
    image.source = "FILE"  # read from the packed bytes, not the 1x1 made here
    return image


def _keeps_image(message: ChatPoseMessage) -> bool:
    # Not its bytes: the panel reads the history on every redraw.
    return message.image is not None and message.image.packed_file is not None


def history_image(message: ChatPoseMessage) -> bytes | None:
    """The image kept with a history message, or None (none kept, or unpacked since)."""
    return bytes(message.image.packed_file.data) if _keeps_image(message) else None


def clear_history(scene: bpy.types.Scene) -> None:
    """Forgets the scene's chat history and the images kept with it."""
    history = scene.chatpose.history
    kept = {m.image for m in history if m.image is not None}
    history.clear()
    for image in kept:
        if image.users == 0:  # not shown or used elsewhere since
            bpy.data.images.remove(image)
