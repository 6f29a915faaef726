"""Training examples and the readers for the data formats users have. numpy and Pillow (no torch).

One record type, `Example`, whatever the source:

- `kind`: "text_to_pose", "image_to_pose" or "chat" (decides the batch mix, see sampling.py);
- `question`: the user message (no image marker: images go in `images`, and the prompt builder
  puts one marker per image at the start of the first user message, as LLaVA does);
- `answer`: the assistant's answer; a pose is written as `POSE_MARKER` ("<POSE>"), replaced by
  the checkpoint's own pose token when the text is encoded;
- `images`: PNG/JPEG bytes, or an `ImageFile` (the readers': a file checked to decode when the
  record is read, and read again when a batch needs it, maybe with a box to crop to);
  `load_image` decodes both as a batch needs them, `image_bytes` gives their bytes;
- `poses`: the targets, one (24, 3) axis-angle per POSE_MARKER in the answers (earlier turns of
  `history` first), or empty when the example has no pose supervision (chat);
- `history`: earlier exchanges of a multi-turn conversation (`prompts.Exchange`);
- `source`: where the record came from ("file#record"), for error messages.

Readers (each returns a list of Example and raises `DatasetError` at load time, naming the file
and the record, for anything malformed or inconsistent):

- `read_posescript(captions.json, poses.npz)`: PoseScript-style captions joined to poses;
- `read_image_pose_pairs(poses.npz, images=DIR)`: images with one pose each;
- `read_llava_conversations(conversations.json, poses=poses.npz, images=DIR, skip_missing=,
  z_up=)`: LLaVA's format;
- `read_corpus(corpus.npz, split="train")`: the project's synthetic corpus
  (`inference_service/training/corpus.py`, `save_corpus`);
- `examples_from_caption_pose_pairs(pairs)`: (caption, pose) pairs from Python.

`load_data(format, path, options)` dispatches on the format names used by `--data` on the
command line. The file layouts are documented in docs/training.md.

Question/answer phrasing: with `phrasing="mixed"` (the default) half the pose examples use the
service's phrasing (`prompts.pose_exchange`, what the service asks at inference, in the base
checkpoint's `prompt_wording`) and half one of a few alternatives (`TEXT_PHRASINGS`,
`IMAGE_PHRASINGS`), chosen by a seeded generator, so a reader gives the same examples for the
same seed. `phrasing="release"` uses only the service's (the name is older than the wordings).
`phrasing="chat"` asks half the examples as a chat turn reads them: the description alone (an
image alone), as a user types it, with the service's answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from inference_service.errors import BadImageError
from inference_service.images import CropBox, decode_image
from inference_service.prompts import (
    IMAGE_ANSWER,
    IMAGE_QUESTION,
    POSE_MARKER,
    TEXT_ANSWER,
    TEXT_QUESTION,
    WORDINGS,
    Exchange,
    pose_exchange,
)
from shared_protocol.pose import camera_to_upright, says_z_up, smpl_poses
from shared_protocol.protocol import RepeatedKeyError, unique_keys
from shared_protocol.rotations import (
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    matrix_to_quaternion,
)
from shared_protocol.skeleton import NUM_JOINTS

KINDS = ("text_to_pose", "image_to_pose", "chat")
POSE_KINDS = ("text_to_pose", "image_to_pose")
# The image marker of LLaVA's data files; stripped from questions (images travel as bytes).
LLAVA_IMAGE_MARKER = "<image>"
PHRASING_MODES = ("mixed", "release", "chat")
CROP_MODES = ("auto", "hmr", "pixels", "none")  # read_image_pose_pairs' `crop`

# (question, answer) templates; index 0 is the paper's (what the service asks at inference).
# Text questions take {description} (the caption without its final punctuation).
TEXT_PHRASINGS: tuple[tuple[str, str], ...] = (
    (TEXT_QUESTION, TEXT_ANSWER),
    ("{description}. Please output the SMPL pose of this person.", "Sure, it is {pose}."),
    (
        "Generate the SMPL pose of a person described as follows: {description}.",
        "Sure, here is the SMPL pose: {pose}.",
    ),
    ("What is the SMPL pose of someone who matches this: {description}?", "It is {pose}."),
)
IMAGE_PHRASINGS: tuple[tuple[str, str], ...] = (
    (IMAGE_QUESTION, IMAGE_ANSWER),
    ("What is the SMPL pose of the person in this image?", "The SMPL pose is {pose}."),
    (
        "Estimate the 3D pose of the person in the center of this picture as SMPL parameters.",
        "Sure, it is {pose}.",
    ),
)


class DatasetError(ValueError):
    """A malformed or inconsistent dataset file or record; the message names both."""


@dataclass(frozen=True)
class ImageFile:
    """An image file that a dataset names. The readers check that it decodes and keep its name
    and hash, not its bytes, which a batch reads again: a run at the paper's scale would
    otherwise hold tens of GB of images in memory. A file changed since it was checked is
    refused, as resume refuses changed data."""

    path: Path
    sha256: str  # of the bytes that were checked
    box: CropBox | None = None  # the part of the picture to train on (HMR-style data's)

    def read(self) -> bytes:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{self.path}: cannot read the image file ({exc})") from None
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise DatasetError(
                f"{self.path}: the image file changed after the training data was read"
            )
        return data


def image_bytes(image: bytes | ImageFile) -> bytes:
    return image.read() if isinstance(image, ImageFile) else image


def load_image(image: bytes | ImageFile, min_side: int | None = None) -> Image.Image:
    """The picture a batch trains on: decoded as the service decodes a request's images
    (`decode_image`, `min_side` the model's input size), cropped to the file's box if any."""
    box = image.box if isinstance(image, ImageFile) else None
    return decode_image(image_bytes(image), min_side=min_side, box=box)


def image_sha256(image: bytes | ImageFile) -> bytes:
    if isinstance(image, ImageFile):
        digest = bytes.fromhex(image.sha256)
        if image.box is None:
            return digest
        return hashlib.sha256(digest + np.asarray(image.box, dtype=np.float64).tobytes()).digest()
    return hashlib.sha256(image).digest()


@dataclass(frozen=True, eq=False)
class Example:
    kind: str
    question: str
    answer: str
    images: tuple[bytes | ImageFile, ...] = ()
    poses: tuple[np.ndarray, ...] = ()
    history: tuple[Exchange, ...] = ()
    source: str = ""
    # The named action the caption phrases (the synthetic corpus's action phrasings), for the
    # auxiliary action loss (`TrainConfig.action_weight`); "" for any other example.
    action: str = ""

    def __post_init__(self) -> None:
        where = self.source or "example"
        if self.kind not in KINDS:
            raise DatasetError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "history", tuple(self.history))
        poses = tuple(_pose_array(p, f"{where}: pose {i}") for i, p in enumerate(self.poses))
        object.__setattr__(self, "poses", poses)
        texts = [
            ("question", self.question),
            ("answer", self.answer),
            *((f"history[{i}].user", t.user) for i, t in enumerate(self.history)),
            *((f"history[{i}].assistant", t.assistant) for i, t in enumerate(self.history)),
        ]
        for name, text in texts:
            if not isinstance(text, str):
                raise DatasetError(f"{where}: {name} must be a string, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # valid JSON ("\\ud83d"), but no text
                raise DatasetError(
                    f"{where}: {name} holds a lone surrogate ({text[exc.start]!r} at character "
                    f"{exc.start}), half of a character cut in two"
                ) from None
            if LLAVA_IMAGE_MARKER in text:
                raise DatasetError(
                    f"{where}: {name} contains the image marker {LLAVA_IMAGE_MARKER!r}; "
                    f"images go in `images`"
                )
        if not self.answer.strip():
            raise DatasetError(f"{where}: the answer is empty")
        if not self.question.strip() and not self.images:
            raise DatasetError(f"{where}: the question is empty and there is no image")
        users = [self.question, *(t.user for t in self.history)]
        if any(POSE_MARKER in text for text in users):
            raise DatasetError(f"{where}: a user message contains the pose marker {POSE_MARKER}")
        markers = self.answer.count(POSE_MARKER) + sum(
            t.assistant.count(POSE_MARKER) for t in self.history
        )
        if self.poses and len(self.poses) != markers:
            raise DatasetError(
                f"{where}: {len(self.poses)} poses for {markers} {POSE_MARKER} markers "
                f"in the answers"
            )
        if self.kind in POSE_KINDS and not self.poses:
            raise DatasetError(f"{where}: a {self.kind} example needs a pose and a {POSE_MARKER}")
        if self.kind == "image_to_pose" and not self.images:
            raise DatasetError(f"{where}: an image_to_pose example needs an image")
        for index, image in enumerate(self.images):
            if not isinstance(image, bytes | ImageFile):
                raise DatasetError(f"{where}: image {index} must be bytes or an ImageFile")

    @property
    def pose(self) -> np.ndarray | None:
        """The target of the last pose marker (the one a reply's pose comes from), or None."""
        return self.poses[-1] if self.poses else None


def _pose_array(value: object, where: str) -> np.ndarray:
    array = np.array(value, dtype=np.float64)
    if array.shape == (NUM_JOINTS * 3,):
        array = array.reshape(NUM_JOINTS, 3)
    if array.shape != (NUM_JOINTS, 3):
        raise DatasetError(f"{where}: expected shape ({NUM_JOINTS}, 3), got {array.shape}")
    if not np.isfinite(array).all():
        raise DatasetError(f"{where}: contains NaN or infinity")
    array.setflags(write=False)
    return array


# --- phrasing ---------------------------------------------------------------------------------


# The phrasing of a chat turn: the user's words alone (no question), the service's answer.
CHAT_VARIANT = -1


class Phraser:
    """Chooses the question/answer phrasing of pose examples, reproducibly from a seed."""

    def __init__(self, mode: str = "mixed", seed: int = 0, wording: str = "paper"):
        if mode not in PHRASING_MODES:
            raise ValueError(f"phrasing must be one of {PHRASING_MODES}, got {mode!r}")
        self.mode = mode
        self.wording = wording  # the service's questions and answers (prompts.WORDINGS)
        self._rng = np.random.default_rng(seed)

    def _variant(self, count: int) -> int:
        """0 for the service's phrasing, CHAT_VARIANT for a chat turn's, else an alternative's
        index."""
        if self.mode == "release" or self._rng.random() < 0.5:
            return 0
        if self.mode == "chat":
            return CHAT_VARIANT
        return 1 + int(self._rng.integers(count - 1))

    def text(self, description: str) -> tuple[str, str]:
        variant = self._variant(len(TEXT_PHRASINGS))
        if variant == 0:
            return pose_exchange(description, False, POSE_MARKER, self.wording)
        if variant == CHAT_VARIANT:
            answer = WORDINGS[self.wording].text_answer
            return description.strip(), answer.format(pose=POSE_MARKER)
        question, answer = TEXT_PHRASINGS[variant]
        text = description.strip().rstrip(".!?,;: ")
        return question.format(description=text), answer.format(pose=POSE_MARKER)

    def image(self) -> tuple[str, str]:
        variant = self._variant(len(IMAGE_PHRASINGS))
        if variant == 0:
            return pose_exchange(None, True, POSE_MARKER, self.wording)
        if variant == CHAT_VARIANT:
            return "", WORDINGS[self.wording].image_answer.format(pose=POSE_MARKER)
        question, answer = IMAGE_PHRASINGS[variant]
        return question, answer.format(pose=POSE_MARKER)


def phrasing_texts() -> list[str]:
    """Every phrasing template with its placeholders filled, e.g. to train a tokenizer."""
    filled = []
    for question, answer in (*TEXT_PHRASINGS, *IMAGE_PHRASINGS):
        filled.append(question.format(description="a person standing"))
        filled.append(answer.format(pose=POSE_MARKER))
    return filled


# --- shared file helpers ----------------------------------------------------------------------


def read_json(path: Path) -> object:
    """A dataset's JSON file; DatasetError naming it, and the record repeating a key."""
    try:
        # utf-8-sig: also what Windows editors save as UTF-8 (with a byte-order mark)
        text = path.read_text(encoding="utf-8-sig")
        return json.loads(text, object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8") from None
    except RepeatedKeyError as exc:  # it would silently drop a record
        where = _record_with_a_repeated_key(text)
        raise DatasetError(
            f"{path}: {where}the key {exc.args[0]!r} appears more than once"
        ) from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: a 5,000-digit number
        raise DatasetError(f"{path}: not a readable JSON file ({exc})") from None


class _ObjectWithRepeats(dict):
    pass


def _record_with_a_repeated_key(text: str) -> str:
    """ "record N: " for a list of records (LLaVA's layout) whose record N repeats a key
    somewhere inside, else "" (a top-level key is itself the record's name)."""

    def marking(pairs):
        keys = [key for key, _ in pairs]
        return (_ObjectWithRepeats if len(set(keys)) < len(keys) else dict)(pairs)

    def holds_repeat(value) -> bool:
        if isinstance(value, dict):
            return isinstance(value, _ObjectWithRepeats) or any(map(holds_repeat, value.values()))
        return isinstance(value, list) and any(map(holds_repeat, value))

    try:
        data = json.loads(text, object_pairs_hook=marking)
    except (ValueError, RecursionError):  # past the repeat: the message does without a record
        return ""
    if isinstance(data, list):
        for number, record in enumerate(data):
            if holds_repeat(record):
                return f"record {number}: "
    return ""


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    from inference_service.training.corpus import read_npz

    try:
        return read_npz(
            path,
            needed=(
                "poses",
                "global_orient",
                "body_pose",
                "has_body_pose",
                "pose",
                "has_smpl",
                "center",
                "scale",
                "ids",
                "images",
                "imgname",
                "names",
            ),
        )
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except ValueError as exc:  # it names the file
        raise DatasetError(str(exc)) from None


def read_pose_array(path: str | os.PathLike, arrays: Mapping[str, np.ndarray] | None = None):
    """The `poses` of an AMASS-layout .npz as (N, 24, 3) float64.

    Accepted shapes: (N, 72), AMASS's SMPL-H (N, 156) and SMPL-X (N, 165) (the body's 22
    joints, SMPL's hands at rest or from the `smpl_hands` that `Motion.save_npz` writes:
    `shared_protocol.pose.smpl_poses`), or (N, 24, 3). Without `poses`, SMPL's parameters
    as HMR-style data stores them: `global_orient` and `body_pose`, axis-angle ((N, 3) and
    (N, 69)) or rotation matrices ((N, 1, 3, 3) and (N, 23, 3, 3)), or a `body_pose` of
    (N, 72) alone, the global orientation first (4DHumans' files), or SPIN's `pose` of
    (N, 72). Other arrays (trans,
    betas, mocap_framerate, ...) are not needed and not read. The poses are returned as
    stored: `read_posescript`'s `z_up` turns a Z-up file's global orientation.
    """
    path = Path(path)
    arrays = _read_npz(path) if arrays is None else arrays
    if "poses" not in arrays and {"global_orient", "body_pose"} <= arrays.keys():
        arrays = {**arrays, "poses": _smpl_parameters(path, arrays)}
    elif "poses" not in arrays and arrays.get("body_pose", np.empty(0)).shape[1:] == (72,):
        arrays = {**arrays, "poses": arrays["body_pose"]}
    elif "poses" not in arrays and arrays.get("pose", np.empty(0)).shape[1:] == (72,):
        arrays = {**arrays, "poses": arrays["pose"]}
    if "poses" not in arrays:
        raise DatasetError(
            f"{path}: no 'poses' array (nor 'global_orient' and 'body_pose', nor 'pose')"
        )
    poses = arrays["poses"]
    if poses.dtype.kind not in "iuf":
        raise DatasetError(f"{path}: 'poses' must hold numbers, got dtype {poses.dtype}")
    if poses.ndim == 3 and poses.shape[1:] == (NUM_JOINTS, 3):
        poses = poses.reshape(len(poses), NUM_JOINTS * 3)
    if poses.ndim != 2 or poses.shape[1] not in (72, 156, 165):
        raise DatasetError(
            f"{path}: 'poses' must have shape (N, 72), (N, 156), (N, 165) or (N, 24, 3), got "
            f"{poses.shape}"
        )
    if not len(poses):
        raise DatasetError(f"{path}: 'poses' holds no frames")
    try:
        poses = smpl_poses(poses, arrays)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    poses = poses.astype(np.float64).reshape(-1, NUM_JOINTS, 3)
    bad = np.flatnonzero(~np.isfinite(poses).all(axis=(1, 2)))
    if bad.size:
        raise DatasetError(f"{path}: frame {int(bad[0])}: pose contains NaN or infinity")
    _check_radians(poses, path, "frame")
    return poses


def _check_radians(poses: np.ndarray, path: Path, unit: str) -> None:
    """DatasetError for a (N, 24, 3) pose array holding a rotation longer than a full turn:
    axis-angle from any rotation is at most π long, so those are degrees (or no rotation)."""
    with np.errstate(over="ignore"):  # an overflowing length is inf: too large as well
        angles = np.linalg.norm(poses, axis=2).max(axis=1, initial=0.0)
    bad = np.flatnonzero(angles > 2 * np.pi)
    if bad.size:
        raise DatasetError(
            f"{path}: {unit} {int(bad[0])}: a rotation of {angles[bad[0]]:.4g} rad, more than a "
            "full turn; poses are axis-angle in radians (degrees?)"
        )


def _smpl_parameters(path: Path, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N, 72) axis-angle from `global_orient` and `body_pose` (see `read_pose_array`)."""
    parts = []
    for key, joints in (("global_orient", 1), ("body_pose", NUM_JOINTS - 1)):
        value = arrays[key]
        if value.dtype.kind not in "iuf":
            raise DatasetError(f"{path}: '{key}' must hold numbers, got dtype {value.dtype}")
        count = len(value) if value.ndim else 0
        matrix_shapes = [(count, joints, 3, 3)] + [(count, 3, 3)] * (joints == 1)
        if value.shape in ((count, joints * 3), (count, joints, 3)):
            parts.append(value.reshape(count, joints * 3).astype(np.float64))
        elif value.shape in matrix_shapes:
            matrices = value.reshape(count, joints, 3, 3).astype(np.float64)
            try:
                parts.append(matrix_to_axis_angle(matrices).reshape(count, joints * 3))
            except ValueError:  # NaN, or not rotations: name the first such frame
                frame, exc = _first_bad_rotation(matrices)
                raise DatasetError(f"{path}: frame {frame}: '{key}': {exc}") from None
        else:
            raise DatasetError(
                f"{path}: '{key}' must have shape (N, {joints * 3}), (N, {joints}, 3) or "
                f"(N, {joints}, 3, 3){' or (N, 3, 3)' * (joints == 1)}, got {value.shape}"
            )
    if len(parts[0]) != len(parts[1]):
        raise DatasetError(
            f"{path}: 'global_orient' has {len(parts[0])} frames, 'body_pose' {len(parts[1])}"
        )
    return np.concatenate(parts, axis=1)


def _first_bad_rotation(matrices: np.ndarray) -> tuple[int, ValueError]:
    """The first frame of (N, J, 3, 3) `matrices` that `matrix_to_axis_angle` refuses, and why:
    the frames are halved until one is left (a few whole-array calls, not one per frame)."""
    low, high = 0, len(matrices)  # the first bad frame is in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        try:
            matrix_to_axis_angle(matrices[low:middle])
            low = middle
        except ValueError:
            high = middle
    try:
        matrix_to_axis_angle(matrices[low])
    except ValueError as exc:
        return low, exc
    raise AssertionError("every frame converts one by one but not all together")


def _string_array(
    arrays: Mapping[str, np.ndarray], key: str, path: Path, length: int, *, ints_ok: bool = False
) -> list[str]:
    value = arrays[key]
    kinds = "USiu" if ints_ok else "US"
    if value.ndim != 1 or value.dtype.kind not in kinds:
        raise DatasetError(
            f"{path}: '{key}' must be a 1-D array of strings, got shape {value.shape} "
            f"dtype {value.dtype}"
        )
    if len(value) != length:
        raise DatasetError(f"{path}: '{key}' has {len(value)} entries for {length} poses")
    if value.dtype.kind == "S":
        return [item.decode("utf-8", errors="replace") for item in value]
    return [str(item) for item in value]


# The units of HMR-style data's `scale`, by `crop=`: SPIN's files give the box's side / 200
# (MPII's convention); 4DHumans' files give it in pixels (their reader divides by 200 itself).
BOX_UNITS = {"hmr": 200.0, "pixels": 1.0}
# A box side outside these bounds, against the picture's longer side, is a unit mistaken.
MIN_BOX_SIDE_PX = 8
MAX_BOX_SIDE_TIMES = 4


def box_units(arrays: Mapping[str, np.ndarray], crop: str) -> str | None:
    """`crop` (auto, hmr, pixels, none) -> the units of the file's `scale`, or None to use
    the images whole. auto: pixels in 4DHumans' layout (`has_body_pose`, or a `body_pose`
    of 72 with no `global_orient`), hmr otherwise."""
    if crop not in CROP_MODES:
        raise ValueError(f"crop: expected one of {', '.join(CROP_MODES)}, got {crop!r}")
    if crop == "none":
        return None
    if crop != "auto":
        return crop
    return "pixels" if _four_d_humans_layout(arrays) else "hmr"


def _four_d_humans_layout(arrays: Mapping[str, np.ndarray]) -> bool:
    return "has_body_pose" in arrays or (
        arrays.get("body_pose", np.empty(0)).shape[1:] == (72,) and "global_orient" not in arrays
    )


def _crop_boxes(
    path: Path, arrays: Mapping[str, np.ndarray], length: int, rows: Sequence[int], units: str
) -> dict[int, CropBox] | None:
    """HMR-style boxes of the frames `rows`: `center` (N, 2) in pixels and `scale` (N,) or,
    one per axis, (N, 2), whose larger value gives the side (in `units`); None without them."""
    if "center" not in arrays and "scale" not in arrays:
        return None
    if "center" not in arrays or "scale" not in arrays:
        given, lacking = ("center", "scale") if "center" in arrays else ("scale", "center")
        raise DatasetError(
            f"{path}: has '{given}' but no '{lacking}'; a box needs both (or crop=none to "
            "use the images whole)"
        )
    center, scale = arrays["center"], arrays["scale"]
    if center.shape != (length, 2) or center.dtype.kind not in "iuf":
        raise DatasetError(
            f"{path}: 'center' must be ({length}, 2) numbers, got {center.shape} {center.dtype}"
        )
    if scale.dtype.kind not in "iuf" or scale.shape not in ((length,), (length, 1), (length, 2)):
        raise DatasetError(
            f"{path}: 'scale' must be ({length},) or ({length}, 2) numbers, got {scale.shape} "
            f"{scale.dtype}"
        )
    per_axis = scale.reshape(length, -1)
    sides = per_axis.max(axis=1) * BOX_UNITS[units]
    boxes = {}
    for row in rows:
        (x, y), side = center[row], sides[row]
        if (
            not (np.isfinite(center[row]).all() and np.isfinite(per_axis[row]).all())
            or not (per_axis[row] > 0).all()
        ):
            raise DatasetError(
                f"{path}: frame {row}: its box (center {center[row].tolist()}, scale "
                f"{scale[row].tolist()}) is not finite and positive"
            )
        boxes[row] = CropBox(float(x), float(y), float(side))
    return boxes


# How `scale` is read, by its units (BOX_UNITS), for messages.
UNITS_READ = {"hmr": "the side / 200", "pixels": "the side in pixels"}


def _check_box(
    box: CropBox, size: tuple[int, int], units: str, crop: str, where: str, path: Path
) -> None:
    """DatasetError for a box that cannot be the person's in this picture; `units` the
    `BOX_UNITS` it was read in, by `crop` (which may be auto)."""
    what = (
        f"its box (center {box.center_x:g}, {box.center_y:g}, side {box.side:g} px) "
        f"and the {size[0]} x {size[1]} picture {path}"
    )
    other = next(name for name in BOX_UNITS if name != units)
    if not MIN_BOX_SIDE_PX <= box.side <= MAX_BOX_SIDE_TIMES * max(size):
        problem = "too small" if box.side < MIN_BOX_SIDE_PX else "far larger than the picture"
        how = "crop=auto, by the file's layout" if crop == "auto" else f"crop={units}"
        raise DatasetError(
            f"{where}: {what}: the box is {problem}; 'scale' was read as {UNITS_READ[units]} "
            f"({how}); if it is {UNITS_READ[other]}, give crop={other}"
        )
    half = box.side / 2
    inside = all(
        center + half > 0 and center - half < extent
        for center, extent in ((box.center_x, size[0]), (box.center_y, size[1]))
    )
    if not inside:
        raise DatasetError(f"{where}: {what}: the box lies outside the picture")


MAX_IMAGE_FILE_BYTES = 64 << 20  # a training image file; the service takes 16 MiB


# Past this many images, reading and checking them (about 9 ms each for a 640x480 JPEG) takes
# long enough to look like a hang, so it is said first.
ANNOUNCED_IMAGES = 1000


def _announce_images(count: int, source: Path) -> None:
    if count > ANNOUNCED_IMAGES:
        print(
            f"note: {source}: reading and checking the images of {count:,} examples...",
            file=sys.stderr,
        )


def _read_image(folder: Path, name: str, where: str) -> tuple[ImageFile, tuple[int, int]]:
    """The image file, checked to decode, and its upright size."""
    path = folder / name
    try:
        if path.exists() and not path.is_file():  # a device or a pipe would be read forever
            raise DatasetError(f"{where}: {path} is not a regular file")
        with open(path, "rb") as file:
            data = file.read(MAX_IMAGE_FILE_BYTES + 1)
        if len(data) > MAX_IMAGE_FILE_BYTES:
            raise DatasetError(
                f"{where}: {path} is larger than {MAX_IMAGE_FILE_BYTES >> 20} MiB; no picture "
                "the model reads needs that much"
            )
    except FileNotFoundError:
        raise DatasetError(f"{where}: image file {path} not found") from None
    except DatasetError:
        raise
    except ValueError:  # a NUL in the name
        raise DatasetError(f"{where}: {name!r} is not a file name") from None
    except OSError as exc:
        raise DatasetError(f"{where}: cannot read image file {path} ({exc})") from None
    try:
        picture = decode_image(data, field=str(path))
    except BadImageError as exc:  # its message says why: not an image, too long, too large
        raise DatasetError(f"{where}: {exc}") from None
    return ImageFile(path, hashlib.sha256(data).hexdigest()), picture.size


# --- global orientation -----------------------------------------------------------------------

_Z_UP_TO_Y_UP = axis_angle_to_matrix(np.array([-np.pi / 2, 0.0, 0.0]))


def z_up_to_y_up_zero_yaw(axis_angle: np.ndarray) -> np.ndarray:
    """(N, 24, 3) poses in AMASS's Z-up world -> this project's frame, facing +Z.

    As the PoseScript loader of the release: the global orientation is rotated by -90 degrees
    about X (Z-up -> Y-up), then about the vertical axis by minus its turn about that axis
    (the twist of its swing-twist decomposition about +Y), so that a body turned and bowed
    faces +Z (zero yaw). Joints 1..23 are unchanged. Unlike the heading of the forward axis,
    which a body lying face up points nearly straight up (a degree of roll turned its heading
    half round), the twist changes smoothly with the pose for every body not upside down.
    """
    poses = np.array(axis_angle, dtype=np.float64)
    rotation = _Z_UP_TO_Y_UP @ axis_angle_to_matrix(poses[:, 0])
    w, _, y, _ = np.moveaxis(matrix_to_quaternion(rotation), -1, 0)
    yaw = 2.0 * np.arctan2(y, w)
    axis = np.zeros((len(poses), 3))
    axis[:, 1] = -yaw
    poses[:, 0] = matrix_to_axis_angle(axis_angle_to_matrix(axis) @ rotation)
    return poses


def _in_body_frame(
    poses: np.ndarray,
    z_up: bool | None,
    path: Path,
    arrays: Mapping[str, np.ndarray],
    options: tuple[str, str] = ("z_up=true", "z_up=false"),
) -> np.ndarray:
    """(N, 24, 3) poses of a file in the SMPL body frame: turned upright with `z_up`, or as
    the file's `up_axis` says (the motions this project writes); with neither, DatasetError
    when most bodies stand along +Z, which would train every pose lying down, naming the two
    `options` that say which it is. A majority cannot tell a file of lying bodies."""
    says = _says_z_up(arrays, path)
    if z_up is not None and says is not None and z_up != says:
        turn, keep = options
        raise DatasetError(
            f"{path}: its up_axis says {'Z' if says else 'Y'}, but {turn if z_up else keep} "
            "says otherwise; leave z_up= out to take the file's word"
        )
    z_up = says if z_up is None else z_up
    if z_up is None and _mostly_up_along(poses, WORLD_UP_Z):
        turn, keep = options
        raise DatasetError(
            f"{path}: most bodies stand along +Z, as in AMASS's Z-up world (and in the "
            f"motions chatpose and the add-on export); add {turn} to turn them upright, or "
            f"{keep} if they are meant so"
        )
    return z_up_to_y_up_zero_yaw(poses) if z_up and len(poses) else poses


# A pose marker mistyped (its case, spaces): read as chat text, it would train the model to
# write it.
_NEAR_MARKER = re.compile(r"<\s*pose\s*>", re.IGNORECASE)


def _says_z_up(arrays: Mapping[str, np.ndarray], path: Path) -> bool | None:
    """Whether a pose file says it is Z-up (`up_axis`, as `Motion.save_npz` writes it); None
    when it does not say."""
    try:
        return says_z_up(arrays, None)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None


# Where a body's up axis points when it stands in AMASS's Z-up world, and in HMR's camera frame.
WORLD_UP_Z = np.array([0.0, 0.0, 1.0])
CAMERA_UP = np.array([0.0, -1.0, 0.0])


def _mostly_up_along(axis_angle: np.ndarray, direction: np.ndarray) -> bool:
    """Whether most bodies' up axis (the pelvis frame's +Y) is within 45° of `direction`."""
    up = axis_angle_to_matrix(axis_angle[:, 0])[:, :, 1]
    return bool(np.mean(up @ direction > np.sqrt(0.5)) > 0.5)


# --- PoseScript's release: poses by reference into AMASS ----------------------------------------

# AMASS renamed some of its folders after PoseScript's index was written: the index and the
# folder on disk may each use either name (the ChatPose release maps them one way).
AMASS_RENAMED = {
    "Eyes_Japan_Dataset": "EyesJapanDataset",
    "BioMotionLab_NTroje": "BMLrub",
    "MPI_HDM05": "HDM05",
    "MPI_Limits": "PosePrior",
    "MPI_mosh": "MoSh",
    "SSM_synced": "SSM",
    "DFaust_67": "DFaust",
    "Transitions_mocap": "Transitions",
    "TCD_handMocap": "TCDHands",
}


def read_amass_poses(
    index: Path, amass: Path, pose_ids: Iterable[str]
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The poses of `pose_ids` as PoseScript's index names them, read from AMASS.

    `index`: a JSON object {pose_id: [dataset, sequence file, frame index]} (the release's
    `ids_2_dataset_sequence_and_frame_index*.json`), the sequence file relative to the `amass`
    folder, under its current name or the one it had before AMASS renamed it. Each sequence is
    read once. Returns ({pose_id: (24, 3) pose as stored, Z-up}, {sequence not found: its pose
    ids}); DatasetError for a malformed entry, a frame past a sequence's end, or a pose id
    missing from the index.
    """
    entries = read_json(index)
    if not isinstance(entries, dict):
        raise DatasetError(
            f"{index}: expected a JSON object {{pose_id: [dataset, sequence file, frame]}}"
        )
    by_sequence: dict[str, list[tuple[str, int]]] = {}
    for pose_id in pose_ids:
        entry = entries.get(pose_id)
        if entry is None:
            raise DatasetError(f"{index}: no pose id {pose_id!r}")
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], str)
            or not entry[1].strip()
            or isinstance(entry[2], bool)
            or not isinstance(entry[2], int)
            or entry[2] < 0
        ):
            raise DatasetError(
                f"{index}: pose id {pose_id!r}: expected [dataset, sequence file, frame index], "
                f"got {entry!r}"
            )
        if entry[0].upper() != "AMASS":
            raise DatasetError(
                f"{index}: pose id {pose_id!r}: from the dataset {entry[0]!r}; only AMASS "
                "poses are read (amass=)"
            )
        by_sequence.setdefault(entry[1], []).append((pose_id, entry[2]))
    found: dict[str, np.ndarray] = {}
    missing: dict[str, list[str]] = {}
    for sequence, frames in by_sequence.items():
        path = _amass_sequence(amass, sequence)
        if path is None:
            missing[sequence] = [pose_id for pose_id, _ in frames]
            continue
        poses = read_pose_array(path)
        for pose_id, frame in frames:
            if frame >= len(poses):
                raise DatasetError(
                    f"{index}: pose id {pose_id!r}: frame {frame} of {path}, which has "
                    f"{len(poses)} frames"
                )
            found[pose_id] = poses[frame].copy()  # a view would keep the whole sequence
    return found, missing


