"""The dataset readers on small files written here, and their errors on malformed ones."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from inference_service.prompts import (
    IMAGE_ANSWER,
    IMAGE_QUESTION,
    POSE_MARKER,
    TEXT_ANSWER,
    pose_exchange,
)
from inference_service.training import datasets
from inference_service.training.datasets import (
    TEXT_PHRASINGS,
    DatasetError,
    DataSpec,
    Example,
    ImageFile,
    examples_from_caption_pose_pairs,
    image_bytes,
    image_sha256,
    load_data,
    load_image,
    parse_data_spec,
    read_corpus,
    read_image_pose_pairs,
    read_llava_conversations,
    read_posescript,
    z_up_to_y_up_zero_yaw,
)
from shared_protocol.pose import Motion, Pose, camera_to_upright
from shared_protocol.rotations import axis_angle_to_matrix, matrix_to_axis_angle

RNG = np.random.default_rng(0)
POSES = RNG.normal(size=(4, 24, 3)) * 0.4


def png(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_npz(path, poses=POSES, **arrays):
    with open(path, "wb") as stream:
        np.savez(stream, poses=np.asarray(poses).reshape(len(poses), -1), **arrays)
    return path


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --- PoseScript --------------------------------------------------------------------------------


def test_posescript_frame_index_ids_and_caption_lists(tmp_path):
    poses = write_npz(tmp_path / "poses.npz")
    captions = write_json(
        tmp_path / "captions.json",
        {"0": "A man raises his left arm.", "3": ["Kneeling on one knee", "knee down"]},
    )
    examples = read_posescript(captions, poses, phrasing="release")
    assert [e.kind for e in examples] == ["text_to_pose"] * 3
    assert (examples[0].question, examples[0].answer) == pose_exchange(
        "A man raises his left arm.", False
    )
    np.testing.assert_array_equal(examples[0].pose, POSES[0])
    np.testing.assert_array_equal(examples[2].pose, POSES[3])
    assert examples[2].source.endswith("captions.json#3[1]")


def test_posescript_ids_array_and_motion_files(tmp_path):
    motion = Motion.from_poses([Pose(p) for p in POSES])
    motion.save_npz(tmp_path / "motion.npz", z_up=False)  # poses as PoseScript keeps them
    with np.load(tmp_path / "motion.npz") as data:
        arrays = dict(data)
    np.savez(tmp_path / "with_ids.npz", **arrays, ids=np.array(["a", "b", "c", "d"]))
    captions = write_json(tmp_path / "c.json", {"c": "someone sitting"})
    (example,) = read_posescript(captions, tmp_path / "with_ids.npz")
    np.testing.assert_allclose(example.pose, POSES[2])


@pytest.mark.parametrize("reader", ["posescript", "pairs", "llava"])
def test_an_object_array_of_ids_or_images_is_refused_not_left_out(tmp_path, reader):
    """Left out, pickled ids would join captions to poses by frame number instead (what
    pandas' string columns give: `df["id"].values`)."""
    pickled = np.array(["2", "0", "1", "3"], dtype=object)
    key = "images" if reader == "pairs" else "ids"
    poses = write_npz(tmp_path / "poses.npz", **{key: pickled})
    with pytest.raises(DatasetError, match=rf"poses\.npz: '{key}' is an object \(pickled\)"):
        if reader == "posescript":
            read_posescript(write_json(tmp_path / "c.json", {"0": "kneeling"}), poses)
        elif reader == "pairs":
            read_image_pose_pairs(poses)
        else:
            conversations = write_json(tmp_path / "c.json", [_conv("pose?", "<POSE>", id="0")])
            read_llava_conversations(conversations, poses=poses)


def test_the_poses_this_project_writes_are_read_with_smpl_s_hands(tmp_path):
    Motion.from_poses([Pose(p) for p in POSES]).save_npz(tmp_path / "take.npz", z_up=False)
    captions = write_json(tmp_path / "c.json", {"3": "someone sitting"})
    (example,) = read_posescript(captions, tmp_path / "take.npz", z_up=False)
    np.testing.assert_allclose(example.pose, POSES[3])  # joints 22 and 23 included
    with np.load(tmp_path / "take.npz") as written:
        arrays = dict(written, smpl_hands=np.zeros((len(POSES), 90)))
    np.savez(tmp_path / "odd.npz", **arrays)  # the same rule as the add-on's import
    with pytest.raises(DatasetError, match=r"odd\.npz: smpl_hands: expected shape"):
        read_posescript(captions, tmp_path / "odd.npz", z_up=False)


def _posescript_release(root):
    """PoseScript's release beside an AMASS folder: captions, the index of each pose id's
    sequence and frame, a split, and two sequences (one under AMASS's newer folder name)."""
    rng = np.random.default_rng(1)
    sequences = {"CMU/01/01_01_poses.npz": rng.normal(size=(5, 156)) * 0.3}
    sequences["BMLrub/s1/walk_poses.npz"] = rng.normal(size=(3, 156)) * 0.3
    sequences["MPI_HDM05/bk/jump_poses.npz"] = rng.normal(size=(2, 156)) * 0.3  # the old name
    for name, frames in sequences.items():
        (root / "amass" / name).parent.mkdir(parents=True, exist_ok=True)
        write_npz(root / "amass" / name, frames, trans=np.zeros((len(frames), 3)))
    index = {
        "0": ["AMASS", "CMU/01/01_01_poses.npz", 4],
        "1": ["AMASS", "./BioMotionLab_NTroje/s1/walk_poses.npz", 1],  # the folder's older name
        "2": ["AMASS", "HumanEva/S1/box_poses.npz", 0],  # a dataset not downloaded
        "3": ["AMASS", "HDM05/bk/jump_poses.npz", 1],  # the newer name; on disk, the older
    }
    write_json(root / "index.json", index)
    captions = {"0": "The person raises the left arm.", "1": ["Walking.", "Mid stride."]}
    write_json(root / "auto.json", {**captions, "2": "Boxing.", "3": "Jumping."})
    write_json(root / "train_ids.json", [0, 1, 3])
    return sequences


def test_posescript_release_poses_are_read_from_amass_by_its_index(tmp_path, capsys):
    sequences = _posescript_release(tmp_path)
    release = {"amass": tmp_path / "amass", "index": tmp_path / "index.json"}
    examples = read_posescript(tmp_path / "auto.json", ids=tmp_path / "train_ids.json", **release)
    assert [e.source.rsplit("#", 1)[1] for e in examples] == ["0[0]", "1[0]", "1[1]", "3[0]"]
    frames = [
        sequences["CMU/01/01_01_poses.npz"][4],
        sequences["BMLrub/s1/walk_poses.npz"][1],
        sequences["MPI_HDM05/bk/jump_poses.npz"][1],
    ]
    body = np.concatenate([np.stack(frames)[:, :66], np.zeros((3, 6))], axis=1)  # hands at rest
    upright = z_up_to_y_up_zero_yaw(body.reshape(3, 24, 3))  # AMASS: Z-up
    np.testing.assert_allclose(examples[0].pose, upright[0])
    np.testing.assert_allclose(examples[2].pose, upright[1])
    np.testing.assert_allclose(examples[3].pose, upright[2])
    # A pose whose AMASS dataset is not there is refused, naming it, or left out when asked.
    with pytest.raises(
        DatasetError,
        match=r"index\.json: 1 pose id\(s\) of .*auto\.json \('2' first\) "
        r"are in 1 AMASS sequence\(s\) not found under .*HumanEva/S1/box_poses\.npz.*"
        r"missing=skip",
    ):
        read_posescript(tmp_path / "auto.json", **release)
    kept = load_data(
        parse_data_spec(
            ["posescript", str(tmp_path / "auto.json"), *(f"{k}={v}" for k, v in release.items())]
            + ["missing=skip"]
        )
    )
    assert len(kept) == 4 and "note: left out: 1 pose id(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            ["AMASS", "CMU/01/01_01_poses.npz", 5],
            r"frame 5 of .*01_01_poses\.npz, which has 5 frames",
        ),
        (["AMASS", "CMU/01/01_01_poses.npz"], r"expected \[dataset, sequence file, frame index\]"),
        (["AMASS", "CMU/01/01_01_poses.npz", "4"], r"expected \[dataset, sequence file, frame"),
        (None, r"index\.json: no pose id '0'"),
        (["BEDLAM", "CMU/01/01_01_poses.npz", 2], r"from the dataset 'BEDLAM'; only AMASS"),
    ],
)
def test_posescript_release_index_errors_name_the_pose_id(tmp_path, entry, message):
    _posescript_release(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    index["0"] = entry
    write_json(tmp_path / "index.json", {k: v for k, v in index.items() if v is not None})
    with pytest.raises(DatasetError, match=message):
        read_posescript(
            tmp_path / "auto.json",
            amass=tmp_path / "amass",
            index=tmp_path / "index.json",
            ids=tmp_path / "train_ids.json",
        )


@pytest.mark.parametrize("width", [156, 165])  # AMASS's SMPL-H and SMPL-X
def test_posescript_amass_width_and_z_up(tmp_path, width):
    wide = np.full((2, width), 0.1)  # fingers, or jaw and eyes: not SMPL's hands
    wide[:, :66] = POSES[:2, :22].reshape(2, 66)
    turned_and_bowed = axis_angle_to_matrix([0, 0, 0.3]) @ axis_angle_to_matrix([1.77, 0, 0])
    wide[1, :3] = matrix_to_axis_angle(turned_and_bowed)  # standing in AMASS's Z-up world
    poses = write_npz(tmp_path / "amass.npz", wide)
    captions = write_json(tmp_path / "c.json", {"1": "standing"})
    (plain,) = read_posescript(captions, poses, z_up=False)
    np.testing.assert_allclose(plain.pose[1:22], POSES[1, 1:22])
    np.testing.assert_array_equal(plain.pose[22:], 0.0)  # SMPL's hands at rest
    (converted,) = read_posescript(captions, poses, z_up=True)
    np.testing.assert_allclose(converted.pose[1:22], POSES[1, 1:22])
    forward = axis_angle_to_matrix(converted.pose[0])[:, 2]
    assert abs(forward[0]) < 1e-9 and forward[2] > 0  # faces +Z, zero yaw


def test_bodies_standing_along_z_need_z_up_said(tmp_path):
    """Raw AMASS, and the motions this project exports: read as Y-up, all lie down."""
    upright_in_z = POSES.copy()
    upright_in_z[:, 0] = [np.pi / 2, 0, 0]  # body +Y onto world +Z
    poses = write_npz(tmp_path / "amass.npz", upright_in_z)
    captions = write_json(tmp_path / "c.json", {"1": "standing"})
    with pytest.raises(DatasetError, match=r"amass\.npz: most bodies stand along \+Z.*z_up=true"):
        read_posescript(captions, poses)
    (kept,) = read_posescript(captions, poses, z_up=False)
    np.testing.assert_allclose(kept.pose, upright_in_z[1])
    (turned,) = read_posescript(captions, poses, z_up=True)
    up = axis_angle_to_matrix(turned.pose[0])[:, 1]
    np.testing.assert_allclose(up, [0, 1, 0], atol=1e-9)
    spec = parse_data_spec(["posescript", str(captions), f"poses={poses}"])
    with pytest.raises(DatasetError, match="stand along"):
        load_data(spec)
    said = parse_data_spec(["posescript", str(captions), f"poses={poses}", "z_up=False"])
    assert len(load_data(said)) == 1
    # Conversations' poses too (a motion the add-on exported, given to a chat dataset).
    ids = write_npz(tmp_path / "ids.npz", upright_in_z, ids=np.arange(len(POSES)).astype(str))
    chats = write_json(
        tmp_path / "conv.json", [_conv("pose?", "<POSE>", id=str(i)) for i in range(len(POSES))]
    )
    with pytest.raises(DatasetError, match=r"ids\.npz: most bodies stand along \+Z"):
        load_data(parse_data_spec(["llava", str(chats), f"poses={ids}"]))
    turned = load_data(parse_data_spec(["llava", str(chats), f"poses={ids}", "z_up=true"]))
    up = axis_angle_to_matrix(turned[1].pose[0])[:, 1]
    np.testing.assert_allclose(up, [0, 1, 0], atol=1e-9)


def test_a_motion_file_that_says_it_is_z_up_is_read_so_even_of_lying_bodies(tmp_path):
    # A review: bodies lying on the floor, exported Z-up (up_axis "Z"), are not mostly
    # standing along +Z: read as Y-up, every one trained standing.
    lying = POSES.copy()
    lying[:, 0] = 0.0  # in the body frame: on its back, along the floor (Y-up, +Y its up)
    lying[:, 0, 0] = -np.pi / 2
    motion = Motion.from_poses([Pose(p) for p in lying])
    motion.save_npz(tmp_path / "floor.npz")  # Z-up, as chatpose and the add-on export
    assert Motion.load_npz(tmp_path / "floor.npz").poses()[1].axis_angle[0] == pytest.approx(
        lying[1, 0]
    )
    captions = write_json(tmp_path / "c.json", {"1": "lying on the back"})
    (read,) = read_posescript(captions, tmp_path / "floor.npz")
    body_up = axis_angle_to_matrix(read.pose[0])[:, 1]
    np.testing.assert_allclose(body_up, axis_angle_to_matrix(lying[1, 0])[:, 1], atol=1e-6)
    with pytest.raises(DatasetError, match=r"floor\.npz: its up_axis says Z, but z_up=false"):
        read_posescript(captions, tmp_path / "floor.npz", z_up=False)
    # Image-pose pairs take poses upright and relative to the camera: a Z-up file is refused,
    # and so is one whose bodies mostly stand along +Z, unless frame= says they are meant so.
    (tmp_path / "a.png").write_bytes(png())
    names = np.array(["a.png"] * len(POSES))
    motion.save_npz(tmp_path / "pairs.npz", z_up=True)
    with np.load(tmp_path / "pairs.npz") as stored:
        arrays = dict(stored)
    np.savez(tmp_path / "pairs.npz", images=names, **arrays)
    with pytest.raises(DatasetError, match=r"pairs\.npz: its up_axis says Z.*convert them so$"):
        read_image_pose_pairs(tmp_path / "pairs.npz")
    standing_in_z = POSES.copy()
    standing_in_z[:, 0] = [np.pi / 2, 0, 0]
    write_npz(tmp_path / "pairs.npz", standing_in_z, images=names)
    with pytest.raises(DatasetError, match=r"most bodies stand along \+Z.*frame=upright if"):
        read_image_pose_pairs(tmp_path / "pairs.npz")
    assert len(load_data(parse_data_spec(["pairs", str(tmp_path / "pairs.npz"), "frame=upright"])))


def test_z_up_conversion_of_an_upright_amass_body():
    # An upright AMASS body facing -Y (AMASS's usual start) has root rotation +90 deg about X;
    # it becomes the identity; turned about the vertical axis, it still becomes the identity.
    upright = np.zeros((2, 24, 3))
    upright[0, 0] = [np.pi / 2, 0, 0]
    turn = axis_angle_to_matrix(np.array([0, 0, 0.8])) @ axis_angle_to_matrix(upright[0, 0])
    from shared_protocol.rotations import matrix_to_axis_angle

    upright[1, 0] = matrix_to_axis_angle(turn)
    converted = z_up_to_y_up_zero_yaw(upright)
    np.testing.assert_allclose(
        axis_angle_to_matrix(converted[:, 0]), np.tile(np.eye(3), (2, 1, 1)), atol=1e-9
    )


def test_z_up_conversion_keeps_a_body_lying_on_its_back_the_way_it_lies():
    # On its back, the forward axis points up: a degree of roll either way turned its heading,
    # and the head, half round. The left-right axis gives the heading there instead.
    lying = np.zeros((3, 24, 3))
    for row, roll in enumerate((-1.0, 1.0, 0.0)):
        # The root at rest in AMASS's Z-up world lies on its back, head along +Y; rolled
        # about that axis.
        lying[row, 0] = [0.0, np.radians(roll), 0.0]
    heads = axis_angle_to_matrix(z_up_to_y_up_zero_yaw(lying)[:, 0])[:, :, 1]
    assert heads[0] @ heads[1] > 0.99 and heads[0] @ heads[2] > 0.99
    # Bowed and rolled: a little more bow turns the head a little, whatever the tilt.
    for roll in (0.3, 0.9):
        bows = np.radians(np.arange(0.0, 150.0, 0.5))
        tilted = np.zeros((len(bows), 24, 3))
        for row, bow in enumerate(bows):
            root = axis_angle_to_matrix([np.pi / 2 + bow, 0, 0]) @ axis_angle_to_matrix(
                [0, 0, roll]
            )
            tilted[row, 0] = matrix_to_axis_angle(root)
        heads = axis_angle_to_matrix(z_up_to_y_up_zero_yaw(tilted)[:, 0])[:, :, 1]
        steps = np.degrees(np.arccos(np.clip(np.sum(heads[1:] * heads[:-1], axis=1), -1, 1)))
        assert steps.max() < 2.0, (roll, steps.max())
    # A body turned and bowed, a little or deep (each way of taking the heading), faces +Z.
    bowed = np.zeros((2, 24, 3))
    for row, bow in enumerate((0.3, 1.2)):  # radians past upright (AMASS's upright: pi/2)
        turn = axis_angle_to_matrix(np.array([0, 0, 0.8]))
        bowed[row, 0] = matrix_to_axis_angle(turn @ axis_angle_to_matrix([np.pi / 2 + bow, 0, 0]))
    forward = axis_angle_to_matrix(z_up_to_y_up_zero_yaw(bowed)[:, 0])[:, :, 2]
    np.testing.assert_allclose(forward[:, 0], 0.0, atol=1e-9)
    assert (forward[:, 2] > 0).all()


@pytest.mark.parametrize(
    ("captions", "message"),
    [
        (["not", "an object"], "expected a JSON object"),
        ({"0": "fine", "9": "missing"}, "pose id '9': no such pose"),
        ({"0": ["ok", "  "]}, "pose id '0': caption 1 is empty"),
        ({"1": 5}, "pose id '1': expected a caption"),
        ({"2": []}, "pose id '2': expected a caption"),
        ({"0": "a man <image> waves"}, "pose id '0': caption 0 contains '<image>'"),
    ],
)
def test_posescript_bad_captions_name_file_and_record(tmp_path, captions, message):
    poses = write_npz(tmp_path / "poses.npz")
    path = write_json(tmp_path / "captions.json", captions)
    with pytest.raises(DatasetError, match=message) as info:
        read_posescript(path, poses)
    assert "captions.json" in str(info.value)


def test_bad_pose_files_name_file_and_frame(tmp_path):
    captions = write_json(tmp_path / "captions.json", {"0": "x"})
    bad = POSES.copy()
    bad[2, 5, 1] = np.nan
    with pytest.raises(DatasetError, match=r"nan\.npz: frame 2: pose contains NaN"):
        read_posescript(captions, write_npz(tmp_path / "nan.npz", bad))
    with pytest.raises(DatasetError, match=r"shape\.npz: 'poses' must have shape"):
        read_posescript(captions, write_npz(tmp_path / "shape.npz", np.zeros((3, 10))))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(
        DatasetError, match=r"junk\.npz: not an \.npz file \(an \.npz is a zip archive\)"
    ):
        read_posescript(captions, tmp_path / "junk.npz")
    with pytest.raises(DatasetError, match=r"missing\.npz: file not found"):
        read_posescript(captions, tmp_path / "missing.npz")
    dup = write_npz(tmp_path / "dup.npz", ids=np.array(["a", "b", "a", "c"]))
    with pytest.raises(DatasetError, match=r"dup\.npz: 'ids' has 'a' twice"):
        read_posescript(captions, dup)
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken\.json: not a readable JSON"):
        read_posescript(tmp_path / "broken.json", write_npz(tmp_path / "ok.npz"))
    huge = POSES.copy()
    huge[1, 3, 0] = 1e39  # finite, but past float32: a NaN loss in training
    with pytest.raises(DatasetError, match=r"huge\.npz: frame 1: a rotation of 1e\+39 rad"):
        read_posescript(captions, write_npz(tmp_path / "huge.npz", huge))
    degrees = np.zeros((2, 24, 3))
    degrees[1, 5] = [120.0, 0, 0]  # a bent knee, in degrees
    with pytest.raises(DatasetError, match=r"frame 1: a rotation of 120 rad, .*radians \(degrees"):
        read_posescript(captions, write_npz(tmp_path / "degrees.npz", degrees))
    unwrapped = np.zeros((2, 24, 3))
    unwrapped[:, 0] = [0, 1.99 * np.pi, 0]  # a long way round, but a rotation
    assert len(read_posescript(captions, write_npz(tmp_path / "turn.npz", unwrapped))) == 1
    with open(tmp_path / "array.npz", "wb") as stream:
        np.save(stream, POSES.reshape(len(POSES), 72))
    with pytest.raises(DatasetError, match=r"array\.npz: a single \.npy array"):
        read_posescript(captions, tmp_path / "array.npz")
    # An object array beside the poses (metadata a tool saved) is left out, not the file.
    notes = np.array([{"source": "mocap"}, None], dtype=object)
    np.savez(tmp_path / "notes.npz", poses=POSES.reshape(len(POSES), 72), notes=notes)
    assert len(read_posescript(captions, tmp_path / "notes.npz")) == 1
    np.savez(tmp_path / "objects.npz", poses=notes)  # never unpickled: no poses to read
    with pytest.raises(DatasetError, match=r"objects\.npz: 'poses' is an object \(pickled\)"):
        read_posescript(captions, tmp_path / "objects.npz")
    np.savez(tmp_path / "empty.npz", poses=np.zeros((0, 72)))
    with pytest.raises(DatasetError, match=r"empty\.npz: 'poses' holds no frames"):
        read_posescript(captions, tmp_path / "empty.npz")
    with zipfile.ZipFile(tmp_path / "member.npz", "w") as archive:  # a member that is no .npy
        archive.writestr("poses.npy", b"not npy")
    with pytest.raises(DatasetError, match=r"member\.npz: poses\.npy: not a \.npy array"):
        read_posescript(captions, tmp_path / "member.npz")
    with zipfile.ZipFile(write_npz(tmp_path / "readme.npz"), "a") as archive:
        archive.writestr("readme.txt", b"how these poses were made")  # not an array: left out
    assert len(read_posescript(captions, tmp_path / "readme.npz")) == 1
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"0": "a man"}')  # Windows' UTF-8
    assert len(read_posescript(tmp_path / "bom.json", write_npz(tmp_path / "ok.npz"))) == 1
    (tmp_path / "latin.json").write_bytes('{"0": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin\.json: not UTF-8 text .*save it as UTF-8"):
        read_posescript(tmp_path / "latin.json", write_npz(tmp_path / "ok.npz"))
    (tmp_path / "twice.json").write_text('{"0": "a man", "0": "a woman"}', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"twice\.json: the key '0' appears more than once"):
        read_posescript(tmp_path / "twice.json", write_npz(tmp_path / "ok.npz"))


# --- image/pose pairs ---------------------------------------------------------------------------


def test_image_pose_pairs(tmp_path, monkeypatch, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    (tmp_path / "img" / "b.png").write_bytes(png((0, 0, 255)))
    poses = write_npz(tmp_path / "pairs.npz", POSES[:2], images=np.array(["a.png", "b.png"]))
    examples = read_image_pose_pairs(poses, images=tmp_path / "img", phrasing="release")
    assert capsys.readouterr().err == ""  # a few images are read without a word
    monkeypatch.setattr(datasets, "ANNOUNCED_IMAGES", 1)  # thousands: said, not a silent wait
    read_image_pose_pairs(poses, images=tmp_path / "img", phrasing="release")
    assert (
        f"note: {poses}: reading and checking the images of 2 examples" in capsys.readouterr().err
    )
    assert [e.kind for e in examples] == ["image_to_pose"] * 2
    assert [image_bytes(i) for i in examples[1].images] == [
        (tmp_path / "img" / "b.png").read_bytes()
    ]
    assert (examples[0].question, examples[0].answer) == (
        IMAGE_QUESTION,
        IMAGE_ANSWER.format(pose=POSE_MARKER),
    )
    np.testing.assert_array_equal(examples[1].pose, POSES[1])


def test_image_pairs_past_a_limit_are_not_read(tmp_path):
    # A review: evaluate --limit 2 read (and refused) a broken image at frame 11.
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    names = np.array(["a.png", "a.png", "broken.png"])
    spec = parse_data_spec(["pairs", str(write_npz(tmp_path / "p.npz", POSES[:3], images=names))])
    assert len(load_data(spec, limit=2)) == 2
    with pytest.raises(DatasetError, match=r"frame 2: .*broken\.png"):
        load_data(spec)


def test_read_images_are_files_read_again_when_used(tmp_path):
    # A run holds the images' names, not their bytes (tens of GB at the paper's scale).
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(png())
    names = np.array(["a.png", "b.png", "c.png"])
    examples = read_image_pose_pairs(write_npz(tmp_path / "p.npz", POSES[:3], images=names))
    assert all(isinstance(e.images[0], ImageFile) for e in examples)
    assert image_sha256(examples[0].images[0]) == image_sha256(png())
    (tmp_path / "b.png").write_bytes(png((0, 0, 255)))
    with pytest.raises(DatasetError, match=r"b\.png: the image file changed after the training"):
        image_bytes(examples[1].images[0])
    (tmp_path / "c.png").unlink()
    with pytest.raises(DatasetError, match=r"c\.png: cannot read the image file"):
        image_bytes(examples[2].images[0])


def test_hmr_style_pairs_smpl_parameters_imgname_and_the_camera_frame(tmp_path):
    # HMR-style data: SMPL's global_orient and body_pose (here as rotation matrices), the
    # image names in `imgname`, the orientation in the camera's frame (+Y down).
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "b.png").write_bytes(png((0, 0, 255)))
    matrices = axis_angle_to_matrix(POSES[:2])
    path = tmp_path / "hmr.npz"
    np.savez(
        path,
        global_orient=matrices[:, :1],
        body_pose=matrices[:, 1:],
        imgname=np.array(["a.png", "b.png"]),
    )
    upright = read_image_pose_pairs(path)
    np.testing.assert_allclose(
        axis_angle_to_matrix(upright[1].pose), axis_angle_to_matrix(POSES[1]), atol=1e-9
    )
    assert [image_bytes(e.images[0]) for e in upright] == [png(), png((0, 0, 255))]
    (camera,) = load_data(parse_data_spec(["pairs", str(path), "frame=camera"]))[:1]
    np.testing.assert_allclose(camera.pose[0], camera_to_upright(POSES[0, 0]), atol=1e-9)
    np.testing.assert_allclose(camera.pose[1:], upright[0].pose[1:])
    np.savez(path, global_orient=POSES[:2, 0], body_pose=POSES[:3, 1:].reshape(3, 69))
    with pytest.raises(DatasetError, match="'global_orient' has 2 frames, 'body_pose' 3"):
        read_image_pose_pairs(path)
    np.savez(path, global_orient=POSES[:2, 0], body_pose=np.ones((2, 23, 3, 3)))
    with pytest.raises(DatasetError, match="frame 0: 'body_pose': .*not a rotation matrix"):
        read_image_pose_pairs(path)
    # One bad frame among many is named, as in the axis-angle layouts.
    matrices = np.tile(np.eye(3), (6, 1, 1, 1))
    for bad, message in ((np.zeros((3, 3)), "not a rotation matrix"), (np.nan, "NaN or inf")):
        matrices[4] = bad
        np.savez(path, global_orient=matrices, body_pose=np.tile(np.eye(3), (6, 23, 1, 1)))
        with pytest.raises(DatasetError, match=f"frame 4: 'global_orient': .*{message}"):
            read_image_pose_pairs(path)
    with pytest.raises(ValueError, match="frame= takes upright or camera, not 'world'"):
        parse_data_spec(["pairs", str(path), "frame=world"])


def test_4dhumans_pairs_leave_out_frames_without_a_pose(tmp_path, capsys):
    # 4DHumans' files: `body_pose` (N, 72) with the global orientation first, `has_body_pose`
    # 0 where a frame has no true pose (its zeros are no target), boxes around the person.
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(png())
    path = tmp_path / "4dhumans.npz"
    np.savez(
        path,
        body_pose=POSES[:3].reshape(3, 72),
        has_body_pose=np.array([1.0, 0.0, 1.0]),
        imgname=np.array(["a.png", "b.png", "c.png"]),
        center=np.full((3, 2), 8.0),
        scale=np.full(3, 16.0),
    )
    examples = read_image_pose_pairs(path)
    assert [e.source.rsplit("#", 1)[1] for e in examples] == ["0", "2"]
    np.testing.assert_array_equal(examples[1].pose, POSES[2])
    err = capsys.readouterr().err
    assert "left out 1 of 3 frames without a pose (has_body_pose 0)" in err
    flags = dict(np.load(path))
    flags["has_body_pose"] = np.array([1.0, 1.0])  # one short: frames would be dropped unsaid
    np.savez(path, **flags)
    with pytest.raises(DatasetError, match=r"'has_body_pose' must be \(N,\) number flags"):
        read_image_pose_pairs(path)


def halves(size=(100, 60)) -> Image.Image:
    """Red on the left half, blue on the right."""
    picture = Image.new("RGB", size, (255, 0, 0))
    picture.paste((0, 0, 255), (size[0] // 2, 0, *size))
    return picture


def test_hmr_style_boxes_crop_each_image_to_its_person(tmp_path):
    halves().save(tmp_path / "a.png")
    halves().save(tmp_path / "b.jpg", quality=95)
    path = tmp_path / "spin.npz"  # SPIN's layout: `scale` is the box's side / 200
    np.savez(
        path,
        poses=POSES[:2].reshape(2, 72),
        imgname=np.array(["a.png", "b.jpg"]),
        center=np.array([[75.0, 30.0], [25.0, 30.0]]),
        scale=np.array([0.2, 0.35]),
    )
    right, wide = (load_image(e.images[0]) for e in read_image_pose_pairs(path))
    # Frame 0: the 40-px square around (75, 30), inside the blue half.
    assert right.size == (40, 40)
    assert (np.asarray(right) == (0, 0, 255)).all()
    # Frame 1: the 70-px square around (25, 30) leaves the picture by 10 px on the left and
    # 5 above and below: black there.
    pixels = np.asarray(wide).astype(int)
    assert wide.size == (70, 70)
    assert (pixels[:, :10] == 0).all() and (pixels[:5] == 0).all() and (pixels[-5:] == 0).all()
    assert (np.abs(pixels[7:63, 12:58] - (255, 0, 0)) < 8).all()
    assert (np.abs(pixels[7:63, 62:] - (0, 0, 255)) < 8).all()
    # A batch that asks for a small input gets the crop reduced, not the whole picture.
    assert load_image(read_image_pose_pairs(path)[1].images[0], min_side=10).size == (35, 35)

    whole = load_data(parse_data_spec(["pairs", str(path), "crop=none"]))
    assert load_image(whole[0].images[0]).size == (100, 60)
    # The box is part of the data: a resume with other boxes is other data.
    assert image_sha256(whole[0].images[0]) != image_sha256(
        read_image_pose_pairs(path)[0].images[0]
    )
    with pytest.raises(ValueError, match="crop= takes auto, hmr, pixels, none, not 'yes'"):
        parse_data_spec(["pairs", str(path), "crop=yes"])


def test_spin_pairs_pose_has_smpl_and_boxes_of_the_side_over_200(tmp_path, capsys):
    # SPIN's files (dataset_extras/*.npz): `pose` (N, 72) in the camera frame, `has_smpl` 0
    # for frames without a fit, `scale` the box's side / 200.
    halves().save(tmp_path / "a.png")
    path = tmp_path / "spin.npz"
    np.savez(
        path,
        pose=POSES[:2].reshape(2, 72),
        shape=np.zeros((2, 10)),
        has_smpl=np.array([0.0, 1.0]),
        imgname=np.array(["a.png", "a.png"]),
        center=np.array([[0.0, 0.0], [75.0, 30.0]]),
        scale=np.array([0.0, 0.2]),  # the frame left out has no box to read
    )
    read_image_pose_pairs(path)  # the frame not said: a note
    assert "hold the global orientation in the camera's frame" in capsys.readouterr().err
    (example,) = load_data(parse_data_spec(["pairs", str(path), "frame=camera"]))
    assert example.source.endswith("#1")
    np.testing.assert_allclose(example.pose[0], camera_to_upright(POSES[1, 0]), atol=1e-9)
    np.testing.assert_array_equal(example.pose[1:], POSES[1, 1:])
    assert example.images[0].box == (75.0, 30.0, 40.0)
    assert "left out 1 of 2 frames without a pose (has_smpl 0)" in capsys.readouterr().err


def test_a_flag_that_is_not_a_number_is_named_not_read_as_no_pose(tmp_path):
    halves().save(tmp_path / "a.png")
    path = tmp_path / "spin.npz"
    np.savez(
        path,
        pose=POSES[:2].reshape(2, 72),
        has_smpl=np.array([1.0, np.nan]),
        imgname=np.array(["a.png", "a.png"]),
    )
    with pytest.raises(DatasetError, match=r"spin.npz: frame 1: 'has_smpl' is nan, not a number"):
        read_image_pose_pairs(path, camera_frame=True)


def test_4dhumans_boxes_are_in_pixels(tmp_path):
    # 4DHumans' files give `scale` in pixels, one per axis (their reader divides by 200).
    halves().save(tmp_path / "a.png")
    path = tmp_path / "4dhumans.npz"
    np.savez(
        path,
        body_pose=POSES[:2].reshape(2, 72),
        has_body_pose=np.array([1, 0]),
        imgname=np.array(["a.png", "a.png"]),
        center=np.array([[75.0, 30.0], [np.nan, 0.0]]),  # a frame left out: its box unread
        scale=np.array([[40.0, 20.0], [0.0, 0.0]]),
    )
    (boxed,) = read_image_pose_pairs(path)
    assert boxed.images[0].box == (75.0, 30.0, 40.0)
    assert (np.asarray(load_image(boxed.images[0])) == (0, 0, 255)).all()
    # Said otherwise, the same numbers are the side / 200: a box 40 times the picture.
    with pytest.raises(
        DatasetError,
        match=r"4dhumans\.npz: frame 0: its box \(center 75, 30, side 8000 px\) and the 100 x 60 "
        r"picture .*a\.png: the box is far larger than the picture; 'scale' was read as the "
        r"side / 200 \(crop=hmr\); if it is the side in pixels, give crop=pixels",
    ):
        load_data(parse_data_spec(["pairs", str(path), "crop=hmr"]))


def test_hmr_style_boxes_errors(tmp_path):
    halves().save(tmp_path / "a.png")
    names = np.array(["a.png"])

    def read(**boxes):
        np.savez(tmp_path / "b.npz", poses=POSES[:1].reshape(1, 72), imgname=names, **boxes)
        return read_image_pose_pairs(tmp_path / "b.npz")

    with pytest.raises(DatasetError, match=r"b\.npz: has 'center' but no 'scale'; .*crop=none"):
        read(center=np.zeros((1, 2)))
    with pytest.raises(
        DatasetError, match=r"b\.npz: 'center' must be \(1, 2\) numbers, got \(2,\)"
    ):
        read(center=np.zeros(2), scale=np.ones(1))
    with pytest.raises(DatasetError, match=r"b\.npz: 'scale' must be \(1,\) or \(1, 2\) numbers"):
        read(center=np.zeros((1, 2)), scale=np.ones((1, 3)))
    with pytest.raises(DatasetError, match=r"'scale' must be .* numbers, got \(1, 2\) <U1"):
        read(center=np.zeros((1, 2)), scale=np.array([["a", "b"]]))
    with pytest.raises(DatasetError, match=r"frame 0: its box \(center \[0.0, nan\], scale 1.0\)"):
        read(center=np.array([[0.0, np.nan]]), scale=np.ones(1))
    with pytest.raises(DatasetError, match=r"frame 0: its box .*scale 0.0\) is not finite and pos"):
        read(center=np.zeros((1, 2)), scale=np.zeros(1))
    with pytest.raises(
        DatasetError,
        match=r"b\.npz: frame 0: its box \(center 300, 30, side 100 px\) and the 100 x 60 "
        r"picture .*a\.png: the box lies outside the picture",
    ):
        read(center=np.array([[300.0, 30.0]]), scale=np.array([0.5]))
    with pytest.raises(DatasetError, match=r"the box is too small; .*give crop=hmr"):
        load_data(parse_data_spec(["pairs", str(tmp_path / "b.npz"), "crop=pixels"]))
    with pytest.raises(
        DatasetError, match=r"its box \(center \[0.0, 0.0\], scale \[40.0, -5.0\]\)"
    ):
        read(center=np.zeros((1, 2)), scale=np.array([[40.0, -5.0]]))
    # A body_pose of 72 alone is 4DHumans' layout: its scale read in pixels, and said so.
    np.savez(
        tmp_path / "4d.npz",
        body_pose=POSES[:1].reshape(1, 72),
        imgname=names,
        center=np.array([[50.0, 30.0]]),
        scale=np.array([0.5]),
    )
    with pytest.raises(
        DatasetError,
        match=r"too small; 'scale' was read as the side in pixels \(crop=auto, by the file's "
        r"layout\); if it is the side / 200, give crop=hmr",
    ):
        read_image_pose_pairs(tmp_path / "4d.npz")
    with pytest.raises(
        ValueError, match="crop: expected one of auto, hmr, pixels, none, got 'box'"
    ):
        read_image_pose_pairs(tmp_path / "4d.npz", crop="box")


def test_image_pose_pairs_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    no_images = write_npz(tmp_path / "n.npz", POSES[:1])
    with pytest.raises(DatasetError, match=r"n\.npz: no 'images' \(or 'imgname'\) array"):
        read_image_pose_pairs(no_images)
    count = write_npz(tmp_path / "c.npz", POSES[:2], images=np.array(["a.png"]))
    with pytest.raises(DatasetError, match=r"c\.npz: 'images' has 1 entries for 2 poses"):
        read_image_pose_pairs(count)
    missing = write_npz(tmp_path / "m.npz", POSES[:2], images=np.array(["a.png", "nope.png"]))
    with pytest.raises(DatasetError, match=r"m\.npz: frame 1: image file .*nope\.png not found"):
        read_image_pose_pairs(missing)
    broken = write_npz(tmp_path / "b.npz", POSES[:1], images=np.array(["bad.png"]))
    with pytest.raises(DatasetError, match=r"b\.npz: frame 0: .*bad\.png: not a decodable PNG"):
        read_image_pose_pairs(broken)
    Image.new("RGB", (400, 2)).save(tmp_path / "thin.png")  # a good PNG the model cannot use
    thin = write_npz(tmp_path / "t.npz", POSES[:1], images=np.array(["thin.png"]))
    with pytest.raises(DatasetError, match=r"t\.npz: frame 0: .*thin\.png: 400 x 2 pixels, its"):
        read_image_pose_pairs(thin)
    nul = write_npz(tmp_path / "z.npz", POSES[:1], images=np.array(["a\0.png"]))
    with pytest.raises(DatasetError, match=r"z\.npz: frame 0: 'a\\x00\.png' is not a file name"):
        read_image_pose_pairs(nul)


# --- LLaVA conversations ------------------------------------------------------------------------


def test_llava_conversations_with_poses_images_and_chat(tmp_path):
    (tmp_path / "p.png").write_bytes(png())
    data = [
        {
            "id": "img1",
            "image": "p.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the person doing?"},
                {"from": "gpt", "value": "Waving."},
                {"from": "human", "value": "Give the SMPL pose."},
                {"from": "gpt", "value": "Sure, it is <POSE>."},
            ],
        },
        {
            "id": 7,
            "conversations": [
                {"from": "human", "value": "Two poses: sitting, then standing."},
                {"from": "gpt", "value": "First <POSE>, then <POSE>."},
            ],
        },
        {
            "id": "chat",
            "conversations": [
                {"from": "human", "value": "Hello"},
                {"from": "gpt", "value": "Hi, how can I help?"},
            ],
        },
    ]
    path = write_json(tmp_path / "conv.json", data)
    poses = write_npz(tmp_path / "poses.npz", POSES[:3], ids=np.array(["7", "img1", "7"]))
    examples = read_llava_conversations(path, poses=poses)
    assert [e.kind for e in examples] == ["image_to_pose", "text_to_pose", "chat"]
    first = examples[0]
    assert first.history[0].user == "What is the person doing?"
    assert first.history[0].assistant == "Waving."
    assert (first.question, first.answer) == ("Give the SMPL pose.", "Sure, it is <POSE>.")
    assert [image_bytes(i) for i in first.images] == [png()]
    np.testing.assert_array_equal(first.pose, POSES[1])
    assert len(examples[1].poses) == 2
    np.testing.assert_array_equal(examples[1].poses[0], POSES[0])
    np.testing.assert_array_equal(examples[1].poses[1], POSES[2])
    assert examples[2].poses == ()


def _conv(*turns, **fields):
    roles = ["human", "gpt"] * len(turns)
    conversation = [{"from": r, "value": v} for r, v in zip(roles, turns, strict=False)]
    return {**fields, "conversations": conversation}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "a"}, r"record 0 \(id 'a'\): 'conversations' must be a non-empty list"),
        (
            {"id": "a", "conversations": [{"from": "gpt", "value": "x"}]},
            r"record 0 \(id 'a'\): turn 0: expected 'from' 'human'",
        ),
        (_conv("hi", id="a"), "the last turn is a human turn"),
        (_conv("<image>\nhi", "yo", id="a"), r"turn 0: 1 <image> marker\(s\) for 0 image\(s\)"),
        (_conv("hi", "yo", id="a", image="a.png"), r"turn 0: 0 <image> marker\(s\) for 1 image"),
        (
            _conv("<image><image>\nhi", "yo", id="a", image="a.png"),
            r"turn 0: 2 <image> marker\(s\) for 1 image",
        ),
        (
            _conv("<image>\nhi", "yo", "<image>", "ok", id="a", image="a.png"),
            r"turn 2: <image> outside the first human turn",
        ),
        (_conv("hi", "  ", id="a"), "turn 1: empty gpt answer"),
        (_conv("hi", "yo", " ", "x", id="a"), "turn 2: empty human message"),
        (_conv("hi <POSE>", "yo", id="a"), r"turn 0: <POSE> in a human turn"),
        (_conv("hi", "it is <POSE>.", id="a"), "contain <POSE> but no poses file"),
        (_conv("hi", "it is <pose>.", id="a"), r"a gpt turn holds '<pose>', not the marker <POSE>"),
        (_conv("hi", "< POSE >", id="a"), r"holds '< POSE >', not the marker"),
        (
            _conv("<image>\nhi", "yo", id="a", image="missing.png"),
            "image file .*missing.png not found",
        ),
        (_conv("<image>\nhi", "yo", id="a", image="/dev/zero"), "/dev/zero is not a regular file"),
        (_conv("<image>\nhi", "yo", id="a", image="."), "is not a regular file"),
        (_conv("hi", "yo", id=True), r"record 0: 'id' must be a string or integer"),
        (
            {
                "id": "a",
                "conversations": [
                    {"from": "gpt", "value": "<POSE>"},
                    *_conv("hi", "yo")["conversations"],
                ],
            },
            r"turn 0: <POSE> in a gpt turn before any human one",
        ),
        ("just text", "record 0: expected an object"),
    ],
)
def test_llava_errors_name_file_and_record(tmp_path, record, message):
    path = write_json(tmp_path / "conv.json", [record])
    with pytest.raises(DatasetError, match=message) as info:
        read_llava_conversations(path)
    assert "conv.json" in str(info.value)


