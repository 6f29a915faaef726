"""The add-on's live state in Blender: one Dispatcher (one Session) polled by one timer, the
optional local service process, and applying what comes back on the main thread.

Nothing here waits for the service. Operators queue requests and return; ``timer_tick`` (a
``bpy.app.timers`` callback, every ``TICK_INTERVAL_S`` while anything is in flight, removed when
idle) takes the session's events and applies them: poses onto armatures, exchanges into the
scene's chat history, batch lines keyed and recorded one by one. Each tick applies results for
at most ``TICK_BUDGET_S`` (always at least one), the rest on the next tick, so a burst of 256
batch items cannot freeze the UI.

Undo: results arrive outside any operator, so after applying a pose (or at the end of a batch)
the timer makes one undo step itself (``push_undo``, when Blender has an undo stack), as the last
operation; an answer is two undo steps, its exchange in the chat history and then its poses
(Ctrl+Z takes the pose back and keeps the exchange); one batch run is one undo step.
An undo step drops the steps the user undid, so while they can redo, answers wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import bpy

from shared_protocol.address import AddressError, check_address, is_loopback
from shared_protocol.batch_text import FileTooLargeError, prompt_lines, read_batch_file
from shared_protocol.protocol import ErrorCode, ProtocolError

from ..core import batch_plan, chat
from ..core.batch_plan import BatchRun, check_lines
from ..core.dispatch import (
    BatchEnded,
    BatchLineFailed,
    BatchLineReady,
    BusyError,
    Dispatcher,
    PoseAnswered,
    PoseFailed,
    PoseJob,
    StatusAnswered,
    StatusFailed,
)
from ..core.netpolicy import curve_keys
from ..core.service_process import (
    EXITED,
    ServiceProcess,
    ServiceProcessError,
    address_in_use,
    child_environment,
    log_name_for,
    serve_command,
)
from ..core.session import Service
from ..core.timeline import frames_for
from .anim import LockedCurveError, refuse_locked
from .armature import is_deleted, is_smpl_armature, why_not_smpl
from .batch_store import key_batch_lines, load_record, save_record, settle_batch_keys
from .people import apply_people, refuse_locked_people
from .posing import auto_key_options, pose_channels
from .props import append_history, history_messages, target_armature, target_problem

TICK_INTERVAL_S = 0.05
TICK_BUDGET_S = 0.025
PROBE_INTERVAL_S = 1.0
# Batch lines keyed in one pass at most: about 7 ms and a third of a millisecond a line after a
# long animation (docs/benchmarks.md), so that a pass stays near the timer's budget. Where
# keying is slower (lines between the keys of a long animation: 2 to 3 ms a line), the next
# pass takes fewer (``lines_within_budget``), to key within GROUP_BUDGET_S.
MAX_LINES_PER_GROUP = 32
GROUP_BUDGET_S = TICK_BUDGET_S
# Fewer lines than this a pass would key a long batch far slower (one line a pass: ten times)
# for little: a pass has a fixed part too.
MIN_LINES_PER_GROUP = 8


@dataclass(frozen=True)
class _BatchLines:
    """Consecutive ``BatchLineReady`` outcomes of one run."""

    items: list


class UserError(Exception):
    """Something the user has to fix; operators report the message."""


@dataclass
class _State:
    dispatcher: Dispatcher | None = None
    process: ServiceProcess | None = None
    backlog: deque = field(default_factory=deque)
    message: str = ""
    level: str = "INFO"  # INFO, WARNING, ERROR
    service_line: str = ""  # what the last status check said
    waiting_ready: bool = False  # a local service was started and has not answered yet
    local_address: str = ""  # where the local service was started to listen
    stopping: bool = False  # the local service was asked to stop and is still there
    next_probe: float = 0.0
    status_bar: bool = False
    # Popups a timer tick asked for, shown as one when it ends (None: outside a tick): a
    # service that dies with five requests in flight is one popup, not five.
    popups: list | None = None
    # What _on_save_pre changed for the answers still to come, for _on_save_post to take back:
    # (scene name, its session uid, its history's length and its prompt before).
    restore_after_save: list = field(default_factory=list)
    saves_running: int = 0  # a handler of another add-on may save (a backup) within a save
    lines_per_group: int = MAX_LINES_PER_GROUP  # batch lines the next pass keys at most


_state = _State()


# --- state ----------------------------------------------------------------------------------


def dispatcher() -> Dispatcher:
    if _state.dispatcher is None:
        _state.dispatcher = Dispatcher()
    return _state.dispatcher


def service_process() -> ServiceProcess:
    if _state.process is None:
        from ..preferences import user_data_dir

        _state.process = ServiceProcess(user_data_dir())
    return _state.process


def last_message() -> tuple[str, str]:
    """(text, level) of the last thing the add-on had to say."""
    return _state.message, _state.level


def service_line() -> str:
    return _state.service_line


def waiting_for_service() -> bool:
    return _state.waiting_ready


def current_batch() -> BatchRun | None:
    return _state.dispatcher.batch if _state.dispatcher is not None else None


def pending_jobs() -> list[PoseJob]:
    return _state.dispatcher.pending_jobs() if _state.dispatcher is not None else []


def refuse_chat_turn_yet(scene: bpy.types.Scene) -> None:
    """UserError while an exchange of ``scene`` (chat or pose mode: both go into its history)
    waits for its answer, or to be applied: a chat turn goes with the exchanges before it, and
    sent now would go without that one; the model would answer it blind."""
    asked = [job for job in pending_jobs() if job.scene_uid == scene.session_uid]
    came = [o.job for o in _state.backlog if isinstance(getattr(o, "job", None), PoseJob)]
    came = [job for job in came if job.scene_uid == scene.session_uid]
    if not asked and not came:
        return
    job = (asked or came)[0]
    named = repr((job.prompt or job.attachment)[:60])
    if asked:
        raise UserError(
            f"Waiting for the answer to {named}: a chat turn goes with the exchanges before "
            "it, so send this once that answer is in"
        )
    why = _why_answers_wait_now() or "it is applied on the next tick"
    raise UserError(
        f"The answer to {named} came and waits ({why}): a chat turn goes with the exchanges "
        "before it, so send this once it is applied"
    )


def busy() -> bool:
    d = _state.dispatcher
    return bool(d is not None and (d.busy or d.batch_running)) or bool(_state.backlog)


def set_message(text: str, level: str = "INFO", *, popup: bool = False) -> None:
    _state.message, _state.level = text, level
    if level != "INFO":
        print(f"ChatPose {level.lower()}: {text}")
    if popup and _state.popups is not None:
        _state.popups.append(text)
    elif popup:
        _popup(text, level)


def notify(text: str, level: str = "INFO", *, popup: bool = False) -> None:
    """A message from the timer, where no operator of ours is running to report it: the
    panel's message (`set_message`), and Blender's reports (status bar, Info editor) through
    the internal operator CHATPOSE_OT_report."""
    set_message(text, level, popup=popup)
    try:
        with _window_override():
            bpy.ops.chatpose.report(level=level, message=text)
    except RuntimeError:
        pass  # background mode turns an ERROR report into this exception; it was printed


def _one_popup(texts: list[str]) -> str:
    """The popup of a tick that asked for `texts` (errors, in order): the first in full, and
    how many more the panel's history and the Info editor hold."""
    if len(texts) == 1:
        return texts[0]
    return f"{texts[0]}\n(and {len(texts) - 1} more: see the history and the Info editor)"