_AMASS_OLD_NAMES = {new: old for old, new in AMASS_RENAMED.items()}


def _amass_sequence(amass: Path, sequence: str) -> Path | None:
    parts = [part for part in sequence.replace("\\", "/").split("/") if part not in ("", ".")]
    folder, rest = parts[0] if parts else "", "/".join(parts[1:])  # "./BMLrub/..." as "BMLrub/..."
    for name in (folder, AMASS_RENAMED.get(folder), _AMASS_OLD_NAMES.get(folder)):
        if name is not None and (amass / name / rest).is_file():
            return amass / name / rest
    return None


def _read_id_list(path: Path) -> set[str]:
    ids = read_json(path)
    if not isinstance(ids, list) or not all(
        isinstance(i, str | int) and not isinstance(i, bool) for i in ids
    ):
        raise DatasetError(f"{path}: expected a JSON list of pose ids")
    return {str(i) for i in ids}


# --- readers ----------------------------------------------------------------------------------


def read_posescript(
    captions: str | os.PathLike,
    poses: str | os.PathLike | None = None,
    *,
    amass: str | os.PathLike | None = None,
    index: str | os.PathLike | None = None,
    ids: str | os.PathLike | None = None,
    skip_missing: bool = False,
    z_up: bool | None = None,
    phrasing: str = "mixed",
    seed: int = 0,
    wording: str = "paper",  # prompts.WORDINGS: the base checkpoint's
) -> list[Example]:
    """PoseScript-style captions joined to poses: one text_to_pose Example per caption.

    `captions`: a JSON object {pose_id: caption or [caption, ...]}. The poses come from either
    - `poses`, an AMASS-layout .npz (see `read_pose_array`): a pose id is the frame index in the
      .npz ("0", "1", ...), unless the .npz has an `ids` array (N,) of strings or integers, one
      per frame: then ids are looked up there; or
    - `amass` and `index`, as PoseScript's release has them: the AMASS folder, and its
      `ids_2_dataset_sequence_and_frame_index*.json` (`read_amass_poses`); their poses are
      Z-up (`z_up` true unless said otherwise). `skip_missing` leaves out, with a note, the
      captions whose AMASS sequence is not in the folder (a partial download), instead of
      refusing them.
    `ids`: a JSON list of pose ids (PoseScript's `train_ids*.json`, ...): only their captions.
    `z_up`: the poses are raw AMASS (Z-up world); their global orientation is then
    converted as the release's PoseScript loader does (`z_up_to_y_up_zero_yaw`). None (not
    said): as the file's `up_axis` says (the motions chatpose and the add-on write), else a
    DatasetError if most bodies stand along +Z, which would train them lying down.
    """
    captions_path = Path(captions)
    data = read_json(captions_path)
    if not isinstance(data, dict):
        raise DatasetError(
            f"{captions_path}: expected a JSON object {{pose_id: caption(s)}}, "
            f"got {type(data).__name__}"
        )
    if ids is not None:
        split = _read_id_list(Path(ids))
        data = {pose_id: value for pose_id, value in data.items() if pose_id in split}
    if (poses is None) == (amass is None) or (amass is None) != (index is None):
        raise ValueError("read_posescript: give either poses, or amass and index")
    if amass is not None:
        table = _amass_pose_table(Path(index), Path(amass), data, captions_path, skip_missing, z_up)
        data = {pose_id: value for pose_id, value in data.items() if pose_id in table.rows}
    else:
        table = _npz_pose_table(Path(poses), z_up)
    phraser = Phraser(phrasing, seed, wording)
    examples = []
    for pose_id, value in data.items():
        where = f"{captions_path}: pose id {pose_id!r}"
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise DatasetError(f"{where}: expected a caption or a non-empty list of captions")
        if pose_id not in table.rows:
            raise DatasetError(f"{where}: {table.lookup_error}")
        for number, text in enumerate(texts):
            if not text.strip() or not text.strip().rstrip(".!?,;: "):
                raise DatasetError(f"{where}: caption {number} is empty")
            if LLAVA_IMAGE_MARKER in text:
                raise DatasetError(
                    f"{where}: caption {number} contains {LLAVA_IMAGE_MARKER!r}; a caption is "
                    "text only"
                )
            question, answer = phraser.text(text)
            examples.append(
                Example(
                    "text_to_pose",
                    question,
                    answer,
                    poses=(table.array[table.rows[pose_id]],),
                    source=f"{captions_path}#{pose_id}[{number}]",
                )
            )
    return examples


