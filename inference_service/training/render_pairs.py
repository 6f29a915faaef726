"""Image–pose pairs rendered headless: the add-on's mannequin, posed, seen by a random camera.

    python -m inference_service.training.render_pairs OUT --corpus CORPUS.npz [--split train]
        [--count N] [--seed S] [--size 128]
    python -m inference_service.training.render_pairs OUT --poses POSES.npz [--fixed-view]

Needs `bpy` (Blender as a Python module; `pip install bpy`, the project's `blender` extra). The
mannequin is made by the add-on's own code (`blender_addon.blender.armature.
create_smpl_armature`: the SMPL armature with its skinned capsule mannequin) and posed with the
add-on's `apply_pose`, so a picture shows exactly what a user sees in the viewport. Each frame is
rendered with Blender's Workbench engine (what the viewport's solid mode draws, and what the
add-on's "Pose from Viewport" snapshot renders in background mode) at `size` × `size` pixels,
about 30 ms a frame at 128 px on a 2-core CPU.

Cameras (`sample_views`, seeded): the camera looks at the centre of the posed mannequin's
bounding box from a random direction: yaw (azimuth about the vertical axis, 0 = straight in
front of the body, > 0 towards the body's left) uniform in ±60°, pitch (elevation, > 0 above)
uniform in −5°..30°, no roll; the distance is 1.0–1.35 × the distance at which the body's
bounding sphere just fills the frame vertically (lens 50 mm on a 36 mm sensor). The background
is a random dark-to-mid grey. The camera stays in the front half so that the (symmetric,
faceless) mannequin is not seen from behind, where its left and right could not be told apart.

Global orientation of an image's pose (the convention training, evaluation and the service
share; docs/evaluation.md): **relative to the camera's heading**. The pose's joint 0 is the
body's orientation in a frame that turns with the camera about the vertical axis: +Y up
(gravity, not the camera's up: the camera's pitch is not part of it), +Z the horizontal
direction from the body towards the camera. So a body seen from straight in front has zero yaw,
exactly like the text poses (PoseScript's convention: zero yaw, facing +Z), and a body seen
from 30° to its left is turned 30° to its own right, the viewer's left:
`camera_relative(pose, yaw)` = R_y(−yaw) · G₀. In Blender terms: the armature the add-on
poses faces −Y, i.e. the front view (numpad 1); a pose from an image therefore faces the front
view as the person faced the camera.

Output layout (what `datasets.read_image_pose_pairs` reads, `--data pairs OUT/pairs.npz`):

    OUT/pairs.npz       poses (N, 72): the targets, camera-relative (above)
                        images (N,): "images/000000.png", ... (relative to OUT)
                        world_poses (N, 72): the poses as rendered (zero yaw for the corpus)
                        camera_yaw_deg, camera_pitch_deg, camera_distance, background (N,)
                        actions (N,): the corpus record's action name or "", ids (N,) the
                        corpus record index (or the --poses frame index), split (N,)
                        format: "chatpose-pairs-v1"
    OUT/images/*.png    size × size RGB PNGs
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from inference_service.commands import positive_int, user_path
from shared_protocol.arrays import write_npz
from shared_protocol.rotations import axis_angle_to_matrix, matrix_to_axis_angle

FORMAT = "chatpose-pairs-v1"
DEFAULT_SIZE = 128
YAW_RANGE = (-60.0, 60.0)
PITCH_RANGE = (-5.0, 30.0)
DISTANCE_RANGE = (1.0, 1.35)
BACKGROUND_RANGE = (0.02, 0.3)
LENS_MM, SENSOR_MM = 50.0, 36.0
# A three-quarter view from slightly above, for pictures in the docs.
FIXED_VIEW_YAW, FIXED_VIEW_PITCH = -25.0, 12.0


@dataclass(frozen=True)
class CameraView:
    """Where the camera is, relative to the body (degrees; see the module docstring)."""

    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    distance_scale: float = 1.15  # × the distance at which the bounding sphere fills the frame
    background: float = 0.15  # grey level of the background (linear)


def sample_views(
    rng: np.random.Generator,
    n: int,
    *,
    yaw_range: tuple[float, float] = YAW_RANGE,
    pitch_range: tuple[float, float] = PITCH_RANGE,
    distance_range: tuple[float, float] = DISTANCE_RANGE,
    background_range: tuple[float, float] = BACKGROUND_RANGE,
) -> list[CameraView]:
    """`n` random views, each drawn uniformly in the given ranges (deterministic given rng)."""
    values = rng.uniform(
        [yaw_range[0], pitch_range[0], distance_range[0], background_range[0]],
        [yaw_range[1], pitch_range[1], distance_range[1], background_range[1]],
        size=(n, 4),
    )
    return [CameraView(*map(float, row)) for row in values]


def fixed_view() -> CameraView:
    return CameraView(FIXED_VIEW_YAW, FIXED_VIEW_PITCH, 1.1, 0.2)


def camera_relative(poses, yaw_deg) -> np.ndarray:
    """(..., 24, 3) poses seen from cameras at yaw `yaw_deg` (broadcast) -> the image targets:
    the global orientation turned by −yaw about +Y (R_y(−yaw) · G₀); the other joints as they
    are. `camera_relative(p, 0)` is p."""
    poses = np.array(poses, dtype=np.float64)
    yaw = np.radians(np.asarray(yaw_deg, dtype=np.float64))
    axis = np.zeros((*np.shape(yaw), 3))
    axis[..., 1] = -yaw
    turned = axis_angle_to_matrix(axis) @ axis_angle_to_matrix(poses[..., 0, :])
    poses[..., 0, :] = matrix_to_axis_angle(turned)
    return poses


# --- Blender -----------------------------------------------------------------------------------


def _import_addon():
    """The add-on's armature and posing code."""
    from inference_service.addon_import import ensure_addon_importable

    ensure_addon_importable()
    from blender_addon.blender.armature import create_smpl_armature
    from blender_addon.blender.posing import apply_pose

    return create_smpl_armature, apply_pose


