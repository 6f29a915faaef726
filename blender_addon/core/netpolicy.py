"""May the add-on connect to a service address? Blender's "Allow Online Access" decides.

Blender 4.2+ asks extensions to stay off the network unless the user allows online access
(``bpy.app.online_access``). A service on this machine is not "online": loopback TCP addresses,
``ipc://`` and ``inproc://`` are always allowed; anything else needs online access. Host names
are not resolved (no DNS lookups); only ``localhost`` counts as a loopback name
(``shared_protocol.address``).
"""

from __future__ import annotations

from shared_protocol.address import AddressError, check_address, is_loopback

DEFAULT_SERVICE_ADDRESS = "tcp://127.0.0.1:5555"  # the same as shared_protocol.client's


def address_problem(address: str, online_access: bool) -> str | None:
    """None when the add-on may connect to ``address``, else a sentence saying why not."""
    try:
        check_address(address)
    except AddressError as exc:
        return str(exc)
    if is_loopback(address) or online_access:
        return None
    return (
        f"{address} is not on this machine and Blender's online access is off "
        "(Preferences > System > Network > Allow Online Access)"
    )
