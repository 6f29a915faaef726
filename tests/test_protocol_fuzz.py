"""Deterministic fuzzing: whatever the frames hold, decoding returns a message or raises
ProtocolError, nothing else; and whatever it accepts, the encoder sends back unchanged."""

import copy
import json
import random

import numpy as np

from shared_protocol.pose import Pose
from shared_protocol.protocol import (
    JPEG_MAGIC,
    PNG_MAGIC,
    BatchDoneReply,
    BatchItemReply,
    BatchRequest,
    CancelReply,
    CancelRequest,
    ErrorCode,
    ErrorReply,
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
)

CASES = 12_000
REQUEST_TYPES = (StatusRequest, PoseRequest, BatchRequest, CancelRequest)
REPLY_TYPES = (StatusReply, PoseReply, BatchItemReply, BatchDoneReply, CancelReply, ErrorReply)

PNG = PNG_MAGIC + b"fuzz png"
JPEG = JPEG_MAGIC + b"fuzz jpeg"


def _pose(seed: int) -> Pose:
    rng = np.random.default_rng(seed)
    return Pose(rng.normal(size=(24, 3)), rng.normal(size=3), f"p{seed}")


SEEDS = [
    *(
        encode_request(m)
        for m in (
            StatusRequest("s"),
            PoseRequest("r", "kneel", (PNG, JPEG), (Turn("user", "a"), Turn("assistant", "b"))),
            PoseRequest("r2", "", (JPEG,), mode="chat", timeout_ms=100),
            PoseRequest("r3", " x "),
            BatchRequest("b", ("sit", "stand"), "pose", 5000),
            CancelRequest("c", "b"),
        )
    ),
    *(
        encode_reply(m)
        for m in (
            StatusReply("s", "model", "cpu", "float32", 2, 1.5, "0.1.0", True, 4),
            PoseReply("r", "two", (_pose(1), _pose(2))),
            PoseReply("r", "chat", truncated=True, history_left_out=2),  # optional fields too
            BatchItemReply("b", 1, 2, "x", (_pose(3),), truncated=True),
            BatchDoneReply("b", 2, 1),
            CancelReply("c", "b", True),
            ErrorReply("b", "batch", ErrorCode.TIMEOUT, "slow", 1),
            ErrorReply(None, None, ErrorCode.BAD_JSON, "no"),
        )
    ),
]

JUNK = [
    None, True, False, 0, 1, -1, 2, 23, 24, 255, 256, 2**31, 2**53, 2**53 + 1, 2**64, -(2**63),
    10**300, 10**4000, 0.5, -0.0, 1e308, -1e308, 5e-324, "", " ", "\t\n", "x", "\x00", "\ud800",
    "é✓", "a" * 200, "pose", "chat", "user", "assistant", "status", "batch", "batch_item",
    "batch_done", "cancel", "busy", "unreachable", "smpl24_axis_angle", [], {}, [[]], [None],
    [[0.0, 0.0, 0.0]] * 24, [[0.0, 0.0]] * 24, [0.0] * 72, [True] * 3, ["a"], {"role": "user"},
    {"code": "busy", "message": "m"}, {"layout": "smpl24_axis_angle"}, [[[[[[]]]]]],
]  # fmt: skip

ODD_FRAMES = [
    None, 0, 1.5, "text", ["list"], {"d": 1}, object(), b"", bytearray(b"x"), memoryview(b"{}"),
    bytearray(PNG), memoryview(JPEG), memoryview(np.arange(6, dtype=np.int32)),
    memoryview(np.zeros((3, 4), dtype=np.uint8)[:, ::2]), PNG, JPEG, PNG_MAGIC, b"\xff\xd8",
]  # fmt: skip


def released_view() -> memoryview:
    view = memoryview(b'{"protocol":1}')
    view.release()
    return view