def test_llava_s_mixture_as_downloaded_leaves_out_what_it_cannot_read_when_asked(tmp_path, capsys):
    # LLaVA's mixture, downloaded in part: images not there, GIFs named .jpg, and records that
    # open with a gpt turn (LLaVA's own loader drops it).
    (tmp_path / "p.png").write_bytes(png())
    (tmp_path / "gif.jpg").write_bytes(b"GIF89a" + bytes(30))
    opens_with_gpt = _conv("<image>\nWhat is she doing?", "Waving.", id="g", image="p.png")
    opens_with_gpt["conversations"].insert(0, {"from": "gpt", "value": "Hello."})
    data = [
        _conv("<image>\nhi", "yo", id="a", image="ocr_vqa/1.jpg"),
        opens_with_gpt,
        _conv("<image>\nhi", "yo", id="b", image="gif.jpg"),
        _conv("hi", "yo", id="c"),
    ]
    path = write_json(tmp_path / "mix.json", data)
    with pytest.raises(DatasetError, match=r"record 0 .*not found; missing=skip leaves such"):
        read_llava_conversations(path)
    spec = parse_data_spec(["llava", str(path), "missing=skip"])
    examples = load_data(spec)
    assert [e.source.rsplit("#", 1)[1] for e in examples] == ["1", "3"]
    assert (examples[0].question, examples[0].answer, examples[0].history) == (
        "What is she doing?",
        "Waving.",
        (),
    )
    assert "note: left out: 2 conversation(s) of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="missing= takes error or skip, not 'maybe'"):
        parse_data_spec(["llava", str(path), "missing=maybe"])
    with open(tmp_path / "huge.jpg", "wb") as file:  # a video named .jpg: refused, not read
        file.truncate((64 << 20) + 1)
    huge = write_json(tmp_path / "huge.json", [_conv("<image>\nhi", "yo", image="huge.jpg")])
    with pytest.raises(DatasetError, match=r"huge\.jpg is larger than 64 MiB"):
        read_llava_conversations(huge)


