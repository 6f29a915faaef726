"""Protocol v1: round trips, every decoder error with its field, encoder checks, PROTOCOL.md."""

import copy
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from shared_protocol.pose import Pose
from shared_protocol.protocol import (
    DEFAULT_LIMITS,
    JPEG_MAGIC,
    PNG_MAGIC,
    REPLY_OPS,
    REQUEST_OPS,
    BatchDoneReply,
    BatchItemReply,
    BatchRequest,
    CancelReply,
    CancelRequest,
    ErrorCode,
    ErrorReply,
    Limits,
    PoseReply,
    PoseRequest,
    ProtocolError,
    StatusReply,
    StatusRequest,
    Turn,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    error_reply_for,
)

PNG = PNG_MAGIC + b"\x00\x00\x00\rIHDR fake png body"
JPEG = JPEG_MAGIC + b"\xe0 fake jpeg body"
PROTOCOL_MD = Path(__file__).resolve().parent.parent / "shared_protocol" / "PROTOCOL.md"


def pose(seed: int, label: str | None = None, translation: bool = True) -> Pose:
    rng = np.random.default_rng(seed)
    return Pose(
        rng.normal(scale=0.4, size=(24, 3)), rng.normal(size=3) if translation else None, label
    )


def header(**fields) -> bytes:
    return json.dumps(fields).encode()


def request(op: str = "pose", **fields) -> dict:
    base = {"protocol": 1, "op": op, "id": "r1"}
    if op == "pose":
        base["prompt"] = "wave with the left hand"
    return {**base, **fields}


def reply(op: str = "pose", **fields) -> dict:
    base = {"protocol": 1, "op": op, "id": "r1", "ok": True}
    if op == "pose":
        base.update(text="", poses=[])
    return {**base, **fields}


def frames_of(obj: dict, *images: bytes) -> list[bytes]:
    return [json.dumps(obj).encode(), *images]


# --- round trips ------------------------------------------------------------------------------

REQUESTS = [
    StatusRequest("s-1"),
    PoseRequest("r1", "kneel on one knee"),
    PoseRequest(
        "r2",
        "now like the person in these photos",
        images=(PNG, JPEG),
        history=(Turn("user", "kneel"), Turn("assistant", "Here you go: <POSE>")),
        mode="chat",
        timeout_ms=30_000,
    ),
    PoseRequest("r3", "", images=(JPEG,)),  # an image alone is enough
    PoseRequest("ünïcødé ✓", "ジャンプする人", history=(Turn("user", ""),)),
    BatchRequest("b1", ("stand", "sit", "jump"), mode="pose", timeout_ms=1),
    BatchRequest("b2", ("wave",)),
    CancelRequest("c1", "b1"),
]

REPLIES = [
    StatusReply("s-1", "chatpose-llava-13b", "cuda:0", "bfloat16", 3, 12.25, "0.1.0", True, 4),
    StatusReply("s-2", "demo", "cpu", "float32", 0, 0, "0.1.0", False, 0),
    StatusReply("s-3", "demo", "cpu", "float32", 0, 0, "0.1.0", False, 0, instance="3f9c0a1b"),
    PoseReply("r1", "Kneeling.", (pose(1, "kneel"),)),
    PoseReply("r2", "Two people: one waving, one sitting.", (pose(2), pose(3, None, False))),
    PoseReply("r3", "Just chatting, no pose."),
    PoseReply("r4", "Let me think about how a tired person", truncated=True),
    PoseReply("r5", "Sitting, as before.", (pose(5),), history_left_out=6),
    BatchItemReply("b1", 2, 3, "jump", (pose(4, "jump"),)),
    BatchItemReply("b1", 0, 1, "", ()),
    BatchItemReply("b2", 0, 2, "Well, a tired person would first", truncated=True),
    BatchDoneReply("b1", 3, 2),
    CancelReply("c1", "b1", True),
    CancelReply("c2", "gone", False),
    ErrorReply("r1", "pose", ErrorCode.BUSY, "queue full (64 waiting)"),
    ErrorReply("b1", "batch", ErrorCode.TIMEOUT, "item timed out", index=1),
    ErrorReply(None, None, ErrorCode.BAD_JSON, "header: is not valid JSON"),
]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_every_request_round_trips(message):
    frames = encode_request(message)
    assert all(type(f) is bytes for f in frames)
    assert decode_request(frames) == message
    assert json.loads(frames[0])["protocol"] == 1


@pytest.mark.parametrize("message", REPLIES, ids=lambda m: type(m).__name__)
def test_every_reply_round_trips(message):
    frames = encode_reply(message)
    assert len(frames) == 1 and type(frames[0]) is bytes
    decoded = decode_reply(frames)
    assert decoded == message
    assert type(decoded) is type(message)


