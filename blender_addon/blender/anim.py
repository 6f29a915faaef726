"""F-curve access that works with Blender 4.2-4.3 actions and 4.4+ slotted (layered) actions."""

from __future__ import annotations

import bpy


def action_fcurves(obj: bpy.types.Object) -> list[bpy.types.FCurve]:
    """The F-curves that animate ``obj`` (empty when it has no action)."""
    anim = obj.animation_data
    action = anim.action if anim is not None else None
    if action is None:
        return []
    slot = getattr(anim, "action_slot", None)
    if slot is not None:  # Blender 4.4+: the channel bag of the object's slot
        try:
            from bpy_extras.anim_utils import action_get_channelbag_for_slot
        except ImportError:  # pragma: no cover - 4.4 betas
            action_get_channelbag_for_slot = None
        if action_get_channelbag_for_slot is not None:
            bag = action_get_channelbag_for_slot(action, slot)
            return list(bag.fcurves) if bag is not None else []
    return list(action.fcurves)  # Blender 4.2-4.3 (removed in 5.0)


def bone_data_path(bone_name: str, prop: str) -> str:
    return f'pose.bones["{bpy.utils.escape_identifier(bone_name)}"].{prop}'


def fcurve_map(obj: bpy.types.Object) -> dict[tuple[str, int], bpy.types.FCurve]:
    """(data_path, array_index) -> F-curve."""
    return {(fc.data_path, fc.array_index): fc for fc in action_fcurves(obj)}