def _popup(text: str, level: str) -> None:
    """A popup where Blender has a window to show one (never in background mode)."""
    if bpy.app.background:
        return
    wm = bpy.context.window_manager
    if wm is None or not wm.windows:
        return
    lines = chat.wrap(text, 80)

    def draw(self, _context):
        for line in lines:
            self.layout.label(text=line)

    icon = "ERROR" if level == "ERROR" else "INFO"
    with contextlib.suppress(Exception):
        with _window_override():
            wm.popup_menu(draw, title="ChatPose", icon=icon)


# --- the timer ------------------------------------------------------------------------------


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.register(timer_tick, first_interval=TICK_INTERVAL_S, persistent=True)


def timer_tick() -> float | None:
    """The timer callback: collect events, apply results within the time budget, keep going
    while anything is in flight. Tests call it directly (headless Blender runs no timers)."""
    started = time.perf_counter()
    state = _state
    if state.dispatcher is not None:
        try:
            state.backlog.extend(state.dispatcher.tick())
        except Exception as exc:  # never let an exception unregister the timer silently
            traceback.print_exc()
            notify(f"ChatPose could not read the service's answers: {exc}", "ERROR")
    applied = 0
    deferred = state.backlog and _why_answers_wait_now()
    if deferred:
        count = _answers(state.backlog)  # none: a status reply or a batch's end waits alone
        waiting = f"{count} answer(s) waiting: {deferred}" if count else f"waiting: {deferred}"
        if state.message != waiting:  # said once, not redrawn on every tick
            set_message(waiting, "WARNING")
            _redraw()
    state.popups = []
    with _window_override():
        while (
            state.backlog
            and not deferred
            and (applied == 0 or time.perf_counter() - started < TICK_BUDGET_S)
        ):
            outcome = _next_outcome()
            applied += 1
            began = time.perf_counter()
            try:
                apply_outcome(outcome)
                if isinstance(outcome, _BatchLines):
                    state.lines_per_group = lines_within_budget(
                        len(outcome.items), time.perf_counter() - began
                    )
            except Exception as exc:
                traceback.print_exc()
                notify(f"ChatPose could not apply an answer: {exc}", "ERROR")
    popups, state.popups = state.popups, None
    if popups:
        _popup(_one_popup(popups), "ERROR")
    try:
        _watch_local_service()
        _update_status_bar()
    except Exception as exc:  # as above: the timer must go on
        traceback.print_exc()
        notify(f"ChatPose could not check the local service: {exc}", "ERROR")
    if applied:
        _redraw()
    if state.backlog and not deferred:
        return 0.001
    if busy() or state.waiting_ready or state.stopping:
        return TICK_INTERVAL_S
    return None


# Blender's modal tools that restore, on every move or on cancel, the keys or pose they started
# from (by operator prefix), and what the panel calls them.
_TOOLS_THAT_PUT_BACK = {
    "transform": "transform",
    "graph": "Graph Editor tool",
    "action": "Dope Sheet tool",
    "pose": "pose slider",
    "poselib": "pose asset blend",
}


def why_answers_wait(
    mode: str, interface_locked: bool, running_tools: Sequence[str], can_redo: bool = False
) -> str | None:
    """What must end before answers are applied, as the panel says it; None when they can be
    applied now. In an edit or paint mode, creating people would end the user's session, and
    its undo step would not hold the armature. Under a running transform (a G, R or S drag),
    the tool would overwrite an answer when confirmed and take it back when cancelled; so
    would Blender's animation sliders (the Graph Editor's Smooth or Ease, the Dope Sheet's,
    the pose sliders Push, Relax, Breakdown, and the Pose Library's blend of a pose asset),
    which put back the keys or pose they started from at every move: a batch's keys landing
    then would be erased, yet recorded as keyed. While a render locks the interface, data
    must not change from a timer. While the user has undone steps (`can_redo`), an answer's
    undo step would drop them for good. Other modal tools (an add-on's that runs all session
    long) do not hold answers back."""
    if mode not in {"OBJECT", "POSE"}:
        return f"leave {mode.replace('_', ' ').title()} mode to apply them"
    for editor, what in _TOOLS_THAT_PUT_BACK.items():
        if any(tool.lower().startswith((f"{editor}_ot_", f"{editor}.")) for tool in running_tools):
            return f"they are applied when the {what} ends"
    if interface_locked:
        return "they are applied when the render ends (the interface is locked)"
    if can_redo:
        return (
            "you have undone steps, which applying them would drop: redo (Ctrl+Shift+Z) or "
            "make a change, and they are applied"
        )
    return None