def test_truncated_is_written_only_when_true_and_checked():
    assert "truncated" not in json.loads(encode_reply(PoseReply("r", "done."))[0])
    assert json.loads(encode_reply(PoseReply("r", "cut", truncated=True))[0])["truncated"] is True
    frames = encode_reply(PoseReply("r", "cut", truncated=True))
    header = json.loads(frames[0])
    header["truncated"] = "yes"
    with pytest.raises(ProtocolError, match="truncated: must be true or false, got 'yes'"):
        decode_reply([json.dumps(header).encode()])


def test_history_left_out_is_written_only_when_some_were_and_checked():
    assert "history_left_out" not in json.loads(encode_reply(PoseReply("r", "done."))[0])
    header = json.loads(encode_reply(PoseReply("r", "ok", history_left_out=4))[0])
    assert header["history_left_out"] == 4
    for bad, said in ((-2, "history_left_out: "), (65, "history_left_out: "), (True, "integer")):
        header["history_left_out"] = bad
        with pytest.raises(ProtocolError, match=said):
            decode_reply([json.dumps(header).encode()])


def test_round_trip_keeps_poses_exact_and_typed():
    sent = PoseReply("r", "two", (pose(7, "a"), pose(8, None, False)))
    got = decode_reply(encode_reply(sent))
    assert all(isinstance(p, Pose) for p in got.poses)
    np.testing.assert_array_equal(got.poses[0].axis_angle, sent.poses[0].axis_angle)
    assert got.poses[1].translation is None and got.poses[0].label == "a"


def test_image_frames_travel_after_the_header_and_any_buffer_type_decodes():
    message = PoseRequest("r", "like this", images=(PNG, JPEG))
    frames = encode_request(message)
    assert frames[1:] == [PNG, JPEG]
    assert json.loads(frames[0])["images"] == 2
    mixed = [bytearray(frames[0]), memoryview(frames[1]), bytearray(frames[2])]
    decoded = decode_request(mixed)
    assert decoded == message and all(type(i) is bytes for i in decoded.images)
    buffers = PoseRequest("r", "x", images=(bytearray(PNG), memoryview(JPEG)))
    assert encode_request(buffers)[1:] == [PNG, JPEG]


def test_lists_are_stored_as_tuples_so_decoded_copies_compare_equal():
    message = PoseRequest("r", "x", images=[PNG], history=[Turn("user", "hi")])
    assert message.images == (PNG,) and message.history == (Turn("user", "hi"),)
    assert decode_request(encode_request(message)) == message
    assert BatchRequest("b", ["a", "b"]).prompts == ("a", "b")
    assert PoseReply("r", "", [pose(1)]).poses == (pose(1),)


def test_header_is_compact_json_with_the_common_fields_first():
    head = encode_request(CancelRequest("c1", "r9"))[0]
    assert head == b'{"protocol":1,"op":"cancel","id":"c1","target":"r9"}'
    head = encode_reply(BatchDoneReply("b", 2, 2))[0]
    assert head.startswith(b'{"protocol":1,"op":"batch_done","id":"b","ok":true,')


def test_optional_request_fields_take_their_defaults():
    decoded = decode_request(frames_of({"protocol": 1, "op": "pose", "id": "r", "prompt": "x"}))
    assert decoded == PoseRequest("r", "x", (), (), "pose", None)
    decoded = decode_request(frames_of({"protocol": 1, "op": "batch", "id": "b", "prompts": ["x"]}))
    assert decoded == BatchRequest("b", ("x",), "pose", None)


def test_unknown_fields_are_ignored():
    decoded = decode_request(frames_of(request("status", future_field={"x": [1]})))
    assert decoded == StatusRequest("r1")
    assert decode_reply(frames_of(reply(extra=1))) == PoseReply("r1", "", ())


# --- decoder errors ---------------------------------------------------------------------------


def expect_error(decode, frames, code, field, limits=DEFAULT_LIMITS):
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits)
    err = info.value
    assert err.code is code, str(err)
    assert err.field == field, str(err)
    assert str(err).startswith(f"{code.value}: ")
    if field:
        assert field in err.message  # the message names the field for humans, too
    return err


POSE_24 = [[0.0, 0.0, 0.0]] * 24
GOOD_POSE = {"layout": "smpl24_axis_angle", "axis_angle": POSE_24, "translation": None}

