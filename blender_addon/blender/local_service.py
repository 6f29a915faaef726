"""Starting and stopping the local service, a ``chatpose-serve`` process on this machine. The
timer watches it while it loads (``runtime.watch_local_service``)."""

from __future__ import annotations

import os
import time

import bpy

from shared_protocol.address import AddressError, check_address, is_loopback
from shared_protocol.protocol import ErrorCode

from ..core.service_process import (
    ServiceProcessError,
    address_in_use,
    child_environment,
    log_name_for,
    serve_command,
)
from ..preferences import absolute_path, get_preferences, service_settings
from . import feedback, live, runtime


def start_service(context: bpy.types.Context) -> None:
    prefs = get_preferences(context)
    if prefs is None:
        raise live.UserError("The add-on's preferences are not available")
    settings = service_settings(context)
    address = settings.address
    try:  # the address's own fault first: "not on this machine" would mislead
        check_address(address)
    except AddressError as exc:
        raise live.UserError(f"Local service not started: {exc}") from None
    if not is_loopback(address):
        raise live.UserError(
            f"A local service listens on the Service Address, which must be on this machine "
            f"(e.g. tcp://127.0.0.1:5555), not {address}"
        )
    if settings.client_key or settings.server_key:
        raise live.UserError(
            "A local service has no CURVE keys: clear the Client Key and the Server Key in "
            "the preferences to use one"
        )
    if settings.problem:  # e.g. a wildcard port: the service would listen where no one asks
        raise live.UserError(f"Local service not started: {settings.problem}")
    if not live.service_process().poll().alive and address_in_use(address):
        raise live.UserError(
            f"Local service not started: something already listens on {address} (another "
            "service? Check Service says which). Stop it, or set another Service Address"
        )
    try:
        argv = serve_command(
            absolute_path(prefs.service_python),
            absolute_path(prefs.service_checkpoint),
            address,
            *prefs.service_device_arguments(),
        )
        process_state = live.service_process().start(
            argv, env=child_environment(dict(os.environ)), log_name=log_name_for(address)
        )
    except ServiceProcessError as exc:
        where = live.state.local_address
        if live.service_process().poll().alive and where != address:
            exc = f"{exc} on {where}: Stop it to start one on {address}"
        raise live.UserError(f"Local service not started: {exc}") from None
    live.wait_for_local_service(address)
    live.state.next_probe = time.monotonic() + 0.5
    live.state.service_line = ""
    runtime.ensure_timer()
    feedback.set_message(f"Local service {process_state.describe()}; loading the model...")


def stop_service(*, wait: bool = False) -> None:
    if live.state.process is None:
        return
    process_state = live.state.process.stop(wait=wait)
    if live.state.waiting_ready:
        live.stop_waiting_for_local_service(
            ErrorCode.CANCELLED, "cancelled: the local service was stopped before it was ready"
        )
    live.state.stopping = process_state.alive
    if process_state.alive:
        runtime.ensure_timer()  # polls it, so that one that ignores the request is killed in time
    feedback.set_message(f"Local service {process_state.describe()}")


def local_service_state():
    """The local process's state (``core.service_process.ProcessState``), polled now."""
    return live.service_process().poll()