def test_a_repeated_key_inside_a_record_names_the_record(tmp_path):
    records = [json.dumps(_conv("hi", "yo", id=str(n))) for n in range(5)]
    records[3] = records[3].replace('"value": "hi"', '"value": "hi", "value": "hello"')
    (tmp_path / "conv.json").write_text("[" + ", ".join(records) + "]", encoding="utf-8")
    with pytest.raises(
        DatasetError, match=r"conv\.json: record 3: the key 'value' appears more than once"
    ):
        read_llava_conversations(tmp_path / "conv.json")
    # A record too deep to read again after the repeat: the message goes without a record.
    records[4] = "[" * 100_000 + "]" * 100_000
    (tmp_path / "conv.json").write_text("[" + ", ".join(records) + "]", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"conv\.json: the key 'value' appears more than"):
        read_llava_conversations(tmp_path / "conv.json")


def test_llava_pose_pairing_errors(tmp_path):
    path = write_json(tmp_path / "conv.json", [_conv("pose?", "<POSE>", id="a")])
    too_many = write_npz(tmp_path / "two.npz", POSES[:2], ids=np.array(["a", "a"]))
    with pytest.raises(DatasetError, match=r"id 'a'\): 1 <POSE> markers but 2 poses"):
        read_llava_conversations(path, poses=too_many)
    stray = write_npz(tmp_path / "stray.npz", POSES[:2], ids=np.array(["a", "zzz"]))
    with pytest.raises(DatasetError, match=r"stray\.npz: poses for conversation id 'zzz'"):
        read_llava_conversations(path, poses=stray)
    chat = write_json(tmp_path / "chat.json", [_conv("hello", "hi", id="a")])
    one = write_npz(tmp_path / "a.npz", POSES[:1], ids=np.array(["a"]))
    with pytest.raises(DatasetError, match=r"has poses for this conversation but it has no <POSE>"):
        read_llava_conversations(chat, poses=one)  # it would train without them
    no_ids = write_npz(tmp_path / "noids.npz", POSES[:1])
    with pytest.raises(DatasetError, match=r"noids\.npz: no 'ids' array"):
        read_llava_conversations(path, poses=no_ids)
    twice = write_json(tmp_path / "twice.json", [_conv("x", "<POSE>", id="a")] * 2)
    with pytest.raises(DatasetError, match=r"record 1 \(id 'a'\): id used twice"):
        read_llava_conversations(
            twice, poses=write_npz(tmp_path / "one.npz", POSES[:1], ids=np.array(["a"]))
        )


