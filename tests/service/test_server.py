"""The server through real ZeroMQ sockets on loopback.

Most tests run twice: on a scripted backend and on the tiny real LLaVA. Either way the
backend's timing is under the test's control (`hold()`), so cancel, deadlines and shutdown are
tested deterministically. Tests of the scripted backend's own failures run on it alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import random
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from inference_service import server as server_module
from inference_service.backend import ModelBackend
from inference_service.demo import loading_notes
from inference_service.keys import make_keys
from inference_service.scheduler import Answer
from inference_service.server import (
    AuthorizedClients,
    CurveKeys,
    Server,
    ServerConfigError,
    check_address_free,
)
from shared_protocol.client import Client, ClientCurveKeys
from shared_protocol.pose import Pose
from shared_protocol.protocol import (
    INSTANCE_ENV,
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
    decode_reply,
    encode_request,
)

from .scripted_backend import (
    TIMEOUT_S,
    HeldModelBackend,
    Holdable,
    ScriptedBackend,
    pose_for,
    wait_until,
)
from .tiny_llava import image_bytes, png_header

PNG = image_bytes((200, 100, 50))
# For the tests of what only the scripted backend does (its failures, its status, its timing).
scripted_only = pytest.mark.parametrize("backend", ["scripted"], indirect=True)


class Running:
    """A server on a free loopback port, served from a background thread."""

    def __init__(self, backend: Holdable, bind: str = "tcp://127.0.0.1:*", **options) -> None:
        self.backend = backend
        self.server = Server(backend, backend.info, bind, **options)
        self.address = self.server.address
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def client(self, **options) -> Client:
        return Client(self.address, context=zmq.Context.instance(), **options)

    def stop(self) -> None:
        self.backend.release()
        self.server.stop()
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), "serve_forever did not return"


@pytest.fixture(params=["scripted", "tiny-llava"])
def backend(request) -> Holdable:
    if request.param == "scripted":
        return ScriptedBackend()
    return HeldModelBackend(ModelBackend(request.getfixturevalue("tiny_model"), "tiny"))


def assert_answers(backend: Holdable, prompt: str, poses: tuple[Pose, ...]) -> None:
    """`poses` are the backend's answer to `prompt` (to float tolerance: batching reorders sums)."""
    expected = backend.expected_poses(prompt)
    assert [p.label for p in poses] == [p.label for p in expected]
    for got, want in zip(poses, expected, strict=True):
        np.testing.assert_allclose(got.axis_angle, want.axis_angle, atol=1e-5)


@pytest.fixture
def running(backend) -> Iterator[Running]:
    served = Running(backend, max_batch=8, max_wait_ms=20)
    yield served
    served.stop()


@scripted_only
def test_status_reports_the_model(running):
    with running.client() as client:
        reply = client.request(StatusRequest(client.new_id()), TIMEOUT_S)
    assert isinstance(reply, StatusReply)
    assert (reply.model, reply.device, reply.dtype) == ("scripted", "cpu", "float32")
    assert reply.queue_depth == 0 and reply.uptime_s >= 0
    assert reply.supports_images and reply.max_images == 1
    assert len(reply.instance) == 32  # started by no one who set INSTANCE_ENV: its own


@pytest.mark.parametrize("given", ["started-by-blender-7f3a", "x" * 300, "caf\udce9"])
def test_a_server_gives_back_the_instance_it_was_started_with(monkeypatch, caplog, given):
    # One no reply could carry (too long, not text) broke every status reply: replaced.
    monkeypatch.setenv(INSTANCE_ENV, given)
    backend = ScriptedBackend()
    server = Server(backend, backend.info, "tcp://127.0.0.1:*")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Client(server.address, context=zmq.Context.instance()) as client:
            instance = client.wait_serving(TIMEOUT_S).instance
    finally:
        server.stop()
        thread.join(TIMEOUT_S)
    usable = given.isascii() and len(given) <= 64
    assert instance == given if usable else re.fullmatch("[0-9a-f]{32}", instance)
    assert (f"{INSTANCE_ENV} is not a token" in caplog.text) != usable


