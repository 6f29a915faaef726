import errno
import json
import os
import stat
import struct
import sys
import types
import zipfile
import zlib

import numpy as np
import pytest

from shared_protocol import arrays
from shared_protocol import pose as pose_module
from shared_protocol.pose import (
    POSE_LAYOUT,
    SOLE_DEPTH,
    Z_UP_FROM_SMPL,
    Motion,
    Pose,
    amass_trans_offset,
    written_z_up,
)
from shared_protocol.rotations import axis_angle_to_matrix
from shared_protocol.safe_files import check_writable
from shared_protocol.skeleton import DEFAULT_REST_JOINTS


def random_pose(rng: np.random.Generator, label: str | None = None) -> Pose:
    return Pose(rng.normal(scale=0.5, size=(24, 3)), rng.normal(size=3), label)


def test_pose_accepts_flat_vector_and_freezes_a_copy():
    values = np.arange(72, dtype=float) / 100
    pose = Pose(values)
    assert pose.axis_angle.shape == (24, 3)
    np.testing.assert_array_equal(pose.axis_angle[1], [0.03, 0.04, 0.05])
    values[:] = 0  # the pose owns its data
    assert pose.axis_angle[1, 0] == 0.03
    with pytest.raises(ValueError):
        pose.axis_angle[0, 0] = 1.0
    np.testing.assert_array_equal(pose.global_orient, [0.0, 0.01, 0.02])
    assert pose.body_pose.shape == (69,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axis_angle": np.zeros((23, 3))}, r"axis_angle: expected shape \(24, 3\)"),
        ({"axis_angle": np.zeros(71)}, r"axis_angle: expected shape"),
        ({"axis_angle": np.full((24, 3), np.nan)}, "axis_angle: contains NaN"),
        ({"axis_angle": np.full((24, 3), np.inf)}, "axis_angle: contains NaN or inf"),
        ({"axis_angle": [["a", "b", "c"]] * 24}, "axis_angle: expected a numeric array"),
        ({"axis_angle": [[0.0, 0.0]] + [[0.0, 0.0, 0.0]] * 23}, "axis_angle: expected a numeric"),
        # Values a float conversion would parse, take as 0 and 1, or cut to their real part.
        ({"axis_angle": [["0.1", "0", "0"]] * 24}, "axis_angle: expected a numeric array"),
        ({"axis_angle": np.zeros((24, 3), dtype=bool)}, "axis_angle: expected a numeric array"),
        ({"axis_angle": np.zeros((24, 3)) + 1j}, "axis_angle: expected a numeric array"),
        ({"axis_angle": np.zeros((24, 3)), "translation": [0, 0]}, "translation: expected shape"),
        ({"axis_angle": np.zeros((24, 3)), "translation": [0, np.nan, 0]}, "translation: contains"),
        ({"axis_angle": np.zeros((24, 3)), "label": 7}, "label: expected a string"),
        ({"axis_angle": np.full((24, 3), 1e155)}, "axis_angle: rotations of up to 1000 rad"),
        ({"axis_angle": np.zeros((24, 3)), "translation": [0, 0, 2e4]}, "translation: metres"),
    ],
)
def test_pose_rejects_bad_values_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Pose(**kwargs)


def test_pose_dict_round_trip_is_exact_through_json():
    rng = np.random.default_rng(0)
    for label in (None, "kneel on one knee"):
        pose = random_pose(rng, label)
        data = json.loads(json.dumps(pose.to_dict()))
        assert data["layout"] == POSE_LAYOUT
        assert Pose.from_dict(data) == pose
    bare = Pose(np.zeros((24, 3)))
    assert Pose.from_dict(bare.to_dict()) == bare
    assert Pose.from_dict(bare.to_dict()).translation is None


def test_pose_equality_is_by_value():
    rng = np.random.default_rng(1)
    pose = random_pose(rng, "a")
    assert pose == Pose(pose.axis_angle.copy(), pose.translation.copy(), "a")
    assert pose != Pose(pose.axis_angle, pose.translation, "b")
    assert pose != Pose(pose.axis_angle, None, "a")
    assert pose != Pose(pose.axis_angle + 1e-12, pose.translation, "a")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("layout"), "layout: expected 'smpl24_axis_angle', got None"),
        (lambda d: d.update(layout="smplx55"), "layout: expected"),
        (lambda d: d.pop("axis_angle"), "axis_angle: missing"),
        (lambda d: d["axis_angle"][3].__setitem__(1, True), "axis_angle: expected numbers"),
        (lambda d: d["axis_angle"][3].__setitem__(1, "1"), "axis_angle: expected numbers"),
        (lambda d: d.update(translation=["0", 0, 0]), "translation: expected numbers"),
        (lambda d: d.update(label=["x"]), "label: expected a string"),
        (lambda d: d.update(label="wave\ud800"), "label: not valid Unicode text"),
        (lambda d: d["axis_angle"][3].__setitem__(1, 10**400), "axis_angle: expected"),
    ],
)
def test_pose_from_dict_names_the_bad_field(mutate, message):
    data = Pose(np.zeros((24, 3)), np.zeros(3)).to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        Pose.from_dict(data)


