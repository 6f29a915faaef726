"""Requests from the operators: a pose or chat turn, a batch, a status check. Each is queued
and returns at once (nothing here waits for the service); UserError says why one cannot be
sent."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence

import bpy
import numpy as np

from shared_protocol.batch_text import (
    FileTooLargeError,
    prompt_lines,
    read_batch_file,
    unreadable,
)
from shared_protocol.protocol import trimmed

from ..core import chat, wording
from ..core.batch_plan import BatchRun, check_lines
from ..core.batch_record import BatchRecord, Rerun, plan_rerun
from ..core.dispatch import PoseJob
from ..core.timeline import frames_for
from ..preferences import absolute_path, get_preferences
from . import feedback, live, runtime
from .anim import LockedCurveError, muted_note, refuse_locked
from .batch_store import TakePin, give_a_take, load_record, place_keyed_lines, save_record
from .posing import keyed_at, location_keyed_at, placed_translations, pose_channels, root_places
from .props import history_image, history_messages, target_armature, target_problem


def send_pose(
    context: bpy.types.Context, prompt: str, images: Sequence[bytes] = (), attachment: str = ""
) -> PoseJob:
    """Queues a pose (or chat) request with the scene's settings; UserError when it
    cannot be sent (no armature, bad address, input the protocol refuses)."""
    scene = context.scene
    settings = scene.chatpose
    target = target_armature(context)
    if target is None:
        raise live.UserError(target_problem(context))
    prompt = trimmed(prompt)  # marks pasted with it are no description of an image either
    if not prompt and not images:
        raise live.UserError("Type a prompt first")
    service = live.service_for(context)
    mode = "chat" if settings.chat_mode else "pose"
    turn = (
        _chat_turn(context, images, attachment)
        if settings.chat_mode
        else _Turn(images, attachment=attachment)
    )
    frame = None
    if settings.insert_keyframe:
        frame = scene.frame_current if settings.key_current_frame else settings.key_frame
    if settings.insert_keyframe and mode == "pose":  # a chat turn may answer in words alone
        try:  # found now, not once the service has computed the answer (extra people later)
            refuse_locked(target, pose_channels(target, False))
        except LockedCurveError as exc:
            raise live.UserError(f"Not sent: {exc}") from None
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
        keep_on_floor=settings.keep_on_floor,
        attachment=turn.attachment,
        chat_image=turn.chat_image,
        resent_image=turn.resent_image,
        spacing=settings.person_spacing,
    )
    try:
        live.dispatcher().send_pose(service, job, turn.images, turn.history)
    except live.SEND_ERRORS as exc:
        raise live.UserError(f"Not sent: {live.send_problem(exc)}") from None
    runtime.ensure_timer()
    what = wording.preview(prompt) if prompt else "the image"
    if live.dispatcher().holding:
        feedback.set_message(
            f"The local service is loading its model: {what} ({mode} mode{turn.notes}) is "
            "sent once it is ready"
        )
    else:
        feedback.set_message(f"Asked the service for {what} ({mode} mode{turn.notes})")
    return job


@dataclasses.dataclass(frozen=True)
class _Turn:
    """What a request sends besides its prompt: its images and, for a chat turn, the chat's
    context."""

    images: Sequence[bytes]
    history: tuple = ()  # the chat's earlier exchanges, as the protocol sends them
    chat_image: bytes = b""  # this turn's own image, kept with its exchange
    resent_image: tuple[str, int] | None = None  # or the chat's kept image, sent again
    attachment: str = ""  # the label of its image, shown with the exchange
    notes: str = ""  # for the status line: what of the chat's context went, or did not


def _chat_turn(context: bpy.types.Context, images: Sequence[bytes], attachment: str) -> _Turn:
    """A chat turn's context: the latest exchanges that fit, and this turn's image or else
    the chat's kept one sent again; UserError while an earlier turn is still answered."""
    scene = context.scene
    # The history holds an exchange once its answer is in: a turn sent before would go
    # without the one before it, and the model would answer it blind.
    refuse_chat_turn_yet(scene)
    prefs = get_preferences(context)
    pairs = prefs.history_pairs if prefs is not None else chat.DEFAULT_MAX_PAIRS
    messages, first = _chat_context(scene, pairs)
    history = chat.history_turns(messages, max_pairs=pairs)
    context_note = ""
    if too_long := chat.too_long_for_context(messages, max_pairs=pairs):
        context_note = (
            f"; {too_long} of the chat's latest exchanges too long for its context "
            f"({chat.DEFAULT_MAX_CHARS:,} characters) not sent"
        )
    if images:  # the add-on sends one at most
        return _Turn(images, history, images[0], attachment=attachment, notes=context_note)
    index = chat.conversation_image_index(messages, max_pairs=pairs)
    if index is None:
        return _Turn(images, history, attachment=attachment, notes=context_note)
    label = messages[index].attachment or "image"
    if messages[index].image_kept:
        message = scene.chatpose.history[first + index]
        return _Turn(
            [history_image(message)],
            history,
            resent_image=(message.image.name, message.image.session_uid),
            attachment=label,  # shown with this exchange too
            notes=f", with {label} of the chat{context_note}",
        )
    if _refused_there(messages, index):
        image_note = (
            f"; the service refused the chat's {label} (its failed exchange says why), "
            "so this turn goes without it"
        )
    else:
        image_note = (
            f"; the chat's {label} is not kept (sent in pose mode, or unpacked or "
            "removed since): attach it again for the model to see it"
        )
    return _Turn(images, history, attachment=attachment, notes=image_note + context_note)


