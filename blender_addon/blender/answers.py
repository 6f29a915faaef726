"""Applying what the service sends back, on the main thread (``runtime.timer_tick``): poses onto
armatures, exchanges into the scene's chat history, batch lines keyed and recorded, and a
batch's end reported."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import bpy
import numpy as np

from shared_protocol.pose import Pose
from shared_protocol.protocol import ErrorCode, PoseReply

from ..core import batch_plan, chat, wording
from ..core.batch_plan import BatchRun
from ..core.batch_record import BatchRecord
from ..core.dispatch import (
    BatchEnded,
    BatchLineFailed,
    BatchLineReady,
    PoseAnswered,
    PoseFailed,
    PoseJob,
    StatusAnswered,
    StatusFailed,
)
from ..core.service_process import EXITED
from ..core.wording import quoted
from . import feedback, live
from .anim import LockedCurveError, animated, muted_note
from .armature import is_deleted, is_smpl_armature, why_not_smpl
from .batch_store import key_batch_lines, load_record, settle_batch_keys
from .people import apply_people, refuse_locked_people
from .posing import auto_key_options, placed_on_floor, pose_channels
from .props import append_history, pack_chat_image


@dataclass(frozen=True)
class BatchLines:
    """Consecutive ``BatchLineReady`` outcomes of one run."""

    items: list


def count_answers(backlog) -> int:
    """How many of the outcomes waiting are answers to a request (a batch's end or a status
    reply is none)."""
    return sum(not isinstance(o, BatchEnded) for o in backlog)


def apply_outcome(outcome) -> None:
    match outcome:
        case PoseAnswered():
            _pose_answered(outcome)
        case PoseFailed():
            _pose_failed(outcome)
        case StatusAnswered():
            status = outcome.status
            live.state.service_line = (
                f"{status.model} on {status.device} ({status.dtype}), "
                f"chatpose {status.version}, {_images_taken(status.max_images)}"
            )
            local = live.service_process().instance
            live.state.service_line_instance = local if status.instance == local else None
            live.state.service_line_address = outcome.job.address
            if not outcome.job.probe:
                feedback.notify(f"Service: {live.state.service_line}")
            elif status.instance in (None, local):  # None: an older service
                live.local_service_ready()
                feedback.notify(f"Local service ready: {live.state.service_line}")
                live.state.message_of_ready_local = True
            # Else another service listens there, where ours is failing to (it exits, and
            # runtime.watch_local_service says why).
        case StatusFailed():
            if not outcome.job.probe:
                starting = outcome.code == ErrorCode.UNREACHABLE and _local_service_starting()
                message = _failure_text(outcome.message, outcome.code)
                live.state.service_line = f"{live.UNAVAILABLE}{message}"
                live.state.service_line_instance = None
                live.state.service_line_address = outcome.job.address
                # A model still loading is no failure: the service is there, and will serve.
                level = "WARNING" if outcome.code == ErrorCode.BUSY or starting else "ERROR"
                feedback.notify(f"Service: {message}", level)
        case BatchLineReady():
            _batch_lines([outcome])
        case BatchLines():
            _batch_lines(outcome.items)
        case BatchLineFailed():
            pass  # counted by the run; reported when it ends
        case BatchEnded():
            _batch_ended(outcome.run)


def _images_taken(count: int) -> str:
    return f"up to {count} image{'s' if count != 1 else ''} a request" if count else "no images"


def _pose_answered(outcome: PoseAnswered) -> None:
    job, reply = outcome.job, outcome.reply
    poses = reply.poses
    scene = find_by_uid(bpy.data.scenes, job.scene, job.scene_uid)
    cut = (
        "; the reply was cut at the service's limit of new tokens (chatpose-serve "
        "--max-new-tokens), before the model ended it"
        if reply.truncated
        else ""
    )
    unseen = (  # INFO, not WARNING: leaving the oldest turns out is how a long chat fits
        f"; the model did not see the chat's {reply.history_left_out // 2} oldest exchange(s) "
        "sent, which with the reply would not fit its context"
        if reply.history_left_out
        else ""
    )
    if not poses:
        _record_exchange(scene, job, reply, problem=None)
        text = f"Reply without a pose: {chat.clean_text(reply.text)[:120]}{cut}{unseen}"
        feedback.notify(text, "WARNING" if cut else "INFO")
        return
    try:
        target, problem, frame, unkeyed = _where_to_apply(job, poses)
    except BaseException as exc:  # the prompt and its answer are not lost with it
        _record_exchange(scene, job, reply, problem=f"the answer was not applied ({exc})")
        raise
    _record_exchange(scene, job, reply, problem)
    if problem is not None:
        feedback.notify(f"{problem[0].upper()}{problem[1:]}", "ERROR", popup=True)
        return
    try:
        result = apply_people(
            bpy.context,
            target,
            poses,
            frame=frame,
            use_translation=job.use_translation,
            on_floor=job.keep_on_floor,
            spacing=job.spacing,
            key_options=auto_key_options(bpy.context) if job.auto_key else frozenset(),
        )
    except Exception:  # half way: what did change is one undo step, not part of the user's next
        feedback.push_undo("answer")
        raise
    feedback.push_undo("answer")
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
    if frame is None and not unkeyed and animated(target, pose_channels(target, False)):
        text += (
            f"; not keyed: {target.name}'s animation puts its own pose back at the next frame "
            "change (Insert Keyframe or Auto Keying keys an answer)"
        )
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
    feedback.notify(text + unseen, level)


def _record_exchange(
    scene: bpy.types.Scene | None, job: PoseJob, reply: PoseReply, problem: str | None
) -> None:
    """The answer's exchange in the scene's chat history, an undo step of its own before the
    poses': undoing a pose the animator does not want keeps it, and chat mode's context with
    it. An answer not applied (``problem``: its armature gone, a locked channel) is a failed
    exchange, which the next turns do not send as context, and its prompt is given back."""
    if scene is None:
        return
    if problem is None:
        exchange = chat.exchange(
            job.prompt, reply.text, attachment=job.attachment, poses=len(reply.poses)
        )
        append_history(scene, exchange, _kept_image(job))
    else:
        exchange = chat.exchange(job.prompt, problem, attachment=job.attachment, failed=True)
        append_history(scene, exchange, failed_turn_image(job, problem))
        give_prompt_back(scene, job.prompt)
    feedback.push_undo("chat")


def _where_to_apply(
    job: PoseJob, poses: Sequence[Pose]
) -> tuple[bpy.types.Object | None, str | None, int | None, str]:
    """(target, problem, frame, unkeyed) for an answer's poses: the armature they go on, why
    they cannot (None when they can), the frame to key them at (None: posed unkeyed, and
    ``unkeyed`` says why). Found before anything changes."""
    target = find_by_uid(bpy.data.objects, job.armature, job.armature_uid)
    problem = _armature_problem(job.armature, target)
    if problem is not None:
        return target, f"{problem}; the answer was not applied", job.frame, ""
    if job.frame is None:
        return target, None, None, ""
    # The model's poses carry no translation: the location is then neither set nor keyed,
    # unless Keep on Floor places them. A locked location leaves that person off the floor
    # (apply_people says so).
    own = job.use_translation and any(p.translation is not None for p in poses)
    try:
        refuse_locked_people(target, len(poses), own)
    except LockedCurveError as exc:
        if job.auto_key:  # posed as Blender's Auto Keying poses it: unkeyed
            return target, None, None, f"; not keyed (Auto Keying): {exc}"
        return target, f"the answer was not applied to {quoted(target.name)}: {exc}", job.frame, ""
    return target, None, job.frame, ""


def _armature_problem(name: str, obj: bpy.types.Object | None) -> str | None:
    """Why a request's armature (``name`` when it went out; ``obj`` now) cannot be posed: the
    user deleted it, or changed it into something that is no SMPL armature; None when it can."""
    if obj is None or is_deleted(obj):
        now = bpy.data.objects.get(name)
        if now is not None and now != obj and not is_deleted(now):  # the user made another
            return (
                f"the armature {quoted(name)} it went out for was deleted; this "
                f"{quoted(name)} is another"
            )
        return f"the armature {quoted(name)} is gone"
    if not is_smpl_armature(obj):
        return f"the armature {quoted(obj.name)} is no longer an SMPL armature: {why_not_smpl(obj)}"
    return None


def find_by_uid(collection, name: str, uid: int | None):
    """A request's armature or scene in `collection` (bpy.data.objects, .scenes): by session
    id, so that renaming it (or naming another one like it) while the answer is on its way
    changes nothing; by name without one."""
    if uid is None:
        return collection.get(name)
    # Not renamed, as a rule: the name's lookup (Blender's own, in C) spares a Python loop
    # over every object reading each one's session id.
    named = collection.get(name)
    if named is not None and named.session_uid == uid:
        return named
    return next((item for item in collection if item.session_uid == uid), None)


def _kept_image(job: PoseJob) -> bpy.types.Image | None:
    """The image a chat turn's exchange keeps for the turns after it: its own, packed, or the
    chat's that it sent again (None: it sent none, or that one was removed since)."""
    if job.chat_image:
        return pack_chat_image(job.chat_image, job.attachment)
    return (job.resent_image and find_by_uid(bpy.data.images, *job.resent_image)) or None


