"""The add-on's timer, which applies what the service sends back on the main thread; its
register and unregister add and remove the file handlers.

Nothing waits for the service. Operators queue requests and return (``sending``,
``local_service``); ``timer_tick`` (a ``bpy.app.timers`` callback, every ``TICK_INTERVAL_S``
while anything is in flight, removed when idle) takes the session's events and applies them
(``answers``): poses onto armatures, exchanges into the scene's chat history, batch lines keyed
and recorded in groups (up to ``MAX_LINES_PER_GROUP`` a pass). Each tick applies results for at
most ``TICK_BUDGET_S`` (always at least one), the rest on the next tick, so a burst of 256
batch items cannot freeze the UI.

Undo: results arrive outside any operator, so after applying a pose (or at the end of a batch)
the timer makes one undo step itself (``feedback.push_undo``, when Blender has an undo stack),
as the last operation; an answer is two undo steps, its exchange in the chat history and then
its poses (Ctrl+Z takes the pose back and keeps the exchange); one batch run is one undo step.
An undo step drops the steps the user undid, so while they can redo, answers wait. An undo
while a batch runs goes back past the lines keyed since the step it loads: the undo and redo
handlers mark it, and the timer's next call recounts the run and keys those lines again
(``answers.recount_after_undo``, ``answers.run_keying_again``).

What all this shares is ``live.state``; ``file_handlers`` deal with file loads and saves in
between.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Sequence

import bpy

from shared_protocol.protocol import ErrorCode

from ..core.dispatch import BatchLineReady, StatusAnswered, StatusFailed
from ..preferences import service_settings
from . import answers, feedback, file_handlers, live

TICK_INTERVAL_S = 0.05
TICK_BUDGET_S = 0.025
PROBE_INTERVAL_S = 1.0
# Batch lines keyed in one pass at most: about 7 ms and a third of a millisecond a line after a
# long animation (docs/benchmarks.md), so that a pass stays near the timer's budget. Where
# keying is slower (lines between the keys of a long animation: 2 to 3 ms a line), the next
# pass takes fewer (``lines_within_budget``), to key within TICK_BUDGET_S.
MAX_LINES_PER_GROUP = 32
# Fewer lines than this a pass would key a long batch far slower (one line a pass: ten times)
# for little: a pass has a fixed part too.
MIN_LINES_PER_GROUP = 8


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.register(timer_tick, first_interval=TICK_INTERVAL_S, persistent=True)


def timer_tick() -> float | None:
    """The timer callback: collect events, apply results within the time budget, keep going
    while anything is in flight. Tests call it directly (headless Blender runs no timers)."""
    started = time.perf_counter()
    state = live.state
    statuses = []
    if state.dispatcher is not None:
        try:
            for outcome in state.dispatcher.tick():
                is_status = isinstance(outcome, (StatusAnswered, StatusFailed))
                (statuses if is_status else state.backlog).append(outcome)
        except Exception as exc:  # never let an exception unregister the timer silently
            traceback.print_exc()
            feedback.notify(f"ChatPose could not read the service's answers: {exc}", "ERROR")
    applied = len(statuses)
    last_took = 0.0  # the next outcome is taken to cost what the last one did
    if state.undone:  # first, as an outcome of its own: it may find lines to key again
        state.undone = False
        began = time.perf_counter()
        try:
            answers.recount_after_undo()
        except Exception as exc:  # as below: the timer must go on
            traceback.print_exc()
            feedback.notify(f"ChatPose could not recount the batch after an undo: {exc}", "ERROR")
        applied, last_took = applied + 1, time.perf_counter() - began
    deferred = _work_waiting() and why_answers_wait_now()
    if deferred:
        # 0 when only a batch's end waits.
        count = answers.count_answers(state.backlog)
        waiting = f"{count} answer(s) waiting: {deferred}" if count else f"waiting: {deferred}"
        if state.message != waiting:  # said once, not redrawn on every tick
            feedback.set_message(waiting, "WARNING")
            feedback.redraw()
    state.popups = []
    with feedback.window_override():
        # Status answers change no scene data: applied at once, even while other answers wait
        # (in Edit Mode, say), so that a local service's readiness lets what was held for it go.
        for outcome in statuses:
            _apply(outcome)
        while (
            _work_waiting()
            and not deferred
            and (applied == 0 or time.perf_counter() - started + last_took <= TICK_BUDGET_S)
        ):
            outcome = _next_outcome()
            applied += 1
            began = time.perf_counter()
            if _apply(outcome) and isinstance(outcome, answers.BatchLines):
                state.lines_per_group = lines_within_budget(
                    len(outcome.items), time.perf_counter() - began
                )
            last_took = time.perf_counter() - began
    popups, state.popups = state.popups, None
    if popups:
        feedback.show_popup(feedback.one_popup(popups), "ERROR")
    try:
        watch_local_service()
        feedback.update_status_bar()
    except Exception as exc:  # as above: the timer must go on
        traceback.print_exc()
        feedback.notify(f"ChatPose could not check the local service: {exc}", "ERROR")
    if applied:
        feedback.redraw()
    if _work_waiting() and not deferred:
        return 0.001
    if live.busy() or state.waiting_ready or state.stopping:
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


POSING_MODES = frozenset({"OBJECT", "POSE"})

# context.mode's names as Blender's mode menu says them, where they differ.
_MODE_NAMES = {
    "PAINT_WEIGHT": "Weight Paint",
    "PAINT_VERTEX": "Vertex Paint",
    "PAINT_TEXTURE": "Texture Paint",
    "PARTICLE": "Particle Edit",
    "SCULPT_CURVES": "Sculpt",
    "PAINT_GREASE_PENCIL": "Draw",
    "PAINT_GPENCIL": "Draw",
    "SCULPT_GREASE_PENCIL": "Sculpt",
    "SCULPT_GPENCIL": "Sculpt",
    "WEIGHT_GREASE_PENCIL": "Weight Paint",
    "WEIGHT_GPENCIL": "Weight Paint",
    "VERTEX_GREASE_PENCIL": "Vertex Paint",
    "VERTEX_GPENCIL": "Vertex Paint",
}


def mode_name(mode: str) -> str:
    """``context.mode`` as the mode menu names it: "Edit" for every edit mode."""
    if mode.startswith("EDIT"):
        return "Edit"
    return _MODE_NAMES.get(mode) or mode.replace("_", " ").title()


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
    if mode not in POSING_MODES:
        return f"leave {mode_name(mode)} Mode to apply them"
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


def why_answers_wait_now() -> str | None:
    """`why_answers_wait` for the user's window (the timer itself has none)."""
    with feedback.window_override():
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