def _chat_context(scene: bpy.types.Scene, pairs: int) -> tuple[list[chat.Message], int]:
    """(the chat history's latest messages, enough for a chat turn's context of ``pairs``
    exchanges; the index of the first of them in the history): reading all of a long chat
    through Blender's properties took 190 ms for 6,000 messages."""
    total = len(scene.chatpose.history)
    last = 4 * pairs + 8
    while True:
        messages = history_messages(scene, last=last)
        if len(messages) == total or chat.holds_context(messages, max_pairs=pairs):
            return messages, total - len(messages)
        last *= 2


def refuse_chat_turn_yet(scene: bpy.types.Scene) -> None:
    """live.UserError while an exchange of ``scene`` (chat or pose mode: both go into its history)
    waits for its answer, or to be applied: a chat turn goes with the exchanges before it, and
    sent now would go without that one; the model would answer it blind."""
    asked = [job for job in live.pending_jobs() if job.scene_uid == scene.session_uid]
    came = [o.job for o in live.state.backlog if isinstance(getattr(o, "job", None), PoseJob)]
    came = [job for job in came if job.scene_uid == scene.session_uid]
    if not asked and not came:
        return
    job = (asked or came)[0]
    named = wording.preview(job.prompt or job.attachment)
    if asked:
        raise live.UserError(f"Wait for the answer to {named}, then send this")
    why = runtime.why_answers_wait_now() or "it is applied on the next tick"
    # Not in brackets: some of the reasons hold brackets of their own.
    raise live.UserError(
        f"Answers that came wait, the one to {named} among them: {why}. Send this once it is "
        "applied"
    )


def _refused_there(messages: list[chat.Message], index: int) -> bool:
    """Whether the exchange of the user message at ``index`` failed for its image."""
    reply = messages[index + 1] if index + 1 < len(messages) else None
    return (
        reply is not None
        and reply.role == chat.ERROR
        and chat.refuses_image(messages[index].attachment, reply.text)
    )


def read_batch_lines(context: bpy.types.Context) -> tuple[list[tuple[int, str]], str]:
    """(its (line number, prompt) pairs, source label) of the scene's batch source; live.UserError
    when there is none."""
    settings = context.scene.chatpose
    if settings.batch_source == "TEXT":
        text = settings.batch_text
        if text is None:
            raise live.UserError("Pick a text datablock with one prompt per line")
        content, label = text.as_string(), f"text '{text.name}'"
        if content.startswith(("\xff\xfe", "\xfe\xff")):  # a byte order mark read as Latin-1
            raise live.UserError(
                f"{label} holds a UTF-16 or UTF-32 file, which Blender's Text Editor reads "
                "garbled: set Source to File and pick the file, or save it as UTF-8"
            )
    else:
        path = absolute_path(settings.batch_file)
        if not settings.batch_file:
            raise live.UserError("Pick a .txt file with one prompt per line")
        if os.path.exists(path) and not os.path.isfile(path):  # read, a pipe would hang Blender
            raise live.UserError(
                f"{path} is not a file (a folder, a device or a pipe): pick a .txt file with one "
                "prompt per line"
            )
        try:
            content = read_batch_file(path)
        except FileNotFoundError:
            raise live.UserError(f"{path}: no such file") from None
        except UnicodeDecodeError as exc:
            raise live.UserError(f"{path} {unreadable(exc)}") from None
        except FileTooLargeError as exc:
            raise live.UserError(f"{path} is {exc}") from None
        except OSError as exc:
            raise live.UserError(f"{path} could not be read ({exc.strerror or exc})") from None
        label = bpy.path.basename(path)
    lines = prompt_lines(content)
    if not lines:
        raise live.UserError(f"{label} has no prompts (one per line)")
    try:
        check_lines(lines)
    except ValueError as exc:
        raise live.UserError(f"{label}: {exc}") from None
    return lines, label