def _why_answers_wait_now() -> str | None:
    """`why_answers_wait` for the user's window (the timer itself has none)."""
    with _window_override():
        context = bpy.context
        wm = context.window_manager
        windows = list(wm.windows) if wm is not None else []
        tools = [op.bl_idname for w in windows for op in w.modal_operators]
        locked = wm is not None and wm.is_interface_locked
        return why_answers_wait(context.mode, locked, tools, _can_redo())


def _can_redo() -> bool:
    try:
        return bpy.ops.ed.redo.poll()
    except RuntimeError:  # no window to ask in
        return False


def _answers(backlog) -> int:
    """How many of the outcomes waiting are answers to a request (a batch's end or a status
    reply is none)."""
    return sum(not isinstance(o, (BatchEnded, StatusAnswered, StatusFailed)) for o in backlog)


def _next_outcome():
    """The next outcome of the backlog; batch lines of one run that wait next to each other
    come as one ``_BatchLines`` group, keyed in one pass."""
    backlog = _state.backlog
    first = backlog.popleft()
    if not isinstance(first, BatchLineReady):
        return first
    group = [first]
    while (
        backlog
        and len(group) < min(_state.lines_per_group, MAX_LINES_PER_GROUP)
        and isinstance(backlog[0], BatchLineReady)
        and backlog[0].run is first.run
    ):
        group.append(backlog.popleft())
    return _BatchLines(group)


def lines_within_budget(keyed: int, seconds: float) -> int:
    """How many batch lines the next pass may key to stay within ``GROUP_BUDGET_S``, given
    that ``keyed`` took ``seconds``: from ``MIN_LINES_PER_GROUP`` to ``MAX_LINES_PER_GROUP``.
    It aims at four fifths of the budget: a pass costs a part that does not shrink with its
    lines, so fewer lines save less than their share."""
    if seconds <= 0:
        return MAX_LINES_PER_GROUP
    fitting = int(keyed * 0.8 * GROUP_BUDGET_S / seconds)
    return max(min(MIN_LINES_PER_GROUP, MAX_LINES_PER_GROUP), min(MAX_LINES_PER_GROUP, fitting))


def _window_override():
    """A context with a window for operators run from the timer (which has none)."""
    context = bpy.context
    wm = context.window_manager
    if context.window is not None or wm is None or not wm.windows:
        return contextlib.nullcontext()
    window = wm.windows[0]
    return context.temp_override(window=window, screen=window.screen)


def _redraw() -> None:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            area.tag_redraw()


def _set_status_text(text: str | None) -> None:
    """The status bar's text in every window. Blender writes it to the workspace of the
    context's window, whichever workspace it is called on: each window is made the context's
    in turn (a second main window showed nothing). A workspace no window shows when the batch
    ends keeps its last text until a tool there sets its own."""
    wm = bpy.context.window_manager
    for window in wm.windows if wm is not None else ():
        with contextlib.suppress(Exception):
            with bpy.context.temp_override(window=window, screen=window.screen):
                window.workspace.status_text_set(text)


def _update_status_bar() -> None:
    run = current_batch()
    if run is not None and not run.closed:
        _set_status_text(run.status_text())
        _state.status_bar = True
    elif _state.status_bar:
        _set_status_text(None)
        _state.status_bar = False


_pushing_undo = False


def pushing_undo() -> bool:
    """Whether `push_undo` is running an undo step operator (any other run is a repeat)."""
    return _pushing_undo


def push_undo(step: str) -> None:
    """One undo step for what the timer just applied (see the module docstring): `step` is
    "answer" (poses applied), "chat" (the chat history alone) or "batch" (a batch run), the
    step's name in the Undo History. Not `ed.undo_push`: that step would not be Blender's last
    operation, and "Adjust Last Operation" on the user's previous operator undoes back to
    before that operator's own step, so it would take the answer with it for good. The step
    comes from running an internal registered operator with undo
    (`chat_operators.CHATPOSE_OT_answer_step` and its siblings), which becomes the last
    operation, with nothing to adjust."""
    global _pushing_undo
    operator = getattr(bpy.ops.chatpose, f"{step}_step")
    with contextlib.suppress(RuntimeError), _window_override():
        if bpy.ops.ed.undo_push.poll():  # an undo stack to push onto
            _pushing_undo = True
            try:
                operator("EXEC_DEFAULT", True)  # True: an undo step
            finally:
                _pushing_undo = False


# --- requests -------------------------------------------------------------------------------


# What sending can raise for the user to read: input the protocol refuses, a busy session, an
# address ZeroMQ will not take.
SEND_ERRORS = (ProtocolError, BusyError, AddressError)


def service_for(context) -> Service:
    """The service to ask, from the preferences; UserError when it cannot be asked."""
    from ..preferences import service_settings

    settings = service_settings(context)
    if settings.problem:
        raise UserError(settings.problem)
    try:
        curve = curve_keys(settings.client_key, settings.server_key)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return Service(settings.address, settings.timeout_s, curve)


