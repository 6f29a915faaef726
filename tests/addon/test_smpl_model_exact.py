"""Exact SMPL joints from a model file: the add-on's reader (numpy, no pickle) against the real
smplx loading path (torch, CPU), on a synthetic model file with SMPL's real field shapes.

The file is synthetic (the SMPL model needs a registration) but shaped like the release:
6,890 vertices, because smplx picks extra joints (feet, face) by vertex id and would fail on a
smaller mesh. smplx's SMPL class reads only pickles, so the same arrays, read back from the
.npz, are also written as `SMPL_NEUTRAL.pkl`, the file smplx.create() opens.
"""

from __future__ import annotations

import pickle

import bpy
import numpy as np
import smplx
import torch

from blender_addon.blender.armature import create_smpl_armature, rest_joints
from blender_addon.blender.posing import apply_pose
from blender_addon.core.smpl_model import load_smpl_model
from shared_protocol.pose import SOLE_DEPTH, Z_UP_FROM_SMPL, Motion
from shared_protocol.skeleton import (
    DEFAULT_REST_JOINTS,
    JOINT_NAMES,
    PARENTS,
    forward_kinematics,
    smpl_to_blender,
)

from .helpers import random_pose

NUM_VERTICES = 6890
NUM_FACES = 13776


def write_synthetic_smpl(path, seed: int = 0) -> dict[str, np.ndarray]:
    """An SMPL-format model file: every array SMPL has, with the release's shapes."""
    rng = np.random.default_rng(seed)
    owner = np.arange(NUM_VERTICES) % 24  # the joint each vertex belongs to
    v_template = DEFAULT_REST_JOINTS[owner] + rng.normal(size=(NUM_VERTICES, 3)) * 0.04
    regressor = np.zeros((24, NUM_VERTICES))
    for j in range(24):
        ids = np.nonzero(owner == j)[0]
        w = rng.uniform(0.1, 1.0, size=ids.size)
        regressor[j, ids] = w / w.sum()
    weights = np.zeros((NUM_VERTICES, 24))
    weights[np.arange(NUM_VERTICES), owner] = 1.0
    kintree = np.stack([np.array(PARENTS), np.arange(24)]).astype(np.int64)
    kintree[0, 0] = 4294967295  # as in the release: the root's "parent" is uint32 -1
    first = rng.integers(0, NUM_VERTICES - 2, size=NUM_FACES)
    faces = np.stack([first, first + 1, first + 2], axis=1).astype(np.uint32)
    arrays = {
        "v_template": v_template,
        "shapedirs": rng.normal(size=(NUM_VERTICES, 3, 10)) * 0.01,
        "posedirs": rng.normal(size=(NUM_VERTICES, 3, 207)) * 0.001,
        "J_regressor": regressor,
        "weights": weights,
        "kintree_table": kintree,
        "f": faces,
    }
    np.savez(path, **arrays)
    return arrays


def smplx_from_npz(npz_path, folder):
    """smplx's own loading path (smplx.create -> SMPL -> pickle.load) for the arrays of the .npz
    file, in float64."""
    with np.load(npz_path) as data:
        arrays = {key: data[key] for key in data.files}
    (folder / "smpl").mkdir(parents=True, exist_ok=True)
    with open(folder / "smpl" / "SMPL_NEUTRAL.pkl", "wb") as file:
        pickle.dump(arrays, file)
    return smplx.create(str(folder), model_type="smpl", gender="neutral", dtype=torch.float64)