def _checked_batch(
    context: bpy.types.Context,
) -> tuple[bpy.types.Object, list[tuple[int, str]], str]:
    """(target, numbered lines, label) of the batch Batch Keyframe would send; UserError naming what
    refuses it before anything is sent or keyed."""
    settings = context.scene.chatpose
    if live.dispatcher().batch_running:
        running = live.dispatcher().batch.running_text()
        raise live.UserError(f"{running}: cancel it or wait for it to finish")
    target = target_armature(context)
    if target is None:
        raise live.UserError(target_problem(context))
    numbered, label = read_batch_lines(context)
    lines = [prompt for _, prompt in numbered]
    keys_location = settings.batch_translation or settings.batch_keep_on_floor
    try:
        frames_for(len(lines), settings.batch_start, settings.batch_step)
    except ValueError as exc:
        raise live.UserError(f"Batch not sent: {label}: {exc}") from None
    try:  # found now, not once the service has computed every line
        refuse_locked(target, pose_channels(target, keys_location))
    except LockedCurveError as exc:
        hint = ""
        if settings.batch_keep_on_floor and not settings.batch_translation:
            with contextlib.suppress(LockedCurveError):  # else the rotations are locked too
                refuse_locked(target, pose_channels(target, False))
                hint = " (Keep on Floor keys it: turn that off to key the rotations alone)"
        raise live.UserError(f"Batch not sent: {exc}{hint}") from None
    return target, numbered, label


def start_batch(context: bpy.types.Context) -> BatchRun:
    """Plans and sends a batch for the lines of the scene's batch source not keyed yet on the
    target armature. The returned run is already ended when nothing was pending."""
    settings = context.scene.chatpose
    target, numbered, label = _checked_batch(context)
    lines = [prompt for _, prompt in numbered]
    try:
        record = load_record(target)
    except ValueError as exc:
        raise live.UserError(
            f"The batch record on {target.name} is damaged ({exc}); use Clear Batch Record"
        ) from None
    plan = _rerun(record, lines, settings)
    pending, notes = plan.pending, plan.notes
    run = BatchRun(
        armature=target.name,
        source=label,
        pending=pending,
        total_lines=len(lines),
        use_translation=settings.batch_translation,
        keep_on_floor=settings.batch_keep_on_floor,
        armature_uid=target.session_uid,
        take=TakePin.at_start(target),
        line_numbers=[number for number, _ in numbered],
        keyed_before=plan.keyed_before,
    )
    if run.keep_on_floor and pending:
        places = root_places(target, [line.frame for line in pending])
        run.root_places = dict(zip((line.frame for line in pending), places, strict=True))
    if not pending:
        live.dispatcher().start_batch(None, run)  # records it as the last run, sends nothing
        _place_and_save(target, plan, settings)
        feedback.set_message(
            f"All {len(lines)} lines of {label} are keyed on {target.name} already{notes}"
        )
        return run
    service = live.service_for(context)
    try:
        live.dispatcher().start_batch(service, run)
    except live.SEND_ERRORS as exc:
        raise live.UserError(f"Batch not sent: {live.send_problem(exc)}") from None
    # Not before: a run that did not start would lose its note and leave keys no undo step has.
    _place_and_save(target, plan, settings)
    give_a_take(target)
    run.take = run.take.kept(target)  # the take made for it is its own
    runtime.ensure_timer()
    skipped = run.already_keyed
    note = f" ({skipped} keyed before)" if skipped else ""
    keys_location = run.use_translation or run.keep_on_floor
    muted = muted_note(target, pose_channels(target, keys_location))
    held = "; sent once the local service has loaded its model" if live.dispatcher().holding else ""
    feedback.set_message(
        f"Batch from {label}: {len(pending)} lines to key on {target.name}{note}, "
        f"in {run.planned_requests} request(s){notes}{held}" + (f"; {muted}" if muted else ""),
        "WARNING" if muted else "INFO",
    )
    feedback.update_status_bar()
    return run


def _rerun(record: BatchRecord, lines: Sequence[str], settings) -> Rerun:
    return plan_rerun(
        record,
        lines,
        settings.batch_start,
        settings.batch_step,
        translation=settings.batch_translation,
        keep_on_floor=settings.batch_keep_on_floor,
    )