# --- the synthetic corpus ----------------------------------------------------------------------


def test_corpus_file(tmp_path):
    from inference_service.training.corpus import generate_corpus, save_corpus

    records = generate_corpus(5, 30)
    save_corpus(records, tmp_path / "corpus.npz", seed=5)
    train = read_corpus(tmp_path / "corpus.npz")
    expected = [i for i, r in enumerate(records) if r.split == "train"]
    assert len(train) == len(expected) and 0 < len(train) < 30
    first = records[expected[0]]
    np.testing.assert_allclose(train[0].pose, first.pose)
    assert train[0].kind == "text_to_pose"
    assert train[0].source.endswith(f"corpus.npz#{expected[0]}")
    everything = read_corpus(tmp_path / "corpus.npz", split="all")
    assert len(everything) == 30
    # An example names an action when its caption is one of the action's phrasings; an action
    # pose with an automatic caption does not (its caption need not say the action).
    assert [e.action for e in everything] == [
        r.action if r.source.startswith("action:") else "" for r in records
    ]
    assert any(e.action for e in everything) and any(
        r.action and r.source == "auto" for r in records
    )
    spec = parse_data_spec(["corpus", str(tmp_path / "corpus.npz"), "split=test"])
    assert len(load_data(spec)) == sum(r.split == "test" for r in records)
    with np.load(tmp_path / "corpus.npz") as data:
        arrays = dict(data)
    arrays["splits"] = arrays["splits"].copy()
    arrays["splits"][3] = "holiday"
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=r"bad\.npz: record 3: split"):
        read_corpus(tmp_path / "bad.npz")
    arrays["splits"][3] = "train"
    arrays["poses"] = np.degrees(arrays["poses"])  # as the other readers, degrees are named
    np.savez(tmp_path / "degrees.npz", **arrays)
    with pytest.raises(
        DatasetError, match=r"degrees\.npz: record \d+: a rotation of .* \(degrees\?\)"
    ):
        read_corpus(tmp_path / "degrees.npz")
    with pytest.raises(DatasetError, match=r"none\.npz: file not found"):
        read_corpus(tmp_path / "none.npz")