class MannequinRenderer:
    """A fresh empty Blender scene holding the add-on's mannequin, a camera and Workbench
    settings; `render(pose, view, path)` writes one PNG. Resets Blender's scene (factory
    settings) when created: use it in a process of its own or in tests."""

    def __init__(self, size: int = DEFAULT_SIZE):
        import bpy

        create_smpl_armature, self._apply_pose = _import_addon()
        self.bpy = bpy
        bpy.ops.wm.read_factory_settings(use_empty=True)
        scene = bpy.context.scene
        self.scene = scene
        self.armature = create_smpl_armature(bpy.context, name="SMPL")
        self.mesh = next(c for c in self.armature.children if c.type == "MESH")
        camera_data = bpy.data.cameras.new("camera")
        camera_data.lens = LENS_MM
        camera_data.sensor_width = SENSOR_MM
        camera_data.sensor_fit = "AUTO"
        self.camera = bpy.data.objects.new("camera", camera_data)
        scene.collection.objects.link(self.camera)
        scene.camera = self.camera
        self.half_fov = camera_data.angle / 2.0
        world = bpy.data.worlds.new("background")
        scene.world = world
        render = scene.render
        render.engine = "BLENDER_WORKBENCH"
        render.resolution_x = render.resolution_y = int(size)
        render.resolution_percentage = 100
        render.film_transparent = False
        settings = render.image_settings
        settings.file_format = "PNG"
        settings.color_mode = "RGB"
        settings.color_depth = "8"
        self.size = int(size)

    def pose(self, axis_angle) -> None:
        from shared_protocol.pose import Pose

        self._apply_pose(self.armature, Pose(np.asarray(axis_angle)), use_translation=False)

    def _mesh_points(self) -> np.ndarray:
        depsgraph = self.bpy.context.evaluated_depsgraph_get()
        evaluated = self.mesh.evaluated_get(depsgraph)
        vertices = evaluated.data.vertices
        points = np.empty(len(vertices) * 3)
        vertices.foreach_get("co", points)
        matrix = np.array(self.mesh.matrix_world)
        return points.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]

    def place_camera(self, view: CameraView) -> float:
        """Aim the camera at the posed mannequin from `view`; returns the distance (m)."""
        from mathutils import Vector

        points = self._mesh_points()
        centre = (points.min(axis=0) + points.max(axis=0)) / 2.0
        radius = float(np.linalg.norm(points - centre, axis=1).max())
        distance = radius / math.tan(self.half_fov) * view.distance_scale
        yaw, pitch = math.radians(view.yaw_deg), math.radians(view.pitch_deg)
        # The direction in the SMPL frame (sin yaw cos pitch, sin pitch, cos yaw cos pitch),
        # mapped to Blender with (x, y, z) -> (x, -z, y).
        direction = np.array(
            [
                math.sin(yaw) * math.cos(pitch),
                -math.cos(yaw) * math.cos(pitch),
                math.sin(pitch),
            ]
        )
        self.camera.location = Vector(centre + distance * direction)
        look = Vector(centre) - self.camera.location
        self.camera.rotation_euler = look.to_track_quat("-Z", "Y").to_euler()
        return distance

    def render(self, axis_angle, view: CameraView, path: str | os.PathLike) -> float:
        """Pose the mannequin, place the camera, write a PNG at `path`; returns the distance."""
        self.pose(axis_angle)
        distance = self.place_camera(view)
        grey = float(view.background)
        self.scene.world.color = (grey, grey, grey)
        self.scene.render.filepath = os.fspath(path)
        with quiet_blender_output():
            self.bpy.ops.render.render(write_still=True)
        return distance


