"""The add-on's Session (no bpy): non-blocking requests, and every way the service can fail."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time

import pytest
import zmq

from blender_addon.core.session import (
    CANCEL_GRACE_S,
    MAX_REPLIES_PER_TICK,
    BatchFinished,
    BatchItem,
    PoseResult,
    RequestFailed,
    Session,
    StatusResult,
)
from inference_service.server import Server
from shared_protocol import client as client_module
from shared_protocol.protocol import (
    BatchDoneReply,
    BatchItemReply,
    CancelRequest,
    ErrorCode,
    PoseReply,
    ProtocolError,
    decode_request,
    encode_reply,
)
from tests.service.scripted_backend import (
    TIMEOUT_S,
    ScriptedBackend,
    pose_for,
    start_scripted_server,
)
from tests.service.test_backend import free_port


@pytest.fixture(autouse=True)
def sessions_left_open(monkeypatch):
    """Ends the sessions a failed test left open: each has a ZeroMQ context of its own, and
    one collected later, in another test, waited in term() for ever and hung the run."""
    made, closed = [], []
    init, close = Session.__init__, Session.close

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    def closing(self):
        closed.append(self)
        close(self)

    monkeypatch.setattr(Session, "__init__", recorded)
    monkeypatch.setattr(Session, "close", closing)
    yield
    for session in made:
        if not any(session is done for done in closed):
            session._context.destroy(linger=0)


def run_until(session: Session, done, timeout_s: float = TIMEOUT_S) -> list:
    """Ticks like Blender's timer would; each tick must return at once: it only ever polls
    the socket with a zero timeout (checked on the client it uses)."""
    events: list = []
    deadline = time.monotonic() + timeout_s
    while not done(events):
        client = session._client  # replaced after a lost connection
        polls: list = []
        real_poll = client.poll
        client.poll = lambda timeout_ms, _real=real_poll, _polls=polls: (
            _polls.append(timeout_ms) or _real(timeout_ms)
        )
        try:
            events.extend(session.tick())
        finally:
            client.poll = real_poll
        assert polls and set(polls) == {0}, f"tick() waited on the socket: {polls}"
        assert time.monotonic() < deadline, f"gave up waiting; events so far: {events}"
        time.sleep(0.01)
    return events


def final_for(request_id: str):
    def done(events) -> bool:
        return any(
            e.request_id == request_id
            and not isinstance(e, BatchItem)
            and not (isinstance(e, RequestFailed) and not e.final)
            for e in events
        )

    return done


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def address(backend):
    server = Server(backend, backend.info, "tcp://127.0.0.1:*", max_batch=4, max_wait_ms=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.address
    backend.release()
    server.stop()
    thread.join(TIMEOUT_S)


def test_pose_status_and_batch(address):
    session = Session(address, timeout_s=TIMEOUT_S)
    pose_id = session.request_pose("wave")
    status_id = session.request_status()
    events = run_until(session, lambda es: final_for(pose_id)(es) and final_for(status_id)(es))
    [result] = [e for e in events if isinstance(e, PoseResult)]
    assert result.reply.poses == (pose_for("wave"),)
    assert [e.status.model for e in events if isinstance(e, StatusResult)] == ["scripted"]

    batch_id = session.request_batch(["a", "bb", "ccc"])
    events = run_until(session, final_for(batch_id))
    assert sorted(e.index for e in events if isinstance(e, BatchItem)) == [0, 1, 2]
    assert events[-1] == BatchFinished(batch_id)
    assert not session.busy
    session.close()


def test_a_burst_of_answers_is_read_over_several_ticks(address):
    # Come while Blender was busy: decoding 256 at once held one timer call past 0.1 s.
    session = Session(address, timeout_s=TIMEOUT_S)
    batch_id = session.request_batch([f"line {k}" for k in range(100)])
    time.sleep(2)  # every answer waits in the socket by now
    first = session.tick()
    assert len(first) == MAX_REPLIES_PER_TICK < 100
    events = first + run_until(session, final_for(batch_id))
    assert sorted(e.index for e in events if isinstance(e, BatchItem)) == list(range(100))
    session.close()


def test_closing_a_session_asks_the_service_to_stop_what_is_in_flight():
    # The add-on disabled with a chat turn in flight: the service computed it for no one,
    # holding up every other animator's request behind it.
    router = zmq.Context.instance().socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        session = Session(f"tcp://127.0.0.1:{port}", timeout_s=TIMEOUT_S)
        asked = session.request_pose("how would a tired person stand?", mode="chat")
        assert router.poll(5_000)
        assert decode_request(router.recv_multipart()[1:]).id == asked
        session.close()
        assert router.poll(5_000), "no cancel came"
        cancel = decode_request(router.recv_multipart()[1:])
        assert isinstance(cancel, CancelRequest) and cancel.target == asked
    finally:
        router.close(linger=0)


def test_a_session_s_sockets_live_apart_from_pyzmq_s_shared_context():
    # The long-session review: an idle add-on's socket, retrying an address with no service,
    # filled its monitor in some minutes and blocked the shared context's I/O thread: a script
    # in the same Blender, on zmq.Context.instance(), could connect nowhere.
    session = Session("tcp://127.0.0.1:9", timeout_s=TIMEOUT_S)  # nothing listens there
    shared = zmq.Context.instance()
    assert session._client._context is not shared
    session.close()
    deadline = time.monotonic() + TIMEOUT_S
    while not session._context.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session._context.closed and not shared.closed  # ended, in a thread of its own


def test_answers_that_came_before_the_service_went_away_are_all_read():
    # Read 64 a tick, the rest were dropped with the socket when the tick found the service
    # gone: the batch failed as "went away", its answers in hand.
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 1000
    port = router.bind_to_random_port("tcp://127.0.0.1")
    session = Session(f"tcp://127.0.0.1:{port}", timeout_s=TIMEOUT_S)
    batch_id = session.request_batch([f"line {k}" for k in range(200)])
    while not router.poll(10):
        session.tick()
    peer, *frames = router.recv_multipart()
    answers = [BatchItemReply(batch_id, k, 200, "", (pose_for("wave"),)) for k in range(200)]
    for reply in (*answers, BatchDoneReply(batch_id, 200, 200)):
        router.send_multipart([peer, *encode_reply(reply)])
    time.sleep(1)  # Blender busy: every answer waits in the socket
    router.close()  # then the service stops
    time.sleep(1)
    events = run_until(session, final_for(batch_id))
    assert len([e for e in events if isinstance(e, BatchItem)]) == 200
    assert events[-1] == BatchFinished(batch_id)
    session.close()


def test_bad_input_is_refused_before_anything_is_sent(address):
    session = Session(address, timeout_s=TIMEOUT_S)
    with pytest.raises(ProtocolError) as info:
        session.request_pose("   ")
    assert info.value.code == ErrorCode.EMPTY_PROMPT
    assert not session.busy
    session.close()


def test_requests_held_for_a_starting_service_go_once_it_is_ready(backend):
    # Send right after Start Local Service failed 3 s later, "no service at", before the
    # service listened (then "busy" while its model loaded).
    now = [0.0]
    address = f"tcp://127.0.0.1:{free_port()}"
    session = Session(address, timeout_s=2.0, connect_timeout_s=0.3, clock=lambda: now[0])
    session.hold()
    pose_id = session.request_pose("wave")
    batch_id = session.request_batch(["walk", "run"])
    with pytest.raises(ProtocolError) as info:  # its own input is checked now all the same
        session.request_pose("   ")
    assert info.value.code == ErrorCode.EMPTY_PROMPT
    time.sleep(0.6)  # past the connect timeout, and then the request timeout, with no service
    now[0] = 10.0
    assert session.tick() == [] and session.busy
    server = Server(backend, backend.info, address, max_batch=4, max_wait_ms=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        session.release()
        events = run_until(session, lambda es: final_for(pose_id)(es) and final_for(batch_id)(es))
        assert [e.reply.poses for e in events if isinstance(e, PoseResult)] == [(pose_for("wave"),)]
        assert sorted(e.index for e in events if isinstance(e, BatchItem)) == [0, 1]
        assert not session.busy
    finally:
        session.close()
        server.stop()
        thread.join(TIMEOUT_S)


def test_held_requests_are_sent_nowhere_until_released_and_their_timeout_starts_then():
    router = zmq.Context.instance().socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    now = [0.0]
    session = Session(f"tcp://127.0.0.1:{port}", timeout_s=2.0, clock=lambda: now[0])
    try:
        session.hold()
        held = session.request_pose("wave")
        status = session.request_status()  # not held: it asks whether the service is ready
        assert router.poll(5_000)
        assert decode_request(router.recv_multipart()[1:]).id == status
        assert not router.poll(300)
        now[0] = 100.0  # waiting costs a held request none of its time
        session.release()
        assert router.poll(5_000)
        assert decode_request(router.recv_multipart()[1:]).id == held
        now[0] = 101.9
        assert not [e for e in session.tick() if e.request_id == held]
        now[0] = 102.1
        [failure] = [e for e in run_until(session, final_for(held)) if e.request_id == held]
        assert failure.code == ErrorCode.TIMEOUT
    finally:
        session.close()
        router.close(linger=0)


def test_held_requests_cancelled_or_failed_end_on_the_next_tick_unsent():
    router = zmq.Context.instance().socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    session = Session(f"tcp://127.0.0.1:{port}", timeout_s=30)
    try:
        session.hold()
        cancelled = session.request_pose("wave")
        failing = session.request_batch(["walk", "run"])
        session.cancel(cancelled)
        assert session.tick() == [RequestFailed(cancelled, ErrorCode.CANCELLED, "cancelled")]
        session.fail_held(ErrorCode.UNREACHABLE, "the service it waited for did not start")
        assert not session.holding and session.busy  # its end is still to be told
        assert session.tick() == [
            RequestFailed(failing, ErrorCode.UNREACHABLE, "the service it waited for did not start")
        ]
        assert not session.busy
        session.release()  # nothing held any more: nothing goes
        assert not router.poll(300), "a cancelled or failed request was sent"
    finally:
        session.close()
        router.close(linger=0)


def test_no_service_with_curve_keys_does_not_suggest_the_local_service(tmp_path):
    # Start Local Service refuses to start with CURVE keys set: the review found it suggested.
    from inference_service.keys import make_keys
    from shared_protocol.client import ClientCurveKeys

    make_keys(tmp_path, ["animator"])
    keys = ClientCurveKeys(tmp_path / "animator.key_secret", tmp_path / "server.key").loaded()
    address = f"tcp://127.0.0.1:{free_port()}"
    session = Session(address, timeout_s=30, connect_timeout_s=0.3, curve=keys)
    request_id = session.request_pose("wave")
    [failure] = run_until(session, final_for(request_id), timeout_s=10)
    assert "is the service running there?" in failure.message
    assert "Start Local Service" not in failure.message
    session.close()


def test_no_service_fails_clearly_without_blocking():
    session = Session(f"tcp://127.0.0.1:{free_port()}", timeout_s=30, connect_timeout_s=0.3)
    request_id = session.request_pose("wave")
    [failure] = run_until(session, final_for(request_id), timeout_s=10)  # not its 30 s timeout
    assert failure.code == ErrorCode.UNREACHABLE
    assert "is the service running? Start Local Service (the Service panel)" in failure.message
    session.close()


def test_no_service_at_a_host_name_asks_whether_the_name_resolves():
    # A review: the add-on's message lacked the command line's question, its own copy of it.
    session = Session("tcp://no-such-host.invalid:6399", timeout_s=30, connect_timeout_s=0.3)
    request_id = session.request_pose("wave")
    [failure] = run_until(session, final_for(request_id), timeout_s=10)
    assert failure.message == (
        # Not Start Local Service, which takes only an address on this machine.
        "no service at tcp://no-such-host.invalid:6399 (no connection within 0.3 s); is the "
        "service running there? Is 'no-such-host.invalid' a name this machine resolves and can "
        "reach? (the address is set in the add-on's preferences)"
    )
    session.close()


def test_a_service_that_stopped_while_idle_is_not_called_gone_during_the_request(backend):
    # Blender's timer stops when nothing is in flight: the session last saw the service
    # connected. The next request used to fail at its first tick, "went away during the
    # request", before it could reach a service starting again.
    server = Server(backend, backend.info, "tcp://127.0.0.1:*", max_wait_ms=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    session = Session(server.address, timeout_s=TIMEOUT_S, connect_timeout_s=0.5)
    try:
        first = session.request_pose("wave")
        run_until(session, final_for(first))
        session.tick()  # the last tick before the timer stops
        server.stop()
        thread.join(TIMEOUT_S)
        time.sleep(0.3)  # the disconnect reaches the client
        request_id = session.request_pose("wave again")
        [failure] = run_until(session, final_for(request_id), timeout_s=10)
        assert failure.code == ErrorCode.UNREACHABLE
        assert "is the service running? Start Local Service" in failure.message, failure.message
    finally:
        session.close()


def test_a_stuck_service_times_out_and_the_next_request_still_works(address, backend):
    session = Session(address, timeout_s=0.3)
    backend.hold()
    request_id = session.request_pose("slow")
    [failure] = run_until(session, final_for(request_id))
    assert failure.code == ErrorCode.TIMEOUT and "within 0.3 s" in failure.message
    backend.release()
    session.timeout_s = TIMEOUT_S
    again = session.request_pose("quick")
    events = run_until(session, final_for(again))
    assert [e.reply.poses for e in events if isinstance(e, PoseResult)] == [(pose_for("quick"),)]
    session.close()


def test_a_request_waits_the_timeout_it_was_sent_with(address, backend):
    # The setting raised while it runs: the request still gives up at its own 2 s, and says so.
    now = [0.0]
    backend.hold()
    session = Session(address, timeout_s=2.0, clock=lambda: now[0])
    request_id = session.request_pose("held")
    try:
        assert backend.entered.wait(TIMEOUT_S)  # running: the service will not time it out
        session.timeout_s = 600
        now[0] = 1.9
        assert not [e for e in session.tick() if e.request_id == request_id]
        now[0] = 2.1
        [failure] = run_until(session, final_for(request_id))
        assert failure.code == ErrorCode.TIMEOUT
        assert f"no answer from {address} within 2 s" in failure.message
    finally:
        backend.release()
        session.close()


def test_each_answer_gives_a_batch_again_the_wait_it_was_sent_with():
    # Each item that comes resets the batch's deadline: to its own 2 s, not to the setting
    # raised (or lowered) since, which the next request goes with.
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    now = [0.0]
    session = Session(f"tcp://127.0.0.1:{port}", timeout_s=2.0, clock=lambda: now[0])
    try:
        batch_id = session.request_batch(["wave", "bow"])
        assert router.poll(TIMEOUT_S * 1000)
        peer, *_ = router.recv_multipart()
        session.timeout_s = 600
        now[0] = 1.5
        item = BatchItemReply(batch_id, 0, 2, "", (pose_for("wave"),))
        router.send_multipart([peer, *encode_reply(item)])
        events = run_until(session, lambda events: events)
        assert [type(e) for e in events] == [BatchItem]
        now[0] = 3.4  # 1.9 s after the item
        assert session.tick() == []
        now[0] = 3.6
        [failure] = session.tick()
        assert (failure.request_id, failure.code) == (batch_id, ErrorCode.TIMEOUT)
        assert failure.message.startswith(f"no answer from tcp://127.0.0.1:{port} within 2 s")
    finally:
        session.close()
        router.close()


def test_a_request_held_up_by_other_work_says_so_when_its_time_is_up(address, backend):
    # It sent its whole timeout as timeout_ms, so its own timer always ended first: "no
    # answer within 1 s", never that another animator's work held the model.
    other = Session(address, timeout_s=TIMEOUT_S)
    backend.hold()
    other.request_pose("running")
    assert backend.entered.wait(TIMEOUT_S)
    # The session's own 1 s never ends (its clock stands still): only the service's answer at
    # 0.9 s can end it, however late a loaded machine delivers that.
    session = Session(address, timeout_s=1.0, clock=lambda: 0.0)
    request_id = session.request_pose("queued")
    session.timeout_s = 600  # the setting raised meanwhile: not what this request waited
    [failure] = run_until(session, final_for(request_id))
    assert failure.code == ErrorCode.TIMEOUT
    # Said in the timeout the user set, not the request's own 0.9 s (a tenth less).
    assert failure.message.startswith("not started within 1 s: the service was busy")
    backend.release()
    session.close()
    other.close()


def test_a_cancel_that_cannot_be_queued_still_fails_its_request_in_time(
    address, backend, monkeypatch
):
    session = Session(address, timeout_s=0.3)
    backend.hold()
    request_id = session.request_pose("slow")
    send = session._client.send

    def full_for_cancels(request):  # ZeroMQ's queue full: the client refuses to queue more
        if isinstance(request, CancelRequest):
            raise ProtocolError(ErrorCode.BUSY, "the service is not taking requests")
        send(request)

    monkeypatch.setattr(session._client, "send", full_for_cancels)
    [failure] = run_until(session, final_for(request_id))  # no exception out of tick()
    assert failure.code == ErrorCode.TIMEOUT
    backend.release()
    session.close()


def test_an_answer_that_comes_after_cancel_is_a_cancelled_request_not_a_pose():
    # The service had answered before the cancel reached it: the pose was applied all the
    # same, and the chat turn stored, although the user had pressed Cancel.
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    session = Session(f"tcp://127.0.0.1:{port}", timeout_s=TIMEOUT_S)
    try:
        request_id = session.request_pose("wave")
        assert router.poll(TIMEOUT_S * 1000)
        peer, *frames = router.recv_multipart()
        session.cancel(request_id)  # pressed now; the answer is already on its way
        answer = PoseReply(request_id, "Sure, <POSE>.", (pose_for("wave"),))
        router.send_multipart([peer, *encode_reply(answer)])
        [failure] = run_until(session, final_for(request_id))
        assert isinstance(failure, RequestFailed) and failure.code == ErrorCode.CANCELLED
        assert "the answer had come; it is not applied" in failure.message
        assert not session.busy
    finally:
        session.close()
        router.close()


def test_a_cancel_a_hung_service_never_confirms_ends_the_request_after_a_grace_time():
    router = zmq.Context.instance().socket(zmq.ROUTER)  # takes requests, answers nothing
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    now = [0.0]
    session = Session(f"tcp://127.0.0.1:{port}", timeout_s=600, clock=lambda: now[0])
    try:
        request_id = session.request_pose("wave")
        assert router.poll(TIMEOUT_S * 1000)  # it went out, on a connection
        session.cancel(request_id)
        now[0] += CANCEL_GRACE_S - 0.1
        assert session.tick() == []  # the service may still confirm
        now[0] += 0.2
        [failure] = session.tick()
        assert (failure.request_id, failure.code) == (request_id, ErrorCode.CANCELLED)
        assert "the service did not confirm within" in failure.message
        assert not session.busy  # not its 600 s timeout
    finally:
        session.close()
        router.close()


def test_cancel_a_batch(address, backend):
    session = Session(address, timeout_s=TIMEOUT_S)
    backend.hold()
    batch_id = session.request_batch([f"p{i}" for i in range(20)])
    assert backend.entered.wait(TIMEOUT_S)
    session.cancel(batch_id)
    events = run_until(session, final_for(batch_id))
    backend.release()
    assert isinstance(events[-1], RequestFailed) and events[-1].code == ErrorCode.CANCELLED
    session.close()


def test_an_undecodable_batch_item_fails_the_batch_and_stops_it_on_the_service():
    """A service or protocol bug: an item that does not decode. The batch fails with a "bad
    reply" message, and the service is told to stop the batch rather than go on computing
    lines that nobody will read."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    session = Session(f"tcp://127.0.0.1:{port}", timeout_s=TIMEOUT_S)

    def receive() -> tuple[bytes, object]:
        deadline = time.monotonic() + TIMEOUT_S
        while not router.poll(10):
            assert session.tick() == []
            assert time.monotonic() < deadline, "the session sent nothing"
        peer, *frames = router.recv_multipart()
        return peer, decode_request(frames)

    try:
        batch_id = session.request_batch(["wave", "bow", "sit"])
        peer, request = receive()
        item = BatchItemReply(batch_id, 0, 3, "", (pose_for("wave"),))
        header = json.loads(encode_reply(item)[0]) | {"text": 5}  # text must be a string
        router.send_multipart([peer, json.dumps(header).encode()])
        [failure] = run_until(session, final_for(batch_id))
        assert failure.final and failure.code == ErrorCode.BAD_SCHEMA
        assert failure.message == "bad reply: bad_schema: text: must be a string, got 5"
        _, cancel = receive()
        assert isinstance(cancel, CancelRequest) and cancel.target == batch_id
        assert not session.busy
    finally:
        session.close()
        router.close()