REQUEST_ERRORS = [
    # (name, frames, code, field)
    ("bad utf-8", [b'{"protocol":1,"op":"status","id":"\xff"}'], ErrorCode.BAD_JSON, "header"),
    ("bad json", [b'{"protocol":1,'], ErrorCode.BAD_JSON, "header"),
    ("empty header", [b""], ErrorCode.BAD_JSON, "header"),
    ("utf-8 bom", [b"\xef\xbb\xbf" + header(**request())], ErrorCode.BAD_JSON, "header"),
    ("NaN", [b'{"protocol":1,"op":"status","id":"a","x":NaN}'], ErrorCode.BAD_JSON, "header"),
    (
        "Infinity",
        [b'{"protocol":1,"op":"status","id":"a","x":-Infinity}'],
        ErrorCode.BAD_JSON,
        "header",
    ),
    ("1e999", [b'{"protocol":1,"op":"status","id":"a","x":1e999}'], ErrorCode.BAD_JSON, "header"),
    ("huge int", [b'{"protocol":1,"x":' + b"9" * 5000 + b"}"], ErrorCode.BAD_JSON, "header"),
    (
        "duplicate key",
        [b'{"protocol":1,"op":"status","id":"a","id":"b"}'],
        ErrorCode.BAD_JSON,
        "header",
    ),
    (
        "nested dup",
        [b'{"protocol":1,"op":"status","id":"a","x":{"k":1,"k":2}}'],
        ErrorCode.BAD_JSON,
        "header",
    ),
    ("deep nesting", [b"[" * 100_000 + b"]" * 100_000], ErrorCode.BAD_JSON, "header"),
    (
        "deep field",
        [b'{"protocol":1,"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}"],
        ErrorCode.BAD_JSON,
        "header",
    ),
    ("array header", [b"[1, 2]"], ErrorCode.BAD_SCHEMA, "header"),
    ("string header", [b'"status"'], ErrorCode.BAD_SCHEMA, "header"),
    ("null header", [b"null"], ErrorCode.BAD_SCHEMA, "header"),
    ("missing protocol", frames_of({"op": "status", "id": "a"}), ErrorCode.BAD_SCHEMA, "protocol"),
    ("protocol string", frames_of(request(protocol="1")), ErrorCode.BAD_SCHEMA, "protocol"),
    ("protocol true", frames_of(request(protocol=True)), ErrorCode.BAD_SCHEMA, "protocol"),
    ("protocol 1.0", frames_of(request(protocol=1.0)), ErrorCode.BAD_SCHEMA, "protocol"),
    ("protocol 2", frames_of(request(protocol=2)), ErrorCode.UNSUPPORTED_PROTOCOL, "protocol"),
    ("protocol 0", frames_of(request(protocol=0)), ErrorCode.UNSUPPORTED_PROTOCOL, "protocol"),
    (
        "protocol huge",
        frames_of(request(protocol=10**40)),
        ErrorCode.UNSUPPORTED_PROTOCOL,
        "protocol",
    ),
    ("missing op", frames_of({"protocol": 1, "id": "a"}), ErrorCode.BAD_SCHEMA, "op"),
    ("op not a string", frames_of(request(op=7)), ErrorCode.BAD_SCHEMA, "op"),
    ("unknown op", frames_of(request(op="dance")), ErrorCode.UNKNOWN_OP, "op"),
    ("reply op as request", frames_of(request(op="batch_done")), ErrorCode.UNKNOWN_OP, "op"),
    ("missing id", frames_of({"protocol": 1, "op": "status"}), ErrorCode.BAD_SCHEMA, "id"),
    ("empty id", frames_of(request("status", id="")), ErrorCode.BAD_SCHEMA, "id"),
    ("null id", frames_of(request("status", id=None)), ErrorCode.BAD_SCHEMA, "id"),
    ("int id", frames_of(request("status", id=5)), ErrorCode.BAD_SCHEMA, "id"),
    ("control char id", frames_of(request("status", id="a\nb")), ErrorCode.BAD_SCHEMA, "id"),
    ("id too long", frames_of(request("status", id="x" * 129)), ErrorCode.TOO_LARGE, "id"),
    (
        "missing prompt",
        frames_of({"protocol": 1, "op": "pose", "id": "a"}),
        ErrorCode.BAD_SCHEMA,
        "prompt",
    ),
    ("prompt not text", frames_of(request(prompt=["x"])), ErrorCode.BAD_SCHEMA, "prompt"),
    ("empty prompt", frames_of(request(prompt="")), ErrorCode.EMPTY_PROMPT, "prompt"),
    ("blank prompt", frames_of(request(prompt=" \n\t ")), ErrorCode.EMPTY_PROMPT, "prompt"),
    # Marks that show nothing (pasted text brings them), which str.strip keeps.
    (
        "invisible prompt",
        frames_of(request(prompt="\u200b \ufeff\u2060\u200d")),
        ErrorCode.EMPTY_PROMPT,
        "prompt",
    ),
    # A soft hyphen, and the direction marks that text copied from a right-to-left page brings.
    (
        "direction marks prompt",
        frames_of(request(prompt="\u00ad\u200e\u200f\u061c\u202a\u202c\u2066\u2069")),
        ErrorCode.EMPTY_PROMPT,
        "prompt",
    ),
    ("prompt too long", frames_of(request(prompt="x" * 8001)), ErrorCode.TOO_LARGE, "prompt"),
    (
        "lone surrogate",
        [b'{"protocol":1,"op":"pose","id":"a","prompt":"\\ud800"}'],
        ErrorCode.BAD_SCHEMA,
        "prompt",
    ),
    ("images negative", frames_of(request(images=-1)), ErrorCode.BAD_SCHEMA, "images"),
    ("images float", frames_of(request(images=1.0), PNG), ErrorCode.BAD_SCHEMA, "images"),
    ("images too many", frames_of(request(images=9)), ErrorCode.TOO_LARGE, "images"),
    ("images count > frames", frames_of(request(images=2), PNG), ErrorCode.BAD_SCHEMA, "images"),
    (
        "images count < frames",
        frames_of(request(images=1), PNG, JPEG),
        ErrorCode.BAD_SCHEMA,
        "images",
    ),
    ("images missing", frames_of(request(), PNG), ErrorCode.BAD_SCHEMA, "images"),
    ("gif image", frames_of(request(images=1), b"GIF89a..."), ErrorCode.BAD_IMAGE, "images[0]"),
    ("empty image", frames_of(request(images=2), PNG, b""), ErrorCode.BAD_IMAGE, "images[1]"),
    (
        "truncated magic",
        frames_of(request(images=1), PNG_MAGIC[:4]),
        ErrorCode.BAD_IMAGE,
        "images[0]",
    ),
    (
        "history not a list",
        frames_of(request(history={"role": "user"})),
        ErrorCode.BAD_SCHEMA,
        "history",
    ),
    ("history item", frames_of(request(history=["hi"])), ErrorCode.BAD_SCHEMA, "history[0]"),
    (
        "history role",
        frames_of(request(history=[{"role": "user", "text": "a"}, {"role": "bot", "text": "b"}])),
        ErrorCode.BAD_SCHEMA,
        "history[1].role",
    ),
    (
        "history role system",  # a client may not set the model's system prompt
        frames_of(request(history=[{"role": "system", "text": "a"}])),
        ErrorCode.BAD_SCHEMA,
        "history[0].role",
    ),
    (
        "history text",
        frames_of(request(history=[{"role": "user", "text": None}])),
        ErrorCode.BAD_SCHEMA,
        "history[0].text",
    ),
    (
        "history no text",
        frames_of(request(history=[{"role": "user"}])),
        ErrorCode.BAD_SCHEMA,
        "history[0].text",
    ),
    (
        "history too long",
        frames_of(request(history=[{"role": "user", "text": ""}] * 65)),
        ErrorCode.TOO_LARGE,
        "history",
    ),
    ("mode", frames_of(request(mode="dance")), ErrorCode.BAD_SCHEMA, "mode"),
    ("mode null", frames_of(request(mode=None)), ErrorCode.BAD_SCHEMA, "mode"),
    ("timeout zero", frames_of(request(timeout_ms=0)), ErrorCode.BAD_SCHEMA, "timeout_ms"),
    ("timeout float", frames_of(request(timeout_ms=10.5)), ErrorCode.BAD_SCHEMA, "timeout_ms"),
    ("timeout bool", frames_of(request(timeout_ms=True)), ErrorCode.BAD_SCHEMA, "timeout_ms"),
    ("timeout huge", frames_of(request(timeout_ms=10**30)), ErrorCode.BAD_SCHEMA, "timeout_ms"),
    (
        "batch no prompts",
        frames_of(request("batch", prompts=[])),
        ErrorCode.EMPTY_PROMPT,
        "prompts",
    ),
    ("batch prompts missing", frames_of(request("batch")), ErrorCode.BAD_SCHEMA, "prompts"),
    (
        "batch prompts string",
        frames_of(request("batch", prompts="sit")),
        ErrorCode.BAD_SCHEMA,
        "prompts",
    ),
    (
        "batch blank prompt",
        frames_of(request("batch", prompts=["sit", " "])),
        ErrorCode.EMPTY_PROMPT,
        "prompts[1]",
    ),
    (
        "batch invisible prompt",
        frames_of(request("batch", prompts=["sit", "\u200b"])),
        ErrorCode.EMPTY_PROMPT,
        "prompts[1]",
    ),
    (
        "batch prompt type",
        frames_of(request("batch", prompts=["sit", 3])),
        ErrorCode.BAD_SCHEMA,
        "prompts[1]",
    ),
    (
        "batch prompt long",
        frames_of(request("batch", prompts=["x" * 8001])),
        ErrorCode.TOO_LARGE,
        "prompts[0]",
    ),
    (
        "batch too many",
        frames_of(request("batch", prompts=["x"] * 257)),
        ErrorCode.TOO_LARGE,
        "prompts",
    ),
    (
        "batch with image",
        frames_of(request("batch", prompts=["x"]), PNG),
        ErrorCode.BAD_SCHEMA,
        "frames",
    ),
    ("status with image", frames_of(request("status"), PNG), ErrorCode.BAD_SCHEMA, "frames"),
    ("cancel no target", frames_of(request("cancel")), ErrorCode.BAD_SCHEMA, "target"),
    (
        "cancel empty target",
        frames_of(request("cancel", target="")),
        ErrorCode.BAD_SCHEMA,
        "target",
    ),
    ("header too big", [header(**request(pad="x" * (1 << 20)))], ErrorCode.TOO_LARGE, "header"),
    ("too many frames", frames_of(request(images=9), *[PNG] * 9), ErrorCode.TOO_LARGE, "frames"),
    (
        "image too big",
        frames_of(request(images=1), PNG + bytes(16 << 20)),
        ErrorCode.TOO_LARGE,
        "images[0]",
    ),
    ("no frames", [], ErrorCode.BAD_SCHEMA, "frames"),
    ("frames not a list", b'{"protocol":1}', ErrorCode.BAD_SCHEMA, "frames"),
    ("frames None", None, ErrorCode.BAD_SCHEMA, "frames"),
    ("header a str", ['{"protocol":1}'], ErrorCode.BAD_SCHEMA, "header"),
    ("image an int", [header(**request(images=1)), 5], ErrorCode.BAD_SCHEMA, "images[0]"),
]


@pytest.mark.parametrize(
    ("frames", "code", "field"),
    [case[1:] for case in REQUEST_ERRORS],
    ids=[case[0] for case in REQUEST_ERRORS],
)
def test_decode_request_names_code_and_field(frames, code, field):
    expect_error(decode_request, frames, code, field)


REPLY_ERRORS = [
    ("bad utf-8", [b'{"ok":"\xc3\x28"}'], ErrorCode.BAD_JSON, "header"),
    ("NaN", [header(**reply())[:-1] + b',"x":NaN}'], ErrorCode.BAD_JSON, "header"),
    ("missing ok", frames_of({"protocol": 1, "op": "pose", "id": "r"}), ErrorCode.BAD_SCHEMA, "ok"),
    ("ok string", frames_of(reply(ok="true")), ErrorCode.BAD_SCHEMA, "ok"),
    ("protocol 2", frames_of(reply(protocol=2)), ErrorCode.UNSUPPORTED_PROTOCOL, "protocol"),
    ("unknown op", frames_of(reply(op="batch")), ErrorCode.UNKNOWN_OP, "op"),
    ("extra frame", frames_of(reply(), PNG), ErrorCode.BAD_SCHEMA, "frames"),
    ("missing text", frames_of({**reply(), "text": None}), ErrorCode.BAD_SCHEMA, "text"),
    ("text too long", frames_of(reply(text="x" * 64_001)), ErrorCode.TOO_LARGE, "text"),
    (
        "poses missing",
        frames_of({"protocol": 1, "op": "pose", "id": "r", "ok": True, "text": ""}),
        ErrorCode.BAD_SCHEMA,
        "poses",
    ),
    ("poses object", frames_of(reply(poses=GOOD_POSE)), ErrorCode.BAD_SCHEMA, "poses"),
    ("too many poses", frames_of(reply(poses=[GOOD_POSE] * 33)), ErrorCode.TOO_LARGE, "poses"),
    ("pose not object", frames_of(reply(poses=[GOOD_POSE, 3])), ErrorCode.BAD_SCHEMA, "poses[1]"),
    (
        "pose rows",
        frames_of(reply(poses=[{**GOOD_POSE, "axis_angle": POSE_24[:23]}])),
        ErrorCode.BAD_SCHEMA,
        "poses[0].axis_angle",
    ),
    (
        "pose strings",
        frames_of(reply(poses=[{**GOOD_POSE, "axis_angle": [["a"] * 3] * 24}])),
        ErrorCode.BAD_SCHEMA,
        "poses[0].axis_angle",
    ),
    (
        "pose bools",
        frames_of(reply(poses=[{**GOOD_POSE, "axis_angle": [[True] * 3] * 24}])),
        ErrorCode.BAD_SCHEMA,
        "poses[0].axis_angle",
    ),
    (
        "pose no axis",
        frames_of(reply(poses=[{"layout": "smpl24_axis_angle"}])),
        ErrorCode.BAD_SCHEMA,
        "poses[0].axis_angle",
    ),
    (
        "pose layout",
        frames_of(reply(poses=[{**GOOD_POSE, "layout": "smplx"}])),
        ErrorCode.BAD_SCHEMA,
        "poses[0].layout",
    ),
    (
        "pose translation",
        frames_of(reply(poses=[GOOD_POSE, {**GOOD_POSE, "translation": [0, 0]}])),
        ErrorCode.BAD_SCHEMA,
        "poses[1].translation",
    ),
    (
        "pose label",
        frames_of(reply(poses=[{**GOOD_POSE, "label": 5}])),
        ErrorCode.BAD_SCHEMA,
        "poses[0].label",
    ),
    ("status missing", frames_of(reply("status", model="m")), ErrorCode.BAD_SCHEMA, "device"),
    (
        "status uptime",
        frames_of(reply("status", model="m", device="cpu", dtype="f", queue_depth=0, uptime_s=-1)),
        ErrorCode.BAD_SCHEMA,
        "uptime_s",
    ),
    (
        "status queue",
        frames_of(reply("status", model="m", device="cpu", dtype="f", queue_depth=-1)),
        ErrorCode.BAD_SCHEMA,
        "queue_depth",
    ),
    (
        "status images",
        frames_of(
            reply(
                "status",
                model="m",
                device="cpu",
                dtype="f",
                queue_depth=0,
                uptime_s=1,
                version="v",
                supports_images=False,
                max_images=2,
            )
        ),
        ErrorCode.BAD_SCHEMA,
        "max_images",
    ),
    (
        "status supports",
        frames_of(
            reply(
                "status",
                model="m",
                device="cpu",
                dtype="f",
                queue_depth=0,
                uptime_s=1,
                version="v",
                supports_images=1,
                max_images=2,
            )
        ),
        ErrorCode.BAD_SCHEMA,
        "supports_images",
    ),
    (
        "item index >= total",
        frames_of(reply("batch_item", index=3, total=3, text="", poses=[])),
        ErrorCode.BAD_SCHEMA,
        "index",
    ),
    (
        "item total 0",
        frames_of(reply("batch_item", index=0, total=0, text="", poses=[])),
        ErrorCode.BAD_SCHEMA,
        "total",
    ),
    (
        "item total big",
        frames_of(reply("batch_item", index=0, total=257, text="", poses=[])),
        ErrorCode.TOO_LARGE,
        "total",
    ),
    (
        "done completed",
        frames_of(reply("batch_done", total=2, completed=3)),
        ErrorCode.BAD_SCHEMA,
        "completed",
    ),
    (
        "cancel flag",
        frames_of(reply("cancel", target="r", cancelled="yes")),
        ErrorCode.BAD_SCHEMA,
        "cancelled",
    ),
    (
        "error no error",
        frames_of({"protocol": 1, "op": "pose", "id": "r", "ok": False}),
        ErrorCode.BAD_SCHEMA,
        "error",
    ),
    (
        "error not object",
        frames_of({"protocol": 1, "op": "pose", "id": "r", "ok": False, "error": "busy"}),
        ErrorCode.BAD_SCHEMA,
        "error",
    ),
    (
        "error code",
        frames_of(
            {
                "protocol": 1,
                "op": "pose",
                "id": "r",
                "ok": False,
                "error": {"code": "oops", "message": ""},
            }
        ),
        ErrorCode.BAD_SCHEMA,
        "error.code",
    ),
    (
        "error unreachable",
        frames_of(
            {
                "protocol": 1,
                "op": "pose",
                "id": "r",
                "ok": False,
                "error": {"code": "unreachable", "message": ""},
            }
        ),
        ErrorCode.BAD_SCHEMA,
        "error.code",
    ),
    (
        "error message",
        frames_of({"protocol": 1, "op": "pose", "id": "r", "ok": False, "error": {"code": "busy"}}),
        ErrorCode.BAD_SCHEMA,
        "error.message",
    ),
    (
        "error op",
        frames_of(
            {
                "protocol": 1,
                "op": "batch_item",
                "id": "r",
                "ok": False,
                "error": {"code": "busy", "message": ""},
            }
        ),
        ErrorCode.BAD_SCHEMA,
        "op",
    ),
    (
        "error id missing",
        frames_of(
            {"protocol": 1, "op": None, "ok": False, "error": {"code": "busy", "message": ""}}
        ),
        ErrorCode.BAD_SCHEMA,
        "id",
    ),
    (
        "error index op",
        frames_of(
            {
                "protocol": 1,
                "op": "pose",
                "id": "r",
                "ok": False,
                "index": 0,
                "error": {"code": "busy", "message": ""},
            }
        ),
        ErrorCode.BAD_SCHEMA,
        "index",
    ),
    (
        "error index past a batch's end",
        frames_of(
            {
                "protocol": 1,
                "op": "batch",
                "id": "r",
                "ok": False,
                "index": 256,  # a batch holds at most 256 items: 0 to 255
                "error": {"code": "busy", "message": ""},
            }
        ),
        ErrorCode.BAD_SCHEMA,
        "index",
    ),
    (
        "error index neg",
        frames_of(
            {
                "protocol": 1,
                "op": "batch",
                "id": "r",
                "ok": False,
                "index": -1,
                "error": {"code": "busy", "message": ""},
            }
        ),
        ErrorCode.BAD_SCHEMA,
        "index",
    ),
]


@pytest.mark.parametrize(
    ("frames", "code", "field"),
    [case[1:] for case in REPLY_ERRORS],
    ids=[case[0] for case in REPLY_ERRORS],
)
def test_decode_reply_names_code_and_field(frames, code, field):
    expect_error(decode_reply, frames, code, field)


def test_size_limits_are_checked_before_the_json_is_parsed():
    # Frame 0 is not JSON at all, yet the size error wins: nothing was parsed.
    expect_error(decode_request, [b"\xff" * ((1 << 20) + 1)], ErrorCode.TOO_LARGE, "header")
    expect_error(decode_request, [b"junk"] + [PNG] * 9, ErrorCode.TOO_LARGE, "frames")
    expect_error(decode_request, [b"junk", PNG + bytes(16 << 20)], ErrorCode.TOO_LARGE, "images[0]")
    expect_error(decode_request, [b"junk", b"BM bitmap"], ErrorCode.BAD_IMAGE, "images[0]")


def test_custom_limits_apply():
    limits = Limits(
        max_images=1, max_frames=2, max_prompt_chars=5, max_id_chars=3, max_image_bytes=40
    )
    expect_error(
        decode_request,
        frames_of(request(prompt="x" * 6)),
        ErrorCode.TOO_LARGE,
        "prompt",
        limits=limits,
    )
    expect_error(
        decode_request, frames_of(request(id="abcd")), ErrorCode.TOO_LARGE, "id", limits=limits
    )
    expect_error(
        decode_request,
        frames_of(request(images=2), PNG, PNG),
        ErrorCode.TOO_LARGE,
        "frames",
        limits=limits,
    )
    expect_error(
        decode_request,
        frames_of(request(images=1), PNG + bytes(11)),
        ErrorCode.TOO_LARGE,
        "images[0]",
        limits=limits,
    )
    assert decode_request(
        frames_of(request(id="abc", prompt="hi", images=1), PNG), limits
    ).images == (PNG,)
    with pytest.raises(ProtocolError, match="prompt"):
        encode_request(PoseRequest("a", "x" * 6), limits)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_limits_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match="max_images"):
        Limits(max_images=bad)