# --- pairs from Python, Example, phrasing, --data -----------------------------------------------


def test_caption_pose_pairs_adapter_and_phrasing_mix():
    pairs = [(f"person number {i} standing.", Pose(POSES[i % 4])) for i in range(40)]
    examples = examples_from_caption_pose_pairs(pairs, source="corpus", seed=3)
    again = examples_from_caption_pose_pairs(pairs, source="corpus", seed=3)
    assert [(e.question, e.answer) for e in examples] == [(e.question, e.answer) for e in again]
    release = pose_exchange(pairs[0][0], False)[0].split(",")[-1]
    used = {
        e.question.replace(f"person number {i} standing", "{d}") for i, e in enumerate(examples)
    }
    assert len(used) == len(TEXT_PHRASINGS)  # all phrasings appear, the release's among them
    assert any(q.endswith(release) for q in used)
    assert all(e.answer.count(POSE_MARKER) == 1 for e in examples)
    np.testing.assert_array_equal(examples[5].pose, POSES[1])
    with pytest.raises(DatasetError, match="corpus#0: the caption must be a non-empty"):
        examples_from_caption_pose_pairs([("  ", POSES[0])], source="corpus")
    with pytest.raises(DatasetError, match=r"corpus#0: pose 0: expected shape \(24, 3\)"):
        examples_from_caption_pose_pairs([("x", np.zeros(5))], source="corpus")
    degrees = np.zeros((24, 3))
    degrees[18] = (0.0, 0.0, 90.0)
    with pytest.raises(DatasetError, match=r"corpus#1: pose 0: a rotation of 90 rad"):
        examples_from_caption_pose_pairs([("x", POSES[0]), ("y", degrees)], source="corpus")