def test_waiting_for_a_starting_service_outlasts_the_check_that_its_port_is_free():
    # chatpose-serve checks its port by binding it for a moment (check_address_free): a
    # client already waiting there met that socket, which closed its connection at the
    # handshake, and gave up at once ("it has CURVE keys and this client none"): the demo
    # failed so on a loaded machine. Here a listener closes the first connection mid-
    # handshake as that check does; ZeroMQ's next try waits unanswered in its backlog for a
    # while, then reaches the service through it.
    backend = ScriptedBackend()
    server = Server(backend, backend.info, "tcp://127.0.0.1:*")
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def copy(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def check_then_pass_on():
        connection, _ = listener.accept()
        connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")  # closed mid-handshake
        connection.close()
        time.sleep(0.6)  # longer than the client's first look at its connection
        connection, _ = listener.accept()
        service = socket.create_connection(("127.0.0.1", int(server.address.rsplit(":", 1)[1])))
        threading.Thread(target=copy, args=(connection, service), daemon=True).start()
        copy(service, connection)

    threading.Thread(target=check_then_pass_on, daemon=True).start()
    try:
        with Client(f"tcp://127.0.0.1:{port}", context=zmq.Context.instance()) as client:
            assert client.wait_serving(TIMEOUT_S).model == "scripted"
    finally:
        server.stop()
        serving.join(TIMEOUT_S)
        listener.close()


def test_waiting_with_keys_outlasts_the_port_check_of_a_service_with_keys(tmp_path):
    # That check's socket has no keys: a keyed client it took was refused for good ("one
    # side has CURVE keys and the other has none"), and gave up, though the service that
    # listened there right after has the keys the client expects.
    make_keys(tmp_path, ["animator"])
    check = zmq.Context.instance().socket(zmq.ROUTER)
    port = check.bind_to_random_port("tcp://127.0.0.1")
    keys = ClientCurveKeys(tmp_path / "animator.key_secret", tmp_path / "server.key")
    backend = ScriptedBackend()
    curve = CurveKeys(tmp_path / "server.key_secret", tmp_path / "authorized_clients")
    with Client(f"tcp://127.0.0.1:{port}", context=zmq.Context.instance(), curve=keys) as client:
        wait_until(lambda: client.refusal is not None)  # for good: ZeroMQ tries no more
        check.close(linger=0)
        server = Server(backend, backend.info, f"tcp://127.0.0.1:{port}", curve=curve)
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
        try:
            assert client.wait_serving(TIMEOUT_S).model == "scripted"
        finally:
            server.stop()
            serving.join(TIMEOUT_S)


def test_a_server_listens_while_its_model_loads_and_serves_once_it_has_one():
    backend = ScriptedBackend()
    server = Server(None, None, "tcp://127.0.0.1:*")  # bound before the model loads
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Client(server.address, context=zmq.Context.instance()) as client:
            for request in (StatusRequest(client.new_id()), PoseRequest(client.new_id(), "wave")):
                reply = client.request(request, TIMEOUT_S)
                assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BUSY
                assert reply.message.startswith("the model is still loading (")
            cancel = client.request(CancelRequest(client.new_id(), "p-9"), TIMEOUT_S)
            assert isinstance(cancel, CancelReply) and not cancel.cancelled
            # A load longer than the wait: a service seen loading is waited for (the demo's
            # 180 s gave up on a 13B model, and stopped it).
            threading.Timer(1.5, server.attach, (backend, backend.info)).start()
            with pytest.raises(ProtocolError, match="did not serve within 0.5 s"):
                client.wait_serving(0.5)
            messages, said = [], []
            demo_notes = loading_notes(said.append, every_s=0.3)  # what the demo says

            def loading(message):
                messages.append(message)
                demo_notes(message)

            assert client.wait_serving(0.5, loading=loading).model == "scripted"
            assert messages and messages[-1].startswith("the model is still loading (")
            assert 1 <= len(said) < len(messages)  # a note every 0.3 s, not one a reply
            assert said[0] == (
                "chatpose-serve is still loading the model (0 s so far); Ctrl-C stops the demo"
            )
            reply = client.request(PoseRequest(client.new_id(), "wave"), TIMEOUT_S)
            assert isinstance(reply, PoseReply)
            assert_answers(backend, "wave", reply.poses)
    finally:
        server.stop()
        thread.join(TIMEOUT_S)
    assert not thread.is_alive()


def test_one_pose_request(running, backend):
    with running.client() as client:
        reply = client.request(PoseRequest(client.new_id(), "wave"), TIMEOUT_S)
    assert isinstance(reply, PoseReply)
    assert_answers(backend, "wave", reply.poses)
    assert reply.text.startswith("Sure, it is <POSE>.")


@scripted_only
def test_chat_mode_goes_through_generation(running):
    with running.client() as client:
        reply = client.request(PoseRequest(client.new_id(), "two", mode="chat"), TIMEOUT_S)
    assert reply.text.startswith("Here you go") and len(reply.poses) == 2


def test_many_concurrent_clients_get_their_own_answers_in_shared_batches(running, backend):
    replies: dict[str, object] = {}

    def one_client(n: int) -> None:
        with running.client() as client:
            for k in range(6):
                prompt = f"client {n} prompt {k} " + "x" * n
                replies[prompt] = client.request(PoseRequest(client.new_id(), prompt), TIMEOUT_S)

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(replies) == 72
    for prompt, reply in replies.items():
        assert isinstance(reply, PoseReply), f"{prompt!r} got {reply!r}"
        assert_answers(backend, prompt, reply.poses)
    assert sum(running.backend.batch_sizes) == 72
    assert max(running.backend.batch_sizes) > 1, "concurrent requests were never batched"
    assert max(running.backend.batch_sizes) <= 8


def test_batch_streams_every_item_then_done(running, backend):
    prompts = [f"pose number {i}" for i in range(20)]
    prompts[7] = backend.failing_prompt
    with running.client() as client:
        replies = list(client.stream(BatchRequest(client.new_id(), prompts), TIMEOUT_S))
    items = [r for r in replies if isinstance(r, BatchItemReply)]
    errors = [r for r in replies if isinstance(r, ErrorReply)]
    assert sorted(r.index for r in items) == [i for i in range(20) if i != 7]
    assert all(r.total == 20 for r in items)
    for item in items:
        assert_answers(backend, prompts[item.index], item.poses)
    assert [(e.index, e.code) for e in errors] == [(7, ErrorCode(backend.failing_code))]
    assert replies[-1] == BatchDoneReply(replies[-1].id, total=20, completed=19)


def test_cancel_ends_a_batch_and_nothing_follows(running, backend):
    backend.hold()
    with running.client() as client:
        batch = BatchRequest(client.new_id(), [f"item {i}" for i in range(40)])
        client.send(batch)
        assert backend.entered.wait(TIMEOUT_S)
        cancel = CancelRequest(client.new_id(), target=batch.id)
        client.send(cancel)
        replies = _collect(client, until=lambda r: isinstance(r, CancelReply))
        backend.release()
        time.sleep(0.3)  # anything the running micro-batch produced would arrive now
        replies += _collect(client, until=None, quiet_s=0.3)
    cancelled = [r for r in replies if isinstance(r, ErrorReply) and r.id == batch.id]
    assert [(r.code, r.index) for r in cancelled] == [(ErrorCode.CANCELLED, None)]
    assert CancelReply(cancel.id, batch.id, True) in replies
    assert not [r for r in replies if isinstance(r, BatchItemReply | BatchDoneReply)]
    with running.client() as client:
        unknown = client.request(CancelRequest(client.new_id(), "no-such-id"), TIMEOUT_S)
        assert unknown == CancelReply(unknown.id, "no-such-id", False)
        status = client.request(StatusRequest(client.new_id()), TIMEOUT_S)
        assert status.queue_depth == 0


def test_deadline_expires_while_the_model_is_busy(running, backend):
    backend.hold()
    with running.client() as client:
        first = PoseRequest(client.new_id(), "slow one")
        client.send(first)
        assert backend.entered.wait(TIMEOUT_S)
        late = PoseRequest(client.new_id(), "in a hurry", timeout_ms=100)
        reply = client.request(late, TIMEOUT_S)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.TIMEOUT
        backend.release()
        answered = _collect(client, until=lambda r: r.id == first.id)
        assert client.request(StatusRequest(client.new_id()), TIMEOUT_S).queue_depth == 0
    assert isinstance(answered[-1], PoseReply) and answered[-1].id == first.id
    assert_answers(backend, "slow one", answered[-1].poses)


def test_a_client_that_disappears_mid_request_does_not_disturb_others(running, backend):
    backend.hold()
    leaving = running.client()
    leaving.send(BatchRequest(leaving.new_id(), [f"p{i}" for i in range(30)]))
    assert backend.entered.wait(TIMEOUT_S)
    leaving.close()
    time.sleep(0.2)
    backend.release()
    with running.client() as client:
        reply = client.request(PoseRequest(client.new_id(), "still here?"), TIMEOUT_S)
        assert_answers(backend, "still here?", reply.poses)
        deadline = time.monotonic() + TIMEOUT_S
        while client.request(StatusRequest(client.new_id()), TIMEOUT_S).queue_depth:
            assert time.monotonic() < deadline, "the vanished client's work was never dropped"
            time.sleep(0.05)
    # Nor does the server keep the vanished client's requests in its log of open requests.
    while running.server._received:
        assert time.monotonic() < deadline, f"still open: {list(running.server._received)}"
        time.sleep(0.05)


class TooManyPoses(ScriptedBackend):
    """Chat answers with one pose more than a reply may hold."""

    def answer_chat(self, item, stop=None):
        answer = super().answer_chat(item, stop)
        return Answer(answer.text, answer.poses[:1] * (Limits().max_poses + 1))


def test_an_answer_that_breaks_a_protocol_limit_gets_a_model_error():
    served = Running(TooManyPoses())
    try:
        with served.client() as client:
            chat = PoseRequest(client.new_id(), "many", mode="chat")
            reply = client.request(chat, TIMEOUT_S)
            assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.MODEL_ERROR
            assert reply.id == chat.id and "poses" in reply.message
            client.send(BatchRequest(client.new_id(), ["one", "two"], mode="chat"))
            replies = _collect(client, until=lambda r: isinstance(r, BatchDoneReply))
        errors = [r for r in replies if isinstance(r, ErrorReply)]
        assert sorted(r.index for r in errors) == [0, 1]
        assert all(r.code == ErrorCode.MODEL_ERROR for r in errors)
        assert replies[-1].completed == 0
    finally:
        served.stop()


def test_shutdown_finishes_the_running_work_and_fails_the_rest(backend, caplog):
    caplog.set_level(logging.INFO, logger="inference_service.server")
    served = Running(backend, max_batch=1, max_wait_ms=0)
    backend.hold()
    client = served.client()
    running_request = PoseRequest(client.new_id(), "already running")
    queued_request = PoseRequest(client.new_id(), "still queued")
    client.send(running_request)
    assert backend.entered.wait(TIMEOUT_S)
    client.send(queued_request)
    wait_until(lambda: served.server.scheduler.queue_depth == 1)  # the server has read it
    served.server.stop()
    wait_until(lambda: served.server.scheduler.queue_depth == 0)  # shutting down: unqueued
    # While the running micro-batch finishes, a new request is answered, not left waiting.
    late = PoseRequest(client.new_id(), "arrives late")
    client.send(late)
    replies = {r.id: r for r in _collect(client, until=lambda r: r.id == late.id)}
    assert replies[late.id].code == ErrorCode.SHUTTING_DOWN
    assert "ask again once it has been started again" in replies[late.id].message
    # Its status says so too: it looked healthy, while a restart found the address taken.
    status = client.request(StatusRequest(client.new_id()), TIMEOUT_S)
    assert isinstance(status, ErrorReply) and status.code == ErrorCode.SHUTTING_DOWN
    assert "the work running finishes (up to 30 s), then it exits" in status.message
    assert "stopping: new requests are refused" in caplog.text  # said when it begins
    backend.release()
    served.thread.join(TIMEOUT_S)
    assert not served.thread.is_alive()
    while not {running_request.id, queued_request.id} <= replies.keys():  # sent before it ended
        reply = client.poll(TIMEOUT_S * 1000)
        assert reply is not None, f"no reply came; so far {replies!r}"
        replies[reply.id] = reply
    client.close()
    assert_answers(backend, "already running", replies[running_request.id].poses)
    assert replies[queued_request.id].code == ErrorCode.SHUTTING_DOWN


@scripted_only
def test_model_and_image_errors_are_typed_and_the_server_keeps_serving(running):
    with running.client() as client:
        exploded = client.request(PoseRequest(client.new_id(), "explode"), TIMEOUT_S)
        assert exploded.code == ErrorCode.MODEL_ERROR
        assert "the model exploded" in exploded.message
        bad_image = PoseRequest(client.new_id(), "", images=(PNG + b"corrupt",))
        assert client.request(bad_image, TIMEOUT_S).code == ErrorCode.BAD_IMAGE
        too_many = PoseRequest(client.new_id(), "two people", images=(PNG, PNG))
        reply = client.request(too_many, TIMEOUT_S)
        assert reply.code == ErrorCode.UNSUPPORTED_INPUT and "at most 1 image" in reply.message
        ok = client.request(PoseRequest(client.new_id(), "fine", images=(PNG,)), TIMEOUT_S)
        assert ok.poses == (pose_for("fine"),)


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (png_header(40_000, 40_000), "too many pixels to decode (1,600,000,000 pixels"),  # a bomb
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "not a decodable PNG or JPEG"),
    ],
    ids=["decompression-bomb", "png-signature-then-zeros"],
)
def test_an_image_is_refused_by_its_header_before_it_is_queued(running, backend, image, problem):
    with running.client() as client:
        reply = client.request(PoseRequest(client.new_id(), "copy", images=(image,)), TIMEOUT_S)
        assert reply.code == ErrorCode.BAD_IMAGE
        assert reply.message.startswith("images[0]: ") and problem in reply.message
        assert backend.batch_sizes == []  # the model never saw it
        ok = client.request(PoseRequest(client.new_id(), "fine", images=(PNG,)), TIMEOUT_S)
        assert isinstance(ok, PoseReply) and len(ok.poses) == 1 and backend.batch_sizes == [1]