def test_pose_from_dict_rejects_non_objects():
    with pytest.raises(ValueError, match="pose: expected an object, got list"):
        Pose.from_dict([0.0] * 72)


def test_motion_npz_round_trip_in_amass_layout(tmp_path):
    rng = np.random.default_rng(2)
    poses = [random_pose(rng, f"line {i}") for i in range(5)]
    motion = Motion.from_poses(poses, fps=24, gender="female", betas=np.arange(16) / 10)
    path = tmp_path / "animation"  # no suffix: written exactly where asked
    motion.save_npz(path)
    assert path.exists()

    with np.load(path, allow_pickle=False) as raw:
        # As AMASS's SMPL-H files: the body's 22 joints, then fingers at rest; SMPL's hands
        # beside them, where SMPL-H readers do not look.
        assert raw["poses"].shape == (5, 156) and raw["dmpls"].shape == (5, 8)
        np.testing.assert_array_equal(raw["poses"][:, 66:], 0.0)
        np.testing.assert_array_equal(raw["smpl_hands"][2], poses[2].axis_angle[22:].reshape(-1))
        assert raw["trans"].shape == (5, 3)
        assert float(raw["mocap_framerate"]) == 24.0
        assert str(raw["gender"]) == "female"
        assert raw["betas"].shape == (16,)
        # Z-up as AMASS: the global orientation and translation turned, the joints as they are.
        np.testing.assert_array_equal(raw["poses"][2, 3:66], poses[2].axis_angle[1:22].reshape(-1))
        np.testing.assert_allclose(
            axis_angle_to_matrix(raw["poses"][2, :3]),
            Z_UP_FROM_SMPL @ axis_angle_to_matrix(poses[2].axis_angle[0]),
            atol=1e-12,
        )
        # ... and the pelvis above AMASS's floor, not at its rest height's offset
        lifted = Z_UP_FROM_SMPL @ poses[2].translation + amass_trans_offset()
        np.testing.assert_allclose(raw["trans"][2], lifted)

    loaded = Motion.load_npz(path)
    for got, expected in zip(loaded.poses(), poses, strict=True):
        np.testing.assert_allclose(got.axis_angle, expected.axis_angle, atol=1e-9)
        np.testing.assert_allclose(got.translation, expected.translation, atol=1e-12)
        assert got.label == expected.label
    assert loaded.fps == 24.0 and loaded.gender == "female"
    np.testing.assert_array_equal(loaded.betas, np.arange(16) / 10)
    motion.save_npz(path, z_up=False)  # a file in the SMPL body frame, read as one
    assert Motion.load_npz(path, z_up=False).poses() == poses


def test_a_file_written_here_is_read_in_the_frame_it_says_whatever_the_reader_is_told(tmp_path):
    rng = np.random.default_rng(5)
    motion = Motion.from_poses([random_pose(rng) for _ in range(3)], fps=30.0)
    path = tmp_path / "take.npz"
    for z_up in (False, True):
        motion.save_npz(path, z_up=z_up)
        assert written_z_up(path) is z_up
        for told in (False, True):  # read back as written, not lying on its back
            loaded = Motion.load_npz(path, z_up=told)
            np.testing.assert_allclose(loaded.axis_angle, motion.axis_angle, atol=1e-9)
            np.testing.assert_allclose(loaded.translation, motion.translation, atol=1e-12)
    with np.load(path) as data:  # Z-up, as written before `up_axis`: its trans_offset says so
        arrays = {k: data[k] for k in data.files if k != "up_axis"}
    np.savez(path, **arrays)
    assert written_z_up(path) is True
    np.testing.assert_allclose(Motion.load_npz(path, z_up=False).axis_angle, motion.axis_angle)
    del arrays["trans_offset"]  # a file from elsewhere says nothing: the reader's option
    np.savez(path, **arrays)
    assert written_z_up(path) is None
    assert not np.allclose(Motion.load_npz(path, z_up=False).axis_angle, motion.axis_angle)
    np.savez(path, **arrays, up_axis=np.array("X"))
    with pytest.raises(ValueError, match=r"take\.npz: up_axis: expected 'Y' or 'Z', got 'X'"):
        written_z_up(path)
    with pytest.raises(ValueError, match=r"take\.npz: up_axis: expected 'Y' or 'Z', got 'X'"):
        Motion.load_npz(path)


