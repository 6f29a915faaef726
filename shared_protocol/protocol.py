"""Protocol v1: the messages between the Blender add-on and the inference service.

A message is a list of ZeroMQ frames. Frame 0 is the header, a UTF-8 JSON object; a pose
request may add image frames after it, raw PNG or JPEG bytes, one per image. This module turns
message objects into frames and back; it never touches a socket (clients use DEALER sockets,
the server a ROUTER, and the routing envelope belongs to them). PROTOCOL.md is the reference.

- `encode_request` / `encode_reply` build the frames and then run the matching decoder over
  them, so nothing leaves that the other side would reject. They raise `ProtocolError`
  (never `ValueError`), naming the bad field.
- `decode_request` / `decode_reply` check every field and every limit, and raise nothing but
  `ProtocolError`, whatever the frames hold. Header fields they do not know are ignored, so
  that a later version may add optional fields.

Constructing a message object checks nothing; encoding does. Lists given for sequence fields
are stored as tuples, so that a message equals its decoded copy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import ClassVar, Literal

from shared_protocol.pose import Pose

PROTOCOL_VERSION = 1
MODES = ("pose", "chat")
ROLES = ("user", "assistant")
REQUEST_OPS = ("status", "pose", "batch", "cancel")
REPLY_OPS = ("status", "pose", "batch_item", "batch_done", "cancel")
# ZeroMQ heartbeats both sides send on every connection: a connection that answers none within
# the timeout is closed (and the client's connects again), so a flow a firewall or NAT forgot
# without a word, or a peer that vanished, is not waited on until every request times out.
# A process paused longer (Ctrl-Z, a debugger, a laptop asleep) loses its connection too.
HEARTBEAT_INTERVAL_MS = 10_000
HEARTBEAT_TIMEOUT_MS = 60_000
# The environment variable a program starting a service sets to a token of its own, which the
# service's status replies give back as `instance`.
INSTANCE_ENV = "CHATPOSE_INSTANCE"
# Where a reply's (and a history turn's) text held the model's pose token, whatever string the
# model's own token is (the official release's is "[SEG]"): pose k of a reply was answered at
# its k-th marker.
POSE_MARKER = "<POSE>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# The longest side of an image, in times its shortest, that the server decodes (`bad_image`
# past it): the processors scale the short side up to the model's size, so a 1 x 60,000 strip
# of 320 bytes would cost gigabytes; no photo or viewport is this thin.
MAX_IMAGE_ASPECT_RATIO = 20
# The most pixels the server decodes (`bad_image` past it): Pillow's own guard against
# decompression bombs, kept so that a client can say so before it sends a picture.
MAX_IMAGE_PIXELS = 89_478_485


# Marks that show nothing, which `str.strip` keeps and pasted text brings: a byte order mark
# (zero-width no-break space), zero-width space, non-joiner and joiner, word joiner, soft
# hyphen, and the marks that set the direction of right-to-left text (left-to-right and
# Arabic marks, embeddings, overrides and isolates).
INVISIBLE_MARKS = (
    "\ufeff\u200b\u200c\u200d\u2060\u00ad"
    "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_EDGES = re.compile(f"^[\\s{INVISIBLE_MARKS}]+|[\\s{INVISIBLE_MARKS}]+$")


def trimmed(text: str) -> str:
    """``text`` without the whitespace and ``INVISIBLE_MARKS`` at its ends."""
    return _EDGES.sub("", text)


def is_blank(text: str) -> bool:
    """Whether a prompt shows nothing to answer: whitespace and ``INVISIBLE_MARKS`` only."""
    return not trimmed(text)


def readable_text(text: str) -> str:
    """A reply's text for people: each POSE_MARKER as "[pose k]", the pose answered there."""
    parts = text.split(POSE_MARKER)
    return "".join(f"{part}[pose {k}]" for k, part in enumerate(parts[:-1], 1)) + parts[-1]


_MAX_SAFE_INT = 2**53 - 1  # the largest integer every JSON reader holds exactly
_MAX_PROBLEM_CHARS = 300  # how much of another module's error message a ProtocolError quotes

Mode = Literal["pose", "chat"]
Role = Literal["user", "assistant"]


class ErrorCode(StrEnum):
    """Why a request failed. Closed: a decoder rejects any code not listed here.

    `ErrorCode.BUSY == "busy"`; PROTOCOL.md's table says what each code means.
    `UNREACHABLE` is client-side only and is never sent on the wire.
    """

    BAD_JSON = "bad_json"
    BAD_SCHEMA = "bad_schema"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    UNKNOWN_OP = "unknown_op"
    TOO_LARGE = "too_large"
    BAD_IMAGE = "bad_image"
    EMPTY_PROMPT = "empty_prompt"
    UNSUPPORTED_INPUT = "unsupported_input"
    BUSY = "busy"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    MODEL_ERROR = "model_error"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"
    UNREACHABLE = "unreachable"

    @property
    def on_wire(self) -> bool:
        """False for codes that a client makes up itself and that are never sent."""
        return self is not ErrorCode.UNREACHABLE


