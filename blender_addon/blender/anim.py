"""F-curve access that works with Blender 4.2-4.3 actions and 4.4+ slotted (layered) actions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import bpy
import numpy as np

from ..core.wording import quoted

Channel = tuple[str, str, int]  # (bone name, property, array index)


def action_fcurves(obj: bpy.types.Object) -> list[bpy.types.FCurve]:
    """The F-curves that animate ``obj`` (empty when it has no action, or no slot of it)."""
    anim = obj.animation_data
    action = anim.action if anim is not None else None
    if action is None:
        return []
    if has_no_slot(obj):
        # A take of another object, assigned in the Action editor: none of its curves move
        # this one (`action.fcurves` would be the other object's), and the first key made
        # gives it a slot of its own.
        return []
    return take_fcurves(action, getattr(anim, "action_slot", None))


def take_fcurves(action: bpy.types.Action, slot=None) -> list[bpy.types.FCurve]:
    """The F-curves of ``action`` for ``slot`` (Blender 4.4+; None before)."""
    if slot is not None:  # Blender 4.4+: the channel bag of the slot
        try:
            from bpy_extras.anim_utils import action_get_channelbag_for_slot
        except ImportError:  # pragma: no cover - 4.4 betas
            action_get_channelbag_for_slot = None
        if action_get_channelbag_for_slot is not None:
            bag = action_get_channelbag_for_slot(action, slot)
            return list(bag.fcurves) if bag is not None else []
    return list(action.fcurves)  # Blender 4.2-4.3 (removed in 5.0)


def has_no_slot(obj: bpy.types.Object) -> bool:
    """Whether ``obj`` has an action but, on Blender 4.4+, no slot in it: the action then
    animates other objects, not this one."""
    anim = obj.animation_data
    if anim is None or anim.action is None or not hasattr(anim, "action_slot"):
        return False
    return anim.action_slot is None


def bone_data_path(bone_name: str, prop: str) -> str:
    return f'pose.bones["{bpy.utils.escape_identifier(bone_name)}"].{prop}'


def fcurve_map(obj: bpy.types.Object) -> dict[tuple[str, int], bpy.types.FCurve]:
    """(data_path, array_index) -> F-curve."""
    return {(fc.data_path, fc.array_index): fc for fc in action_fcurves(obj)}


class LockedCurveError(ValueError):
    """A channel to key has an F-curve that Blender would not key (locked, in a locked group,
    of samples, under a modifier that overrides keys), or its action is linked from a library:
    keys would not be written, or not kept."""


# Modifiers after which a curve's keys still take effect; a generator only when it adds to
# them. Blender's own test (BKE_fcurve_are_keyframes_usable), which `keyframe_insert` applies.
_KEYS_KEPT_BY = frozenset({"CYCLES", "STEPPED", "NOISE"})
_ADDING = frozenset({"GENERATOR", "FNGENERATOR"})


def why_not_keyable(fcurve: bpy.types.FCurve) -> str | None:
    """Why Blender keys no pose into ``fcurve``, with the remedy, or None when it does: the
    curve or its channel group locked, samples instead of keys, or a modifier that overrides
    the keys."""
    if fcurve.lock:
        return "is locked; unlock it"
    if fcurve.group is not None and fcurve.group.lock:
        return f"is in the locked channel group {quoted(fcurve.group.name)}; unlock the group"
    if len(fcurve.sampled_points):
        return "holds samples, not keys; turn them into keys (Graph Editor: Samples to Keys)"
    for modifier in fcurve.modifiers:
        if modifier.mute or not modifier.is_valid or modifier.type in _KEYS_KEPT_BY:
            continue
        if modifier.type in _ADDING and modifier.use_additive:
            continue
        return f"has a {modifier.type.title()} modifier that overrides its keys; mute it"
    return None


def linked_action_problem(obj: bpy.types.Object, so: str) -> str | None:
    """Why the object's action cannot be changed (``so``: what that stops): it is linked from
    a library file; None when it is not. Its remedy is a copy, not Make Local, which would cut
    a library override off from its library."""
    anim = obj.animation_data
    action = anim.action if anim is not None else None
    if action is None or action.library is None:
        return None
    return (
        f"the action {quoted(action.name)} is linked from {action.library.filepath}, so {so}; "
        f"give {obj.name} an action of its own (the Action editor's New Action button beside the "
        "action's name makes a copy)"
    )


def refuse_locked(obj: bpy.types.Object, channels: Iterable[Channel]) -> None:
    """LockedCurveError naming the first of ``channels`` whose F-curve Blender would not key
    (`why_not_keyable`), or the object's action when it is linked from a library file. Checked
    before anything is written: ``keyframe_insert`` skips such a channel, and every channel of
    a linked action, with only a line on the console, which would leave a pose half keyed, or
    not keyed while the add-on said it was; keys written straight into a sampled curve damage
    it."""
    if problem := linked_action_problem(obj, "keys cannot go into it"):
        raise LockedCurveError(problem)
    fcurves = fcurve_map(obj)
    groups = {fc.group.name: fc.group for fc in fcurves.values() if fc.group is not None}
    for bone, prop, index in channels:
        fcurve = fcurves.get((bone_data_path(bone, prop), index))
        if fcurve is not None:
            reason = why_not_keyable(fcurve)
        elif (group := groups.get(bone)) is not None and group.lock:  # where a new one goes
            reason = f"would go into the locked channel group {quoted(bone)}; unlock the group"
        else:
            reason = None
        if reason:
            channel = channel_label(prop, index)
            raise LockedCurveError(f"the {channel} channel of {bone} {reason} to key this pose")


# What the Graph Editor and the Dope Sheet call a transform property's channels.
_PROPERTY_LABELS = {
    "location": "Location",
    "rotation_quaternion": "Quaternion Rotation",
    "rotation_euler": "Euler Rotation",
    "rotation_axis_angle": "Axis-Angle Rotation",
    "scale": "Scale",
}


def property_label(prop: str) -> str:
    """A transform property as the animator reads it: "rotation_euler" -> "Euler Rotation"."""
    return _PROPERTY_LABELS.get(prop) or prop.replace("_", " ").title()


def channel_label(prop: str, index: int) -> str:
    """One channel of a transform property as the Graph Editor lists it: "W Quaternion
    Rotation", "X Location"."""
    axes = "WXYZ" if prop in ("rotation_quaternion", "rotation_axis_angle") else "XYZ"
    name = property_label(prop)
    return f"{axes[index]} {name}" if 0 <= index < len(axes) else name


