"""The add-on's live state in this Blender session: one Dispatcher (one Session), the local
service process when one was started here, the outcomes waiting to be applied, and what the
panel shows. ``runtime.unregister`` resets it.

Also what sending a request needs, both from the operators (``sending``) and from the timer's
probe of a loading local service (``runtime``): the service to ask (``service_for``), and the
errors sending raises (``UserError``, ``SEND_ERRORS``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shared_protocol.address import AddressError
from shared_protocol.protocol import ErrorCode, ProtocolError

from ..core.batch_plan import BatchRun
from ..core.dispatch import BusyError, Dispatcher, PoseJob
from ..core.netpolicy import curve_keys
from ..core.service_process import ServiceProcess
from ..core.session import Service
from ..preferences import service_settings, user_data_dir


class UserError(Exception):
    """Something the user has to fix; operators report the message."""


@dataclass
class State:
    dispatcher: Dispatcher | None = None
    process: ServiceProcess | None = None
    backlog: deque = field(default_factory=deque)
    message: str = ""
    level: str = "INFO"  # INFO, WARNING, ERROR
    message_of_ready_local: bool = False  # the message says the local service is ready
    service_line: str = ""  # what the last status check said
    service_line_instance: str | None = None  # the local service's it was, if it was
    service_line_address: str = ""  # the address it was of
    waiting_ready: bool = False  # a local service was started and has not answered yet
    address_left_local: bool = False  # meanwhile, the Service Address was set to another
    local_address: str = ""  # where the local service was started to listen
    stopping: bool = False  # the local service was asked to stop and is still there
    next_probe: float = 0.0
    status_bar: tuple | None = None  # (text, each window's workspace) the status bar shows
    # Popups a timer tick asked for, shown as one when it ends (None: outside a tick): a
    # service that dies with five requests in flight is one popup, not five.
    popups: list | None = None
    # What file_handlers._on_save_pre changed for the answers still to come, for _on_save_post
    # to take back: (scene name, its session uid, its history's length and its prompt before).
    restore_after_save: list = field(default_factory=list)
    saves_running: int = 0  # a handler of another add-on may save (a backup) within a save
    # Batch lines the next pass keys at most (runtime.lines_within_budget); None: not measured.
    lines_per_group: int | None = None
    # An undo or redo since the timer's last call, which may have taken back a batch's lines.
    undone: bool = False


state = State()


def dispatcher() -> Dispatcher:
    if state.dispatcher is None:
        state.dispatcher = Dispatcher()
    return state.dispatcher


def service_process() -> ServiceProcess:
    if state.process is None:
        state.process = ServiceProcess(user_data_dir())
    return state.process


def last_message() -> tuple[str, str]:
    """(text, level) of the last thing the add-on had to say; when that was the local
    service's being ready and it has exited since (while Blender was idle: nothing else
    watches it then), how it ended."""
    if state.message_of_ready_local and state.process is not None:
        if not state.process.poll().alive:
            return f"Local service {local_service_ended()}", "ERROR"
    return state.message, state.level


def local_service_ended() -> str:
    """How the local service started here ended, and where its log is: "exited with code 1;
    its log: PATH"."""
    process = service_process()
    return f"{process.poll().describe()}; its log: {process.log_path}"


UNAVAILABLE = "unavailable: "  # how service_line says a status check failed


def service_line(address: str) -> str:
    """What the last status check said of the service at ``address``; "" when it was of
    another address, or once the local service it was of has exited, stopped or been started
    again: it no longer holds."""
    if address != state.service_line_address:
        return ""
    checked = state.service_line_instance
    if checked is not None:
        process = service_process()
        if process.instance != checked or not process.poll().alive:
            return ""
    return state.service_line


def waiting_for_service() -> bool:
    return state.waiting_ready


def wait_for_local_service(address: str) -> None:
    """A local service was started on ``address``: until it answers, pose and batch requests
    to it wait, unsent (``Dispatcher.hold_for``)."""
    state.waiting_ready, state.local_address = True, address
    state.address_left_local = False
    dispatcher().hold_for(address)


def local_service_ready() -> None:
    """The local service answered: the requests that waited for it go."""
    state.waiting_ready = False
    dispatcher().release_held()


def stop_waiting_for_local_service(code: ErrorCode, message: str) -> None:
    """The wait for the local service ends without it (it exited, was stopped, or the Service
    Address changed): the requests that waited for it fail with ``message``."""
    state.waiting_ready = False
    if state.dispatcher is not None:
        state.dispatcher.fail_held(code, message)


def current_batch() -> BatchRun | None:
    return state.dispatcher.batch if state.dispatcher is not None else None


def batch_progress(run: BatchRun) -> str:
    """The run's progress line, for the panel and the status bar; while its request waits for
    the local service to load its model, saying so."""
    if state.dispatcher is not None and state.dispatcher.holding:
        return f"{run.status_text()} (waiting for the local service to load its model)"
    return run.status_text()


def pending_jobs() -> list[PoseJob]:
    return state.dispatcher.pending_jobs() if state.dispatcher is not None else []


def pending_requests() -> list[tuple[str, PoseJob]]:
    return state.dispatcher.pending_requests() if state.dispatcher is not None else []


def batch_running() -> bool:
    return state.dispatcher is not None and state.dispatcher.batch_running


def busy() -> bool:
    d = state.dispatcher
    return bool(d is not None and d.busy) or batch_running() or bool(state.backlog)


# What sending can raise for the user to read: input the protocol refuses, a busy session, an
# address ZeroMQ will not take.
SEND_ERRORS = (ProtocolError, BusyError, AddressError)


def send_problem(exc: Exception) -> str:
    """What one of ``SEND_ERRORS`` says for a message: a protocol error without its code (an
    animator reads "the prompt has ...", not "too_large: ...")."""
    return exc.message if isinstance(exc, ProtocolError) else str(exc)


def service_for(context) -> Service:
    """The service to ask, from the preferences; UserError when it cannot be asked."""
    settings = service_settings(context)
    if settings.problem:
        raise UserError(settings.problem)
    try:
        curve = curve_keys(settings.client_key, settings.server_key)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return Service(settings.address, settings.timeout_s, curve)