class ProtocolError(Exception):
    """A message that breaks protocol v1, or a request that failed with an error code.

    `field` is the dotted path of the bad field (`history[2].role`, `poses[0].axis_angle`,
    `header`, `images[1]`, `frames`) or None. `request_id` and `op` are filled whenever frame 0
    parsed far enough to show a valid id / a known op, even when the fault lies elsewhere, so
    that the server can still address its error reply (see `error_reply_for`).
    """

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        field: str | None = None,
        request_id: str | None = None,
        op: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.field = field
        self.request_id = request_id
        self.op = op

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    def __reduce__(self):  # so that copy.copy and multiprocessing can rebuild it
        return type(self), (self.code, self.message), self.__dict__


@dataclass(frozen=True)
class Limits:
    """Size limits a decoder enforces; exceeding any of them is `too_large`.

    Both sides use DEFAULT_LIMITS unless configured otherwise. Every value must be >= 1.
    """

    max_header_bytes: int = 1 << 20  # frame 0, the UTF-8 JSON header
    max_frames: int = 9  # all frames of one message: the header and the images
    max_images: int = 8  # image frames in one pose request
    max_image_bytes: int = 16 << 20  # one image frame
    max_prompt_chars: int = 8_000  # a pose request's prompt; each batch prompt
    max_text_chars: int = 64_000  # a history turn, a reply's text, an error message
    max_history_turns: int = 64
    max_batch_items: int = 256  # prompts in one batch request
    max_poses: int = 32  # poses in one reply
    max_id_chars: int = 128  # a request id, a cancel target
    max_name_chars: int = 256  # the strings of a status reply
    max_timeout_ms: int = 3_600_000  # the largest timeout_ms a request may ask for

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{item.name}: expected an integer >= 1, got {value!r}")


DEFAULT_LIMITS = Limits()


# --- messages ---------------------------------------------------------------------------------


def _freeze(message: object, *names: str) -> None:
    """Stores list fields as tuples, so that equality with a decoded message holds."""
    for name in names:
        value = getattr(message, name)
        if isinstance(value, list):
            object.__setattr__(message, name, tuple(value))


@dataclass(frozen=True)
class Turn:
    """One earlier turn of the conversation, sent with a pose request."""

    role: Role
    text: str


@dataclass(frozen=True)
class StatusRequest:
    op: ClassVar[str] = "status"
    id: str

    def _body(self) -> dict:
        return {}


@dataclass(frozen=True)
class PoseRequest:
    """A prompt and/or images; the reply is one PoseReply (or an ErrorReply)."""

    op: ClassVar[str] = "pose"
    id: str
    prompt: str
    images: tuple[bytes, ...] = ()
    history: tuple[Turn, ...] = ()
    mode: Mode = "pose"
    timeout_ms: int | None = None

    def __post_init__(self) -> None:
        _freeze(self, "images", "history")

    def _body(self) -> dict:
        return {
            "prompt": self.prompt,
            "images": len(_sequence(self.images, "images")),
            "history": [
                _turn_out(t, f"history[{i}]") for i, t in _indexed(self.history, "history")
            ],
            "mode": self.mode,
            "timeout_ms": self.timeout_ms,
        }


@dataclass(frozen=True)
class BatchRequest:
    """Several text prompts, answered item by item: BatchItemReply each, then BatchDoneReply."""

    op: ClassVar[str] = "batch"
    id: str
    prompts: tuple[str, ...]
    mode: Mode = "pose"
    timeout_ms: int | None = None  # applies to each item on its own

    def __post_init__(self) -> None:
        _freeze(self, "prompts")

    def _body(self) -> dict:
        return {
            "prompts": list(_sequence(self.prompts, "prompts")),
            "mode": self.mode,
            "timeout_ms": self.timeout_ms,
        }


@dataclass(frozen=True)
class CancelRequest:
    """Stop the request whose id is `target`."""

    op: ClassVar[str] = "cancel"
    id: str
    target: str

    def _body(self) -> dict:
        return {"target": self.target}


