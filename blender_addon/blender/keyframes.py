"""Keying poses and motions on the SMPL armature; AMASS-layout .npz import and export."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import bpy
import numpy as np

from shared_protocol.pose import Motion, Pose

from ..core.posing import bone_quaternions, root_location
from ..core.timeline import ON_FRAME, frames_for, keyed_frame_list, motion_frames, playback_rate
from ..core.wording import quoted
from .anim import (
    action_fcurves,
    bone_data_path,
    fcurve_map,
    property_label,
    scene_time,
    take_fcurves,
    tweaking,
)
from .armature import bone_names, rest_joints, rig_geometry
from .fast_keys import write_keys
from .posing import (
    apply_pose,
    channel_values,
    pose_channels,
    read_poses,
    rotation_channel_values,
    rotation_data_path,
)

# Custom properties on the armature object that keep what a pose does not hold.
GENDER_PROPERTY = "chatpose_gender"
BETAS_PROPERTY = "chatpose_betas"


def key_poses(
    obj: bpy.types.Object,
    poses: Sequence[Pose],
    frames: Sequence[int],
    *,
    use_translation: bool = True,
) -> list[str]:
    """Keys ``poses[i]`` at ``frames[i]`` (``write_pose_keys``) and leaves the bones in the
    last pose; returns the bones not in QUATERNION mode."""
    write_pose_keys(obj, poses, frames, use_translation=use_translation)
    if not poses:
        return []
    return apply_pose(obj, poses[-1], use_translation=use_translation).non_quaternion_bones


def write_pose_keys(
    obj: bpy.types.Object,
    poses: Sequence[Pose],
    frames: Sequence[int],
    *,
    use_translation: bool = True,
    handles: bool = True,
) -> None:
    """Keys ``poses[i]`` at scene frame ``frames[i]``, writing keys only (their auto handles
    now, or with ``handles=False`` by ``batch_store.settle_batch_keys``): the bones' current
    values are not set (as after any change to an animation, Blender's next update shows the
    keyed channels as the animation has them at the current frame).

    The same keys as ``apply_pose(..., frame=f)`` for each pose in turn (a later pose for the
    same frame wins), each bone in its own rotation mode; but written at once (``fast_keys``:
    1,000 poses in well under a second instead of seconds). One difference: with
    ``use_translation`` (a batch's Translation, a motion's import) a pose without a translation
    keys the root's location at rest, where ``apply_pose`` leaves it alone.
    """
    if len(poses) != len(frames):
        raise ValueError(f"{len(poses)} poses but {len(frames)} frames")
    if not poses:
        return
    last: dict[int, int] = {}  # frame -> index of the last pose for it
    for i, frame in enumerate(frames):
        last[int(frame)] = i
    order = sorted(last)  # frames in time order, so signs and Euler turns follow the timeline
    picked = [poses[last[f]] for f in order]
    rig = rig_geometry(obj)
    quats = bone_quaternions(np.stack([p.axis_angle for p in picked]), rig.rest_rotations)
    fcurves = fcurve_map(obj)
    rows: list = []  # in the order of pose_channels
    for j, name in enumerate(bone_names(obj)):
        if name is None:  # a hand an SMPL-H or SMPL-X rig does not have
            continue
        pbone = obj.pose.bones[name]
        path = rotation_data_path(pbone.rotation_mode)
        # Carry on from the keys before (signs, Euler turns), not from the bone's value now.
        before = channel_values(fcurves, pbone, path, [order[0]])[0]
        values = rotation_channel_values(quats[:, j], pbone.rotation_mode, before)  # (N, k)
        rows.append(values.T)
    if use_translation:
        t = np.stack([np.zeros(3) if p.translation is None else p.translation for p in picked])
        rows.append(root_location(t, rig.location_frame, rig.units_per_metre).T)  # (3, N)
    channels = pose_channels(obj, use_translation)
    write_keys(obj, channels, order, np.concatenate(rows), handles=handles)


def key_motion(
    obj: bpy.types.Object,
    motion: Motion,
    start: int,
    step: int = 1,
    *,
    use_translation: bool = True,
) -> list[int]:
    """Keys every frame of ``motion`` from ``start``, ``step`` frames apart; returns the frames.

    The motion's gender and betas are kept for ``motion_from_keys`` on the action keyed (each
    take its own subject) and on the object.
    """
    frames = frames_for(len(motion), start, step)
    key_poses(obj, motion.poses(), frames, use_translation=use_translation)
    action = obj.animation_data.action if obj.animation_data is not None else None
    for holder in (obj, action):
        if holder is not None and holder.library is None:
            holder[GENDER_PROPERTY] = motion.gender
            holder[BETAS_PROPERTY] = [float(b) for b in motion.betas]
    return frames


def keyed_frames(obj: bpy.types.Object) -> list[int]:
    """Scene frames with a key on a pose channel (an SMPL bone's rotation, the root's
    location: not another bone's, which a pose does not hold), or a sample on a channel that
    holds samples instead (a baked take), sorted; ValueError for a key between frames
    (`keyed_frame_list`)."""
    names = bone_names(obj)
    paths = {
        bone_data_path(name, prop) for name in filter(None, names) for prop in ROTATION_CHANNELS
    }
    paths.add(bone_data_path(names[0], "location"))
    times = [
        _point_times(points)
        for fc in action_fcurves(obj)
        if fc.data_path in paths
        for points in (fc.keyframe_points, fc.sampled_points)
    ]
    # Read in one go per curve: a point at a time, a 6,000-frame take's 600,000 keys took a
    # second before export could start.
    distinct = np.unique(np.concatenate(times)) if times else ()
    frames = [scene_time(obj, float(t)) for t in distinct]
    try:
        return keyed_frame_list(frames)
    except ValueError:
        if not tweaking(obj):
            raise
    # A scaled strip puts the action's whole-frame keys between the scene's frames, and
    # snapping them in the scene would move them off the action's: every frame it spans.
    return list(range(math.ceil(min(frames) - ON_FRAME), math.floor(max(frames) + ON_FRAME) + 1))


def _point_times(points) -> np.ndarray:
    """The frames of a curve's keyframe or sampled points (their ``co[0]``)."""
    co = np.empty(2 * len(points), dtype=np.float32)
    points.foreach_get("co", co)
    return co[0::2]


ROTATION_CHANNELS = ("rotation_quaternion", "rotation_euler", "rotation_axis_angle")


def scene_fps(scene: bpy.types.Scene) -> float:
    return playback_rate(scene.render.fps, scene.render.fps_base)


def motion_from_keys(
    obj: bpy.types.Object,
    fps: float,
    frames: Sequence[int] | None = None,
    labels: Mapping[int, str] | None = None,
) -> Motion:
    """The armature's keyed frames read back as a Motion (``timeline.motion_frames``: from the
    first key to the last, every greatest common gap between keys, at ``fps`` divided by it), or
    ``frames``, at ``fps``; each frame of ``labels`` labelled (a batch line's prompt, say).

    With no keys at all, the current pose is the one frame.
    """
    rate = fps
    if frames is None:
        frames, rate = motion_frames(keyed_frames(obj), fps)
    poses = read_poses(obj, frames or None)
    if labels and frames:
        poses = [
            dataclasses.replace(p, label=labels.get(f)) for p, f in zip(poses, frames, strict=True)
        ]
    action = obj.animation_data.action if obj.animation_data is not None else None
    subject = action if action is not None and GENDER_PROPERTY in action else obj
    gender = subject.get(GENDER_PROPERTY, "neutral")
    betas = subject.get(BETAS_PROPERTY)
    return Motion.from_poses(
        poses,
        fps=rate,
        gender=gender if gender in ("neutral", "male", "female") else "neutral",
        betas=None if betas is None else np.array(list(betas), dtype=np.float64),
    )


def import_npz(
    obj: bpy.types.Object,
    path: str | os.PathLike,
    *,
    start: int,
    step: int = 1,
    use_translation: bool = True,
    scene: bpy.types.Scene | None = None,
    z_up: bool = True,
    resample_fps: float | None = None,
) -> tuple[Motion, list[int]]:
    """Loads an AMASS-layout .npz and keys it, resampled to ``resample_fps`` if given (the
    scene's rate over ``step``); with ``scene``, sets its frame range to the motion, and its
    frame rate too (to the nearest whole fps with a matching base) unless resampled, unless
    the motion is one pose: that has no rate, and a range of one frame would stop the scene's
    other animation playing.

    A Z-up file is AMASS's world: its translation puts the pelvis there (SMPL adds it to the
    rest pelvis: ``amass_trans_offset``), its floor (z = 0) under the armature's rest pose (at
    its soles, ``SOLE_DEPTH`` below its lowest joint), so a motion stands where the armature
    stands. With ``z_up`` False the file is in the SMPL body frame and holds this project's
    translations: the pelvis's offset from its rest position."""
    motion = Motion.load_npz(path, z_up=z_up, rest_joints=rest_joints(obj))
    if resample_fps is not None:
        motion = motion.resampled(resample_fps)
    frames = key_motion(obj, motion, start, step, use_translation=use_translation)
    if scene is not None and len(frames) > 1:
        if resample_fps is None:
            playback = motion.fps * step
            scene.render.fps = max(1, round(playback))
            scene.render.fps_base = scene.render.fps / playback
        scene.frame_start, scene.frame_end = frames[0], frames[-1]
    return motion, frames


# An object's own transform channels: what moves a rig as a whole, rather than its bones.
_OBJECT_TRANSFORM = {
    f"{delta}{prop}"
    for delta in ("", "delta_")
    for prop in (
        "location",
        "rotation_euler",
        "rotation_quaternion",
        "rotation_axis_angle",
        "scale",
    )
}


def placement_left_out(obj: bpy.types.Object) -> str:
    """What moves ``obj`` as a whole during its animation, which its exported motion leaves
    out: the file holds the armature's bones, in the armature object's space (where the object
    stands in the scene is the scene's layout, not the motion). '' when nothing moves it or a
    parent: keys whose values change (its own or an NLA strip's), a driver, or a constraint
    that follows a target, on its transform. Read from the animation data, not by playing
    the frames, which would undo unkeyed changes to the pose."""
    for item in (obj, *_parents(obj)):
        why = _what_moves(item)
        if why:
            return f"{item.name} moves as a whole: {why}"
    return ""


# Constraints that only hold an object within limits, moving it nowhere by themselves.
_HOLDING_CONSTRAINTS = {"LIMIT_LOCATION", "LIMIT_ROTATION", "LIMIT_SCALE", "MAINTAIN_VOLUME"}
# F-curve modifiers that repeat or hold a curve's keys: constant keys stay constant.
_KEY_KEEPING_MODIFIERS = {"CYCLES", "STEPPED"}


def _what_moves(item: bpy.types.Object) -> str:
    animation = item.animation_data
    takes = [("its keys change", action_fcurves(item))]
    seen = set()
    for track in animation.nla_tracks if animation else ():
        for strip in track.strips if not track.mute else ():
            slot = getattr(strip, "action_slot", False)  # Blender 4.4+; None: animates nothing
            if strip.action is None or strip.mute or slot is None:
                continue
            if (strip.action, slot) not in seen:  # one take in many strips is read once
                seen.add((strip.action, slot))
                fcurves = take_fcurves(strip.action, slot or None)
                takes.append((f"the NLA strip {quoted(strip.name)} changes", fcurves))
    for what, fcurves in takes:
        moving = {fc.data_path for fc in fcurves if _moves(fc)}
        if moving:
            return f"{what} its {', '.join(property_label(p) for p in sorted(moving))}"
    driven = {
        driver.data_path
        for driver in (animation.drivers if animation else ())
        if not driver.mute and driver.data_path in _OBJECT_TRANSFORM
    }
    if driven:
        return f"a driver sets its {', '.join(property_label(p) for p in sorted(driven))}"
    for constraint in item.constraints:
        if (
            constraint.type not in _HOLDING_CONSTRAINTS
            and not constraint.mute
            and constraint.influence > 0.0
            and constraint.is_valid  # one without its target does nothing
        ):
            return f"its constraint {quoted(constraint.name)} moves it"
    return ""


def _moves(fcurve: bpy.types.FCurve) -> bool:
    """Whether an unmuted F-curve of an object's transform takes more than one value (its keys,
    or its samples once baked), or a modifier changes it."""
    if fcurve.data_path not in _OBJECT_TRANSFORM or fcurve.mute:
        return False
    points = fcurve.keyframe_points if len(fcurve.keyframe_points) else fcurve.sampled_points
    co = np.empty(2 * len(points))
    points.foreach_get("co", co)
    if len(points) and np.ptp(co[1::2]) > 1e-6:
        return True
    return any(
        not modifier.mute and modifier.type not in _KEY_KEEPING_MODIFIERS
        for modifier in fcurve.modifiers
    )


def _parents(obj: bpy.types.Object) -> list[bpy.types.Object]:
    parents = []
    while obj.parent is not None and obj.parent not in parents:
        obj = obj.parent
        parents.append(obj)
    return parents


def export_npz(
    obj: bpy.types.Object,
    path: str | os.PathLike,
    fps: float,
    *,
    z_up: bool = True,
    labels: Mapping[int, str] | None = None,
) -> tuple[Motion, list[int]]:
    """Writes the armature's keyed frames (``motion_from_keys``) to ``path``; returns the
    motion and the scene frames it holds (none: the current pose)."""
    frames, rate = motion_frames(keyed_frames(obj), fps)
    motion = motion_from_keys(obj, rate, frames, labels=labels)
    motion.save_npz(path, z_up=z_up, rest_joints=rest_joints(obj))
    return motion, frames