def test_the_service_killed_mid_batch_then_restarted():
    address = f"tcp://127.0.0.1:{free_port()}"
    process = start_scripted_server(address, "--stall-after", "5")
    session = Session(address, timeout_s=TIMEOUT_S)
    try:
        batch_id = session.request_batch([f"line {i}" for i in range(12)])
        events = run_until(session, lambda es: sum(isinstance(e, BatchItem) for e in es) == 5)
        process.send_signal(signal.SIGKILL)
        process.wait(TIMEOUT_S)
        events += run_until(session, final_for(batch_id))
        failure = events[-1]
        assert isinstance(failure, RequestFailed) and failure.code == ErrorCode.UNREACHABLE
        assert "went away" in failure.message
        kept = sorted(e.index for e in events if isinstance(e, BatchItem))
        assert kept == [0, 1, 2, 3, 4]

        process = start_scripted_server(address)  # the same address, no Blender restart
        rest = session.request_batch([f"line {i}" for i in range(5, 12)])
        events = run_until(session, final_for(rest))
        assert events[-1] == BatchFinished(rest)
    finally:
        process.kill()
        session.close()


def test_a_service_restarted_between_two_ticks_fails_its_requests_at_once():
    # Blender's main thread was busy while the service died and came back: the session sees
    # it connected, before and after, but the request it sent is lost with the old service.
    address = f"tcp://127.0.0.1:{free_port()}"
    process = start_scripted_server(address, "--stall-after", "0")
    session = Session(address, timeout_s=TIMEOUT_S)
    try:
        batch_id = session.request_batch(["a line the old service never answers"])
        run_until(session, lambda _: session._client.connected, timeout_s=10)
        process.send_signal(signal.SIGKILL)
        process.wait(TIMEOUT_S)
        process = start_scripted_server(address)
        assert session._client.wait_connected(10)  # connected again, and no tick came between
        started = time.monotonic()
        events = run_until(session, final_for(batch_id))
        assert time.monotonic() - started < 5  # not the request's timeout
        assert isinstance(events[-1], RequestFailed)
        assert events[-1].code == ErrorCode.UNREACHABLE and "went away" in events[-1].message
    finally:
        process.kill()
        session.close()


