"""The batch record (``core.batch_record``) stored on the armature's action, keying batch lines,
and the take a batch run keys (``TakePin``).

The record is a JSON string custom property on the *action* the keys went into, so it goes
wherever the keys go: saved with the .blend file, undone with the keys, kept with a take that
is pushed to the NLA or swapped for another, copied with a duplicated action. A take with no
record has nothing keyed by a batch. On Blender 4.4+ an action may animate several objects,
each through a slot of its own, so each slot has its own record. Its frames are the action's
own time, which NLA tweak mode may put elsewhere in the scene (``anim.action_time``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import bpy

from shared_protocol.pose import Pose

from ..core.batch_record import (
    BatchRecord,
    PendingLine,
    former_record_properties,
    record_property,
    with_entries_appended,
)
from ..core.posing import root_location
from .anim import action_time, has_no_slot, scene_time, take_fcurves, tweaking
from .armature import rig_geometry
from .fast_keys import write_keys
from .keyframes import write_pose_keys
from .posing import placed_translations, root_location_channels


def _holder(obj: bpy.types.Object) -> tuple[bpy.types.Action | None, str]:
    """The action holding the object's record, and the record's property name there; no
    action while the object has no slot in its action (nothing there is its own yet)."""
    action, name, _ = _holder_and_former(obj)
    return action, name


def _holder_and_former(obj: bpy.types.Object) -> tuple[bpy.types.Action | None, str, tuple]:
    """`_holder`, and the names an older record of the slot may have there."""
    anim = obj.animation_data
    action = anim.action if anim is not None and not has_no_slot(obj) else None
    slot = getattr(anim, "action_slot", None) if action is not None else None
    if slot is None:
        return action, record_property(None), ()
    former = former_record_properties(slot.identifier, len(action.slots))
    return action, record_property(slot.handle), former


def _stored(obj: bpy.types.Object) -> str | None:
    """The object's record as stored: under its name, else under a former one."""
    action, name, former = _holder_and_former(obj)
    if action is None:
        return None
    for key in (name, *former):
        if key in action:
            return action[key]
    return None


# The takes batch lines were keyed into whose handles are not computed yet (settle_batch_keys):
# (the action's session id, its name, which an undo keeps while giving it another id, and the
# slot's identifier). A take swapped out or pushed to the NLA during a run is among them.
_unsettled: set[tuple[int, str, str | None]] = set()

# The record last read or written outside NLA tweak mode (where scene and action frames are
# one): its stored JSON and the record. A batch keys a few lines per timer tick, and parsing
# a 10,000-line record each time stalled Blender; an undo changes the JSON, so it is read anew.
_last: tuple[str, BatchRecord] | None = None


def load_record(obj: bpy.types.Object) -> BatchRecord:
    """The record of the object's current action (empty when it has none), in scene frames;
    ValueError when the stored value is not a record (e.g. edited by hand): the caller decides
    whether to clear it."""
    global _last
    stored = _stored(obj)
    if stored is None:
        return BatchRecord()
    if _last is not None and _last[0] == stored and not tweaking(obj):
        return _last[1]
    record = BatchRecord.from_json(stored)
    record = record.with_frames(lambda frame: round(scene_time(obj, frame)))
    if isinstance(stored, str) and not tweaking(obj):
        _last = (stored, record)
    return record


def save_record(obj: bpy.types.Object, record: BatchRecord) -> None:
    """Stores ``record`` (in scene frames) on the object's current action. Without an action
    nothing is keyed, so there is nothing to record."""
    global _last
    action, name, former = _holder_and_former(obj)
    if action is None:
        return
    for key in former:  # moved to its own name
        if key in action:
            del action[key]
    if tweaking(obj):
        record = record.with_frames(lambda frame: _action_frame(action_time(obj, frame)))
        action[name] = record.to_json()
    else:
        action[name] = stored = record.to_json()
        _last = (stored, record)