def junk_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth < 3 and roll < 0.1:
        return [junk_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 3 and roll < 0.2:
        return {rng.choice(["a", "id", "op", "role", "code"]): junk_value(rng, depth + 1)}
    if roll < 0.25:
        return rng.uniform(-1e6, 1e6)
    if roll < 0.3:
        return rng.randrange(-(2**70), 2**70)
    return copy.deepcopy(rng.choice(JUNK))  # fresh, so mutations never build cycles


def containers(obj, path=()):
    """Every dict and list inside obj, with its path."""
    yield path, obj
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for key, value in items:
        if isinstance(value, dict | list):
            yield from containers(value, (*path, key))


def mutate_json(obj: dict, rng: random.Random) -> dict:
    """Delete, retype, rename, add or swap fields anywhere in a parsed header."""
    for _ in range(rng.randrange(1, 4)):
        _, target = rng.choice(list(containers(obj)))
        keys = list(target.keys()) if isinstance(target, dict) else list(range(len(target)))
        op = rng.randrange(5)
        if op == 0 and keys:
            del target[rng.choice(keys)]
        elif op == 1 and keys:
            target[rng.choice(keys)] = junk_value(rng)
        elif op == 2 and keys and isinstance(target, dict):
            key = rng.choice(keys)
            target[key + rng.choice(["_", "s", "X"])] = target.pop(key)
        elif op == 3:
            if isinstance(target, dict):
                target[rng.choice(["images", "index", "ok", "extra", "prompt", "poses"])] = (
                    junk_value(rng)
                )
            else:
                target.insert(rng.randrange(len(target) + 1), junk_value(rng))
        elif op == 4 and len(keys) > 1:
            a, b = rng.sample(keys, 2)
            target[a], target[b] = target[b], target[a]
    return obj


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a byte
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del data[pos:]
        elif op == 2:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        elif op == 3:  # insert JSON-ish tokens
            data[pos:pos] = rng.choice(
                [b"NaN", b"-Infinity", b"1e999", b'"id":"x",', b"[", b"]", b"{", b"}", b",", b'"']
            )
        elif op == 4 and data:  # drop a span
            del data[pos : pos + rng.randrange(1, 16)]
    return bytes(data)


def nested(rng: random.Random) -> bytes:
    depth = rng.choice([10, 500, 999, 1000, 1001, 5000, 200_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    core = opener * depth + b"1" + closer * depth
    if rng.random() < 0.5:
        core = b'{"protocol":1,"op":"pose","id":"n","prompt":"x","history":' + core + b"}"
    return core


def make_case(rng: random.Random):
    kind = rng.randrange(10)
    seed = [bytes(f) for f in rng.choice(SEEDS)]
    if kind == 0:  # random bytes, random frame count
        return [rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(4))]
    if kind in (1, 2):  # byte-level mutation of frame 0
        seed[0] = mutate_bytes(seed[0], rng)
        return seed
    if kind in (3, 4, 5):  # field-level mutation
        obj = mutate_json(json.loads(seed[0]), rng)
        text = json.dumps(obj, allow_nan=True, ensure_ascii=rng.random() < 0.5)
        seed[0] = text.encode("utf-8", "surrogatepass")
        return seed
    if kind == 6:  # extra, missing or odd frames
        op = rng.randrange(4)
        if op == 0:
            seed.insert(rng.randrange(1, len(seed) + 1), rng.choice(ODD_FRAMES))
        elif op == 1 and len(seed) > 1:
            del seed[rng.randrange(1, len(seed))]
        elif op == 2:
            seed[rng.randrange(len(seed))] = rng.choice([*ODD_FRAMES, released_view()])
        else:
            seed += [PNG] * rng.randrange(1, 12)
        return seed
    if kind == 7:  # deep nesting
        return [nested(rng)]
    if kind == 8:  # huge numbers and odd constants in a field
        obj = json.loads(seed[0])
        key = rng.choice(["protocol", "images", "index", "total", "timeout_ms", "uptime_s", "id"])
        number = rng.choice(["1" * 5000, "1e400", "-1e400", "1" + "0" * 400, "NaN", "1.0e-400"])
        text = json.dumps(obj)[:-1] + f', "{key}": {number}}}'
        return [text.encode(), *seed[1:]]
    # kind 9: the frame list itself is odd
    return rng.choice(
        [
            None,
            b"",
            seed[0],
            seed[0].decode("utf-8", "replace"),
            tuple(seed),
            [],
            {0: seed[0]},
            iter(seed),
            [bytearray(f) for f in seed],
            [memoryview(f) for f in seed],
            seed * rng.randrange(2, 5),
        ]
    )


def check(decode, encode, types, frames) -> bool:
    try:
        message = decode(frames)
    except ProtocolError as err:
        assert isinstance(err.code, ErrorCode) and err.code.on_wire
        assert isinstance(err.message, str) and err.message
        assert err.field is None or isinstance(err.field, str)
        assert err.request_id is None or isinstance(err.request_id, str)
        str(err)
        return False
    assert isinstance(message, types), type(message)
    assert decode(encode(message)) == message  # what a decoder accepts, an encoder sends
    return True


def test_decoders_raise_only_protocol_error_on_any_input():
    rng = random.Random(20240601)
    accepted = rejected = 0
    for _ in range(CASES):
        frames = make_case(rng)
        for decode, encode, types in (
            (decode_request, encode_request, REQUEST_TYPES),
            (decode_reply, encode_reply, REPLY_TYPES),
        ):
            if check(decode, encode, types, frames):
                accepted += 1
            else:
                rejected += 1
    assert accepted + rejected == 2 * CASES
    # The corpus must exercise both outcomes, or it tests less than it claims.
    assert accepted > CASES // 50 and rejected > CASES


def test_mutated_valid_messages_hit_every_decoder_error_code():
    rng = random.Random(7)
    seen = set()
    for _ in range(3000):
        frames = make_case(rng)
        for decode in (decode_request, decode_reply):
            try:
                decode(frames)
            except ProtocolError as err:
                seen.add(err.code)
    decoder_codes = {
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_SCHEMA,
        ErrorCode.UNSUPPORTED_PROTOCOL,
        ErrorCode.UNKNOWN_OP,
        ErrorCode.TOO_LARGE,
        ErrorCode.BAD_IMAGE,
        ErrorCode.EMPTY_PROMPT,
    }
    assert decoder_codes <= seen, decoder_codes - seen
