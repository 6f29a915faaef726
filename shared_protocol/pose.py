"""Pose values: one SMPL body pose, and a sequence of them as AMASS-layout `.npz`.

Layout `smpl24_axis_angle`: 24 axis-angle vectors (radians) in SMPL joint order
(`skeleton.JOINT_NAMES`). Index 0 is the global orientation in the SMPL body frame
(+Y up, +Z the direction the body faces, +X the body's own left); 1..23 are each
joint's rotation relative to its parent. The optional translation is the pelvis
offset in metres, same frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .arrays import NPZ_READ_ERRORS, finite_array, npz_member, open_npz, write_npz
from .rotations import (
    axis_angle_to_matrix,
    axis_angle_to_quaternion,
    matrix_to_axis_angle,
    quaternion_to_axis_angle,
    slerp,
)
from .safe_files import write_atomically
from .skeleton import DEFAULT_REST_JOINTS, NUM_JOINTS, SMPL_TO_BLENDER

POSE_LAYOUT = "smpl24_axis_angle"
GENDERS = ("neutral", "male", "female")
DEFAULT_FPS = 30.0
# AMASS stores SMPL-H poses as 52 joints (156 numbers) and SMPL-X poses as 55 (165): the first
# 22 are the SMPL body, then fingers (SMPL-H) or the jaw and eyes (SMPL-X). Their body joints are
# read, and SMPL's two hand joints left at rest: SMPL-H's joints 22 and 23 are the left index
# finger's, not SMPL's hands (`smpl_poses`; the add-on and the training readers alike).
_AMASS_POSE_WIDTHS = (72, 156, 165)
_BODY_JOINTS = 22
# What the reader takes from an AMASS file; others (SMPL-X's `markers_latent_vids`, a pickled
# object array) are never read, so they cannot make the file unreadable.
_MOTION_KEYS = (
    "poses",
    "trans",
    "mocap_framerate",
    "mocap_frame_rate",
    "gender",
    "betas",
    "labels",
    "smpl_hands",
    "trans_offset",
    "up_axis",
)
# What a written file holds for SMPL-H readers (AMASS's own tools, HumanML3D): 156 pose numbers
# (52 joints: the body's 22, then 30 finger joints, at rest here), 16 betas, 8 DMPLs (zero).
# SMPL's two hand joints have no place there; they go in `smpl_hands`, which this reader takes.
_SMPLH_WIDTH = 156
_SMPLH_BETAS = 16
_SMPL_BETAS = 10
_DMPLS = 8
# AMASS motion files are Z-up, the global orientation and the translation included; Pose and
# Motion hold the SMPL body frame (+Y up). Files turn between the two at load and save (the
# same turn as SMPL to Blender: (x, y, z) -> (x, -z, y)), so an AMASS file stands upright.
Z_UP_FROM_SMPL = SMPL_TO_BLENDER
# HMR's camera frame (+Y down, +Z into the scene) to the upright one (+Y up, +Z towards the
# camera): a half turn about X. An upright body facing the camera is that half turn in the
# first, and no rotation in the second. The ChatPose release's poses are in the first.
CAMERA_TO_UPRIGHT = np.diag([1.0, -1.0, -1.0])


def camera_to_upright(global_orientation: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle global orientations in the camera's frame, in the upright one (the
    half turn is its own inverse: also the other way)."""
    return matrix_to_axis_angle(CAMERA_TO_UPRIGHT @ axis_angle_to_matrix(global_orientation))


# How far a body's soles lie below its lowest joint at rest: SMPL's feet joints sit on the
# balls of the feet, and the add-on's mannequin is built around them this thick.
SOLE_DEPTH = 0.04