@dataclass
class _PoseTable:
    """Poses by id, in the body frame: what a PoseScript caption's id is looked up in."""

    path: Path  # the file that gave them, which errors name
    array: np.ndarray  # (N, 24, 3) axis-angle
    rows: dict[str, int]  # pose id -> row of `array`
    lookup_error: str  # why an id not in `rows` is not there

    @classmethod
    def of(cls, path: Path, array: np.ndarray, ids: Sequence[str], lookup_error: str):
        rows: dict[str, int] = {}
        for row, pose_id in enumerate(ids):
            if pose_id in rows:
                raise DatasetError(
                    f"{path}: 'ids' has {pose_id!r} twice (frames {rows[pose_id]} and {row})"
                )
            rows[pose_id] = row
        return cls(path, array, rows, lookup_error)


def _npz_pose_table(poses_path: Path, z_up: bool | None) -> _PoseTable:
    """An AMASS-layout .npz's poses, by its `ids` array, else by frame index."""
    arrays = _read_npz(poses_path)
    pose_array = read_pose_array(poses_path, arrays)
    if "ids" in arrays:
        pose_ids = _string_array(arrays, "ids", poses_path, len(pose_array), ints_ok=True)
        lookup_error = f"no such pose in {poses_path} (its 'ids' array)"
    else:
        pose_ids = [str(row) for row in range(len(pose_array))]
        lookup_error = f"no such pose in {poses_path} (frames 0..{len(pose_array) - 1})"
    pose_array = _in_body_frame(pose_array, z_up, poses_path, arrays)
    return _PoseTable.of(poses_path, pose_array, pose_ids, lookup_error)