def test_error_carries_the_request_id_once_the_header_shows_it():
    err = expect_error(
        decode_request, frames_of(request(prompt=" ", id="r7")), ErrorCode.EMPTY_PROMPT, "prompt"
    )
    assert (err.request_id, err.op) == ("r7", "pose")
    err = expect_error(
        decode_request,
        frames_of(request(protocol=2, id="r8")),
        ErrorCode.UNSUPPORTED_PROTOCOL,
        "protocol",
    )
    assert err.request_id == "r8"
    # Even a frame-level error is addressed, when frame 0 itself is readable.
    err = expect_error(
        decode_request,
        frames_of(request(images=1, id="r9"), b"GIF8"),
        ErrorCode.BAD_IMAGE,
        "images[0]",
    )
    assert (err.request_id, err.op) == ("r9", "pose")
    err = expect_error(
        decode_request, frames_of(request("dance", id="r10")), ErrorCode.UNKNOWN_OP, "op"
    )
    assert (err.request_id, err.op) == ("r10", None)
    err = expect_error(decode_request, [b"{nope"], ErrorCode.BAD_JSON, "header")
    assert (err.request_id, err.op) == (None, None)
    err = expect_error(
        decode_request, frames_of(request("status", id="")), ErrorCode.BAD_SCHEMA, "id"
    )
    assert err.request_id is None and err.op == "status"