def _apply(outcome) -> bool:
    """Applies one outcome; False when that failed (said, and the timer goes on)."""
    try:
        answers.apply_outcome(outcome)
    except Exception as exc:
        traceback.print_exc()
        feedback.notify(f"ChatPose could not apply an answer: {exc}", "ERROR")
        return False
    return True


def _work_waiting() -> bool:
    """Outcomes to apply, or batch lines an undo took back to key again."""
    return bool(live.state.backlog) or answers.run_keying_again() is not None


def _next_outcome():
    """The next outcome to apply: first the lines an undo took back from the running batch, as
    one ``answers.BatchLines`` group, keyed again from their answers (before its end, which
    waits in the backlog); else the backlog's next, where batch lines of one run that wait
    next to each other come as one group, keyed in one pass."""
    most = min(live.state.lines_per_group or MAX_LINES_PER_GROUP, MAX_LINES_PER_GROUP)
    run = answers.run_keying_again()
    if run is not None:
        again = run.lines_to_key_again(most)
        return answers.BatchLines([BatchLineReady(run, line, (pose,)) for line, pose in again])
    backlog = live.state.backlog
    first = backlog.popleft()
    if not isinstance(first, BatchLineReady):
        return first
    group = [first]
    while (
        backlog
        and len(group) < most
        and isinstance(backlog[0], BatchLineReady)
        and backlog[0].run is first.run
    ):
        group.append(backlog.popleft())
    return answers.BatchLines(group)


def lines_within_budget(keyed: int, seconds: float) -> int:
    """How many batch lines the next pass may key to stay within ``TICK_BUDGET_S``, given
    that ``keyed`` took ``seconds``: from ``MIN_LINES_PER_GROUP`` to ``MAX_LINES_PER_GROUP``.
    It aims at four fifths of the budget: a pass costs a part that does not shrink with its
    lines, so fewer lines save less than their share."""
    if seconds <= 0:
        return MAX_LINES_PER_GROUP
    fitting = int(keyed * 0.8 * TICK_BUDGET_S / seconds)
    return max(min(MIN_LINES_PER_GROUP, MAX_LINES_PER_GROUP), min(MAX_LINES_PER_GROUP, fitting))