def failed_turn_image(job: PoseJob, message: str) -> bpy.types.Image | None:
    """The image a failed (or unanswered) turn's exchange keeps, so that its prompt, given
    back, goes with it again; none when the image is what the service refused."""
    return None if _image_refused(job, message) else _kept_image(job)


def _image_refused(job: PoseJob, message: str) -> bool:
    return chat.refuses_image(job.attachment, message)


def _pose_failed(outcome: PoseFailed) -> None:
    job = outcome.job
    message = _failure_text(outcome.message, outcome.code)
    if job.attachment and message.startswith("images[0]: "):  # the user knows it by its name
        message = f"{job.attachment}: {message.removeprefix('images[0]: ')}"
    if job.resent_image and _image_refused(job, message):
        message += (
            f" ({job.attachment} is the chat's image, sent again with this turn; the turns "
            "after it go without it)"
        )
    scene = find_by_uid(bpy.data.scenes, job.scene, job.scene_uid)
    if scene is not None:
        append_history(
            scene,
            chat.exchange(job.prompt, message, attachment=job.attachment, failed=True),
            failed_turn_image(job, message),
        )
        give_prompt_back(scene, job.prompt)
        feedback.push_undo("chat")
    if outcome.code == ErrorCode.CANCELLED:  # the user's own Cancel: said, not alarmed
        feedback.notify(
            f"Cancelled: {wording.preview(job.prompt or job.attachment or 'the request')}"
        )
        return
    what = f", {wording.preview(job.prompt, 40)}" if job.prompt else ""  # an image's is named
    feedback.notify(f"Not answered{what}: {message}", "ERROR", popup=True)