def test_a_save_that_fails_leaves_the_file_it_would_replace_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "anim.npz"
    Motion.from_poses([Pose(np.zeros((24, 3)), label="kept")]).save_npz(path)
    path.chmod(0o640)
    before = path.read_bytes()

    def disk_full(stream, arrays):
        stream.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pose_module, "write_npz", disk_full)
    with pytest.raises(OSError, match="No space left"):
        Motion.from_poses([Pose(np.ones((24, 3)))]).save_npz(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["anim.npz"]  # no temporary file left

    monkeypatch.undo()
    Motion.from_poses([Pose(np.ones((24, 3)), label="new")]).save_npz(path)
    assert Motion.load_npz(path).labels == ("new",)
    assert path.stat().st_mode & 0o777 == 0o640  # the file keeps its permissions


def test_a_file_that_windows_will_not_replace_is_named_as_open_elsewhere(tmp_path, monkeypatch):
    path = tmp_path / "anim.npz"
    Motion.from_poses([Pose(np.zeros((24, 3)), label="kept")]).save_npz(path)

    def open_elsewhere(source, target):  # what Windows does while a viewer holds the file
        raise PermissionError(13, "Access is denied", source, None, target)

    monkeypatch.setattr(os, "replace", open_elsewhere)
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(PermissionError, match=r"anim\.npz'?$") as raised:
        Motion.from_poses([]).save_npz(path)
    assert "open in another program" in str(raised.value)
    monkeypatch.undo()
    assert Motion.load_npz(path).labels == ("kept",)
    assert [p.name for p in tmp_path.iterdir()] == ["anim.npz"]  # no temporary file left


def test_a_save_writes_through_a_link_and_as_open_would_otherwise(tmp_path, read_only):
    real = tmp_path / "takes" / "anim.npz"
    real.parent.mkdir()
    Motion.from_poses([Pose(np.zeros((24, 3)), label="old")]).save_npz(real)
    link = tmp_path / "anim.npz"
    link.symlink_to(real)
    Motion.from_poses([Pose(np.ones((24, 3)), label="new")]).save_npz(link)
    assert link.is_symlink() and Motion.load_npz(real).labels == ("new",)

    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.npz"
        Motion.from_poses([]).save_npz(fresh)
        assert fresh.stat().st_mode & 0o777 == 0o644  # the umask's, as for any new file
    finally:
        os.umask(umask)

    read_only(real)
    with pytest.raises(PermissionError):
        Motion.from_poses([]).save_npz(real)
    assert Motion.load_npz(real).labels == ("new",)


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="no statvfs on this platform")
def test_a_file_on_a_read_only_file_system_is_refused_as_such_not_as_a_permission(
    tmp_path, monkeypatch
):
    # Mounting one needs root: the file system's flags are what tells the two apart.
    existing = tmp_path / "anim.npz"
    Motion.from_poses([]).save_npz(existing)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(OSError, match="Read-only file system") as info:
        check_writable(existing)
    assert info.value.errno == errno.EROFS


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_link_to_something_that_is_no_file_is_not_replaced(tmp_path):
    # The rename would put a file where the link's target was: as root, a device in /dev.
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    link = tmp_path / "anim.npz"
    link.symlink_to(pipe)
    for write in (lambda: Motion.from_poses([]).save_npz(link), lambda: check_writable(link)):
        with pytest.raises(OSError, match="not a regular file"):
            write()
        assert stat.S_ISFIFO(pipe.stat().st_mode)