def amass_trans_offset(rest_joints=None) -> np.ndarray:
    """What to add to a translation turned Z-up (`Z_UP_FROM_SMPL @ t`) to make it AMASS's
    `trans`. This project's translation is the pelvis's offset from its rest position, and the
    floor lies under the rest body's soles (`SOLE_DEPTH` below its lowest joint); SMPL puts the
    pelvis at its rest joint J0, *unturned*, plus `trans`, in a world whose floor, where the
    body's soles stand, is z = 0. So trans = Z·(J0 + t) − (0, 0, sole) − J0. `rest_joints`
    (24, 3): the body's, in the SMPL frame (default: the built-in skeleton's, whose J0 is the
    origin)."""
    joints = DEFAULT_REST_JOINTS if rest_joints is None else np.asarray(rest_joints, float)
    pelvis = joints[0]
    sole = joints[:, 1].min() - SOLE_DEPTH
    return Z_UP_FROM_SMPL @ pelvis - np.array([0.0, 0.0, sole]) - pelvis


# Bounds past which a value is malformed rather than unusual: a rotation vector's length is an
# angle (1,000 rad is 159 turns), a translation is in metres, and a frame rate must fit a
# Blender scene. They keep the rotation maths and Blender's float32 away from overflow.
MAX_ANGLE = 1_000.0
MAX_TRANSLATION = 10_000.0
FPS_RANGE = (0.001, 1_000.0)


def _finite_array(
    value: object, name: str, shape: tuple[int, ...], flat_ok: bool = False
) -> np.ndarray:
    """A read-only float64 copy of `value` with exactly `shape`, finite.

    With `flat_ok`, a flat vector of the right size is reshaped (AMASS and smplx store poses so).
    """
    array = np.array(finite_array(value, name, ()), dtype=np.float64)
    if flat_ok and array.shape == (math.prod(shape),):
        array = array.reshape(shape)
    if array.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {array.shape}")
    array.setflags(write=False)
    return array


def _angles(axis_angle: np.ndarray) -> np.ndarray:
    """Axis-angle vectors whose lengths (angles) stay within MAX_ANGLE."""
    largest = float(np.abs(axis_angle).max(initial=0.0))
    if largest <= MAX_ANGLE:  # each length is then at most √3 × MAX_ANGLE: no overflow
        largest = float(np.linalg.norm(axis_angle, axis=-1).max(initial=0.0))
    if largest > MAX_ANGLE:
        raise ValueError(f"axis_angle: rotations of up to {MAX_ANGLE:g} rad, got {largest:g}")
    return axis_angle


def _metres(translation: np.ndarray) -> np.ndarray:
    if translation.size and np.abs(translation).max() > MAX_TRANSLATION:
        largest = np.abs(translation).max()
        raise ValueError(
            f"translation: metres up to {MAX_TRANSLATION:g} on each axis, got {largest:g}"
        )
    return translation


def _optional_label(label: object, name: str) -> str | None:
    if label is None:
        return label
    if not isinstance(label, str):
        raise ValueError(f"{name}: expected a string or None, got {type(label).__name__}")
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no file or reply could hold it
        raise ValueError(f"{name}: not valid Unicode text") from None
    return label