def _amass_pose_table(
    index: Path,
    amass: Path,
    captions: dict,
    captions_path: Path,
    skip_missing: bool,
    z_up: bool | None,
) -> _PoseTable:
    """The poses of the captions' ids, from the AMASS folder through PoseScript's index (Z-up,
    as AMASS has them, unless ``z_up`` says otherwise); refused when some are in sequences
    not there, unless ``skip_missing``."""
    found, missing = read_amass_poses(index, amass, captions)
    if missing:
        count = sum(len(v) for v in missing.values())
        first = next(iter(missing))
        what = (
            f"{count} pose id(s) of {captions_path} ({next(iter(missing.values()))[0]!r} "
            f"first) are in {len(missing)} AMASS sequence(s) not found under {amass} (such "
            f"as {first})"
        )
        if not skip_missing:
            raise DatasetError(
                f"{index}: {what}; add those AMASS datasets, or missing=skip to leave "
                "their captions out"
            )
        print(f"note: left out: {what}", file=sys.stderr)
    pose_ids = list(found)
    pose_array = np.stack([found[p] for p in pose_ids]) if found else np.zeros((0, 24, 3))
    pose_array = _in_body_frame(pose_array, True if z_up is None else z_up, index, {})
    return _PoseTable.of(index, pose_array, pose_ids, f"no such pose id in {index}")