def test_chat_phrasing_asks_half_the_examples_as_the_user_typed_them(tmp_path):
    pairs = [(f"Person number {i} standing.", POSES[i % 4]) for i in range(40)]
    examples = examples_from_caption_pose_pairs(pairs, phrasing="chat", seed=1)
    answer = TEXT_ANSWER.format(pose=POSE_MARKER)
    bare = [e for (caption, _), e in zip(pairs, examples, strict=True) if e.question == caption]
    release = [e for (caption, _), e in zip(pairs, examples, strict=True)
               if (e.question, e.answer) == pose_exchange(caption, False)]  # fmt: skip
    assert len(bare) + len(release) == 40 and 10 <= len(bare) <= 30
    assert all(e.answer == answer for e in bare)
    # Images: a chat turn may hold the image alone, no question.
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    names = np.array(["a.png"] * 20)
    poses = write_npz(tmp_path / "pairs.npz", np.repeat(POSES[:1], 20, axis=0), images=names)
    images = read_image_pose_pairs(poses, images=tmp_path / "img", phrasing="chat", seed=1)
    questions = {(e.question, e.answer) for e in images}
    assert questions == {("", IMAGE_ANSWER.format(pose=POSE_MARKER)), pose_exchange(None, True)}


def test_the_service_s_phrasing_follows_the_base_checkpoint_s_wording(tmp_path):
    # A base converted from the release is asked in its training code's words, in training as
    # at inference, and so is a chat turn answered.
    pairs = [(f"Person number {i} standing.", POSES[i % 4]) for i in range(20)]
    for phrasing in ("release", "chat"):
        examples = examples_from_caption_pose_pairs(
            pairs, phrasing=phrasing, seed=1, wording="release"
        )
        for (caption, _), e in zip(pairs, examples, strict=True):
            assert e.answer == "Sure, it is <POSE>."
            assert e.question in (caption, pose_exchange(caption, False, wording="release")[0])
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    poses = write_npz(tmp_path / "pairs.npz", POSES[:1], images=np.array(["a.png"]))
    spec = DataSpec("pairs", poses, {"images": str(tmp_path / "img"), "phrasing": "release"})
    [image] = load_data(spec, wording="release")
    assert (image.question, image.answer) == pose_exchange(None, True, wording="release")


