"""Keyframes, motions and AMASS-layout .npz import/export inside (headless) Blender."""

from __future__ import annotations

import bpy
import numpy as np
import pytest

from blender_addon.blender.anim import LockedCurveError, action_fcurves, fcurve_map
from blender_addon.blender.armature import create_smpl_armature
from blender_addon.blender.batch_store import (
    clear_record,
    key_batch_lines,
    load_record,
    save_record,
    settle_batch_keys,
)
from blender_addon.blender.keyframes import (
    export_npz,
    import_npz,
    key_motion,
    key_poses,
    keyed_frames,
    motion_from_keys,
)
from blender_addon.blender.people import apply_people
from blender_addon.blender.posing import apply_pose, read_pose
from blender_addon.core.batch_record import RECORD_PROPERTY, BatchRecord
from shared_protocol.pose import Motion, Pose
from shared_protocol.skeleton import DEFAULT_REST_JOINTS, JOINT_NAMES

from .helpers import (
    FK_TOLERANCE,
    fk_error,
    linked_from_library,
    random_pose,
    transform,
    world_heads,
)


def motion(n: int, seed: int = 0, fps: float = 30.0) -> Motion:
    poses = [random_pose(seed * 1000 + i) for i in range(n)]
    return Motion.from_poses(poses, fps=fps, gender="female", betas=np.linspace(-1, 1, 10))


def key_frames_by_path(obj) -> dict[str, set[float]]:
    out: dict[str, set[float]] = {}
    for fc in action_fcurves(obj):
        out.setdefault(fc.data_path, set()).update(p.co[0] for p in fc.keyframe_points)
    return out


def test_poses_are_keyed_exactly_on_their_frames(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    poses = [random_pose(i) for i in range(4)]
    frames = [3, 10, 11, 40]
    key_poses(obj, poses, frames)
    by_path = key_frames_by_path(obj)
    for name in JOINT_NAMES:
        assert by_path[f'pose.bones["{name}"].rotation_quaternion'] == set(map(float, frames))
    assert by_path['pose.bones["pelvis"].location'] == set(map(float, frames))
    assert 'pose.bones["left_knee"].location' not in by_path  # only the root is translated
    for fc in action_fcurves(obj):
        assert [p.co[0] for p in fc.keyframe_points] == list(map(float, frames))
    assert keyed_frames(obj) == frames
    # each keyed frame plays back the pose keyed there
    for pose, frame in zip(poses, frames, strict=True):
        bpy.context.scene.frame_set(frame)
        assert fk_error(obj, pose) < FK_TOLERANCE
        np.testing.assert_allclose(read_pose(obj, frame).axis_angle, pose.axis_angle, atol=1e-5)


def test_key_poses_checks_lengths(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    with pytest.raises(ValueError, match="2 poses but 1 frames"):
        key_poses(obj, [random_pose(0), random_pose(1)], [1])


def test_key_motion_at_start_and_step(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    frames = key_motion(obj, motion(5), start=20, step=3)
    assert frames == [20, 23, 26, 29, 32]
    assert keyed_frames(obj) == frames


def test_rekeying_a_frame_replaces_its_key(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(1), random_pose(2)], [5, 5])
    assert keyed_frames(obj) == [5]
    np.testing.assert_allclose(read_pose(obj, 5).axis_angle, random_pose(2).axis_angle, atol=1e-5)


def test_rekeying_a_key_among_others_keeps_its_hand_set_handles_shape_and_its_settings(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(seed) for seed in range(3)], [1, 3, 5])
    shapes = {}
    for fc in action_fcurves(obj):
        point = fc.keyframe_points[1]
        point.handle_left_type = point.handle_right_type = "FREE"
        point.interpolation, point.type = "CONSTANT", "BREAKDOWN"
        point.handle_left = (point.co[0] - 1.5, point.co[1] + 0.3)
        point.handle_right = (point.co[0] + 0.5, point.co[1] - 0.2)
        shapes[(fc.data_path, fc.array_index)] = ((-1.5, 0.3), (0.5, -0.2))
    key_poses(obj, [random_pose(7)], [3])  # before the curves' last key: a key already there
    assert keyed_frames(obj) == [1, 3, 5]
    np.testing.assert_allclose(read_pose(obj, 3).axis_angle, random_pose(7).axis_angle, atol=1e-5)
    for fc in action_fcurves(obj):
        point = fc.keyframe_points[1]
        co = np.array(point.co)
        got = (np.array(point.handle_left) - co, np.array(point.handle_right) - co)
        np.testing.assert_allclose(got, shapes[(fc.data_path, fc.array_index)], atol=1e-5)
        assert (point.handle_left_type, point.handle_right_type) == ("FREE", "FREE")
        assert (point.interpolation, point.type) == ("CONSTANT", "BREAKDOWN")


@pytest.mark.parametrize("added", [1, 4])  # fewer keys than the take (point by point), more
def test_keys_after_a_stepped_take_stay_stepped_as_blender_keys_them(blender, added):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(seed) for seed in range(3)], [1, 11, 21])
    for fc in action_fcurves(obj):
        for point in fc.keyframe_points:
            point.interpolation = "CONSTANT"
    key_poses(obj, [random_pose(10 + k) for k in range(added)], [31 + 10 * k for k in range(added)])
    for fc in action_fcurves(obj):
        assert [p.interpolation for p in fc.keyframe_points] == ["CONSTANT"] * (3 + added)


def test_a_pose_keyed_at_another_frame_leaves_the_playhead_showing_its_animation(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(1), random_pose(2)], [1, 100])
    spine = obj.pose.bones["spine1"]
    for frame, size in ((1, 1.0), (100, 2.0)):  # the animator's own channel
        spine.scale = (size,) * 3
        spine.keyframe_insert("scale", frame=frame)
    bpy.context.scene.frame_set(10)
    grown = tuple(spine.scale)
    apply_pose(obj, random_pose(3), frame=50)  # Insert Keyframe at a set frame, say
    assert tuple(spine.scale) == pytest.approx(grown) and grown[0] > 1.0
    np.testing.assert_allclose(read_pose(obj, 50).axis_angle, random_pose(3).axis_angle, atol=1e-5)
    # Frame 10 shows the animation there (with the new key), so keying it (I) keys no answer.
    animated = read_pose(obj, 10)
    np.testing.assert_allclose(read_pose(obj).axis_angle, animated.axis_angle, atol=1e-5)
    assert not np.allclose(animated.axis_angle, random_pose(3).axis_angle, atol=1e-2)
    for pbone in obj.pose.bones:
        pbone.keyframe_insert("rotation_quaternion", frame=10)
    np.testing.assert_allclose(read_pose(obj, 10).axis_angle, animated.axis_angle, atol=1e-5)
    apply_pose(obj, random_pose(4), frame=10)  # at the playhead: shown
    np.testing.assert_allclose(read_pose(obj).axis_angle, random_pose(4).axis_angle, atol=1e-5)
    # ...but not over the scale the animator keys there: shown as 1.0, the next key at frame
    # 10 (I, Whole Character) wrote it over their own.
    assert tuple(spine.scale) == pytest.approx(grown)


def test_an_answer_is_keyed_with_the_animator_s_key_type(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    bpy.context.scene.tool_settings.keyframe_type = "BREAKDOWN"
    apply_pose(obj, random_pose(1), frame=5)  # as Blender's own inserts key, and Auto Keying
    types = {point.type for fc in action_fcurves(obj) for point in fc.keyframe_points}
    assert types == {"BREAKDOWN"}


def curves(obj) -> dict[tuple[str, int], np.ndarray]:
    """Every F-curve's points (co, then both handles), by (data path, index)."""
    result = {}
    for fc in action_fcurves(obj):
        arrays = []
        for name in ("co", "handle_left", "handle_right"):
            values = np.empty(2 * len(fc.keyframe_points), dtype=np.float32)
            fc.keyframe_points.foreach_get(name, values)
            arrays.append(values)
        result[(fc.data_path, fc.array_index)] = np.concatenate(arrays)
    return result


def test_keys_after_the_last_one_give_the_curves_keys_given_at_once(blender):
    poses = [random_pose(seed) for seed in range(6)]
    at_once = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(at_once, poses, [1, 2, 3, 10, 11, 12])
    appended = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(appended, poses[:3], [1, 2, 3])
    key_poses(appended, poses[3:], [10, 11, 12])  # all after the last key: appended
    expected, got = curves(at_once), curves(appended)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5)


