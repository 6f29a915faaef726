"""ZeroMQ addresses: well formed or not (with the reason), and which stay on this machine."""

import pytest
import zmq

from shared_protocol.address import AddressError, check_address, host_name, is_ipv6, is_loopback
from shared_protocol.client import Client


@pytest.mark.parametrize(
    "address",
    [
        "tcp://127.0.0.1:5555",
        "tcp://localhost:1",
        "tcp://[::1]:65535",
        "tcp://lo;127.0.0.1:5555",
        "tcp://gpu-box:5555",
        "tcp://[fe80::1%eth0]:5555",  # a link-local address with its interface
        "tcp://[127.0.0.1]:5555",  # ZeroMQ takes an IPv4 address in brackets too
        "tcp://127.1:5555",  # a short form the resolver completes
        "ipc:///tmp/chatpose.sock",
    ],
)
def test_well_formed_addresses_pass_unchanged(address):
    assert check_address(address) == address
    if ";" not in address:  # a source interface, which only a connection takes
        assert check_address(address, bind=True) == address


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("", "unknown transport"),
        ("127.0.0.1:5555", "unknown transport; did you mean 'tcp://127.0.0.1:5555'?"),
        ("localhost:5555", "did you mean 'tcp://localhost:5555'?"),
        ("TCP://127.0.0.1:5555", "did you mean 'tcp://127.0.0.1:5555'?"),
        # No suggestion that is wrong itself.
        ("tcp:/127.0.0.1:5555", "unknown transport (expected"),
        ("/tmp/chatpose.sock", "unknown transport (expected"),
        ("127.0.0.1", "unknown transport (expected"),
        ("IPC://rel/path", "unknown transport (expected"),
        ("http://127.0.0.1:5555", "unknown transport"),
        ("tcp://127.0.0.1:5555 ", "contains a space"),
        (" tcp://127.0.0.1:5555", "contains a space"),
        ("tcp://127.0.0.1", "no port"),
        ("tcp://:5555", "no host"),
        ("tcp://127.0.0.1:notaport", "port 'notaport' is not a number from 1 to 65535"),
        ("tcp://127.0.0.1:0", "port '0'"),
        ("tcp://127.0.0.1:65536", "port '65536'"),
        ("tcp://127.0.0.1:５５５５", "port '５５５５'"),  # full-width digits: isdigit() says yes
        ("tcp://*:5555", "'*' (any interface) is for listening"),
        ("tcp://127.0.0.1:*", "'*' (any free port) is for listening"),
        ("ipc://", "nothing after ipc://"),
        ("ipc://chatpose.sock", "'chatpose.sock' is a relative path; give the whole path"),
        # ZeroMQ would only fail to connect to these, which reads as "no service there".
        ("tcp://[::1:5555", "host '[::1': unbalanced brackets"),
        ("tcp://[[::1]]:5555", "unbalanced brackets"),
        ("tcp://[gpu-box]:5555", "host '[gpu-box]' is not an IP address"),
        ("tcp://::1:5555", "an IPv6 address goes in brackets, [::1]"),
        ("tcp://300.1.1.1:5555", "host '300.1.1.1' is not an IPv4 address"),
    ],
)
def test_malformed_addresses_name_what_is_wrong(address, reason):
    with pytest.raises(AddressError, match="is not a ZeroMQ address") as error:
        check_address(address)
    assert reason in str(error.value)
    assert "expected tcp://host:port" in str(error.value)


def test_inproc_is_refused_as_it_reaches_no_other_process():
    for bind in (False, True):
        with pytest.raises(AddressError, match="inproc reaches only this process"):
            check_address("inproc://chatpose", bind=bind)
    with pytest.raises(AddressError, match="use tcp://127.0.0.1:PORT or ipc://PATH"):
        Client("inproc://chatpose")  # it would wait for a handshake that inproc never makes


def test_a_bind_takes_no_source_interface():
    # ZeroMQ's bind says only "Invalid argument" to these.
    for address in ("tcp://0.0.0.0;127.0.0.1:5555", "tcp://lo;127.0.0.1:5555"):
        with pytest.raises(AddressError, match="'interface;' is for connecting, not listening"):
            check_address(address, bind=True)
        with pytest.raises(zmq.ZMQError, match="Invalid argument"):
            with zmq.Context() as context, context.socket(zmq.ROUTER) as router:
                router.bind(address)


def test_a_bind_may_ask_for_any_interface_or_a_free_port():
    assert check_address("tcp://*:5555", bind=True) == "tcp://*:5555"
    assert check_address("tcp://127.0.0.1:*", bind=True) == "tcp://127.0.0.1:*"
    with pytest.raises(AddressError, match="host '300.1.1.1' is not an IPv4 address"):
        check_address("tcp://300.1.1.1:*", bind=True)  # a free port, on a mistyped host


def test_ipc_is_refused_where_zeromq_has_none(monkeypatch):
    assert check_address("ipc:///tmp/chatpose") == "ipc:///tmp/chatpose"
    monkeypatch.setattr(zmq, "has", lambda capability: capability != "ipc")  # pyzmq on Windows
    with pytest.raises(AddressError, match=r"no ipc:// .*use tcp://127\.0\.0\.1:PORT"):
        check_address("ipc:///tmp/chatpose", bind=True)
    with pytest.raises(AddressError, match="unknown transport"):
        check_address("garbage", bind=True)
    with pytest.raises(AddressError, match="no port"):
        check_address("tcp://x", bind=True)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.8.9.10:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://LOCALHOST:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://[::ffff:127.0.0.1]:5555", True),  # IPv4's loopback, written as IPv6
        ("tcp://[::ffff:192.168.1.20]:5555", False),
        ("tcp://lo;127.0.0.1:5555", True),
        ("tcp://127.0.0.1:*", True),
        ("ipc:///tmp/chatpose.sock", True),
        ("inproc://chatpose", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://192.168.1.20:5555", False),
        ("tcp://[2001:db8::1]:5555", False),
        ("tcp://studio-gpu:5555", False),
        ("udp://127.0.0.1:5555", False),
        ("tcp://127.0.0.1", False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_the_client_refuses_a_malformed_address_before_zeromq_does():
    context = zmq.Context()
    try:
        with pytest.raises(AddressError, match="'127.0.0.1:5555' is not a ZeroMQ address"):
            Client("127.0.0.1:5555", context=context)
    finally:
        context.term()  # no socket was left open, or this would block


def test_an_address_zeromq_refuses_is_named_and_leaves_nothing_open():
    context = zmq.Context()
    try:
        for address in ("tcp://my~host:5555", "ipc:///" + "a" * 120):
            with pytest.raises(AddressError, match="ZeroMQ cannot connect to"):
                Client(address, context=context)
    finally:
        context.term()  # no socket was left open, or this would block


def test_ipv6_addresses_are_told_apart():
    assert is_ipv6("tcp://[::1]:5555") and is_ipv6("tcp://lo;[fe80::1]:5555")
    assert not any(
        is_ipv6(a) for a in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "ipc:///tmp/x:y")
    )


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("tcp://gpu-box:5555", "gpu-box"),
        ("tcp://gpu-box.studio.lan:5555", "gpu-box.studio.lan"),
        ("tcp://localhost:5555", None),
        ("tcp://127.0.0.1:5555", None),
        ("tcp://[::1]:5555", None),
        ("ipc:///tmp/chatpose.sock", None),
        ("gpu-box:5555", None),  # not an address at all
    ],
)
def test_host_name_is_only_a_name_to_resolve(address, name):
    assert host_name(address) == name