def watch_local_service() -> None:
    """While the local service stops, kills it once its grace time is over; while it loads,
    says when it exited or the Service Address changed (and waits for it again once the address
    is set back), and asks it for its status (a probe) until it answers."""
    if live.state.stopping:
        process_state = live.service_process().poll()  # kills it once the grace time is over
        if not process_state.alive:
            live.state.stopping = False
            feedback.set_message(f"Local service {process_state.describe()}")
            feedback.redraw()
    if not live.state.waiting_ready:
        return
    process_state = live.service_process().poll()
    if not process_state.alive:
        live.stop_waiting_for_local_service(
            ErrorCode.UNREACHABLE, "not sent: the local service it waited for did not start"
        )
        feedback.notify(f"Local service {live.local_service_ended()}", "ERROR", popup=True)
        return
    address = service_settings(bpy.context).address
    d = live.dispatcher()
    if address != live.state.local_address:  # the probe would ask elsewhere: none until back
        if not live.state.address_left_local:
            live.state.address_left_local = True
            d.fail_held(
                ErrorCode.UNREACHABLE,
                f"not sent: it waited for the local service on {live.state.local_address}, and "
                f"the Service Address is now {address}",
            )
            feedback.notify(
                f"The Service Address is now {address}; the local service started on "
                f"{live.state.local_address} goes on there (Stop it, or set that address again)",
                "WARNING",
            )
        return
    if live.state.address_left_local:  # set again, as advised: wait for it again
        live.state.address_left_local = False
        d.hold_for(address)
        feedback.notify("The Service Address is the local service's again; it is loading its model")
    if time.monotonic() >= live.state.next_probe and not d.status_in_flight(probe=True):
        live.state.next_probe = time.monotonic() + PROBE_INTERVAL_S
        with contextlib.suppress(live.UserError, *live.SEND_ERRORS):
            d.request_status(live.service_for(bpy.context), probe=True)


@bpy.app.handlers.persistent
def _on_undo_or_redo(*_args) -> None:
    """An undo or redo loaded the file as a step saved it: a batch run's lines keyed since then
    (it makes its own step when it ends) may be gone, or back. Only marked here, with the timer
    running: its next call recounts the run and keys them again (``answers.recount_after_undo``),
    as it keys any line, within its budget and not while the user can redo."""
    if live.current_batch() is not None:
        live.state.undone = True
        ensure_timer()


HANDLERS = (
    *file_handlers.FILE_HANDLERS,
    (bpy.app.handlers.undo_post, _on_undo_or_redo),
    (bpy.app.handlers.redo_post, _on_undo_or_redo),
)


def register() -> None:
    for handlers, handler in HANDLERS:
        if handler not in handlers:
            handlers.append(handler)


def unregister() -> None:
    """Stops the timer, closes the session and stops a local service started here."""
    if bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.unregister(timer_tick)
    for handlers, handler in HANDLERS:
        if handler in handlers:
            handlers.remove(handler)
    if live.state.status_bar:
        feedback.set_status_text(None)
    d = live.state.dispatcher
    stopped = d.batch if d is not None and d.batch_running else None
    answers.settle_running_batch()
    if stopped is not None and stopped.keyed:  # else undo, then redo, loses its keys
        feedback.push_undo("batch")
    if stopped is not None and (stopped.keyed or stopped.taken_back):
        print(
            f"ChatPose: the batch from {stopped.source} stopped (the add-on was disabled, or "
            f"Blender quit): {stopped.keyed} lines keyed on {stopped.armature}, "
            f"{stopped.remaining} still to key; Batch Keyframe keys the rest"
        )
    # Answers not applied: their prompts are kept, to send again; in an undo step of their
    # own, which also marks a file saved just before as changed.
    if file_handlers.keep_unanswered_prompts(file_handlers.UNANSWERED_AT_DISABLE):
        feedback.push_undo("chat")
    if live.state.dispatcher is not None:
        live.state.dispatcher.close()
    if live.state.process is not None:
        # Not waited for here: a service finishing its work would hold Blender up to the grace
        # time. A thread of its own waits, then kills one that is still running, and reaps it.
        threading.Thread(
            target=live.state.process.stop, kwargs={"wait": True}, name="chatpose-stop", daemon=True
        ).start()
    live.state.__init__()
