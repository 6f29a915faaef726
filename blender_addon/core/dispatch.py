"""Request bookkeeping between the panel and the service (no bpy).

The add-on has one ``Dispatcher``, which owns the one ``Session`` and remembers what each
request in flight is for: a pose job (which scene, which armature, which frame to key), a batch
run (``batch_plan.BatchRun``), or a status check. ``tick()`` is called from the Blender timer;
it turns the session's events into outcomes for the bpy side to apply on the main thread, and
moves a batch on to its next request (the protocol caps a batch at 256 prompts).

Nothing here blocks: the session never does, and sending only queues a message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared_protocol.client import ClientCurveKeys
from shared_protocol.pose import Pose
from shared_protocol.protocol import ErrorCode, PoseReply, StatusReply, Turn

from .batch_plan import CANCELLING, RUNNING, BatchRun
from .batch_record import PendingLine
from .placement import DEFAULT_SPACING_M
from .session import (
    BatchFinished,
    BatchItem,
    PoseResult,
    RequestFailed,
    Service,
    Session,
    StatusResult,
)

# A batch request refused whole for the service's queue (chatpose-serve --max-queue): asked
# again smaller, or later, while the run goes on.
_QUEUE_REFUSALS = (ErrorCode.TOO_LARGE, ErrorCode.BUSY)


@dataclass(frozen=True)
class PoseJob:
    """What to do with the answer to one pose request."""

    prompt: str
    mode: str  # "pose" or "chat"
    scene: str  # the scene whose chat history gets the exchange
    armature: str  # the target armature's name, for messages: the first pose goes there
    armature_uid: int | None = None  # its session id, which a rename keeps (else: by name)
    scene_uid: int | None = None  # the scene's, likewise
    frame: int | None = None  # key the poses at this frame, or None
    auto_key: bool = False  # the frame is Auto Keying's: a locked channel leaves it unkeyed
    use_translation: bool = True  # the poses' own translations, where they have one
    keep_on_floor: bool = False  # the others placed on the floor (blender.posing.placed_on_floor)
    attachment: str = ""  # "viewport image", "image: photo.jpg"
    chat_image: bytes = b""  # a chat turn's own image, kept in the history for the turns after
    resent_image: tuple[str, int] | None = None  # the kept Image (name, session id) sent again
    spacing: float = DEFAULT_SPACING_M  # metres between people of one answer


@dataclass(frozen=True)
class StatusJob:
    probe: bool = False  # sent by the add-on itself, waiting for a starting local service
    address: str = ""  # the service asked: what its answer is of


@dataclass(frozen=True)
class PoseAnswered:
    job: PoseJob
    reply: PoseReply  # its text, poses, and what the service says of them


@dataclass(frozen=True)
class PoseFailed:
    job: PoseJob
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class StatusAnswered:
    job: StatusJob
    status: StatusReply


@dataclass(frozen=True)
class StatusFailed:
    job: StatusJob
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class BatchLineReady:
    """Key ``poses[0]`` at ``line.frame`` on ``run.armature`` and record the line; then call
    ``run.item_keyed(line)`` (or ``run.item_failed(line, message)`` when keying failed)."""

    run: BatchRun
    line: PendingLine
    poses: tuple[Pose, ...]


@dataclass(frozen=True)
class BatchLineFailed:
    run: BatchRun
    line: PendingLine
    message: str


@dataclass(frozen=True)
class BatchEnded:
    run: BatchRun  # run.state and run.message say how


Outcome = (
    PoseAnswered
    | PoseFailed
    | StatusAnswered
    | StatusFailed
    | BatchLineReady
    | BatchLineFailed
    | BatchEnded
)


class BusyError(Exception):
    """The request cannot be made now; the message is for the user."""


def _key_files_stamp(curve: ClientCurveKeys | None) -> tuple | None:
    """When and how large the key files are: a key copied over the same path is a new key
    (the session reads them once, when it is made)."""
    if curve is None:
        return None
    stamps = []
    for path in (curve.client_secret_file, curve.server_public_file):
        try:
            info = os.stat(path)
        except OSError:
            stamps.append(None)  # making the session names the file
        else:
            stamps.append((info.st_mtime_ns, info.st_size))
    return tuple(stamps)


class Dispatcher:
    def __init__(
        self,
        make_session: Callable[..., Session] = Session,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._make_session = make_session
        self._clock = clock
        self._session: Session | None = None
        self._keys_stamp: tuple | None = None  # the key files the session read, as they were
        self._jobs: dict[str, PoseJob | StatusJob | BatchRun] = {}
        self.batch: BatchRun | None = None  # the current (or last) batch run
        self._starting_address = ""  # a service starting there: requests to it wait (`hold_for`)

    # --- the session ----------------------------------------------------------------------

    def _session_for(self, service: Service) -> Session:
        """The session for ``service``; a new one when its address or keys changed, the key
        files' contents included (only when nothing is in flight: replies to the old address
        would be lost)."""
        session = self._session
        wanted = (service.address, service.curve, _key_files_stamp(service.curve))
        if session is not None and (session.address, session.curve, self._keys_stamp) != wanted:
            if session.busy:
                raise BusyError(
                    "requests to the service as set before (its address or key files) are "
                    "still running; cancel them or wait before using the new settings"
                )
            session.close()
            self._session = None
        if self._session is None:
            self._keys_stamp = wanted[2]
            self._session = self._make_session(
                service.address, service.timeout_s, curve=service.curve
            )
            if service.address == self._starting_address:
                self._session.hold()
        self._session.timeout_s = service.timeout_s
        return self._session

    # --- a service that is starting (the local service, loading its model) ----------------------

    def hold_for(self, address: str) -> None:
        """Pose and batch requests to ``address`` wait in the session, unsent, until
        `release_held` or `fail_held`: the service there is starting."""
        self._starting_address = address
        if self._session is not None and self._session.address == address:
            self._session.hold()

    def release_held(self) -> None:
        """The service is ready: the requests that waited for it go now."""
        self._starting_address = ""
        if self._session is not None and self._session.holding:
            self._session.release()

    def fail_held(self, code: ErrorCode, message: str) -> None:
        """The service will not be ready, or not where they were to go: the requests that
        waited for it fail (on the next tick) with ``message``."""
        self._starting_address = ""
        if self._session is not None and self._session.holding:
            self._session.fail_held(code, message)

    @property
    def holding(self) -> bool:
        """Requests wait for a service that is starting (the panel says so)."""
        return self._session is not None and self._session.holding

    @property
    def address(self) -> str:
        """The address of the service asked last ("" before any request)."""
        return self._session.address if self._session is not None else ""

    @property
    def busy(self) -> bool:
        return self._session is not None and self._session.busy

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        self._jobs.clear()

    # --- requests ---------------------------------------------------------------------------

    def send_pose(
        self,
        service: Service,
        job: PoseJob,
        images: Sequence[bytes] = (),
        history: Sequence[Turn] = (),
    ) -> str:
        """Sends the request; raises ProtocolError at once for input the service would refuse."""
        session = self._session_for(service)
        request_id = session.request_pose(job.prompt, images, history, job.mode)
        self._jobs[request_id] = job
        return request_id

    def request_status(self, service: Service, *, probe: bool = False) -> str:
        session = self._session_for(service)
        request_id = session.request_status()
        self._jobs[request_id] = StatusJob(probe, service.address)
        return request_id

    def start_batch(self, service: Service | None, run: BatchRun) -> str | None:
        """Sends the run's first request; None (and the run finished and closed) when nothing is
        pending (``service`` may then be None)."""
        if self.batch_running:
            raise BusyError("a batch is running; cancel it or wait for it to finish")
        prompts = run.next_prompts()
        if prompts is None:
            run.request_finished()
            run.close()
            self.batch = run
            return None
        session = self._session_for(service)
        request_id = session.request_batch(prompts)
        self._jobs[request_id] = run
        self.batch = run
        return request_id

    @property
    def batch_running(self) -> bool:
        """A batch run is in progress, or its last lines are still being keyed."""
        return self.batch is not None and not self.batch.closed

    def pending_jobs(self) -> list[PoseJob]:
        """Pose requests still waiting for an answer, oldest first."""
        return [job for _, job in self.pending_requests()]

    def pending_requests(self) -> list[tuple[str, PoseJob]]:
        """``pending_jobs`` with their request ids (for ``cancel_request``)."""
        return [(rid, job) for rid, job in self._jobs.items() if isinstance(job, PoseJob)]

    def cancel_request(self, request_id: str) -> PoseJob | None:
        """Asks the service to stop one pose request, whose ``cancelled`` failure comes as
        any other; its job, or None when it is no longer waiting (answered meanwhile)."""
        job = self._jobs.get(request_id)
        if not isinstance(job, PoseJob) or self._session is None:
            return None
        self._session.cancel(request_id)
        return job

    def status_in_flight(self, *, probe: bool | None = None) -> bool:
        return any(
            isinstance(job, StatusJob) and (probe is None or job.probe == probe)
            for job in self._jobs.values()
        )

    def cancel_batch(self) -> bool:
        """Asks the service to stop the running batch; what it already answered is still keyed
        as it arrives. False when no batch is running."""
        if self.batch is None or self.batch.ended or self._session is None:
            return False
        self.batch.cancel()
        for request_id, job in self._jobs.items():
            if job is self.batch:
                self._session.cancel(request_id)
        return True

    def cancel_all(self, *, forget: bool = False) -> int:
        """Cancels every request in flight (pose, status, batch). With ``forget`` their answers
        are dropped when they come (a new file was loaded: nothing to apply them to). Returns
        how many requests were cancelled, not counting the add-on's own probes."""
        if self._session is None:
            return 0
        # A run waiting to ask again (the service was busy) has no request in flight: it is
        # one cancelled all the same, and ends on the next tick.
        run = self.batch
        waiting = run is not None and run.state == RUNNING and run.retry_at is not None
        if run is not None and not run.ended:
            run.cancel()
        for request_id in list(self._jobs):
            self._session.cancel(request_id)
        count = sum(not (isinstance(job, StatusJob) and job.probe) for job in self._jobs.values())
        count += waiting
        if forget:
            if self.batch is not None:  # the old file's: no panel of the new one shows it
                if not self.batch.ended:
                    self.batch.fail("a file was loaded")
                self.batch.close()
                self.batch = None
            self._jobs.clear()
        return count

    # --- the timer's work -----------------------------------------------------------------

    def tick(self) -> list[Outcome]:
        if self._session is None:
            return []
        outcomes: list[Outcome] = []
        for event in self._session.tick():
            job = self._jobs.get(event.request_id)
            if job is None:
                continue  # forgotten (file loaded) or not ours
            outcomes += self._on_event(event, job)
        run = self.batch
        if run is not None and run.retry_at is not None and not run.ended:
            if run.state != RUNNING:  # cancelled or stopped while it waited: nothing in flight
                run.retry_at = None
                run.request_cancelled()
                outcomes.append(BatchEnded(run))
            elif self._clock() >= run.retry_at:
                outcomes += self._send_next_chunk(run)
        return outcomes

    def _on_event(self, event, job) -> list[Outcome]:
        if isinstance(job, PoseJob):
            self._jobs.pop(event.request_id, None)
            if isinstance(event, PoseResult):
                return [PoseAnswered(job, event.reply)]
            if isinstance(event, RequestFailed):
                return [PoseFailed(job, event.code, event.message)]
            return []
        if isinstance(job, StatusJob):
            self._jobs.pop(event.request_id, None)
            if isinstance(event, StatusResult):
                return [StatusAnswered(job, event.status)]
            if isinstance(event, RequestFailed):
                return [StatusFailed(job, event.code, event.message)]
            return []
        return self._on_batch_event(event, job)

    def _on_batch_event(self, event, run: BatchRun) -> list[Outcome]:
        if isinstance(event, BatchItem):
            line = run.line_for(event.index)
            if line is None:
                return []
            if not event.poses:
                run.item_failed(line, "the answer held no pose")
                return [BatchLineFailed(run, line, "the answer held no pose")]
            run.item_answered(line, event.poses[0])
            return [BatchLineReady(run, line, event.poses)]
        if isinstance(event, RequestFailed) and not event.final:
            line = run.line_for(event.index)
            if line is None:
                return []
            run.item_failed(line, event.message, event.code)
            return [BatchLineFailed(run, line, event.message)]
        self._jobs.pop(event.request_id, None)
        if isinstance(event, BatchFinished):
            if run.request_finished():
                return self._send_next_chunk(run)
            return [BatchEnded(run)]
        if isinstance(event, RequestFailed):
            if event.code == ErrorCode.TOO_LARGE and run.ask_in_smaller_requests():
                return self._send_next_chunk(run)
            if event.code == ErrorCode.BUSY and run.ask_again_later(self._clock()):
                return []  # sent again by tick
            if event.code == ErrorCode.CANCELLED or (
                # Refused whole for the service's queue (--max-queue) after the user pressed
                # Cancel: nothing of it was done, and the run ends as the user asked.
                event.code in _QUEUE_REFUSALS and run.state == CANCELLING
            ):
                run.request_cancelled()
            else:
                run.fail(event.message, event.code)
            return [BatchEnded(run)]
        return []

    def _send_next_chunk(self, run: BatchRun) -> list[Outcome]:
        prompts = run.next_prompts()
        if prompts is None:  # pragma: no cover - request_finished said there is one
            run.request_finished()
            return [BatchEnded(run)]
        try:
            request_id = self._session.request_batch(prompts)
        except Exception as exc:  # a ProtocolError for a prompt, or the socket
            run.fail(f"the next batch request could not be sent ({exc})")
            return [BatchEnded(run)]
        self._jobs[request_id] = run
        return []