def render_pairs(
    poses,
    out: str | os.PathLike,
    *,
    views: Sequence[CameraView] | None = None,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    actions: Sequence[str] | None = None,
    ids: Sequence[int] | None = None,
    split: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    renderer: MannequinRenderer | None = None,
    progress: bool = False,
) -> Path:
    """Render each (24, 3) pose of `poses` from its view (default: `sample_views` from `seed`)
    into OUT/images/ and write OUT/pairs.npz (layout in the module docstring); returns the .npz.

    `names`: file names without extension (default 000000, 000001, ...)."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 24, 3)
    n = len(poses)
    if views is None:
        views = sample_views(np.random.default_rng(seed), n)
    views = list(views)
    if len(views) != n:
        raise ValueError(f"views: {len(views)} for {n} poses")
    names = [f"{i:06d}" for i in range(n)] if names is None else list(names)
    if len(names) != n:
        raise ValueError(f"names: {len(names)} for {n} poses")
    # Each image a file of its own in images/: a repeated name would pair one picture with two
    # poses. Compared in lower case, as macOS's and Windows' file systems compare names.
    seen = set()
    for name in names:
        twice = name.lower() in seen
        if twice or not name or name in (".", "..") or "/" in name or os.sep in name:
            problem = "is given twice" if twice else "is no plain file name"
            raise ValueError(f"names: {name!r} {problem}; each pose needs an image of its own")
        seen.add(name.lower())
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    renderer = renderer or MannequinRenderer(size)
    files, distances = [], []
    start = time.perf_counter()
    for i, (pose, view) in enumerate(zip(poses, views, strict=True)):
        name = f"images/{names[i]}.png"
        distances.append(renderer.render(pose, view, out / name))
        files.append(name)
        if progress and ((i + 1) % 500 == 0 or i + 1 == n):
            rate = (time.perf_counter() - start) / (i + 1)
            print(f"rendered {i + 1}/{n} ({rate * 1000:.0f} ms a frame)", file=sys.stderr)
    yaw = np.array([v.yaw_deg for v in views])
    arrays = {
        "format": np.array(FORMAT),
        "poses": camera_relative(poses, yaw).reshape(n, 72),
        "world_poses": poses.reshape(n, 72),
        "images": np.array(files, dtype=str).reshape(n),
        "camera_yaw_deg": yaw,
        "camera_pitch_deg": np.array([v.pitch_deg for v in views]),
        "camera_distance": np.array(distances),
        "background": np.array([v.background for v in views]),
        "actions": np.array(list(actions) if actions is not None else [""] * n, dtype=str),
        "ids": np.array(list(ids) if ids is not None else range(n), dtype=np.int64),
        "split": np.array(list(split) if split is not None else [""] * n, dtype=str),
        "size": np.array(int(renderer.size)),
    }
    path = out / "pairs.npz"
    with open(path, "wb") as stream:
        write_npz(stream, arrays)
    return path


@contextlib.contextmanager
def quiet_blender_output():
    """While Blender renders (it writes from C, to the file descriptors): its two lines per
    still on 1 go to /dev/null, and of what it writes on 2, the EGL errors a machine without a
    display gives at the first render (three lines; Workbench renders all the same) are
    dropped and the rest passed on afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        try:
            with contextlib.ExitStack() as restore:  # undone in reverse, whatever fails
                for fd, target in ((1, os.devnull), (2, None)):
                    saved = os.dup(fd)
                    restore.callback(os.close, saved)
                    restore.callback(os.dup2, saved, fd)
                    restore.callback(sys.stdout.flush if fd == 1 else sys.stderr.flush)
                    if target is None:
                        os.dup2(captured.fileno(), fd)
                    else:
                        null = os.open(target, os.O_WRONLY)
                        restore.callback(os.close, null)
                        os.dup2(null, fd)
                yield
        finally:
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not line.startswith("EGL Error"):
                    print(line, file=sys.stderr)