def test_example_validation():
    pose = POSES[0]
    with pytest.raises(DatasetError, match="kind must be one of"):
        Example("dance", "q", "a")
    with pytest.raises(DatasetError, match="needs a pose"):
        Example("text_to_pose", "q", "Sure, it is <POSE>.")
    with pytest.raises(DatasetError, match="1 poses for 2"):
        Example("text_to_pose", "q", "<POSE> and <POSE>", poses=(pose,))
    with pytest.raises(DatasetError, match="needs an image"):
        Example("image_to_pose", "q", "<POSE>", poses=(pose,))
    with pytest.raises(DatasetError, match="contains NaN"):
        Example("text_to_pose", "q", "<POSE>", poses=(np.full((24, 3), np.nan),))
    with pytest.raises(DatasetError, match="image marker"):
        Example("chat", "<image> hi", "a")
    cut = json.loads('"a smile \\ud83d"')  # valid JSON: an emoji cut in half
    with pytest.raises(DatasetError, match=r"c\.json#3: question holds a lone surrogate .* 8"):
        Example("chat", cut, "a", source="c.json#3")
    assert Example("chat", "q", "a").pose is None


def test_parse_and_load_data_specs(tmp_path):
    poses = write_npz(tmp_path / "poses.npz")
    captions = write_json(tmp_path / "c.json", {"0": "a"})
    spec = parse_data_spec(["posescript", str(captions), f"poses={poses}", "z_up=true"])
    assert spec.options == {"poses": str(poses), "z_up": "true"}
    (example,) = load_data(spec)
    assert example.kind == "text_to_pose"
    empty = write_json(tmp_path / "empty.json", {})
    with pytest.raises(DatasetError, match=r"--data posescript .*empty\.json .*holds no examples"):
        load_data(parse_data_spec(["posescript", str(empty), f"poses={poses}"]))
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        parse_data_spec(["csv", "x"])
    with pytest.raises(ValueError, match="needs poses="):
        parse_data_spec(["posescript", "c.json"])
    for options in (["poses=p.npz", "amass=a", "index=i.json"], ["amass=a"], ["index=i.json"]):
        with pytest.raises(
            ValueError, match="needs poses=POSES.npz, or amass=AMASS_DIR and index="
        ):
            parse_data_spec(["posescript", "c.json", *options])
    with pytest.raises(ValueError, match="missing= takes error or skip, not 'ignore'"):
        parse_data_spec(["posescript", "c.json", "amass=a", "index=i.json", "missing=ignore"])
    with pytest.raises(ValueError, match="missing= goes with amass="):
        parse_data_spec(["posescript", "c.json", "poses=p.npz", "missing=skip"])
    with pytest.raises(ValueError, match="KEY one of images, frame, crop, phrasing"):
        parse_data_spec(["pairs", "p.npz", "poses=x"])
    with pytest.raises(ValueError, match="needs a format and a path"):
        parse_data_spec(["pairs"])
    with pytest.raises(ValueError, match="--data pairs: images= given twice"):
        parse_data_spec(["pairs", "p.npz", "images=a", "images=b"])
    with pytest.raises(ValueError, match="--data posescript: poses= has no value"):
        parse_data_spec(["posescript", "c.json", "poses="])  # "poses=$UNSET": the working folder
    bad = parse_data_spec(["posescript", str(captions), f"poses={poses}", "phrasing=fancy"])
    with pytest.raises(DatasetError, match="phrasing must be one of"):
        load_data(bad)