@scripted_only
def test_an_internal_error_is_answered_under_the_request_s_id(backend, monkeypatch):
    # A bug past decoding (here: a model name that cannot be encoded, as a folder name in
    # another encoding gives): the client gets its answer, not a wait for its timeout.
    monkeypatch.setattr(backend, "info", dataclasses.replace(backend.info, model="bad\udcff"))
    served = Running(backend)
    try:
        with served.client() as client:
            request = StatusRequest(client.new_id())
            client.send(request)
            [reply] = _collect(client, until=lambda r: isinstance(r, ErrorReply))
            assert (reply.id, reply.op, reply.code) == (
                request.id,
                "status",
                ErrorCode.INTERNAL_ERROR,
            )
            reply = client.request(PoseRequest(client.new_id(), "after"), TIMEOUT_S)
            assert reply.poses == (pose_for("after"),)  # and it serves on
    finally:
        served.stop()


def test_the_same_id_twice_in_flight_is_refused(running, backend, caplog):
    caplog.set_level(logging.INFO)
    backend.hold()
    with running.client() as client:
        request = PoseRequest(client.new_id(), "once")
        client.send(request)
        client.send(request)
        duplicate = _collect(client, until=lambda r: isinstance(r, ErrorReply))[-1]
        assert duplicate.code == ErrorCode.BAD_SCHEMA and "already in flight" in duplicate.message
        client.send(PoseRequest(request.id, "again", images=(png_header(40_000, 40_000),)))
        duplicate = _collect(client, until=lambda r: isinstance(r, ErrorReply))[-1]
        assert "already in flight" in duplicate.message  # the id is what is wrong, first
        malformed = {"protocol": 1, "op": "pose", "id": request.id, "prompt": 5}
        client._socket.send_multipart([json.dumps(malformed).encode()])
        refused = _collect(client, until=lambda r: isinstance(r, ErrorReply))[-1]
        assert refused.code == ErrorCode.BAD_SCHEMA  # logged as a bad request, not as done
        backend.release()
        assert _collect(client, until=lambda r: isinstance(r, PoseReply))[-1].id == request.id
    # Each gets its own "request done" line: the refusals did not take the first's. (The
    # server logs it after sending the reply, so the test waits for it.)
    logged = lambda: [r for r in caplog.records if getattr(r, "event", None) == "request"]  # noqa: E731
    wait_until(lambda: len(logged()) >= 3)
    done = logged()
    assert sorted((r.id, r.ok) for r in done) == [(request.id, False)] * 2 + [(request.id, True)]


