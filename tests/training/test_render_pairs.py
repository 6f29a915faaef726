"""Image–pose pairs rendered with Blender (bpy): files, layout, the camera-relative convention."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from inference_service.training.actions import ACTIONS
from inference_service.training.datasets import image_bytes, read_image_pose_pairs
from inference_service.training.render_pairs import (
    CameraView,
    camera_relative,
    quiet_blender_output,
    read_pairs,
    sample_views,
)
from shared_protocol.rotations import axis_angle_to_matrix


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    from inference_service.training.render_pairs import render_pairs

    out = tmp_path_factory.mktemp("pairs")
    poses = np.stack([ACTIONS["raise_left_arm"](None), ACTIONS["raise_right_arm"](None)] * 2)
    views = [CameraView(0.0, 0.0, 1.1, 0.1)] * 2 + [CameraView(40.0, 20.0, 1.2, 0.2)] * 2
    actions = ["raise_left_arm", "raise_right_arm"] * 2
    path = render_pairs(poses, out, views=views, size=48, actions=actions, split=["test"] * 4)
    return out, path, poses


def test_files_and_layout_read_by_the_training_reader(rendered):
    out, path, poses = rendered
    arrays = read_pairs(path)
    assert len(arrays["images"]) == 4
    for name in arrays["images"]:
        assert (out / str(name)).is_file()
    examples = read_image_pose_pairs(path)
    assert len(examples) == 4
    assert all(e.kind == "image_to_pose" and len(e.images) == 1 for e in examples)
    with Image.open(io.BytesIO(image_bytes(examples[0].images[0]))) as image:
        assert image.size == (48, 48)
    np.testing.assert_allclose(arrays["world_poses"], poses)
    assert list(arrays["actions"]) == ["raise_left_arm", "raise_right_arm"] * 2
    # The targets are camera-relative: the front views keep the pose, the 40° views turn it.
    np.testing.assert_allclose(examples[0].pose, poses[0], atol=1e-9)
    np.testing.assert_allclose(examples[2].pose, camera_relative(poses[2], 40.0), atol=1e-9)


def _pixels(out, name) -> np.ndarray:
    with Image.open(out / name) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def test_two_poses_give_different_pictures_and_the_left_arm_is_on_the_right(rendered):
    out, path, _ = rendered
    names = [str(n) for n in read_pairs(path)["images"]]
    left, right = _pixels(out, names[0]), _pixels(out, names[1])
    assert np.abs(left - right).mean() > 1.0
    # Seen from the front, the body's left arm is on the picture's right.
    for picture, side in ((left, 1), (right, -1)):
        top = picture[: picture.shape[0] // 4]
        mask = np.abs(top - top[0, 0]) > 30
        columns = np.nonzero(mask)[1]
        assert columns.size
        assert side * (columns.mean() - picture.shape[1] / 2) > 0


def test_camera_relative_turns_the_heading_only():
    pose = ACTIONS["squat"](None)
    assert np.allclose(camera_relative(pose, 0.0), pose)
    turned = camera_relative(pose, 30.0)
    assert np.allclose(turned[1:], pose[1:])
    forward = axis_angle_to_matrix(turned[0]) @ axis_angle_to_matrix(pose[0]).T @ [0, 0, 1.0]
    # A camera 30° to the body's left sees the body facing 30° to the viewer's... right (-x).
    assert np.allclose(forward, [np.sin(np.radians(-30)), 0, np.cos(np.radians(-30))])


def test_views_are_seeded_and_in_range():
    a = sample_views(np.random.default_rng(3), 50)
    b = sample_views(np.random.default_rng(3), 50)
    assert a == b
    assert all(-60 <= v.yaw_deg <= 60 and -5 <= v.pitch_deg <= 30 for v in a)


def test_blender_output_is_quiet_but_real_errors_pass(capfd):
    """Blender writes from C, past sys.stdout: the render lines and a headless machine's EGL
    errors are dropped, anything else on stderr still reaches the user."""
    with quiet_blender_output():
        os.write(1, b"Saved: 'x.png'\n")
        os.write(2, b"EGL Error (0x3009): EGL_BAD_MATCH: Arguments are inconsistent\n")
        os.write(2, b"Error: cannot write x.png\n")
    out, err = capfd.readouterr()
    assert out == ""
    assert err == "Error: cannot write x.png\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_blender_output_leaves_no_descriptor_open_when_it_cannot_start(monkeypatch):
    from inference_service.training import render_pairs

    def no_space():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render_pairs.tempfile, "TemporaryFile", no_space)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="No space"), quiet_blender_output():
        pass
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_poses_file_whose_names_or_views_do_not_fit_is_refused_first(tmp_path, capsys):
    from inference_service.training.render_pairs import main

    poses = np.zeros((3, 72))
    out = tmp_path / "out"
    cases = {
        "short_names.npz": ({"names": np.array(["a", "b"])}, "names: 2 for 3 poses"),
        "bad_views.npz": ({"views": np.zeros((3, 5))}, "views: expected shape (N, 4), got (3, 5)"),
        # One image would be written over by the next, and listed for two poses.
        "twice.npz": ({"names": np.array(["a", "a", "b"])}, "names: 'a' is given twice"),
        # One file on macOS's and Windows' file systems, which compare names without case.
        "case.npz": ({"names": np.array(["a.png", "b", "A.png"])}, "'A.png' is given twice"),
        "path.npz": ({"names": np.array(["a", "../b", "c"])}, "'../b' is no plain file name"),
        "one.npz": ({"names": np.array("a")}, "names: expected one name per pose"),
    }
    for name, (extra, message) in cases.items():
        np.savez(tmp_path / name, poses=poses, **extra)
        assert main([str(out), "--poses", str(tmp_path / name), "--size", "16"]) != 0
        assert message in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(SystemExit) as info:
        main([str(out), "--poses", str(tmp_path / "bad_views.npz"), "--size", "0"])
    assert info.value.code == 2
    assert "--size: expected a whole number of at least 1, got '0'" in capsys.readouterr().err


def test_a_poses_file_standing_along_z_is_refused_unless_z_up_says_what_it_is(
    tmp_path, capsys, monkeypatch
):
    # AMASS's files and the motions chatpose exports stand along +Z: rendered as stored, the
    # mannequin would lie on its back in every picture, and its pose with it.
    from inference_service.training import render_pairs as module

    rendered = []
    monkeypatch.setattr(
        module, "render_pairs", lambda poses, out, **_: rendered.append(poses) or out / "p.npz"
    )
    poses = np.zeros((2, 24, 3))
    poses[:, 0] = (np.pi / 2, 0.0, 0.0)  # the body's up axis turned from +Y to +Z
    np.savez(tmp_path / "amass.npz", poses=poses.reshape(2, 72))
    args = [str(tmp_path / "out"), "--poses", str(tmp_path / "amass.npz")]
    assert module.main(args) == 2
    refusal = capsys.readouterr().err
    assert "most bodies stand along +Z" in refusal
    assert "add --z-up to turn them upright, or --no-z-up if they are meant so" in refusal
    assert not rendered
    assert module.main([*args, "--z-up"]) == 0
    up = axis_angle_to_matrix(rendered[0][:, 0])[:, :, 1]
    np.testing.assert_allclose(up, [[0.0, 1.0, 0.0]] * 2, atol=1e-9)
    assert module.main([*args, "--no-z-up"]) == 0
    np.testing.assert_allclose(rendered[1], poses)
