"""The batch record (``core.batch_record``) stored on the armature's action, and keying one line.

The record is a JSON string custom property (``RECORD_PROPERTY``) on the *action* the keys went
into, so it goes wherever the keys go: saved with the .blend file, undone with the keys, kept
with a take that is pushed to the NLA or swapped for another, copied with a duplicated action.
A take with no record has nothing keyed by a batch. Earlier builds of the add-on kept the
record on the armature object; such a record is read while the action has none, and moves to
the action the next time the record is saved.
"""

from __future__ import annotations

from collections.abc import Sequence

import bpy

from shared_protocol.pose import Pose

from ..core.batch_record import RECORD_PROPERTY, BatchRecord, PendingLine
from .keyframes import key_poses
from .posing import apply_pose


def _action(obj: bpy.types.Object) -> bpy.types.Action | None:
    anim = obj.animation_data
    return anim.action if anim is not None else None


def load_record(obj: bpy.types.Object) -> BatchRecord:
    """The record of the object's current action (empty when it has none); ValueError when the
    stored value is not a record (e.g. edited by hand): the caller decides whether to clear
    it."""
    action = _action(obj)
    stored = action.get(RECORD_PROPERTY) if action is not None else None
    if stored is None:
        stored = obj.get(RECORD_PROPERTY)  # an older version's record
    return BatchRecord.from_json(stored)


def save_record(obj: bpy.types.Object, record: BatchRecord) -> None:
    """Stores ``record`` on the object's current action. Without an action nothing is keyed,
    so there is nothing to record."""
    action = _action(obj)
    if action is not None:
        action[RECORD_PROPERTY] = record.to_json()
    if RECORD_PROPERTY in obj:
        del obj[RECORD_PROPERTY]


def clear_record(obj: bpy.types.Object) -> None:
    """Forget what was keyed in the current action: the next run keys every line again."""
    action = _action(obj)
    for holder in (obj, action):
        if holder is not None and RECORD_PROPERTY in holder:
            del holder[RECORD_PROPERTY]


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