def give_prompt_back(scene: bpy.types.Scene, prompt: str) -> None:
    """Puts an unanswered prompt back in the field, to send again; never over what was typed
    since."""
    if prompt and not scene.chatpose.prompt.strip():
        scene.chatpose.prompt = prompt


LOCAL_SERVICE_STARTING = "the local service is still starting (loading its model)"


def _failure_text(message: str, code: ErrorCode | None) -> str:
    """A failure's message with what the local service started here says of it; for one at
    its address while it starts, that alone: "no service at ...; Start Local Service" would
    contradict it."""
    if code == ErrorCode.UNREACHABLE and _local_service_starting():
        live.state.service_line_address = ""  # what the last check said no longer holds
        return f"{LOCAL_SERVICE_STARTING}; try again once it is ready"
    return message + _why_unreachable(code)


def _why_unreachable(code: ErrorCode | None) -> str:
    """What the local service started here says about a failure: for an unreachable service
    at its address, how it ended, and else where it listens instead; where its log is, for an
    internal error (whose message says "see the service log"); "" otherwise."""
    if code == ErrorCode.INTERNAL_ERROR:
        return _local_service_log()
    if code != ErrorCode.UNREACHABLE:
        return ""
    live.state.service_line_address = ""  # what the last check said no longer holds
    if not _local_service_asked():
        return _local_service_elsewhere()
    return _local_service_exit()