def send_pose(
    context: bpy.types.Context, prompt: str, images: Sequence[bytes] = (), attachment: str = ""
) -> PoseJob:
    """Queues a pose (or chat) request with the scene's settings; UserError when it cannot be
    sent (no armature, bad address, input the protocol refuses)."""
    from ..preferences import get_preferences

    scene = context.scene
    settings = scene.chatpose
    target = target_armature(context)
    if target is None:
        raise UserError(target_problem(context))
    prompt = prompt.strip()
    if not prompt and not images:
        raise UserError("Type a prompt first")
    service = service_for(context)
    mode = "chat" if settings.chat_mode else "pose"
    history = ()
    if settings.chat_mode:
        # The history holds an exchange once its answer is in: a turn sent before would go
        # without the one before it, and the model would answer it blind.
        refuse_chat_turn_yet(scene)
        prefs = get_preferences(context)
        pairs = prefs.history_pairs if prefs is not None else chat.DEFAULT_MAX_PAIRS
        history = chat.history_turns(history_messages(scene), max_pairs=pairs)
    frame = None
    if settings.insert_keyframe:
        frame = scene.frame_current if settings.key_current_frame else settings.key_frame
    auto_key = not settings.insert_keyframe and scene.tool_settings.use_keyframe_insert_auto
    if auto_key:  # as Blender's own tools key a pose
        frame = scene.frame_current
    job = PoseJob(
        prompt=prompt,
        mode=mode,
        scene=scene.name,
        scene_uid=scene.session_uid,
        armature=target.name,
        armature_uid=target.session_uid,
        frame=frame,
        auto_key=auto_key,
        use_translation=settings.use_translation,
        attachment=attachment,
        spacing=settings.person_spacing,
    )
    try:
        dispatcher().send_pose(service, job, images, history)
    except SEND_ERRORS as exc:
        raise UserError(f"Not sent: {exc}") from None
    ensure_timer()
    what = f"'{prompt}'" if prompt else "the image"
    set_message(f"Asked the service for {what} ({mode} mode)")
    return job