def read_image_pose_pairs(
    poses: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    camera_frame: bool | None = None,
    crop: str = "auto",
    phrasing: str = "mixed",
    seed: int = 0,
    wording: str = "paper",  # prompts.WORDINGS: the base checkpoint's
    limit: int | None = None,
) -> list[Example]:
    """Image/pose pairs: one image_to_pose Example per frame of the .npz (of its first
    ``limit`` frames with a pose; the images of the others are not read).

    `poses`: an AMASS-layout .npz (see `read_pose_array`, SMPL's `global_orient` and
    `body_pose` too) with an extra `images` array (N,) of file names (or HMR-style data's
    `imgname`), one per frame, relative to `images` (default: the .npz's folder).
    `camera_frame`: the global orientations are in HMR's camera frame (+Y down), as in
    HMR-style data; they are turned into the upright one (`camera_to_upright`). None (not
    said): as stored, with a note for SPIN's and 4DHumans' layouts, which are in that frame;
    DatasetError when most bodies stand upside down, as people in that frame do.
    `crop`: HMR-style data's boxes, `center` (N, 2) in pixels and `scale` (N,) or (N, 2),
    are applied: each image is cropped to the square around `center` whose side is the
    larger `scale`, read in `BOX_UNITS` (hmr: the side / 200, as SPIN's files; pixels, as
    4DHumans' files; auto: by the file's layout, `box_units`). "none": the images are used
    whole (crops already made).
    """
    poses_path = Path(poses)
    folder = Path(images) if images is not None else poses_path.parent
    arrays = _read_npz(poses_path)
    pose_array = read_pose_array(poses_path, arrays)
    key = "images" if "images" in arrays or "imgname" not in arrays else "imgname"
    if key not in arrays:
        raise DatasetError(
            f"{poses_path}: no 'images' (or 'imgname') array, one image file name per frame"
        )
    names = _string_array(arrays, key, poses_path, len(pose_array))
    rows = _frames_with_poses(arrays, len(names), poses_path)
    _turn_upright_or_refuse(pose_array, rows, arrays, poses_path, camera_frame)
    rows = rows[:limit]
    units = box_units(arrays, crop)
    boxes = None if units is None else _crop_boxes(poses_path, arrays, len(names), rows, units)
    phraser = Phraser(phrasing, seed, wording)
    examples = []
    _announce_images(len(rows), poses_path)
    for row in rows:
        name = names[row]
        where = f"{poses_path}: frame {row}"
        if not name.strip():
            raise DatasetError(f"{where}: empty image file name")
        image, size = _read_image(folder, name, where)
        if boxes is not None:
            _check_box(boxes[row], size, units, crop, where, image.path)
            image = ImageFile(image.path, image.sha256, boxes[row])
        question, answer = phraser.image()
        examples.append(
            Example(
                "image_to_pose",
                question,
                answer,
                images=(image,),
                poses=(pose_array[row],),
                source=f"{poses_path}#{row}",
            )
        )
    return examples