def test_a_status_answered_is_logged_at_debug_a_pose_at_info(running, caplog):
    caplog.set_level(logging.DEBUG, logger="inference_service.server")
    with running.client() as client:
        status = client.request(StatusRequest(client.new_id()), TIMEOUT_S)
        pose = client.request(PoseRequest(client.new_id(), "wave"), TIMEOUT_S)
    logged = lambda: {  # noqa: E731
        r.id: r.levelno for r in caplog.records if getattr(r, "event", None) == "request"
    }
    wait_until(lambda: len(logged()) == 2)
    assert logged() == {status.id: logging.DEBUG, pose.id: logging.INFO}


@scripted_only
def test_oversized_messages_get_too_large_and_past_the_transport_cap_are_cut_off(backend):
    limits = Limits(max_header_bytes=2_000, max_image_bytes=10_000, max_images=1, max_frames=2)
    served = Running(backend, limits=limits)
    header = b'{"protocol": 1, "op": "pose", "id": "big", "prompt": "x"}'
    try:
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(served.address)
        for frames, field in [
            ([header + b" " * 2_000], "header"),
            ([header, PNG + b"\0" * 10_000], "images[0]"),
        ]:
            raw.send_multipart(frames)
            assert raw.poll(TIMEOUT_S * 1000), f"no reply to an oversized {field}"
            reply = decode_reply(raw.recv_multipart())
            assert reply.code == ErrorCode.TOO_LARGE and reply.message.startswith(field)
        # Past the cap ZeroMQ drops the connection unread: the client sees it closed (its
        # socket monitor), no reply comes, and the server serves on.
        monitor = raw.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        raw.send_multipart([header, b"\0" * 100_000])
        assert monitor.poll(TIMEOUT_S * 1000), "the connection was not dropped"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        assert not raw.poll(0)
        raw.disable_monitor()
        monitor.close()
        raw.close()
        with served.client() as client:
            reply = client.request(PoseRequest(client.new_id(), "after"), TIMEOUT_S)
            assert reply.poses == (pose_for("after"),)
    finally:
        served.stop()


@scripted_only
def test_a_full_queue_answers_busy(backend):
    served = Running(backend, max_batch=1, max_wait_ms=0, max_queue=3)
    try:
        backend.hold()
        with served.client() as client:
            first = BatchRequest(client.new_id(), ["a"] * 3)
            client.send(first)
            assert backend.entered.wait(TIMEOUT_S)  # one runs, two wait
            reply = client.request(BatchRequest(client.new_id(), ["b"] * 2), TIMEOUT_S)
            assert reply.code == ErrorCode.BUSY
            assert reply.message == (
                "the queue is too full for these 2 prompt(s): 2 wait, and this service queues "
                "at most 3 (chatpose-serve --max-queue); try again shortly"
            )
            # More than the queue could ever hold is not "busy": trying again cannot help.
            never = client.request(BatchRequest(client.new_id(), ["c"] * 4), TIMEOUT_S)
            assert never.code == ErrorCode.TOO_LARGE
            assert "this service queues at most 3 prompts" in never.message
            backend.release()
            _collect(client, until=lambda r: isinstance(r, BatchDoneReply) and r.id == first.id)
            again = client.request(BatchRequest(client.new_id(), ["a"] * 3), TIMEOUT_S)
            assert again.completed == 3
    finally:
        served.stop()


@scripted_only
def test_a_queue_full_of_images_answers_busy_by_bytes(backend):
    big = image_bytes((10, 20, 30), size=(256, 256)) + b"\0" * (700 << 10)  # ~0.7 MiB
    served = Running(backend, max_batch=1, max_wait_ms=0, max_queued_mb=2)
    try:
        backend.hold()
        with served.client() as client:
            running = PoseRequest(client.new_id(), "runs first", images=(big,))
            client.send(running)
            assert backend.entered.wait(TIMEOUT_S)  # taken off the queue: it holds no bytes
            waiting = [PoseRequest(client.new_id(), f"waits {i}", images=(big,)) for i in range(2)]
            for request in waiting:
                client.send(request)
            refused = client.request(
                PoseRequest(client.new_id(), "one too many", images=(big,)), TIMEOUT_S
            )
            assert refused.code == ErrorCode.BUSY
            assert "the queue is too full for these 0.7 MiB of images and text: 1.4 MiB wait" in (
                refused.message
            )
            assert "at most 2 MiB (chatpose-serve --max-queued-mb)" in refused.message
            backend.release()
            answered = _collect(client, until=lambda r: r.id == waiting[-1].id)
            assert {r.id for r in answered if isinstance(r, PoseReply)} >= {waiting[-1].id}
            after = client.request(
                PoseRequest(client.new_id(), "room again", images=(big,)), TIMEOUT_S
            )
            assert isinstance(after, PoseReply)
            huge = big + b"\0" * (2 << 20)  # alone more than the 2 MiB the queue holds
            never = client.request(PoseRequest(client.new_id(), "huge", images=(huge,)), TIMEOUT_S)
            assert never.code == ErrorCode.TOO_LARGE and "at most 3" not in never.message
            assert "MiB (chatpose-serve --max-queue, --max-queued-mb)" in never.message
    finally:
        served.stop()