def _action_frame(time: float) -> int | float:
    """An action's time as stored: a whole frame as an int; between frames (a scaled NLA
    strip), the time itself, which rounding would move to another scene frame."""
    whole = round(time)
    return whole if abs(time - whole) < 1e-6 else time


def clear_record(obj: bpy.types.Object) -> None:
    """Forget what was keyed in the current action: the next run keys every line again."""
    action, name, former = _holder_and_former(obj)
    for key in (name, *former) if action is not None else ():
        if key in action:
            del action[key]


def give_a_take(obj: bpy.types.Object) -> None:
    """Gives ``obj`` an action to key into when it has none, as Blender's first key would
    ("<object>Action"). Batch Keyframe calls it before it returns, so that its undo step holds
    the action: made by the run's first keys, after that step, an undo (Ctrl+Z while the run
    goes on) crashed Blender. Memfile undo keeps an object unchanged between the two steps as
    it is in memory, its animation data pointing at the action the undo freed."""
    anim = obj.animation_data or obj.animation_data_create()
    if anim.action is None:
        anim.action = bpy.data.actions.new(f"{obj.name}Action")


def key_batch_lines(
    obj: bpy.types.Object,
    items: Sequence[tuple[PendingLine, Pose]],
    *,
    use_translation: bool = False,
    on_floor: bool = False,
) -> BatchRecord:
    """Keys each line's pose at its frame, then records the lines (in that order: a failure
    while keying leaves them pending, so nothing is lost). Returns the updated record. The
    root's location is keyed from each pose's translation with ``use_translation`` or
    ``on_floor`` (the poses placed on the floor: ``posing.placed_on_floor``), and the record
    says which.

    The lines that arrived since the last timer tick come together: all keys in one pass over
    each F-curve (``keyframes.write_pose_keys``), then one update of the record. Only keys are
    written; as after any change to an animation, Blender's next update shows the keyed
    channels as the animation has them at the current frame."""
    if not items:
        return load_record(obj)
    write_pose_keys(
        obj,
        [pose for _, pose in items],
        [line.frame for line, _ in items],
        use_translation=use_translation or on_floor,
        handles=False,  # settle_batch_keys, at the run's end: each update costs the whole curve
    )
    anim = obj.animation_data
    slot = getattr(anim, "action_slot", None)
    _unsettled.add((anim.action.session_uid, anim.action.name, slot and slot.identifier))
    before = load_record(obj)
    record = before.recorded_lines(
        ((line.line, line.text, line.frame) for line, _ in items), use_translation, on_floor
    )
    _save_added(obj, before, record, [line.line for line, _ in items])
    return record


def place_keyed_lines(
    obj: bpy.types.Object,
    record: BatchRecord,
    lines: Sequence[PendingLine],
    *,
    use_translation: bool,
    on_floor: bool,
) -> BatchRecord:
    """Keys the root's location of ``lines``, keyed before without Translation or Keep on
    Floor, from their poses as keyed (rotations and their edits kept), so that turning either
    on asks the service nothing again: with ``on_floor`` each on the floor, its place across
    it kept (``posing.placed_translations``); else at rest, as Translation keys a pose
    without a translation. Only the location keys are written; returns ``record`` with the
    lines recorded with those settings, for the caller to save."""
    if not lines:
        return record
    frames = [line.frame for line in lines]
    translations = placed_translations(obj, frames, on_floor=on_floor)
    rig = rig_geometry(obj)
    locations = root_location(translations, rig.location_frame, rig.units_per_metre)
    write_keys(obj, root_location_channels(obj), frames, locations.T)
    return record.recorded_lines(
        ((line.line, line.text, line.frame) for line in lines), use_translation, on_floor
    )