@dataclass(frozen=True, eq=False)
class Pose:
    """One SMPL body pose. Construction validates and freezes the arrays."""

    axis_angle: np.ndarray
    translation: np.ndarray | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        axis_angle = _finite_array(self.axis_angle, "axis_angle", (NUM_JOINTS, 3), flat_ok=True)
        object.__setattr__(self, "axis_angle", _angles(axis_angle))
        if self.translation is not None:
            translation = _finite_array(self.translation, "translation", (3,))
            object.__setattr__(self, "translation", _metres(translation))
        _optional_label(self.label, "label")

    @property
    def global_orient(self) -> np.ndarray:
        """The root rotation (3,), as smplx's `global_orient`."""
        return self.axis_angle[0]

    @property
    def body_pose(self) -> np.ndarray:
        """The 23 joint rotations flattened (69,), as smplx's `body_pose`."""
        return self.axis_angle[1:].reshape(-1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pose):
            return NotImplemented
        same_translation = (self.translation is None and other.translation is None) or (
            self.translation is not None
            and other.translation is not None
            and np.array_equal(self.translation, other.translation)
        )
        return (
            np.array_equal(self.axis_angle, other.axis_angle)
            and same_translation
            and self.label == other.label
        )

    __hash__ = None  # mutable-looking arrays inside; equality is by value

    def to_dict(self) -> dict:
        """A JSON-ready dict; `from_dict` reads it back exactly."""
        return {
            "layout": POSE_LAYOUT,
            "axis_angle": self.axis_angle.tolist(),
            "translation": None if self.translation is None else self.translation.tolist(),
            "label": self.label,
        }

    @classmethod
    def from_dict(cls, data: object) -> Pose:
        """Reads `to_dict`'s output; raises ValueError naming the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"pose: expected an object, got {type(data).__name__}")
        if data.get("layout") != POSE_LAYOUT:
            raise ValueError(f"layout: expected {POSE_LAYOUT!r}, got {data.get('layout')!r}")
        if "axis_angle" not in data:
            raise ValueError("axis_angle: missing")
        for key in ("axis_angle", "translation"):
            _reject_non_numbers(data.get(key), key)
        return cls(
            axis_angle=data["axis_angle"],
            translation=data.get("translation"),
            label=_optional_label(data.get("label"), "label"),
        )


def _reject_non_numbers(value: object, name: str) -> None:
    """JSON lists must hold real numbers: numpy would quietly turn True or "1" into 1.0."""
    if value is None:
        return
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, int | float):
            raise ValueError(f"{name}: expected numbers, found {type(item).__name__}")


@dataclass(frozen=True, eq=False)
class Motion:
    """A sequence of poses at a frame rate, as an AMASS-layout `.npz` holds it.

    Read: `poses` (N, 72), AMASS SMPL-H (N, 156) or SMPL-X (N, 165), `trans` (N, 3),
    `mocap_framerate` (or `mocap_frame_rate`), `gender` and `betas`. Written as AMASS's SMPL-H
    files: `poses` (N, 156) with the fingers at rest, `betas` (16,) and `dmpls` (N, 8), plus
    `smpl_hands` (N, 6), SMPL's hand joints, which SMPL-H has no place for; per-frame labels,
    when present, go in an extra `labels` array. AMASS readers ignore both.
    A Motion is in the SMPL body frame, as Pose; its files are Z-up as AMASS's unless asked
    otherwise (`save_npz`, `load_npz`).
    """

    axis_angle: np.ndarray  # (N, 24, 3)
    translation: np.ndarray  # (N, 3)
    fps: float = DEFAULT_FPS
    gender: str = "neutral"
    betas: np.ndarray = field(default_factory=lambda: np.zeros(10))
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        frames = np.shape(self.axis_angle)[0] if np.ndim(self.axis_angle) == 3 else -1
        if frames < 0:
            raise ValueError(
                f"axis_angle: expected shape (N, 24, 3), got {np.shape(self.axis_angle)}"
            )
        axis_angle = _finite_array(self.axis_angle, "axis_angle", (frames, NUM_JOINTS, 3))
        object.__setattr__(self, "axis_angle", _angles(axis_angle))
        translation = _finite_array(self.translation, "translation", (frames, 3))
        object.__setattr__(self, "translation", _metres(translation))
        if isinstance(self.fps, bool) or not isinstance(self.fps, int | float | np.number):
            raise ValueError(f"fps: expected a number, got {type(self.fps).__name__}")
        low, high = FPS_RANGE
        if not (math.isfinite(self.fps) and low <= self.fps <= high):
            raise ValueError(f"fps: expected a frame rate from {low:g} to {high:g}, got {self.fps}")
        object.__setattr__(self, "fps", float(self.fps))
        if self.gender not in GENDERS:
            raise ValueError(f"gender: expected one of {GENDERS}, got {self.gender!r}")
        if np.ndim(self.betas) != 1:
            raise ValueError(
                f"betas: expected one row of shape coefficients, got shape {np.shape(self.betas)}"
            )
        betas = _finite_array(self.betas, "betas", np.shape(self.betas))
        object.__setattr__(self, "betas", betas)
        if self.labels is not None:
            labels = tuple(self.labels)
            if len(labels) != frames or not all(isinstance(x, str) for x in labels):
                raise ValueError(f"labels: expected {frames} strings, one per frame")
            object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return self.axis_angle.shape[0]

    @classmethod
    def from_poses(
        cls,
        poses: Iterable[Pose],
        fps: float = DEFAULT_FPS,
        gender: str = "neutral",
        betas: Sequence[float] | np.ndarray | None = None,
    ) -> Motion:
        """Stacks poses into frames; a pose without translation stands at the origin."""
        poses = list(poses)
        if not all(isinstance(p, Pose) for p in poses):
            raise ValueError("poses: expected Pose values")
        labels = [p.label or "" for p in poses]
        return cls(
            axis_angle=np.stack([p.axis_angle for p in poses]) if poses else np.zeros((0, 24, 3)),
            translation=np.array(
                [np.zeros(3) if p.translation is None else p.translation for p in poses]
            ).reshape(len(poses), 3),
            fps=fps,
            gender=gender,
            betas=np.zeros(10) if betas is None else betas,
            labels=tuple(labels) if any(labels) else None,
        )

    def resampled_length(self, fps: float) -> int:
        """How many frames `resampled(fps)` has: those at or before the last frame's time."""
        if len(self) < 2:
            return len(self)
        return math.floor((len(self) - 1) * fps / self.fps + 1e-9) + 1

    def resampled(self, fps: float) -> Motion:
        """The motion at another frame rate over the same time, starting at its first frame:
        each new frame's joint rotations interpolated (slerp) and its translation too
        (linearly) between the two frames around its time; its label the nearest frame's. A
        120 fps capture keyed at 24 fps plays at its own speed."""
        if len(self) < 2 or fps == self.fps:
            return dataclasses.replace(self, fps=fps)
        times = np.arange(self.resampled_length(fps)) * (self.fps / fps)  # in frames of self
        before = np.minimum(times.astype(int), len(self) - 2)
        fraction = times - before  # in [0, 1]
        rotations = axis_angle_to_quaternion(self.axis_angle)
        between = slerp(rotations[before], rotations[before + 1], fraction[:, None])
        t = fraction[:, None]
        translation = (1 - t) * self.translation[before] + t * self.translation[before + 1]
        nearest = np.rint(times).astype(int)
        labels = None if self.labels is None else tuple(self.labels[k] for k in nearest)
        return dataclasses.replace(
            self,
            axis_angle=quaternion_to_axis_angle(between),
            translation=translation,
            fps=fps,
            labels=labels,
        )

    def poses(self) -> list[Pose]:
        labels = self.labels or ("",) * len(self)
        return [
            Pose(aa, translation, label or None)
            for aa, translation, label in zip(
                self.axis_angle, self.translation, labels, strict=True
            )
        ]

    def save_npz(self, path: str | os.PathLike, *, z_up: bool = True, rest_joints=None) -> None:
        """Writes an AMASS-layout file: Z-up as AMASS's own, `trans` as SMPL reads it for the
        body of `rest_joints` (`amass_trans_offset`); `z_up=False`: in the SMPL body frame
        (+Y up) with this project's translations, as PoseScript-style tools keep poses."""
        motion = self
        offset = amass_trans_offset(rest_joints)
        if z_up:
            motion = self.turned(Z_UP_FROM_SMPL)
            motion = dataclasses.replace(motion, translation=motion.translation + offset)
        frames = len(self)
        poses = np.zeros((frames, _SMPLH_WIDTH))
        poses[:, : _BODY_JOINTS * 3] = motion.axis_angle[:, :_BODY_JOINTS].reshape(frames, 66)
        betas = np.zeros(max(_SMPLH_BETAS, len(self.betas)))
        betas[: len(self.betas)] = self.betas
        arrays = {
            "poses": poses,
            "smpl_hands": motion.axis_angle[:, _BODY_JOINTS:].reshape(frames, 6),
            "trans": motion.translation,
            "mocap_framerate": np.array(self.fps),
            "gender": np.array(self.gender),
            "betas": betas,
            "dmpls": np.zeros((frames, _DMPLS)),
        }
        if self.labels is not None:
            arrays["labels"] = np.array(self.labels, dtype=str)
        if z_up:  # for load_npz: the body it was written for, whatever body reads it
            arrays["trans_offset"] = offset
        arrays["up_axis"] = np.array("Z" if z_up else "Y")  # read so, whatever load_npz is told
        write_atomically(path, lambda stream: write_npz(stream, arrays))

    def turned(self, turn: np.ndarray) -> Motion:
        """This motion in a frame turned by the rotation matrix `turn`: its global orientations
        and translations (the body's own joints are relative to their parents)."""
        axis_angle = self.axis_angle.copy()
        axis_angle[:, 0] = matrix_to_axis_angle(turn @ axis_angle_to_matrix(axis_angle[:, 0]))
        return dataclasses.replace(
            self, axis_angle=axis_angle, translation=self.translation @ turn.T
        )

    @classmethod
    def load_npz(cls, path: str | os.PathLike, *, z_up: bool = True, rest_joints=None) -> Motion:
        """Reads an AMASS-layout file, Z-up as AMASS's own (the inverse of `save_npz`;
        `z_up=False`: a file in the SMPL body frame; a file written here is read in the frame
        it says, `written_z_up`); raises ValueError naming the file and the bad entry. `trans`
        is read for the body of `rest_joints` (`amass_trans_offset`), or for the one a file
        written here names (its `trans_offset`): its J0, unturned in `trans`, would otherwise
        move the body across the floor by the difference between the two bodies' pelvises
        (22 cm between the built-in skeleton's and SMPL's). A file without `trans` says
        nothing of where the body is: its pelvis stays at rest, as in the body frame (taking
        its `trans` as zero in AMASS's would sink the body into the floor)."""
        with _read_errors_named(path):
            with open_npz(path) as data:
                arrays = {k: npz_member(data, k) for k in _MOTION_KEYS if k in data}
                motion = cls._from_arrays(arrays)
            if not says_z_up(arrays, z_up):
                return motion
            if "trans" not in arrays:
                return motion.turned(Z_UP_FROM_SMPL.T)
            written_for = arrays.get("trans_offset")
            if written_for is None:
                written_for = amass_trans_offset(rest_joints)
            offset = motion.translation - _finite_array(written_for, "trans_offset", (3,))
            return dataclasses.replace(motion, translation=offset).turned(Z_UP_FROM_SMPL.T)

    @classmethod
    def _from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Motion:
        if "poses" not in arrays:
            raise ValueError("poses: missing")
        poses = arrays["poses"]
        if poses.ndim != 2 or poses.shape[1] not in _AMASS_POSE_WIDTHS:
            raise ValueError(
                "poses: expected shape (N, 72), AMASS SMPL-H (N, 156) or SMPL-X (N, 165), "
                f"got {poses.shape}"
            )
        frames = poses.shape[0]
        poses = smpl_poses(poses, arrays)
        # AMASS's SMPL-X files spell it mocap_frame_rate.
        fps_key = next((k for k in ("mocap_framerate", "mocap_frame_rate") if k in arrays), None)
        if fps_key is None:
            raise ValueError("mocap_framerate: missing")
        if arrays[fps_key].size != 1 or arrays[fps_key].dtype.kind not in "iuf":
            raise ValueError(f"{fps_key}: expected one number")
        try:
            return cls(
                axis_angle=poses[:, :72].reshape(frames, NUM_JOINTS, 3),
                translation=arrays.get("trans", np.zeros((frames, 3))),
                fps=float(arrays[fps_key].item()),
                gender=_text(arrays.get("gender", np.array("neutral")), "gender"),
                betas=_betas(
                    arrays.get("betas", np.zeros(10)), written_here="smpl_hands" in arrays
                ),
                labels=_labels(arrays["labels"], frames) if "labels" in arrays else None,
            )
        except ValueError as exc:  # named by the file's keys, not the Motion's fields
            field_name, _, why = str(exc).partition(":")
            key = {"axis_angle": "poses", "translation": "trans", "fps": fps_key}
            raise ValueError(f"{key.get(field_name, field_name)}:{why}") from None


