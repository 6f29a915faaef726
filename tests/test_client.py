"""The protocol client on its own: what it does with no service behind its address."""

from __future__ import annotations

import threading

import pytest
import zmq

from shared_protocol.client import Client
from shared_protocol.protocol import ErrorCode, ProtocolError, StatusRequest


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.term()


def test_send_never_blocks_when_the_queue_toward_no_service_fills(context):
    client = Client("tcp://127.0.0.1:9", context=context)  # nothing listens on port 9
    with pytest.raises(ProtocolError) as raised:
        for _ in range(5_000):  # ZeroMQ queues 1,000 messages, then would wait for a peer
            client.send(StatusRequest(client.new_id()))
    assert raised.value.code == ErrorCode.UNREACHABLE
    assert "is not taking requests; is chatpose-serve running?" in raised.value.message
    client.close()


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
        f"tcp://127.0.0.1:{port} refused the connection: what listens there closed the "
        "connection at the handshake: it has CURVE keys and this client none, or it is not "
        "chatpose-serve"
    )


def test_a_refusal_that_names_its_cause_outlasts_a_later_one_that_does_not(context, monkeypatch):
    # A keyless client at a CURVE service: ZeroMQ reports the mismatch, or, when the service
    # noticed first, only that it closed the connection; retries may do either.
    from shared_protocol import client as client_module

    events = []

    class Monitor:  # the client's monitor socket, fed here
        def poll(self, _timeout=0):
            return bool(events)

        def close(self, *_args, **_kwargs):
            pass

    monkeypatch.setattr(client_module, "recv_monitor_message", lambda _m: {"event": events.pop(0)})
    with Client("tcp://127.0.0.1:9", context=context) as client:
        real_monitor, client._monitor = client._monitor, Monitor()
        try:
            events += [zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL]
            assert client.refusal.startswith("what listens there closed the connection")
            events += [zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL]
            assert client.refusal == "one side has CURVE keys and the other has none"
            events += [zmq.EVENT_CLOSED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL]  # a new start
            assert client.refusal.startswith("what listens there closed the connection")
        finally:
            client._monitor = real_monitor


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
        assert client.refusal.startswith("the server key given is not this service's")
        service.close(linger=0)  # gone: what the next request meets is no service at all
        deadline = time.monotonic() + 10
        while client.refusal is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.refusal is None