class _SmallPipes(zmq.Context):
    """A context whose sockets queue 4 messages a peer over 4 KiB kernel buffers: a client
    that does not read fills its pipe after a few replies."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sndhwm = self.rcvhwm = 4  # defaults for the sockets made from here on
        self.sndbuf = self.rcvbuf = 4096


def _small_pipes_server(backend, monkeypatch) -> Running:
    with monkeypatch.context() as patch:  # for the server's own context only
        patch.setattr(server_module.zmq, "Context", _SmallPipes)
        return Running(backend, max_batch=64, max_wait_ms=0)


def _send_batches(client: Client, count: int) -> list[BatchRequest]:
    batches = [
        BatchRequest(client.new_id(), [f"{b} {i}" for i in range(256)]) for b in range(count)
    ]
    for batch in batches:
        client.send(batch)
    return batches


@scripted_only
def test_a_client_that_reads_slowly_gets_every_reply(backend, monkeypatch):
    # Its pipe fills (4 messages), so most replies are held and sent again turn by turn.
    # Staying under the stall limit while slow is the next test's, on a clock it sets: a
    # limit short enough to pass here in wall time failed on a loaded 2-core machine.
    served = _small_pipes_server(backend, monkeypatch)
    context = _SmallPipes()
    try:
        with Client(served.address, context=context) as client:
            batches = _send_batches(client, 1)
            time.sleep(0.2)  # not reading: the pipe fills
            replies = []
            while not replies or not isinstance(replies[-1], BatchDoneReply):
                reply = client.poll(TIMEOUT_S * 1000)
                assert reply is not None, f"no reply came after {len(replies)}"
                replies.append(reply)
                time.sleep(0.002)
        done = {r.id: r.completed for r in replies if isinstance(r, BatchDoneReply)}
        assert done == {batch.id: 256 for batch in batches}
        assert sum(isinstance(r, BatchItemReply) for r in replies) == 256
    finally:
        served.stop()
        context.term()


class _SlowReader:
    """A ROUTER whose client takes one reply each time it is given room."""

    def __init__(self) -> None:
        self.room = 0
        self.taken: list[bytes] = []

    def send_multipart(self, frames, flags=0):
        if not self.room:
            raise zmq.Again()
        self.room -= 1
        self.taken.append(frames[-1])

    def close(self, linger=None):
        pass


@scripted_only
def test_a_client_slower_in_all_than_the_stall_limit_is_kept_while_it_reads(
    backend, monkeypatch, caplog
):
    now = [1000.0]
    monkeypatch.setattr(server_module.time, "monotonic", lambda: now[0])
    server = Server(backend, backend.info, "tcp://127.0.0.1:*")
    router, server._router = server._router, _SlowReader()
    try:
        status = StatusReply("s", "m", "cpu", "float32", 0, 1.0, "1", False, 0)
        for _ in range(6):
            server._emit(b"slow", status)
        server._forward_replies()  # reads nothing yet: its replies wait from here
        for _ in range(6):  # 6 turns, half the limit apart: 3 limits in all
            now[0] += server_module.STALLED_CLIENT_S / 2
            server._router.room = 1
            server._forward_replies()
        assert len(server._router.taken) == 6 and not server._held
        assert "client stopped reading" not in caplog.text
        for _ in range(6):
            server._emit(b"slow", status)
        server._forward_replies()
        now[0] += server_module.STALLED_CLIENT_S + 1  # then it stops: dropped
        server._forward_replies()
        assert "client stopped reading" in caplog.text and not server._held
    finally:
        server._router = router
        server.close()


@scripted_only
def test_a_client_that_stops_reading_has_its_work_dropped(backend, monkeypatch, caplog):
    monkeypatch.setattr(server_module, "STALLED_CLIENT_S", 0.3)
    served = _small_pipes_server(backend, monkeypatch)
    context = _SmallPipes()
    try:
        with Client(served.address, context=context) as client:
            _send_batches(client, 4)
            wait_until(lambda: "client stopped reading" in caplog.text)
            assert served.server.scheduler.queue_depth == 0  # its work is gone
            with served.client() as other:  # and the service serves the others
                reply = other.request(PoseRequest(other.new_id(), "still here"), TIMEOUT_S)
                assert isinstance(reply, PoseReply)
    finally:
        served.stop()
        context.term()


class _FullPipe:
    """A ROUTER whose every client's pipe is full (a client that reads nothing)."""

    def send_multipart(self, frames, flags=0):
        raise zmq.Again()

    def close(self, linger=None):
        pass


class _GonePeer(_FullPipe):
    """A ROUTER whose client has gone (ROUTER_MANDATORY: EHOSTUNREACH)."""

    def send_multipart(self, frames, flags=0):
        raise zmq.ZMQError(errno.EHOSTUNREACH)


@scripted_only
def test_a_reply_that_could_not_be_delivered_is_named_in_the_log(backend, caplog):
    # Its "request done" line, logged when the reply was queued, said ok; the warning that
    # followed named neither the request nor what became of its reply.
    server = Server(backend, backend.info, "tcp://127.0.0.1:*")
    router, server._router = server._router, _GonePeer()
    try:
        server._emit(b"gone", PoseReply("chat-7", "Sure.", ()))
        server._forward_replies()
        [warning] = [r for r in caplog.records if r.getMessage().startswith("client unreachable")]
        assert warning.undelivered == "chat-7"
        # Replies the model queued before its work was dropped: no second line (the soak
        # review: 2,000 clients that left mid-batch wrote 2,704 of them).
        server._emit(b"gone", PoseReply("chat-8", "Sure.", ()))
        server._forward_replies()
        gone = [r for r in caplog.records if r.getMessage().startswith("client unreachable")]
        assert len(gone) == 1
        for k in range(server_module.GONE_CLIENTS_KEPT + 1):  # only the latest are kept
            server._emit(f"gone {k}".encode(), PoseReply("x", "Sure.", ()))
        server._forward_replies()
        assert len(server._gone) == server_module.GONE_CLIENTS_KEPT and b"gone" not in server._gone
    finally:
        server._router = router
        server.close()


@scripted_only
def test_a_client_that_floods_and_reads_nothing_is_dropped_before_the_stall_time(
    backend, monkeypatch, caplog
):
    monkeypatch.setattr(server_module, "MAX_HELD_REPLIES", 50)  # STALLED_CLIENT_S: 120 s
    server = Server(backend, backend.info, "tcp://127.0.0.1:*")
    router, server._router = server._router, _FullPipe()
    try:
        status = StatusReply("s", "m", "cpu", "float32", 0, 1.0, "1", False, 0)
        for client, count in ((b"at the cap", 50), (b"past it", 51)):
            for _ in range(count):  # status replies skip the queue's limits
                server._emit(client, status)
        server._forward_replies()
        assert [frames[0] for frames in server._held] == [b"at the cap"] * 50  # kept, in order
        dropped = [r for r in caplog.records if r.getMessage().startswith("client stopped")]
        assert [r.error for r in dropped] == ["51 replies waited for it"]
    finally:
        server._router = router
        server.close()


@scripted_only
def test_clients_stalled_or_gone_in_one_turn_are_dropped_in_one_pass(backend, monkeypatch):
    # One at a time, each a pass over every reply held: 20,000 stalled clients held the I/O
    # thread 5 s, 5,000 gone ones 6 s.
    now = [1000.0]
    monkeypatch.setattr(server_module.time, "monotonic", lambda: now[0])
    server = Server(backend, backend.info, "tcp://127.0.0.1:*")
    router = server._router
    passes = []
    drop = server._drop_clients
    monkeypatch.setattr(server, "_drop_clients", lambda c: passes.append(len(c)) or drop(c))
    try:
        status = StatusReply("s", "m", "cpu", "float32", 0, 1.0, "1", False, 0)
        server._router = _FullPipe()
        for k in range(30):
            server._emit(f"reader {k}".encode(), status)
        server._forward_replies()
        now[0] += server_module.STALLED_CLIENT_S + 1
        server._forward_replies()
        assert not server._held and [n for n in passes if n] == [30]
        passes.clear()
        server._router = _GonePeer()
        for k in range(30):
            server._emit(f"gone {k}".encode(), status)
        server._forward_replies()
        assert len(server._gone) == 30 and [n for n in passes if n] == [30]
    finally:
        server._router = router
        server.close()


@scripted_only
def test_clients_that_read_nothing_hold_so_many_replies_in_all_at_most(
    backend, monkeypatch, caplog
):
    # Each under its own cap, many such connections held that much memory each.
    monkeypatch.setattr(server_module, "MAX_HELD_REPLIES_IN_ALL", 100)
    server = Server(backend, backend.info, "tcp://127.0.0.1:*")
    router, server._router = server._router, _FullPipe()
    try:
        status = StatusReply("s", "m", "cpu", "float32", 0, 1.0, "1", False, 0)
        for client, count in ((b"a", 40), (b"b", 45), (b"c", 30)):
            for _ in range(count):
                server._emit(client, status)
        server._forward_replies()
        assert Counter(frames[0] for frames in server._held) == {b"a": 40, b"c": 30}
        [dropped] = [r for r in caplog.records if r.getMessage().startswith("client stopped")]
        assert dropped.error == "45 replies waited for it, with 15 too many in all"
        server._drop_clients([b"a", b"c"])
        for k in range(60):  # many thin ones, 2 each: 20 over, so 10 dropped in one pass
            for _ in range(2):
                server._emit(f"thin {k}".encode(), status)
        passes = []
        drop = server._drop_clients
        server._drop_clients = lambda clients: passes.append(len(clients)) or drop(clients)
        server._forward_replies()
        assert len(server._held) == 100 and len({f[0] for f in server._held}) == 50
        assert [n for n in passes if n] == [10]  # one pass over the replies held
    finally:
        server._router = router
        server.close()