def test_error_reply_for_answers_a_bad_request_and_encodes():
    with pytest.raises(ProtocolError) as info:
        decode_request(frames_of(request(id="r5", history=[{"role": "bot", "text": ""}])))
    answer = error_reply_for(info.value)
    assert answer == ErrorReply("r5", "pose", ErrorCode.BAD_SCHEMA, info.value.message)
    assert "history[0].role" in answer.message
    assert decode_reply(encode_reply(answer)) == answer
    with pytest.raises(ProtocolError) as info:
        decode_request([b"\x00"])
    anonymous = error_reply_for(info.value, op=None)
    assert anonymous.id is None and anonymous.op is None
    assert decode_reply(encode_reply(anonymous)) == anonymous
    assert error_reply_for(ProtocolError("busy", "full", request_id="x"), op="batch").op == "batch"


def test_protocol_error_attributes_and_text():
    err = ProtocolError(
        "bad_schema", "history[2].role: must be one of ...", field="history[2].role"
    )
    assert err.code is ErrorCode.BAD_SCHEMA and err.field == "history[2].role"
    assert err.request_id is None and err.op is None
    assert str(err) == "bad_schema: history[2].role: must be one of ..."
    assert isinstance(err, Exception) and not isinstance(err, ValueError)
    err.request_id = "r1"
    clone = copy.copy(err)
    assert (clone.code, clone.message, clone.field, clone.request_id) == (
        err.code,
        err.message,
        err.field,
        "r1",
    )


