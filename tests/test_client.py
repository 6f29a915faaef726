"""The protocol client on its own: what it does with no service behind its address."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq

from shared_protocol.client import Client, secret_key_exposure
from shared_protocol.protocol import (
    BatchRequest,
    ErrorCode,
    Limits,
    ProtocolError,
    StatusReply,
    StatusRequest,
    encode_reply,
)


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)  # sockets a failed test left open too: term() would wait for ever


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_secret_key_its_group_or_others_may_read_is_warned_of(tmp_path, mode):
    key = tmp_path / "animator.key_secret"
    key.write_text('curve\n    public-key = "x"\n    secret-key = "y"\n')
    key.chmod(0o600)
    assert secret_key_exposure(key) is None
    key.chmod(mode)
    assert f"(mode {mode:o})" in secret_key_exposure(key)
    public = tmp_path / "server.key"  # all may read a public key
    public.write_text('curve\n    public-key = "x"\n')
    public.chmod(mode)
    assert secret_key_exposure(public) is None
    assert secret_key_exposure(tmp_path / "typo.key_secret") is None  # named elsewhere
    pipe = tmp_path / "pipe.key_secret"
    os.mkfifo(pipe, mode)  # opened, it would block (the add-on's preferences, drawn)
    looked = threading.Thread(target=secret_key_exposure, args=(pipe,), daemon=True)
    looked.start()
    looked.join(5)
    assert not looked.is_alive() and secret_key_exposure(pipe) is None


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_key_swapped_for_a_pipe_after_its_look_is_not_waited_on(tmp_path, monkeypatch):
    # The file was looked at (os.stat), then opened by its name: a pipe put there between the
    # two blocked the caller, the add-on's preferences being drawn, until something wrote to it.
    pipe = tmp_path / "animator.key_secret"
    os.mkfifo(pipe, 0o644)
    looked_at = tmp_path / "before.key_secret"  # what was there when it was looked at
    looked_at.write_text('curve\n    secret-key = "y"\n')
    looked_at.chmod(0o644)
    real_stat = os.stat

    def stat_before_the_swap(path, *args, **kwargs):
        return real_stat(looked_at if str(path) == str(pipe) else path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_before_the_swap)
    answers = []
    looked = threading.Thread(target=lambda: answers.append(secret_key_exposure(pipe)), daemon=True)
    looked.start()
    looked.join(5)
    monkeypatch.undo()
    if looked.is_alive():  # let it go: a writer opens the pipe
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        looked.join(5)
        pytest.fail("secret_key_exposure waited on a pipe")
    assert answers == [None]  # no file: nothing said
    assert "(mode 644)" in secret_key_exposure(looked_at)


def test_a_key_s_exposure_is_judged_by_the_file_opened(tmp_path, monkeypatch):
    # Made private between the look and the open: the open file's mode is what counts.
    key = tmp_path / "animator.key_secret"
    key.write_text('curve\n    secret-key = "y"\n')
    key.chmod(0o600)
    shared = tmp_path / "shared.key_secret"
    shared.write_text("")
    shared.chmod(0o644)
    real_stat = os.stat
    monkeypatch.setattr(
        os, "stat", lambda path, *a, **k: real_stat(shared if str(path) == str(key) else path)
    )
    assert secret_key_exposure(key) is None


def test_send_never_blocks_when_the_queue_toward_no_service_fills(context):
    client = Client("tcp://127.0.0.1:9", context=context)  # nothing listens on port 9
    with pytest.raises(ProtocolError) as raised:
        for _ in range(5_000):  # ZeroMQ queues 1,000 messages, then would wait for a peer
            client.send(StatusRequest(client.new_id()))
    assert raised.value.code == ErrorCode.UNREACHABLE
    assert "is not taking requests; is chatpose-serve running?" in raised.value.message
    client.close()


def test_a_client_sends_within_its_own_limits_not_the_defaults(context):
    roomy = Limits(max_batch_items=1000)  # a service configured with more room than default
    with Client("tcp://127.0.0.1:9", context=context, limits=roomy) as client:
        client.send(BatchRequest(client.new_id(), ("wave",) * 300))  # 256 by default
    with Client("tcp://127.0.0.1:9", context=context) as client:
        with pytest.raises(ProtocolError, match="256"):
            client.send(BatchRequest(client.new_id(), ("wave",) * 300))


def test_closing_after_a_long_wait_with_no_service_there_returns():
    # A review: a socket retries an address where nothing listens a few times a second, and
    # its monitor's unread events filled up in five minutes; closing it then hung the process
    # for good, holding the GIL (Blender on quitting). A subprocess, timed out from outside;
    # retries every millisecond fill the monitor in a few seconds.
    code = textwrap.dedent(
        """
        import time
        import zmq
        from shared_protocol.client import Client
        context = zmq.Context()
        context.setsockopt(zmq.RECONNECT_IVL, 1)
        client = Client("tcp://127.0.0.1:9", context=context)
        time.sleep(5)
        client.close()
        context.term()
        print("CLOSED")
        """
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "CLOSED", result.stderr


def test_another_program_on_the_port_is_told_from_no_service(context):
    # A review: a web server on the port was "no service at ...; is chatpose-serve running?",
    # while chatpose-serve said the address was in use: a newcomer went round in a circle.
    import socket

    with socket.socket() as listener:  # takes connections, says nothing (as HTTP waits)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with Client(address, context=context) as client:
            with pytest.raises(ProtocolError) as silent:
                client.request(StatusRequest(client.new_id()), timeout_s=1.0)
    assert silent.value.code == ErrorCode.UNREACHABLE
    assert silent.value.message.startswith(
        f"something takes connections at {address} but did not complete ZeroMQ's handshake "
        "within 2 s: another program on that port, or a chatpose-serve that is stopped"
    )


def test_closing_twice_or_on_leaving_a_with_block_is_harmless(context):
    with Client("tcp://127.0.0.1:9", context=context) as client:
        client.close()
    client.close()


def test_a_service_that_goes_away_mid_request_is_unreachable_at_once_not_after_the_timeout(
    context,
):
    def take_the_request_and_stop(service):
        service.recv_multipart()
        service.close(linger=0)

    error, address = failed_status_request(context, take_the_request_and_stop, timeout_s=30)
    assert error.code == ErrorCode.UNREACHABLE
    assert error.message == f"the service at {address} went away before answering"


def test_a_reply_frame_past_the_header_limit_is_not_read_into_memory(context):
    def answer_with_a_huge_frame(service):
        peer, *_ = service.recv_multipart()
        service.send_multipart([peer, b"{" + b" " * (4 << 20)])  # 4 MiB, over the 1 MiB limit

    error, _ = failed_status_request(context, answer_with_a_huge_frame, timeout_s=10)
    # Cut off unread, the connection dropped: the client says so (the service stays up).
    assert error.code == ErrorCode.UNREACHABLE
    assert "went away before answering" in error.message


@pytest.mark.parametrize("answer", [b"hello", b'{"v": 1, "id": null, "op": "error"}'])
def test_a_reply_that_names_no_request_is_a_bad_reply_not_a_timeout(context, answer):
    # Skipped as a late reply to another request, it was reported as no answer at all.
    service = context.socket(zmq.ROUTER)
    port = service.bind_to_random_port("tcp://127.0.0.1")

    def answer_nonsense():
        peer, *_ = service.recv_multipart()
        service.send_multipart([peer, answer])

    serving = threading.Thread(target=answer_nonsense)
    serving.start()
    with Client(f"tcp://127.0.0.1:{port}", context=context) as client:
        started = time.monotonic()
        reply = client.request(StatusRequest(client.new_id()), timeout_s=30)
    serving.join()
    service.close(linger=0)
    assert reply.message.startswith("bad reply: ") and time.monotonic() - started < 10


def _serving(context, answer, port: int | None = None, after_s: float = 0.0):
    """A ROUTER on a free loopback port (or `port`, bound `after_s` from now) whose thread
    answers each request's header with the frames `answer(request header)` gives, until 2 s
    pass without one; (address, stop)."""
    service = context.socket(zmq.ROUTER)
    if port is None:
        port = service.bind_to_random_port("tcp://127.0.0.1")

    def serve():
        if after_s:
            time.sleep(after_s)
            service.bind(f"tcp://127.0.0.1:{port}")
        while service.poll(2000):
            peer, header, *_ = service.recv_multipart()
            for frame in answer(json.loads(header)):
                service.send_multipart([peer, frame])

    thread = threading.Thread(target=serve)
    thread.start()

    def stop():
        thread.join()
        service.close(linger=0)

    return f"tcp://127.0.0.1:{port}", stop


def _status(request_id: str) -> bytes:
    reply = StatusReply(request_id, "demo", "cpu", "float32", 0, 0.0, "0.1.0", False, 0)
    return encode_reply(reply)[0]


def test_a_late_reply_to_an_earlier_request_is_not_taken_for_this_one_s(context):
    # A reply to a request given up on (timed out) may come while the next one waits.
    address, stop = _serving(
        context, lambda request: [_status("earlier-1"), _status(request["id"])]
    )
    try:
        with Client(address, context=context) as client:
            request = StatusRequest(client.new_id())
            assert client.request(request, timeout_s=10).id == request.id
    finally:
        stop()


@pytest.mark.parametrize("restarted", [False, True])
def test_a_service_gone_just_after_the_connection_was_seen_is_waited_for_again(
    context, monkeypatch, restarted
):
    # Lost between the look at the connection and the count of drops, it waited the whole
    # timeout: the lost connection was counted as one before the request.
    service = context.socket(zmq.ROUTER)
    port = service.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    stop_again = lambda: None  # noqa: E731
    with Client(address, context=context) as client:
        seen = client.wait_connected
        looks = []

        def then_gone(timeout_s):
            looks.append(1)
            if len(looks) == 1:
                assert seen(timeout_s)
                service.close(linger=0)
                time.sleep(0.5)  # the drop reaches the client's monitor
                return True
            return seen(timeout_s)

        if restarted:  # the same port, answering: the request goes to it
            address, stop_again = _serving(
                context, lambda request: [_status(request["id"])], port=port, after_s=0.6
            )
        monkeypatch.setattr(client, "wait_connected", then_gone)
        started = time.monotonic()
        try:
            if restarted:
                assert client.request(StatusRequest("s-1"), timeout_s=8).id == "s-1"
            else:
                with pytest.raises(ProtocolError) as gone:
                    client.request(StatusRequest(client.new_id()), timeout_s=8)
                assert gone.value.code == ErrorCode.UNREACHABLE
        finally:
            stop_again()
    assert len(looks) == 2 and time.monotonic() - started < 5


def test_waiting_for_a_loading_model_waits_again_from_each_word_that_it_loads(context):
    # A 13B model loads for minutes: each "loading" reply starts the wait over.
    started = time.monotonic()

    def loading_for_two_seconds(request):
        if time.monotonic() - started < 2.0:
            busy = {"code": "busy", "message": "loading the model"}
            return [json.dumps({"protocol": 1, "id": request["id"], "op": "status",
                                "ok": False, "error": busy}).encode()]  # fmt: skip
        return [_status(request["id"])]

    address, stop = _serving(context, loading_for_two_seconds)
    words = []
    try:
        with Client(address, context=context) as client:
            assert isinstance(client.wait_serving(1.0, loading=words.append), StatusReply)
    finally:
        stop()
    assert words and words[0] == "loading the model"


def test_a_loading_service_whose_last_answer_is_late_is_still_said_to_load(context):
    # The last status request before the deadline has a sliver of the wait: no answer in it
    # is no sign the service went away, and a live load ended "did not serve" (exit 6).
    asked = []

    def busy_and_late_once(request):
        asked.append(request["id"])
        if len(asked) == 2:
            return []  # answered after the deadline
        busy = {"code": "busy", "message": "loading the model"}
        return [json.dumps({"protocol": 1, "id": request["id"], "op": "status",
                            "ok": False, "error": busy}).encode()]  # fmt: skip

    address, stop = _serving(context, busy_and_late_once)
    try:
        with Client(address, context=context) as client:
            with pytest.raises(ProtocolError) as raised:
                client.wait_serving(0.3)
    finally:
        stop()
    assert raised.value.code == ErrorCode.BUSY and "loading the model" in raised.value.message


def test_a_service_of_another_protocol_version_is_named_so(context):
    # The studio review: "bad reply: unsupported_protocol: protocol: version 2 is not
    # supported; this side speaks 1", naming neither side nor what to do; exit 7 for status
    # and 4 for status --wait.
    service = context.socket(zmq.ROUTER)
    port = service.bind_to_random_port("tcp://127.0.0.1")

    def answer_in_version_2():
        while service.poll(2000):
            peer, header, *_ = service.recv_multipart()
            request = json.loads(header)
            reply = {"protocol": 2, "id": request["id"], "op": "status", "ok": True}
            service.send_multipart([peer, json.dumps(reply).encode()])

    serving = threading.Thread(target=answer_in_version_2)
    serving.start()
    address = f"tcp://127.0.0.1:{port}"
    expected = (
        f"the service at {address} speaks another version of the protocol (version 2 is not "
        "supported; this side speaks 1): install one release of ChatPose for Blender on both "
        "sides"
    )
    try:
        with Client(address, context=context) as client:
            reply = client.request(StatusRequest(client.new_id()), timeout_s=30)
            assert reply.message.startswith(expected)
            with pytest.raises(ProtocolError) as error:
                client.wait_serving(10)
            assert error.value.code == ErrorCode.INTERNAL_ERROR  # as any reply that won't decode
            assert error.value.message.startswith(expected)
    finally:
        serving.join()
        service.close(linger=0)


def failed_status_request(context, serve, timeout_s: float) -> tuple[ProtocolError, str]:
    """The error a status request raises against a service socket that `serve(socket)`
    handles in a thread of its own, and the address."""
    service = context.socket(zmq.ROUTER)
    port = service.bind_to_random_port("tcp://127.0.0.1")
    serving = threading.Thread(target=serve, args=(service,))
    serving.start()
    with Client(f"tcp://127.0.0.1:{port}", context=context) as client:
        with pytest.raises(ProtocolError) as raised:
            client.request(StatusRequest(client.new_id()), timeout_s=timeout_s)
    serving.join()
    service.close(linger=0)
    return raised.value, client.address


def test_a_program_that_is_not_chatpose_serve_is_named_so_not_a_key_problem(context):
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_and_hang_up():  # as a web or SSH server does with ZeroMQ's greeting
        for _ in range(3):
            connection, _ = listener.accept()
            connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            connection.close()

    threading.Thread(target=accept_and_hang_up, daemon=True).start()
    with Client(f"tcp://127.0.0.1:{port}", context=context) as client:
        with pytest.raises(ProtocolError) as raised:
            client.request(StatusRequest(client.new_id()), timeout_s=1.0)
    listener.close()
    message = raised.value.message
    assert raised.value.code == ErrorCode.UNREACHABLE
    assert message == (
        f"tcp://127.0.0.1:{port} refused the connection: most likely, the service has CURVE "
        "keys and this client has none. Other cause: what listens there is not chatpose-serve"
    )


def test_after_a_refusal_for_good_the_next_request_reaches_a_service_fixed_since(context):
    # ZeroMQ does not retry a connection refused for a keys mismatch: without a fresh socket,
    # every later request failed at once, even after the service was restarted without keys.
    service = context.socket(zmq.ROUTER)
    service.curve_server = True
    service.curve_publickey, service.curve_secretkey = zmq.curve_keypair()
    port = service.bind_to_random_port("tcp://127.0.0.1")
    restarted = context.socket(zmq.ROUTER)  # the service restarted, without keys
    try:
        with Client(f"tcp://127.0.0.1:{port}", context=context) as client:
            # Which side sees the mismatch first is a race: until the client does (the refusal
            # ZeroMQ never retries), it only hears that the connection closed, and retries.
            deadline = time.monotonic() + 10
            while client.refusal != "one side has CURVE keys and the other has none":
                assert not client.wait_connected(0.2)
                assert time.monotonic() < deadline, f"no final refusal: {client.refusal}"
            service.close(linger=0)
            deadline = time.monotonic() + 5
            while True:  # ZeroMQ lets go of the port in its own thread
                try:
                    restarted.bind(f"tcp://127.0.0.1:{port}")
                    break
                except zmq.ZMQError:
                    assert time.monotonic() < deadline, "the port was not let go"
                    time.sleep(0.05)
            client.send(StatusRequest(client.new_id()))
            assert restarted.poll(5000), "the request never reached the service"
    finally:  # open sockets would hold the context's teardown
        service.close(linger=0)
        restarted.close(linger=0)


def test_a_refusal_is_forgotten_once_nothing_listens_there_any_more(context, tmp_path):
    import time

    from inference_service.keys import make_keys
    from shared_protocol.client import ClientCurveKeys

    make_keys(tmp_path, ["animator"])
    server_public, server_secret = zmq.curve_keypair()  # not the server.key the client has
    service = context.socket(zmq.ROUTER)
    service.curve_server = True
    service.curve_publickey, service.curve_secretkey = server_public, server_secret
    port = service.bind_to_random_port("tcp://127.0.0.1")
    keys = ClientCurveKeys(tmp_path / "animator.key_secret", tmp_path / "server.key")
    with Client(f"tcp://127.0.0.1:{port}", context=context, curve=keys) as client:
        assert not client.wait_connected(1.0)
        assert client.refusal == (  # the likeliest cause first, the others after it
            "most likely, the server key given is not this service's. Other causes: the "
            "service has no CURVE keys; what listens there is not chatpose-serve"
        )
        service.close(linger=0)  # gone: what the next request meets is no service at all
        deadline = time.monotonic() + 10
        while client.refusal is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.refusal is None


def test_waiting_for_a_service_ends_when_it_is_gone_or_the_time_is_up(context):
    with Client("tcp://127.0.0.1:9", context=context) as client:  # nothing listens on port 9
        calls = []

        def exits_on_the_second_look():
            calls.append(1)
            return "chatpose-serve exited with code 2" if len(calls) > 1 else None

        with pytest.raises(ProtocolError) as gone:
            client.wait_serving(60, gone=exits_on_the_second_look)
        assert gone.value.code == ErrorCode.UNREACHABLE
        assert gone.value.message == "chatpose-serve exited with code 2"
        started = time.monotonic()
        with pytest.raises(ProtocolError) as late:
            client.wait_serving(0.5)
        # Nothing listened all the time: no service, as a request says; within the time given
        # (a status request's own 2 s wait overshot it).
        assert late.value.code == ErrorCode.UNREACHABLE
        assert "no service at tcp://127.0.0.1:9 (no connection within 0.5 s)" in late.value.message
        assert "resolves" not in late.value.message  # an address, not a name
        assert time.monotonic() - started < 1.5
    # ZeroMQ says nothing of a host name it cannot resolve: it only never connects.
    with Client("tcp://gpu-box.invalid:5555", context=context) as client:
        with pytest.raises(ProtocolError) as unresolved:
            client.wait_serving(0.3)
    assert "Is 'gpu-box.invalid' a name this machine resolves and can reach?" in str(
        unresolved.value
    )


def test_waiting_for_a_service_that_refuses_the_keys_names_the_refusal_at_once(context, tmp_path):
    # Asking again cannot help until someone changes the keys: waiting out the minutes a model
    # may take to load, then calling it a timeout, hid the reason.
    from inference_service.keys import make_keys
    from shared_protocol.client import ClientCurveKeys

    make_keys(tmp_path, ["animator"])
    service = context.socket(zmq.ROUTER)
    service.curve_server = True
    service.curve_publickey, service.curve_secretkey = zmq.curve_keypair()  # another key
    port = service.bind_to_random_port("tcp://127.0.0.1")
    keys = ClientCurveKeys(tmp_path / "animator.key_secret", tmp_path / "server.key")
    try:
        with Client(f"tcp://127.0.0.1:{port}", context=context, curve=keys) as client:
            with pytest.raises(ProtocolError) as refused:
                client.wait_serving(600)
    finally:
        service.close(linger=0)
    assert refused.value.code == ErrorCode.UNREACHABLE
    assert "refused the connection: most likely, the server key given is not" in str(refused.value)


@pytest.mark.parametrize(
    "content",
    [
        'curve\n    public-key = "tooshort"\n    secret-key = "alsoshort"\n',
        "curve\n    public-key\n",  # no "=": zmq.auth read past the end of the line
        'curve\n    public-key = "' + "#" * 40 + '"\n    secret-key = "' + "~" * 40 + '"\n',
    ],
    ids=["short", "no-equals", "not-z85"],
)
def test_a_key_file_holding_no_curve_key_is_named_before_any_socket(tmp_path, content):
    # ZeroMQ refused such a key as an "Invalid argument" of a socket option: a traceback in
    # Blender, and a socket left open each time.
    from shared_protocol.client import ClientCurveKeys

    (tmp_path / "me.key_secret").write_text(content)
    (tmp_path / "server.key").write_text(content)
    keys = ClientCurveKeys(tmp_path / "me.key_secret", tmp_path / "server.key")
    with pytest.raises(ValueError, match=r"the client key .*me\.key_secret (is not a CURVE|cann)"):
        keys.load()


def test_a_missing_key_file_is_named_missing(tmp_path):
    # ZeroMQ's words for it, "Invalid certificate file", blamed a file that is not there.
    from shared_protocol.client import ClientCurveKeys

    keys = ClientCurveKeys(tmp_path / "me.key_secret", tmp_path / "server.key")
    with pytest.raises(
        ValueError, match=r"^the client key .*me\.key_secret cannot be read \(no such file\)$"
    ):
        keys.load()
    # A key's text pasted where its path goes: a name too long, said, not raised as OSError.
    pasted = ClientCurveKeys(tmp_path / ("public-key = " + "x" * 300), tmp_path / "server.key")
    with pytest.raises(ValueError, match=r"^the client key .* cannot be read \(.*too long"):
        pasted.load()


def test_a_request_given_up_on_is_cancelled_so_the_service_stops_its_work(context):
    # The service learns a client has gone only when a reply to it cannot be sent: a chat
    # turn or a batch given up on (a timeout, Ctrl-C) ran to its end, holding up every other
    # animator's request behind it.
    import numpy as np

    from shared_protocol.pose import Pose
    from shared_protocol.protocol import (
        BatchItemReply,
        CancelRequest,
        PoseRequest,
        decode_request,
        encode_reply,
    )

    service = context.socket(zmq.ROUTER)
    port = service.bind_to_random_port("tcp://127.0.0.1")

    def received():
        assert service.poll(5_000), "nothing came"
        identity, *frames = service.recv_multipart()
        return identity, decode_request(frames)

    try:
        with Client(f"tcp://127.0.0.1:{port}", context=context) as client:
            chat = PoseRequest(client.new_id(), "how would a tired person stand?", mode="chat")
            with pytest.raises(ProtocolError) as raised:
                client.request(chat, timeout_s=0.3)
            assert raised.value.code == ErrorCode.TIMEOUT
            assert received()[1] == chat
            _, cancel = received()
            assert isinstance(cancel, CancelRequest) and cancel.target == chat.id
            batch = BatchRequest(client.new_id(), ("wave", "bow"))
            first = BatchItemReply(batch.id, 0, 2, "ok", (Pose(np.zeros((24, 3))),))
            answering = threading.Thread(
                target=lambda: service.send_multipart([received()[0], *encode_reply(first)])
            )
            answering.start()
            replies = client.stream(batch, timeout_s=5.0)
            assert next(replies).index == 0
            answering.join()
            replies.close()  # the caller stopped reading: Ctrl-C between two lines, say
            _, cancel = received()
            assert isinstance(cancel, CancelRequest) and cancel.target == batch.id
    finally:
        service.close(linger=0)