def test_keys_between_existing_ones_go_in_place_and_leave_the_others_as_they_were(blender):
    """Blender's own sort (FCurve.update) is a bubble sort, seconds for keys between thousands:
    they are inserted in place instead, with the same curves as keys given at once."""
    poses = [random_pose(seed) for seed in range(8)]
    at_once = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(at_once, poses, [1, 2, 3, 4, 5, 6, 7, 8])
    between = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(between, poses[0::2], [1, 3, 5, 7])
    held = {}
    for fc in action_fcurves(between):  # the user's settings on one existing key
        point = fc.keyframe_points[1]
        point.interpolation, point.type = "CONSTANT", "BREAKDOWN"
        held[(fc.data_path, fc.array_index)] = tuple(point.co)
    for fc in action_fcurves(at_once):
        point = fc.keyframe_points[2]  # frame 3 there too
        point.interpolation, point.type = "CONSTANT", "BREAKDOWN"
    key_poses(between, poses[1::2], [2, 4, 6, 8])
    expected, got = curves(at_once), curves(between)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5)
    for fc in action_fcurves(between):
        point = fc.keyframe_points[2]
        assert tuple(point.co) == held[(fc.data_path, fc.array_index)]
        assert (point.interpolation, point.type) == ("CONSTANT", "BREAKDOWN")
    assert keyed_frames(between) == list(range(1, 9))


def test_bones_in_other_rotation_modes_are_keyed_at_once_as_pose_by_pose(blender):
    """Euler and axis-angle bones get their keys written at once too: the same keys as
    apply_pose(frame=f) pose after pose (keyframe_insert), Euler turns following the timeline."""
    modes = {"left_knee": "XYZ", "spine2": "ZXY", "right_elbow": "AXIS_ANGLE", "neck": "YXZ"}
    poses = [random_pose(seed, max_angle=3.0) for seed in range(6)]  # large turns: Euler wraps
    frames = [1, 2, 3, 7, 8, 9]
    rigs = []
    for _ in range(2):
        obj = create_smpl_armature(bpy.context, with_mesh=False)
        for name, mode in modes.items():
            obj.pose.bones[name].rotation_mode = mode
        rigs.append(obj)
    at_once, one_by_one = rigs
    key_poses(at_once, poses[:3], frames[:3])
    key_poses(at_once, poses[3:], frames[3:])  # a second call carries on from the keys
    for pose, frame in zip(poses, frames, strict=True):
        apply_pose(one_by_one, pose, frame=frame)
    expected, got = curves(one_by_one), curves(at_once)
    assert expected.keys() == got.keys()
    assert ('pose.bones["left_knee"].rotation_euler', 0) in got
    assert ('pose.bones["right_elbow"].rotation_axis_angle', 0) in got
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5, err_msg=str(key))
    for pose, frame in zip(poses, frames, strict=True):
        np.testing.assert_allclose(read_pose(at_once, frame).axis_angle, pose.axis_angle, atol=1e-5)


def test_a_channel_without_keys_leaves_the_others_turns_alone(blender):
    """Only the X angle of an Euler bone is keyed (six turns from frame 1 to 100): a key at
    frame 99 follows that curve's turns, whatever the other channels and the bone now hold."""
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    pbone = obj.pose.bones["left_hip"]
    pbone.rotation_mode = "XYZ"
    for frame, x in ((1, 0.0), (100, 12 * np.pi)):
        pbone.rotation_euler = (x, 0.0, 0.0)
        pbone.keyframe_insert("rotation_euler", index=0, frame=frame)
    bpy.context.scene.frame_set(1)  # the bone now at X = 0
    axis_angle = np.zeros((24, 3))
    axis_angle[JOINT_NAMES.index("left_hip"), 0] = 0.1  # this rig takes SMPL values as they are
    key_poses(obj, [Pose(axis_angle)], [99])
    x_curve = next(
        fc for fc in action_fcurves(obj)
        if fc.data_path.endswith('"left_hip"].rotation_euler') and fc.array_index == 0
    )  # fmt: skip
    assert x_curve.evaluate(99) == pytest.approx(12 * np.pi + 0.1, abs=1e-4)


def test_keys_of_separate_calls_interpolate_the_short_way(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)

    def turned(degrees):
        axis_angle = np.zeros((24, 3))
        axis_angle[0] = [0.0, np.radians(degrees), 0.0]
        return Pose(axis_angle)

    key_poses(obj, [turned(d) for d in (0, 60, 120, 180, 240)], [1, 2, 3, 4, 5])
    key_poses(obj, [turned(250)], [6])  # a batch's next line, keyed by a later timer call
    key_poses(obj, [turned(260), turned(270)], [7, 8])
    curves = [fcurve_map(obj)[('pose.bones["pelvis"].rotation_quaternion', k)] for k in range(4)]
    keys = np.array([[c.evaluate(f) for c in curves] for f in range(1, 9)])
    assert (np.sum(keys[1:] * keys[:-1], axis=1) > 0).all()  # neighbours on the same side


def test_a_locked_channel_is_never_written(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(1)], [1])
    for fcurve in action_fcurves(obj):
        if '"left_elbow"' in fcurve.data_path:
            fcurve.lock = True
    with pytest.raises(ValueError, match="channel of left_elbow is locked; unlock it"):
        key_poses(obj, [random_pose(2), random_pose(3)], [1, 11])
    assert keyed_frames(obj) == [1]  # nothing written, on any channel
    np.testing.assert_allclose(read_pose(obj, 1).axis_angle, random_pose(1).axis_angle, atol=1e-5)


def test_a_single_pose_is_not_keyed_into_a_partly_locked_channel(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    apply_pose(obj, random_pose(1), frame=1)
    knee = 'pose.bones["left_knee"].rotation_quaternion'
    [w] = [fc for fc in action_fcurves(obj) if (fc.data_path, fc.array_index) == (knee, 0)]
    w.lock = True
    with pytest.raises(ValueError, match="W Quaternion Rotation channel of left_knee is locked"):
        apply_pose(obj, random_pose(2), frame=10)
    assert keyed_frames(obj) == [1]  # no channel keyed at 10, the locked one's neighbours neither
    np.testing.assert_allclose(read_pose(obj).axis_angle, random_pose(1).axis_angle, atol=1e-5)
    apply_pose(obj, random_pose(3))  # posing without a key does not touch the curves
    np.testing.assert_allclose(read_pose(obj).axis_angle, random_pose(3).axis_angle, atol=1e-5)


def _knee_curve(obj):
    knee = 'pose.bones["left_knee"].rotation_quaternion'
    [curve] = [fc for fc in action_fcurves(obj) if (fc.data_path, fc.array_index) == (knee, 0)]
    return curve


@pytest.mark.parametrize(
    "make, reason",
    [
        ("group locked", "is in the locked channel group 'left_knee'; unlock the group"),
        ("samples", "holds samples, not keys; turn them into keys"),
        ("LIMITS", "has a Limits modifier that overrides its keys; mute it"),
    ],
)
def test_a_channel_blender_would_not_key_refuses_the_pose_on_both_paths(blender, make, reason):
    # keyframe_insert skipped it with a line on the console (a half-keyed pose); keys written
    # straight into a curve of samples damaged it.
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(1), random_pose(2)], [1, 5])
    curve = _knee_curve(obj)
    if make == "group locked":
        curve.group.lock = True
    elif make == "samples":
        curve.convert_to_samples(1, 6)
    else:
        curve.modifiers.new(make)
    frames = keyed_frames(obj)
    samples = [tuple(p.co) for p in curve.sampled_points]
    for write in (
        lambda: key_poses(obj, [random_pose(3)], [10]),  # a batch, an import
        lambda: apply_pose(obj, random_pose(3), frame=10),  # an answer, Apply Pose
    ):
        with pytest.raises(LockedCurveError, match=f"Rotation channel of left_knee {reason}"):
            write()
        assert keyed_frames(obj) == frames  # nothing written, on any channel
        assert [tuple(p.co) for p in curve.sampled_points] == samples


def test_a_locked_group_refuses_the_pose_before_its_bone_has_a_rotation_curve(blender):
    # The bone's scale keyed and its group locked: a new rotation curve would join the group,
    # keyframe_insert would skip it (a half-keyed pose), the bulk path write through the lock.
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    obj.pose.bones["left_knee"].keyframe_insert("scale", frame=1)
    next(c for c in action_fcurves(obj) if "scale" in c.data_path).group.lock = True
    for write in (
        lambda: key_poses(obj, [random_pose(3)], [10]),  # a batch, an import
        lambda: apply_pose(obj, random_pose(3), frame=10),  # an answer, Apply Pose
    ):
        message = "Rotation channel of left_knee would go into the locked channel group"
        with pytest.raises(LockedCurveError, match=message):
            write()
        assert keyed_frames(obj) == []
        assert not [c for c in action_fcurves(obj) if "rotation" in c.data_path]


def test_modifiers_that_leave_the_keys_in_effect_let_poses_be_keyed(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(1)], [1])
    curve = _knee_curve(obj)
    curve.modifiers.new("CYCLES")
    curve.modifiers.new("GENERATOR").use_additive = True
    curve.modifiers.new("LIMITS").mute = True
    key_poses(obj, [random_pose(2)], [10])
    apply_pose(obj, random_pose(3), frame=20)
    assert keyed_frames(obj) == [1, 10, 20]


def test_a_take_baked_to_samples_exports_as_it_plays(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(i) for i in range(3)], [1, 11, 21])
    keyed = motion_from_keys(obj, fps=30.0)
    for curve in action_fcurves(obj):
        curve.convert_to_samples(1, 22)
    assert keyed_frames(obj) == list(range(1, 22))
    baked = motion_from_keys(obj, fps=30.0)
    assert len(baked) == 21 and baked.fps == 30.0
    np.testing.assert_allclose(baked.axis_angle[::10], keyed.axis_angle, atol=1e-4)


