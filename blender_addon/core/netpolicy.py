"""May the add-on connect to a service address, and with which CURVE keys?

Blender 4.2+ asks extensions to stay off the network unless the user allows online access
(``bpy.app.online_access``). A service on this machine is not "online": loopback TCP addresses
and ``ipc://`` are always allowed; anything else needs online access. Host names are not
resolved (no DNS lookups); only ``localhost`` counts as a loopback name
(``shared_protocol.address``).

chatpose-serve listens off loopback only with CURVE keys (docs/security.md), so an address off
this machine also needs the client's key pair and the server's public key.
"""

from __future__ import annotations

from pathlib import Path

from shared_protocol.address import AddressError, check_address, is_loopback
from shared_protocol.client import ClientCurveKeys

SECURITY_DOCS = "docs/security.md"


def address_problem(address: str, online_access: bool, has_keys: bool = False) -> str | None:
    """None when the add-on may connect to ``address``, else a sentence saying why not.
    ``has_keys``: CURVE keys are set (``curve_problem`` says whether they are complete)."""
    try:
        check_address(address)
    except AddressError as exc:  # where to fix it: the user may not know the setting's name
        return f"Service Address (the add-on's preferences): {exc}"
    if is_loopback(address):
        return None
    if not online_access:
        return (
            f"{address} is not on this machine and Blender's online access is off "
            "(Preferences > System > Network > Allow Online Access)"
        )
    if not has_keys:
        return (
            f"{address} is not on this machine: a service there needs CURVE keys; set the "
            f"Client Key and the Server Key in the add-on's preferences ({SECURITY_DOCS})"
        )
    return None


def curve_problem(client_key: str, server_key: str) -> str | None:
    """Whether the two key settings go together (without reading the files)."""
    if bool(client_key) != bool(server_key):
        return "CURVE keys: set both the Client Key and the Server Key, or neither"
    return None


def curve_keys(client_key: str, server_key: str) -> ClientCurveKeys | None:
    """The keys the settings name, read and checked now; None when neither is set.
    ValueError, a sentence for the user, when they cannot be used."""
    problem = curve_problem(client_key, server_key)
    if problem:
        raise ValueError(problem)
    if not client_key:
        return None
    # Read now: a bad key would otherwise show only as "no service at ...". Kept: the session
    # made with them reads no file again.
    return ClientCurveKeys(Path(client_key), Path(server_key)).loaded()