def test_an_upright_amass_body_loads_upright(tmp_path):
    poses = np.zeros((2, 156))
    poses[:, 0] = np.pi / 2  # AMASS's upright body: SMPL's +Y turned to +Z
    trans = np.array([[0.0, 0.3, 0.93], [1.0, 0.3, 0.93]])  # walking along +X, 0.93 m up
    np.savez(tmp_path / "walk.npz", poses=poses, trans=trans, mocap_framerate=np.array(60.0))
    motion = Motion.load_npz(tmp_path / "walk.npz")
    np.testing.assert_allclose(motion.axis_angle[:, 0], 0.0, atol=1e-12)  # upright, facing +Z
    height = amass_trans_offset()[2]  # the rest pelvis above the soles: 0.996 m
    assert height == pytest.approx(-DEFAULT_REST_JOINTS[:, 1].min() + SOLE_DEPTH)
    assert 0.9 < height < 1.0
    np.testing.assert_allclose(
        motion.translation, [[0.0, 0.93 - height, -0.3], [1.0, 0.93 - height, -0.3]], atol=1e-12
    )
    # A smaller body (rest pelvis lower above its feet; soles as thick): the same world height
    # is a smaller drop from its rest pose.
    short = DEFAULT_REST_JOINTS * 0.8
    lower = Motion.load_npz(tmp_path / "walk.npz", rest_joints=short)
    drop = 0.93 - (0.8 * (height - SOLE_DEPTH) + SOLE_DEPTH)
    np.testing.assert_allclose(lower.translation[0], [0.0, drop, -0.3])


def test_a_file_written_here_keeps_its_translations_whichever_body_reads_it(tmp_path):
    # `chatpose batch --out` writes for the built-in skeleton (J0 at the origin); a rig from
    # the SMPL model file has SMPL's J0, 22 cm below it, which AMASS's `trans` holds unturned:
    # read with the reader's J0, the body moved 20 cm forward.
    smpl_like = DEFAULT_REST_JOINTS + np.array([0.0018, -0.2233, 0.0282])
    poses = [Pose(np.zeros((24, 3)), np.array([0.1, 0.0, 0.2 * k])) for k in range(3)]
    written = Motion.from_poses(poses)
    for writer, reader in ((None, smpl_like), (smpl_like, None), (smpl_like, smpl_like * 0.9)):
        written.save_npz(tmp_path / "take.npz", rest_joints=writer)
        back = Motion.load_npz(tmp_path / "take.npz", rest_joints=reader)
        np.testing.assert_allclose(back.translation, written.translation, atol=1e-12)
    with np.load(tmp_path / "take.npz") as data:
        arrays = dict(data)
    np.testing.assert_allclose(arrays["trans_offset"], amass_trans_offset(smpl_like))
    arrays["trans_offset"] = np.array([np.nan, 0.0, 0.0])
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"bad\.npz: trans_offset"):
        Motion.load_npz(tmp_path / "bad.npz")


def test_smpl_s_hands_and_betas_come_back_from_a_file_written_here(tmp_path):
    poses = [Pose(np.full((24, 3), 0.1 * k)) for k in range(3)]
    betas = np.arange(10) / 10
    Motion.from_poses(poses, betas=betas).save_npz(tmp_path / "take.npz")
    with np.load(tmp_path / "take.npz") as written:
        assert written["betas"].shape == (16,)  # SMPL-H's, for AMASS's readers
        arrays = dict(written)
    back = Motion.load_npz(tmp_path / "take.npz")
    np.testing.assert_array_equal(back.betas, betas)  # SMPL's 10 again
    np.testing.assert_allclose(back.axis_angle, np.stack([p.axis_angle for p in poses]), atol=1e-12)
    arrays["smpl_hands"] = arrays["smpl_hands"].reshape(3, 2, 3)  # joints as rows: the same
    np.savez(tmp_path / "rows.npz", **arrays)
    np.testing.assert_allclose(Motion.load_npz(tmp_path / "rows.npz").axis_angle, back.axis_angle)
    arrays["smpl_hands"] = np.zeros((3, 90))
    np.savez(tmp_path / "odd.npz", **arrays)
    with pytest.raises(ValueError, match=r"odd\.npz: smpl_hands: expected shape \(3, 6\)"):
        Motion.load_npz(tmp_path / "odd.npz")


def test_motion_without_labels_or_translation():
    motion = Motion.from_poses([Pose(np.zeros((24, 3))), Pose(np.ones((24, 3)) * 0.1)])
    assert motion.labels is None
    np.testing.assert_array_equal(motion.translation, np.zeros((2, 3)))
    assert [p.label for p in motion.poses()] == [None, None]