def _local_service_asked() -> bool:
    """Whether the address asked is where the local service started here listens: another
    service's failure says nothing of it (it was blamed on a local service exited before)."""
    return live.state.process is not None and live.state.local_address == live.dispatcher().address


def _local_service_starting() -> bool:
    """Started here, at the address asked (and still set), not ready yet, and not exited (which
    the timer may not have seen yet)."""
    return (
        live.state.waiting_ready
        and not live.state.address_left_local
        and _local_service_asked()
        and live.state.process.poll().alive
    )


def _local_service_elsewhere() -> str:
    """Where the local service started here listens, when that is not the address asked."""
    process, asked = live.state.process, live.dispatcher().address
    if process is None or not process.poll().alive or live.state.local_address == asked:
        return ""
    return (
        f" (the local service started here listens on {live.state.local_address}: set that "
        "Service Address again, or Stop it and Start it on this one)"
    )


def _local_service_exit() -> str:
    """Why the local service started here is gone, to add to a failure; "" when it is not."""
    if live.state.process is None or live.state.process.poll().state != EXITED:
        return ""
    return f" (the local service {live.local_service_ended()})"


def _local_service_log() -> str:
    """Where the log of the local service started here is, to add to a failure; "" when none
    was started."""
    if live.state.process is None or live.state.process.pid is None:
        return ""
    return f" (the local service's log: {live.state.process.log_path})"


def _batch_lines(outcomes: list[BatchLineReady]) -> None:
    """Keys and records lines of one run (keys first, then the record: see batch_store)."""
    run = outcomes[0].run
    obj = find_by_uid(bpy.data.objects, run.armature, run.armature_uid)
    problem = _batch_target_problem(run, obj)
    if problem is None and run.take is not None:
        problem = run.take.moved(obj)
    if problem is not None:
        for outcome in outcomes:
            run.item_failed(outcome.line, problem)
        run.stop(problem)
        live.dispatcher().cancel_batch()
        return
    items = [(o.line, o.poses[0]) for o in outcomes]
    try:
        if run.keep_on_floor:  # where the root stood when the run started: the keys change it
            lines, poses = zip(*items, strict=True)
            places = np.stack([run.root_places[line.frame] for line in lines])
            poses = placed_on_floor(obj, poses, places, keep_translations=run.use_translation)
            items = list(zip(lines, poses, strict=True))
        key_batch_lines(obj, items, use_translation=run.use_translation, on_floor=run.keep_on_floor)
    except Exception as exc:
        for line, _ in items:
            run.item_failed(line, f"could not key it ({exc})")
        if isinstance(exc, LockedCurveError):  # locked during the run: no later line keys
            run.stop(str(exc))
            live.dispatcher().cancel_batch()
        return
    if run.take is not None:
        run.take = run.take.kept(obj)
    for line, _ in items:
        run.item_keyed(line)
    if _file_saved():  # saved during the run: marked changed again, or quitting would not ask
        feedback.push_undo("batch")


def _file_saved() -> bool:
    """Whether the .blend is saved as it is: Blender marks it changed only with an undo step,
    which a batch makes at its end."""
    return not bpy.data.is_dirty


def _batch_target_problem(run: BatchRun, obj: bpy.types.Object | None) -> str | None:
    """Why the run's armature can take no more lines, or None; its name in the run's reports
    becomes the one it has now (the user may rename it during a run)."""
    if obj is not None and not is_deleted(obj):
        run.armature = obj.name
    return _armature_problem(run.armature, obj)


def _settle_batch(run: BatchRun) -> None:
    """What keying a run's lines left for later (``batch_store.settle_batch_keys``): done at
    its end, and before the file is saved or the add-on disabled during it."""
    obj = find_by_uid(bpy.data.objects, run.armature, run.armature_uid)
    settle_batch_keys(obj if obj is not None and not is_deleted(obj) else None)


def settle_running_batch() -> None:
    d = live.state.dispatcher
    if d is not None and d.batch_running:
        with contextlib.suppress(ValueError):  # a damaged record: the run's end reports it
            _settle_batch(d.batch)


