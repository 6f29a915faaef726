"""Writing keyframes straight into F-curves: many frames and channels at once.

``PoseBone.keyframe_insert`` goes through Blender's whole keying machinery for each channel
(about 0.17 ms per call: 4 ms for one SMPL pose, 4 s for 1,000). Here the F-curve is created
once by ``keyframe_insert`` (so the action, its slot on Blender 4.4+, the F-curve and its group
are made exactly as Blender makes them), and the keys are then written with
``keyframe_points.add`` and ``foreach_get``/``foreach_set`` (keys after the last one) or
``keyframe_points.insert`` (keys between existing ones), in time order, followed by one
``FCurve.update`` (recomputes auto handles). That update costs time in proportion to the
curve's keys (0.4 s for an SMPL pose's 96 curves of 10,000 keys): a batch, keying a few lines
at a time, leaves it for its end (``handles=False``; ``batch_store.settle_batch_keys``), and
its new keys' handles sit on the key until then (straight lines between keys).

Same result as ``keyframe_insert``: a key at a frame that already has one replaces its value
(its handles move with it, so hand-set handles keep their shape); new keys get auto-clamped
handles and, as in Blender, the interpolation of the key before them once the curve holds
more than two, else Bezier; a locked F-curve is refused (``anim.LockedCurveError``,
before anything is written). Not applied: keying sets, "only insert needed", visual keying,
cycle-aware keying.
"""

from __future__ import annotations

from collections.abc import Sequence

import bpy
import numpy as np

from .anim import Channel, action_times, bone_data_path, fcurve_map, refuse_locked

_FRAME_MATCH = 0.01  # Blender's own (BEZT_BINARYSEARCH_THRESH): one key per frame


def _ensure_fcurves(obj: bpy.types.Object, channels: Sequence[Channel], frame: float) -> dict:
    fcurves = fcurve_map(obj)
    missing = {
        (bone, prop)
        for bone, prop, index in channels
        if (bone_data_path(bone, prop), index) not in fcurves
    }
    if not missing:
        return fcurves
    pbones = obj.pose.bones
    for bone, prop in sorted(missing):
        pbones[bone].keyframe_insert(prop, frame=frame, group=bone)
    return fcurve_map(obj)


def write_keys(
    obj: bpy.types.Object,
    channels: Sequence[Channel],
    frames: Sequence[float],
    values,
    *,
    handles: bool = True,
) -> None:
    """Keys ``values[c, n]`` on channel ``channels[c]`` at scene frames ``frames[n]`` (distinct);
    the auto handles are computed now, or with ``handles=False`` later, by the caller."""
    frames = np.asarray(frames, dtype=np.float64).reshape(-1)
    values = np.asarray(values, dtype=np.float64).reshape(len(channels), len(frames))
    if not len(frames) or not len(channels):
        return
    refuse_locked(obj, channels)  # before _ensure_fcurves keys anything
    fcurves = _ensure_fcurves(obj, channels, float(frames[0]))
    frames = action_times(obj, frames)
    for (bone, prop, index), row in zip(channels, values, strict=True):
        fcurve = fcurves[(bone_data_path(bone, prop), index)]
        _write_curve(fcurve, frames, row)
        if handles:
            fcurve.update()


def _write_curve(fcurve: bpy.types.FCurve, frames: np.ndarray, values: np.ndarray) -> None:
    points = fcurve.keyframe_points
    last = points[-1].co[0] if len(points) else -np.inf
    later = frames > last + _FRAME_MATCH
    if not later.all():
        _replace_or_insert(points, frames[~later], values[~later])
    if later.any():
        _append(points, frames[later], values[later])


def _replace_or_insert(points, frames: np.ndarray, values: np.ndarray) -> None:
    """Keys at or before the curve's last one, each placed by Blender's binary search: a frame
    with a key (within ``_FRAME_MATCH``) gets the new value, its handles moving with it (so
    hand-set ones keep their shape) and its type and interpolation kept; the others are
    inserted in place (``FCurve.update``'s sort is a bubble sort: 256 keys between 5,000 took
    it 1.8 s). FAST leaves the handles of new keys to the update. Reading the curve's keys to
    find the frames here instead cost a fixed 20 ms a batch pass among 5,000 keys."""
    for frame, value in zip(frames.tolist(), values.tolist(), strict=True):
        points.insert(frame, value, options={"FAST"})


def _append(points, frames: np.ndarray, values: np.ndarray) -> None:
    """Keys after the curve's last one (a new curve, or a batch going on), in time order.
    Point by point when the curve already holds more keys than come (a long animation on the
    armature: the cost does not grow with it); else all points at once. As Blender keys them,
    new keys after two or more take the last one's interpolation: a stepped take stays
    stepped."""
    order = np.argsort(frames, kind="stable")
    frames, values = frames[order], values[order]
    count, new = len(points), len(frames)
    # New points are Bezier: set only another (a setting per point is a tenth of the time).
    interpolation = points[count - 1].interpolation if count >= 2 else "BEZIER"
    points.add(new)
    if new < count:
        for k, key in enumerate(zip(frames.tolist(), values.tolist(), strict=True)):
            point = points[count + k]
            point.co = point.handle_left = point.handle_right = key
            if interpolation != "BEZIER":
                point.interpolation = interpolation
        return
    total = count + new
    for name in ("co", "handle_left", "handle_right"):  # new handles start on their key
        array = np.empty(2 * total, dtype=np.float32)
        points.foreach_get(name, array)
        array[2 * count :: 2], array[2 * count + 1 :: 2] = frames, values
        points.foreach_set(name, array)
    if interpolation != "BEZIER":
        interpolations = np.empty(total, dtype=np.int32)
        points.foreach_get("interpolation", interpolations)
        interpolations[count:] = interpolations[count - 1]
        points.foreach_set("interpolation", interpolations)
