"""`chatpose batch FILE.txt --out a.npz`: one prompt per line, streamed to the service and
keyed as an animation. A run cut short writes what was answered, beside a file the user has
(FILE.partial.npz), and `--resume` asks only the lines left."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from inference_service.cli_common import (
    EXIT_BAD_INPUT,
    EXIT_SERVICE_ERROR,
    CommandError,
    busy_timeout,
    check_out_writable,
    checked,
    exit_code_for_all,
    on_terminal,
    print_out,
    refused_busy,
    report,
    serving_client,
    waits_ms,
    write_motion,
)
from inference_service.commands import interrupts_deferred
from shared_protocol.batch_requests import BatchRequests
from shared_protocol.batch_text import (
    FileTooLargeError,
    prompt_lines,
    read_batch_file,
    unreadable,
)
from shared_protocol.pose import DEFAULT_FPS, Motion, Pose
from shared_protocol.protocol import (
    DEFAULT_LIMITS,
    BatchDoneReply,
    BatchItemReply,
    BatchRequest,
    ErrorCode,
    ErrorReply,
    ProtocolError,
)

# A batch's answers are also written this often while it runs, so that one killed outright
# keeps them (_SavedProgress).
PROGRESS_SAVE_S = 30.0
# How often a batch whose stderr is a log, not a terminal, says how far it is: a farm's log
# showed nothing for hours.
PROGRESS_LOG_S = 30.0
# Restarts one batch waits through in a row (`--wait`) with no answer between them: a service
# that fails as it starts is not waited for again and again.
MAX_RESTARTS_WAITED = 3


def run_batch(args: argparse.Namespace) -> int:
    run = _BatchRun(args)
    finished = False
    try:
        run.ask_every_line()
        finished = True
    finally:  # what was answered is written, and what was not is named, even half-way
        # A second Ctrl-C, or a `kill`, while the answers are written would lose them all.
        with interrupts_deferred():
            run.write_answers(finished)
            if args.json:
                print_out(json.dumps(run.summary(finished)))
    return run.exit_code()


class _BatchRun:
    """One `chatpose batch`: the prompt file's lines, the pose or the error each got so far
    (by line number), and where the answers go."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lines = _read_prompts(args.file)  # (line number in the file, prompt)
        partial = _partial_path(args.out)
        check_out_writable(args.out, inputs=[args.file], also=[partial])
        if partial.exists() and not args.resume:  # a run cut short again would write over it
            raise CommandError(
                EXIT_BAD_INPUT,
                f"{partial} holds the answers of a batch cut short or left with lines without "
                "a pose: add --resume to go on from them, or delete it to start over",
            )
        self.resumed_from, self.poses, fps = (
            _earlier_answers(args, self.lines) if args.resume else (None, {}, None)
        )
        self.fps = args.fps or fps or DEFAULT_FPS
        self.earlier = len(self.poses)  # answered by the file resumed
        self.failures: dict[int, tuple[ErrorCode, str]] = {}  # by line number: why no pose
        limit = DEFAULT_LIMITS.max_prompt_chars
        for number, prompt in self.lines:  # the service would refuse the whole request
            if number not in self.poses and len(prompt) > limit:
                message = f"{len(prompt)} characters; at most {limit}"
                self.failures[number] = (ErrorCode.TOO_LARGE, message)
        self.sendable = self._not_answered(self.lines)
        self.out_existed = args.out.exists()
        self.saved = _SavedProgress(
            _batch_destination(args.out, False, False, self.resumed_from, self.out_existed),
            self.earlier,
        )
        self.restarts = 0  # waited through in a row, with no answer between them
        self.out: Path | None = None  # where the answers belong, once the run ends
        self.written: Path | None = None  # where they went, if anywhere
        self.log_due = time.monotonic() + PROGRESS_LOG_S  # a log's next line on how far it is

    def _not_answered(self, lines: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        return [
            (n, prompt) for n, prompt in lines if n not in self.poses and n not in self.failures
        ]

    def ask_every_line(self) -> None:
        """Asks the service for the lines without an answer, in requests of as many lines as it
        takes (`BatchRequests` halves them for a service whose queue holds fewer)."""
        if not self.sendable:
            return
        with serving_client(self.args) as client:
            plan = BatchRequests([prompt for _, prompt in self.sendable])
            while (positions := plan.next()) is not None:
                asked = self.sendable[positions.start : positions.stop]
                request = BatchRequest(
                    client.new_id(),
                    [prompt for _, prompt in asked],
                    timeout_ms=waits_ms(self.args),
                )
                # With --wait, a service that stops mid-run (a restart) is waited for.
                waits_through = self.args.wait is not None and self.restarts < MAX_RESTARTS_WAITED
                replies = _until_gone(client.stream(request, self.args.timeout), waits_through)
                gone = self._take_replies(replies, plan, asked)
                if gone is not None:  # the lines not answered yet, asked again once it serves
                    self.restarts += 1
                    if on_terminal():
                        report("")  # past the progress bar's line
                    waiting = f"waiting up to {self.args.wait:g} s for it to serve again"
                    report(f"chatpose batch: {gone}; {waiting}")
                    self.sendable = self._not_answered(self.sendable[positions.start :])
                    plan = BatchRequests([prompt for _, prompt in self.sendable], plan.size)
                    client.wait_serving(self.args.wait)

    def _take_replies(self, replies, plan: BatchRequests, asked: list[tuple[int, str]]):
        """Takes one request's replies until it ends, or is to be sent again (smaller, or
        after a wait); the ServiceGone message when the service went away meanwhile."""
        for reply in replies:
            if isinstance(reply, ServiceGone):
                return reply.message
            self.restarts = 0
            if isinstance(reply, BatchDoneReply):
                continue  # every line it held is already counted
            if _queues_fewer(reply) and plan.in_smaller_requests():
                return None
            delay = plan.delay_before_again() if refused_busy(reply) else None
            if delay is not None:
                if on_terminal():
                    report("")  # past the progress bar's line
                report(f"chatpose batch: {reply.message}; asking again in {delay:g} s")
                time.sleep(delay)  # Ctrl-C stops it as any wait
                return None
            plan.taken()
            if isinstance(reply, BatchItemReply) and reply.poses:
                number, prompt = asked[reply.index]
                # Labelled with its line's prompt, which --resume matches it by.
                self.poses[number] = dataclasses.replace(reply.poses[0], label=prompt)
            elif isinstance(reply, ErrorReply) and reply.index is not None:
                busy = reply.code == ErrorCode.TIMEOUT
                message = busy_timeout(self.args) if busy else reply.message
                self.failures[asked[reply.index][0]] = (reply.code, message)
            elif not isinstance(reply, BatchItemReply):  # the whole request failed, or ended
                checked(reply, BatchItemReply)
            self.saved.offer(self.poses, self.fps)
            self._say_progress()
        return None

    def _say_progress(self) -> None:
        """A progress bar on a terminal (`_progress`); in a log, a line every PROGRESS_LOG_S,
        not one an answer."""
        done, total = len(self.poses) + len(self.failures), len(self.lines)
        if not on_terminal() and (now := time.monotonic()) >= self.log_due:
            report(f"chatpose batch: {done} of {total} lines answered")
            self.log_due = now + PROGRESS_LOG_S
        _progress(done, total)

    def write_answers(self, finished: bool) -> None:
        """Writes the answers where they belong (or, for a run cut short, where they keep the
        user's files), and says what was written and which lines got no pose, and why."""
        args, poses = self.args, self.poses
        if on_terminal() and self.sendable:
            report("")  # past the progress bar's line
        answered_all = len(poses) == len(self.lines)
        # A file another run wrote at --out meanwhile is as much the user's as one there
        # before: a run cut short does not replace it.
        out_existed = self.out_existed or (self.saved.path == args.out and self.saved.appeared())
        self.out = _batch_destination(
            args.out, finished, answered_all, self.resumed_from, out_existed
        )
        if not finished and len(poses) == self.earlier and self.resumed_from is not None:
            report(f"no new answers; {self.resumed_from} is kept as it was")
        elif poses:
            self.written = _write_or_rescue(self.out, [poses[i] for i in sorted(poses)], self.fps)
        elif finished:  # every line failed: the errors below say why
            report(f"no line got a pose; {args.out} was not written")
        if self.written is not None:
            gaps = " (a frame per answered line, in file order)" if not answered_all else ""
            kept = (
                f"; {args.out} is kept as it was"
                if self.written != args.out and out_existed
                else ""
            )
            report(f"wrote {len(poses)} of {len(self.lines)} poses to {self.written}{gaps}{kept}")
        if finished and self.written == args.out:
            _drop_answered_partial(args, self.lines, poses)
        for number, (code, message) in sorted(self.failures.items()):
            report(f"chatpose batch: line {number}: {code.value}: {message}")
        unanswered = [n for n, _ in self._not_answered(self.lines)]
        stopped_before_any = not finished and len(poses) == self.earlier == 0
        if unanswered and not stopped_before_any:  # else the cause, said last, is all
            resumable = self.written is not None or self.resumed_from is not None
            hint = "the same command with --resume asks only the lines without a pose"
            if self.written not in (None, self.out):  # --resume reads `out`, not the rescue
                hint = f"move {self.written} to {self.out}; then {hint}"
            hint = f" ({hint})"
            report(f"chatpose batch: not answered: {_line_ranges(unanswered)}{hint * resumable}")

    def summary(self, finished: bool) -> dict:
        """What `--json` prints once `write_answers` has run."""
        return {
            "finished": finished,
            "lines": len(self.lines),
            "written": None if self.written is None else str(self.written),
            "posed": sorted(self.poses),
            "failed": [
                {"line": number, "code": code.value, "message": message}
                for number, (code, message) in sorted(self.failures.items())
            ],
            "not_answered": [number for number, _ in self._not_answered(self.lines)],
        }

    def exit_code(self) -> int:
        """For a run that ended (`write_answers` has run)."""
        if self.poses and self.written != self.out:  # elsewhere, or lost: not where asked for
            return EXIT_BAD_INPUT
        if self._not_answered(self.lines):  # finished, yet lines got neither pose nor error
            return EXIT_SERVICE_ERROR
        return exit_code_for_all([code for code, _ in self.failures.values()])


def _queues_fewer(reply) -> bool:
    """The service refused a whole batch request as more than its queue holds
    (chatpose-serve --max-queue): fewer prompts a request may fit."""
    return (
        isinstance(reply, ErrorReply) and reply.index is None and reply.code == ErrorCode.TOO_LARGE
    )


@dataclasses.dataclass(frozen=True)
class ServiceGone:
    """The service stopped answering a request: it went away, or said it is stopping."""

    message: str


def _until_gone(replies, waits_through: bool):
    """``replies`` as they come; with ``waits_through``, a service that goes away or says it
    is stopping ends them with a ServiceGone instead of an error (the replies that came before
    are kept)."""
    try:
        for reply in replies:
            if waits_through and isinstance(reply, ErrorReply):
                if reply.index is None and reply.code == ErrorCode.SHUTTING_DOWN:
                    yield ServiceGone(reply.message)
                    return
            yield reply
    except ProtocolError as exc:
        if not waits_through or exc.code != ErrorCode.UNREACHABLE:
            raise
        yield ServiceGone(exc.message)


def _earlier_answers(
    args: argparse.Namespace, lines: Sequence[tuple[int, str]]
) -> tuple[Path | None, dict[int, Pose], float | None]:
    """For --resume: the earlier file to go on from, its poses by the line each answers, and
    its frame rate. FILE.partial.npz when it is there, even with fewer answers than --out: it
    holds the newest run's (one without --resume is refused while it is there), which may be
    a new model's, asked again on purpose; refused when it does not fit the prompts (a run cut
    short would write over it). Else --out itself."""
    partial = _partial_path(args.out)
    if partial.exists():  # a run without --resume is refused while it is there (run_batch)
        path, start_over = partial, f"move or delete {partial}"
    elif args.out.exists():
        path, start_over = args.out, "run without --resume"
    else:
        report(
            f"chatpose batch: nothing to resume ({args.out} is not there yet): asking every line"
        )
        return None, {}, None
    answered, fps = _answers_in(path, lines, args.file, start_over)
    report(f"resuming {path}: {len(answered)} of {len(lines)} lines answered there")
    return path, answered, fps


def _drop_answered_partial(
    args: argparse.Namespace, lines: Sequence[tuple[int, str]], poses: dict[int, Pose]
) -> None:
    """After a batch finished into --out: FILE.partial.npz, left by a run cut short, goes when
    --out now answers every line it answers (a later --resume would only take it up again);
    one that holds answers --out lacks stays, and is named."""
    partial = _partial_path(args.out)
    if not partial.exists():
        return
    try:
        answered = _answers_in(partial, lines, args.file, f"move or delete {partial}")[0]
    except CommandError:
        answered = None  # from another prompt file, or edited since: not this run's to judge
    if answered is not None and answered.keys() <= poses.keys():
        with contextlib.suppress(OSError):  # left, it is only resumed again
            partial.unlink()
        return
    report(f"chatpose batch: {partial} is kept: it holds answers that {args.out} does not")


def _answers_in(
    path: Path, lines: Sequence[tuple[int, str]], prompts: Path, start_over: str
) -> tuple[dict[int, Pose], float]:
    """The poses of a batch's earlier file by the line each answers. Each frame is labelled with
    its line's prompt and the frames are in file order, so frame by frame the next line with
    that prompt is the one it answers. A file that answers no line in order is refused, saying
    how to ``start_over``."""
    try:
        motion = Motion.load_npz(path)
    except (OSError, ValueError) as exc:
        raise CommandError(EXIT_BAD_INPUT, f"--resume: cannot read {path} ({exc})") from None
    answered: dict[int, Pose] = {}
    remaining = iter(lines)
    for frame, pose in enumerate(motion.poses(), 1):
        # The same text in Unicode's composed or decomposed form ("é" typed on a Mac, or
        # saved again by another editor) looks the same and is the same prompt.
        label = unicodedata.normalize("NFC", pose.label or "")
        number = next(
            (n for n, prompt in remaining if unicodedata.normalize("NFC", prompt) == label), None
        )
        if number is None:
            raise CommandError(
                EXIT_BAD_INPUT,
                f"--resume: frame {frame} of {path} ({pose.label!r}) answers no line of "
                f"{prompts} in order; if {prompts} was edited since, {start_over} to start over",
            )
        answered[number] = pose
    return answered, motion.fps


def _batch_destination(
    out: Path, finished: bool, answered_all: bool, resumed_from: Path | None, out_existed: bool
) -> Path:
    """Where a batch writes: --out when it finished with a pose for every line, or without
    some when it resumed --out (its answers are among this run's); else (cut short, or lines
    without a pose) --out if it was new, or FILE.partial.npz beside it (which holds the poses
    of a partial file it resumed, and more): such a run never replaces a file the user already
    has, which may answer the lines this one did not."""
    if finished and (answered_all or resumed_from == out):
        return out
    partial = _partial_path(out)
    return partial if out_existed or resumed_from == partial else out


class _SavedProgress:
    """A running batch's answers, written every PROGRESS_SAVE_S to where a batch cut short
    writes them: one killed outright (SIGKILL, the OOM killer, a power cut), whose `finally`
    never runs, keeps what it got, and --resume goes on from it. A failed write is said once;
    the answers are still written at the end."""

    def __init__(self, path: Path, count: int) -> None:
        """`count`: the answers a resumed run starts with, in a file already."""
        self.path, self.count, self.failed = path, count, False
        self.due = time.monotonic() + PROGRESS_SAVE_S
        self.expected = _file_identity(path)  # what is there: a resumed file, or none

    def appeared(self) -> bool:
        """Whether another program (another batch) wrote `path` since this run looked."""
        found = _file_identity(self.path)
        return found is not None and found != self.expected

    def offer(self, poses: dict[int, Pose], fps: float) -> None:
        if self.failed or len(poses) == self.count or time.monotonic() < self.due:
            return
        if self.appeared():
            self.failed = True
            report(
                f"chatpose batch: {self.path} was written by another program meanwhile; the "
                "answers are kept here and written at the end"
            )
            return
        try:
            write_motion(self.path, [poses[i] for i in sorted(poses)], fps)
            self.expected = _file_identity(self.path)
        except CommandError as exc:
            self.failed = True
            report(f"chatpose batch: {exc}; the answers are kept here and written at the end")
        self.count, self.due = len(poses), time.monotonic() + PROGRESS_SAVE_S


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """What tells a file at `path` from another written there since (each write replaces it
    with a new one); None when there is none."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns, found.st_size


def _line_ranges(numbers: Sequence[int]) -> str:
    """Line numbers as the reader would write them: [3, 4, 5, 9] -> 'lines 3-5, 9'."""
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"line {text}" if len(numbers) == 1 else f"lines {text}"


def _read_prompts(path: Path) -> list[tuple[int, str]]:
    """The file's prompts (`batch_text`), each with its line number (from 1)."""
    try:
        text = read_batch_file(path)
    except OSError as exc:
        raise CommandError(EXIT_BAD_INPUT, f"cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise CommandError(EXIT_BAD_INPUT, f"{path} {unreadable(exc)}") from None
    except FileTooLargeError as exc:
        raise CommandError(EXIT_BAD_INPUT, f"{path} is {exc}") from None
    lines = prompt_lines(text)
    if not lines:
        raise CommandError(EXIT_BAD_INPUT, f"{path} has no prompts (one per line)")
    return lines


def _partial_path(path: Path) -> Path:
    """Where a batch cut short writes when `path` exists: anim.npz -> anim.partial.npz."""
    return path.with_name(f"{path.stem}.partial{path.suffix or '.npz'}")


def _write_or_rescue(path: Path, poses: list[Pose], fps: float) -> Path | None:
    """Where a batch's answers were written: `path`, or when that fails (a full disk, a folder
    removed meanwhile) a file in the temporary folder, named, so that a long batch's answers
    outlive a failed write. None, said, when neither can be written."""
    try:
        write_motion(path, poses, fps)
        return path
    except CommandError as exc:
        report(f"chatpose batch: {exc}")
    # Named after --out, shortened: a name that was too long may be why the write failed.
    rescue = Path(tempfile.gettempdir()) / f"{path.stem[:64]}.rescued-{os.getpid()}.npz"
    try:
        write_motion(rescue, poses, fps)
    except CommandError as exc:
        report(f"chatpose batch: {exc}; the {len(poses)} answers are lost")
        return None
    report(f"chatpose batch: the answers are in {rescue} instead")
    return rescue


def _progress(done: int, total: int) -> None:
    """The progress bar, after each answer, drawn on a terminal only (`_BatchRun._say_progress`
    says how far it is in a log)."""
    if not on_terminal():
        return
    width = 30
    filled = width * done // total
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
        end="",
        file=sys.stderr,
        flush=True,
    )
