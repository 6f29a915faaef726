"""Micro-batching scheduler: pose requests from every client share batched forward passes.

The scheduler knows nothing of sockets. Requests come in through `submit_pose`,
`submit_batch` and `cancel` (called by the server's I/O thread); every reply goes out through
the `emit(client, reply)` callback, from whichever thread produced it.

- Pose-mode work from all clients is grouped into micro-batches of up to `max_batch` items,
  waiting at most `max_wait_ms` for a batch to fill: the oldest task, then a task of each
  client in turn. Chat-mode work runs alone.
- A `batch` request keeps at most `max_batch` of its items queued at a time, so a long batch
  from one client interleaves with other clients' requests instead of starving them.
- Deadlines: an item that has not started by its deadline gets a `timeout` error. Work that has
  started is finished and delivered.
- Cancel: queued items are dropped at once and the request ends with a `cancelled` error; an
  answer computed for a cancelled request is discarded.
- Stop: the micro-batch in flight finishes and is delivered; everything else gets
  `shutting_down`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared_protocol.pose import Pose
from shared_protocol.protocol import (
    BatchDoneReply,
    BatchItemReply,
    BatchRequest,
    ErrorCode,
    ErrorReply,
    PoseReply,
    PoseRequest,
    ProtocolError,
    Reply,
    Turn,
)

from .errors import ChatPoseError, ModelError

log = logging.getLogger(__name__)

ERROR_MESSAGE_CUT = 4000  # characters of an error message too long to send (the limit is 64,000)
ClientId = bytes  # the ROUTER routing identity
RequestKey = tuple[ClientId, str]  # (client, client-chosen request id)


@dataclass(frozen=True)
class WorkItem:
    """One prompt for the model: what a pose request or one batch line asks."""

    prompt: str
    images: tuple[bytes, ...] = ()
    history: tuple[Turn, ...] = ()
    mode: str = "pose"


@dataclass(frozen=True)
class Answer:
    text: str
    poses: tuple[Pose, ...]
    truncated: bool = False  # a chat reply cut at the service's --max-new-tokens
    history_left_out: int = 0  # turns of the history left out to fit the model's context


@dataclass(frozen=True)
class ModelInfo:
    """What `status` reports about the model behind the server."""

    model: str
    device: str
    dtype: str
    supports_images: bool
    max_images: int


class Backend(Protocol):
    """What the scheduler needs from a model."""

    def answer_poses(self, items: Sequence[WorkItem]) -> list[Answer | ChatPoseError]:
        """Pose-mode items, answered together in one batched pass; an item refused for its
        own input may be answered by its error, the others still in that pass. Raises
        ChatPoseError for failures of the pass that have a protocol error code."""
        ...

    def answer_chat(self, item: WorkItem, stop: Callable[[], bool]) -> Answer:
        """One chat-mode item, answered by generation, which ends early once `stop()` is true
        (the request was cancelled or the service is going away: nobody wants the reply)."""
        ...


Emit = Callable[[ClientId, Reply], None]


@dataclass(eq=False)
class _Request:
    client: ClientId
    request_id: str
    op: str  # "pose" or "batch"
    timeout_s: float
    waiting: deque[tuple[int, WorkItem]]  # batch items not queued yet: (index, item)
    total: int
    mode: str = "pose"  # its items': "pose" or "chat"
    queued: int = 0  # items queued or running
    answered: int = 0  # items with a reply sent, success or error
    completed: int = 0  # items answered successfully
    ended: bool = False

    @property
    def key(self) -> RequestKey:
        return (self.client, self.request_id)


@dataclass(eq=False)
class _Task:
    request: _Request
    index: int | None  # the batch item's index; None for a pose request
    item: WorkItem
    deadline: float = field(default=0.0)


# Clients whose last turn the scheduler remembers (`_take_next`), at most: each connection is a
# client, and a day of command lines makes thousands.
MAX_TURNS_KEPT = 4096
# The longest a micro-batch may wait to fill: every lone request waits this long, and a wait
# past threading.TIMEOUT_MAX (inf, say) overflows, failing every micro-batch.
MAX_WAIT_MS = 1000.0
# The first wait after a failure of the scheduler itself; it doubles while failures repeat,
# up to a second.
FAILURE_BACKOFF_S = 0.005
# How long a stopping service lets the micro-batch running finish before it answers its
# requests `shutting_down` and exits.
STOP_WAIT_S = 30.0


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        emit: Emit,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        max_queued_bytes: int = 256 << 20,
        default_timeout_ms: int = 120_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch: expected at least 1, got {max_batch}")
        if not 0 <= max_wait_ms <= MAX_WAIT_MS:
            raise ValueError(f"max_wait_ms: expected 0 to {MAX_WAIT_MS}, got {max_wait_ms}")
        self._backend = backend
        self._emit = emit
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000.0
        self._max_queue = max_queue
        # What waiting requests hold (images, prompts, histories): items alone do not bound it,
        # as one pose request may carry 128 MiB of images.
        self._max_queued_bytes = max_queued_bytes
        self._default_timeout_s = default_timeout_ms / 1000.0
        self._clock = clock
        self._lock = threading.Condition()
        self._queue: deque[_Task] = deque()
        # When each client with work queued last had a micro-batch start with its task
        # (`_take_next`): clients take turns.
        self._turn = 0
        self._last_turn: dict[ClientId, float] = {}
        self._requests: dict[RequestKey, _Request] = {}
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="chatpose-scheduler", daemon=True)

    # --- called from the I/O thread -----------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Items waiting to run, batch items not yet queued included."""
        with self._lock:
            return len(self._queue) + sum(len(r.waiting) for r in self._requests.values())

    def in_flight(self, client: ClientId, request_id: str) -> bool:
        with self._lock:
            return (client, request_id) in self._requests

    def submit_pose(self, client: ClientId, request: PoseRequest) -> None:
        item = WorkItem(request.prompt, request.images, request.history, request.mode)
        self._submit(client, request.id, "pose", request.timeout_ms, [item])

    def submit_batch(self, client: ClientId, request: BatchRequest) -> None:
        items = [WorkItem(prompt, mode=request.mode) for prompt in request.prompts]
        self._submit(client, request.id, "batch", request.timeout_ms, items)

    def cancel(self, client: ClientId, request_id: str) -> bool:
        """Ends the request with a `cancelled` error; False if it is not in flight."""
        with self._lock:
            request = self._requests.get((client, request_id))
            if request is None:
                return False
            self._end(request, ErrorCode.CANCELLED, "cancelled by the client")
        return True

    def cancel_client(self, client: ClientId) -> None:
        """Drops all work of a client that can no longer be reached, without replying."""
        with self._lock:
            self._last_turn.pop(client, None)
            for request in [r for r in self._requests.values() if r.client == client]:
                self._forget(request)

    def expire(self) -> None:
        """Answers `timeout` for queued items whose deadline has passed."""
        with self._lock:
            self._expire_locked()

    def stop(
        self, timeout_s: float = STOP_WAIT_S, while_waiting: Callable[[], None] | None = None
    ) -> None:
        """Finishes the micro-batch in flight; everything else gets `shutting_down`. If that
        micro-batch is still running after `timeout_s`, its requests get `shutting_down` too
        and its late answers are discarded, so no client is left waiting. `while_waiting` is
        called over and over (it should return within a fraction of a second) while the
        micro-batch runs: the server answers what arrives meanwhile."""
        with self._lock:
            self._stopping = True
            for request in list(self._requests.values()):
                request.waiting.clear()
                self._unqueue(request)
                if request.queued == 0:  # none of it is running: nothing more will come
                    self._end(request, ErrorCode.SHUTTING_DOWN, "the service is shutting down")
            self._lock.notify_all()
        deadline = time.monotonic() + timeout_s
        while self._worker.is_alive() and (left := deadline - time.monotonic()) > 0:
            if while_waiting is None:
                self._worker.join(left)
            else:
                while_waiting()
                self._worker.join(0)
        with self._lock:
            for request in list(self._requests.values()):
                message = (
                    f"the service shut down; the model was still running after {timeout_s:g} s"
                )
                self._end(request, ErrorCode.SHUTTING_DOWN, message)

    # --- bookkeeping; every method below runs with self._lock held ----------------------------

    def _submit(
        self,
        client: ClientId,
        request_id: str,
        op: str,
        timeout_ms: int | None,
        items: list[WorkItem],
    ) -> None:
        with self._lock:
            if self._stopping:
                message = "the service is stopping: ask again once it has been started again"
                self._emit_error(client, request_id, op, ErrorCode.SHUTTING_DOWN, message)
                return
            if (client, request_id) in self._requests:
                message = f"id: request {request_id!r} is already in flight"
                self._emit_error(client, request_id, op, ErrorCode.BAD_SCHEMA, message)
                return
            size = sum(map(_item_bytes, items))
            if len(items) > self._max_queue or size > self._max_queued_bytes:
                # It would not fit an empty queue either: "try again" would never come true.
                message = (
                    f"{len(items)} prompts, {size / 2**20:.1f} MiB; this service queues at most "
                    f"{self._max_queue} prompts and {self._max_queued_bytes / 2**20:.0f} MiB "
                    "(chatpose-serve --max-queue, --max-queued-mb)"
                )
                self._emit_error(client, request_id, op, ErrorCode.TOO_LARGE, message)
                return
            depth = len(self._queue) + sum(len(r.waiting) for r in self._requests.values())
            if depth + len(items) > self._max_queue:
                message = (
                    f"the queue is too full for these {len(items)} prompt(s): {depth} wait, and "
                    f"this service queues at most {self._max_queue} (chatpose-serve "
                    "--max-queue); try again shortly"
                )
                self._emit_error(client, request_id, op, ErrorCode.BUSY, message)
                return
            held = self._queued_bytes()
            if held + size > self._max_queued_bytes:
                message = (
                    f"the queue is too full for these {size / 2**20:.1f} MiB of images and "
                    f"text: {held / 2**20:.1f} MiB wait, and this service queues at most "
                    f"{self._max_queued_bytes / 2**20:.0f} MiB (chatpose-serve --max-queued-mb); "
                    "try again shortly"
                )
                self._emit_error(client, request_id, op, ErrorCode.BUSY, message)
                return
            timeout_s = self._default_timeout_s if timeout_ms is None else timeout_ms / 1000.0
            mode = items[0].mode if items else "pose"
            request = _Request(
                client, request_id, op, timeout_s, deque(enumerate(items)), len(items), mode
            )
            self._requests[request.key] = request
            # A client new to the scheduler takes its turn after those that had theirs longer
            # ago, before the one that had the last: counted first, a stream of new connections
            # (each command line is one) kept a chat turn, which runs only when `_take_next`
            # picks it, waiting as long as they came.
            self._last_turn.setdefault(client, self._turn - 0.5)
            if request.total == 0:  # an empty batch is answered at once
                self._finish_if_done(request)
                return
            self._refill(request)
            self._lock.notify_all()

    def _queued_bytes(self) -> int:
        waiting = (item for r in self._requests.values() for _, item in r.waiting)
        return sum(_item_bytes(t.item) for t in self._queue) + sum(map(_item_bytes, waiting))

    def _expire_locked(self) -> None:
        now = self._clock()
        for task in [t for t in self._queue if t.deadline <= now]:
            self._queue.remove(task)
            task.request.queued -= 1
            message = (
                f"not started within {task.request.timeout_s:g} s (its timeout): the model was "
                "busy with other work"
            )
            self._fail_item(task, ErrorCode.TIMEOUT, message)

    def _refill(self, request: _Request) -> None:
        """Queues the request's next items, up to its window; each deadline starts now. A
        pose-mode batch keeps a micro-batch queued; a chat-mode one a single item, since chat
        items run one at a time and a request behind them would wait for all of them."""
        pose_batch = request.op == "batch" and request.mode == "pose"
        window = self._max_batch if pose_batch else 1
        now = self._clock()
        while request.waiting and request.queued < window:
            index, item = request.waiting.popleft()
            position = index if request.op == "batch" else None
            self._queue.append(_Task(request, position, item, now + request.timeout_s))
            request.queued += 1

    def _end(self, request: _Request, code: ErrorCode, message: str) -> None:
        self._forget(request)
        self._emit_error(request.client, request.request_id, request.op, code, message)

    def _forget(self, request: _Request) -> None:
        request.ended = True
        request.waiting.clear()
        self._requests.pop(request.key, None)
        self._unqueue(request)

    def _unqueue(self, request: _Request) -> None:
        for task in [t for t in self._queue if t.request is request]:
            self._queue.remove(task)
            request.queued -= 1

    def _fail_item(self, task: _Task, code: ErrorCode, message: str) -> None:
        request = task.request
        if request.op == "pose":
            self._end(request, code, message)
            return
        self._emit_error(request.client, request.request_id, "batch", code, message, task.index)
        request.answered += 1
        self._after_item(request)

    def _succeed_item(self, task: _Task, answer: Answer) -> None:
        request = task.request
        if request.op == "pose":
            self._requests.pop(request.key, None)
            request.ended = True
            reply = PoseReply(
                request.request_id,
                answer.text,
                answer.poses,
                answer.truncated,
                answer.history_left_out,
            )
            self._send(request.client, reply)
            return
        reply = BatchItemReply(
            request.request_id,
            task.index,
            request.total,
            answer.text,
            answer.poses,
            answer.truncated,
        )
        request.answered += 1
        request.completed += self._send(request.client, reply)
        self._after_item(request)

    def _after_item(self, request: _Request) -> None:
        self._refill(request)
        self._finish_if_done(request)
        if self._stopping and request.queued == 0 and not request.ended:
            self._end(request, ErrorCode.SHUTTING_DOWN, "the service is shutting down")

    def _finish_if_done(self, request: _Request) -> None:
        if request.answered == request.total and not request.ended:
            request.ended = True
            self._requests.pop(request.key, None)
            done = BatchDoneReply(request.request_id, request.total, request.completed)
            self._send(request.client, done)

    def _emit_error(
        self,
        client: ClientId,
        request_id: str,
        op: str,
        code: ErrorCode,
        message: str,
        index: int | None = None,
    ) -> None:
        self._send(client, ErrorReply(request_id, op, code, message, index))

    def _send(self, client: ClientId, reply: Reply) -> bool:
        """Emits `reply`; an answer that breaks a protocol limit (a chat reply with more poses
        than a reply holds, say) is answered with a `model_error` instead. False if the reply
        did not go out."""
        try:
            self._emit(client, reply)
            return True
        except ProtocolError as err:
            log.warning(
                "could not encode the reply to request %r: %s",
                reply.id,
                err,
                extra={"event": "reply_unencodable"},
            )
            if isinstance(reply, PoseReply | BatchItemReply):
                index = reply.index if isinstance(reply, BatchItemReply) else None
                op = "pose" if index is None else "batch"
                message = f"the model's answer could not be sent: {err}"
                self._send(client, ErrorReply(reply.id, op, ErrorCode.MODEL_ERROR, message, index))
            elif isinstance(reply, ErrorReply):
                # An exception's text that cannot go as it is: too long (its start still says
                # what went wrong), or holding a lone surrogate (a file name). Once only: the
                # message made here goes as it is.
                safe = reply.message.encode("utf-8", "backslashreplace").decode("utf-8")
                if len(safe) > ERROR_MESSAGE_CUT:
                    safe = safe[:ERROR_MESSAGE_CUT] + " [...]"
                if safe != reply.message:
                    self._send(client, dataclasses.replace(reply, message=safe))
        except Exception:  # a reply that cannot be sent must not stop the scheduler
            log.exception(
                "could not emit a reply for request %r",
                getattr(reply, "id", None),
                extra={"event": "reply_failed"},
            )
        return False

    # --- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0  # in a row: the wait before the next try doubles, so a lasting fault
        while True:  # neither spins nor floods the log
            taken: list[_Task] = []
            try:
                group = self._next_group(taken)
                if group is None:
                    return
                self._deliver(group, self._answer(group))
                failures = 0
            # BaseException: a SystemExit or KeyboardInterrupt a library raises in this thread
            # too. A dead worker would leave the service up but silent, every request after it
            # answered "the deadline passed" until a restart.
            except BaseException as exc:
                log.exception("the scheduler failed", extra={"event": "scheduler_failed"})
                self._end_after_failure(taken, exc)
                failures = min(failures + 1, 10)  # 2**1024 would overflow, and kill it
                with self._lock:
                    if self._stopping:  # no retry to wait for: `stop` answers the rest
                        return
                    self._lock.wait(min(FAILURE_BACKOFF_S * 2**failures, 1.0))

    def _deliver(self, group: list[_Task], answers: list[Answer | ChatPoseError]) -> None:
        with self._lock:
            for task, outcome in zip(group, answers, strict=True):
                task.request.queued -= 1
                if task.request.ended:
                    continue  # cancelled or shut down while it ran: nobody wants it
                if isinstance(outcome, Answer):
                    self._succeed_item(task, outcome)
                else:
                    self._fail_item(task, outcome.code, str(outcome))
            self._lock.notify_all()

    def _end_after_failure(self, taken: list[_Task], exc: BaseException) -> None:
        """Ends, with `internal_error`, the requests whose tasks a failure of the scheduler
        itself took off the queue: nothing else would answer them. The others wait in the
        queue for the next try."""
        message = f"the service failed while scheduling it ({type(exc).__name__}: {exc})"
        with self._lock:
            for request in dict.fromkeys(task.request for task in taken):
                if not request.ended:
                    self._end(request, ErrorCode.INTERNAL_ERROR, message)
            self._lock.notify_all()

    def _next_group(self, taken: list[_Task]) -> list[_Task] | None:
        """Waits for work and takes the next micro-batch off the queue (None when stopping).
        Each task taken goes into `taken` at once, so that a failure half way loses none."""
        with self._lock:
            self._expire_locked()
            while not self._queue:
                if self._stopping:
                    return None
                self._lock.wait()
                self._expire_locked()
            taken.append(self._take_next())
            if taken[0].item.mode != "pose":
                return taken
            group = taken
            fill_until = self._clock() + self._max_wait_s
            while len(group) < self._max_batch and not self._stopping:
                group.extend(self._take_pose_tasks(self._max_batch - len(group)))
                remaining = fill_until - self._clock()
                if len(group) >= self._max_batch or remaining <= 0:
                    break
                self._lock.wait(remaining)
            return group

    def _take_next(self) -> _Task:
        """The oldest task of the client whose turn came longest ago (a new client's counts
        from its first request): one with hundreds of chat turns in flight, seconds each on a
        large model, would otherwise hold up every other client behind all of them."""
        # `_submit` records every client, and a client with work in flight is never pruned:
        # the default (a new client's) only keeps a lookup that should not miss from raising.
        new = self._turn - 0.5
        task = min(self._queue, key=lambda t: self._last_turn.get(t.request.client, new))
        self._queue.remove(task)
        self._turn += 1
        self._last_turn[task.request.client] = self._turn
        if len(self._last_turn) > MAX_TURNS_KEPT:
            # The oldest turns first, of clients with no request in flight: one that returns
            # counts as new. A client with work in flight (queued, running, or still to be
            # queued from its batch) keeps its place.
            waiting = {request.client for request in self._requests.values()}
            for client in sorted(self._last_turn, key=self._last_turn.get):
                if len(self._last_turn) <= MAX_TURNS_KEPT // 2:
                    break
                if client not in waiting:
                    del self._last_turn[client]
        return task

    def _take_pose_tasks(self, limit: int) -> list[_Task]:
        """Up to `limit` pose-mode tasks, a client's at a time in turn (each client's in
        arrival order): a script with hundreds of pose requests in flight shares the
        micro-batches with the other clients rather than have them wait behind all of it."""
        by_client: dict[ClientId, deque[_Task]] = {}
        for task in self._queue:
            if task.item.mode == "pose":
                by_client.setdefault(task.request.client, deque()).append(task)
        taken: list[_Task] = []
        while by_client and len(taken) < limit:
            for client, tasks in list(by_client.items()):
                taken.append(tasks.popleft())
                if not tasks:
                    del by_client[client]
                if len(taken) == limit:
                    break
        for task in taken:
            self._queue.remove(task)
        return taken

    def _answer(self, group: list[_Task]) -> list[Answer | ChatPoseError]:
        """Runs the model outside the lock. If a batch fails, its items are retried one by one,
        so one bad item gets the error and the others still get their answers."""
        started = self._clock()
        items = [task.item for task in group]
        outcomes: list[Answer | ChatPoseError] | None = None
        try:
            if items[0].mode == "pose":
                outcomes = list(self._backend.answer_poses(items))
            else:
                request = group[0].request
                outcomes = [self._backend.answer_chat(items[0], stop=lambda: request.ended)]
            if len(outcomes) != len(items):
                raise RuntimeError(f"the backend gave {len(outcomes)} answers for {len(items)}")
            if wrong := [o for o in outcomes if not isinstance(o, Answer | ChatPoseError)]:
                raise RuntimeError(f"the backend gave a {type(wrong[0]).__name__} as an answer")
        except Exception as exc:
            # Retried below, not here: the error's frames hold the failed batch's memory (GPU
            # memory, after an out-of-memory error) until this block lets it go.
            outcomes = [_as_model_error(exc)] if len(items) == 1 else None
        if outcomes is None:
            outcomes = [self._answer([task])[0] for task in group]
        log.info(
            "answered",
            extra={
                "event": "batch",
                "items": len(items),
                "mode": items[0].mode,
                "seconds": round(self._clock() - started, 4),
            },
        )
        return outcomes


def _as_model_error(exc: Exception) -> ChatPoseError:
    if isinstance(exc, ModelError):  # the service's fault (out of GPU memory, say), not the input's
        log.warning("model error", extra={"event": "model_error", "error": str(exc)})
    if isinstance(exc, ChatPoseError):
        return exc
    log.exception("model error", exc_info=exc, extra={"event": "model_error"})
    return ModelError(f"the model failed: {type(exc).__name__}: {exc}")


def _item_bytes(item: WorkItem) -> int:
    """About what an item holds in memory: its images, and its text at a byte a character."""
    text = len(item.prompt) + sum(len(turn.text) for turn in item.history)
    return text + sum(len(image) for image in item.images)