def test_a_z_up_file_without_trans_keeps_the_pelvis_at_rest(tmp_path):
    # PoseScript-style pose sets and other tools' exports hold poses only: read as a zero
    # AMASS translation, the body would sink by its pelvis height into the floor.
    motion = Motion.from_poses([Pose(np.zeros((24, 3))), Pose(np.ones((24, 3)) * 0.1)])
    motion.save_npz(tmp_path / "full.npz")
    with np.load(tmp_path / "full.npz") as data:
        np.savez(tmp_path / "poses_only.npz", poses=data["poses"], mocap_framerate=30.0)
    loaded = Motion.load_npz(tmp_path / "poses_only.npz")
    # (SMPL's hands are at rest without the smpl_hands this project writes.)
    np.testing.assert_allclose(loaded.axis_angle[:, :22], motion.axis_angle[:, :22], atol=1e-9)
    np.testing.assert_array_equal(loaded.translation, np.zeros((2, 3)))


def test_motion_empty_round_trip(tmp_path):
    Motion.from_poses([]).save_npz(tmp_path / "empty.npz")
    assert len(Motion.load_npz(tmp_path / "empty.npz")) == 0


def test_motion_reads_real_amass_variants(tmp_path):
    """AMASS SMPL-H: 156-wide poses, bytes gender; SMPL-X spells the frame rate differently."""
    rng = np.random.default_rng(3)
    poses = rng.normal(size=(4, 156))
    np.savez(
        tmp_path / "smplh.npz",
        poses=poses,
        trans=rng.normal(size=(4, 3)),
        mocap_framerate=np.array(120.0),
        gender=np.array(b"male"),
        betas=np.zeros(16),
        dmpls=np.zeros((4, 8)),
    )
    motion = Motion.load_npz(tmp_path / "smplh.npz", z_up=False)
    np.testing.assert_array_equal(motion.axis_angle[:, :22].reshape(4, 66), poses[:, :66])
    np.testing.assert_array_equal(motion.axis_angle[:, 22:], 0.0)  # a left finger is no hand
    assert motion.gender == "male" and motion.fps == 120.0

    smplx = rng.normal(size=(4, 165))  # body, jaw, eyes, hands
    np.savez(
        tmp_path / "smplx.npz",
        poses=smplx,
        mocap_frame_rate=np.array([30]),  # of shape (1,)
        # stage-ii files keep a dict here, which only a pickle can read
        markers_latent_vids=np.array({"C7": 3832}, dtype=object),
        betas=np.arange(16)[None] / 10,  # (1, 16), the row smplx takes, as some tools save it
    )
    motion = Motion.load_npz(tmp_path / "smplx.npz", z_up=False)
    assert motion.fps == 30.0 and motion.gender == "neutral"
    np.testing.assert_array_equal(motion.translation, np.zeros((4, 3)))
    np.testing.assert_array_equal(motion.axis_angle[:, :22].reshape(4, 66), smplx[:, :66])
    np.testing.assert_array_equal(motion.axis_angle[:, 22:], 0.0)  # no jaw on SMPL's hands
    np.testing.assert_array_equal(motion.betas, np.arange(16) / 10)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"trans": np.zeros((2, 3)), "mocap_framerate": 30.0}, "poses: missing"),
        ({"poses": np.zeros((2, 66)), "mocap_framerate": 30.0}, r"poses: expected shape \(N, 72\)"),
        ({"poses": np.zeros((2, 72))}, "mocap_framerate: missing"),
        ({"poses": np.zeros((2, 72)), "mocap_framerate": np.zeros(3)}, "expected one number"),
        ({"poses": np.zeros((2, 72)), "mocap_framerate": -1.0}, "mocap_framerate: expected a"),
        ({"poses": np.zeros((2, 72)), "mocap_frame_rate": 0.0}, "mocap_frame_rate: expected a"),
        ({"poses": np.full((2, 72), np.nan), "mocap_framerate": 30.0}, "poses: contains NaN"),
        (
            {"poses": np.zeros((2, 72)), "trans": np.zeros((3, 3)), "mocap_framerate": 30.0},
            r"trans: expected shape \(2, 3\)",
        ),
        (
            {"poses": np.zeros((2, 72)), "mocap_framerate": 30.0, "gender": np.array("robot")},
            "gender: expected one of",
        ),
        (
            {"poses": np.zeros((2, 72)), "mocap_framerate": 30.0, "labels": np.array(["a"])},
            "labels: expected 2 strings",
        ),
        (
            {"poses": np.zeros((2, 72)), "mocap_framerate": 30.0, "gender": np.array(1.0)},
            "gender: expected a string",
        ),
        (
            {"poses": np.zeros((2, 72)), "mocap_framerate": 30.0, "gender": ["male", "female"]},
            r"gender: expected one string, got 2 \(shape \(2,\)\)",
        ),
    ],
)
def test_motion_load_names_the_file_and_the_bad_entry(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        Motion.load_npz(path)
    assert str(path) in str(info.value)


def test_motion_load_refuses_pickled_objects_and_junk(tmp_path, monkeypatch):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, poses=np.array([{"evil": 1}], dtype=object), mocap_framerate=30.0)
    with pytest.raises(ValueError, match=r"pickled\.npz: poses: Object arrays cannot be loaded"):
        Motion.load_npz(pickled)

    # A member that is no .npy array: numpy hands its bytes over as if they were one.
    raw = tmp_path / "raw.npz"
    np.savez(raw, poses=np.zeros((2, 72)), mocap_framerate=30.0)
    with zipfile.ZipFile(raw, "a") as archive:
        archive.writestr("gender.npy", "male")
    with pytest.raises(ValueError, match=r"raw\.npz: gender\.npy: not a \.npy array"):
        Motion.load_npz(raw)
    # One without the .npy suffix: numpy serves it under that name all the same.
    bare = tmp_path / "bare.npz"
    np.savez(bare, mocap_framerate=30.0)
    with zipfile.ZipFile(bare, "a") as archive:
        archive.writestr("poses", np.zeros((2, 72)).tobytes())
    with pytest.raises(ValueError, match=r"bare\.npz: poses: not a \.npy array"):
        Motion.load_npz(bare)

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz file"):
        Motion.load_npz(junk)

    text = tmp_path / "notes.npz"
    text.write_text("wave\nsit down\n")
    with pytest.raises(ValueError, match="notes.npz: not an .npz file \\(an .npz is a zip"):
        Motion.load_npz(text)

    with pytest.raises(FileNotFoundError):
        Motion.load_npz(tmp_path / "missing.npz")

    # A zip bomb: a few hundred KiB on disk that would take 270 MB of memory once loaded.
    bomb = tmp_path / "bomb.npz"
    frames = 261 * 2**20 // (72 * 8)  # 261 MiB exactly
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("poses.npy", "w", force_zip64=True) as member:
            header = {"descr": "<f8", "fortran_order": False, "shape": (frames, 72)}
            np.lib.format.write_array_header_1_0(member, header)
            for _ in range(frames * 72 * 8 >> 20):
                member.write(bytes(1 << 20))
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(ValueError, match=r"bomb\.npz: 261 MiB of arrays once loaded, from"):
        Motion.load_npz(bomb)
    # Text is padded to its longest string, which compresses away: a batch's labels with one
    # long prompt among many lines is no bomb.
    labels = ["wave"] * 9000 + ["x" * 8000]
    take = tmp_path / "take.npz"
    np.savez_compressed(
        take, poses=np.zeros((len(labels), 72)), mocap_framerate=30.0, labels=np.array(labels)
    )
    assert len(Motion.load_npz(take, z_up=False).labels) == len(labels)
    with monkeypatch.context() as patch:  # text is capped all the same, in total (2 GiB)
        patch.setattr(arrays, "_TEXT_BYTES", 200 << 20)
        with pytest.raises(ValueError, match=r"take\.npz: 274 MiB of text once loaded"):
            Motion.load_npz(take, z_up=False)
    # Arrays under the size each, a bomb together (found by a review of the first check).
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name in ("poses", "trans", "betas"):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = {"descr": "<f8", "fortran_order": False, "shape": (100 << 17,)}
                np.lib.format.write_array_header_2_0(member, header)
                for _ in range(100):
                    member.write(bytes(1 << 20))
    with pytest.raises(ValueError, match=r"bomb\.npz: 300 MiB of arrays once loaded, from"):
        Motion.load_npz(bomb)
    # A header that claims more than its member holds: numpy allocates the claim first.
    with zipfile.ZipFile(bomb, "w") as archive:
        with archive.open("poses.npy", "w") as member:
            header = {"descr": "<f8", "fortran_order": False, "shape": (10**13, 72)}
            np.lib.format.write_array_header_1_0(member, header)
    with pytest.raises(ValueError, match=r"poses\.npy: its header claims 5,760,000,000,000,000"):
        Motion.load_npz(bomb)
    # Zero-width strings claim no memory, but a million of them still cost a loop each.
    with zipfile.ZipFile(bomb, "w") as archive:
        with archive.open("labels.npy", "w") as member:
            header = {"descr": "<U0", "fortran_order": False, "shape": (10**6,)}
            np.lib.format.write_array_header_1_0(member, header)
    with pytest.raises(ValueError, match=r"labels\.npy: its header claims 1,000,000 bytes"):
        Motion.load_npz(bomb)
    # A zip directory that gives a member sizes the file does not hold (zipfile reads by them).
    with open(bomb, "wb") as stream:
        stream.write(_stored_zip("poses.npy", b"\x93NUMPY", claimed=10**15))
    with pytest.raises(ValueError, match=r"poses\.npy: its sizes in the zip directory are not"):
        Motion.load_npz(bomb)
    # An object array beside the motion is no bomb (numpy refuses a pickle before allocating).
    np.savez(bomb, poses=np.zeros((2, 72)), mocap_framerate=30.0, ids=np.array([None] * 900))
    assert len(Motion.load_npz(bomb, z_up=False)) == 2

    renamed = tmp_path / "array.npz"
    with open(renamed, "wb") as stream:
        np.save(stream, np.zeros((2, 72)))
    with pytest.raises(ValueError, match="array.npz: a single .npy array, not an .npz archive"):
        Motion.load_npz(renamed)


