"""File loads and saves while requests are in flight: the answers of a file no longer open are
dropped, saying so, and a file saved before its answers came keeps their prompts, as the file
does when the add-on is disabled (``keep_unanswered_prompts``)."""

from __future__ import annotations

import bpy

from ..core import chat, wording
from ..core.dispatch import PoseAnswered, PoseFailed
from . import answers, feedback, live
from .props import append_history


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    """A file is about to be loaded: a save whose end was never reported is over by now. What
    is in flight waits for `_on_load_post`: the load may fail (a damaged file) and leave the
    file open as it was, its requests and batch still its own."""
    live.state.saves_running = 0
    live.state.restore_after_save.clear()


@bpy.app.handlers.persistent
def _on_load_post(*_args) -> None:
    """A file was loaded: answers in flight belong to the old one."""
    d = live.state.dispatcher
    if d is None:  # nothing sent yet; what the panel said was of the old file
        feedback.set_message("")
        return
    # Their prompts are named: the prompt field they came from goes with the old file.
    jobs = [*d.pending_jobs(), *(o.job for o in live.state.backlog if hasattr(o, "job"))]
    prompts = [job.prompt or job.attachment for job in jobs]
    run = d.batch if d.batch_running else None
    in_flight = d.cancel_all(forget=True)
    # Answers that came but were not applied yet.
    received = answers.count_answers(live.state.backlog)
    live.state.backlog.clear()
    if live.state.status_bar:
        feedback.set_status_text(None)
        live.state.status_bar = None
    dropped = [
        f"{in_flight} request(s) in flight were cancelled" if in_flight else "",
        f"{received} answer(s) not yet applied were dropped" if received else "",
    ]
    if in_flight or received:
        asked = "; ".join(wording.preview(p) for p in prompts[:3] if p) + (
            ", ..." if len(prompts) > 3 else ""
        )
        said = f" (asked: {asked})" if asked else ""
        if run is not None:  # its record says what is keyed: a rerun there keys the rest
            # Not the run's counts: the file loaded holds the lines keyed when it was saved.
            said += (
                f"; the batch from {run.source} on {run.armature} stopped: Batch Keyframe in "
                "this file keys the lines it lacks (those keyed since it was saved are not in it)"
            )
        feedback.set_message(
            f"A file was loaded: {' and '.join(filter(None, dropped))}{said}", "WARNING"
        )
    else:  # what it said was of the old file ("all lines keyed", after a Revert dropped them)
        feedback.set_message("")


# What the chat history says of a prompt still waiting for its answer. In a file saved then:
# a file opened later never gets that answer. When the add-on is disabled: it never comes.
UNANSWERED_AT_SAVE = (
    "No answer applied yet when this file was saved; send it again if no pose came."
)
UNANSWERED_AT_DISABLE = "The add-on was disabled before this answer was applied; send it again."


def unanswered(why: str) -> list[tuple]:
    """(job, what to keep in the history) for each chat request whose outcome is not applied
    yet: still on its way, or come and waiting (an edit mode, a running tool, undone steps):
    ``why`` for those, a failure's own message (a Cancel's too) for a failure."""
    kept = [(job, why) for job in live.pending_jobs()]
    for outcome in live.state.backlog:
        if isinstance(outcome, PoseAnswered):
            kept.append((outcome.job, why))
        elif isinstance(outcome, PoseFailed):
            kept.append((outcome.job, outcome.message))
    return kept


def keep_unanswered_prompts(why: str) -> bool:
    """Keeps the prompt of every request whose answer is not applied yet (``keep_unanswered``),
    in its scene's history, saying ``why``; whether there was one."""
    kept = False
    for job, reason in unanswered(why):
        scene = answers.find_by_uid(bpy.data.scenes, job.scene, job.scene_uid)
        if scene is not None:
            keep_unanswered(scene, job, reason)
            kept = True
    return kept


def keep_unanswered(scene: bpy.types.Scene, job, why: str) -> None:
    """Keeps an unanswered prompt as a failed request keeps its prompt: in the chat history,
    saying ``why``, with its image, and back in the prompt field where that is empty."""
    append_history(
        scene,
        chat.exchange(job.prompt, why, attachment=job.attachment, failed=True),
        answers.failed_turn_image(job, why),
    )
    answers.give_prompt_back(scene, job.prompt)


@bpy.app.handlers.persistent
def _on_save_pre(filepath: str = "", *_args) -> None:
    """The file is being saved with answers still to come: it keeps their prompts as a failed
    request keeps its prompt (in the chat history, and back in the prompt field where that is
    empty), so that the file, opened after Blender quit, still holds what was asked. Taken back
    once saved (`_on_save_post`): in this session the answers still come. A save within a
    save (another add-on's backup) saves what the outer one wrote. The startup file (saved
    with no path) is left as it is: every new file would start with these prompts."""
    live.state.saves_running += 1
    answers.settle_running_batch()  # the file gets the keys' handles and the record written whole
    if live.state.saves_running > 1 or not filepath:
        return
    live.state.restore_after_save.clear()
    for job, why in unanswered(UNANSWERED_AT_SAVE):
        scene = answers.find_by_uid(bpy.data.scenes, job.scene, job.scene_uid)
        if scene is None:
            continue
        settings = scene.chatpose
        before = (scene.name, scene.session_uid, len(settings.history), settings.prompt)
        live.state.restore_after_save.append(before)
        keep_unanswered(scene, job, why)


@bpy.app.handlers.persistent
def _on_save_post(*_args) -> None:
    """Takes back what `_on_save_pre` wrote, latest first, so each scene ends as it was."""
    live.state.saves_running = max(0, live.state.saves_running - 1)
    if live.state.saves_running:
        return
    while live.state.restore_after_save:
        name, uid, length, prompt = live.state.restore_after_save.pop()
        scene = answers.find_by_uid(bpy.data.scenes, name, uid)
        if scene is None:
            continue
        history = scene.chatpose.history
        kept_images = {m.image for m in list(history)[length:] if m.image is not None}
        while len(history) > length:
            history.remove(len(history) - 1)
        scene.chatpose.prompt = prompt
        for image in kept_images:  # packed for the file alone: the answer will keep its own
            if image.users == 0:
                bpy.data.images.remove(image)


FILE_HANDLERS = (
    (bpy.app.handlers.load_pre, _on_load_pre),
    (bpy.app.handlers.load_post, _on_load_post),
    (bpy.app.handlers.save_pre, _on_save_pre),
    (bpy.app.handlers.save_post, _on_save_post),
    (bpy.app.handlers.save_post_fail, _on_save_post),
)