def _frames_with_poses(arrays: dict, frames: int, poses_path: Path) -> Sequence[int]:
    """The frames of an image/pose file that hold a pose: 4DHumans' and SPIN's files flag
    those without a true one."""
    flag = next((key for key in ("has_body_pose", "has_smpl") if key in arrays), None)
    if flag is None:
        return range(frames)
    flags = arrays[flag]
    if flags.shape != (frames,) or flags.dtype.kind not in "biuf":
        raise DatasetError(
            f"{poses_path}: '{flag}' must be (N,) number flags, got {flags.dtype} {flags.shape}"
        )
    if flags.dtype.kind == "f" and not np.isfinite(flags).all():  # else read as 0: no pose
        bad = int(np.flatnonzero(~np.isfinite(flags))[0])
        raise DatasetError(
            f"{poses_path}: frame {bad}: '{flag}' is {flags[bad]}, not a number (the flags "
            "are 0, no pose, or 1)"
        )
    rows = np.flatnonzero(flags > 0)
    if len(rows) < frames:
        print(
            f"note: {poses_path}: left out {frames - len(rows)} of {frames} frames "
            f"without a pose ({flag} 0)",
            file=sys.stderr,
        )
    return rows


def _turn_upright_or_refuse(
    pose_array: np.ndarray,
    rows: Sequence[int],
    arrays: dict,
    poses_path: Path,
    camera_frame: bool | None,
) -> None:
    """Turns an image/pose file's global orientations from HMR's camera frame into the upright
    one, in place, when ``camera_frame`` says so; refuses poses in a frame they cannot train
    in (`read_image_pose_pairs`)."""
    # Z-up poses (AMASS's world, the motions chatpose and the add-on write) would train every
    # body lying down; and their heading is the world's, not relative to the camera.
    z_up_world = (
        "its up_axis says Z"
        if _says_z_up(arrays, poses_path)
        else "most bodies stand along +Z"
        if camera_frame is None and len(rows) and _mostly_up_along(pose_array[rows], WORLD_UP_Z)
        else None
    )
    if z_up_world:
        raise DatasetError(
            f"{poses_path}: {z_up_world}, as in AMASS's Z-up world (and in the motions chatpose "
            "and the add-on export): an image's pose is upright with +Y up, its heading "
            "relative to the camera's (docs/evaluation.md); convert them so"
            + ("" if _says_z_up(arrays, poses_path) else ", or add frame=upright if they are")
        )
    if camera_frame:
        pose_array[:, 0] = camera_to_upright(pose_array[:, 0])
    elif camera_frame is None and len(rows) and _mostly_up_along(pose_array[rows], CAMERA_UP):
        raise DatasetError(
            f"{poses_path}: most bodies stand upside down (their up axis along -Y), as people "
            "do in HMR's camera frame (+Y down, SPIN's and 4DHumans' files and HMR 2.0's "
            "output); add frame=camera to turn them upright, or frame=upright if they are "
            "meant so"
        )
    elif camera_frame is None and (_four_d_humans_layout(arrays) or "pose" in arrays):
        print(
            f"note: {poses_path}: SPIN's and 4DHumans' files hold the global orientation in the "
            "camera's frame (+Y down): frame=camera turns it upright; frame=upright keeps it "
            "as it is and silences this",
            file=sys.stderr,
        )


