"""Talking to the service from Blender's main thread without ever blocking it.

A `Session` owns a protocol client and the requests in flight. The add-on calls `tick()` from
a `bpy.app.timers` callback; `tick()` polls the socket with a zero timeout and returns events
for the UI to apply (a pose to put on the rig, a batch item to key, a failure to report).
Nothing here imports bpy, so all of it is tested without Blender.

Failures are events too, never exceptions out of `tick()`:
- no connection within `connect_timeout_s` of sending: `unreachable` ("is chatpose-serve
  running?");
- the connection drops while requests are in flight (the service died or restarted): those
  requests fail with `unreachable` at once, rather than at their timeout;
- no reply within `timeout_s` over a live connection: `timeout` for that request (for a batch,
  the time between two replies); a reply that comes later is ignored;
- a reply that does not decode (a service or protocol bug): its request fails with the
  decoder's message, and the service is told to cancel it (a batch would otherwise go on).
While a service is starting (`hold`), pose and batch requests wait here unsent, their timeouts
not running, until it is ready (`release`) or will not come (`fail_held`): sent at once, they
would fail as unreachable before it listens, or as busy while it loads its model.
After a lost connection the client's socket is replaced, so the next request reaches a
restarted service with no Blender restart.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import zmq

from shared_protocol.address import is_loopback
from shared_protocol.client import (
    CONNECT_TIMEOUT_S,
    Client,
    ClientCurveKeys,
    UndecodableReply,
)
from shared_protocol.pose import Pose
from shared_protocol.protocol import (
    BatchDoneReply,
    BatchItemReply,
    BatchRequest,
    CancelRequest,
    ErrorCode,
    ErrorReply,
    PoseReply,
    PoseRequest,
    ProtocolError,
    Reply,
    Request,
    StatusReply,
    StatusRequest,
    Turn,
    timeout_ms_within,
)


@dataclass(frozen=True)
class PoseResult:
    request_id: str
    reply: PoseReply


@dataclass(frozen=True)
class BatchItem:
    request_id: str
    index: int  # of the prompt in its request
    poses: tuple[Pose, ...]


@dataclass(frozen=True)
class BatchFinished:
    request_id: str


@dataclass(frozen=True)
class StatusResult:
    request_id: str
    status: StatusReply


@dataclass(frozen=True)
class RequestFailed:
    """A request (or, with `index`, one item of a batch) failed; `message` is for the user."""

    request_id: str
    code: ErrorCode
    message: str
    index: int | None = None

    @property
    def final(self) -> bool:
        return self.index is None


Event = PoseResult | BatchItem | BatchFinished | StatusResult | RequestFailed


@dataclass(frozen=True)
class Service:
    """Where requests go: the service's address, how long to wait for each answer, and the
    CURVE keys for a service off this machine."""

    address: str
    timeout_s: float
    curve: ClientCurveKeys | None = None


CANCEL_GRACE_S = 5.0  # a cancel the service has not confirmed by then ends here
# Replies decoded in one tick, at most (a third of a millisecond each): a burst of a batch's
# 256 answers, come while Blender was busy, is read over several timer calls, not one.
MAX_REPLIES_PER_TICK = 64


@dataclass
class _InFlight:
    request: Request
    sent_at: float
    timeout_s: float  # the wait it was sent with (the setting may change meanwhile)
    deadline: float
    cancelled: bool = False  # by the user: its end comes at the latest CANCEL_GRACE_S later
    held: bool = False  # not sent yet: waiting for a service that is starting (`hold`)


class Session:
    def __init__(
        self,
        address: str,
        timeout_s: float,
        *,
        curve: ClientCurveKeys | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.address = address
        self.timeout_s = timeout_s
        self.curve = curve
        self.connect_timeout_s = connect_timeout_s
        self._clock = clock
        # A context of its own, not pyzmq's shared one: a socket retrying an address where
        # nothing listens, unwatched while Blender idles, blocks its context's I/O thread after
        # some minutes (its monitor full), and with it every other socket on that context (a
        # pipeline script's, another add-on's in the same Blender).
        self._context = zmq.Context()
        self._client = Client(address, curve=curve, context=self._context)
        self._in_flight: dict[str, _InFlight] = {}
        self._was_connected = False
        self._drops_seen = 0  # the client's lost connections while nothing was in flight
        self._holding = False
        self._ended_here: list[Event] = []  # ends of held requests, for the next tick

    @property
    def busy(self) -> bool:
        return bool(self._in_flight or self._ended_here)

    @property
    def holding(self) -> bool:
        return self._holding

    def close(self) -> None:
        """Closes the connection, asking the service to stop what is still in flight: it
        would otherwise compute it for no one (the add-on disabled, say)."""
        for request_id in self._sent():
            self._client.abandon(request_id)
        self._client.close()
        # In a thread: terminating waits while the cancels above are sent (a fraction of a
        # second), which Blender's main thread should not.
        threading.Thread(target=self._context.term, name="chatpose-zmq-end", daemon=True).start()

    # --- requests -------------------------------------------------------------------------------

    def request_status(self) -> str:
        return self._send(StatusRequest(self._client.new_id()))

    def request_pose(
        self,
        prompt: str,
        images: Sequence[bytes] = (),
        history: Sequence[Turn] = (),
        mode: str = "pose",
    ) -> str:
        """Raises ProtocolError at once for input the service would refuse (empty, too large)."""
        request = PoseRequest(
            self._client.new_id(),
            prompt,
            tuple(images),
            tuple(history),
            mode,
            timeout_ms=timeout_ms_within(self.timeout_s),
        )
        return self._send(request)

    def request_batch(self, prompts: Sequence[str]) -> str:
        request = BatchRequest(
            self._client.new_id(), tuple(prompts), timeout_ms=timeout_ms_within(self.timeout_s)
        )
        return self._send(request)

    def cancel(self, request_id: str) -> None:
        """Asks the service to stop a request; its `cancelled` failure arrives through tick(),
        from the service, or from here after CANCEL_GRACE_S if the service does not answer (a
        hung one would otherwise keep the request, and the user, waiting for its timeout)."""
        flight = self._in_flight.get(request_id)
        if flight is not None and flight.held:  # never sent: nothing to tell the service
            self._in_flight.pop(request_id)
            self._ended_here.append(RequestFailed(request_id, ErrorCode.CANCELLED, "cancelled"))
        elif flight is not None:
            self._ask_to_cancel(request_id)
            deadline = min(flight.deadline, self._clock() + CANCEL_GRACE_S)
            self._in_flight[request_id] = replace(flight, deadline=deadline, cancelled=True)

    def _ask_to_cancel(self, request_id: str) -> None:
        """Best effort: a cancel that ZeroMQ cannot queue (the service is not taking messages)
        changes nothing for the request, which fails on its own timeout or connection loss."""
        with contextlib.suppress(ProtocolError):
            self._client.send(CancelRequest(self._client.new_id(), request_id))

    # --- a service that is starting -------------------------------------------------------------

    def hold(self) -> None:
        """From now on pose and batch requests wait here, unsent (their input checked at once
        all the same), until `release` or `fail_held`; status requests still go, to learn when
        the service is ready."""
        self._holding = True

    def release(self) -> None:
        """Sends the requests held, in the order they were made, each with its whole timeout
        from now; one the socket will not take fails on the next tick."""
        self._holding = False
        for request_id, flight in list(self._in_flight.items()):
            if not flight.held:
                continue
            del self._in_flight[request_id]
            try:
                self._send(flight.request)
            except ProtocolError as exc:
                self._ended_here.append(RequestFailed(request_id, exc.code, exc.message))

    def fail_held(self, code: ErrorCode, message: str) -> None:
        """Fails the requests held (on the next tick): the service they wait for will not
        come, or not where they were to go."""
        self._holding = False
        for request_id, flight in list(self._in_flight.items()):
            if flight.held:
                del self._in_flight[request_id]
                self._ended_here.append(RequestFailed(request_id, code, message))

    def _sent(self) -> dict[str, _InFlight]:
        return {rid: flight for rid, flight in self._in_flight.items() if not flight.held}

    def _send(self, request: Request) -> str:
        if self._holding and not isinstance(request, StatusRequest):
            self._client.check(request)  # bad input is said now, not once the service is up
            now = self._clock()
            self._in_flight[request.id] = _InFlight(
                request, now, self.timeout_s, now + self.timeout_s, held=True
            )
            return request.id
        if not self._sent():  # a connection lost before this request costs it nothing
            self._was_connected, self._drops_seen = self._client.connection_state()
        self._client.send(request)  # encodes first: bad input raises here, before anything queues
        now = self._clock()
        self._in_flight[request.id] = _InFlight(request, now, self.timeout_s, now + self.timeout_s)
        return request.id

    # --- the timer's work -----------------------------------------------------------------------

    def tick(self) -> list[Event]:
        """What happened since the last tick, up to `MAX_REPLIES_PER_TICK` replies (the rest
        wait in the socket for the next tick); never blocks."""
        events, self._ended_here = self._ended_here, []
        for _ in range(MAX_REPLIES_PER_TICK):
            if (reply := self._client.poll(0)) is None:
                # Only once every reply that came is read: a service gone (or a deadline
                # passed) after answering still has its answers counted.
                events.extend(self._check_connection())
                break
            events.extend(self._on_reply(reply))
        return events

    def _on_reply(self, reply: Reply) -> list[Event]:
        flight = self._in_flight.get(reply.id) if reply.id is not None else None
        if flight is None:
            return []  # a cancel's reply, or a late answer to a request already given up
        flight.deadline = self._clock() + flight.timeout_s
        match reply:
            case PoseReply() if flight.cancelled:
                # Answered before the cancel reached the service: the user said no all the same.
                self._in_flight.pop(reply.id)
                message = "cancelled (the answer had come; it is not applied)"
                return [RequestFailed(reply.id, ErrorCode.CANCELLED, message)]
            case PoseReply():
                self._in_flight.pop(reply.id)
                return [PoseResult(reply.id, reply)]
            case StatusReply():
                self._in_flight.pop(reply.id)
                return [StatusResult(reply.id, reply)]
            case BatchItemReply():
                return [BatchItem(reply.id, reply.index, reply.poses)]
            case BatchDoneReply():
                self._in_flight.pop(reply.id)
                return [BatchFinished(reply.id)]
            case UndecodableReply():  # the service goes on unless told: a batch's other items
                self._in_flight.pop(reply.id)
                self._ask_to_cancel(reply.id)
                return [RequestFailed(reply.id, reply.code, reply.message)]
            case ErrorReply():
                if reply.index is None:
                    self._in_flight.pop(reply.id)
                # The protocol's field the service names first: the user knows what they typed.
                message = reply.message.removeprefix("prompt: ")
                if reply.code == ErrorCode.TIMEOUT:  # said in the timeout the user set, not in
                    # the request's own, a little shorter (`timeout_ms_within`)
                    message = (
                        f"not started within {flight.timeout_s:g} s: the service was busy with "
                        "other work (the timeout is set in the add-on's preferences)"
                    )
                return [RequestFailed(reply.id, reply.code, message, reply.index)]
        return []

    def _check_connection(self) -> list[Event]:
        sent = self._sent()
        if not sent:
            self._was_connected = self._client.connected
            return []
        now = self._clock()
        connected = self._client.connected
        # A lost connection loses its requests, even when a new one is up by now (the service
        # restarted between two ticks: it dropped their work).
        lost = self._client.drops > self._drops_seen or (self._was_connected and not connected)
        if lost:
            self._was_connected = connected
            return self._fail_all(
                ErrorCode.UNREACHABLE,
                f"the service at {self.address} went away during the request (it stopped, or "
                "the network dropped the connection); retry, or start it again",
            )
        self._was_connected = connected
        if not connected:
            oldest = min(f.sent_at for f in sent.values())
            if now - oldest >= self.connect_timeout_s:
                refusal = self._client.refusal
                if refusal:  # with keys or without, each refusal may come of them
                    message = (
                        f"{self.address} refused the connection: {refusal}. Check the Service "
                        "Address, Client Key and Server Key in the add-on's preferences"
                    )
                else:
                    where = "address and its CURVE keys are" if self.curve else "address is"
                    message = self._client.no_service_message(
                        self.connect_timeout_s,
                        f" (the {where} set in the add-on's preferences)",
                        # What an animator can do, not the service's command line; Start
                        # Local Service takes only an address on this machine.
                        "is the service running? Start Local Service (the Service panel) "
                        "starts one on this machine"
                        if is_loopback(self.address) and not self.curve  # it has no keys
                        else "is the service running there?",
                    )
                return self._fail_all(ErrorCode.UNREACHABLE, message)
            return []
        expired = [request_id for request_id, f in sent.items() if f.deadline <= now]
        failures = []
        for request_id in expired:
            flight = self._in_flight.pop(request_id)
            if flight.cancelled:
                message = f"cancelled (the service did not confirm within {CANCEL_GRACE_S:g} s)"
                failures.append(RequestFailed(request_id, ErrorCode.CANCELLED, message))
                continue
            self._ask_to_cancel(request_id)  # free the service
            message = (
                f"no answer from {self.address} within {flight.timeout_s:g} s "
                "(the timeout is set in the add-on's preferences)"
            )
            failures.append(RequestFailed(request_id, ErrorCode.TIMEOUT, message))
        return failures

    def _fail_all(self, code: ErrorCode, message: str) -> list[Event]:
        """Fails every request sent and starts over with a fresh socket: replies to them could
        no longer be told from replies to new requests after a reconnect. Held ones wait on."""
        failed = [RequestFailed(request_id, code, message) for request_id in self._sent()]
        for event in failed:
            del self._in_flight[event.request_id]
        self._client.reset()
        self._drops_seen = 0  # the fresh socket's count
        return failed