def test_a_batch_refused_for_a_locked_channel_makes_no_curve_either(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(1)], [1], use_translation=False)  # no location curves yet
    knee = 'pose.bones["left_knee"].rotation_quaternion'
    [w] = [fc for fc in action_fcurves(obj) if (fc.data_path, fc.array_index) == (knee, 0)]
    w.lock = True
    with pytest.raises(LockedCurveError, match="Rotation channel of left_knee is locked"):
        key_poses(obj, [random_pose(2)], [5], use_translation=True)
    assert keyed_frames(obj) == [1]
    assert not [fc for fc in action_fcurves(obj) if fc.data_path.endswith("location")]


def test_an_answer_with_several_people_is_refused_whole_for_one_locked_channel(blender):
    target = create_smpl_armature(bpy.context, with_mesh=False)
    apply_people(bpy.context, target, [random_pose(1), random_pose(2)], frame=1)
    second = bpy.data.objects[f"{target.name}.person2"]
    for fcurve in action_fcurves(second):
        fcurve.lock = '"right_elbow"' in fcurve.data_path
    with pytest.raises(LockedCurveError, match="right_elbow"):
        apply_people(bpy.context, target, [random_pose(3), random_pose(4)], frame=20)
    assert keyed_frames(target) == [1] and keyed_frames(second) == [1]  # neither keyed at 20
    np.testing.assert_allclose(read_pose(target).axis_angle, random_pose(1).axis_angle, atol=1e-5)


def armature_editing_a_take_at_100():
    """An armature whose take (keyed at frame 1) is an NLA strip starting at frame 100, opened
    in tweak mode (Tab in the NLA editor); and that take."""
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    apply_pose(obj, random_pose(0), frame=1)
    take = obj.animation_data.action
    obj.animation_data.nla_tracks.new().strips.new("take", 100, take)  # plays frame 1 at 100
    obj.animation_data.action = None
    obj.animation_data.use_tweak_mode = True
    return obj, take


def test_keys_land_on_their_scene_frames_in_nla_tweak_mode(blender):
    obj, take = armature_editing_a_take_at_100()
    poses = [random_pose(1), random_pose(2), random_pose(3)]
    key_poses(obj, poses[:2], [110, 120])  # a batch
    apply_pose(obj, poses[2], frame=130)  # a single answer
    assert obj.animation_data.action == take
    for fcurve in action_fcurves(obj):  # in the take's own time, with no stray key
        assert [p.co[0] for p in fcurve.keyframe_points] == [1.0, 11.0, 21.0, 31.0]
    assert keyed_frames(obj) == [100, 110, 120, 130]
    for pose, frame in zip(poses, [110, 120, 130], strict=True):
        np.testing.assert_allclose(read_pose(obj, frame).axis_angle, pose.axis_angle, atol=1e-5)
        bpy.context.scene.frame_set(frame)
        assert fk_error(obj, pose) < FK_TOLERANCE


def test_a_scaled_strip_in_tweak_mode_exports_every_frame_it_plays(blender, tmp_path):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(k) for k in range(4)], [1, 2, 3, 4])
    anim = obj.animation_data
    strip = anim.nla_tracks.new().strips.new("take", 1, anim.action)
    anim.action = None
    strip.scale = 1.5  # the take's keys play at scene frames 1, 2.5, 4, 5.5
    anim.use_tweak_mode = True
    assert keyed_frames(obj) == [1, 2, 3, 4, 5]  # not refused: snapping would move the take's
    assert bpy.ops.chatpose.export_npz(filepath=str(tmp_path / "take.npz")) == {"FINISHED"}
    back = Motion.load_npz(tmp_path / "take.npz")
    assert len(back) == 5
    for k, frame in enumerate(range(1, 6)):  # as the scene plays it
        np.testing.assert_allclose(back.axis_angle[k], read_pose(obj, frame).axis_angle, atol=1e-5)
    for k, pose in ((0, random_pose(0)), (3, random_pose(2))):  # the keys at frames 1 and 4
        np.testing.assert_allclose(back.axis_angle[k], pose.axis_angle, atol=1e-5)