def read_llava_conversations(
    path: str | os.PathLike,
    *,
    poses: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    skip_missing: bool = False,
    z_up: bool | None = None,
) -> list[Example]:
    """Conversations in LLaVA's JSON format, one Example per conversation.

    `path`: `[{"id": ..., "image": "file.jpg" (optional; or a list), "conversations":
    [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}, ...]`. Turns
    alternate human/gpt, starting with human and ending with gpt; a gpt turn before the first
    human one is left out, as LLaVA's own loader does. The first human turn marks
    each image once with LLaVA's `<image>`, which is removed from the text (the images go first,
    as in LLaVA). Image files are relative to
    `images` (default: the JSON file's folder).

    Poses: gpt turns may contain `<POSE>`; the poses then come from `poses`, an AMASS-layout
    .npz with an `ids` array (N,) naming, for each frame, the conversation `id` it belongs to:
    the k-th frame whose id is X (in file order) is the target of the k-th `<POSE>` of
    conversation X. Without `poses`, a `<POSE>` in a gpt turn is an error (chat-only data).
    `z_up` as for `read_posescript`: poses standing along +Z are refused unless it is said.
    Kind: image_to_pose or text_to_pose for conversations with poses (by whether there is an
    image), chat for the others.

    `skip_missing` leaves out, with a note, the conversations whose image files are not there
    or cannot be read (LLaVA's mixture, downloaded in part or with its GIFs named .jpg);
    otherwise the first one is an error.
    """
    json_path = Path(path)
    folder = Path(images) if images is not None else json_path.parent
    data = read_json(json_path)
    if not isinstance(data, list):
        raise DatasetError(f"{json_path}: expected a JSON list of conversations")
    by_id = None if poses is None else _poses_by_conversation(Path(poses), z_up)
    seen: set[str] = set()
    examples = []
    left_out: list[str] = []  # why each conversation left out by skip_missing was
    _announce_images(sum(isinstance(r, dict) and bool(r.get("image")) for r in data), json_path)
    for number, record in enumerate(data):
        if not isinstance(record, dict):
            raise DatasetError(f"{json_path}: record {number}: expected an object")
        raw_id = record.get("id", number)
        if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
            raise DatasetError(f"{json_path}: record {number}: 'id' must be a string or integer")
        conversation_id = str(raw_id)
        where = f"{json_path}: record {number} (id {conversation_id!r})"
        if by_id is not None and conversation_id in seen:
            raise DatasetError(f"{where}: id used twice; poses are matched by id")
        seen.add(conversation_id)
        image_names = _llava_image_names(record.get("image"), where)
        turns = _llava_turns(record.get("conversations"), where, images=len(image_names))
        targets = _llava_pose_targets(turns, by_id, conversation_id, where, poses)
        try:
            image_files = tuple(_read_image(folder, name, where)[0] for name in image_names)
        except DatasetError as exc:
            if not skip_missing:
                raise DatasetError(f"{exc}; missing=skip leaves such conversations out") from None
            left_out.append(str(exc))
            continue
        if targets:
            kind = "image_to_pose" if image_files else "text_to_pose"
        else:
            kind = "chat"
        history = tuple(Exchange(user, assistant) for user, assistant in turns[:-1])
        examples.append(
            Example(
                kind,
                turns[-1][0],
                turns[-1][1],
                images=image_files,
                poses=tuple(targets),
                history=history,
                source=f"{json_path}#{number}",
            )
        )
    if left_out:
        print(
            f"note: left out: {len(left_out)} conversation(s) of {json_path} whose images "
            f"could not be read (first: {left_out[0]})",
            file=sys.stderr,
        )
    if by_id is not None:
        unused = [key for key in by_id if key not in seen]
        if unused:
            raise DatasetError(
                f"{poses}: poses for conversation id {unused[0]!r}, which is not in {json_path}"
            )
    return examples


def _poses_by_conversation(poses_path: Path, z_up: bool | None) -> dict[str, list[np.ndarray]]:
    """A LLaVA conversation file's poses, by the conversation id each frame names, in file
    order."""
    arrays = _read_npz(poses_path)
    pose_array = _in_body_frame(read_pose_array(poses_path, arrays), z_up, poses_path, arrays)
    if "ids" not in arrays:
        raise DatasetError(f"{poses_path}: no 'ids' array (the conversation id of each frame)")
    ids = _string_array(arrays, "ids", poses_path, len(pose_array), ints_ok=True)
    by_id: dict[str, list[np.ndarray]] = {}
    for row, conversation_id in enumerate(ids):
        by_id.setdefault(conversation_id, []).append(pose_array[row])
    return by_id


def _llava_image_names(value: object, where: str) -> list[str]:
    """A LLaVA record's `image`: none, a file name, or a list of them."""
    names = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise DatasetError(f"{where}: 'image' must be a file name or a list of file names")
    return names


def _llava_pose_targets(
    turns: list[tuple[str, str]],
    by_id: dict[str, list[np.ndarray]] | None,
    conversation_id: str,
    where: str,
    poses: object,
) -> list[np.ndarray]:
    """The poses a conversation's `<POSE>` markers stand for, one each, in order; refused
    when they and the poses file's frames for it do not match one to one."""
    near = [m[0] for _, answer in turns for m in _NEAR_MARKER.finditer(answer)]
    if any(found != POSE_MARKER for found in near):  # it would train as chat text
        found = next(found for found in near if found != POSE_MARKER)
        raise DatasetError(f"{where}: a gpt turn holds {found!r}, not the marker {POSE_MARKER}")
    markers = sum(answer.count(POSE_MARKER) for _, answer in turns)
    if not markers:
        if by_id is not None and conversation_id in by_id:
            raise DatasetError(
                f"{where}: {poses} has poses for this conversation but it has no {POSE_MARKER}"
            )
        return []
    if by_id is None:
        raise DatasetError(f"{where}: gpt turns contain {POSE_MARKER} but no poses file was given")
    targets = by_id.get(conversation_id, [])
    if len(targets) != markers:
        raise DatasetError(
            f"{where}: {markers} {POSE_MARKER} markers but {len(targets)} poses with "
            f"this id in {poses}"
        )
    return targets


def _llava_turns(conversations: object, where: str, images: int) -> list[tuple[str, str]]:
    """The (human, gpt) text pairs, `<image>` markers removed. As LLaVA reads them, the
    record's images are marked in its first human turn, one marker each."""
    if not isinstance(conversations, list) or not conversations:
        raise DatasetError(f"{where}: 'conversations' must be a non-empty list")
    # As LLaVA's loader, a gpt turn before the first human one is left out.
    first = conversations[0]
    start = int(isinstance(first, dict) and first.get("from") == "gpt" and len(conversations) > 1)
    if start and POSE_MARKER in str(first.get("value")):  # its pose would go unmatched
        raise DatasetError(
            f"{where}: turn 0: {POSE_MARKER} in a gpt turn before any human one, which is "
            "left out as LLaVA leaves it out"
        )
    texts = []
    for turn_number, turn in enumerate(conversations[start:], start):
        expected = "human" if (turn_number - start) % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DatasetError(
                f'{where}: turn {turn_number}: expected {{"from": ..., "value": text}}'
            )
        if turn.get("from") != expected:
            raise DatasetError(
                f"{where}: turn {turn_number}: expected 'from' {expected!r} (turns alternate "
                f"human/gpt), got {turn.get('from')!r}"
            )
        value = turn["value"]
        if expected == "human":
            markers = value.count(LLAVA_IMAGE_MARKER)
            if turn_number == start and markers != images:
                raise DatasetError(
                    f"{where}: turn {turn_number}: {markers} {LLAVA_IMAGE_MARKER} marker(s) "
                    f"for {images} image(s); LLaVA marks each image once in the first human turn"
                )
            if turn_number > start and markers:
                raise DatasetError(
                    f"{where}: turn {turn_number}: {LLAVA_IMAGE_MARKER} outside the first "
                    "human turn"
                )
            value = value.replace(LLAVA_IMAGE_MARKER, "").strip()
            if POSE_MARKER in value:
                raise DatasetError(f"{where}: turn {turn_number}: {POSE_MARKER} in a human turn")
            # Only the first message may be the image alone.
            if not value and (turn_number > start or not images):
                raise DatasetError(f"{where}: turn {turn_number}: empty human message")
        else:
            if LLAVA_IMAGE_MARKER in value:
                raise DatasetError(
                    f"{where}: turn {turn_number}: {LLAVA_IMAGE_MARKER} in a gpt turn"
                )
            value = value.strip()
            if not value:
                raise DatasetError(f"{where}: turn {turn_number}: empty gpt answer")
        texts.append(value)
    if len(texts) % 2:
        raise DatasetError(f"{where}: the last turn is a human turn without a gpt answer")
    return [(texts[i], texts[i + 1]) for i in range(0, len(texts), 2)]


