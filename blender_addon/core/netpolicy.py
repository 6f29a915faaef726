"""May the add-on connect to a service address? Blender's "Allow Online Access" decides.

Blender 4.2+ asks extensions to stay off the network unless the user allows online access
(``bpy.app.online_access``). A service on this machine is not "online": loopback TCP addresses,
``ipc://`` and ``inproc://`` are always allowed; anything else needs online access. Host names
are not resolved (no DNS lookups); only ``localhost`` counts as a loopback name.
"""

from __future__ import annotations

import ipaddress

DEFAULT_SERVICE_ADDRESS = "tcp://127.0.0.1:5555"  # the same as shared_protocol.client's


def _tcp_host(address: str) -> str | None:
    """The host of ``tcp://[interface;]host:port``, or None when it does not parse."""
    rest = address[len("tcp://") :]
    rest = rest.rpartition(";")[2]  # a source interface may come first: tcp://eth0;host:port
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def is_loopback_address(address: str) -> bool:
    """True for addresses that cannot leave this machine."""
    address = address.strip()
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = _tcp_host(address)
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_problem(address: str, online_access: bool) -> str | None:
    """None when the add-on may connect to ``address``, else a sentence saying why not."""
    address = address.strip()
    if not address.startswith(("tcp://", "ipc://", "inproc://")):
        return f"{address!r} is not a ZeroMQ address (expected tcp://host:port)"
    if address.startswith("tcp://") and _tcp_host(address) is None:
        return f"{address!r} is not a ZeroMQ address (expected tcp://host:port)"
    if is_loopback_address(address) or online_access:
        return None
    return (
        f"{address} is not on this machine and Blender's online access is off "
        "(Preferences > System > Network > Allow Online Access)"
    )
