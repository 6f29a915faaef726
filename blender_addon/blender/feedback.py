"""What the add-on tells the user: the panel's message; from the timer, which runs outside any
operator or window, Blender's reports, popups, the status bar and redraws; and the timer's
undo steps for what it applied (``push_undo``)."""

from __future__ import annotations

import contextlib

import bpy

from ..core import wording
from . import live


def set_message(text: str, level: str = "INFO", *, popup: bool = False) -> None:
    live.state.message, live.state.level = text, level
    live.state.message_of_ready_local = False
    if level != "INFO" or len(text) > wording.LONG_MESSAGE_CHARS:  # cut where it is shown
        print(f"ChatPose {level.lower()}: {text}")
    if popup and live.state.popups is not None:
        live.state.popups.append(text)
    elif popup:
        show_popup(text, level)


def notify(text: str, level: str = "INFO", *, popup: bool = False) -> None:
    """A message from the timer, where no operator of ours is running to report it: the
    panel's message (`set_message`), and Blender's reports (status bar, Info editor) through
    the internal operator CHATPOSE_OT_report."""
    set_message(text, level, popup=popup)
    try:
        with window_override():
            bpy.ops.chatpose.report(level=level, message=text)
    except RuntimeError:
        pass  # background mode turns an ERROR report into this exception; it was printed


def one_popup(texts: list[str]) -> str:
    """The popup of a tick that asked for `texts` (errors, in order): the first in full, and
    how many more the panel's history and the Info editor hold."""
    if len(texts) == 1:
        return texts[0]
    return f"{texts[0]}\n(and {len(texts) - 1} more: see the history and the Info editor)"


def show_popup(text: str, level: str) -> None:
    """A popup where Blender has a window to show one (never in background mode)."""
    if bpy.app.background:
        return
    wm = bpy.context.window_manager
    if wm is None or not wm.windows:
        return
    lines = wording.message_lines(text, 80)

    def draw(self, _context):
        for line in lines:
            self.layout.label(text=line)

    icon = "ERROR" if level == "ERROR" else "INFO"
    with contextlib.suppress(Exception):
        with window_override():
            wm.popup_menu(draw, title="ChatPose", icon=icon)


def window_override():
    """A context with a window for operators run from the timer (which has none)."""
    context = bpy.context
    wm = context.window_manager
    if context.window is not None or wm is None or not wm.windows:
        return contextlib.nullcontext()
    window = wm.windows[0]
    return context.temp_override(window=window, screen=window.screen)


def redraw() -> None:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            area.tag_redraw()


def set_status_text(text: str | None) -> None:
    """The status bar's text in every window. Blender writes it to the workspace of the
    context's window, whichever workspace it is called on: each window is made the context's
    in turn (a second main window showed nothing). A workspace no window shows when the batch
    ends keeps its last text until a tool there sets its own."""
    wm = bpy.context.window_manager
    for window in wm.windows if wm is not None else ():
        with contextlib.suppress(Exception):
            with bpy.context.temp_override(window=window, screen=window.screen):
                window.workspace.status_text_set(text)


def update_status_bar() -> None:
    """The running batch's progress in the status bar, set when it (or a window's workspace)
    changed: each timer call would otherwise redraw every window's status bar."""
    run = live.current_batch()
    if run is not None and not run.closed:
        wm = bpy.context.window_manager
        shown = (
            live.batch_progress(run),
            tuple(w.workspace.name for w in wm.windows) if wm else (),
        )
        if live.state.status_bar != shown:
            set_status_text(shown[0])
            live.state.status_bar = shown
    elif live.state.status_bar:
        set_status_text(None)
        live.state.status_bar = None


_pushing_undo = False


def pushing_undo() -> bool:
    """Whether `push_undo` is running an undo step operator (any other run is a repeat)."""
    return _pushing_undo


def push_undo(step: str) -> None:
    """One undo step for what the timer just applied (see ``runtime``'s docstring): `step` is
    "answer" (poses applied), "chat" (the chat history alone) or "batch" (a batch run), the
    step's name in the Undo History. Not `ed.undo_push`: that step would not be Blender's last
    operation, and "Adjust Last Operation" on the user's previous operator undoes back to
    before that operator's own step, so it would take the answer with it for good. The step
    comes from running an internal registered operator with undo
    (`chat_operators.CHATPOSE_OT_answer_step` and its siblings), which becomes the last
    operation, with nothing to adjust."""
    global _pushing_undo
    operator = getattr(bpy.ops.chatpose, f"{step}_step")
    with contextlib.suppress(RuntimeError), window_override():
        if bpy.ops.ed.undo_push.poll():  # an undo stack to push onto
            _pushing_undo = True
            try:
                operator("EXEC_DEFAULT", True)  # True: an undo step
            finally:
                _pushing_undo = False