def read_corpus(
    path: str | os.PathLike,
    *,
    split: str = "train",
    phrasing: str = "mixed",
    seed: int = 0,
    wording: str = "paper",  # prompts.WORDINGS: the base checkpoint's
) -> list[Example]:
    """The project's synthetic corpus file (`training/corpus.py`, `save_corpus`): one
    text_to_pose Example per record of `split` ("train", "val", "test" or "all")."""
    from inference_service.training import corpus  # numpy only, imported when needed

    corpus_path = Path(path)
    splits = ("train", "val", "test", "all")
    if split not in splits:
        raise DatasetError(f"{corpus_path}: split must be one of {splits}, got {split!r}")
    try:
        records = corpus.load_corpus(corpus_path)
    except FileNotFoundError:
        raise DatasetError(f"{corpus_path}: file not found") from None
    except ValueError as exc:  # names the file, the record and the field
        raise DatasetError(str(exc)) from None
    if records:
        _check_radians(np.stack([r.pose for r in records]), corpus_path, "record")
    chosen = [(i, r) for i, r in enumerate(records) if split == "all" or r.split == split]
    phraser = Phraser(phrasing, seed, wording)
    examples = []
    for index, record in chosen:
        question, answer = phraser.text(record.caption)
        examples.append(
            Example(
                "text_to_pose",
                question,
                answer,
                poses=(record.pose,),
                source=f"{corpus_path}#{index}",
                action=record.action if record.source.startswith("action:") else "",
            )
        )
    return examples


def examples_from_caption_pose_pairs(
    pairs: Iterable[tuple[str, object]],
    *,
    source: str = "pairs",
    phrasing: str = "mixed",
    seed: int = 0,
    wording: str = "paper",  # prompts.WORDINGS: the base checkpoint's
) -> list[Example]:
    """(caption, pose) pairs -> text_to_pose Examples; a pose is anything of shape (24, 3) or
    (72,) axis-angle (a `shared_protocol.pose.Pose` gives its `.axis_angle`).

    The adapter for generated data, such as the synthetic corpus (training/corpus.py).
    """
    phraser = Phraser(phrasing, seed, wording)
    examples = []
    for number, (caption, pose) in enumerate(pairs):
        where = f"{source}#{number}"
        if not isinstance(caption, str) or not caption.strip().rstrip(".!?,;: "):
            raise DatasetError(f"{where}: the caption must be a non-empty string")
        pose = getattr(pose, "axis_angle", pose)
        question, answer = phraser.text(caption)
        example = Example("text_to_pose", question, answer, poses=(pose,), source=where)
        _check_radians(example.poses[0][None], Path(where), "pose")  # as the file readers do
        examples.append(example)
    return examples


# --- dispatch by format name (the --data option) --------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """One `--data FORMAT PATH [KEY=VALUE ...]` of the command line."""

    format: str
    path: str
    options: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.format} {self.path}{extra}"

    def absolute(self) -> DataSpec:
        """The spec with its paths made absolute: what a report records, to be traced back
        from anywhere."""
        options = {
            key: str(Path(value).resolve()) if key in _PATH_OPTIONS else value
            for key, value in self.options.items()
        }
        return DataSpec(self.format, str(Path(self.path).resolve()), options)


# format -> the options it takes (beyond "phrasing" for pose formats)
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "posescript": ("poses", "amass", "index", "ids", "missing", "z_up", "phrasing"),
    "pairs": ("images", "frame", "crop", "phrasing"),
    "llava": ("poses", "images", "missing", "z_up"),
    "corpus": ("split", "phrasing"),
}


_PATH_OPTIONS = ("poses", "amass", "index", "ids", "images")


def parse_data_spec(words: Sequence[str]) -> DataSpec:
    """["posescript", "captions.json", "poses=poses.npz"] -> DataSpec; ValueError if bad."""
    if len(words) < 2:
        raise ValueError("--data needs a format and a path: --data FORMAT PATH [KEY=VALUE ...]")
    fmt, path, *rest = words
    path = os.path.expanduser(path)  # zsh leaves `poses=~/p.npz` as it is, and bash `--x=~`
    if fmt not in FORMAT_OPTIONS:
        raise ValueError(f"unknown data format {fmt!r}; known: {', '.join(FORMAT_OPTIONS)}")
    options = {}
    for word in rest:
        key, sep, value = word.partition("=")
        if not sep or key not in FORMAT_OPTIONS[fmt]:
            raise ValueError(
                f"--data {fmt}: expected KEY=VALUE with KEY one of "
                f"{', '.join(FORMAT_OPTIONS[fmt])}, got {word!r}"
            )
        if key in options:
            raise ValueError(f"--data {fmt}: {key}= given twice")
        if not value:  # an unset shell variable, say: it would mean the working folder
            raise ValueError(f"--data {fmt}: {key}= has no value")
        options[key] = os.path.expanduser(value) if key in _PATH_OPTIONS else value
    if fmt == "posescript":
        if ("poses" in options) == ("amass" in options) or ("amass" in options) != (
            "index" in options
        ):
            raise ValueError(
                "--data posescript CAPTIONS.json needs poses=POSES.npz, or amass=AMASS_DIR and "
                "index=ids_2_dataset_sequence_and_frame_index.json (PoseScript's release)"
            )
        if "missing" in options and "amass" not in options:
            raise ValueError("--data posescript: missing= goes with amass=")
    if options.get("missing", "error") not in ("error", "skip"):
        raise ValueError(f"--data {fmt}: missing= takes error or skip, not {options['missing']!r}")
    if options.get("crop", "auto") not in CROP_MODES:
        raise ValueError(
            f"--data {fmt}: crop= takes {', '.join(CROP_MODES)}, not {options['crop']!r}"
        )
    if options.get("frame", "upright") not in ("upright", "camera"):
        raise ValueError(f"--data {fmt}: frame= takes upright or camera, not {options['frame']!r}")
    return DataSpec(fmt, path, options)


def load_data(
    spec: DataSpec, seed: int = 0, wording: str = "paper", limit: int | None = None
) -> list[Example]:
    """Read the examples one `DataSpec` names, the service's questions in `wording` (the base
    checkpoint's), the first `limit` of them (image pairs past it are not read); DatasetError
    if the files are malformed or hold none (a file given for training that adds nothing is a
    mistake to say, not to skip)."""
    examples = _read_spec(spec, seed, wording, limit)[:limit]
    if not examples:
        raise DatasetError(f"--data {spec.describe()}: holds no examples")
    return examples


def _read_spec(spec: DataSpec, seed: int, wording: str, limit: int | None) -> list[Example]:
    options = spec.options
    phrasing = options.get("phrasing", "mixed")
    if phrasing not in PHRASING_MODES:
        raise DatasetError(f"--data {spec.describe()}: phrasing must be one of {PHRASING_MODES}")
    z_up = options.get("z_up")
    if z_up is not None and z_up.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise DatasetError(f"--data {spec.describe()}: z_up must be true or false")
    z_up = None if z_up is None else z_up.lower() in ("true", "1", "yes")
    if spec.format == "posescript":
        return read_posescript(
            spec.path,
            options.get("poses"),
            amass=options.get("amass"),
            index=options.get("index"),
            ids=options.get("ids"),
            skip_missing=options.get("missing") == "skip",
            z_up=z_up,
            phrasing=phrasing,
            seed=seed,
            wording=wording,
        )
    if spec.format == "pairs":
        return read_image_pose_pairs(
            spec.path,
            images=options.get("images"),
            camera_frame={"camera": True, "upright": False}.get(options.get("frame", "")),
            crop=options.get("crop", "auto"),
            phrasing=phrasing,
            seed=seed,
            wording=wording,
            limit=limit,
        )
    if spec.format == "llava":
        return read_llava_conversations(
            spec.path,
            poses=options.get("poses"),
            images=options.get("images"),
            skip_missing=options.get("missing") == "skip",
            z_up=z_up,
        )
    if spec.format == "corpus":
        return read_corpus(
            spec.path,
            split=options.get("split", "train"),
            phrasing=phrasing,
            seed=seed,
            wording=wording,
        )
    raise DatasetError(f"unknown data format {spec.format!r}")