# --- encoder checks ---------------------------------------------------------------------------

ENCODE_ERRORS = [
    (PoseRequest("r", "  "), ErrorCode.EMPTY_PROMPT, "prompt"),
    (PoseRequest("", "x"), ErrorCode.BAD_SCHEMA, "id"),
    (PoseRequest("r", "x", history=(Turn("bot", "hi"),)), ErrorCode.BAD_SCHEMA, "history[0].role"),
    (
        PoseRequest("r", "x", history=({"role": "user", "text": ""},)),
        ErrorCode.BAD_SCHEMA,
        "history[0]",
    ),
    (PoseRequest("r", "x", images=("not bytes",)), ErrorCode.BAD_SCHEMA, "images[0]"),
    (PoseRequest("r", "x", images=(PNG, b"GIF89a")), ErrorCode.BAD_IMAGE, "images[1]"),
    (PoseRequest("r", "x", images=(PNG,) * 9), ErrorCode.TOO_LARGE, "frames"),
    (PoseRequest("r", "x", images=PNG), ErrorCode.BAD_SCHEMA, "images"),
    (PoseRequest("r", "x", mode="dance"), ErrorCode.BAD_SCHEMA, "mode"),
    (PoseRequest("r", "x", timeout_ms=0), ErrorCode.BAD_SCHEMA, "timeout_ms"),
    (PoseRequest("r", "x\ud800y"), ErrorCode.BAD_SCHEMA, "prompt"),
    (PoseRequest("r", object()), ErrorCode.BAD_SCHEMA, "prompt"),
    (BatchRequest("b", "sit"), ErrorCode.BAD_SCHEMA, "prompts"),
    (BatchRequest("b", ()), ErrorCode.EMPTY_PROMPT, "prompts"),
    (CancelRequest("c", ""), ErrorCode.BAD_SCHEMA, "target"),
]