def muted_note(obj: bpy.types.Object, channels: Iterable[Channel]) -> str | None:
    """A note naming the bones whose keys on ``channels`` do not play, their F-curve being
    muted (Blender keys a muted curve all the same, without a word), or None."""
    fcurves = fcurve_map(obj)
    muted: list[str] = []
    for bone, prop, index in channels:
        fcurve = fcurves.get((bone_data_path(bone, prop), index))
        if fcurve is not None and fcurve.mute and bone not in muted:
            muted.append(bone)
    if not muted:
        return None
    more = f" and {len(muted) - 4} more" if len(muted) > 4 else ""
    return (
        f"on {quoted(obj.name)}, F-curves of {', '.join(muted[:4])}{more} are muted: keys go "
        "into them and do not play until they are unmuted"
    )


def animated(obj: bpy.types.Object, channels: Iterable[Channel]) -> bool:
    """Whether the animation sets any of ``channels`` at each frame change (an unmuted F-curve
    with keys or samples, or a strip's action with a curve on one, muted or not: Blender puts
    what the NLA animates back to its default then): a pose set on them unkeyed is put back."""
    anim = obj.animation_data
    if anim is None:
        return False
    channels = list(channels)
    paths = {bone_data_path(bone, prop) for bone, prop, _ in channels}
    strips = [s for track in anim.nla_tracks for s in track.strips] if anim.use_nla else []
    for strip in strips:
        if strip.action is not None:
            curves = take_fcurves(strip.action, getattr(strip, "action_slot", None))
            if any(fcurve.data_path in paths for fcurve in curves):
                return True
    fcurves = fcurve_map(obj)
    for bone, prop, index in channels:
        fcurve = fcurves.get((bone_data_path(bone, prop), index))
        if fcurve is not None and not fcurve.mute:
            if len(fcurve.keyframe_points) or len(fcurve.sampled_points):
                return True
    return False


def tweaking(obj: bpy.types.Object) -> bool:
    """Whether the object is in NLA tweak mode, where its action's time is not the scene's:
    the strip being edited may start elsewhere, be scaled or repeat."""
    anim = obj.animation_data
    return anim is not None and anim.use_tweak_mode


def action_time(obj: bpy.types.Object, frame: float) -> float:
    """A scene frame as the time of the object's action (``tweaking``). Keys written straight
    into F-curves, and F-curves read at a frame, need the action's time; ``keyframe_insert``
    maps it by itself."""
    if not tweaking(obj):
        return frame
    return obj.animation_data.nla_tweak_strip_time_to_scene(frame, invert=True)


def action_times(obj: bpy.types.Object, frames: Sequence[float]) -> np.ndarray:
    """``action_time`` of each of ``frames``, (N,) float64; out of tweak mode, the frames."""
    if not tweaking(obj):
        return np.asarray(frames, dtype=np.float64).reshape(-1)
    return np.array([action_time(obj, frame) for frame in frames], dtype=np.float64)


def scene_time(obj: bpy.types.Object, frame: float) -> float:
    """The action's time ``frame`` as a scene frame (``action_time``'s inverse)."""
    if not tweaking(obj):
        return frame
    return obj.animation_data.nla_tweak_strip_time_to_scene(frame)


def start_new_take(obj: bpy.types.Object, name: str) -> str | None:
    """Gives ``obj`` a new, empty action called ``name`` when the one it plays has keys, and
    returns that one's name (else None). The old take keeps a fake user, so the file keeps it
    when it is saved: nothing the animator keyed is lost, and the Action editor brings it
    back. In NLA tweak mode the strip being edited stays (Blender lets no other action in)."""
    anim = obj.animation_data
    if anim is None or anim.action is None or anim.use_tweak_mode or not action_fcurves(obj):
        return None
    old = anim.action
    old.use_fake_user = True
    anim.action = bpy.data.actions.new(name)
    return old.name
