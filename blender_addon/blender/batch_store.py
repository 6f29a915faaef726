"""The batch record (``core.batch_record``) stored on the armature object, and keying one line.

The record is a JSON string custom property (``RECORD_PROPERTY``) on the armature *object*,
next to its action, so it is saved with the .blend file and undone with the keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import bpy

from shared_protocol.pose import Pose

from ..core.batch_record import RECORD_PROPERTY, BatchRecord, PendingLine
from .keyframes import key_poses
from .posing import apply_pose


def load_record(obj: bpy.types.Object) -> BatchRecord:
    """The object's record (empty when it has none); ValueError when the stored value is not a
    record (e.g. edited by hand): the caller decides whether to clear it."""
    return BatchRecord.from_json(obj.get(RECORD_PROPERTY))


def save_record(obj: bpy.types.Object, record: BatchRecord) -> None:
    obj[RECORD_PROPERTY] = record.to_json()


def clear_record(obj: bpy.types.Object) -> None:
    """Forget what was keyed: the next run keys every line again."""
    if RECORD_PROPERTY in obj:
        del obj[RECORD_PROPERTY]


def key_batch_line(
    obj: bpy.types.Object, line: PendingLine, pose: Pose, *, use_translation: bool = False
) -> BatchRecord:
    """Keys ``pose`` at the line's frame, then records the line (in that order: a failure while
    keying leaves the line pending, so nothing is lost). Returns the updated record."""
    apply_pose(obj, pose, use_translation=use_translation, frame=line.frame)
    record = load_record(obj).recorded(line.line, line.text, line.frame)
    save_record(obj, record)
    return record


def key_batch_lines(
    obj: bpy.types.Object,
    items: Sequence[tuple[PendingLine, Pose]],
    *,
    use_translation: bool = False,
) -> BatchRecord:
    """``key_batch_line`` for several lines at once (the lines that arrived since the last
    timer tick): all keys first (``keyframes.key_poses``, one pass over each F-curve), then one
    update of the record. Returns the updated record."""
    if not items:
        return load_record(obj)
    key_poses(
        obj,
        [pose for _, pose in items],
        [line.frame for line, _ in items],
        use_translation=use_translation,
    )
    record = load_record(obj).recorded_lines(
        (line.line, line.text, line.frame) for line, _ in items
    )
    save_record(obj, record)
    return record
