"""One "batch keyframe from text" run: the pending lines, split into batch requests, and how far
the run has come.

``batch_record.pending`` says which lines still need a key; a run sends them as ``batch``
requests (``shared_protocol.batch_requests``, as `chatpose batch` does), one after the other,
and keeps count as the items stream in. Each item is keyed and recorded by the caller
as it arrives, so whatever ends the run (done, cancelled, the service gone) leaves the record
telling exactly which lines are keyed: the next run sends only the rest. An undo during the run
takes back the lines keyed since the step it goes back to (the run makes its step when it
ends); the run keeps each line's pose, to key those again (``recheck``, ``lines_to_key_again``).

States: ``running`` -> (``cancelling`` ->) ``finished`` | ``cancelled`` | ``failed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import InitVar, dataclass, field
from functools import cached_property

from shared_protocol.batch_requests import MAX_BATCH_ITEMS, BatchRequests
from shared_protocol.pose import Pose
from shared_protocol.protocol import DEFAULT_LIMITS, ErrorCode

from .batch_record import PendingLine

# What the service refuses a line for that the line's own text causes: the same text is
# refused again.
REFUSED_FOR_THE_TEXT = frozenset(
    {ErrorCode.EMPTY_PROMPT, ErrorCode.TOO_LARGE, ErrorCode.UNSUPPORTED_INPUT, ErrorCode.BAD_SCHEMA}
)

RUNNING = "running"
CANCELLING = "cancelling"
FINISHED = "finished"
CANCELLED = "cancelled"
FAILED = "failed"
ENDED = (FINISHED, CANCELLED, FAILED)


@dataclass
class BatchRun:
    """A run over ``pending`` lines of a text of ``total_lines`` prompts, keyed on the armature
    named ``armature``: with the root's location from a pose's own translation
    (``use_translation``), and for the other poses placed on the floor (``keep_on_floor``).

    The dispatcher moves the run through its requests (``next_prompts``, ``line_for``,
    ``request_finished`` ...); the bpy side reports each line it keyed (``item_keyed``) or could
    not key (``item_failed``), and ``close()`` once it has shown the end of the run. Lines are
    counted by their line number, so reports that come after the next request went out still
    count right."""

    armature: str  # its name, for messages
    source: str  # what the lines came from, for messages ("Text 'moves'", "moves.txt")
    pending: list[PendingLine]
    total_lines: int
    use_translation: bool = False
    keep_on_floor: bool = False
    # Where the root stood at each pending line's frame when the run started (the bpy side's
    # SMPL translations): a line keyed on the floor keeps that place across it.
    root_places: dict = field(default_factory=dict, repr=False)
    armature_uid: int | None = None  # the armature's session id, which a rename keeps
    take: object = None  # what the keys go into (the bpy side's action and slot), kept there
    # Each prompt's line in its text (blank and # lines are no prompts), for messages; without
    # them a prompt is named by its count.
    line_numbers: Sequence[int] = ()
    # The text's lines keyed by earlier runs (not pending): an undo may take them back too.
    keyed_before: Sequence[PendingLine] = ()
    chunk_size: InitVar[int] = MAX_BATCH_ITEMS  # prompts a request at most
    state: str = RUNNING
    reason: str = ""  # why a run failed, or why the add-on stopped it (`stop`)
    failure_code: ErrorCode | None = None  # the service's code for ``reason``, when it gave one
    closed: bool = False  # the bpy side has applied the end of the run
    # When the request the service refused as busy is sent again (the dispatcher's clock).
    retry_at: float | None = None
    _plan: BatchRequests = field(init=False, repr=False)
    _keyed: set[int] = field(default_factory=set, repr=False)
    # Lines keyed, then taken back by an undo (the record no longer holds them).
    _taken_back: set[int] = field(default_factory=set, repr=False)
    # Lines keyed by earlier runs that an undo took back: the run has no answer to key them
    # from, and a rerun keys them.
    _undone_before: set[int] = field(default_factory=set, repr=False)
    # The service's pose of each line answered, by line: what a line taken back is keyed from
    # again (a reference to the decoded answer, under 1 KB a line).
    _poses: dict[int, Pose] = field(default_factory=dict, repr=False)
    _failed: dict[int, tuple[PendingLine, str]] = field(default_factory=dict, repr=False)
    _refused_texts: set[int] = field(default_factory=set, repr=False)  # of the failed lines

    def __post_init__(self, chunk_size: int) -> None:
        self._plan = BatchRequests([line.text for line in self.pending], chunk_size)

    # --- progress -------------------------------------------------------------------------

    @property
    def planned_requests(self) -> int:
        return self._plan.planned

    @property
    def requests(self) -> int:
        """Batch requests sent."""
        return self._plan.sent

    @property
    def keyed(self) -> int:
        return len(self._keyed)

    @property
    def taken_back(self) -> int:
        """Lines keyed, then taken back by an undo, not keyed again yet."""
        return len(self._taken_back)

    @property
    def failed_lines(self) -> list[tuple[PendingLine, str]]:
        return [self._failed[k] for k in sorted(self._failed)]

    @property
    def already_keyed(self) -> int:
        """Lines keyed by earlier runs (not pending when this one started), less those an undo
        took back since."""
        return self.total_lines - len(self.pending) - len(self._undone_before)

    @property
    def done(self) -> int:
        return self.already_keyed + self.keyed

    @property
    def fraction(self) -> float:
        return self.done / self.total_lines if self.total_lines else 1.0

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def remaining(self) -> int:
        """Lines of the text without a key now."""
        return self.total_lines - self.done

    @property
    def message(self) -> str:
        return self.summary() if self.ended else self.status_text()

    def running_text(self) -> str:
        """What another Batch Keyframe is told: which run holds it back, wherever it runs."""
        return f"A batch from {self.source} is running on {self.armature}"

    def status_text(self) -> str:
        text = f"ChatPose batch: {self.done}/{self.total_lines} lines keyed on {self.armature}"
        if self._failed:
            text += f", {len(self._failed)} failed"
        if self._taken_back:
            text += f", {len(self._taken_back)} taken back by an undo"
        if self.state == CANCELLING:
            text += " (cancelling)"
        elif self.retry_at is not None:
            text += " (the service is busy: asking again shortly)"
        return text

    # --- requests -------------------------------------------------------------------------

    def next_prompts(self) -> list[str] | None:
        """Moves on to the next chunk and returns its prompts; None when there is none (or the
        run is stopping)."""
        request = self._plan.next() if self.state == RUNNING else None
        if request is None:
            return None
        self.retry_at = None
        return [self.pending[position].text for position in request]

    def line_for(self, index: int) -> PendingLine | None:
        """The line that item ``index`` of the current request answers (None if out of range)."""
        request = self._plan.current
        return self.pending[request[index]] if 0 <= index < len(request) else None

    # --- events ---------------------------------------------------------------------------

    def item_answered(self, line: PendingLine, pose: Pose) -> None:
        """The service answered ``line`` with ``pose``, kept to key it again should an undo take
        it back."""
        self._poses[line.line] = pose

    def item_keyed(self, line: PendingLine) -> None:
        """``line`` was keyed and recorded."""
        self._failed.pop(line.line, None)
        self._taken_back.discard(line.line)
        self._keyed.add(line.line)

    def recheck(self, recorded: Callable[[PendingLine], bool]) -> int:
        """After an undo or redo: keyed lines that ``recorded`` (the armature's record) no
        longer holds are taken back, to be keyed again from their answers
        (``lines_to_key_again``); lines taken back that it holds again (a redo brought them
        back) are keyed; lines keyed by earlier runs (``keyed_before``) that it no longer holds
        are counted still to key. So the counts say what is there. Returns how many lines it
        took back.
        (A line reported keyed without its answer, which only a test does, is only forgotten.)"""
        lost = {line.line for line in self._lines(sorted(self._keyed)) if not recorded(line)}
        back = {line.line for line in self._lines(sorted(self._taken_back)) if recorded(line)}
        self._keyed -= lost
        self._taken_back -= back
        self._keyed |= back
        self._taken_back |= lost & self._poses.keys()
        self._undone_before = {line.line for line in self.keyed_before if not recorded(line)}
        return len(lost)

    def lines_to_key_again(self, most: int) -> list[tuple[PendingLine, Pose]]:
        """Up to ``most`` of the lines taken back, first lines first, each with the service's
        pose, to key again; they count as neither keyed nor taken back until the caller
        reports them (``item_keyed``, ``item_failed``)."""
        lines = self._lines(sorted(self._taken_back)[:most]) if self._taken_back else []
        self._taken_back.difference_update(line.line for line in lines)
        return [(line, self._poses[line.line]) for line in lines]

    def _lines(self, numbers: Iterable[int]) -> list[PendingLine]:
        """The pending lines of these line numbers, in their order."""
        return [self._pending_by_line[number] for number in numbers]

    @cached_property
    def _pending_by_line(self) -> dict[int, PendingLine]:  # made after the first undo only
        return {line.line: line for line in self.pending}

    def item_failed(self, line: PendingLine, message: str, code: ErrorCode | None = None) -> None:
        """``line`` got no key, for ``message``; ``code``: the service's, when it refused the
        line (one refused for its text fails again until it is edited)."""
        self._taken_back.discard(line.line)
        if line.line not in self._keyed:
            self._failed[line.line] = (line, message)
            if code in REFUSED_FOR_THE_TEXT:
                self._refused_texts.add(line.line)
            else:
                self._refused_texts.discard(line.line)

    def cancel(self) -> None:
        if self.state == RUNNING:
            self.state = CANCELLING

    def stop(self, reason: str) -> None:
        """The add-on can key no more of the run's lines (its armature is gone, say): no more
        requests, and the run ends as failed for ``reason``, not as cancelled or done, whatever
        the service still says. The caller cancels the requests in flight."""
        self.reason = self.reason or reason
        if self.state == RUNNING:
            self.state = CANCELLING
        elif self.ended:  # its last lines were still being keyed
            self.state = FAILED

    def request_finished(self) -> bool:
        """The current request ended normally; True when another chunk is to be sent (call
        ``next_prompts``), False when the run has ended."""
        more = self._plan.more
        self._plan.taken()
        if self.state == RUNNING and more:
            return True
        self.state = FAILED if self.reason else CANCELLED if more else FINISHED
        return False

    def ask_in_smaller_requests(self) -> bool:
        """The service refused the current request whole as more than its queue holds
        (chatpose-serve --max-queue): its lines and the rest are split again into requests half
        its size, to be sent from ``next_prompts`` on. False when it held one line, or when any
        of its lines was already answered (the refusal is then about something else)."""
        current = [self.pending[position] for position in self._plan.current]
        answered = any(
            line.line in self._keyed or line.line in self._taken_back or line.line in self._failed
            for line in current
        )
        if answered or self.state != RUNNING:
            return False
        return self._plan.in_smaller_requests()

    def ask_again_later(self, now: float) -> bool:
        """The service refused the current request whole as busy (other clients' work fills
        its queue, or its model is loading): True when it is to be sent again from
        ``retry_at`` on (``BUSY_RETRY_DELAYS_S`` after ``now``); False once the run has waited
        them all, or when it is stopping."""
        delay = self._plan.delay_before_again() if self.state == RUNNING else None
        if delay is None:
            return False
        self.retry_at = now + delay  # next_prompts gives it again
        return True

    def request_cancelled(self) -> None:
        self.state = FAILED if self.reason else CANCELLED

    def fail(self, reason: str, code: ErrorCode | None = None) -> None:
        self.state = FAILED
        self.reason = reason
        self.failure_code = code

    def close(self) -> None:
        self.closed = True

    def _where(self, line: PendingLine) -> str:
        """Where a line is, as the user finds it: its line in the text and its frame (no
        brackets: the summary lists these in brackets of its own)."""
        if line.line < len(self.line_numbers):
            return f"line {self.line_numbers[line.line]} at frame {line.frame}"
        return f"prompt {line.line + 1} at frame {line.frame}"

    def summary(self) -> str:
        keyed = f"{self.keyed} line{'s' if self.keyed != 1 else ''} keyed on {self.armature}"
        left = self.remaining
        if not left:
            return f"Batch from {self.source} done: {keyed}; all {self.total_lines} lines keyed"
        if self.state == FAILED:
            parts = [f"Batch from {self.source} stopped: {self.reason}."]
        elif self.state == CANCELLED:
            parts = [f"Batch from {self.source} cancelled."]
        else:  # answered, but not every line keyed: not "done"
            parts = [f"Batch from {self.source}:"]
        parts.append(f"{keyed}; {left} of {self.total_lines} still to key.")
        if self._taken_back:
            taken = len(self._taken_back)
            lines_were = f"{taken} lines it keyed were" if taken != 1 else "1 line it keyed was"
            parts.append(f"{lines_were} taken back by an undo.")
        if self._undone_before:
            undone = len(self._undone_before)
            plural = "s" if undone != 1 else ""
            parts.append(f"{undone} line{plural} keyed before this run taken back by an undo.")
        by_reason: dict[str, list[PendingLine]] = {}  # in the order they first failed
        for line, reason in self.failed_lines:
            by_reason.setdefault(reason, []).append(line)
        for reason, lines in by_reason.items():  # each line under its own reason
            shown = ", ".join(self._where(line) for line in lines[:5])
            more = " ..." if len(lines) > 5 else ""
            if reason == self.reason:  # what stopped the run (its armature gone): said above
                parts.append(f"{len(lines)} answered but not keyed ({shown}{more}).")
                continue
            # The reason after the brackets, not in them: it often holds brackets of its own.
            parts.append(f"{len(lines)} failed ({shown}{more}): {reason}.")
        refused = len(self._refused_texts & self._failed.keys())
        if refused == left:  # only lines that would fail again as they are
            parts.append(
                f"Edit the line{'s' if refused != 1 else ''} the service refused, then run "
                f"Batch Keyframe again to key {'them' if refused != 1 else 'it'} (nothing is "
                "keyed twice)."
            )
        else:
            edit = "Edit the lines the service refused, then run" if refused else "Run"
            parts.append(f"{edit} Batch Keyframe again to key the rest (nothing is keyed twice).")
        return " ".join(parts)


def check_lines(
    lines: Sequence[tuple[int, str]], max_chars: int = DEFAULT_LIMITS.max_prompt_chars
) -> None:
    """ValueError naming the first prompt the service would refuse as too long; ``lines`` are
    (line number, prompt) as ``batch_text.prompt_lines`` gives them."""
    for number, line in lines:
        if len(line) > max_chars:
            raise ValueError(
                f"line {number} has {len(line)} characters; the service takes at most "
                f"{max_chars} per prompt"
            )