def replace_keys_question(context: bpy.types.Context) -> str:
    """The Batch Keyframe confirmation when the run would replace keys it did not make: the
    animator's at the frames of lines to key, or root location keys that placing keyed lines
    (``Rerun.to_place``) changes; "" when none, or when the batch is refused (said when it
    runs, not after a question)."""
    settings = context.scene.chatpose
    try:
        target, numbered, _ = _checked_batch(context)
        record = load_record(target)
        plan = _rerun(record, [prompt for _, prompt in numbered], settings)
    except (live.UserError, ValueError):
        return ""
    questions = [
        _replaced_keys(target, plan, record, settings),
        _replaced_location_keys(target, plan, settings),
    ]
    return ". ".join(filter(None, questions))


def _replaced_keys(target: bpy.types.Object, plan: Rerun, record: BatchRecord, settings) -> str:
    """What the plan's lines to key replace at their frames of keys its record does not hold
    (the animator's, another text's batch's, one whose record was cleared)."""
    own = {entry.frame for entry in record.entries}  # a line edited since: its key, replaced
    frames = [line.frame for line in plan.pending if line.frame not in own]
    if not frames:
        return ""
    keys_location = settings.batch_translation or settings.batch_keep_on_floor
    keyed = keyed_at(target, frames, pose_channels(target, keys_location))
    taken = [frame for frame, there in zip(frames, keyed, strict=True) if there]
    if not taken:
        return ""
    shown = ", ".join(str(frame) for frame in taken[:5]) + (", ..." if len(taken) > 5 else "")
    return (
        f"{len(taken)} line(s) go on frames where {target.name} has keys not keyed from these "
        f"lines (frame {shown}): they replace them (Undo brings them back)"
    )


def _replaced_location_keys(target: bpy.types.Object, plan: Rerun, settings) -> str:
    """What placing the plan's keyed lines changes of root location keys at their frames."""
    if not (settings.batch_translation or settings.batch_keep_on_floor):
        return ""
    frames = np.array([line.frame for line in plan.to_place], dtype=np.int64)
    keyed = frames[location_keyed_at(target, frames)]
    if not len(keyed):
        return ""
    on_floor = settings.batch_keep_on_floor
    placed = placed_translations(target, keyed, on_floor=on_floor)
    moved = np.abs(placed - root_places(target, keyed))
    count = int((moved.max(axis=1) > _SAME_PLACE_M).sum())
    if not count:
        return ""
    if on_floor:
        return (
            f"{count} line(s) keyed before have root location keys at their frames that Keep "
            "on Floor changes: it sets their height to the floor's (their rotations and place "
            "across the floor are kept)"
        )
    return (
        f"{count} line(s) keyed before have root location keys at their frames that "
        "Translation replaces with the rest location (their rotations are kept)"
    )


_SAME_PLACE_M = 1e-4  # a root location key this close to where placing puts it is unchanged


def _place_and_save(target: bpy.types.Object, plan: Rerun, settings) -> None:
    """Keys the root's location of the plan's lines to place
    (``batch_store.place_keyed_lines``), records those and the ones to record with the
    settings, and saves the record when that, or forgetting lines, changed it."""
    translation, on_floor = settings.batch_translation, settings.batch_keep_on_floor
    record = plan.record
    if plan.to_place:
        record = place_keyed_lines(
            target, record, plan.to_place, use_translation=translation, on_floor=on_floor
        )
    if plan.to_record:
        record = record.recorded_lines(
            ((line.line, line.text, line.frame) for line in plan.to_record), translation, on_floor
        )
    if plan.to_place or plan.to_record or plan.forgotten:
        save_record(target, record)


def cancel_request(request_id: str) -> bool:
    """Cancels one waiting pose request (the panel's button beside it); False when it is no
    longer waiting."""
    d = live.state.dispatcher
    job = d.cancel_request(request_id) if d is not None else None
    if job is None:
        return False
    feedback.set_message(
        f"Cancelling {wording.preview(job.prompt or job.attachment or 'the request')}..."
    )
    return True


def cancel_all() -> int:
    """Cancels the running batch and the pose requests in flight; how many were cancelled."""
    d = live.state.dispatcher
    if d is None:
        return 0
    count = d.cancel_all()
    if count:
        feedback.set_message(f"Cancelling {count} request(s)...", "WARNING")
    return count


def request_status(context: bpy.types.Context) -> None:
    service = live.service_for(context)
    try:
        live.dispatcher().request_status(service)
    except live.SEND_ERRORS as exc:
        raise live.UserError(f"Not asked: {live.send_problem(exc)}") from None
    runtime.ensure_timer()
    feedback.set_message(f"Asking {service.address} for its status...")