@dataclass(frozen=True)
class StatusReply:
    op: ClassVar[str] = "status"
    id: str
    model: str
    device: str
    dtype: str
    queue_depth: int
    uptime_s: float
    version: str
    supports_images: bool
    max_images: int  # 0 when supports_images is False
    # Which service answers (its INSTANCE_ENV, or made up at its start): whoever started it
    # can tell it from another service listening there (None: not said, as by services
    # before it was added). Not a process id: a Windows venv's python.exe is a launcher that
    # runs the real interpreter as a child.
    instance: str | None = None

    def _body(self) -> dict:
        body = {
            "ok": True,
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "queue_depth": self.queue_depth,
            "uptime_s": self.uptime_s,
            "version": self.version,
            "supports_images": self.supports_images,
            "max_images": self.max_images,
        }
        if self.instance is not None:
            body["instance"] = self.instance
        return body


@dataclass(frozen=True)
class PoseReply:
    """The answer to a PoseRequest: one pose per person; none is valid (chat mode).
    `truncated`: a chat reply cut at the service's limit of new tokens, not ended by the model
    (written only when true). `history_left_out`: how many of the request's oldest history
    turns the model did not see, to fit its context (written only when not 0)."""

    op: ClassVar[str] = "pose"
    id: str
    text: str
    poses: tuple[Pose, ...] = ()
    truncated: bool = False
    history_left_out: int = 0

    def __post_init__(self) -> None:
        _freeze(self, "poses")

    def _body(self) -> dict:
        body = {"ok": True, "text": self.text, "poses": _poses_out(self.poses)}
        if self.truncated:
            body["truncated"] = True
        if self.history_left_out:
            body["history_left_out"] = self.history_left_out
        return body


@dataclass(frozen=True)
class BatchItemReply:
    """The answer to prompt `index` of a batch of `total`, sent as soon as it is ready.
    `truncated`, as a PoseReply's: a chat-mode item cut at the service's limit of new tokens."""

    op: ClassVar[str] = "batch_item"
    id: str
    index: int
    total: int
    text: str
    poses: tuple[Pose, ...] = ()
    truncated: bool = False

    def __post_init__(self) -> None:
        _freeze(self, "poses")

    def _body(self) -> dict:
        body = {
            "ok": True,
            "index": self.index,
            "total": self.total,
            "text": self.text,
            "poses": _poses_out(self.poses),
        }
        return {**body, "truncated": True} if self.truncated else body


@dataclass(frozen=True)
class BatchDoneReply:
    """The last reply of a batch that ran to its end; `completed` items succeeded."""

    op: ClassVar[str] = "batch_done"
    id: str
    total: int
    completed: int

    def _body(self) -> dict:
        return {"ok": True, "total": self.total, "completed": self.completed}


@dataclass(frozen=True)
class CancelReply:
    """`cancelled` is False when the target was unknown or had already finished."""

    op: ClassVar[str] = "cancel"
    id: str
    target: str
    cancelled: bool

    def _body(self) -> dict:
        return {"ok": True, "target": self.target, "cancelled": self.cancelled}


@dataclass(frozen=True)
class ErrorReply:
    """A failed request. `id` and `op` are None when the request's header did not show them;
    `index` names the failed item of a batch (op "batch"), which then goes on."""

    id: str | None
    op: str | None
    code: ErrorCode
    message: str
    index: int | None = None

    def _body(self) -> dict:
        body: dict = {"ok": False, "error": {"code": self.code, "message": self.message}}
        if self.index is not None:
            body["index"] = self.index
        return body


Request = StatusRequest | PoseRequest | BatchRequest | CancelRequest
Reply = StatusReply | PoseReply | BatchItemReply | BatchDoneReply | CancelReply | ErrorReply


def is_final(reply: Reply) -> bool:
    """Whether a reply ends its request: all but a batch item and a batch item's error."""
    if isinstance(reply, ErrorReply):
        return reply.index is None
    return not isinstance(reply, BatchItemReply)


def error_reply_for(err: ProtocolError, op: str | None = None) -> ErrorReply:
    """The error reply a server sends when `decode_request` (or later work) raised `err`.

    `op` defaults to the request op the error saw in the header, if any. An UNREACHABLE error
    cannot be encoded: that code is never sent.
    """
    return ErrorReply(
        id=err.request_id,
        op=op if op is not None else err.op,
        code=err.code,
        message=err.message,
    )


# --- field reading ----------------------------------------------------------------------------

_REQUIRED = object()


def _fail(code: ErrorCode, field: str | None, problem: str) -> ProtocolError:
    return ProtocolError(code, f"{field}: {problem}" if field else problem, field=field)


def _kind(value: object) -> str:
    """The JSON name of a value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, name in ((int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, kind):
            return name
    return {list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    """A short, safe rendering of a value for an error message."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, float):
        return repr(value)
    return _kind(value)


def _wrong_type(path: str, expected: str, value: object) -> ProtocolError:
    got = _show(value) if isinstance(value, int | float | str) else _kind(value)
    return _fail(ErrorCode.BAD_SCHEMA, path, f"must be {expected}, got {got}")


