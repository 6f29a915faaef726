"""The add-on's Blender-free core: no bpy in this file."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest

from blender_addon.core import mannequin, netpolicy, paths, posing, rig_spec, smpl_model, timeline
from shared_protocol.client import ClientCurveKeys
from shared_protocol.pose import SOLE_DEPTH
from shared_protocol.rotations import axis_angle_to_matrix
from shared_protocol.skeleton import (
    DEFAULT_REST_JOINTS,
    JOINT_NAMES,
    PARENTS,
    SMPL_TO_BLENDER,
    forward_kinematics,
)

from .conftest import ROOT
from .reference import expected_heads


def random_pose(seed: int, max_angle: float = np.pi / 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(24, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    return axes * rng.uniform(0, max_angle, size=(24, 1))


def test_core_imports_without_bpy():
    code = (
        "import sys, pkgutil, importlib, blender_addon, blender_addon.core as core; "
        "names = [m.name for m in pkgutil.iter_modules(core.__path__)]; "
        "[importlib.import_module('blender_addon.core.' + n) for n in names]; "
        "assert {'session', 'dispatch', 'service_process', 'chat'} <= set(names), names; "
        "assert 'bpy' not in sys.modules and 'mathutils' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- rig_spec ---------------------------------------------------------------------------------


def test_bone_specs_follow_the_smpl_skeleton():
    specs = rig_spec.smpl_bone_specs()
    assert [s.name for s in specs] == list(JOINT_NAMES)
    for i, s in enumerate(specs):
        assert s.parent == (None if PARENTS[i] < 0 else JOINT_NAMES[PARENTS[i]])
        x, y, z = DEFAULT_REST_JOINTS[i]
        np.testing.assert_allclose(s.head, (x, -z, y))
        np.testing.assert_allclose(np.subtract(s.tail, s.head), (0, 0, rig_spec.BONE_LENGTH))
        assert s.roll == 0.0
    heads = np.array([s.head for s in specs])
    np.testing.assert_allclose(rig_spec.rest_joints_from_heads(heads), DEFAULT_REST_JOINTS)


def test_armature_axes_are_read_off_the_rest_skeleton():
    z_up = DEFAULT_REST_JOINTS @ SMPL_TO_BLENDER.T  # the add-on's own rig
    np.testing.assert_array_equal(rig_spec.armature_axes(z_up), SMPL_TO_BLENDER)
    np.testing.assert_array_equal(rig_spec.armature_axes(DEFAULT_REST_JOINTS), np.eye(3))  # Y-up
    np.testing.assert_allclose(
        rig_spec.rest_joints_from_heads(DEFAULT_REST_JOINTS), DEFAULT_REST_JOINTS
    )
    collapsed = np.zeros((24, 3))  # no up, no left: the add-on's own convention
    np.testing.assert_array_equal(rig_spec.armature_axes(collapsed), SMPL_TO_BLENDER)


@pytest.mark.parametrize(
    "size, units",
    [(0.6, 1.0), (1.0, 1.0), (1.3, 1.0), (100.0, 100.0), (75.0, 100.0), (1000.0, 1000.0)],
)
def test_a_rigs_units_are_read_off_its_size(size, units):
    """A child's or a tall body's skeleton is in metres; one a hundred times a person's is in
    centimetres, whose rest joints still come back in metres."""
    heads = DEFAULT_REST_JOINTS @ SMPL_TO_BLENDER.T * size
    assert rig_spec.units_per_metre(heads) == units
    np.testing.assert_allclose(
        rig_spec.rest_joints_from_heads(heads), DEFAULT_REST_JOINTS * size / units, atol=1e-12
    )
    assert rig_spec.units_per_metre(np.zeros((24, 3))) == 1.0


def test_bone_specs_reject_bad_rest_joints():
    with pytest.raises(ValueError, match="rest_joints"):
        rig_spec.smpl_bone_specs(np.zeros((23, 3)))
    with pytest.raises(ValueError, match="length"):
        rig_spec.smpl_bone_specs(length=0)


def test_z_tail_zero_roll_gives_smpl_axes():
    """The claim the rig rests on: a +Z tail with zero roll makes the bone's local X, Y, Z the
    SMPL X, Y, Z (its rest rotation is exactly the SMPL -> Blender map)."""
    b = rig_spec.bone_rest_matrix((0.1, -0.2, 0.3), (0.1, -0.2, 0.4), 0.0)
    np.testing.assert_allclose(b, SMPL_TO_BLENDER, atol=1e-15)
    # Local axis k of the bone, in armature space, is SMPL's axis k mapped to Blender.
    for k in range(3):
        np.testing.assert_allclose(b[:, k], SMPL_TO_BLENDER @ np.eye(3)[k], atol=1e-15)


def test_bone_rest_matrix_is_a_rotation_with_y_along_the_bone():
    rng = np.random.default_rng(1)
    for _ in range(50):
        head, tail = rng.normal(size=3), rng.normal(size=3)
        b = rig_spec.bone_rest_matrix(head, tail, rng.uniform(-np.pi, np.pi))
        np.testing.assert_allclose(b.T @ b, np.eye(3), atol=1e-12)
        assert np.linalg.det(b) == pytest.approx(1.0)
        d = (tail - head) / np.linalg.norm(tail - head)
        np.testing.assert_allclose(b[:, 1], d, atol=1e-12)
    np.testing.assert_allclose(
        rig_spec.bone_rest_matrix((0, 0, 0), (0, -1, 0)), np.diag([-1, -1, 1])
    )
    with pytest.raises(ValueError):
        rig_spec.bone_rest_matrix((0, 0, 0), (0, 0, 0))


# --- posing -----------------------------------------------------------------------------------


def test_smpl_rig_takes_the_pose_unchanged():
    aa = random_pose(0)
    np.testing.assert_allclose(
        posing.bone_rotation_matrices(aa, np.broadcast_to(SMPL_TO_BLENDER, (24, 3, 3))),
        axis_angle_to_matrix(aa),
        atol=1e-12,
    )
    np.testing.assert_allclose(posing.root_location([0.1, 0.2, 0.3]), [0.1, 0.2, 0.3], atol=1e-15)


def _chain_heads(aa, rest_joints, translation, bone_rest):
    """Blender's pose evaluation, written out: P_i = P_p · B_p⁻¹ · B_i · M_i and
    head_i = head_p + P_p · B_p⁻¹ · (h_i − h_p), with the root location in bone space."""
    m = posing.bone_rotation_matrices(aa, bone_rest)
    h = rest_joints @ SMPL_TO_BLENDER.T
    rot, heads = np.empty((24, 3, 3)), np.empty((24, 3))
    rot[0] = bone_rest[0] @ m[0]
    heads[0] = h[0] + bone_rest[0] @ posing.root_location(translation, bone_rest[0])
    for i in range(1, 24):
        p = PARENTS[i]
        rel = rot[p] @ bone_rest[p].T
        rot[i] = rel @ bone_rest[i] @ m[i]
        heads[i] = heads[p] + rel @ (h[i] - h[p])
    return heads


@pytest.mark.parametrize("limb_aligned", [False, True])
def test_general_formula_reproduces_forward_kinematics(limb_aligned):
    rest = DEFAULT_REST_JOINTS
    h = rest @ SMPL_TO_BLENDER.T
    if limb_aligned:  # bones pointing at their first child, with some roll
        child = {p: c for c, p in reversed(list(enumerate(PARENTS)))}
        bone_rest = np.array(
            [
                rig_spec.bone_rest_matrix(
                    h[i], h[child[i]] if i in child else h[i] + (0, 0.1, 0), 0.3 * i
                )
                for i in range(24)
            ]
        )
    else:
        bone_rest = np.broadcast_to(SMPL_TO_BLENDER, (24, 3, 3))
    for seed in range(10):
        aa, t = random_pose(seed), np.random.default_rng(seed).normal(size=3)
        np.testing.assert_allclose(
            _chain_heads(aa, rest, t, bone_rest), expected_heads(aa, rest, t), atol=1e-12
        )
        q = posing.bone_quaternions(aa, bone_rest)
        np.testing.assert_allclose(
            posing.axis_angle_from_bone_quaternions(q, bone_rest), aa, atol=1e-9
        )
        for frame in (bone_rest[0], np.eye(3)):
            loc = posing.root_location(t, frame)
            np.testing.assert_allclose(frame @ loc, SMPL_TO_BLENDER @ t, atol=1e-12)
            np.testing.assert_allclose(posing.translation_from_root_location(loc, frame), t)


def _kneel() -> np.ndarray:
    kneel = np.zeros((24, 3))
    kneel[[1, 2], 0] = -1.5  # hips flexed
    kneel[[4, 5], 0] = 1.6  # knees bent
    return kneel


def _lying_on_the_side() -> np.ndarray:
    side = np.zeros((24, 3))
    side[0, 2] = np.pi / 2
    return side


def test_the_mannequin_s_lowest_point_is_its_mesh_s_posed_as_the_rig_skins_it():
    rest = DEFAULT_REST_JOINTS
    fine = mannequin.mannequin_mesh(rest @ SMPL_TO_BLENDER.T, segments=96, rings=24)
    vertices = fine.vertices @ SMPL_TO_BLENDER  # back to the SMPL frame
    bone = fine.weights.argmax(axis=1)  # rigid skinning: one bone a vertex
    for pose in (np.zeros((24, 3)), _kneel(), _lying_on_the_side(), random_pose(7)):
        positions, rotations = forward_kinematics(pose)
        posed = np.einsum("vij,vj->vi", rotations[bone], vertices - rest[bone]) + positions[bone]
        assert mannequin.lowest_point(pose) == pytest.approx(posed[:, 1].min(), abs=5e-4)
    assert mannequin.lowest_point(np.zeros((24, 3))) == pytest.approx(
        rest[:, 1].min() - SOLE_DEPTH  # at rest: the soles, below the feet joints
    )


def test_floor_translation_puts_the_body_s_lowest_point_where_its_soles_are_at_rest():
    assert np.all(posing.floor_translation(np.zeros((24, 3))) == 0)  # standing: unchanged
    poses = np.stack([_kneel(), _lying_on_the_side(), random_pose(7), np.zeros((24, 3))])
    translation = posing.floor_translation(poses)
    assert translation.shape == (4, 3)
    assert np.all(translation[:, [0, 2]] == 0)  # straight down or up: no sideways move
    assert translation[0, 1] < -0.3  # the kneeling body comes down
    soles = mannequin.lowest_point(np.zeros((24, 3)))
    np.testing.assert_allclose(mannequin.lowest_point(poses) + translation[:, 1], soles)
    # Lying on its side, it rests on its shoulder and hip, not on their joints: those stay
    # above the floor by more than the soles' depth below the feet joints.
    positions, _ = forward_kinematics(poses[1], translation=translation[1])
    assert positions[:, 1].min() - soles > SOLE_DEPTH + 0.02
    taller = 1.2 * DEFAULT_REST_JOINTS  # someone else's skeleton: their own rest floor
    kneel = posing.floor_translation(_kneel(), taller)
    assert mannequin.lowest_point(_kneel(), taller) + kneel[1] == pytest.approx(
        mannequin.lowest_point(np.zeros((24, 3)), taller)
    )


def test_expected_heads_go_through_matrix_world():
    aa = random_pose(3)
    world = np.eye(4)
    world[:3, :3] = 2.0 * axis_angle_to_matrix([0.2, 0.5, -0.1])
    world[:3, 3] = (1, 2, 3)
    positions, _ = forward_kinematics(aa)
    expected = (positions @ SMPL_TO_BLENDER.T) @ world[:3, :3].T + world[:3, 3]
    np.testing.assert_allclose(expected_heads(aa, matrix_world=world), expected)


# --- mannequin ----------------------------------------------------------------------------------


def test_mannequin_mesh_is_well_formed_and_rigidly_skinned():
    heads = DEFAULT_REST_JOINTS @ SMPL_TO_BLENDER.T
    data = mannequin.mannequin_mesh(heads)
    n = len(data.vertices)
    assert data.weights.shape == (n, 24)
    np.testing.assert_array_equal(data.weights.sum(axis=1), 1.0)
    assert all(0 <= k < n for face in data.faces for k in face)
    owners = set(np.argmax(data.weights, axis=1).tolist())
    assert owners == set(range(24))  # every bone moves a piece
    # the head sphere sits above the head joint
    head = JOINT_NAMES.index("head")
    head_verts = data.vertices[data.weights[:, head] == 1]
    assert head_verts[:, 2].max() > heads[head, 2] + mannequin.HEAD_RADIUS


def test_mannequin_parts_colour_every_face_and_tell_left_from_right():
    heads = DEFAULT_REST_JOINTS @ SMPL_TO_BLENDER.T
    data = mannequin.mannequin_mesh(heads)
    assert data.face_parts.shape == (len(data.faces),)
    assert sorted(mannequin.PART_OF_BONE) == sorted(JOINT_NAMES)  # every bone has one part
    # a face's part is its bone's: the part of the (rigid) skin weight of its first vertex
    owners = np.argmax(data.weights, axis=1)
    for face, part in zip(data.faces, data.face_parts, strict=True):
        assert mannequin.PART_OF_BONE[JOINT_NAMES[owners[face[0]]]] == part
    names = [part.name for part in mannequin.PARTS]
    for part in mannequin.PARTS:
        side = part.name.split()[0]
        if side in ("left", "right"):  # a sided part holds only that side's bones ...
            assert all(bone.startswith(side) for bone in part.bones), part.name
            mirror = ("right" if side == "left" else "left") + part.name[len(side) :]
            assert mirror in names  # ... and has its mirror image
    colours = [part.colour for part in mannequin.PARTS]
    assert len(set(colours)) == len(colours)  # no two parts look alike
    assert set(data.face_parts.tolist()) == set(range(len(mannequin.PARTS)))


def test_capsule_encloses_its_segment():
    verts, faces = mannequin.capsule((0, 0, 0), (0, 0, 1), 0.1, segments=8, rings=3)
    assert verts[:, 2].min() == pytest.approx(-0.1)
    assert verts[:, 2].max() == pytest.approx(1.1)
    radial = np.linalg.norm(verts[:, :2], axis=1)
    assert radial.max() == pytest.approx(0.1)
    assert len(faces) == 8 * 2 + 8 * (2 * 3 - 1)


# --- smpl_model -----------------------------------------------------------------------------------


def _fake_model(n=30, seed=0):
    rng = np.random.default_rng(seed)
    regressor = rng.uniform(size=(24, n))
    regressor /= regressor.sum(axis=1, keepdims=True)
    weights = rng.uniform(size=(n, 24))
    weights /= weights.sum(axis=1, keepdims=True)
    return {
        "v_template": rng.normal(size=(n, 3)),
        "J_regressor": regressor,
        "f": rng.integers(0, n, size=(10, 3)),
        "weights": weights,
        "shapedirs": rng.normal(size=(n, 3, 10)) * 0.01,
    }


def test_smpl_model_rest_joints_come_from_the_regressor(tmp_path):
    arrays = _fake_model()
    path = tmp_path / "model.npz"
    np.savez(path, **arrays)
    model = smpl_model.load_smpl_model(path)
    np.testing.assert_allclose(model.rest_joints, arrays["J_regressor"] @ arrays["v_template"])
    assert model.faces.shape == (10, 3) and model.weights.shape == (30, 24)
    betas = np.arange(10) * 0.1
    shaped = smpl_model.load_smpl_model(path, betas=betas)
    v = arrays["v_template"] + arrays["shapedirs"] @ betas
    np.testing.assert_allclose(shaped.rest_joints, arrays["J_regressor"] @ v)


def test_smpl_model_errors_name_the_problem(tmp_path):
    arrays = _fake_model()
    del arrays["J_regressor"]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="J_regressor: missing"):
        smpl_model.load_smpl_model(path)
    with pytest.raises(ValueError, match=r"\.pkl"):
        smpl_model.load_smpl_model(tmp_path / "SMPL_NEUTRAL.pkl")
    with pytest.raises(ValueError, match="no such file"):
        smpl_model.load_smpl_model(tmp_path / "missing.npz")
    # Text under a .npz name: numpy would take it for a pickle and say so.
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz: not an \.npz file \(an \.npz is a zip"):
        smpl_model.load_smpl_model(tmp_path / "junk.npz")
    # One .npy array saved under a .npz name: np.load gives an array, not an archive.
    with open(tmp_path / "one.npz", "wb") as file:
        np.save(file, np.zeros(3))
    with pytest.raises(ValueError, match=r"one\.npz: a single \.npy array, not an \.npz"):
        smpl_model.load_smpl_model(tmp_path / "one.npz")
    # A zip bomb in the model preference would fill Blender's memory.
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("v_template.npy", "w", force_zip64=True) as member:
            header = {"descr": "<f8", "fortran_order": False, "shape": (300 << 17, 1)}
            np.lib.format.write_array_header_1_0(member, header)
            for _ in range(300):
                member.write(bytes(1 << 20))
    with pytest.raises(ValueError, match=r"bomb\.npz: 300 MiB of arrays once loaded"):
        smpl_model.load_smpl_model(bomb)
    # A pickled J_regressor (SMPL's own files hold a sparse matrix) is named, not numpy's words.
    pickled = _fake_model()
    pickled["J_regressor"] = np.array([{"sparse": True}], dtype=object)
    np.savez(tmp_path / "pickled.npz", **pickled)
    with pytest.raises(ValueError, match=r"pickled\.npz: J_regressor: .*plain \(dense\) array"):
        smpl_model.load_smpl_model(tmp_path / "pickled.npz")
    smplx = _fake_model()
    smplx["J_regressor"] = np.zeros((55, 30))
    np.savez(tmp_path / "smplx.npz", **smplx)
    with pytest.raises(ValueError, match=r"\(55, 30\) \(an SMPL-X model\? the SMPL one"):
        smpl_model.load_smpl_model(tmp_path / "smplx.npz")


# --- netpolicy, paths, timeline -------------------------------------------------------------------


# Which addresses are loopback or malformed is shared_protocol.address's (tests/test_address.py);
# here one case per rule of the add-on's policy.


def test_a_service_on_this_machine_needs_neither_online_access_nor_keys():
    assert netpolicy.address_problem("ipc:///tmp/chatpose.sock", online_access=False) is None
    assert netpolicy.address_problem("tcp://localhost:5555", online_access=False) is None


def test_a_service_off_this_machine_needs_online_access_and_keys():
    remote = "tcp://192.168.1.20:5555"
    assert "online access is off" in netpolicy.address_problem(remote, online_access=False)
    problem = netpolicy.address_problem(remote, online_access=True)
    assert "needs CURVE keys" in problem and "Client Key" in problem
    assert netpolicy.address_problem(remote, online_access=True, has_keys=True) is None


def test_malformed_addresses_are_refused_either_way():
    problem = netpolicy.address_problem("tcp://127.0.0.1", online_access=True, has_keys=True)
    assert problem.startswith("Service Address (the add-on's preferences): 'tcp://127.0.0.1'")


def test_curve_keys_are_read_and_named_when_they_cannot_be(tmp_path):
    from inference_service.keys import make_keys

    make_keys(tmp_path, ["animator"])
    secret, server = str(tmp_path / "animator.key_secret"), str(tmp_path / "server.key")
    assert netpolicy.curve_keys("", "") is None
    keys = netpolicy.curve_keys(secret, server)
    assert keys.client_secret_file == tmp_path / "animator.key_secret"
    public, secret_key, server_public = keys.load()
    assert len(public) == len(secret_key) == len(server_public) == 40  # Z85 keys
    # Read once: the session made with them reads no file again (a review: a key file
    # changed between two reads escaped Send as a traceback; on a slow share each read waits).
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("animator.key_secret", "server.key"):
        (tmp_path / name).rename(moved / name)
    assert keys.load() == (public, secret_key, server_public)
    assert keys == ClientCurveKeys(tmp_path / "animator.key_secret", tmp_path / "server.key")
    for name in ("animator.key_secret", "server.key"):
        (moved / name).rename(tmp_path / name)
    with pytest.raises(ValueError, match="set both the Client Key and the Server Key"):
        netpolicy.curve_keys(secret, "")
    for one_of_them in ((secret, ""), ("", server)):
        assert "set both" in netpolicy.curve_problem(*one_of_them)
    assert netpolicy.curve_problem("", "") is None
    with pytest.raises(ValueError, match="the client key .*nope.* cannot be read"):
        netpolicy.curve_keys(str(tmp_path / "nope"), server)
    with pytest.raises(ValueError, match="holds no secret key: the client key is the NAME"):
        netpolicy.curve_keys(str(tmp_path / "authorized_clients" / "animator.key"), server)
    (tmp_path / "garbage").write_text("not a key")
    with pytest.raises(ValueError, match="the server key .*garbage cannot be read"):
        netpolicy.curve_keys(secret, str(tmp_path / "garbage"))


def test_user_data_dir_uses_extension_path_only_for_extensions():
    calls = []

    def ext(package, create):
        calls.append((package, create))
        return f"/ext/{package}"

    # Windows Explorer's "Copy as path" quotes what it copies; a quote inside is the path's.
    assert paths.unquoted(' "C:\\ChatPose\\.venv\\Scripts\\python.exe" ') == (
        "C:\\ChatPose\\.venv\\Scripts\\python.exe"
    )
    assert paths.unquoted("'/opt/chatpose/ckpt'") == "/opt/chatpose/ckpt"
    assert paths.unquoted("/opt/it's here") == "/opt/it's here"
    assert paths.unquoted("\"/opt/x'") == "\"/opt/x'" and paths.unquoted('"') == '"'
    assert paths.is_extension_package("bl_ext.user_default.chatpose")
    assert not paths.is_extension_package("chatpose")
    assert not paths.is_extension_package("blender_addon")
    assert paths.user_data_dir("bl_ext.user_default.chatpose", ext, lambda: "/fb") == (
        "/ext/bl_ext.user_default.chatpose"
    )
    assert calls == [("bl_ext.user_default.chatpose", True)]
    assert paths.user_data_dir("chatpose", ext, lambda: "/fb") == "/fb"
    assert paths.user_data_dir("bl_ext.user_default.chatpose", None, lambda: "/fb") == "/fb"

    def not_registered(package, create):
        raise ValueError('The "package" does not name an extension')

    assert paths.user_data_dir("bl_ext.x.chatpose", not_registered, lambda: "/fb") == "/fb"


def test_playback_rate_undoes_float32_fps_base():
    float32 = lambda x: float(np.float32(x))  # noqa: E731  Blender's fps_base
    assert timeline.playback_rate(30, float32(30 / 29.97)) == 29.97
    assert timeline.playback_rate(30, float32(1.001)) == 30000 / 1001  # NTSC
    assert timeline.playback_rate(24, 1.0) == 24.0
    assert timeline.playback_rate(25, float32(25 / 12.5)) == 12.5
    # A rate that is no simple fraction stays within float32's rounding of what was set.
    assert timeline.playback_rate(30, float32(30 / 29.123456)) == pytest.approx(29.123456, 1e-7)


def test_timeline():
    assert timeline.frames_for(3, 10, 5) == [10, 15, 20]
    assert timeline.frames_for(0, 1) == []
    edge = timeline.MAX_FRAME
    assert timeline.frames_for(2, edge - 10, 10) == [edge - 10, edge]
    assert timeline.frames_for(1, -edge) == [-edge]
    with pytest.raises(ValueError, match=r"end at frame 1048578; Blender's frames go from"):
        timeline.frames_for(3, edge - 10, 7)
    with pytest.raises(ValueError, match="lower Start or Step"):
        timeline.frames_for(1, -edge - 1)
    with pytest.raises(ValueError):
        timeline.frames_for(2, 1, 0)
    assert timeline.keyed_frame_list([3.0, 1.0, 3.0, 2.0000001]) == [1, 2, 3]
    with pytest.raises(ValueError, match=r"a key lies between frames \(at 2.5\); snap"):
        timeline.keyed_frame_list([1.0, 2.5, 4.0])
    assert timeline.motion_frames([1, 3, 5], 30.0) == ([1, 3, 5], 15.0)
    assert timeline.motion_frames([1, 11, 21, 26], 24.0) == ([1, 6, 11, 16, 21, 26], 4.8)
    assert timeline.motion_frames([1, 2, 5], 30.0) == ([1, 2, 3, 4, 5], 30.0)
    # Gaps of 3, 3 and 2: every frame, not every second one (which would skip the key at 4).
    assert timeline.motion_frames([1, 4, 7, 9], 30.0) == (list(range(1, 10)), 30.0)
    assert timeline.motion_frames([7], 24.0) == ([7], 24.0)
    assert timeline.motion_frames([], 24.0) == ([], 24.0)
    assert timeline.motion_frames([1, 2, 50_000], 24.0) == ([1, 2, 50_000], 24.0)  # stray key
    assert not timeline.keeps_timing([1, 2, 50_000])
    far = [0, 40_000, 120_000]  # every 40,000 frames: 0.00075 fps, slower than a file holds
    assert timeline.motion_frames(far, 30.0) == (far, 30.0)
    # Two 6,000-frame clips keyed one after the other, 100 frames apart: the gap is kept.
    clips = [*range(1, 6001), *range(6101, 12101)]
    assert timeline.motion_frames(clips, 120.0) == (list(range(1, 12101)), 120.0)
    assert timeline.keeps_timing(list(range(1, 12101))) and timeline.keeps_timing([7])


def test_rates_that_play_alike_and_how_another_plays():
    assert timeline.same_rate(30.0, 30 / 1.001) and timeline.same_rate(24 / 1.001, 24.0)  # NTSC
    assert not timeline.same_rate(30.0, 24.0) and not timeline.same_rate(25.0, 24.0)
    assert timeline.pace(30.0, 24.0) == "25 % slower"  # a 30 fps file a key a frame at 24
    assert timeline.pace(24.0, 30.0) == "25 % faster"
    assert timeline.pace(120.0, 24.0) == "5 times slower"


def test_smpl_bones_are_found_under_each_naming_rigs_use_and_never_a_mix():
    from blender_addon.core.rig_spec import (
        BONE_NAMINGS,
        SMPL_CAPITALISED_NAMES,
        missing_smpl_bones,
        smpl_bone_names,
    )

    for naming in BONE_NAMINGS:
        assert smpl_bone_names([*naming, "m_avg_root", "jaw"]) == naming
        for joint, bone in zip(JOINT_NAMES, naming, strict=True):  # each side its own
            assert joint.startswith("left_") == ("L_" in bone or bone.startswith("left_"))
            assert joint.startswith("right_") == ("R_" in bone or bone.startswith("right_"))
    assert smpl_bone_names(["f_avg_" + n for n in SMPL_CAPITALISED_NAMES])[0] == "f_avg_Pelvis"
    mixed = [*JOINT_NAMES[:12], *SMPL_CAPITALISED_NAMES[12:]]
    assert smpl_bone_names(mixed) is None
    # The closer naming's body bones: the hands are not needed (SMPL-H and SMPL-X rigs).
    assert missing_smpl_bones(mixed) == list(JOINT_NAMES[12:22])
    assert missing_smpl_bones([]) == list(JOINT_NAMES[:22])
    body = [*JOINT_NAMES[:22], "left_index1", "right_index1"]
    assert smpl_bone_names(body) == (*JOINT_NAMES[:22], None, None)
    assert missing_smpl_bones([n for n in body if n != "spine3"]) == ["spine3"]
    # Behind a namespace, as FBX files carry them: the rig's own names come back.
    fbx = ["SMPL:m_avg_" + n for n in SMPL_CAPITALISED_NAMES] + ["SMPL:m_avg_root"]
    assert smpl_bone_names(fbx) == tuple(fbx[:24])
    assert missing_smpl_bones(fbx[1:]) == ["SMPL:m_avg_Pelvis"]
    assert smpl_bone_names(["a:" + n for n in JOINT_NAMES[:12]] + list(JOINT_NAMES[12:])) is None


def test_axis_angle_channels_follow_the_key_before():
    x = np.array([1.0, 0.0, 0.0])
    degrees = [60, -60, -170, 170, 0, 30]
    values = posing.continuous_axis_angles(
        [np.radians(d) * x for d in degrees], start=[0.0, 0.0, 1.0, 0.0]
    )
    for value, d in zip(values, degrees, strict=True):  # each the same rotation as asked
        np.testing.assert_allclose(
            axis_angle_to_matrix(value[0] * value[1:]),
            axis_angle_to_matrix(np.radians(d) * x),
            atol=1e-12,
        )
    axes, angles = values[:, 1:], np.degrees(values[:, 0])
    assert (axes[:4] @ x > 0).all() or (axes[:4] @ x < 0).all()  # the axis never flips
    np.testing.assert_allclose(np.diff(angles[:4]), [-120, -110, -20])  # -170 to 170: 20°
    np.testing.assert_allclose(axes[4], axes[3])  # no rotation keeps the axis it had
    assert abs(np.degrees(values[5, 0]) - angles[4]) == pytest.approx(30)
    # A bone turned by hand a billion radians round: followed without float sums' error.
    (far,) = posing.continuous_axis_angles([0.5 * x], start=[1e12, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(
        axis_angle_to_matrix(far[0] * far[1:]), axis_angle_to_matrix(0.5 * x), atol=1e-9
    )