@pytest.mark.parametrize(("message", "code", "field"), ENCODE_ERRORS)
def test_encode_request_refuses_what_the_server_would_reject(message, code, field):
    with pytest.raises(ProtocolError) as info:
        encode_request(message)
    assert (info.value.code, info.value.field) == (code, field), str(info.value)


REPLY_ENCODE_ERRORS = [
    (StatusReply("s", "m", "cpu", "f32", 0, float("nan"), "v", True, 1), "uptime_s"),
    (StatusReply("s", "m", "cpu", "f32", 0, 1.0, "v", False, 1), "max_images"),
    (StatusReply("s", "m", "cpu", "f32", 0, 1.0, "v", False, 0, instance="x" * 300), "instance"),
    (PoseReply("r", "x", (np.zeros((24, 3)),)), "poses[0]"),
    (PoseReply("r", "x", (pose(1),) * 33), "poses"),
    (BatchItemReply("b", 3, 3, "", ()), "index"),
    (BatchDoneReply("b", 2, -1), "completed"),
    (ErrorReply("r", "pose", ErrorCode.UNREACHABLE, "no reply"), "error.code"),
    (ErrorReply("r", "pose", "nonsense", "x"), "error.code"),
    (ErrorReply("r", "pose", ErrorCode.BUSY, "x", index=0), "index"),
    (ErrorReply("r", "batch_item", ErrorCode.BUSY, "x"), "op"),
    (CancelReply("c", "r", 1), "cancelled"),
]