def test_pairs_standing_upside_down_need_frame_said(tmp_path):
    # HMR 2.0's output is in the camera's frame (+Y down) in the plain global_orient/body_pose
    # layout: read as upright, every target would be upside down, with nothing said.
    (tmp_path / "a.png").write_bytes(png())
    in_camera = np.stack([camera_to_upright(pose[0]) for pose in POSES[:3]])
    path = tmp_path / "hmr2.npz"
    np.savez(
        path,
        global_orient=axis_angle_to_matrix(in_camera)[:, None],
        body_pose=axis_angle_to_matrix(POSES[:3, 1:]),
        imgname=np.array(["a.png"] * 3),
    )
    with pytest.raises(DatasetError, match="most bodies stand upside down.*frame=camera"):
        load_data(parse_data_spec(["pairs", str(path)]))
    upright = load_data(parse_data_spec(["pairs", str(path), "frame=camera"]))
    for example, pose in zip(upright, POSES[:3], strict=True):
        np.testing.assert_allclose(
            axis_angle_to_matrix(example.pose[0]), axis_angle_to_matrix(pose[0]), atol=1e-9
        )
    as_stored = load_data(parse_data_spec(["pairs", str(path), "frame=upright"]))
    np.testing.assert_allclose(
        axis_angle_to_matrix(as_stored[0].pose[0]), axis_angle_to_matrix(in_camera[0]), atol=1e-9
    )