def smpl_poses(poses: np.ndarray, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """An AMASS-layout `poses` array, (N, 72), SMPL-H's (N, 156) or SMPL-X's (N, 165), as
    SMPL's (N, 72). The wider ones hold the body's 22 joints, then jaw, eyes or fingers, which
    SMPL has not; SMPL's two hand joints come from the `smpl_hands` of a file written here,
    else they are at rest. (The ChatPose release takes the first 72 numbers, so two finger
    joints as SMPL's hands.)"""
    if poses.shape[1] == 72:
        return poses
    hands = written_hands(arrays, len(poses))
    if hands is None:
        hands = np.zeros((len(poses), 72 - _BODY_JOINTS * 3))
    return np.concatenate([poses[:, : _BODY_JOINTS * 3], hands], axis=1)


def written_hands(arrays: Mapping[str, np.ndarray], frames: int) -> np.ndarray | None:
    """SMPL's two hand joints, (frames, 6), from the `smpl_hands` of a file this project wrote;
    None when the file has none (an AMASS file's hands are its fingers, not SMPL's). A
    ValueError for one of another shape."""
    if "smpl_hands" not in arrays:
        return None
    hands = np.asarray(arrays["smpl_hands"])
    if hands.shape == (frames, 2, 3):
        hands = hands.reshape(frames, 6)
    return _finite_array(hands, "smpl_hands", (frames, 6))


def _betas(value: np.ndarray, written_here: bool) -> np.ndarray:
    """A file's betas as one row (some tools save the (1, k) row smplx takes); a file written
    here padded SMPL's 10 to SMPL-H's 16 with zeros, which go again."""
    value = value.reshape(-1) if value.ndim == 2 and value.shape[0] == 1 else value
    if written_here and value.ndim == 1 and len(value) > _SMPL_BETAS:
        nonzero = np.flatnonzero(value)
        value = value[: max(_SMPL_BETAS, nonzero[-1] + 1 if nonzero.size else 0)]
    return value


def _labels(value: np.ndarray, frames: int) -> tuple[str, ...]:
    if value.shape != (frames,):  # before a tuple of millions of strings is made of it
        raise ValueError(
            f"labels: expected {frames} strings, one per frame, got shape {value.shape}"
        )
    return tuple(_text(item, "labels") for item in value)


def written_z_up(path: str | os.PathLike) -> bool | None:
    """Whether a motion file written here is Z-up (None: it does not say, as a file from
    elsewhere does not); ValueError when it cannot be read."""
    with _read_errors_named(path), open_npz(path) as data:
        arrays = {k: npz_member(data, k) for k in ("up_axis", "trans_offset") if k in data}
        return says_z_up(arrays, None)


@contextlib.contextmanager
def _read_errors_named(path: str | os.PathLike) -> Iterator[None]:
    """A motion file's read errors as ValueError naming the file (FileNotFoundError as is)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None
    except NPZ_READ_ERRORS as exc:
        raise ValueError(f"{os.fspath(path)}: not a readable .npz file ({exc})") from None


def says_z_up(arrays: Mapping[str, np.ndarray], otherwise: bool | None) -> bool | None:
    """A file's frame as it says (`up_axis`; written before that, a Z-up one alone holds
    `trans_offset`), else ``otherwise``: exported with Z-up off and imported with it on, a
    motion lay on its back."""
    if "up_axis" in arrays:
        axis = _text(arrays["up_axis"], "up_axis")
        if axis not in ("Y", "Z"):
            raise ValueError(f"up_axis: expected 'Y' or 'Z', got {axis!r}")
        return axis == "Z"
    return True if "trans_offset" in arrays else otherwise


def _text(value: np.ndarray, name: str) -> str:
    """AMASS writes strings as numpy unicode or bytes scalars."""
    if value.dtype.kind in "US" and value.size != 1:
        raise ValueError(f"{name}: expected one string, got {value.size} (shape {value.shape})")
    if value.dtype.kind == "U":
        return str(value.item())
    if value.dtype.kind == "S":
        return value.item().decode("utf-8", errors="replace")
    raise ValueError(f"{name}: expected a string, got an array of {value.dtype}")