@pytest.mark.parametrize(("message", "field"), REPLY_ENCODE_ERRORS)
def test_encode_reply_refuses_what_the_client_would_reject(message, field):
    with pytest.raises(ProtocolError) as info:
        encode_reply(message)
    assert info.value.field == field, str(info.value)


def test_encoders_refuse_the_wrong_kind_of_message():
    with pytest.raises(ProtocolError, match="StatusReply as a request"):
        encode_request(REPLIES[0])
    with pytest.raises(ProtocolError, match="StatusRequest as a reply"):
        encode_reply(StatusRequest("s"))
    with pytest.raises(ProtocolError, match="dict"):
        encode_request({"op": "status"})


def test_error_codes_are_closed():
    assert {c.value for c in ErrorCode} == {
        "bad_json", "bad_schema", "unsupported_protocol", "unknown_op", "too_large", "bad_image",
        "empty_prompt", "unsupported_input", "busy", "timeout", "cancelled", "model_error",
        "shutting_down", "internal_error", "unreachable",
    }  # fmt: skip
    assert [c for c in ErrorCode if not c.on_wire] == [ErrorCode.UNREACHABLE]
    assert ErrorCode.BUSY == "busy" and str(ErrorCode.BUSY) == "busy"


# --- PROTOCOL.md stays accurate ---------------------------------------------------------------


def markdown_json_blocks() -> list[dict]:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def test_every_protocol_md_example_decodes_and_every_op_has_one():
    requests, replies = set(), set()
    for obj in markdown_json_blocks():
        count = obj.get("images", 0) if "ok" not in obj else 0
        frames = frames_of(obj, *[PNG] * count)
        if "ok" in obj:
            message = decode_reply(frames)
            replies.add(message.op if message.__class__ is not ErrorReply else "error")
            assert json.loads(encode_reply(message)[0]) == obj
        else:
            message = decode_request(frames)
            requests.add(message.op)
            assert json.loads(encode_request(message)[0]) == obj
    assert requests == set(REQUEST_OPS)
    assert replies == {*REPLY_OPS, "error"}


def test_protocol_md_lists_every_error_code_and_limit():
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    for code in ErrorCode:
        assert re.search(rf"^\| `{code.value}` \|", text, re.M), code
    for item in dataclasses.fields(Limits):
        default = getattr(DEFAULT_LIMITS, item.name)
        row = re.search(rf"^\| `{item.name}` \| ([^|]+) \|", text, re.M)
        assert row, item.name
        assert int(re.sub(r"[ ,_]", "", row.group(1).split("(")[0])) == default, item.name
