"""Put an SMPL pose on an armature, and read one back.

Rotation modes: the pose goes into whatever rotation mode each bone has. QUATERNION bones get
the quaternion (sign chosen to lie next to the bone's current value, so keys interpolate the
short way), AXIS_ANGLE bones the axis and angle, Euler bones the Euler angles in their order
(the solution closest to the current value). Nothing in the user's rig is switched over, and
the keys go into that mode's channel. ``apply_pose`` returns the names of the bones that were
not in QUATERNION mode so that operators can report them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import bpy
import numpy as np
from mathutils import Euler, Quaternion

from shared_protocol.pose import Pose
from shared_protocol.rotations import axis_angle_to_quaternion, quaternion_to_axis_angle

from ..core.posing import (
    axis_angle_from_bone_quaternions,
    bone_quaternions,
    continuous_axis_angles,
    continuous_quaternions,
    floor_translation,
    root_location,
    translation_from_root_location,
)
from ..core.timeline import ON_FRAME
from ..core.wording import quoted
from .anim import Channel, action_times, bone_data_path, fcurve_map, refuse_locked
from .armature import bone_names, rest_joints, rig_geometry


def rotation_data_path(mode: str) -> str:
    if mode == "QUATERNION":
        return "rotation_quaternion"
    if mode == "AXIS_ANGLE":
        return "rotation_axis_angle"
    return "rotation_euler"


def set_bone_rotations(pbones: Sequence[bpy.types.PoseBone], quaternions, befores) -> None:
    """Sets each bone's rotation to its quaternion (K, 4) in its own rotation mode (see the
    module docstring), its quaternion sign or Euler turn next to its ``befores`` row (None:
    the bone's value now). The QUATERNION bones' signs are chosen in one go (a pose is 24
    bones, and per-bone numpy calls were most of the time it took)."""
    befores = [
        list(getattr(pbone, rotation_data_path(pbone.rotation_mode))) if before is None else before
        for pbone, before in zip(pbones, befores, strict=True)
    ]
    quaternion_rows = [k for k, pbone in enumerate(pbones) if pbone.rotation_mode == "QUATERNION"]
    q = np.asarray(quaternions, dtype=np.float64)
    signed = continuous_quaternions(
        q[None, quaternion_rows], np.array([befores[k] for k in quaternion_rows]).reshape(-1, 4)
    )[0]
    values = dict(zip(quaternion_rows, signed.tolist(), strict=True))
    for k, pbone in enumerate(pbones):
        mode = pbone.rotation_mode
        row = values[k] if k in values else rotation_channel_values([q[k]], mode, befores[k])[0]
        setattr(pbone, rotation_data_path(mode), list(row))


def rotation_channel_values(quaternions, mode: str, before) -> np.ndarray:
    """(N, 4) bone quaternions in time order -> (N, k) values of ``mode``'s channel, as
    ``set_bone_rotations`` would set them one after the other from ``before`` (the channel's
    values before the first): quaternion signs and Euler angles each next to the one before."""
    q = np.asarray(quaternions, dtype=np.float64)
    if mode == "QUATERNION":
        return continuous_quaternions(q, np.asarray(before, dtype=np.float64))
    if mode == "AXIS_ANGLE":
        # In float64: mathutils' float32 acos(w) loses small angles (1e-4 rad read back as 0).
        return continuous_axis_angles(quaternion_to_axis_angle(q), before)
    previous = Euler(before, mode)
    values = np.empty((len(q), 3))
    for n, wxyz in enumerate(q.tolist()):
        previous = Quaternion(wxyz).to_euler(mode, previous)
        values[n] = previous
    return values


def bone_rotation_quaternions(pbone: bpy.types.PoseBone, rows) -> np.ndarray:
    """(N, k) values of the bone's rotation channel (``rotation_data_path``) -> (N, 4) unit
    quaternions of the rotations Blender poses the bone with."""
    rows = np.asarray(rows, dtype=np.float64)
    mode = pbone.rotation_mode
    if mode == "QUATERNION":
        norm = np.linalg.norm(rows, axis=-1, keepdims=True)
        unit = rows / np.where(norm > 0, norm, 1.0)
        return np.where(norm > 0, unit, [0.0, 1.0, 0.0, 0.0])  # as Blender takes a zero one
    if mode == "AXIS_ANGLE":
        angles, axes = rows[:, 0], rows[:, 1:]
        length = np.linalg.norm(axes, axis=-1)
        vectors = axes / np.where(length > 0, length, 1.0)[:, None] * angles[:, None]
        vectors[length == 0] = 0.0  # no axis: no rotation
        return axis_angle_to_quaternion(vectors)
    return np.array([tuple(Euler(row, mode).to_quaternion()) for row in rows.tolist()])


@dataclass
class ApplyResult:
    non_quaternion_bones: list[str] = field(default_factory=list)
    keyed_frame: int | None = None


def apply_pose(
    obj: bpy.types.Object,
    pose: Pose,
    *,
    use_translation: bool = True,
    frame: int | None = None,
    key_options: frozenset[str] = frozenset(),
) -> ApplyResult:
    """Puts ``pose`` on the SMPL armature ``obj``; keys it at ``frame`` when given, with
    ``keyframe_insert``'s ``key_options`` (``auto_key_options``: Auto Keying's own); the
    result's ``keyed_frame`` says whether any key went in.

    Every SMPL bone gets its rotation (index 0, the global orientation, on the root bone);
    non-root bones get zero location, all bones unit scale, so that the joints are exactly the
    pose's forward kinematics. With ``use_translation`` the root's location becomes the pose's
    translation; without, or when the pose has none (the model's never do), the root's location
    is left alone, so a character keeps its place in the shot.
    Keys: the rotation channel of every SMPL bone, and the root's location when it is set;
    LockedCurveError, before anything changes, when one of them is locked.
    """
    use_translation = use_translation and pose.translation is not None
    if frame is not None:
        refuse_locked(obj, pose_channels(obj, use_translation))
    rig = rig_geometry(obj)
    quats = bone_quaternions(pose.axis_angle, rig.rest_rotations)
    result = ApplyResult()
    pbones = obj.pose.bones
    names = bone_names(obj)
    posed = [i for i, name in enumerate(names) if name is not None]  # no hands a rig lacks
    posed_bones = [pbones[names[i]] for i in posed]
    result.non_quaternion_bones = [b.name for b in posed_bones if b.rotation_mode != "QUATERNION"]
    befores = [None] * len(posed)
    if frame is not None:
        # A key carries on from the animation at its frame, not from the pose the playhead
        # shows (a key at frame 20 sent from frame 100 would flip a turning pelvis through a
        # full turn).
        fcurves = fcurve_map(obj)
        befores = [
            channel_values(fcurves, b, rotation_data_path(b.rotation_mode), [frame])[0]
            for b in posed_bones
        ]
    set_bone_rotations(posed_bones, quats[posed], befores)
    for i, pbone in zip(posed, posed_bones, strict=True):
        pbone.scale = (1.0, 1.0, 1.0)
        if i > 0:
            pbone.location = (0.0, 0.0, 0.0)
    if use_translation:
        root = pbones[names[0]]
        location = root_location(pose.translation, rig.location_frame, rig.units_per_metre)
        root.location = tuple(location)
    if frame is not None:
        keyed = _key_pose(obj, names, frame, key_options, use_translation)
        result.keyed_frame = frame if keyed else None
        now = bpy.context.scene.frame_current
        # The playhead shows its own frame: keying it must not take the answer. At the answer's
        # own frame the answer shows, but not over the bone locations and scales the rig keys
        # there (a key set next would write the answer's 1.0 over the animator's 1.3).
        _show_animation_at(obj, now, use_translation, answer_shown=frame == now)
    return result


def _key_pose(
    obj: bpy.types.Object,
    names: Sequence[str | None],
    frame: int,
    key_options: frozenset[str],
    use_translation: bool,
) -> bool:
    """Keys the rotation of every SMPL bone of ``obj`` (``names``: by SMPL joint, None for one
    the rig lacks) at ``frame``, and the root's location with ``use_translation``; whether
    any key went in."""
    pbones, keyed, options = obj.pose.bones, False, set(key_options)  # bpy takes a set
    # The key type the animator set (Breakdown, say), as Blender's own inserts take it.
    keytype = bpy.context.scene.tool_settings.keyframe_type
    for name in filter(None, names):
        pbone = pbones[name]
        path = rotation_data_path(pbone.rotation_mode)
        keyed |= pbone.keyframe_insert(
            path, frame=frame, group=name, options=options, keytype=keytype
        )
    if use_translation:
        keyed |= pbones[names[0]].keyframe_insert(
            "location", frame=frame, group=names[0], options=options, keytype=keytype
        )
    return keyed


def root_places(obj: bpy.types.Object, frames: Sequence[int] | None = None) -> np.ndarray:
    """(n, 3) the root's location as SMPL translations (metres), at each of ``frames`` as the
    animation has it there, or (1, 3) as it is now: where the body stands, for
    ``placed_on_floor``."""
    rig = rig_geometry(obj)
    root = obj.pose.bones[bone_names(obj)[0]]
    frames = None if frames is None else list(frames)
    locations = channel_values(fcurve_map(obj), root, "location", frames)
    return translation_from_root_location(locations, rig.location_frame, rig.units_per_metre)


def placed_on_floor(
    obj: bpy.types.Object,
    poses: Sequence[Pose],
    places: np.ndarray | None = None,
    *,
    keep_translations: bool = False,
) -> list[Pose]:
    """``poses`` with the translation that keeps each body on the floor the armature stands on
    at rest (``core.posing.floor_translation``): the root's height set, its place across the
    floor kept: ``places`` ((n, 3) or (1, 3), ``root_places``; None: the root's now). A
    kneeling answer comes down to the floor; a walk keyed on the root keeps its path. With
    ``keep_translations`` a pose that has a translation of its own keeps it."""
    if not poses:
        return []
    places = root_places(obj) if places is None else places
    axis_angles = np.stack([pose.axis_angle for pose in poses])
    placed = floor_translation(axis_angles, rest_joints(obj), places)
    return [
        pose
        if keep_translations and pose.translation is not None
        else Pose(pose.axis_angle, t, pose.label)
        for pose, t in zip(poses, placed, strict=True)
    ]


def placed_translations(
    obj: bpy.types.Object, frames: Sequence[int], *, on_floor: bool
) -> np.ndarray:
    """(N, 3) where keyed lines go at ``frames`` (``batch_store.place_keyed_lines``): on the
    floor with ``on_floor``, from the poses keyed there, each at the root's place there (as
    ``placed_on_floor``, on arrays: no Pose a line); else at rest."""
    if not on_floor:
        return np.zeros((len(frames), 3))
    axis_angles, places = read_pose_arrays(obj, frames)
    return floor_translation(axis_angles, rest_joints(obj), places)


def auto_key_options(context: bpy.types.Context) -> frozenset[str]:
    """The ``keyframe_insert`` options Blender's Auto Keying keys with: only the keys there
    already (its Replace mode), only the F-curves there already (Only Insert Available)."""
    options = set()
    if context.scene.tool_settings.auto_keying_mode == "REPLACE_KEYS":
        options.add("INSERTKEY_REPLACE")
    if context.preferences.edit.use_keyframe_insert_available:
        options.add("INSERTKEY_AVAILABLE")
    return frozenset(options)


def _show_animation_at(
    obj: bpy.types.Object, frame: int, use_translation: bool, *, answer_shown: bool = False
) -> None:
    """Puts what posing changed back to what the animation gives at ``frame``: the channels
    a pose is keyed on (unless ``answer_shown``), and the bones' animated locations and
    scales."""
    fcurves = fcurve_map(obj)
    pbones = obj.pose.bones
    names = list(filter(None, bone_names(obj)))
    posed = [(bone, prop) for bone, prop, _ in pose_channels(obj, use_translation)]
    others = [(name, prop) for name in names for prop in ("location", "scale")]
    channels = [c for c in others if c not in posed] if answer_shown else posed + others
    for name, prop in dict.fromkeys(channels):
        pbone = pbones[name]
        setattr(pbone, prop, channel_values(fcurves, pbone, prop, [frame])[0])


def overridden_bones(obj: bpy.types.Object) -> list[str]:
    """The SMPL bones of ``obj`` that show something else than their channels, each with what
    decides it instead: an enabled constraint (an IK chain reaching it from a bone below too), a
    driver on its rotation, or a rotation not inherited from its parent. An answer sets their
    channels all the same; the animator is told, or the rig would silently show another pose."""
    names = [name for name in bone_names(obj) if name is not None]
    smpl = set(names)
    why: dict[str, str] = {}
    for pbone in obj.pose.bones:
        for constraint in pbone.constraints:
            if constraint.mute or constraint.influence == 0.0 or not constraint.is_valid:
                continue  # Blender applies none of these (is_valid: no target, say)
            if constraint.type in ("IK", "SPLINE_IK"):
                # chain_count bones (0: to the root) from the owner, or without Use Tail from
                # its parent, IK's own tail being the owner's head then.
                chain = [pbone, *pbone.parent_recursive]
                if constraint.type == "IK" and not constraint.use_tail:
                    chain = chain[1:]
                reached = chain[: constraint.chain_count] if constraint.chain_count else chain
            else:
                reached = [pbone]
            for bone in reached:
                if bone.name in smpl:
                    on = "" if bone == pbone else f" on {pbone.name}"
                    why.setdefault(bone.name, f"the constraint {quoted(constraint.name)}{on}")
    animation = obj.animation_data
    for driver in animation.drivers if animation else ():
        if driver.mute or not driver.driver.is_valid:
            continue
        bone, _, prop = driver.data_path.removeprefix('pose.bones["').partition('"].')
        if bone in smpl and prop.startswith("rotation_"):
            why.setdefault(bone, f"a driver on {prop}")
    for name in names:
        if not obj.data.bones[name].use_inherit_rotation:
            why.setdefault(name, "Inherit Rotation off")
    return [f"{name} ({why[name]})" for name in names if name in why]


def pose_channels(obj: bpy.types.Object, use_translation: bool) -> list[Channel]:
    """The channels a pose is keyed on, in order: each SMPL bone's rotation (in its mode),
    then, with ``use_translation``, the root's location."""
    channels = []
    names = bone_names(obj)
    for name in filter(None, names):
        prop = rotation_data_path(obj.pose.bones[name].rotation_mode)
        channels += [(name, prop, k) for k in range(len(getattr(obj.pose.bones[name], prop)))]
    if use_translation:
        channels += root_location_channels(obj)
    return channels


def root_location_channels(obj: bpy.types.Object) -> list[Channel]:
    return [(bone_names(obj)[0], "location", k) for k in range(3)]


def channel_values(fcurves, pbone, prop: str, frames: Sequence[float] | None) -> np.ndarray:
    """The bone's ``prop`` values, (len(frames), size): at each scene frame of ``frames``, as
    its F-curves (``anim.fcurve_map``) give them there; a channel without keys gives its
    current value. Without ``frames``, one row of the current values. A curve of samples (a
    baked take) is read as one of keys."""
    current = list(getattr(pbone, prop))
    if frames is None:
        return np.array([current], dtype=np.float64)
    values = np.tile(np.array(current, dtype=np.float64), (len(frames), 1))
    path = bone_data_path(pbone.name, prop)
    times = action_times(pbone.id_data, frames)
    for k in range(len(current)):
        curve = fcurves.get((path, k))
        if curve is not None and (len(curve.keyframe_points) or len(curve.sampled_points)):
            values[:, k] = _curve_values(curve, times)
    return values


def _curve_values(curve: bpy.types.FCurve, times: Sequence[float]) -> np.ndarray:
    """The curve's values at ``times``: a key's own value at its frame, read with the others
    in one go, and ``evaluate`` between keys. A 6,000-frame take keyed on every frame exported
    in over a second when every frame was evaluated on its own. Few times on a long curve (a
    key going in among 5,000) are evaluated: reading every key would cost more. A curve with
    modifiers is evaluated throughout: they change values at the keys too."""
    times = np.asarray(times, dtype=np.float64)
    out = np.empty(len(times))
    todo = np.ones(len(times), dtype=bool)
    points = curve.keyframe_points
    if 32 * len(times) >= len(points) > 0 and not len(curve.modifiers):
        co = np.empty(2 * len(points), dtype=np.float32)
        points.foreach_get("co", co)
        key_times, key_values = co[0::2].astype(np.float64), co[1::2].astype(np.float64)
        at = np.clip(np.searchsorted(key_times, times), 0, len(key_times) - 1)
        # Keys out of order or two on one frame (a script's, not yet sorted by an update):
        # which of them Blender plays is its own business, so it is asked.
        ordered = bool(np.all(np.diff(key_times) > 0))
        on_key = (key_times[at] == times) & ordered
        out[on_key] = key_values[at[on_key]]
        todo &= ~on_key
    out[todo] = [curve.evaluate(t) for t in times[todo].tolist()]
    return out


def read_pose(obj: bpy.types.Object, frame: float | None = None) -> Pose:
    """The SMPL pose of the armature: its current bone values, or with ``frame`` its action's
    values at that frame (F-curves evaluated directly; NLA, drivers and constraints are not
    part of it). The translation is the root's location mapped back to the SMPL frame."""
    return read_poses(obj, None if frame is None else [frame])[0]


def read_poses(obj: bpy.types.Object, frames: Sequence[float] | None) -> list[Pose]:
    """``read_pose`` at each of ``frames`` (None: the one current pose)."""
    axis_angles, translations = read_pose_arrays(obj, frames)
    return [Pose(a, t) for a, t in zip(axis_angles, translations, strict=True)]


def read_pose_arrays(
    obj: bpy.types.Object, frames: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """``read_poses`` as arrays: (N, 24, 3) axis-angles, (N, 3) translations. Each channel's
    curve is evaluated at every frame in one go and the rotations converted together, so a
    long take exports without a freeze."""
    fcurves = fcurve_map(obj) if frames is not None else {}
    pbones = obj.pose.bones
    names = bone_names(obj)
    quats = []
    rest = [(1.0, 0.0, 0.0, 0.0)] * (1 if frames is None else len(frames))
    for name in names:
        if name is None:  # a hand the rig does not have: at rest
            quats.append(rest)
            continue
        pbone = pbones[name]
        rows = channel_values(fcurves, pbone, rotation_data_path(pbone.rotation_mode), frames)
        quats.append(bone_rotation_quaternions(pbone, rows))
    rig = rig_geometry(obj)
    axis_angle = axis_angle_from_bone_quaternions(
        np.swapaxes(np.array(quats), 0, 1), rig.rest_rotations
    )
    locations = channel_values(fcurves, pbones[names[0]], "location", frames)
    translations = translation_from_root_location(
        locations, rig.location_frame, rig.units_per_metre
    )
    return axis_angle, translations


def location_keyed_at(obj: bpy.types.Object, frames: Sequence[float]) -> np.ndarray:
    """(N,) whether the root's location has a key, on any axis, at each scene frame."""
    return keyed_at(obj, frames, root_location_channels(obj))


def keyed_at(
    obj: bpy.types.Object, frames: Sequence[float], channels: Sequence[Channel]
) -> np.ndarray:
    """(N,) whether any of ``channels`` has a key at each scene frame."""
    fcurves = fcurve_map(obj)
    times = action_times(obj, frames)
    keyed = np.zeros(len(times), dtype=bool)
    for name, prop, k in channels:
        curve = fcurves.get((bone_data_path(name, prop), k))
        points = curve.keyframe_points if curve is not None else ()
        if not len(points):
            continue
        co = np.empty(2 * len(points), dtype=np.float32)
        points.foreach_get("co", co)
        key_times = np.sort(co[0::2].astype(np.float64))
        # The first key at or after time - tolerance: keyed there when within the tolerance.
        at = np.minimum(np.searchsorted(key_times, times - ON_FRAME), len(key_times) - 1)
        keyed |= np.abs(key_times[at] - times) < ON_FRAME
    return keyed