def _batch_ended(run: BatchRun) -> None:
    obj = find_by_uid(bpy.data.objects, run.armature, run.armature_uid)
    with contextlib.suppress(ValueError):  # a damaged record: the next run reports it
        _settle_batch(run)  # every take it keyed, its own moved away or not
    if _batch_target_problem(run, obj) is None and (run.take is None or not run.take.moved(obj)):
        with contextlib.suppress(ValueError):
            _recheck(run, load_record(obj))
    run.close()
    # Not for an armature the user deleted: its step would come after the delete's, and the
    # first Ctrl+Z would then change nothing visible before the next brought it back.
    if run.keyed and obj is not None and not is_deleted(obj):
        feedback.push_undo("batch")
    level = _summary_level(run)
    popup = level == "ERROR"
    if run.failure_code == ErrorCode.UNREACHABLE and _local_service_starting():
        run.reason = LOCAL_SERVICE_STARTING  # not "no service at ...; Start Local Service"
    summary = run.summary()
    if run.state == batch_plan.FAILED:
        exited = _local_service_exit() if _local_service_asked() else ""
        summary += _why_unreachable(run.failure_code) or exited
    if run.keyed and _batch_target_problem(run, obj) is None:
        keys_location = run.use_translation or run.keep_on_floor
        if muted := muted_note(obj, pose_channels(obj, keys_location)):
            summary += f"; {muted}"
            level = "WARNING" if level == "INFO" else level
    feedback.notify(summary, level, popup=popup)
    feedback.update_status_bar()


_SEVERITY = ("INFO", "WARNING", "ERROR")


def _summary_level(run: BatchRun) -> str:
    """How the end of a run is told: an error when it stopped with lines to key (a popup), a
    warning when it left lines for later, else information (its summary says done: it is)."""
    if run.state == batch_plan.FAILED and run.remaining:
        return "ERROR"
    return "WARNING" if run.remaining else "INFO"


def run_keying_again() -> BatchRun | None:
    """The run still going on (not closed) with lines an undo took back: the timer keys them
    again (``runtime._next_outcome``), before the lines still to come."""
    run = live.current_batch()
    return run if run is not None and not run.closed and run.taken_back else None


def recount_after_undo() -> None:
    """After an undo or redo (the timer's first call after ``runtime``'s handler marked it):
    the last run's counts made true again from its armature's record (``BatchRun.recheck``).
    A run makes its undo step only when it ends, so an undo of one of the user's steps in
    between goes back past the lines keyed since the step before: those count as taken back,
    and while the run goes on the timer keys them again from their answers
    (``run_keying_again``), once answers may be applied (not while the user can redo); a redo
    that brings them back counts them keyed. A run that has ended keys nothing more: the
    message that told its end is corrected (the batch panel shows ``run.summary()`` as it is).

    The record is read, not the keys: it is undone with them (both on the action, written in
    the same timer call, with no undo step between), costs one parse where reading every
    bone's curve at every frame would cost the whole animation, and says which lines the run
    keyed, whatever the animator keyed at those frames."""
    run = live.current_batch()
    if run is None:
        return
    obj = find_by_uid(bpy.data.objects, run.armature, run.armature_uid)
    if obj is not None and run.take is not None and run.take.moved(obj):
        return  # it shows another take now, whose record says nothing of the run's lines
    told = run.summary()
    try:
        record = load_record(obj) if obj is not None else BatchRecord()  # undone out of the file
    except ValueError:  # a damaged record: the run's end, or the next run, reports it
        return
    _recheck(run, record)
    summary = run.summary()
    message = live.state.message
    if run.closed and summary != told and message.startswith(told):
        added = message[len(told) :]  # what the end said past the summary (muted channels, ...)
        level = _summary_level(run)
        if added and _SEVERITY.index(live.state.level) > _SEVERITY.index(level):
            level = live.state.level
        feedback.set_message(summary + added, level)
        feedback.redraw()


def _recheck(run: BatchRun, record: BatchRecord) -> None:
    """The run's counts as ``record`` (its armature's) has its lines (``BatchRun.recheck``)."""
    run.recheck(
        lambda line: record.is_keyed(
            line.line, line.text, line.frame, run.use_translation, run.keep_on_floor
        )
    )