def test_smplx_and_the_addon_find_the_same_rest_joints(blender, tmp_path):
    from blender_addon import preferences

    npz = tmp_path / "SMPL_NEUTRAL.npz"
    arrays = write_synthetic_smpl(npz)
    body = smplx_from_npz(npz, tmp_path / "models")
    assert body.parents.tolist() == [-1, *PARENTS[1:]]
    with torch.no_grad():
        out = body()  # zero pose, zero betas
    smplx_joints = out.joints[0, :24].numpy()
    assert out.joints.shape[1] > 24  # smplx added its vertex-selected joints
    np.testing.assert_allclose(out.vertices[0].numpy(), arrays["v_template"], atol=1e-12)

    model = load_smpl_model(npz)
    np.testing.assert_allclose(model.rest_joints, smplx_joints, rtol=0, atol=1e-6)

    # The armature made from the file has its bone heads there.
    preferences.get_preferences().smpl_model_path = str(npz)
    assert bpy.ops.chatpose.create_armature() == {"FINISHED"}
    obj = bpy.context.active_object
    np.testing.assert_allclose(rest_joints(obj), smplx_joints, rtol=0, atol=1e-6)
    heads = np.array([tuple(obj.data.bones[n].head_local) for n in JOINT_NAMES])
    np.testing.assert_allclose(heads, smpl_to_blender(smplx_joints), rtol=0, atol=1e-6)
    mesh = next(o for o in obj.children if o.type == "MESH")
    assert len(mesh.data.vertices) == NUM_VERTICES

    # Posed, the bone heads follow smplx's forward kinematics too.
    pose = random_pose(5, translation=False)
    aa = torch.tensor(pose.axis_angle)
    with torch.no_grad():
        posed = body(global_orient=aa[:1].reshape(1, 3), body_pose=aa[1:].reshape(1, 69))
    apply_pose(obj, pose)
    bpy.context.view_layer.update()
    posed_heads = np.array([tuple(obj.pose.bones[n].head) for n in JOINT_NAMES])
    expected = smpl_to_blender(posed.joints[0, :24].numpy())
    np.testing.assert_allclose(posed_heads, expected, rtol=0, atol=1e-5)


def test_extra_people_face_as_the_target_and_get_a_body_only_when_it_fits(blender, tmp_path):
    from mathutils import Quaternion

    from blender_addon import preferences
    from blender_addon.blender.people import apply_people

    target = create_smpl_armature(bpy.context, with_mesh=False)  # the built-in skeleton
    target.rotation_mode = "QUATERNION"
    target.rotation_quaternion = Quaternion((0.0, 0.0, 1.0), np.pi / 2)
    npz = tmp_path / "SMPL_NEUTRAL.npz"
    write_synthetic_smpl(npz)  # another skeleton than the target's
    preferences.get_preferences().smpl_model_path = str(npz)
    pose = random_pose(6, translation=False)
    result = apply_people(bpy.context, target, [pose, pose])
    person = bpy.data.objects[result.created[0]]
    bpy.context.view_layer.update()
    np.testing.assert_allclose(
        np.array(person.matrix_world.to_3x3()), np.array(target.matrix_world.to_3x3()), atol=1e-6
    )
    mesh = next(o for o in person.children if o.type == "MESH")
    assert len(mesh.data.vertices) != NUM_VERTICES  # the mannequin, built on the target's bones
    np.testing.assert_allclose(rest_joints(person), rest_joints(target), atol=1e-6)


def test_an_exported_motion_puts_smplx_s_body_where_the_project_puts_it(tmp_path):
    """AMASS's `trans` is added to SMPL's rest pelvis J0, unturned: for a body whose J0 is not
    the origin (SMPL's is 22 cm below it), the file must say so, both ways."""
    npz = tmp_path / "SMPL_NEUTRAL.npz"
    arrays = write_synthetic_smpl(npz)
    arrays["v_template"] = arrays["v_template"] + np.array([-0.002, -0.223, 0.028])  # SMPL's J0
    np.savez(npz, **arrays)
    body = smplx_from_npz(npz, tmp_path / "models")
    rest = load_smpl_model(npz).rest_joints
    assert abs(rest[0, 1] + 0.223) < 0.01
    motion = Motion(random_pose(1).axis_angle[None].repeat(2, 0), np.array([[0.1, 0.05, 0.2]] * 2))
    motion.save_npz(tmp_path / "take.npz", rest_joints=rest)
    with np.load(tmp_path / "take.npz") as take:  # as an SMPL reader takes an AMASS file
        poses, hands, trans = (torch.tensor(take[k]) for k in ("poses", "smpl_hands", "trans"))
    body_pose = torch.cat([poses[:, 3:66], hands], dim=1)
    with torch.no_grad():
        out = body(global_orient=poses[:, :3], body_pose=body_pose, transl=trans)
    positions, _ = forward_kinematics(motion.axis_angle[0], rest, motion.translation[0])
    floor = np.array([0.0, 0.0, rest[:, 1].min() - SOLE_DEPTH])  # under the rest body's soles
    expected = positions @ Z_UP_FROM_SMPL.T - floor
    np.testing.assert_allclose(out.joints[0, :24].numpy(), expected, rtol=0, atol=1e-7)
    back = Motion.load_npz(tmp_path / "take.npz", rest_joints=rest)
    np.testing.assert_allclose(back.translation, motion.translation, atol=1e-12)