def test_labels_that_are_not_one_per_frame_are_refused_before_any_is_read(tmp_path, monkeypatch):
    # 100 million one-letter labels fit in a 389 KB file: reading them took 80 s and 1.4 GB.
    many = np.full(100_000, "a")
    np.savez(tmp_path / "many.npz", poses=np.zeros((2, 72)), mocap_framerate=30.0, labels=many)
    read = []
    monkeypatch.setattr(pose_module, "_text", lambda value, name: read.append(name) or "")
    with pytest.raises(ValueError, match=r"labels: expected 2 strings, one per frame, got shape"):
        Motion.load_npz(tmp_path / "many.npz")
    assert "labels" not in read


def test_the_largest_allowed_values_round_trip(tmp_path):
    angle = np.zeros((1, 24, 3))
    angle[0, 5] = [1000.0, 0.0, 0.0]
    motion = Motion(angle, np.full((1, 3), 1e4), fps=1000.0)
    motion.save_npz(tmp_path / "edge.npz", z_up=False)
    assert Motion.load_npz(tmp_path / "edge.npz", z_up=False).fps == 1000.0
    assert Motion(angle, np.zeros((1, 3)), fps=0.001).fps == 0.001  # the slowest rate too
    angle[0, 5] = [1500.0, 0.0, 0.0]  # just past the limit
    with pytest.raises(ValueError, match="axis_angle: rotations of up to 1000 rad, got 1500"):
        Motion(angle, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="axis_angle: rotations of up to 1000 rad, got 1500"):
        Pose(angle[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axis_angle": np.zeros((2, 24))}, r"axis_angle: expected shape \(N, 24, 3\)"),
        ({"fps": 0}, "fps: expected a frame rate from 0.001 to 1000, got 0"),
        ({"fps": float("nan")}, "fps: expected a frame rate from 0.001 to 1000"),
        ({"fps": 1e300}, "fps: expected a frame rate from 0.001 to 1000, got 1e"),
        ({"fps": 1e-300}, "fps: expected a frame rate"),
        (
            {"axis_angle": np.full((2, 24, 3), 1e200)},
            "axis_angle: rotations of up to 1000 rad, got 1e",
        ),
        (
            {"translation": np.full((2, 3), -1e300)},
            "translation: metres up to 10000 on each axis, got 1e",
        ),
        ({"fps": True}, "fps: expected a number"),
        ({"gender": "Male"}, "gender: expected one of"),
        ({"betas": np.zeros((2, 10))}, r"betas: expected one row .*, got shape \(2, 10\)"),
        ({"labels": ("a", 3)}, "labels: expected 2 strings"),
    ],
)
def test_motion_rejects_bad_values(kwargs, message):
    fields = {"axis_angle": np.zeros((2, 24, 3)), "translation": np.zeros((2, 3)), **kwargs}
    with pytest.raises(ValueError, match=message):
        Motion(**fields)


