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
(its handles move with it, so hand-set handles keep their shape); new keys get Blender's
defaults (Bezier, auto-clamped handles); a locked F-curve is refused (``anim.LockedCurveError``,
before anything is written). Not applied: keying sets, "only insert needed", visual keying,
cycle-aware keying.
"""

from __future__ import annotations

from collections.abc import Sequence

import bpy
import numpy as np

from .anim import Channel, action_time, bone_data_path, fcurve_map, refuse_locked

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
    frames = np.array([action_time(obj, frame) for frame in frames.tolist()])
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
    """Keys at or before the curve's last one: a frame with a key gets the new value (its
    handles move with it, so hand-set ones keep their shape); the others are inserted in place
    by Blender (``FCurve.update``'s sort is a bubble sort: 256 keys between 5,000 took it
    1.8 s); FAST leaves their handles to the update."""
    count = len(points)
    co = np.empty(2 * count, dtype=np.float32)
    points.foreach_get("co", co)
    old_frames = co[0::2].astype(np.float64)
    order = np.argsort(old_frames)
    sorted_frames = old_frames[order]
    where = np.clip(np.searchsorted(sorted_frames, frames), 0, count - 1)
    added: list[tuple[float, float]] = []
    for frame, value, at in zip(frames.tolist(), values.tolist(), where.tolist(), strict=True):
        match = [int(order[j]) for j in (at - 1, at)
                 if 0 <= j < count and abs(sorted_frames[j] - frame) < _FRAME_MATCH]  # fmt: skip
        if match:
            point = points[match[-1]]
            delta = value - point.co[1]
            point.co[1] = value
            point.handle_left[1] += delta
            point.handle_right[1] += delta
        else:
            added.append((frame, value))
    for frame, value in added:  # after the replacements: inserting moves the indices
        points.insert(frame, value, options={"FAST"})


def _append(points, frames: np.ndarray, values: np.ndarray) -> None:
    """Keys after the curve's last one (a new curve, or a batch going on), in time order.
    Point by point when the curve already holds more keys than come (a long animation on the
    armature: the cost does not grow with it); else all points at once."""
    order = np.argsort(frames, kind="stable")
    frames, values = frames[order], values[order]
    count, new = len(points), len(frames)
    points.add(new)
    if new < count:
        for k, key in enumerate(zip(frames.tolist(), values.tolist(), strict=True)):
            point = points[count + k]
            point.co = point.handle_left = point.handle_right = key
        return
    total = count + new
    for name in ("co", "handle_left", "handle_right"):  # new handles start on their key
        array = np.empty(2 * total, dtype=np.float32)
        points.foreach_get(name, array)
        array[2 * count :: 2], array[2 * count + 1 :: 2] = frames, values
        points.foreach_set(name, array)