def read_batch_lines(context: bpy.types.Context) -> tuple[list[tuple[int, str]], str]:
    """(its (line number, prompt) pairs, source label) of the scene's batch source; UserError
    when there is none."""
    settings = context.scene.chatpose
    if settings.batch_source == "TEXT":
        text = settings.batch_text
        if text is None:
            raise UserError("Pick a text datablock with one prompt per line")
        content, label = text.as_string(), f"text '{text.name}'"
    else:
        from ..preferences import absolute_path

        path = absolute_path(settings.batch_file)
        if not settings.batch_file:
            raise UserError("Pick a .txt file with one prompt per line")
        try:
            content = read_batch_file(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not UTF-8 text ({exc.reason})") from None
        except FileTooLargeError as exc:
            raise UserError(f"{path} is {exc}") from None
        except OSError as exc:
            raise UserError(f"{path} could not be read ({exc.strerror or exc})") from None
        label = bpy.path.basename(path)
    lines = prompt_lines(content)
    if not lines:
        raise UserError(f"{label} has no prompts (one per line)")
    try:
        check_lines(lines)
    except ValueError as exc:
        raise UserError(f"{label}: {exc}") from None
    return lines, label


def _frames(entries) -> str:
    return ", ".join(str(e.frame) for e in entries[:5]) + (" ..." if len(entries) > 5 else "")


def start_batch(context: bpy.types.Context) -> BatchRun:
    """Plans and sends a batch for the lines of the scene's batch source not keyed yet on the
    target armature. The returned run is already ended when nothing was pending."""
    settings = context.scene.chatpose
    if dispatcher().batch_running:
        raise UserError("A batch is running: cancel it or wait for it to finish")
    target = target_armature(context)
    if target is None:
        raise UserError(target_problem(context))
    numbered, label = read_batch_lines(context)
    lines = [prompt for _, prompt in numbered]
    try:
        frames_for(len(lines), settings.batch_start, settings.batch_step)
    except ValueError as exc:
        raise UserError(f"Batch not sent: {label}: {exc}") from None
    try:  # found now, not once the service has computed every line
        refuse_locked(target, pose_channels(target, settings.batch_translation))
    except LockedCurveError as exc:
        raise UserError(f"Batch not sent: {exc}") from None
    try:
        record = load_record(target)
    except ValueError as exc:
        raise UserError(
            f"The batch record on {target.name} is damaged ({exc}); use Clear Batch Record"
        ) from None
    gone = record.past_the_end(len(lines))
    keys_left_note = ""
    if gone:  # lines deleted from the text: forget them (once the run starts), keys left alone
        record = record.without_lines(entry.line for entry in gone)
        keys_left_note = (
            f"; {len(gone)} recorded line(s) are no longer in the text, their keys (frame "
            f"{_frames(gone)}) are left as they are"
        )
    pending = record.pending(
        lines, settings.batch_start, settings.batch_step, settings.batch_translation
    )
    if settings.batch_translation:  # said, as it replaces the rotation keys of those lines
        pending_without = record.pending(lines, settings.batch_start, settings.batch_step)
        without = len(pending) - len(pending_without)
        if without:
            keys_left_note += (
                f"; {without} line(s) keyed without Translation are keyed again with it"
            )
    moved = record.moved(lines, settings.batch_start, settings.batch_step)
    if moved:  # Start or Step changed: keyed again at the new frames
        new_frames = set(frames_for(len(lines), settings.batch_start, settings.batch_step))
        replaced = [entry for entry in moved if entry.frame in new_frames]
        kept = [entry for entry in moved if entry.frame not in new_frames]
        keys_left_note += (
            f"; Start or Step changed since {len(moved)} line(s) were keyed, so they are keyed "
            "at their new frames"
        )
        if replaced:
            keys_left_note += (
                f"; other lines now go where {len(replaced)} old key(s) are (frame "
                f"{_frames(replaced)}), and replace them"
            )
        if kept:
            keys_left_note += f"; the old keys at frame {_frames(kept)} are left as they are"
    run = BatchRun(
        armature=target.name,
        source=label,
        pending=pending,
        total_lines=len(lines),
        use_translation=settings.batch_translation,
        armature_uid=target.session_uid,
        take=_TakePin.at_start(target),
        line_numbers=[number for number, _ in numbered],
    )
    if not pending:
        dispatcher().start_batch(None, run)  # records it as the last run, sends nothing
        if gone:
            save_record(target, record)
        set_message(
            f"All {len(lines)} lines of {label} are keyed on {target.name} already{keys_left_note}"
        )
        return run
    service = service_for(context)
    try:
        dispatcher().start_batch(service, run)
    except SEND_ERRORS as exc:
        raise UserError(f"Batch not sent: {exc}") from None
    if gone:  # not before: a run that did not start would lose the note for the next one
        save_record(target, record)
    ensure_timer()
    skipped = run.already_keyed
    note = f" ({skipped} keyed before)" if skipped else ""
    set_message(
        f"Batch from {label}: {len(pending)} lines to key on {target.name}{note}, "
        f"in {run.planned_requests} request(s){keys_left_note}"
    )
    _update_status_bar()
    return run


def cancel() -> int:
    """Cancels the running batch and the pose requests in flight; how many were cancelled."""
    d = _state.dispatcher
    if d is None:
        return 0
    count = d.cancel_all()
    if count:
        set_message(f"Cancelling {count} request(s)...", "WARNING")
    return count


def request_status(context: bpy.types.Context) -> None:
    service = service_for(context)
    try:
        dispatcher().request_status(service)
    except SEND_ERRORS as exc:
        raise UserError(f"Not asked: {exc}") from None
    ensure_timer()
    set_message(f"Asking {service.address} for its status...")


# --- results --------------------------------------------------------------------------------


def apply_outcome(outcome) -> None:
    match outcome:
        case PoseAnswered():
            _pose_answered(outcome)
        case PoseFailed():
            _pose_failed(outcome)
        case StatusAnswered():
            status = outcome.status
            _state.service_line = (
                f"{status.model} on {status.device} ({status.dtype}), "
                f"chatpose {status.version}, images: {status.max_images}"
            )
            if not outcome.job.probe:
                notify(f"Service: {_state.service_line}")
            elif status.instance in (None, service_process().instance):  # None: an older one
                _state.waiting_ready = False
                notify(f"Local service ready: {_state.service_line}")
            # Else another service listens there, where ours is failing to (it exits, and
            # _watch_local_service says why).
        case StatusFailed():
            if not outcome.job.probe:
                message = outcome.message + _why_unreachable(outcome.code)
                _state.service_line = f"unavailable: {message}"
                notify(f"Service: {message}", "ERROR")
        case BatchLineReady():
            _batch_lines([outcome])
        case _BatchLines():
            _batch_lines(outcome.items)
        case BatchLineFailed():
            pass  # counted by the run; reported when it ends
        case BatchEnded():
            _batch_ended(outcome.run)


def _pose_answered(outcome: PoseAnswered) -> None:
    job, poses = outcome.job, outcome.poses
    scene = _find(bpy.data.scenes, job.scene, job.scene_uid)
    if scene is not None:
        append_history(
            scene,
            chat.exchange(job.prompt, outcome.text, attachment=job.attachment, poses=len(poses)),
        )
    # The exchange is a step of its own, before the poses': undoing a pose the animator does
    # not want keeps it, and chat mode's context with it. Pushed once what the answer does is
    # known, so that a refused answer, its prompt given back, is one step.
    chat_step = (lambda: push_undo("chat")) if scene is not None else (lambda: None)
    cut = (
        "; the reply was cut at the service's limit of new tokens (chatpose-serve "
        "--max-new-tokens), before the model ended it"
        if outcome.truncated
        else ""
    )
    if not poses:
        chat_step()  # else the next undo would take the reply away
        text = f"Reply without a pose: {chat.clean_text(outcome.text)[:120]}{cut}"
        notify(text, "WARNING" if cut else "INFO")
        return
    try:
        target = _find(bpy.data.objects, job.armature, job.armature_uid)
        problem = _armature_problem(job.armature, target)
        if problem is not None:
            problem += "; the answer was not applied"
        frame, unkeyed = job.frame, ""
        # The model's poses carry no translation: the location is then neither set nor keyed.
        use_translation = job.use_translation and any(p.translation is not None for p in poses)
        if problem is None and frame is not None:
            try:  # before any change
                refuse_locked_people(target, len(poses), use_translation)
            except LockedCurveError as exc:
                if job.auto_key:  # posed as Blender's Auto Keying poses it: unkeyed
                    frame, unkeyed = None, f"; not keyed (Auto Keying): {exc}"
                else:
                    problem = f"the answer was not applied to {target.name!r}: {exc}"
    except BaseException:
        chat_step()
        raise
    if problem is not None:
        if scene is not None:
            _give_prompt_back(scene, job.prompt)
        chat_step()
        notify(f"{problem[0].upper()}{problem[1:]}", "ERROR", popup=True)
        return
    chat_step()
    try:
        result = apply_people(
            bpy.context,
            target,
            poses,
            frame=frame,
            use_translation=use_translation,
            spacing=job.spacing,
            key_options=auto_key_options(bpy.context) if job.auto_key else frozenset(),
        )
    except Exception:  # half way: what did change is one undo step, not part of the user's next
        push_undo("answer")
        raise
    push_undo("answer")
    where = ", ".join(
        name + (" (new)" if name in result.created else "") for name in result.armatures
    )
    text = f"Applied {len(result.armatures)} pose(s) to {where}"
    if result.keyed_frame is not None:
        text += f", keyed at frame {result.keyed_frame}"
    elif frame is not None:  # Auto Keying's Replace mode or Only Insert Available
        text += (
            f"; not keyed at frame {frame}: Auto Keying keys only what is keyed already (its "
            "Replace mode, or Only Insert Available), and nothing there is"
        )
    level = "WARNING" if unkeyed else "INFO"
    text += unkeyed
    if result.skipped:
        text += f"; not applied: {', '.join(result.skipped)} (the name is taken)"
        level = "WARNING"
    if result.non_quaternion_bones:
        text += f"; {len(set(result.non_quaternion_bones))} bone(s) converted to their mode"
    if result.notes:
        text += "; " + "; ".join(result.notes)
        level = "WARNING"
    if cut:
        text, level = text + cut, "WARNING"
    notify(text, level)


def _armature_problem(name: str, obj: bpy.types.Object | None) -> str | None:
    """Why a request's armature (``name`` when it went out; ``obj`` now) cannot be posed: the
    user deleted it, or changed it into something that is no SMPL armature; None when it can."""
    if obj is None or is_deleted(obj):
        return f"the armature {name!r} is gone"
    if not is_smpl_armature(obj):
        return f"the armature {obj.name!r} is no longer an SMPL armature: {why_not_smpl(obj)}"
    return None


def _find(collection, name: str, uid: int | None):
    """A request's armature or scene in `collection` (bpy.data.objects, .scenes): by session
    id, so that renaming it (or naming another one like it) while the answer is on its way
    changes nothing; by name without one."""
    if uid is None:
        return collection.get(name)
    named = collection.get(name)  # not renamed, as a rule: no scan of every object
    if named is not None and named.session_uid == uid:
        return named
    return next((item for item in collection if item.session_uid == uid), None)


def _pose_failed(outcome: PoseFailed) -> None:
    job = outcome.job
    message = outcome.message + _why_unreachable(outcome.code)
    if job.attachment and message.startswith("images[0]: "):  # the user knows it by its name
        message = f"{job.attachment}: {message.removeprefix('images[0]: ')}"
    scene = _find(bpy.data.scenes, job.scene, job.scene_uid)
    if scene is not None:
        append_history(
            scene, chat.exchange(job.prompt, message, attachment=job.attachment, failed=True)
        )
        _give_prompt_back(scene, job.prompt)
        push_undo("chat")
    if outcome.code == ErrorCode.CANCELLED:  # the user's own Cancel: said, not alarmed
        notify(f"Cancelled: {job.prompt or job.attachment or 'the request'}")
        return
    notify(f"Request failed ({outcome.code.value}): {message}", "ERROR", popup=True)


def _give_prompt_back(scene: bpy.types.Scene, prompt: str) -> None:
    """Puts an unanswered prompt back in the field, to send again; never over what was typed
    since."""
    if prompt and not scene.chatpose.prompt.strip():
        scene.chatpose.prompt = prompt


def _why_unreachable(code: ErrorCode) -> str:
    """What the local service started here says about a failure: still loading, or how it
    ended, for an unreachable service; where its log is, for an internal error (whose message
    says "see the service log"); "" otherwise."""
    if code == ErrorCode.INTERNAL_ERROR:
        return _local_service_log()
    if code != ErrorCode.UNREACHABLE:
        return ""
    if _state.waiting_ready:
        return " (the local service is still starting; try again when it is ready)"
    return _local_service_exit()


def _local_service_exit() -> str:
    """Why the local service started here is gone, to add to a failure; "" when it is not."""
    if _state.process is None:
        return ""
    state = _state.process.poll()
    if state.state != EXITED:
        return ""
    return f" (the local service {state.describe()}; its log: {_state.process.log_path})"


def _local_service_log() -> str:
    """Where the log of the local service started here is, to add to a failure; "" when none
    was started."""
    if _state.process is None or _state.process.pid is None:
        return ""
    return f" (the local service's log: {_state.process.log_path})"


def _batch_lines(outcomes: list[BatchLineReady]) -> None:
    """Keys and records lines of one run (keys first, then the record: see batch_store)."""
    run = outcomes[0].run
    obj = _find(bpy.data.objects, run.armature, run.armature_uid)
    problem = _batch_target_problem(run, obj)
    if problem is None and run.take is not None:
        problem = run.take.moved(obj)
    if problem is not None:
        for outcome in outcomes:
            run.item_failed(outcome.line, problem)
        run.stop(problem)
        dispatcher().cancel_batch()
        return
    items = [(o.line, o.poses[0]) for o in outcomes]
    try:
        key_batch_lines(obj, items, use_translation=run.use_translation)
    except Exception as exc:
        for line, _ in items:
            run.item_failed(line, f"could not key it ({exc})")
        if isinstance(exc, LockedCurveError):  # locked during the run: no later line keys
            run.stop(str(exc))
            dispatcher().cancel_batch()
        return
    if run.take is not None:
        run.take = run.take.kept(obj)
    for line, _ in items:
        run.item_keyed(line)
    if _file_saved():  # saved during the run: marked changed again, or quitting would not ask
        push_undo("batch")


def _file_saved() -> bool:
    """Whether the .blend is saved as it is: Blender marks it changed only with an undo step,
    which a batch makes at its end."""
    return not bpy.data.is_dirty


@dataclass(frozen=True)
class _TakePin:
    """The take a batch run keys: its action, known by its session id (which a rename keeps)
    or by its name (which an undo keeps, giving the action back under another id), and the
    action's slot for the armature; and the actions the file had when the run started, so
    that one assigned since (someone's take) is told from one made since (by the run's first
    keys, or an answer keyed meanwhile)."""

    action: str | None
    uid: int | None
    slot: str | None
    existing: frozenset[str]

    @classmethod
    def at_start(cls, obj: bpy.types.Object) -> _TakePin:
        return cls(*_action_and_slot(obj), frozenset(a.name for a in bpy.data.actions))

    def kept(self, obj: bpy.types.Object) -> _TakePin:
        """The pin once the run's keys went in: onto the take they made, when it had none, and
        the take's name and id as they are now."""
        action, uid, slot = _action_and_slot(obj)
        return dataclasses.replace(self, action=action, uid=uid, slot=slot)

    def moved(self, obj: bpy.types.Object) -> str | None:
        """Why the run's next keys would go into another take than its own, or None. With no
        action now (undone, pushed down to the NLA) they make a new take and replace nothing."""
        action, uid, slot = _action_and_slot(obj)
        if action is None:
            return None
        same = self.action is not None and (uid == self.uid or action == self.action)
        if same and self.slot in (None, slot):
            return None
        if self.action is None and action not in self.existing:
            return None  # made since the run started
        keyed = f"the take '{self.action}'" if self.action else "an armature without a take"
        return (
            f"the armature now shows the take '{action}', and this run was keying {keyed} "
            "(its lines go into no other take: put that one back to key the rest there)"
        )


def _action_and_slot(obj: bpy.types.Object) -> tuple[str | None, int | None, str | None]:
    """The object's action's name and session id, and its slot's identifier (Nones)."""
    anim = obj.animation_data
    action = anim.action if anim is not None else None
    if action is None:
        return None, None, None
    slot = getattr(anim, "action_slot", None)
    return action.name, action.session_uid, slot.identifier if slot is not None else None


def _batch_target_problem(run: BatchRun, obj: bpy.types.Object | None) -> str | None:
    """Why the run's armature can take no more lines, or None; its name in the run's reports
    becomes the one it has now (the user may rename it during a run)."""
    if obj is not None and not is_deleted(obj):
        run.armature = obj.name
    return _armature_problem(run.armature, obj)


def _settle_batch(run: BatchRun) -> None:
    """What keying a run's lines left for later (``batch_store.settle_batch_keys``): done at
    its end, and before the file is saved or the add-on disabled during it."""
    obj = _find(bpy.data.objects, run.armature, run.armature_uid)
    settle_batch_keys(obj if obj is not None and not is_deleted(obj) else None)


def _settle_running_batch() -> None:
    d = _state.dispatcher
    if d is not None and d.batch_running:
        with contextlib.suppress(ValueError):  # a damaged record: the run's end reports it
            _settle_batch(d.batch)


def _batch_ended(run: BatchRun) -> None:
    obj = _find(bpy.data.objects, run.armature, run.armature_uid)
    with contextlib.suppress(ValueError):  # a damaged record: the next run reports it
        _settle_batch(run)  # every take it keyed, its own moved away or not
    if _batch_target_problem(run, obj) is None and (run.take is None or not run.take.moved(obj)):
        with contextlib.suppress(ValueError):
            record = load_record(obj)
            run.recheck(
                lambda line: record.is_keyed(line.line, line.text, line.frame, run.use_translation)
            )
    run.close()
    if run.keyed:
        push_undo("batch")
    if run.state == batch_plan.FAILED and run.remaining:  # else the summary says done: it is
        level, popup = "ERROR", True
    elif run.remaining:
        level, popup = "WARNING", False
    else:
        level, popup = "INFO", False
    summary = run.summary() + (_local_service_exit() if run.state == batch_plan.FAILED else "")
    notify(summary, level, popup=popup)
    _update_status_bar()


# --- the local service ----------------------------------------------------------------------


def start_service(context: bpy.types.Context) -> None:
    from ..preferences import absolute_path, get_preferences, service_settings

    prefs = get_preferences(context)
    if prefs is None:
        raise UserError("The add-on's preferences are not available")
    settings = service_settings(context)
    address = settings.address
    try:  # the address's own fault first: "not on this machine" would mislead
        check_address(address)
    except AddressError as exc:
        raise UserError(f"Local service not started: {exc}") from None
    if not is_loopback(address):
        raise UserError(
            f"A local service listens on the Service Address, which must be on this machine "
            f"(e.g. tcp://127.0.0.1:5555), not {address}"
        )
    if settings.client_key or settings.server_key:
        raise UserError(
            "A local service has no CURVE keys: clear the Client Key and the Server Key in "
            "the preferences to use one"
        )
    if settings.problem:  # e.g. a wildcard port: the service would listen where no one asks
        raise UserError(f"Local service not started: {settings.problem}")
    if not service_process().poll().alive and address_in_use(address):
        raise UserError(
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
        state = service_process().start(
            argv, env=child_environment(dict(os.environ)), log_name=log_name_for(address)
        )
    except ServiceProcessError as exc:
        raise UserError(f"Local service not started: {exc}") from None
    _state.waiting_ready = True
    _state.local_address = address
    _state.next_probe = time.monotonic() + 0.5
    _state.service_line = ""
    ensure_timer()
    set_message(f"Local service {state.describe()}; loading the model...")


def stop_service(*, wait: bool = False) -> None:
    if _state.process is None:
        return
    state = _state.process.stop(wait=wait)
    _state.waiting_ready = False
    _state.stopping = state.alive
    if state.alive:
        ensure_timer()  # polls it, so that one that ignores the request is killed in time
    set_message(f"Local service {state.describe()}")


def local_service_state():
    """The local process's state (``core.service_process.ProcessState``), polled now."""
    return service_process().poll()


def _watch_local_service() -> None:
    if _state.stopping:
        state = service_process().poll()  # kills it once the grace time is over
        if not state.alive:
            _state.stopping = False
            set_message(f"Local service {state.describe()}")
            _redraw()
    if not _state.waiting_ready:
        return
    state = service_process().poll()
    if not state.alive:
        _state.waiting_ready = False
        log = service_process().log_path
        notify(f"Local service {state.describe()}; its log: {log}", "ERROR", popup=True)
        return
    from ..preferences import service_settings

    address = service_settings(bpy.context).address
    if address != _state.local_address:  # the probe would ask elsewhere, and wait for ever
        _state.waiting_ready = False
        notify(
            f"The Service Address is now {address}; the local service started on "
            f"{_state.local_address} goes on there (Stop it, or set that address again)",
            "WARNING",
        )
        return
    d = dispatcher()
    if time.monotonic() >= _state.next_probe and not d.status_in_flight(probe=True):
        _state.next_probe = time.monotonic() + PROBE_INTERVAL_S
        with contextlib.suppress(UserError, *SEND_ERRORS):
            d.request_status(service_for(bpy.context), probe=True)


# --- file loads, unregister -----------------------------------------------------------------


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    """A file is about to be loaded: a save whose end was never reported is over by now. What
    is in flight waits for `_on_load_post`: the load may fail (a damaged file) and leave the
    file open as it was, its requests and batch still its own."""
    _state.saves_running = 0
    _state.restore_after_save.clear()


@bpy.app.handlers.persistent
def _on_load_post(*_args) -> None:
    """A file was loaded: answers in flight belong to the old one."""
    d = _state.dispatcher
    if d is None:  # nothing sent yet; what the panel said was of the old file
        set_message("")
        return
    # Their prompts are named: the prompt field they came from goes with the old file.
    jobs = [*d.pending_jobs(), *(o.job for o in _state.backlog if hasattr(o, "job"))]
    prompts = [job.prompt or job.attachment for job in jobs]
    run = d.batch if d.batch_running else None
    in_flight = d.cancel_all(forget=True)
    received = _answers(_state.backlog)  # answers that came but were not applied yet
    lines = sum(isinstance(o, BatchLineReady) for o in _state.backlog)
    _state.backlog.clear()
    if _state.status_bar:
        _set_status_text(None)
        _state.status_bar = False
    dropped = [
        f"{in_flight} request(s) in flight were cancelled" if in_flight else "",
        f"{received} answer(s) not yet applied were dropped" if received else "",
    ]
    if in_flight or received:
        asked = "; ".join(repr(p[:60]) for p in prompts[:3] if p) + (
            ", ..." if len(prompts) > 3 else ""
        )
        said = f" (asked: {asked})" if asked else ""
        if run is not None:  # its record says what is keyed: a rerun there keys the rest
            said += (
                f"; the batch from {run.source} on {run.armature} stopped with {run.remaining} of "
                f"{run.total_lines} lines still to key"
                + (f" ({lines} of them answered, not yet keyed)" if lines else "")
            )
        set_message(f"A file was loaded: {' and '.join(filter(None, dropped))}{said}", "WARNING")
    else:  # what it said was of the old file ("all lines keyed", after a Revert dropped them)
        set_message("")


# Written into a file saved while a request is on its way: a file opened later never gets
# that answer.
UNANSWERED_AT_SAVE = (
    "No answer applied yet when this file was saved; send it again if no pose came."
)
UNANSWERED_AT_DISABLE = "The add-on was disabled before this answer was applied; send it again."


def _unanswered(why: str) -> list[tuple]:
    """(job, what to keep in the history) for each chat request whose outcome is not applied
    yet: still on its way, or come and waiting (an edit mode, a running tool, undone steps):
    ``why`` for those, a failure's own message (a Cancel's too) for a failure."""
    kept = [(job, why) for job in pending_jobs()]
    for outcome in _state.backlog:
        if isinstance(outcome, PoseAnswered):
            kept.append((outcome.job, why))
        elif isinstance(outcome, PoseFailed):
            kept.append((outcome.job, outcome.message))
    return kept


def _keep_unanswered(scene: bpy.types.Scene, job, why: str) -> None:
    """Keeps an unanswered prompt as a failed request keeps its prompt: in the chat history,
    saying ``why``, and back in the prompt field where that is empty."""
    append_history(scene, chat.exchange(job.prompt, why, attachment=job.attachment, failed=True))
    _give_prompt_back(scene, job.prompt)


@bpy.app.handlers.persistent
def _on_save_pre(filepath: str = "", *_args) -> None:
    """The file is being saved with answers still to come: it keeps their prompts as a failed
    request keeps its prompt (in the chat history, and back in the prompt field where that is
    empty), so that the file, opened after Blender quit, still holds what was asked. Taken back
    once saved (`_on_save_post`): in this session the answers still come. A save within a
    save (another add-on's backup) saves what the outer one wrote. The startup file (saved
    with no path) is left as it is: every new file would start with these prompts."""
    _state.saves_running += 1
    _settle_running_batch()  # the file gets the keys' handles and the record written whole
    if _state.saves_running > 1 or not filepath:
        return
    _state.restore_after_save.clear()
    for job, why in _unanswered(UNANSWERED_AT_SAVE):
        scene = _find(bpy.data.scenes, job.scene, job.scene_uid)
        if scene is None:
            continue
        settings = scene.chatpose
        before = (scene.name, scene.session_uid, len(settings.history), settings.prompt)
        _state.restore_after_save.append(before)
        _keep_unanswered(scene, job, why)


@bpy.app.handlers.persistent
def _on_save_post(*_args) -> None:
    """Takes back what `_on_save_pre` wrote, latest first, so each scene ends as it was."""
    _state.saves_running = max(0, _state.saves_running - 1)
    if _state.saves_running:
        return
    while _state.restore_after_save:
        name, uid, length, prompt = _state.restore_after_save.pop()
        scene = _find(bpy.data.scenes, name, uid)
        if scene is None:
            continue
        history = scene.chatpose.history
        while len(history) > length:
            history.remove(len(history) - 1)
        scene.chatpose.prompt = prompt


FILE_HANDLERS = (
    (bpy.app.handlers.load_pre, _on_load_pre),
    (bpy.app.handlers.load_post, _on_load_post),
    (bpy.app.handlers.save_pre, _on_save_pre),
    (bpy.app.handlers.save_post, _on_save_post),
    (bpy.app.handlers.save_post_fail, _on_save_post),
)


def register() -> None:
    for handlers, handler in FILE_HANDLERS:
        if handler not in handlers:
            handlers.append(handler)


def unregister() -> None:
    """Stops the timer, closes the session and stops a local service started here."""
    if bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.unregister(timer_tick)
    for handlers, handler in FILE_HANDLERS:
        if handler in handlers:
            handlers.remove(handler)
    if _state.status_bar:
        _set_status_text(None)
    _settle_running_batch()
    kept = False
    for job, why in _unanswered(UNANSWERED_AT_DISABLE):  # not applied: kept to send again
        scene = _find(bpy.data.scenes, job.scene, job.scene_uid)
        if scene is not None:
            _keep_unanswered(scene, job, why)
            kept = True
    if kept:  # a step of its own, which also marks a file saved just before as changed
        push_undo("chat")
    if _state.dispatcher is not None:
        _state.dispatcher.close()
    if _state.process is not None:
        # Not waited for here: a service finishing its work would hold Blender up to the grace
        # time. A thread of its own waits, then kills one that is still running, and reaps it.
        threading.Thread(
            target=_state.process.stop, kwargs={"wait": True}, name="chatpose-stop", daemon=True
        ).start()
    _state.__init__()