def test_motion_from_poses_rejects_non_poses():
    with pytest.raises(ValueError, match="poses: expected Pose values"):
        Motion.from_poses([np.zeros((24, 3))])


def _stored_zip(name: str, payload: bytes, claimed: int) -> bytes:
    """A zip of one stored member whose central directory claims `claimed` bytes (zip64)."""
    crc, title = zlib.crc32(payload), name.encode()
    local = struct.pack(
        "<4sHHHHHIIIHH",
        b"PK\x03\x04",
        45,
        0,
        0,
        0,
        0,
        crc,
        len(payload),
        len(payload),
        len(title),
        0,
    )
    extra = struct.pack("<HHQQ", 1, 16, claimed, claimed)
    central = struct.pack(
        "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
        len(title), len(extra), 0, 0, 0, 0, 0,
    )  # fmt: skip
    entry = local + title + payload
    directory = central + title + extra
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(entry), 0)
    return entry + directory + end


def test_one_long_label_among_many_short_ones_keeps_the_file_small(tmp_path):
    # numpy pads every label to the longest: 2,000 frames and one 8,000-character prompt wrote
    # 63 MiB.
    labels = ["wave"] * 1999 + ["x" * 8000]
    motion = Motion(np.zeros((2000, 24, 3)), np.zeros((2000, 3)), labels=labels)
    motion.save_npz(tmp_path / "long.npz")
    assert (tmp_path / "long.npz").stat().st_size < 4 << 20  # its 2.7 MiB of numbers, stored
    assert Motion.load_npz(tmp_path / "long.npz").labels == tuple(labels)