class _ForgetfulProxy:
    """A TCP proxy to ``target`` that, once ``forget()`` is called, passes nothing more on the
    connections open then and closes none of them: a firewall or NAT that dropped an idle
    flow without a word. Connections made after it pass."""

    def __init__(self, target: str):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._forgotten: set[socket.socket] = set()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def forget(self) -> None:
        self._forgotten |= self._open

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._open |= {downstream, upstream}
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pass, args=(source, sink), daemon=True).start()

    def _pass(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if source not in self._forgotten:
                    sink.sendall(data)
        self._open.discard(source)

    def close(self) -> None:
        self._listener.close()
        for sock in list(self._open):
            sock.close()


def test_a_connection_a_firewall_dropped_without_a_word_is_replaced(address, monkeypatch):
    # A review: every request after the flow was dropped timed out, until Blender restarted.
    # Heartbeats (shortened here) close a connection that answers none, and the client's
    # socket connects again.
    monkeypatch.setattr(client_module, "HEARTBEAT_INTERVAL_MS", 100)
    monkeypatch.setattr(client_module, "HEARTBEAT_TIMEOUT_MS", 300)
    proxy = _ForgetfulProxy(address)
    session = Session(proxy.address, timeout_s=2, connect_timeout_s=2)
    try:
        first = session.request_pose("wave")
        [answer] = run_until(session, final_for(first))
        assert isinstance(answer, PoseResult)
        proxy.forget()
        lost = session.request_pose("wave")
        [failure] = run_until(session, final_for(lost))
        assert isinstance(failure, RequestFailed)  # the heartbeat's end of it, or its timeout
        again = session.request_pose("wave")
        [answer] = run_until(session, final_for(again))
        assert isinstance(answer, PoseResult), answer
    finally:
        session.close()
        proxy.close()