@scripted_only
def test_the_io_thread_stops_reading_requests_after_its_time_so_replies_go_out(
    backend, monkeypatch
):
    # A review: 60 costly request headers (1.6 s each to decode) held every reply for 95 s.
    server = Server(backend, backend.info, "tcp://127.0.0.1:*")
    now = [time.monotonic()]
    monkeypatch.setattr(server_module.time, "monotonic", lambda: now[0])
    decoded = server._decoded

    def costly(frames):
        now[0] += 0.03
        return decoded(frames)

    monkeypatch.setattr(server, "_decoded", costly)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(server.address)
    try:
        for k in range(4):
            sock.send_multipart([f'{{"protocol": 1, "op": "status", "id": "s{k}"}}'.encode()])
        time.sleep(0.3)  # all four are in the server's socket

        def one_turn() -> list[str]:
            server._drain_requests()
            server._forward_replies()
            replies = []
            while sock.poll(300):
                replies.append(decode_reply(sock.recv_multipart()).id)
            return replies

        # Two requests a turn (0.06 s, past its 0.05 s), then the replies go out.
        assert [one_turn(), one_turn()] == [["s0", "s1"], ["s2", "s3"]]
    finally:
        sock.close()
        server.close()


def test_thousands_of_malformed_messages_then_a_valid_request(running, backend):
    rng = random.Random(7)
    valid = [b'{"protocol": 1, "op": "pose", "id": "x", "prompt": "hi"}']
    junk: list[list[bytes]] = []
    for n in range(3000):
        kind = n % 6
        if kind == 0:
            junk.append([rng.randbytes(rng.randrange(0, 64))])
        elif kind == 1:
            junk.append([b"{not json"])
        elif kind == 2:
            junk.append([b'{"protocol": 9, "op": "pose", "id": "a"}'])
        elif kind == 3:
            junk.append([b'{"protocol": 1, "op": "dance", "id": "a"}'])
        elif kind == 4:
            junk.append(valid + [b"not an image"])
        else:
            frame = bytearray(valid[0])
            frame[rng.randrange(len(frame))] = rng.randrange(256)
            junk.append([bytes(frame)])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(running.address)
    codes = set()
    try:
        for frames in junk:
            sock.send_multipart(frames)
        for _ in junk:
            assert sock.poll(TIMEOUT_S * 1000), "a malformed message got no reply"
            reply = decode_reply(sock.recv_multipart())
            assert isinstance(reply, ErrorReply | PoseReply)
            if isinstance(reply, ErrorReply):
                codes.add(reply.code)
    finally:
        sock.close()
    assert {
        ErrorCode.BAD_JSON,
        ErrorCode.UNSUPPORTED_PROTOCOL,
        ErrorCode.UNKNOWN_OP,
        ErrorCode.BAD_IMAGE,
    } <= codes
    with running.client() as client:
        reply = client.request(PoseRequest(client.new_id(), "after the storm"), TIMEOUT_S)
    assert_answers(backend, "after the storm", reply.poses)


def test_unreachable_service_is_reported_quickly_and_clearly():
    with Client("tcp://127.0.0.1:9") as client:  # nothing listens on the discard port
        started = time.monotonic()
        with pytest.raises(ProtocolError) as info:
            client.request(StatusRequest(client.new_id()), timeout_s=0.5)
    assert info.value.code == ErrorCode.UNREACHABLE
    assert "is chatpose-serve running?" in str(info.value)
    assert time.monotonic() - started < 5


@scripted_only
def test_an_address_in_use_is_a_config_error_not_a_crash(running, backend):
    with pytest.raises(ServerConfigError, match="already in use") as refused:
        Server(backend, backend.info, running.address)
    assert f"(`chatpose status --address {running.address}` tells)" in str(refused.value)
    # Another port on the same host: an admin serving the network was sent to loopback.
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(
            ServerConfigError, match=r"another port with --bind tcp://0\.0\.0\.0:PORT"
        ) as refused:
            check_address_free(f"tcp://0.0.0.0:{port}")  # as chatpose-serve checks first
        # Where a client here asks it: a wildcard host is no address to connect to.
        assert f"--address tcp://127.0.0.1:{port}`" in str(refused.value)
    finally:
        taken.close()


@scripted_only
def test_a_live_ipc_address_is_in_use_and_a_stale_socket_file_is_not(backend, tmp_path):
    address = f"ipc://{tmp_path / 'chatpose.ipc'}"
    served = Running(backend, address)
    try:
        with pytest.raises(ServerConfigError, match="already in use"):
            check_address_free(address)
        with pytest.raises(ServerConfigError, match="already in use.*another path with --bind ipc"):
            Server(backend, backend.info, address)
        with served.client() as client:  # the first server still owns its address
            assert isinstance(
                client.request(StatusRequest(client.new_id()), TIMEOUT_S), StatusReply
            )
    finally:
        served.stop()
    stale = tmp_path / "stale.ipc"
    with socket.socket(socket.AF_UNIX) as left_behind:  # a socket file nobody listens on
        left_behind.bind(str(stale))
    check_address_free(f"ipc://{stale}")


@scripted_only
def test_an_ipc_path_that_names_a_file_is_refused_and_the_file_kept(backend, tmp_path):
    shot = tmp_path / "shot12.blend"  # a mistyped Service Address: ZeroMQ would delete it
    shot.write_bytes(b"the user's work")
    for start in (check_address_free, lambda bind: Server(backend, backend.info, bind)):
        with pytest.raises(ServerConfigError, match="is there and is not a socket"):
            start(f"ipc://{shot}")
    assert shot.read_bytes() == b"the user's work"


@scripted_only
def test_a_non_loopback_bind_needs_curve_keys(backend):
    with pytest.raises(ServerConfigError, match="not a loopback address"):
        Server(backend, backend.info, "tcp://0.0.0.0:*")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@scripted_only
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_loopback_address_serves(backend):
    """ZeroMQ takes an IPv6 address only with the socket's ipv6 option on, on both sides."""
    served = Running(backend, "tcp://[::1]:*")
    try:
        assert served.address.startswith("tcp://[::1]:")
        with served.client() as client:
            reply = client.request(StatusRequest(client.new_id()), TIMEOUT_S)
            assert isinstance(reply, StatusReply)
    finally:
        served.stop()