def read_pairs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a pairs.npz written here (poses as (N, 24, 3))."""
    with np.load(Path(path), allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    for key in ("poses", "world_poses"):
        if key in arrays:
            arrays[key] = arrays[key].reshape(-1, 24, 3)
    return arrays


def corpus_selection(corpus_path, split: str, count: int | None):
    """(poses, actions, ids) of the first `count` records of `split` of a corpus file."""
    from inference_service.training.corpus import load_corpus

    records = [(i, r) for i, r in enumerate(load_corpus(corpus_path)) if r.split == split]
    if count is not None:
        records = records[:count]
    if not records:
        raise ValueError(f"{corpus_path}: no records in split {split!r}")
    poses = np.stack([r.pose for _, r in records])
    return poses, [r.action or "" for _, r in records], [i for i, _ in records]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference_service.training.render_pairs",
        description="Render image-pose pairs of the add-on's mannequin with Workbench.",
    )
    parser.add_argument("out", type=user_path, help="output directory (pairs.npz, images/)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", type=user_path, help="a synthetic-corpus .npz: its poses")
    source.add_argument(
        "--poses",
        type=user_path,
        help="an AMASS-layout .npz; optional arrays: names (N,) file names, views (N, 4) yaw, "
        "pitch, distance scale, background of each camera",
    )
    parser.add_argument(
        "--z-up",
        action=argparse.BooleanOptionalAction,
        help="--poses stand along +Z, as AMASS's files and the motions chatpose exports: turn "
        "them upright (--no-z-up: they are meant so); by default as the file's up_axis says, "
        "and a file that does not say, mostly standing along +Z, is refused",
    )
    parser.add_argument("--split", default="train", help="corpus split (default train)")
    parser.add_argument("--count", type=positive_int, help="at most this many records of the split")
    parser.add_argument("--seed", type=int, default=0, help="seeds the cameras")
    parser.add_argument(
        "--size", type=positive_int, default=DEFAULT_SIZE, help="image side in pixels"
    )
    parser.add_argument(
        "--fixed-view", action="store_true", help="one three-quarter view for every pose (docs)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.corpus is not None:
            poses, actions, ids = corpus_selection(args.corpus, args.split, args.count)
            names, split = None, [args.split] * len(poses)
        else:
            from inference_service.training.datasets import (
                _in_body_frame,
                _read_npz,
                read_pose_array,
            )

            arrays = _read_npz(args.poses)
            poses = _in_body_frame(
                read_pose_array(args.poses, arrays),
                args.z_up,
                args.poses,
                arrays,
                options=("--z-up", "--no-z-up"),
            )
            if args.count is not None:
                poses = poses[: args.count]
            if "names" in arrays and arrays["names"].ndim != 1:
                raise ValueError(f"{args.poses}: names: expected one name per pose")
            names = [str(x) for x in arrays["names"][: len(poses)]] if "names" in arrays else None
            actions, ids, split = None, None, None
        views = None
        if args.poses is not None and "views" in arrays:
            width = len(fields(CameraView))
            if arrays["views"].ndim != 2 or arrays["views"].shape[1] != width:
                raise ValueError(
                    f"{args.poses}: views: expected shape (N, {width}), got {arrays['views'].shape}"
                )
            views = [CameraView(*map(float, row)) for row in arrays["views"][: len(poses)]]
        if args.fixed_view:
            views = [fixed_view()] * len(poses)
        path = render_pairs(
            poses,
            args.out,
            views=views,
            seed=args.seed,
            size=args.size,
            actions=actions,
            ids=ids,
            split=split,
            names=names,
            progress=True,
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {path} ({len(poses)} pairs, {time.perf_counter() - start:.1f} s)", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