def _save_added(obj: bpy.types.Object, before: BatchRecord, record: BatchRecord, lines) -> None:
    """Stores ``record``, ``before`` plus ``lines``: added to the stored text where it holds
    ``before`` as last read or written here, at the cost of the new lines (rewriting a
    10,000-line record for each few lines keyed took most of a batch's time); else whole."""
    global _last
    action, name = _holder(obj)
    stored = action.get(name) if action is not None else None
    if _last is not None and _last[1] is before and _last[0] == stored:
        added = with_entries_appended(stored, [record.entry(line) for line in lines])
        if added is not None:
            action[name] = added
            _last = (added, record)
            return
    save_record(obj, record)


def settle_batch_keys(obj: bpy.types.Object | None = None) -> None:
    """Ends what ``key_batch_lines`` left for a run's end: the auto handles of every take it
    keyed (``FCurve.update``; keys written in time order need no sorting, which is all else it
    does), and ``obj``'s record written once a line (each added line is stored after the
    others)."""
    actions = bpy.data.actions
    for uid, name, slot_id in _unsettled:
        action = next((a for a in actions if a.session_uid == uid), None) or actions.get(name)
        if action is None:  # deleted, or undone out of the file
            continue
        slots = getattr(action, "slots", None)
        slot = slots.get(slot_id) if slots is not None and slot_id is not None else None
        for fcurve in take_fcurves(action, slot):
            fcurve.update()
    _unsettled.clear()
    if obj is not None and _stored(obj) is not None:
        save_record(obj, load_record(obj))


@dataclass(frozen=True)
class TakePin:
    """The take a batch run keys: its action, known by its session id (which a rename keeps)
    or by its name (which an undo keeps, giving the action back under another id), and the
    action's slot for the armature; and the actions the file had when the run started, so
    that one assigned since (someone's take) is told from one made since (by the run's first
    keys, or an answer keyed meanwhile)."""

    action: str | None
    uid: int | None
    slot: str | None
    existing: frozenset[str]

    @classmethod
    def at_start(cls, obj: bpy.types.Object) -> TakePin:
        return cls(*_action_and_slot(obj), frozenset(a.name for a in bpy.data.actions))

    def kept(self, obj: bpy.types.Object) -> TakePin:
        """The pin once the run's keys went in: onto the take they made, when it had none, and
        the take's name and id as they are now."""
        action, uid, slot = _action_and_slot(obj)
        return dataclasses.replace(self, action=action, uid=uid, slot=slot)

    def moved(self, obj: bpy.types.Object) -> str | None:
        """Why the run's next keys would go into another take than its own, or None. With no
        action now they would make a new take: fine when the run's own is gone (undone), not
        when it is still there (pushed down to the NLA, tweak mode left, unassigned), where the
        run's first lines are: a rerun in the new take asked them again, and the end said
        "done" with lines still to key."""
        action, uid, slot = _action_and_slot(obj)
        if action is None:
            # By its id first: renamed, then pushed down, it was taken for undone.
            own = next((a for a in bpy.data.actions if a.session_uid == self.uid), None)
            own = own or (bpy.data.actions.get(self.action) if self.action else None)
            if own is None:
                return None
            return (
                f"the take '{own.name}' this run was keying is no longer the armature's "
                "action (pushed down to the NLA, or tweak mode left?): its lines so far are "
                "there; make it the action again (Tab into its strip) to key the rest there"
            )
        same = self.action is not None and (uid == self.uid or action == self.action)
        if same and self.slot in (None, slot):
            return None
        if self.action is None and action not in self.existing:
            return None  # made since the run started
        keyed = f"the take '{self.action}'" if self.action else "an armature without a take"
        return (
            f"the armature now shows the take '{action}', and this run was keying {keyed} "
            "(its lines go into no other take: put that one back to key the rest there)"
        )


def _action_and_slot(obj: bpy.types.Object) -> tuple[str | None, int | None, str | None]:
    """The object's action's name and session id, and its slot's identifier (Nones)."""
    anim = obj.animation_data
    action = anim.action if anim is not None else None
    if action is None:
        return None, None, None
    slot = getattr(anim, "action_slot", None)
    return action.name, action.session_uid, slot.identifier if slot is not None else None