@scripted_only
def test_curve_lets_in_only_authorised_clients(backend, tmp_path):
    make_keys(tmp_path, ["animator"])
    curve = CurveKeys(tmp_path / "server.key_secret", tmp_path / "authorized_clients")
    served = Running(backend, curve=curve)
    try:
        keys = ClientCurveKeys(tmp_path / "animator.key_secret", tmp_path / "server.key")
        with served.client(curve=keys) as client:
            assert isinstance(
                client.request(StatusRequest(client.new_id()), TIMEOUT_S), StatusReply
            )
            # A reconnect (after a lost connection) needs the key files no more.
            (tmp_path / "animator.key_secret").rename(tmp_path / "moved")
            client.reset()
            assert isinstance(
                client.request(StatusRequest(client.new_id()), TIMEOUT_S), StatusReply
            )
            (tmp_path / "moved").rename(tmp_path / "animator.key_secret")
        make_keys(tmp_path / "stranger", ["stranger"])
        stranger = ClientCurveKeys(
            tmp_path / "stranger" / "stranger.key_secret", tmp_path / "server.key"
        )
        # Refused at the handshake, each saying why, not "no service".
        wrong_server = ClientCurveKeys(
            tmp_path / "animator.key_secret", tmp_path / "authorized_clients" / "animator.key"
        )
        for keys, why in [
            (stranger, "its public half is not among the service's authorized clients"),
            (wrong_server, "the server key given is not this service's"),
            # Which side notices first that the keys are on one side only is a race: either
            # way the message says so.
            (None, ("one side has CURVE keys and the other", "has CURVE keys and this client has")),
        ]:
            with served.client(curve=keys) as client, pytest.raises(ProtocolError) as info:
                client.request(StatusRequest(client.new_id()), timeout_s=1.0)
            assert info.value.code == ErrorCode.UNREACHABLE
            assert f"{served.address} refused the connection: " in str(info.value)
            whys = (why,) if isinstance(why, str) else why
            assert any(text in str(info.value) for text in whys), str(info.value)
    finally:
        served.stop()


def test_clients_added_or_revoked_while_the_service_runs_count_from_their_next_connection(
    backend, tmp_path, caplog
):
    caplog.set_level("INFO", logger="inference_service.server")
    make_keys(tmp_path, ["animator"])
    curve = CurveKeys(tmp_path / "server.key_secret", tmp_path / "authorized_clients")
    served = Running(backend, curve=curve)

    def status(name: str) -> object:
        keys = ClientCurveKeys(tmp_path / f"{name}.key_secret", tmp_path / "server.key")
        with served.client(curve=keys) as client:
            try:
                return client.request(StatusRequest(client.new_id()), timeout_s=2.0)
            except ProtocolError as exc:
                return exc

    clients = tmp_path / "authorized_clients"
    try:
        assert isinstance(status("animator"), StatusReply)
        # The TD's log says, as it starts, that clients need keys, and which folder lets them in.
        (start,) = [r for r in caplog.records if getattr(r, "event", None) == "start"]
        assert start.curve is True and start.authorized_clients == str(clients)
        make_keys(tmp_path, ["lighter"])  # no restart: the new one is let in
        assert isinstance(status("lighter"), StatusReply)
        # A key being copied in (pyzmq's reader raises IndexError on it) ends nothing: the
        # authenticator lives on, the others' keys hold, and a revoked one goes all the same.
        (clients / "grader.key").write_text(
            "#   ZeroMQ CURVE Public Certificate\ncurve\n    public-key"
        )
        (clients / ".#lighter.key").symlink_to(tmp_path / "nowhere")  # an editor's lock link
        assert isinstance(status("lighter"), StatusReply)
        (clients / "animator.key").unlink()  # revoked
        refused = status("animator")
        assert isinstance(refused, ProtocolError)
        assert "not among the service's authorized clients" in str(refused)
        assert isinstance(status("lighter"), StatusReply)
        assert "grader.key is not a readable CURVE key" in caplog.text
        # The TD's log says so, one line for knocks that come together (anyone may knock).
        assert "refused 1 client handshake(s) with a key not among the" in caplog.text
        status("animator")
        assert caplog.text.count("client handshake(s) with a key") == 1
    finally:
        served.stop()
    # Counted within the 10 s, that knock is said as the service stops.
    assert caplog.text.count("client handshake(s) with a key") == 2


def test_refusals_after_a_logged_one_are_logged_once_their_time_is_up(tmp_path, caplog):
    # A knock within 10 s of a logged one was counted, and never said unless another came
    # more than 10 s later.
    now = [0.0]
    clients = AuthorizedClients(tmp_path, clock=lambda: now[0])
    clients.callback("*", b"A" * 40)
    clients.callback("*", b"B" * 40)  # within the 10 s: counted
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(said) == 1 and said[0].startswith("refused 1 client handshake(s)")
    now[0] = 9.0
    clients.log_refusals()  # as the I/O thread asks, every turn
    assert sum(r.getMessage().startswith("refused") for r in caplog.records) == 1
    now[0] = 10.5
    clients.log_refusals()
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")][-1]
    assert last.startswith("refused 1 client handshake(s)") and "(the last: BBBBBBBB...)" in last
    clients.log_refusals()  # nothing new: nothing said
    assert sum(r.getMessage().startswith("refused") for r in caplog.records) == 2
    clients.callback("*", b"C" * 40)  # within the 10 s again, and the service stops
    clients.log_refusals(final=True)
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")][-1]
    assert last.startswith("refused 1 client handshake(s)") and "(the last: CCCCCCCC...)" in last


class SlowScripted(ScriptedBackend):
    """A millisecond an item, as a model takes some time: on an idle machine the scripted
    model answered all 256 items before a cancel could arrive, and nothing was tested."""

    def answer_poses(self, items):
        time.sleep(0.001 * len(items))
        return super().answer_poses(items)


def test_no_batch_item_comes_after_the_batch_is_cancelled():
    """The worker's replies and the I/O thread's leave in the order they were made: a batch's
    items never follow its `cancelled` error. (With one outbox per thread, 27 of 150 such
    cancels had an item after the error.)"""
    served = Running(SlowScripted(), max_batch=1, max_wait_ms=0)
    stopped = 0
    try:
        for _ in range(60):
            with served.client() as client:
                batch = BatchRequest(client.new_id(), [f"item {i}" for i in range(256)])
                client.send(batch)
                _collect(client, until=lambda r: isinstance(r, BatchItemReply) and r.index >= 2)
                client.send(CancelRequest(client.new_id(), target=batch.id))
                replies = _collect(client, until=lambda r: isinstance(r, CancelReply))
                replies += _collect(client, until=None, quiet_s=0.05)
            ends = [
                i for i, r in enumerate(replies) if isinstance(r, ErrorReply) and r.index is None
            ]
            if not ends:
                continue  # the batch had finished before the cancel came
            stopped += 1
            assert replies[ends[0]].code == ErrorCode.CANCELLED
            assert not [r for r in replies[ends[0] + 1 :] if isinstance(r, BatchItemReply)]
    finally:
        served.stop()
    assert stopped >= 20  # enough cancels came mid-batch for the order to be tested