def test_only_pose_channels_count_as_keyed_frames(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    pelvis = obj.pose.bones["pelvis"]
    for frame in (3, 100):
        pelvis.keyframe_insert("scale", frame=frame)
    assert keyed_frames(obj) == []  # a scale key is no pose: export writes the current pose
    key_poses(obj, [random_pose(1)], [7])
    assert keyed_frames(obj) == [7]


def test_motion_from_keys_round_trip(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    transform(obj)  # the object's transform is not part of the motion
    original = motion(6)
    key_motion(obj, original, start=1, step=2)
    back = motion_from_keys(obj, fps=60.0)
    assert len(back) == 6 and back.fps == 30.0
    assert back.gender == "female"
    np.testing.assert_allclose(back.betas, original.betas)
    np.testing.assert_allclose(back.axis_angle, original.axis_angle, atol=1e-5)
    np.testing.assert_allclose(back.translation, original.translation, atol=1e-5)


def test_an_axis_angle_bone_turns_between_its_keys_not_jumps(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    bone = obj.pose.bones["left_shoulder"]
    bone.rotation_mode = "AXIS_ANGLE"
    bone.rotation_axis_angle = (np.radians(170), -1.0, 0.0, 0.0)  # what the bone held before
    turns = {1: 60, 11: -60, 21: 170}
    for frame, degrees in turns.items():
        pose = np.zeros((24, 3))
        pose[16, 0] = np.radians(degrees)
        apply_pose(obj, Pose(pose), frame=frame)
    angles = [np.degrees(read_pose(obj, frame).axis_angle[16, 0]) for frame in range(1, 12)]
    assert angles[0] == pytest.approx(60) and angles[-1] == pytest.approx(-60)
    assert (np.diff(angles) < 0).all()  # from 60° to -60° frame by frame, no jump at the end
    assert abs(angles[5]) < 40
    on = np.degrees(read_pose(obj, 16).axis_angle[16])
    assert on[0] < -100  # on from -60° to 170° the short way, through -180°, not back past 0°


def test_uneven_keys_export_with_their_timing(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(i) for i in range(4)], [1, 11, 21, 26])
    back = motion_from_keys(obj, fps=24.0)
    assert len(back) == 6 and back.fps == 4.8  # every 5 frames: 1.04 s, as Blender plays it
    for k, frame in enumerate(range(1, 27, 5)):
        np.testing.assert_allclose(back.axis_angle[k], read_pose(obj, frame).axis_angle)
    np.testing.assert_allclose(back.axis_angle[5], random_pose(3).axis_angle, atol=1e-5)


def test_no_keys_exports_the_current_pose(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    apply_pose(obj, random_pose(4))
    back = motion_from_keys(obj, fps=24.0)
    assert len(back) == 1 and back.fps == 24.0
    np.testing.assert_allclose(back.axis_angle[0], random_pose(4).axis_angle, atol=1e-5)


def test_importing_one_pose_leaves_the_scenes_rate_and_range_and_a_motion_says_it_sets_them(
    blender, tmp_path, capfd
):
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = 24, 1.0
    scene.frame_start, scene.frame_end = 1, 250
    one = tmp_path / "pose.npz"
    motion(1, seed=1, fps=30.0).save_npz(one)  # as `chatpose pose --out` writes it
    assert bpy.ops.chatpose.import_npz(filepath=str(one), start_frame=120) == {"FINISHED"}
    assert (scene.render.fps, scene.frame_start, scene.frame_end) == (24, 1, 250)
    assert "the scene now plays" not in capfd.readouterr().out
    clip = tmp_path / "clip.npz"
    motion(8, seed=2, fps=60.0).save_npz(clip)
    assert bpy.ops.chatpose.import_npz(filepath=str(clip), start_frame=10) == {"FINISHED"}
    assert (scene.render.fps, scene.frame_start, scene.frame_end) == (60, 10, 17)
    assert "; the scene now plays frames 10-17 at 60 fps" in capfd.readouterr().out
    scene.use_preview_range = True  # the animator's loop, elsewhere: it plays, not the motion
    scene.frame_preview_start, scene.frame_preview_end = 100, 120
    assert bpy.ops.chatpose.import_npz(filepath=str(clip), start_frame=10) == {"FINISHED"}
    assert (
        "; the scene now plays frames 10-17 at 60 fps, but its preview range (100-120) is on "
        "and plays instead: turn it off in the Timeline to see the motion"
    ) in capfd.readouterr().out
    scene.frame_preview_start, scene.frame_preview_end = 1, 50  # the motion within it
    assert bpy.ops.chatpose.import_npz(filepath=str(clip), start_frame=10) == {"FINISHED"}
    assert "preview range" not in capfd.readouterr().out


def test_a_motion_at_another_rate_than_the_scene_s_is_resampled_or_warned_of(
    blender, tmp_path, capfd
):
    # A 120 fps capture in a 24 fps shot was keyed a frame per frame, 5x slow, and the scene's
    # rate switched under keys already there, without a word; nothing could bring it to 24.
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = 24, 1.0
    capture = tmp_path / "capture.npz"
    motion(11, seed=4, fps=120.0).save_npz(capture)
    assert bpy.ops.chatpose.import_npz(filepath=str(capture), resample=True) == {"FINISHED"}
    obj = bpy.context.active_object
    assert keyed_frames(obj) == [1, 2, 3]  # 0.1 s: its frames 0, 5 and 10
    for frame, k in ((1, 0), (2, 5), (3, 10)):
        expected = motion(11, seed=4, fps=120.0).axis_angle[k]
        np.testing.assert_allclose(read_pose(obj, frame).axis_angle, expected, atol=1e-5)
    assert (scene.render.fps, scene.render.fps_base, scene.frame_end) == (24, 1.0, 3)
    assert "; resampled from 120 to 24 fps" in capfd.readouterr().out

    kept = dict(set_scene=False, new_take=False, start_frame=20)
    assert bpy.ops.chatpose.import_npz(filepath=str(capture), **kept) == {"FINISHED"}
    said = capfd.readouterr().out
    assert (
        said.startswith("Warning:")
        and (
            "the file is at 120 fps and the scene plays 24: a key for each of its frames plays it "
            "5 times slower (Resample to Scene Rate keys it at the scene's rate)"
        )
        in said
    )
    # The clip again, in the same take: the scene switches, and says what that does.
    assert bpy.ops.chatpose.import_npz(filepath=str(capture), new_take=False) == {"FINISHED"}
    said = capfd.readouterr().out
    assert "the scene's rate went from 24 to 120 fps, and the take's other keys play at it" in said

    # NTSC's 0.1 % is no difference to speak of; a quarter is, said as such; one pose has no rate.
    scene.render.fps, scene.render.fps_base = 30, 1.001
    thirty, one = tmp_path / "thirty.npz", tmp_path / "one.npz"
    motion(4, seed=5, fps=30.0).save_npz(thirty)
    motion(1, seed=6, fps=30.0).save_npz(one)  # as `chatpose pose --out` writes it
    assert bpy.ops.chatpose.import_npz(filepath=str(thirty), set_scene=False) == {"FINISHED"}
    scene.render.fps, scene.render.fps_base = 24, 1.0
    assert bpy.ops.chatpose.import_npz(filepath=str(one), set_scene=False) == {"FINISHED"}
    assert "Warning" not in capfd.readouterr().out
    assert bpy.ops.chatpose.import_npz(filepath=str(thirty), set_scene=False) == {"FINISHED"}
    assert "plays it 25 % slower" in capfd.readouterr().out
    # A rate to resample to that no motion has is refused before the scene changes.
    takes = set(bpy.data.actions)
    with pytest.raises(RuntimeError, match="the scene's 24 fps, a key every 100000 frames, is"):
        bpy.ops.chatpose.import_npz(filepath=str(capture), resample=True, frame_step=100_000)
    assert set(bpy.data.actions) == takes and bpy.context.active_object == obj


def test_npz_import_export_round_trip(blender, tmp_path):
    source = tmp_path / "in.npz"
    original = motion(8, seed=3, fps=60.0)
    original.save_npz(source)
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    scene = bpy.context.scene
    loaded, frames = import_npz(obj, source, start=10, step=1, scene=scene)
    assert frames == list(range(10, 18))
    assert (scene.frame_start, scene.frame_end) == (10, 17)
    assert scene.render.fps / scene.render.fps_base == pytest.approx(60.0)
    out = tmp_path / "out.npz"
    export_npz(obj, out, fps=scene.render.fps / scene.render.fps_base)
    back = Motion.load_npz(out)
    assert len(back) == 8 and back.fps == pytest.approx(60.0)
    assert back.gender == original.gender
    np.testing.assert_allclose(back.axis_angle, original.axis_angle, atol=1e-5)
    np.testing.assert_allclose(back.translation, original.translation, atol=1e-5)


def test_npz_operators_round_trip(blender, tmp_path):
    source, out = tmp_path / "in.npz", tmp_path / "out.npz"
    original = motion(4, seed=5)
    original.save_npz(source)
    # no armature selected: the import creates one
    assert bpy.ops.chatpose.import_npz(filepath=str(source), start_frame=1, frame_step=5) == {
        "FINISHED"
    }
    obj = bpy.context.active_object
    assert keyed_frames(obj) == [1, 6, 11, 16]
    assert bpy.ops.chatpose.export_npz(filepath=str(out)) == {"FINISHED"}
    back = Motion.load_npz(out)
    assert back.fps == pytest.approx(30.0)
    np.testing.assert_allclose(back.axis_angle, original.axis_angle, atol=1e-5)
    np.testing.assert_allclose(back.translation, original.translation, atol=1e-5)
    # Said of the file or folder the user named: Python's words named a hidden temporary file.
    missing = tmp_path / "nowhere" / "x.npz"
    with pytest.raises(RuntimeError, match=f"Could not write {missing}: the folder .*nowhere does"):
        bpy.ops.chatpose.export_npz(filepath=str(missing))
    (tmp_path / "a file").write_text("")
    with pytest.raises(RuntimeError, match=r"Could not write .*: .*a file is a file, not a folder"):
        bpy.ops.chatpose.export_npz(filepath=str(tmp_path / "a file" / "x.npz"))
    too_long = tmp_path / ("x" * 300) / "x.npz"  # no traceback: the name said too long
    with pytest.raises(RuntimeError, match=r"Could not write .*: File name too long"):
        bpy.ops.chatpose.export_npz(filepath=str(too_long))
    with pytest.raises(RuntimeError, match=r"Not imported: .*gone\.npz: no such file$"):
        bpy.ops.chatpose.import_npz(filepath=str(tmp_path / "gone.npz"))


def test_a_file_exported_in_smpl_s_frame_imports_upright_with_z_up_on_and_says_so(
    blender, tmp_path, capfd
):
    source, out = tmp_path / "in.npz", tmp_path / "smpl_frame.npz"
    original = motion(3, seed=7)
    original.save_npz(source)
    assert bpy.ops.chatpose.import_npz(filepath=str(source)) == {"FINISHED"}
    assert "the file says" not in capfd.readouterr().out  # as it was told
    obj = bpy.context.active_object
    assert bpy.ops.chatpose.export_npz(filepath=str(out), z_up=False) == {"FINISHED"}
    bpy.ops.object.select_all(action="DESELECT")
    bpy.context.view_layer.objects.active = None  # onto a new armature
    assert bpy.ops.chatpose.import_npz(filepath=str(out)) == {"FINISHED"}  # Z-up (AMASS) on
    assert (
        "; the file says it was written in SMPL's frame, +Y up (Z-up off), and was read so"
        in capfd.readouterr().out
    )
    again = bpy.context.active_object
    assert again != obj
    for frame in (1, 2, 3):
        np.testing.assert_allclose(
            read_pose(again, frame).axis_angle, read_pose(obj, frame).axis_angle, atol=1e-5
        )


def test_an_import_with_no_armature_makes_one_at_the_3d_cursor(blender, tmp_path):
    source = tmp_path / "in.npz"
    motion(2, seed=6).save_npz(source)
    bpy.context.scene.cursor.location = (3.0, -2.0, 0.5)  # as Create SMPL Armature places it
    assert bpy.ops.chatpose.import_npz(filepath=str(source)) == {"FINISHED"}
    obj = bpy.context.active_object
    assert tuple(obj.location)[:2] == pytest.approx((3.0, -2.0))
    assert obj.location.z > 0.5  # lifted so that its feet stand on the cursor


def test_an_ntsc_rate_round_trips_exactly(blender, tmp_path):
    source, out = tmp_path / "in.npz", tmp_path / "out.npz"
    motion(4, seed=5, fps=29.97).save_npz(source)
    assert bpy.ops.chatpose.import_npz(filepath=str(source), start_frame=1) == {"FINISHED"}
    assert bpy.ops.chatpose.export_npz(filepath=str(out)) == {"FINISHED"}
    assert Motion.load_npz(out).fps == 29.97  # not float32 fps_base's 29.970000018


def test_an_amass_file_imports_upright_where_it_walks(blender, tmp_path):
    poses = np.zeros((2, 156))
    poses[:, 0] = np.pi / 2  # AMASS's upright body, Z-up
    trans = np.array([[0.0, 0.3, 0.93], [2.0, 0.3, 0.93]])
    np.savez(tmp_path / "walk.npz", poses=poses, trans=trans, mocap_framerate=np.array(60.0))
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    import_npz(obj, tmp_path / "walk.npz", start=1)
    for frame, x in ((1, 0.0), (2, 2.0)):
        bpy.context.scene.frame_set(frame)
        heads = world_heads(obj)
        pelvis, head = heads[0], heads[JOINT_NAMES.index("head")]
        np.testing.assert_allclose(pelvis, [x, 0.3, 0.93], atol=1e-5)  # Blender is Z-up too
        assert head[2] - pelvis[2] > 0.55 and abs(head[1] - pelvis[1]) < 0.1  # standing


def test_a_body_standing_in_an_amass_file_stands_on_the_floor_in_blender(blender, tmp_path):
    # AMASS's floor is where the soles are: laid at the lowest joint, a standing body's feet
    # hovered 3.5 cm over the floor the armature was made on.
    from shared_protocol.pose import SOLE_DEPTH

    standing = -DEFAULT_REST_JOINTS[:, 1].min() + SOLE_DEPTH  # its rest pelvis over its soles
    poses = np.zeros((1, 156))
    poses[:, 0] = np.pi / 2  # upright in AMASS's Z-up world
    np.savez(tmp_path / "stand.npz", poses=poses, trans=[[0, 0, standing]], mocap_framerate=30.0)
    obj = create_smpl_armature(bpy.context)  # with the mannequin, its soles on z = 0
    import_npz(obj, tmp_path / "stand.npz", start=1)
    bpy.context.view_layer.update()
    mesh = obj.children[0].evaluated_get(bpy.context.evaluated_depsgraph_get())
    lowest = min((mesh.matrix_world @ v.co).z for v in mesh.data.vertices)
    assert lowest == pytest.approx(0.0, abs=2e-3)


def test_import_of_a_bad_file_reports_an_error(blender, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="bad.npz: not an .npz file"):
        bpy.ops.chatpose.import_npz(filepath=str(bad))
    assert list(bpy.data.objects) == []  # no armature made for a file that does not load
    long = tmp_path / "long.npz"
    motion(3, seed=1).save_npz(long)
    with pytest.raises(RuntimeError, match="end at frame 1048576; Blender's frames go"):
        bpy.ops.chatpose.import_npz(filepath=str(long), start_frame=1_048_574)
    assert list(bpy.data.objects) == []  # nor for one that does not fit the timeline
    # Nor for one Blender would key for minutes, and could run out of memory keying.
    np.savez(long, poses=np.zeros((100_001, 72)), mocap_framerate=np.array(30.0))
    with pytest.raises(RuntimeError, match="long.npz: 100,001 poses to key, more than the 100,000"):
        bpy.ops.chatpose.import_npz(filepath=str(long))
    assert list(bpy.data.objects) == []
    resampled = dict(resample=True, frame_step=2)  # at 12 fps in a 24 fps scene: 40,001 poses
    bpy.context.scene.render.fps, bpy.context.scene.render.fps_base = 24, 1.0
    with pytest.raises(RuntimeError, match="end at frame 1048576"):  # counted resampled
        bpy.ops.chatpose.import_npz(filepath=str(long), start_frame=968_576, **resampled)
    # A frame rate no scene can take is refused before any key is written.
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    fast = tmp_path / "fast.npz"
    np.savez(fast, poses=np.zeros((3, 72)), mocap_framerate=1e300)
    with pytest.raises(RuntimeError, match="fast.npz: mocap_framerate: expected a frame rate"):
        bpy.ops.chatpose.import_npz(filepath=str(fast))
    assert obj.animation_data is None or obj.animation_data.action is None


def test_a_second_import_goes_into_a_new_take_and_keeps_the_first(blender, tmp_path):
    # Keyed into the same action, a 20-frame motion over a 100-frame one left the old
    # frames 21 to 100 playing after it, and export wrote all 100.
    long, short = tmp_path / "long.npz", tmp_path / "short.npz"
    motion(10, seed=1).save_npz(long)
    motion(4, seed=2).save_npz(short)
    assert bpy.ops.chatpose.import_npz(filepath=str(long)) == {"FINISHED"}
    obj = bpy.context.active_object
    first = obj.animation_data.action
    assert bpy.ops.chatpose.import_npz(filepath=str(short)) == {"FINISHED"}
    assert obj.animation_data.action.name == "short" and keyed_frames(obj) == [1, 2, 3, 4]
    assert first.use_fake_user and len(first.fcurves) > 0  # kept when the file is saved
    out = tmp_path / "out.npz"
    assert bpy.ops.chatpose.export_npz(filepath=str(out)) == {"FINISHED"}
    np.testing.assert_allclose(
        Motion.load_npz(out).axis_angle, motion(4, seed=2).axis_angle, atol=1e-5
    )
    # Into the current take, as a clip after the first: one action, both motions.
    assert bpy.ops.chatpose.import_npz(filepath=str(long), start_frame=5, new_take=False) == {
        "FINISHED"
    }
    assert obj.animation_data.action.name == "short" and keyed_frames(obj) == list(range(1, 15))


def test_an_export_of_keys_too_far_apart_to_read_between_says_their_timing_is_lost(
    blender, tmp_path, capfd
):
    bpy.ops.chatpose.create_armature(with_mesh=False)
    obj = bpy.context.active_object
    key_poses(obj, motion(3, seed=1).poses(), [1, 2, 50_000])  # a stray key far away
    out = tmp_path / "out.npz"
    assert bpy.ops.chatpose.export_npz(filepath=str(out)) == {"FINISHED"}
    assert len(Motion.load_npz(out)) == 3
    assert (
        f"Wrote 3 frame(s) to {out}: the keys alone, one after the other at the scene's rate"
    ) in capfd.readouterr().out


def test_an_export_says_when_the_rig_moves_as_a_whole(blender, tmp_path, capfd):
    # A rig keyed to travel as an object (or by a parent, a constraint, the NLA) was written
    # as a body standing still at the origin, reported as plain success.
    bpy.ops.chatpose.create_armature(with_mesh=False)
    obj = bpy.context.active_object
    key_poses(obj, motion(2, seed=1).poses(), [1, 11])
    out = tmp_path / "out.npz"

    def export_message() -> str:
        assert bpy.ops.chatpose.export_npz(filepath=str(out)) == {"FINISHED"}
        return capfd.readouterr().out

    # Placed in the scene's layout, and keyed there once (I over the object): no motion.
    obj.location.x = 2.0
    obj.keyframe_insert("location", frame=1)
    limit = obj.constraints.new("LIMIT_ROTATION")
    assert "Warning" not in export_message()
    obj.location.x = 4.0
    obj.keyframe_insert("location", frame=11)
    message = export_message()
    assert (
        f"the armature's own motion only: {obj.name} moves as a whole: its keys change its "
        "Location, which the file leaves out" in message
    )
    assert len(Motion.load_npz(out)) == 2  # written all the same
    for fcurve in action_fcurves(obj):
        fcurve.mute = fcurve.mute or fcurve.data_path == "location"
    assert "Warning" not in export_message()
    obj.constraints.remove(limit)
    # A parent that follows a path; a take in the NLA that walks the rig.
    dolly = bpy.data.objects.new("Dolly", None)
    bpy.context.scene.collection.objects.link(dolly)
    obj.parent = dolly
    follow = dolly.constraints.new("FOLLOW_PATH")
    follow.target = bpy.data.objects.new("Path", bpy.data.curves.new("Path", "CURVE"))
    assert "Dolly moves as a whole: its constraint 'Follow Path' moves it" in export_message()
    dolly.constraints.remove(follow)
    walker = bpy.data.objects.new("Walker", None)
    for frame, x in ((1, 0.0), (30, 3.0)):
        walker.location.x = x
        walker.keyframe_insert("location", frame=frame)
    walk = walker.animation_data.action
    track = dolly.animation_data_create().nla_tracks.new()
    strip = track.strips.new("walk", 1, walk)
    assert "Dolly moves as a whole: the NLA strip 'walk' changes its Location" in export_message()
    if hasattr(strip, "action_slot"):  # Blender 4.4+: a strip with no slot animates nothing
        strip.action_slot = None
        assert "Warning" not in export_message()
    track.strips.remove(strip)
    # Keys baked to samples; constant keys made cyclic.
    for frame, x in ((1, 0.0), (30, 3.0)):
        dolly.location.x = x
        dolly.keyframe_insert("location", index=0, frame=frame)
    (location_x,) = action_fcurves(dolly)
    location_x.convert_to_samples(1, 30)
    assert "Dolly moves as a whole: its keys change its Location" in export_message()
    location_x.convert_to_keyframes(1, 30)
    location_x.keyframe_points.clear()
    for frame in (1, 30):
        location_x.keyframe_points.insert(frame, 2.0)
    location_x.modifiers.new("CYCLES")
    assert "Warning" not in export_message()
    # Riding another armature's bone (the Armature constraint's targets are a list).
    ride = dolly.constraints.new("ARMATURE")
    ride.targets.new().target = obj
    ride.targets[0].subtarget = "pelvis"
    assert "Dolly moves as a whole: its constraint 'Armature' moves it" in export_message()


def test_each_take_exports_with_its_own_subject(blender, tmp_path):
    # Gender and betas were kept on the object: the second import's subject came out with
    # the first take too.
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    motion(3, seed=1).save_npz(first)  # female, betas -1 ... 1
    Motion.from_poses(motion(2, seed=2).poses(), gender="male", betas=np.full(10, 0.5)).save_npz(
        second
    )
    assert bpy.ops.chatpose.import_npz(filepath=str(first)) == {"FINISHED"}
    obj = bpy.context.active_object
    take = obj.animation_data.action
    assert bpy.ops.chatpose.import_npz(filepath=str(second)) == {"FINISHED"}
    obj.animation_data.action = take
    out = tmp_path / "out.npz"
    assert bpy.ops.chatpose.export_npz(filepath=str(out)) == {"FINISHED"}
    exported = Motion.load_npz(out)
    assert exported.gender == "female"
    np.testing.assert_allclose(exported.betas, np.linspace(-1, 1, 10))


def test_an_import_refuses_a_selected_rig_that_is_not_smpl_and_a_file_of_no_frames(
    blender, tmp_path
):
    source = tmp_path / "walk.npz"
    motion(3, seed=1).save_npz(source)
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    obj.name = "Hero"
    bpy.ops.object.mode_set(mode="EDIT")
    obj.data.edit_bones["left_hip"].name = "L_UpLeg"  # one bone of another naming
    bpy.ops.object.mode_set(mode="OBJECT")
    with pytest.raises(RuntimeError, match=r"'Hero' is not an SMPL armature: it has no bone"):
        bpy.ops.chatpose.import_npz(filepath=str(source))
    assert [o.name for o in bpy.data.objects] == ["Hero"]  # no second rig made beside it
    body = bpy.data.objects.new("Body", bpy.data.meshes.new("Body"))  # or its mesh selected
    bpy.context.scene.collection.objects.link(body)
    body.parent = obj
    bpy.context.view_layer.objects.active = body
    with pytest.raises(RuntimeError, match=r"'Hero' is not an SMPL armature: it has no bone"):
        bpy.ops.chatpose.import_npz(filepath=str(source))
    assert sorted(o.name for o in bpy.data.objects) == ["Body", "Hero"]
    bpy.context.view_layer.objects.active = None

    keyed = create_smpl_armature(bpy.context, with_mesh=False)
    assert bpy.ops.chatpose.import_npz(filepath=str(source)) == {"FINISHED"}
    take = keyed.animation_data.action
    empty = tmp_path / "empty.npz"
    Motion(np.zeros((0, 24, 3)), np.zeros((0, 3))).save_npz(empty)
    with pytest.raises(RuntimeError, match=r"empty\.npz: the motion holds no frames"):
        bpy.ops.chatpose.import_npz(filepath=str(empty))
    assert keyed.animation_data.action == take and keyed_frames(keyed) == [1, 2, 3]


def test_an_import_in_edit_mode_uses_the_bones_as_edited(blender, tmp_path):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    bpy.ops.object.mode_set(mode="EDIT")
    obj.data.edit_bones["left_elbow"].tail = (1.0, 0.2, 1.3)  # re-aimed, not yet in data.bones
    source = tmp_path / "in.npz"
    motion(2, seed=4).save_npz(source)
    assert bpy.ops.chatpose.import_npz(filepath=str(source)) == {"FINISHED"}
    assert bpy.context.mode == "OBJECT"
    bpy.ops.object.mode_set(mode="POSE")  # a mode posing reads as it is: kept
    assert bpy.ops.chatpose.import_npz(filepath=str(source)) == {"FINISHED"}
    assert bpy.context.mode == "POSE"
    bpy.ops.object.mode_set(mode="EDIT")  # and a file that does not load changes nothing
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="not an .npz file"):
        bpy.ops.chatpose.import_npz(filepath=str(tmp_path / "bad.npz"))
    assert bpy.context.mode == "EDIT_ARMATURE"
    bpy.ops.object.mode_set(mode="OBJECT")
    for frame, pose in zip((1, 2), motion(2, seed=4).poses(), strict=True):
        np.testing.assert_allclose(read_pose(obj, frame).axis_angle, pose.axis_angle, atol=1e-5)


def test_a_location_key_on_another_bone_does_not_stretch_the_export(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    key_poses(obj, [random_pose(i) for i in range(3)], [1, 2, 3])
    obj.pose.bones["left_wrist"].keyframe_insert("location", frame=300)
    assert keyed_frames(obj) == [1, 2, 3]


def test_poses_with_labels_and_partial_translation(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    pose = Pose(random_pose(1).axis_angle, None, "kneel")
    key_poses(obj, [pose], [1])
    assert read_pose(obj, 1).translation.tolist() == [0.0, 0.0, 0.0]


# --- the batch record on the armature ---------------------------------------------------------


def key_line(obj, line, pose):
    key_batch_lines(obj, [(line, pose)])


def test_batch_lines_write_keys_and_leave_the_other_channels_alone(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    bpy.context.scene.frame_set(300)
    apply_pose(obj, random_pose(7))  # the animator posing by hand at frame 300, not keyed
    obj.pose.bones["head"].scale = (1.5, 1.5, 1.5)
    obj.pose.bones["left_wrist"].location = (0.0, 0.02, 0.0)
    lines = load_record(obj).pending(["stand", "kneel"], start=1, step=10)
    key_batch_lines(obj, [(line, random_pose(line.line)) for line in lines])
    bpy.context.view_layer.update()  # as Blender does after the timer's tick
    assert keyed_frames(obj) == [1, 11]
    # The keyed rotations show the animation at frame 300 (the last key holds), as after any
    # change to an animation; the channels no batch keys keep what the animator set.
    np.testing.assert_allclose(read_pose(obj).axis_angle, random_pose(1).axis_angle, atol=1e-5)
    assert tuple(obj.pose.bones["head"].scale) == pytest.approx((1.5, 1.5, 1.5))
    assert tuple(obj.pose.bones["left_wrist"].location) == pytest.approx((0.0, 0.02, 0.0))


def test_batch_record_on_the_armature_resumes_a_run(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    lines = ["stand", "kneel", "wave"]
    assert load_record(obj) == BatchRecord()
    for item in load_record(obj).pending(lines, start=1, step=10)[:2]:  # stopped after two
        key_line(obj, item, random_pose(item.line))
    action = obj.animation_data.action
    [name] = [key for key in action.keys() if key.startswith(RECORD_PROPERTY)]  # one per slot
    assert isinstance(action[name], str)
    rest = load_record(obj).pending(lines, start=1, step=10)
    assert [(p.line, p.frame) for p in rest] == [(2, 21)]
    key_line(obj, rest[0], random_pose(2))
    assert load_record(obj).pending(lines, start=1, step=10) == []
    assert keyed_frames(obj) == [1, 11, 21]
    for i, frame in enumerate([1, 11, 21]):
        np.testing.assert_allclose(
            read_pose(obj, frame).axis_angle, random_pose(i).axis_angle, atol=1e-5
        )
    action[name] = "garbage"
    with pytest.raises(ValueError, match="batch record"):
        load_record(obj)
    clear_record(obj)
    assert len(load_record(obj).pending(lines, 1, 10)) == 3
    save_record(obj, BatchRecord())
    assert load_record(obj) == BatchRecord()


def handles(obj) -> list:
    """Every key's handles on the armature's action, in curve and key order."""
    return [
        (tuple(point.handle_left), tuple(point.handle_right))
        for fcurve in action_fcurves(obj)
        for point in fcurve.keyframe_points
    ]


def test_a_batch_s_keys_get_their_handles_and_its_record_is_written_whole_when_it_settles(
    blender,
):
    import json

    obj = create_smpl_armature(bpy.context, with_mesh=False)
    lines = [f"pose {i}" for i in range(6)]
    pending = load_record(obj).pending(lines, start=1, step=10)
    for line in pending[:4]:  # a line a timer tick
        key_line(obj, line, random_pose(line.line))
    action = obj.animation_data.action
    [name] = [key for key in action.keys() if key.startswith(RECORD_PROPERTY)]
    after_four = action[name]
    key_line(obj, pending[1], random_pose(1))  # keyed again (a rerun's edited line)
    key_line(obj, pending[4], random_pose(4))
    key_line(obj, pending[5], random_pose(5))
    # Each tick added its line to the stored text, rewriting none of it.
    assert action[name].startswith(after_four[:-2])
    assert len(json.loads(action[name])["entries"]) == 7
    assert load_record(obj).pending(lines, 1, 10) == []
    unsettled = handles(obj)
    settle_batch_keys(obj)
    assert len(json.loads(action[name])["entries"]) == 6  # once a line
    assert load_record(obj).pending(lines, 1, 10) == []
    # The handles Blender gives keys inserted all at once; left until now.
    settled = handles(obj)
    assert settled != unsettled
    at_once = create_smpl_armature(bpy.context, with_mesh=False)
    frames = [1 + 10 * i for i in range(6)]
    key_poses(at_once, [random_pose(i) for i in range(6)], frames, use_translation=False)
    np.testing.assert_allclose(np.array(settled), np.array(handles(at_once)), atol=1e-5)


def test_the_batch_record_is_parsed_once_and_read_anew_when_an_undo_changes_it(
    blender, monkeypatch
):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    lines = ["stand", "kneel", "wave"]
    first, second = load_record(obj).pending(lines, start=1, step=10)[:2]
    key_line(obj, first, random_pose(0))
    action = obj.animation_data.action
    [name] = [key for key in action.keys() if key.startswith(RECORD_PROPERTY)]
    after_one = action[name]
    key_line(obj, second, random_pose(1))
    parsed = []
    from_json = BatchRecord.from_json
    monkeypatch.setattr(
        BatchRecord, "from_json", lambda text: parsed.append(text) or from_json(text)
    )
    for _ in range(3):  # what was just saved is not parsed again (a timer tick per line)
        assert [p.line for p in load_record(obj).pending(lines, 1, 10)] == [2]
    assert parsed == []
    action[name] = after_one  # as an undo puts it back
    assert [p.line for p in load_record(obj).pending(lines, 1, 10)] == [1, 2]
    assert parsed == [after_one]


def test_the_batch_record_belongs_to_the_take_its_keys_are_in(blender):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    lines = ["stand", "kneel"]
    for item in load_record(obj).pending(lines, start=1, step=10):
        key_line(obj, item, random_pose(item.line))
    take1 = obj.animation_data.action
    obj.animation_data.action = bpy.data.actions.new("take 2")  # a new take, no keys in it
    assert len(load_record(obj).pending(lines, 1, 10)) == 2
    key_line(obj, load_record(obj).pending(lines, 1, 10)[0], random_pose(5))
    assert len(load_record(obj).pending(lines, 1, 10)) == 1  # take 2's own progress
    obj.animation_data.action = take1  # back to the first take: all of it is still done
    assert load_record(obj).pending(lines, 1, 10) == []
    track = obj.animation_data.nla_tracks.new()  # pushed down to the NLA: no action, no record
    track.strips.new("take 1", 1, take1)
    obj.animation_data.action = None
    assert len(load_record(obj).pending(lines, 1, 10)) == 2


def test_each_slot_of_a_shared_action_has_its_own_record(blender):
    a = create_smpl_armature(bpy.context, with_mesh=False)
    b = create_smpl_armature(bpy.context, name="B", with_mesh=False)
    lines = ["stand", "kneel"]
    for item in load_record(a).pending(lines, start=1, step=10):
        key_line(a, item, random_pose(item.line))
    # A's take assigned to B (the Action editor's dropdown): Blender gives B no slot, and
    # nothing in the take moves B, nor is anything in it B's to write over.
    b.animation_data_create().action = a.animation_data.action
    assert b.animation_data.action_slot is None
    assert keyed_frames(b) == []  # an export of B writes its current pose, not A's motion
    assert len(load_record(b).pending(lines, 1, 10)) == 2  # nothing keyed for B
    a_keys = [read_pose(a, frame).axis_angle for frame in (1, 11)]
    for item in load_record(b).pending(lines, start=1, step=10):
        key_line(b, item, random_pose(10 + item.line))
    assert b.animation_data.action_slot not in (None, a.animation_data.action_slot)
    for frame, before in zip((1, 11), a_keys, strict=True):
        np.testing.assert_array_equal(read_pose(a, frame).axis_angle, before)
    np.testing.assert_allclose(read_pose(b, 11).axis_angle, random_pose(11).axis_angle, atol=1e-5)
    assert load_record(a).pending(lines, 1, 10) == load_record(b).pending(lines, 1, 10) == []


def test_a_record_made_in_nla_tweak_mode_follows_its_take(blender):
    obj, take = armature_editing_a_take_at_100()
    lines = ["stand", "kneel"]
    for item in load_record(obj).pending(lines, start=110, step=10):
        key_line(obj, item, random_pose(item.line))
    assert load_record(obj).pending(lines, 110, 10) == []
    obj.animation_data.use_tweak_mode = False  # the take, assigned as it is: keys at 11, 21
    obj.animation_data.nla_tracks.remove(obj.animation_data.nla_tracks[0])
    obj.animation_data.action = take
    assert keyed_frames(obj) == [1, 11, 21]
    assert load_record(obj).pending(lines, 11, 10) == []
    assert len(load_record(obj).pending(lines, 110, 10)) == 2


def test_a_record_made_on_a_scaled_nla_strip_keeps_every_line_keyed(blender):
    obj, _ = armature_editing_a_take_at_100()
    strip = obj.animation_data.nla_tracks[0].strips[0]
    obj.animation_data.use_tweak_mode = False  # a strip's scale is set outside tweak mode
    strip.scale = 3.0  # scene frame 110 is the take's frame 1 + 10 / 3
    obj.animation_data.use_tweak_mode = True
    lines = ["stand", "kneel", "wave"]
    for item in load_record(obj).pending(lines, start=110, step=10):
        key_line(obj, item, random_pose(item.line))
    assert load_record(obj).pending(lines, 110, 10) == []  # not keyed again by every rerun
    assert keyed_frames(obj) == [100, 110, 120, 130]


def test_keys_are_refused_when_the_action_is_linked_from_a_library(blender, tmp_path):
    """Blender skips every key into a linked action with a line on the console: the add-on
    would report a pose keyed that is not."""
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    take = linked_from_library(bpy.data.actions.new("take"), tmp_path / "takes.blend")
    obj.animation_data_create().action = take
    with pytest.raises(
        LockedCurveError, match="the action 'take' is linked from .*takes.blend"
    ) as exc:
        apply_pose(obj, random_pose(1), frame=5)
    # A review: Make Local, which it offered, cuts a library override off from its library.
    assert "Make Local" not in str(exc.value) and "New Action button" in str(exc.value)
    with pytest.raises(LockedCurveError, match="is linked from"):
        key_poses(obj, [random_pose(2), random_pose(3)], [1, 2])
    assert keyed_frames(obj) == []
    # Cleared in memory, the record would come back when the file is opened again.
    obj.data["chatpose_rig"] = obj.data.get("chatpose_rig", 1)
    bpy.context.scene.chatpose.target = obj
    with pytest.raises(RuntimeError, match="so its batch record cannot be cleared"):
        bpy.ops.chatpose.clear_batch_record()


def test_a_linked_armature_is_not_posed_by_the_operators(blender, tmp_path):
    rig = create_smpl_armature(bpy.context, name="Rig", with_mesh=False)
    linked = linked_from_library(rig, tmp_path / "rigs.blend")
    bpy.context.scene.collection.objects.link(linked)
    bpy.context.view_layer.objects.active = linked
    assert not bpy.ops.chatpose.rest_pose.poll()  # what it would change is lost on saving
    assert bpy.ops.chatpose.export_npz.poll()  # reading its keys is fine
    with pytest.raises(RuntimeError, match="Not imported: 'Rig' is linked from .*rigs.blend"):
        bpy.ops.chatpose.import_npz(filepath=str(tmp_path / "any.npz"))


def _character_library(path) -> None:
    """A library file with the collection "Chars" holding the SMPL armature "Rig"."""
    chars = bpy.data.collections.new("Chars")
    bpy.context.scene.collection.children.link(chars)
    layers = bpy.context.view_layer.layer_collection
    bpy.context.view_layer.active_layer_collection = layers.children["Chars"]
    create_smpl_armature(bpy.context, name="Rig", with_mesh=False)
    bpy.data.libraries.write(str(path), {chars}, fake_user=True)
    bpy.ops.wm.read_homefile(use_empty=True)


def _reopened_without(library) -> None:
    """The open file saved beside ``library``, ``library`` deleted, and the file opened again:
    a shot whose character's file went missing."""
    shot = library.with_name("shot.blend")
    bpy.ops.wm.save_as_mainfile(filepath=str(shot))
    library.unlink()
    bpy.ops.wm.open_mainfile(filepath=str(shot))


def _overridden_character(library) -> bpy.types.Object:
    """The armature of a library override of `_character_library`'s character, written to
    ``library``, as a studio's shot holds it."""
    _character_library(library)
    with bpy.data.libraries.load(str(library), link=True) as (_, linked):
        linked.collections = ["Chars"]
    scene = bpy.context.scene
    scene.collection.children.link(linked.collections[0])
    bpy.context.view_layer.update()
    linked.collections[0].override_hierarchy_create(scene, bpy.context.view_layer)
    scene.collection.children.unlink(linked.collections[0])
    [override] = [o for o in bpy.data.objects if o.override_library is not None]
    return override


def test_a_character_whose_library_file_is_missing_is_named_so(blender, tmp_path):
    # A review: an override whose library went missing was "not an SMPL armature (it has no
    # bone pelvis ...)", and a linked Target "was deleted"; neither was.
    from blender_addon.blender.props import target_problem

    library = tmp_path / "characters.blend"
    _overridden_character(library)
    _reopened_without(library)
    [override] = [o for o in bpy.data.objects if o.override_library is not None]
    bpy.context.view_layer.objects.active = override
    missing = "'Rig' comes from //characters.blend, which was not found when this file was opened"
    assert target_problem(bpy.context).startswith(missing)
    with pytest.raises(RuntimeError, match=f"Not imported: {missing}"):
        bpy.ops.chatpose.import_npz(filepath=str(tmp_path / "any.npz"))
    [stand_in] = [o for o in bpy.data.objects if o.library is not None]
    bpy.context.scene.chatpose.target = stand_in
    assert target_problem(bpy.context).startswith(f"The Target {missing}")


@pytest.mark.parametrize("selected", ["the linked rig", "the character's instance"])
def test_a_selection_whose_library_file_is_missing_is_named_so(blender, tmp_path, selected):
    # The diff review: the rig's stand-in (an empty) and the instance of the character's
    # (now empty) collection gave "No SMPL armature", and Import made a rig beside them.
    from blender_addon.blender.props import target_problem

    library = tmp_path / "characters.blend"
    _character_library(library)
    with bpy.data.libraries.load(str(library), link=True) as (_, linked):
        linked.collections = ["Chars"]
    if selected == "the linked rig":
        bpy.context.scene.collection.objects.link(linked.collections[0].objects["Rig"])
    else:
        instance = bpy.data.objects.new("Hero", None)
        instance.instance_type, instance.instance_collection = "COLLECTION", linked.collections[0]
        bpy.context.scene.collection.objects.link(instance)
    _reopened_without(library)
    name = "Rig" if selected == "the linked rig" else "Hero"
    bpy.context.view_layer.objects.active = bpy.data.objects[name]
    where = "comes from" if name == "Rig" else "shows 'Chars' from"
    missing = f"'{name}' {where} //characters.blend, which was not found when this file was opened"
    assert target_problem(bpy.context).startswith(missing)
    objects = len(bpy.data.objects)
    with pytest.raises(RuntimeError, match=f"Not imported: {missing}"):
        bpy.ops.chatpose.import_npz(filepath=str(tmp_path / "any.npz"))
    assert len(bpy.data.objects) == objects


def test_a_prop_whose_mesh_library_is_missing_is_no_rig_s_problem(blender, tmp_path):
    # The late review: a table whose mesh came from a missing file refused Import ("'Table'
    # comes from ..."), where nothing of a rig was missing.
    from blender_addon.blender.props import target_problem

    library = tmp_path / "props.blend"
    bpy.data.libraries.write(str(library), {bpy.data.meshes.new("TableMesh")}, fake_user=True)
    with bpy.data.libraries.load(str(library), link=True) as (_, linked):
        linked.meshes = ["TableMesh"]
    table = bpy.data.objects.new("Table", linked.meshes[0])
    bpy.context.scene.collection.objects.link(table)
    _reopened_without(library)
    bpy.context.view_layer.objects.active = bpy.data.objects["Table"]
    assert target_problem(bpy.context).startswith("No SMPL armature")


def test_an_override_whose_library_file_is_missing_but_whose_rig_is_whole_is_posed(
    blender, tmp_path
):
    # The diff review: its armature data made local, it still has its 24 bones, and was
    # refused all the same (as "The Target", though it was only selected).
    from blender_addon.blender.props import target_problem

    library = tmp_path / "characters.blend"
    override = _overridden_character(library)
    override.data = override.data.copy()  # local armature data: the rig needs no library
    _reopened_without(library)
    [override] = [o for o in bpy.data.objects if o.override_library is not None]
    bpy.context.view_layer.objects.active = override
    assert target_problem(bpy.context) is None


def test_an_instance_of_a_collection_without_an_smpl_armature_is_no_character(blender):
    # The diff review: it was told to make a library override "and pose that", of a rig the
    # add-on cannot pose either.
    from blender_addon.blender.props import target_problem

    props = bpy.data.collections.new("Props")
    props.objects.link(bpy.data.objects.new("Crane", bpy.data.armatures.new("Crane")))
    instance = bpy.data.objects.new("Crane instance", None)
    instance.instance_type, instance.instance_collection = "COLLECTION", props
    bpy.context.scene.collection.objects.link(instance)
    bpy.context.view_layer.objects.active = instance
    assert target_problem(bpy.context).startswith("No SMPL armature")


def test_a_linked_target_shown_through_an_instance_is_told_to_be_overridden(blender, tmp_path):
    # A review: "link it into a scene" led a linked rig to the next refusal (linked: lost on
    # saving); an override is what poses it.
    from blender_addon.blender.props import target_problem

    _character_library(tmp_path / "characters.blend")
    with bpy.data.libraries.load(str(tmp_path / "characters.blend"), link=True) as (_, linked):
        linked.collections = ["Chars"]
    instance = bpy.data.objects.new("Hero", None)
    instance.instance_type, instance.instance_collection = "COLLECTION", linked.collections[0]
    bpy.context.scene.collection.objects.link(instance)
    bpy.context.scene.chatpose.target = bpy.data.objects["Rig"]
    assert target_problem(bpy.context) == (
        "The Target 'Rig' is in no scene, only shown through the collection instance 'Hero': "
        "make the instance a library override to pose it, or pick another Target"
    )


@pytest.mark.parametrize("library", [False, True])
def test_a_character_s_collection_instance_is_not_taken_for_no_armature(blender, tmp_path, library):
    # A review: with the instance selected (what a click on the character selects), Import made
    # a new SMPL armature at the cursor, and the panel said to create one.
    from blender_addon.blender.props import target_problem

    if library:
        _character_library(tmp_path / "characters.blend")
        with bpy.data.libraries.load(str(tmp_path / "characters.blend"), link=True) as (_, linked):
            linked.collections = ["Chars"]
        chars = linked.collections[0]
    else:
        chars = bpy.data.collections.new("Chars")
        create_smpl_armature(bpy.context, name="Rig", with_mesh=False)
        for collection in bpy.data.objects["Rig"].users_collection:
            collection.objects.unlink(bpy.data.objects["Rig"])
        chars.objects.link(bpy.data.objects["Rig"])
    instance = bpy.data.objects.new("Hero", None)
    instance.instance_type, instance.instance_collection = "COLLECTION", chars
    bpy.context.scene.collection.objects.link(instance)
    bpy.context.view_layer.objects.active = instance
    remedy = "make a library override of it" if library else "link the collection into the scene"
    problem = target_problem(bpy.context)
    assert (
        problem.startswith("'Hero' is an instance of the collection 'Chars'") and remedy in problem
    )
    objects = len(bpy.data.objects)
    with pytest.raises(RuntimeError, match="Not imported: 'Hero' is an instance of the collection"):
        bpy.ops.chatpose.import_npz(filepath=str(tmp_path / "any.npz"))
    assert len(bpy.data.objects) == objects  # no new armature beside the character


def test_an_import_into_muted_f_curves_says_they_do_not_play(blender, tmp_path, capfd):
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    bpy.context.view_layer.objects.active = obj
    key_poses(obj, [random_pose(1)], [1])
    for fcurve in action_fcurves(obj):
        fcurve.mute = fcurve.data_path.endswith(".location")
    path = tmp_path / "take.npz"
    motion(2, seed=3).save_npz(path)
    bpy.ops.chatpose.import_npz(filepath=str(path), new_take=False, use_translation=True)
    assert "F-curves of pelvis are muted: keys go into them" in capfd.readouterr().out


def test_buttons_greyed_in_edit_mode_say_why(blender):
    # They were greyed with no word: the tooltip said nothing of the mode.
    obj = create_smpl_armature(bpy.context, with_mesh=False)
    bpy.context.view_layer.objects.active = obj
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        for operator in (bpy.ops.chatpose.rest_pose, bpy.ops.chatpose.export_npz):
            with pytest.raises(RuntimeError, match="Leave Edit Mode first"):
                operator()
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
    assert bpy.ops.chatpose.rest_pose.poll()


@pytest.mark.parametrize("mode", ["QUATERNION", "XYZ"])
def test_a_pose_keyed_away_from_the_playhead_carries_on_from_the_animation_there(blender, mode):
    import math

    obj = create_smpl_armature(bpy.context, with_mesh=False)
    pelvis = obj.pose.bones["pelvis"]
    pelvis.rotation_mode = mode
    path = "rotation_quaternion" if mode == "QUATERNION" else "rotation_euler"
    for frame, angle in ((1, 0.0), (50, math.pi), (100, 2 * math.pi)):  # a full turn about Z
        if mode == "QUATERNION":
            pelvis.rotation_quaternion = (math.cos(angle / 2), 0, 0, math.sin(angle / 2))
        else:
            pelvis.rotation_euler = (0.0, 0.0, angle)
        pelvis.keyframe_insert(path, frame=frame)
    bpy.context.scene.frame_set(100)  # the playhead far from the key: the pelvis turned once
    apply_pose(obj, Pose(np.full((24, 3), 0.01)), frame=20)  # about the rest pose
    pelvis_path = f'pose.bones["pelvis"].{path}'
    curves = {c.array_index: c for c in action_fcurves(obj) if c.data_path == pelvis_path}
    if mode == "QUATERNION":  # the sign of the animation at frame 20 (w > 0), not of frame 100
        assert curves[0].evaluate(20) > 0.9
    else:  # near the animation's 70 degrees at frame 20, not a turn past the frame-100 value
        assert abs(curves[2].evaluate(20)) < 0.1
