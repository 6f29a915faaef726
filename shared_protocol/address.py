"""ZeroMQ endpoint addresses: which are well formed, and which cannot leave this machine.

String logic only (no DNS lookups, no sockets), shared by the server (what it may bind), the
command line and the add-on (what they may connect to), so that all three refuse a bad address
with the same sentence before ZeroMQ fails on it with "Invalid argument".
"""

from __future__ import annotations

import ipaddress
import os

EXPECTED = "expected tcp://host:port"


class AddressError(ValueError):
    """An address that is not a usable ZeroMQ endpoint; the message says what is wrong."""


def check_address(address: str, *, bind: bool = False) -> str:
    """`address` itself if it is `tcp://[interface;]host:port` or `ipc://path`, else
    AddressError (also for a space, which ZeroMQ would not take, and for `inproc://`, which
    reaches only sockets of the same process: the service and its clients are separate ones).
    A bind may use `*` for the host or the port (any interface, a free port); a connection
    needs both."""
    if address.startswith("inproc://"):
        raise AddressError(
            f"{address!r}: inproc reaches only this process, and the service and its clients "
            "run in others; use tcp://127.0.0.1:PORT or ipc://PATH"
        )
    problem = _problem(address, bind)
    if bind and address.startswith("tcp://") and ";" in address:
        problem = "'interface;' is for connecting, not listening"
    if problem:
        raise AddressError(f"{address!r} is not a ZeroMQ address: {problem} ({EXPECTED})")
    return address


def is_loopback(address: str) -> bool:
    """True for tcp addresses on the loopback interface (`localhost` by name), and for ipc and
    inproc (local by nature). `*`, interface and host names are not provably loopback."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://") or _problem(address, bind=True):
        return False
    host = _tcp_host_port(address)[0]
    if host.lower() == "localhost":
        return True
    ip = _ip(host)
    # ::ffff:127.0.0.1, IPv4's loopback written as IPv6: Python 3.11 calls it no loopback.
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip is not None and (ip.is_loopback or (mapped is not None and mapped.is_loopback))


def host_name(address: str) -> str | None:
    """The host of a well-formed tcp connection address when it is a name to resolve (not an
    IP address, not `localhost`), else None."""
    host_port = tcp_host_port(address)
    if host_port is None or host_port[0].lower() == "localhost" or _ip(host_port[0]):
        return None
    return host_port[0]


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_ipv6(address: str) -> bool:
    """True for a tcp address with an IPv6 host (`tcp://[::1]:5555`): ZeroMQ sockets take one
    only with their `ipv6` option on."""
    return address.startswith("tcp://") and ":" in _tcp_host_port(address)[0]


def tcp_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a well-formed `tcp://host:port` connection address, else None."""
    if not address.startswith("tcp://") or _problem(address, bind=False):
        return None
    host, port = _tcp_host_port(address)
    return host, int(port)


def _problem(address: str, bind: bool) -> str | None:
    if any(c.isspace() for c in address):
        return "it contains a space"
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        if not path:
            return "nothing after ipc://"
        if not (os.path.isabs(path) or path.startswith("@")):  # "@": Linux's abstract names
            # The add-on starts its service in another folder than Blender's: each side
            # would find its own file.
            return f"{path!r} is a relative path; give the whole path, ipc:///folder/name"
        if not _ipc_supported():
            return "this ZeroMQ has no ipc:// (pyzmq's Windows builds); use tcp://127.0.0.1:PORT"
        return None
    if not address.startswith("tcp://"):
        scheme, sep, rest = address.partition("://")
        meant = None
        if not sep and address:  # host:port as a browser or ssh takes it
            meant = f"tcp://{address}"
        elif scheme.lower() in ("tcp", "ipc"):  # ZeroMQ reads the transport case by case
            meant = f"{scheme.lower()}://{rest}"
        if meant is not None and _problem(meant, bind) is None:
            return f"unknown transport; did you mean {meant!r}?"
        return "unknown transport"
    host, port = _tcp_host_port(address)
    if not host:
        return "no host"
    if not port:
        return "no port"
    if host == "*" and not bind:
        return "'*' (any interface) is for listening, not connecting"
    if port == "*" and not bind:
        return "'*' (any free port) is for listening, not connecting"
    if port != "*" and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return f"port {port!r} is not a number from 1 to 65535"
    return _host_problem(address[len("tcp://") :].rpartition(";")[2].rpartition(":")[0])


def _ipc_supported() -> bool:
    """Whether the installed ZeroMQ has ipc:// (a capability, not a socket; pyzmq's Windows
    wheels leave it out)."""
    try:
        import zmq
    except ImportError:  # string logic alone: nothing to ask
        return True
    return bool(zmq.has("ipc"))


def _host_problem(written: str) -> str | None:
    """What is wrong with a tcp host as written (IPv6 in brackets), if anything: ZeroMQ would
    only fail to connect to it, which reads as "no service there"."""
    bracketed = written.startswith("[") and written.endswith("]")
    if any(c in (written[1:-1] if bracketed else written) for c in "[]"):
        return f"host {written!r}: unbalanced brackets"
    if bracketed:
        return None if _ip(written[1:-1]) else f"host {written!r} is not an IP address"
    if ":" in written:
        return f"host {written!r}: an IPv6 address goes in brackets, [{written}]"
    parts = written.split(".")
    if len(parts) == 4 and all(p.isascii() and p.isdigit() for p in parts):
        # Four numbers are an IPv4 address, or a mistyped one (300.1.1.1); shorter forms
        # (127.1) are ones the resolver completes, as ZeroMQ does.
        try:
            ipaddress.IPv4Address(written)
        except ValueError:
            return f"host {written!r} is not an IPv4 address"
    return None


def _tcp_host_port(address: str) -> tuple[str, str]:
    """The host (IPv6 brackets removed) and port of `tcp://[interface;]host:port`."""
    rest = address[len("tcp://") :].rpartition(";")[2]  # a source interface may come first
    host, colon, port = rest.rpartition(":")
    if not colon:
        return rest, ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port