@scripted_only
def test_an_error_too_long_for_the_protocol_still_gets_its_reply(running, backend):
    """The model's exception text, 70,000 characters with a lone surrogate (a file name that
    is not UTF-8), past what a message may hold: the reply goes out escaped and cut, as one
    reply per request (and per batch item) requires."""
    with running.client() as client:
        reply = client.request(PoseRequest(client.new_id(), "rant"), TIMEOUT_S)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.MODEL_ERROR
        assert "the model ranted about /models/\\udcff: on and on" in reply.message
        assert reply.message.endswith("[...]")
        batch = BatchRequest(client.new_id(), ["one", "rant", "two"])
        client.send(batch)
        replies = _collect(client, until=lambda r: isinstance(r, BatchDoneReply))
    assert sorted(r.index for r in replies[:-1]) == [0, 1, 2]
    assert replies[-1] == BatchDoneReply(batch.id, total=3, completed=2)
    with running.client() as client:  # and the service goes on
        assert isinstance(client.request(PoseRequest(client.new_id(), "one"), TIMEOUT_S), PoseReply)


def _collect(client: Client, until, quiet_s: float = TIMEOUT_S) -> list:
    """Replies until one satisfies `until` (or, with until=None, until `quiet_s` of silence)."""
    replies = []
    while True:
        reply = client.poll(quiet_s * 1000 if until is None else TIMEOUT_S * 1000)
        if reply is None:
            assert until is None, f"no reply came; so far {replies!r}"
            return replies
        replies.append(reply)
        if until is not None and until(reply):
            return replies


@scripted_only
def test_requests_are_logged_as_structured_events(running, caplog):
    caplog.set_level(logging.INFO)
    with running.client() as client:
        client.request(PoseRequest(client.new_id(), "logged"), TIMEOUT_S)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(running.address)
    raw.send(b'{"protocol": 1, "op": "pose", "id": "blank", "prompt": " "}')
    assert raw.poll(TIMEOUT_S * 1000)
    assert decode_reply(raw.recv_multipart()).code == ErrorCode.EMPTY_PROMPT
    raw.close()

    def done():  # logged by the worker once the reply is on its way: maybe after it came
        return [r for r in caplog.records if getattr(r, "event", None) == "request"]

    wait_until(lambda: done())
    assert [(r.op, r.ok) for r in done()] == [("pose", True)]
    [bad] = [r for r in caplog.records if getattr(r, "event", None) == "bad_request"]
    assert bad.code == "empty_prompt" and bad.detail


@scripted_only
def test_a_connection_that_never_says_who_it_is_is_closed(backend, monkeypatch):
    # Held open by the thousand, silent connections left authorised clients no descriptors.
    import socket

    monkeypatch.setattr(server_module, "HANDSHAKE_TIMEOUT_MS", 300)
    served = Running(backend)
    try:
        port = int(served.address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as silent:
            started = time.monotonic()
            while silent.recv(4096):  # ZeroMQ's greeting, then the close
                pass
            assert time.monotonic() - started < 5.0
        with served.client() as client:  # clients that greet are served as ever
            assert isinstance(
                client.request(StatusRequest(client.new_id()), TIMEOUT_S), StatusReply
            )
    finally:
        served.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="no open-file limit to raise on Windows")
def test_the_service_raises_its_open_file_limit_to_what_the_system_allows():
    # Run apart: it changes the process's limit. Started at a desktop's 256.
    script = textwrap.dedent(
        """
        import resource
        from inference_service.serve import raise_open_file_limit
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raise_open_file_limit()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(soft, hard)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    soft, hard = (int(n) for n in result.stdout.split())
    if sys.platform == "darwin":  # its kernel's cap lies below the hard limit
        assert soft > 256
    else:
        assert soft == (65_536 if hard == -1 else min(hard, 65_536))


def test_on_macos_the_open_file_limit_is_raised_to_what_its_kernel_takes(monkeypatch):
    # macOS: hard limit "unlimited", anything past kern.maxfilesperproc (10,240) refused.
    from inference_service import serve

    limits = {"soft": 256}
    fake = types.SimpleNamespace(
        RLIMIT_NOFILE=8,
        RLIM_INFINITY=-1,
        getrlimit=lambda which: (limits["soft"], -1),
    )

    def setrlimit(which, values):
        if values[0] > 10_240:
            raise ValueError("current limit exceeds maximum limit")
        limits["soft"] = values[0]

    fake.setrlimit = setrlimit
    monkeypatch.setitem(sys.modules, "resource", fake)
    serve.raise_open_file_limit()
    assert limits["soft"] == 10_240


def test_malformed_requests_are_logged_twenty_a_window_and_the_rest_counted(caplog):
    # One client sending them as fast as it was answered wrote 4 MB of log a second.
    now = [0.0]
    bad = server_module._BadRequestLog(clock=lambda: now[0])
    error = ProtocolError(ErrorCode.BAD_JSON, "header is not JSON", field="header")
    caplog.set_level(logging.INFO, logger=server_module.log.name)
    for _ in range(server_module.BAD_REQUESTS_LOGGED + 5):
        bad.refused(error)
    lines = [r for r in caplog.records if r.name == server_module.log.name]
    assert [r.getMessage() for r in lines] == ["bad request"] * server_module.BAD_REQUESTS_LOGGED
    assert lines[0].detail == "header is not JSON" and lines[0].code == "bad_json"
    caplog.clear()
    now[0] += server_module.BAD_REQUEST_WINDOW_S / 2
    bad.flush()  # the window is not over
    assert not caplog.records
    now[0] += server_module.BAD_REQUEST_WINDOW_S / 2
    bad.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "5 more bad request(s) in 10 s, not logged one by one"
    ]
    assert caplog.records[0].count == 5
    caplog.clear()
    bad.refused(error)  # a new window: logged again
    assert [r.getMessage() for r in caplog.records] == ["bad request"]
    for _ in range(server_module.BAD_REQUESTS_LOGGED):
        bad.refused(error)
    caplog.clear()
    bad.flush(final=True)  # the service stops: what was not said yet is said now
    assert [r.getMessage() for r in caplog.records] == [
        "1 more bad request(s) in 10 s, not logged one by one"
    ]


@scripted_only
def test_a_client_that_names_itself_is_answered_again_when_it_comes_back(backend):
    # ZeroMQ names each connection anew, unless the client sets its own routing id: after one
    # reply to it was lost, it was never answered again under that name.
    served = Running(backend, max_wait_ms=0)
    context = zmq.Context.instance()

    def named() -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTING_ID, b"blender-ws-7")
        sock.connect(served.address)
        return sock

    try:
        backend.hold()
        first = named()
        first.send_multipart(encode_request(PoseRequest("1", "wave")))
        assert backend.entered.wait(TIMEOUT_S)
        first.close()  # gone while the model runs: its reply cannot be sent
        time.sleep(0.3)
        backend.release()
        deadline = time.monotonic() + TIMEOUT_S
        while b"blender-ws-7" not in served.server._gone and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"blender-ws-7" in served.server._gone
        again = named()
        again.send_multipart(encode_request(StatusRequest("2")))
        assert again.poll(int(TIMEOUT_S * 1000)), "no reply to the client back under its name"
        assert decode_reply(again.recv_multipart()).id == "2"
        again.close()
    finally:
        served.stop()