def test_a_long_motion_held_still_loads_back(tmp_path):
    # Compressed whole, 200,000 frames of one pose (28 minutes at 120 fps) shrank 240 times,
    # and the zip-bomb check refused the file its own save had written.
    still = Motion(np.zeros((200_000, 24, 3)), np.zeros((200_000, 3)), fps=120.0)
    still.save_npz(tmp_path / "still.npz")
    assert len(Motion.load_npz(tmp_path / "still.npz")) == 200_000


def test_a_motion_resampled_keeps_its_timing_and_interpolates_between_frames():
    turns = np.linspace(0.0, 1.2, 13)  # one joint turning about z, 0.1 rad a frame, at 120 fps
    axis_angle = np.zeros((13, 24, 3))
    axis_angle[:, 16, 2] = turns
    walk = np.stack([np.linspace(0.0, 1.2, 13), np.zeros(13), np.zeros(13)], axis=-1)
    labels = tuple(f"f{k}" for k in range(13))
    motion = Motion(axis_angle, walk, fps=120.0, labels=labels)
    down = motion.resampled(24.0)  # every fifth frame, exactly
    assert (len(down), down.fps, down.labels) == (3, 24.0, ("f0", "f5", "f10"))
    np.testing.assert_allclose(down.axis_angle, motion.axis_angle[::5], atol=1e-12)
    up = motion.resampled(240.0)  # a new frame halfway between each two
    assert len(up) == 25 == motion.resampled_length(240.0)
    np.testing.assert_allclose(up.axis_angle[1::2, 16, 2], turns[:-1] + 0.05, atol=1e-12)
    np.testing.assert_allclose(up.translation[1::2, 0], walk[:-1, 0] + 0.05, atol=1e-12)
    # Rates of no whole ratio: frames at or before the motion's last instant, 0.1 s in.
    assert len(motion.resampled(29.97)) == motion.resampled_length(29.97) == 3
    assert len(motion.resampled(1000.0)) == 101
    still = Motion(axis_angle[:1], walk[:1], fps=120.0)
    assert len(still.resampled(24.0)) == 1 and still.resampled(24.0).fps == 24.0
    np.testing.assert_allclose(down.translation, walk[::5], atol=1e-12)


def test_a_resampled_frame_lies_between_the_two_frames_around_it_nearest_the_one_it_is_near():
    # A motion that stops: a new frame is interpolated, never extrapolated past a turn.
    still = np.zeros((3, 24, 3))
    stops = Motion(still, [[0.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]], fps=30.0, labels=("a", "b", "c"))
    at_40 = stops.resampled(40.0)  # times 0, 0.75 and 1.5 frames
    np.testing.assert_allclose(at_40.translation[:, 0], [0.0, 0.75, 1.0], atol=1e-12)
    assert at_40.labels == ("a", "b", "c")  # the nearest frame's prompt
    step = Motion(still[:2], [[0.0, 0, 0], [1.0, 0, 0]], fps=30.0)
    np.testing.assert_allclose(step.resampled(60.0).translation[:, 0], [0.0, 0.5, 1.0])


def test_a_resample_between_ntsc_rates_keeps_the_last_frame():
    # 22 frames of 1/59.94 s are 11 of 1/29.97 s exactly; float rounding must not lose one.
    motion = Motion(np.zeros((23, 24, 3)), np.zeros((23, 3)), fps=59.94)
    assert motion.resampled_length(29.97) == len(motion.resampled(29.97)) == 12