def _string(value: object, path: str, *, max_chars: float) -> str:
    if not isinstance(value, str):
        raise _wrong_type(path, "a string", value)
    if len(value) > max_chars:
        raise _fail(
            ErrorCode.TOO_LARGE, path, f"has {len(value)} characters; the limit is {max_chars}"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(ErrorCode.BAD_SCHEMA, path, "holds a lone surrogate") from None
    return value


def _ident(value: object, path: str, *, max_chars: int) -> str:
    """A request id: non-empty printable text of bounded length."""
    text = _string(value, path, max_chars=max_chars)
    if not text:
        raise _fail(ErrorCode.BAD_SCHEMA, path, "must not be empty")
    if not text.isprintable():
        raise _fail(ErrorCode.BAD_SCHEMA, path, "must not hold control characters")
    return text


def _out_of_range(path: str, value: float, lo: float | None, hi: float | None) -> ProtocolError:
    if lo is not None and hi is not None and hi < _MAX_SAFE_INT:
        wanted = f"between {lo} and {hi}"
    elif lo is not None and value < lo:
        wanted = f">= {lo}"
    else:
        wanted = f"<= {hi}"
    return _fail(ErrorCode.BAD_SCHEMA, path, f"must be {wanted}, got {_show(value)}")


def _integer(
    value: object, path: str, *, lo: int | None = None, hi: int | None = _MAX_SAFE_INT
) -> int:
    """An integer (not a boolean) in lo..hi; hi defaults to the largest JSON-safe integer."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(path, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _out_of_range(path, value, lo, hi)
    return value


def _number(value: object, path: str, *, lo: float, hi: float = _MAX_SAFE_INT) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(path, "a number", value)
    if not (lo <= value <= hi):  # exact for any int or float, however large
        raise _out_of_range(path, value, lo, hi)
    return float(value)


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type(path, "true or false", value)
    return value


def _choice(value: object, path: str, *, allowed: Sequence[str]) -> str:
    if not (isinstance(value, str) and value in allowed):
        choices = ", ".join(repr(a) for a in allowed)
        got = _show(value) if isinstance(value, str) else _kind(value)
        raise _fail(ErrorCode.BAD_SCHEMA, path, f"must be one of {choices}, got {got}")
    return value


def _array(value: object, path: str, *, max_items: int) -> list[tuple[str, object]]:
    """The items of a JSON array, each with its own path."""
    if not isinstance(value, list):
        raise _wrong_type(path, "an array", value)
    if len(value) > max_items:
        raise _fail(ErrorCode.TOO_LARGE, path, f"has {len(value)} items; the limit is {max_items}")
    return [(f"{path}[{i}]", item) for i, item in enumerate(value)]


def _or_null(check: Callable[..., object]) -> Callable[..., object]:
    def checked(value: object, path: str, **options: object) -> object:
        return None if value is None else check(value, path, **options)

    return checked


def _object(value: object, path: str) -> _Fields:
    return _Fields(value, path)


class _Fields:
    """Typed reads from one JSON object; every failure names the field's dotted path."""

    def __init__(self, obj: object, path: str = "") -> None:
        if not isinstance(obj, dict):
            raise _wrong_type(path or "header", "an object", obj)
        self._obj = obj
        self._path = path

    def path(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def get(self, key: str, check: Callable[..., object], default: object = _REQUIRED, **options):
        """`check(value, path, **options)` on the field, or `default` when it is absent."""
        if key not in self._obj:
            if default is _REQUIRED:
                raise _fail(ErrorCode.BAD_SCHEMA, self.path(key), "missing")
            return default
        return check(self._obj[key], self.path(key), **options)


# --- frames and JSON --------------------------------------------------------------------------


def _frame_bytes(frame: object, path: str, max_bytes: float) -> bytes:
    """A frame as bytes, after checking its type and size (before copying anything)."""
    if type(frame) is bytes:
        size = len(frame)
    elif isinstance(frame, bytes | bytearray | memoryview):
        try:
            view = memoryview(frame)
            size = view.nbytes
        except (ValueError, TypeError, BufferError) as exc:  # e.g. a released memoryview
            raise _fail(ErrorCode.BAD_SCHEMA, path, f"cannot be read ({exc})") from None
    else:
        raise _fail(
            ErrorCode.BAD_SCHEMA,
            path,
            f"must be bytes, bytearray or memoryview, got {type(frame).__name__}",
        )
    if size > max_bytes:
        raise _fail(ErrorCode.TOO_LARGE, path, f"is {size} bytes; the limit is {max_bytes}")
    return frame if type(frame) is bytes else view.tobytes()


def _header_frame(frames: object, limits: Limits) -> bytes:
    if not isinstance(frames, list | tuple):
        raise _fail(
            ErrorCode.BAD_SCHEMA, "frames", f"must be a list of frames, got {type(frames).__name__}"
        )
    if not frames:
        raise _fail(ErrorCode.BAD_SCHEMA, "frames", "is empty; frame 0 must be the JSON header")
    return _frame_bytes(frames[0], "header", limits.max_header_bytes)


def _image_frames(frames: list | tuple, limits: Limits, *, allowed: bool) -> list[bytes]:
    """Frames 1.. : counted, sized and sniffed for PNG/JPEG before any JSON is parsed."""
    if len(frames) > limits.max_frames:
        raise _fail(
            ErrorCode.TOO_LARGE,
            "frames",
            f"has {len(frames)} frames; the limit is {limits.max_frames}",
        )
    count = len(frames) - 1
    if count and not allowed:
        raise _fail(ErrorCode.BAD_SCHEMA, "frames", f"a reply is 1 frame, got {len(frames)}")
    if count > limits.max_images:
        raise _fail(
            ErrorCode.TOO_LARGE, "images", f"{count} images; the limit is {limits.max_images}"
        )
    images = []
    for k, frame in enumerate(frames[1:]):
        path = f"images[{k}]"
        data = _frame_bytes(frame, path, limits.max_image_bytes)
        if not data.startswith((PNG_MAGIC, JPEG_MAGIC)):
            problem = "is empty" if not data else "is not a PNG or JPEG image (by its first bytes)"
            raise _fail(ErrorCode.BAD_IMAGE, path, problem)
        images.append(data)
    return images


def _bad_json(problem: str) -> ProtocolError:
    return _fail(ErrorCode.BAD_JSON, "header", problem)


class RepeatedKeyError(Exception):
    """A JSON object repeats a key; ``args[0]`` is the key (the first one repeated)."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads``'s ``object_pairs_hook`` for JSON whose objects must not repeat a key
    (json keeps the last silently): the object, or RepeatedKeyError."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKeyError(key)
            seen.add(key)
    return obj


def _reject_constant(name: str) -> float:
    raise _bad_json(f"holds {name}, which strict JSON does not allow")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _bad_json(f"holds the number {text[:40]}, which is out of range")
    return number


def _parse_header(data: bytes) -> dict:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_json(f"is not valid UTF-8 (at byte {exc.start})") from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=unique_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except RepeatedKeyError as exc:
        raise _bad_json(f"repeats the key {_show(exc.args[0])}") from None
    except RecursionError:
        raise _bad_json("is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer with too many digits
        raise _bad_json(f"is not valid JSON ({str(exc)[:_MAX_PROBLEM_CHARS]})") from None
    if not isinstance(obj, dict):
        raise _fail(ErrorCode.BAD_SCHEMA, "header", f"must be a JSON object, got {_kind(obj)}")
    return obj


def _address(header: dict, limits: Limits, ops: Sequence[str]) -> tuple[str | None, str | None]:
    """The header's id and op where they are valid; never raises."""
    rid, op = header.get("id"), header.get("op")
    try:
        rid = _ident(rid, "id", max_chars=limits.max_id_chars)
    except ProtocolError:
        rid = None
    return rid, op if isinstance(op, str) and op in ops else None


# --- decoding ---------------------------------------------------------------------------------

# Each decoder reads one op's fields: (header, request id, image frames, limits) -> message.
_Decoder = Callable[[_Fields, str, list[bytes], Limits], Request | Reply]


def _turn(value: object, path: str, limits: Limits) -> Turn:
    turn = _Fields(value, path)
    return Turn(
        role=turn.get("role", _choice, allowed=ROLES),
        text=turn.get("text", _string, max_chars=limits.max_text_chars),
    )


_POSE_FIELDS = ("layout", "axis_angle", "translation", "label")


def _pose(value: object, path: str) -> Pose:
    try:
        return Pose.from_dict(value)
    except ValueError as exc:  # Pose says "field: problem"
        name, sep, problem = str(exc).partition(": ")
        if not sep or name not in (*_POSE_FIELDS, "pose"):
            name, problem = "pose", str(exc)
        field = path if name == "pose" else f"{path}.{name}"
        raise _fail(ErrorCode.BAD_SCHEMA, field, problem[:_MAX_PROBLEM_CHARS]) from None
    except Exception as exc:  # another module's code: whatever it raises stays a ProtocolError
        raise _fail(
            ErrorCode.BAD_SCHEMA, path, f"is not a valid pose ({type(exc).__name__})"
        ) from None


def _poses(header: _Fields, limits: Limits) -> tuple[Pose, ...]:
    items = header.get("poses", _array, max_items=limits.max_poses)
    return tuple(_pose(value, path) for path, value in items)


def _mode_and_timeout(header: _Fields, limits: Limits) -> tuple[str, int | None]:
    return (
        header.get("mode", _choice, default="pose", allowed=MODES),
        header.get("timeout_ms", _or_null(_integer), default=None, lo=1, hi=limits.max_timeout_ms),
    )


def _decode_status_request(header, rid, images, limits) -> StatusRequest:
    return StatusRequest(id=rid)


def _decode_pose_request(header, rid, images, limits) -> PoseRequest:
    prompt = header.get("prompt", _string, max_chars=limits.max_prompt_chars)
    count = header.get("images", _integer, default=0, lo=0)
    if count > limits.max_images:
        raise _fail(ErrorCode.TOO_LARGE, "images", f"is {count}; the limit is {limits.max_images}")
    if count != len(images):
        raise _fail(
            ErrorCode.BAD_SCHEMA,
            "images",
            f"says {count}, but {len(images)} image frame(s) follow the header",
        )
    turns = header.get("history", _array, default=[], max_items=limits.max_history_turns)
    history = tuple(_turn(value, path, limits) for path, value in turns)
    mode, timeout_ms = _mode_and_timeout(header, limits)
    if is_blank(prompt) and not images:
        raise _fail(ErrorCode.EMPTY_PROMPT, "prompt", "is blank and no image is attached")
    return PoseRequest(rid, prompt, tuple(images), history, mode, timeout_ms)


def _decode_batch_request(header, rid, images, limits) -> BatchRequest:
    items = header.get("prompts", _array, max_items=limits.max_batch_items)
    if not items:
        raise _fail(ErrorCode.EMPTY_PROMPT, "prompts", "holds no prompts")
    prompts = tuple(_string(v, path, max_chars=limits.max_prompt_chars) for path, v in items)
    for (path, _), prompt in zip(items, prompts, strict=True):
        if is_blank(prompt):
            raise _fail(ErrorCode.EMPTY_PROMPT, path, "is blank")
    mode, timeout_ms = _mode_and_timeout(header, limits)
    return BatchRequest(rid, prompts, mode, timeout_ms)


def _decode_cancel_request(header, rid, images, limits) -> CancelRequest:
    return CancelRequest(rid, header.get("target", _ident, max_chars=limits.max_id_chars))


def _decode_status_reply(header, rid, images, limits) -> StatusReply:
    def name(key: str) -> str:
        return header.get(key, _string, max_chars=limits.max_name_chars)

    reply = StatusReply(
        id=rid,
        model=name("model"),
        device=name("device"),
        dtype=name("dtype"),
        queue_depth=header.get("queue_depth", _integer, lo=0),
        uptime_s=header.get("uptime_s", _number, lo=0.0),
        version=name("version"),
        supports_images=header.get("supports_images", _boolean),
        max_images=header.get("max_images", _integer, lo=0),
        instance=header.get("instance", _string, default=None, max_chars=limits.max_name_chars),
    )
    if reply.max_images and not reply.supports_images:
        raise _fail(ErrorCode.BAD_SCHEMA, "max_images", "must be 0 when supports_images is false")
    return reply


def _decode_pose_reply(header, rid, images, limits) -> PoseReply:
    text = header.get("text", _string, max_chars=limits.max_text_chars)
    truncated = header.get("truncated", _boolean, default=False)
    left_out = header.get(
        "history_left_out", _integer, default=0, lo=0, hi=limits.max_history_turns
    )
    return PoseReply(rid, text, _poses(header, limits), truncated, left_out)


def _batch_total(header: _Fields, limits: Limits) -> int:
    total = header.get("total", _integer, lo=1)
    if total > limits.max_batch_items:
        raise _fail(
            ErrorCode.TOO_LARGE, "total", f"is {total}; the limit is {limits.max_batch_items}"
        )
    return total


def _decode_batch_item_reply(header, rid, images, limits) -> BatchItemReply:
    total = _batch_total(header, limits)
    return BatchItemReply(
        id=rid,
        index=header.get("index", _integer, lo=0, hi=total - 1),
        total=total,
        text=header.get("text", _string, max_chars=limits.max_text_chars),
        poses=_poses(header, limits),
        truncated=header.get("truncated", _boolean, default=False),
    )


def _decode_batch_done_reply(header, rid, images, limits) -> BatchDoneReply:
    total = _batch_total(header, limits)
    return BatchDoneReply(rid, total, header.get("completed", _integer, lo=0, hi=total))


def _decode_cancel_reply(header, rid, images, limits) -> CancelReply:
    return CancelReply(
        id=rid,
        target=header.get("target", _ident, max_chars=limits.max_id_chars),
        cancelled=header.get("cancelled", _boolean),
    )


_WIRE_CODES = tuple(code.value for code in ErrorCode if code.on_wire)


def _error_code(value: object, path: str) -> ErrorCode:
    if value == ErrorCode.UNREACHABLE.value:
        raise _fail(ErrorCode.BAD_SCHEMA, path, "'unreachable' is client-side only, never sent")
    return ErrorCode(_choice(value, path, allowed=_WIRE_CODES))


def _decode_error_reply(header: _Fields, limits: Limits) -> ErrorReply:
    rid = header.get("id", _or_null(_ident), max_chars=limits.max_id_chars)
    op = header.get("op", _or_null(_choice), allowed=REQUEST_OPS)
    error = header.get("error", _object)
    code = error.get("code", _error_code)
    message = error.get("message", _string, max_chars=limits.max_text_chars)
    index = header.get(
        "index", _or_null(_integer), default=None, lo=0, hi=limits.max_batch_items - 1
    )
    if index is not None and op != BatchRequest.op:
        raise _fail(ErrorCode.BAD_SCHEMA, "index", "is only allowed when op is 'batch'")
    return ErrorReply(rid, op, code, message, index)


_REQUEST_DECODERS: dict[str, _Decoder] = {
    StatusRequest.op: _decode_status_request,
    PoseRequest.op: _decode_pose_request,
    BatchRequest.op: _decode_batch_request,
    CancelRequest.op: _decode_cancel_request,
}

_REPLY_DECODERS: dict[str, _Decoder] = {
    StatusReply.op: _decode_status_reply,
    PoseReply.op: _decode_pose_reply,
    BatchItemReply.op: _decode_batch_item_reply,
    BatchDoneReply.op: _decode_batch_done_reply,
    CancelReply.op: _decode_cancel_reply,
}


def _decode(frames: object, limits: Limits, *, request: bool) -> Request | Reply:
    """Frame checks, then the JSON header, then the op's fields; errors carry the id if known."""
    data = _header_frame(frames, limits)
    ops = REQUEST_OPS if request else (*REPLY_OPS, *REQUEST_OPS)
    try:
        images = _image_frames(frames, limits, allowed=request)
    except ProtocolError as err:
        try:  # best effort, so that even this error can be addressed
            err.request_id, err.op = _address(_parse_header(data), limits, ops)
        except ProtocolError:
            pass
        raise
    obj = _parse_header(data)
    request_id, op = _address(obj, limits, ops)
    try:
        header = _Fields(obj)
        version = header.get("protocol", _integer, hi=None)
        if version != PROTOCOL_VERSION:
            raise _fail(
                ErrorCode.UNSUPPORTED_PROTOCOL,
                "protocol",
                f"version {_show(version)} is not supported; this side speaks {PROTOCOL_VERSION}",
            )
        return _read_request(header, images, limits) if request else _read_reply(header, limits)
    except ProtocolError as err:
        err.request_id, err.op = request_id, op
        raise


def _op_decoder(header: _Fields, table: dict[str, _Decoder]) -> _Decoder:
    op = header.get("op", _string, max_chars=math.inf)  # any length: unknown, not too large
    if op not in table:
        raise _fail(ErrorCode.UNKNOWN_OP, "op", f"{_show(op)} is not one of {', '.join(table)}")
    return table[op]


def _read_request(header: _Fields, images: list[bytes], limits: Limits) -> Request:
    decoder = _op_decoder(header, _REQUEST_DECODERS)
    rid = header.get("id", _ident, max_chars=limits.max_id_chars)
    if images and decoder is not _decode_pose_request:
        raise _fail(
            ErrorCode.BAD_SCHEMA,
            "frames",
            f"only a pose request carries images; this one has {len(images)} image frame(s)",
        )
    return decoder(header, rid, images, limits)


def _read_reply(header: _Fields, limits: Limits) -> Reply:
    if not header.get("ok", _boolean):
        return _decode_error_reply(header, limits)
    decoder = _op_decoder(header, _REPLY_DECODERS)
    rid = header.get("id", _ident, max_chars=limits.max_id_chars)
    return decoder(header, rid, [], limits)


def decode_request(frames: Sequence[bytes], limits: Limits = DEFAULT_LIMITS) -> Request:
    """The request that `frames` hold; raises ProtocolError and nothing else."""
    return _decode(frames, limits, request=True)


def decode_reply(frames: Sequence[bytes], limits: Limits = DEFAULT_LIMITS) -> Reply:
    """The reply that `frames` hold; raises ProtocolError and nothing else."""
    return _decode(frames, limits, request=False)


# --- encoding ---------------------------------------------------------------------------------


def _sequence(value: object, path: str) -> tuple | list:
    if not isinstance(value, tuple | list):
        raise _fail(
            ErrorCode.BAD_SCHEMA, path, f"must be a tuple or list, got {type(value).__name__}"
        )
    return value


def _indexed(value: object, path: str):
    return enumerate(_sequence(value, path))


def _turn_out(turn: object, path: str) -> dict:
    if not isinstance(turn, Turn):
        raise _fail(ErrorCode.BAD_SCHEMA, path, f"must be a Turn, got {type(turn).__name__}")
    return {"role": turn.role, "text": turn.text}


def _poses_out(poses: object) -> list[dict]:
    out = []
    for i, pose in _indexed(poses, "poses"):
        if not isinstance(pose, Pose):
            raise _fail(
                ErrorCode.BAD_SCHEMA, f"poses[{i}]", f"must be a Pose, got {type(pose).__name__}"
            )
        out.append(pose.to_dict())
    return out


def _image_out(image: object, path: str) -> bytes:
    if not isinstance(image, bytes | bytearray | memoryview):
        raise _fail(
            ErrorCode.BAD_SCHEMA,
            path,
            f"must be bytes, bytearray or memoryview, got {type(image).__name__}",
        )
    return _frame_bytes(image, path, math.inf)


_JSON_OPTIONS = {"allow_nan": False, "separators": (",", ":")}


def _json_problem(value: object) -> str | None:
    try:
        json.dumps(value, **_JSON_OPTIONS)
    except (TypeError, ValueError, RecursionError) as exc:
        return str(exc)[:_MAX_PROBLEM_CHARS]
    return None


def _dump(header: dict) -> bytes:
    try:
        return json.dumps(header, ensure_ascii=False, **_JSON_OPTIONS).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate: written as a JSON escape, it reaches the decoder, which names the field.
        return json.dumps(header, **_JSON_OPTIONS).encode("ascii")
    except (TypeError, ValueError, RecursionError):
        key, problem = next((k, p) for k, v in header.items() if (p := _json_problem(v)))
        raise _fail(ErrorCode.BAD_SCHEMA, key, f"cannot be written as JSON ({problem})") from None


def _encode(message: object, kinds: tuple[type, ...], what: str) -> list[bytes]:
    if not isinstance(message, kinds):
        raise ProtocolError(
            ErrorCode.BAD_SCHEMA, f"cannot encode a {type(message).__name__} as a {what}"
        )
    header = {"protocol": PROTOCOL_VERSION, "op": message.op, "id": message.id}
    header.update(message._body())
    frames = [_dump(header)]
    if isinstance(message, PoseRequest):
        frames += [_image_out(img, f"images[{k}]") for k, img in _indexed(message.images, "images")]
    return frames


def encode_request(message: Request, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """The frames of a request, checked as `decode_request` checks them; raises ProtocolError."""
    frames = _encode(message, (StatusRequest, PoseRequest, BatchRequest, CancelRequest), "request")
    decode_request(frames, limits)
    return frames


def timeout_ms_within(wait_s: float, limits: Limits = DEFAULT_LIMITS) -> int:
    """A request's `timeout_ms` for a client that waits `wait_s` for its answer: the service
    drops work not started by then. A little less (a tenth, at most a second), so that the
    service's own `timeout` reply, saying that other work held the model, comes before the
    client stops waiting; at most the protocol's limit."""
    wait_ms = wait_s * 1000
    return max(1, int(min(wait_ms - min(wait_ms / 10, 1000), limits.max_timeout_ms)))


def encode_reply(message: Reply, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """The frames of a reply, checked as `decode_reply` checks them; raises ProtocolError."""
    kinds = (StatusReply, PoseReply, BatchItemReply, BatchDoneReply, CancelReply, ErrorReply)
    frames = _encode(message, kinds, "reply")
    decode_reply(frames, limits)
    return frames


__all__ = [
    "DEFAULT_LIMITS",
    "JPEG_MAGIC",
    "MODES",
    "PNG_MAGIC",
    "PROTOCOL_VERSION",
    "REPLY_OPS",
    "REQUEST_OPS",
    "ROLES",
    "BatchDoneReply",
    "BatchItemReply",
    "BatchRequest",
    "CancelReply",
    "CancelRequest",
    "ErrorCode",
    "ErrorReply",
    "Limits",
    "PoseReply",
    "PoseRequest",
    "ProtocolError",
    "RepeatedKeyError",
    "Reply",
    "Request",
    "StatusReply",
    "StatusRequest",
    "Turn",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "error_reply_for",
    "unique_keys",
]
