"""A protocol v1 client on a ZeroMQ DEALER socket, for the command line and the Blender add-on.

The one module of `shared_protocol` that needs pyzmq (the add-on bundles its wheels); the rest
is numpy only. It never blocks longer than asked: `poll(0)` from a Blender timer returns at
once, and `request()` gives up at its timeout with a `ProtocolError` whose code says why:
`unreachable` when no connection to the service exists, `timeout` when one does but no answer
came in time. After either, the socket is replaced, so a restarted service is reached again
without restarting the client.

Whether a connection exists comes from the socket's monitor (a completed handshake), not from
ZMQ_IMMEDIATE: with that option a DEALER discards replies it has already received when the
service goes away, and the last items of a batch would be lost.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from .address import AddressError, check_address, host_name, is_ipv6
from .protocol import (
    DEFAULT_LIMITS,
    HEARTBEAT_INTERVAL_MS,
    HEARTBEAT_TIMEOUT_MS,
    CancelRequest,
    ErrorCode,
    ErrorReply,
    Limits,
    ProtocolError,
    Reply,
    Request,
    StatusReply,
    StatusRequest,
    decode_reply,
    encode_request,
    is_final,
)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
# How long to wait for a connection before calling the service unreachable; a local service
# that is up accepts within milliseconds.
CONNECT_TIMEOUT_S = 2.0
# Why what listens at the address refused the connection at its handshake, by ZeroMQ's event
# (seen with pyzmq 27), for a client (with CURVE keys, without).
_CURVE_MISMATCH = "one side has CURVE keys and the other has none"
_NOT_AUTHORISED = (
    "it refused the client key: its public half is not among the service's authorized clients"
)
HANDSHAKE_REFUSALS = {
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: (_CURVE_MISMATCH, _CURVE_MISMATCH),
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: (_NOT_AUTHORISED, _NOT_AUTHORISED),
    # The other end closed the connection mid-handshake: a CURVE service that cannot read the
    # client's hello (another server key), a service that noticed the keys on one side only
    # before the client did (which side notices first is a race), or a program that is not a
    # ZeroMQ service at all.
    # ZeroMQ cannot tell these apart: the likeliest first, the others after it.
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: (
        "most likely, the server key given is not this service's. Other causes: the service "
        "has no CURVE keys; what listens there is not chatpose-serve",
        "most likely, the service has CURVE keys and this client has none. Other cause: what "
        "listens there is not chatpose-serve",
    ),
}
# After these ZeroMQ does not try that connection again: the socket stays without one.
_FINAL_REFUSALS = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
# A connection closed at its handshake counts once ZeroMQ's next try (100 ms on) is closed
# too: a starting chatpose-serve's check that its port is free (a socket bound for a moment)
# closes the one connection it takes, and the service listens there right after.
_NO_DETAIL_REFUSALS_COUNTED = 2
# EVENT_CLOSED: a connection attempt failed (nothing listens): an earlier refusal is old news.
_MONITORED = (
    zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
)
for _event in HANDSHAKE_REFUSALS:
    _MONITORED |= _event


# How often a blocking wait looks whether the connection dropped (it also keeps each wait far
# below the C int of milliseconds ZeroMQ takes).
_DROP_CHECK_MS = 200
# How long ZeroMQ may go on sending the cancel of a request given up on, once its socket closed.
_ABANDON_LINGER_MS = 200


class HandshakeRefused(ProtocolError):
    """`unreachable` because what listens at the address refused the handshake (keys): asking
    again will not help until someone changes the keys."""


@dataclass(frozen=True)
class UndecodableReply(ErrorReply):
    """The ErrorReply that `poll` makes from frames that do not decode (a service or protocol
    bug). Unlike the service's own error replies it ends nothing there: the request it names
    may still be running."""


@dataclass(frozen=True)
class ClientCurveKeys:
    """The client's own key pair file and the server's public key file (see docs/security.md)."""

    client_secret_file: Path
    server_public_file: Path
    # The keys as `loaded` read them: a client made with these uses them, and reads no file
    # again (which may be slow, on a share, or changed since).
    keys: tuple[bytes, bytes, bytes] | None = field(default=None, compare=False, repr=False)

    def loaded(self) -> ClientCurveKeys:
        """These files' keys, read now (ValueError as `load`), kept with them."""
        return replace(self, keys=self.load())

    def load(self) -> tuple[bytes, bytes, bytes]:
        """(the client's public key, its secret key, the server's public key); ValueError
        naming the file that is missing, unreadable or not the key it should be."""
        if self.keys is not None:
            return self.keys
        public, secret = _read_key(self.client_secret_file, "client")
        if secret is None:
            raise ValueError(
                f"{self.client_secret_file} holds no secret key: the client key is the "
                "NAME.key_secret file"
            )
        server_public, _ = _read_key(self.server_public_file, "server")
        return public, secret, server_public


def secret_key_exposure(path: str | os.PathLike) -> str | None:
    """What is wrong with a secret key file that other users of this machine may read (its
    group's or others' permission bits, on POSIX), as a warning naming the fix; None for one
    only its owner reads, where permissions do not say (Windows, a file not there), or for a
    file that holds no secret key (a public key given in its place, which all may read)."""
    if os.name != "posix":
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # a pipe or a device named as the key: not even opened
        # Opened without waiting, and looked at as opened: a pipe put in the file's place since
        # would block the caller (the add-on's UI, drawn) until something wrote to it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as file:  # a regular file's reads never wait
        try:
            mode = os.fstat(descriptor).st_mode
            if not stat.S_ISREG(mode) or not mode & (stat.S_IRGRP | stat.S_IROTH):
                return None
            if b"secret-key" not in file.read(4096):
                return None
        except OSError:
            return None
    return (
        f"{path} can be read by other users of this machine (mode {stat.S_IMODE(mode):o}): any "
        f"of them can use its key; make it yours alone with chmod 600 {shlex.quote(str(path))}"
    )


def _read_key(path: Path, whose: str) -> tuple[bytes, bytes | None]:
    try:
        if not Path(path).exists():  # ZeroMQ would say "Invalid certificate file", as of its text
            raise ValueError("no such file")
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError, IndexError) as exc:  # IndexError: a key line without "="
        raise ValueError(f"the {whose} key {path} cannot be read ({exc})") from None
    if not all(is_curve_key(key) for key in (public, secret) if key is not None):
        # ZeroMQ would refuse it later, as an "Invalid argument" of a socket option.
        raise ValueError(
            f"the {whose} key {path} is not a CURVE key (40 Z85 characters, as "
            "python -m inference_service.keys writes them)"
        )
    return public, secret


def is_curve_key(key: bytes) -> bool:
    """Whether `key` is a CURVE key as ZeroMQ takes it: 40 Z85 characters for 32 bytes."""
    try:
        return len(key) == 40 and len(zmq.utils.z85.decode(key)) == 32
    except (KeyError, ValueError, struct.error):  # outside Z85's alphabet, or over 32 bits
        return False


class Client:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        curve: ClientCurveKeys | None = None,
        limits: Limits = DEFAULT_LIMITS,
        context: zmq.Context | None = None,
    ):
        self.address = check_address(address)  # AddressError before ZeroMQ's "Invalid argument"
        # Read once: a reconnect must not depend on the files still being readable then.
        self._keys = curve.load() if curve is not None else None
        self._limits = limits
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{time.monotonic_ns() & 0xFFFFFF:x}"
        self._socket = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.linger = 0  # closing never waits for a dead service
        # A reply is one header frame: a larger frame from whatever listens there is cut off
        # unread (and its connection dropped) before it can fill Blender's memory.
        sock.setsockopt(zmq.MAXMSGSIZE, self._limits.max_header_bytes + 4096)
        sock.heartbeat_ivl, sock.heartbeat_timeout = HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS
        if self._keys is not None:
            public, secret, server_public = self._keys
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = server_public
        sock.ipv6 = is_ipv6(self.address)
        self._monitor = sock.get_monitor_socket(_MONITORED)
        self._connected = False
        self._reached = False  # a TCP connection is open, handshaken or not
        self._drops = 0  # connections lost: replies still owed on them never come
        self._refusal_event: int | None = None  # the HANDSHAKE_REFUSALS event of the last one
        self._refusals = 0  # refusals in a row: connections closed at their handshake
        try:
            sock.connect(self.address)
        except zmq.ZMQError as exc:  # a host name ZeroMQ cannot take, an over-long ipc path
            self._monitor.close(linger=0)
            sock.close(linger=0)
            raise AddressError(
                f"ZeroMQ cannot connect to {self.address!r}: {exc.strerror}"
            ) from None
        return sock

    @property
    def connected(self) -> bool:
        """Whether a handshake with the service has completed and not dropped since."""
        self._read_monitor()
        return self._connected

    def connection_state(self) -> tuple[bool, int]:
        """(`connected`, `drops`) from one look: read apart, a connection lost between them
        is counted and not seen lost, or seen lost and not counted."""
        self._read_monitor()
        return self._connected, self._drops

    @property
    def drops(self) -> int:
        """Connections this socket has lost: a reply owed on one of them never comes, even if
        the service is back (it dropped that work), so a caller who saw a lower count before
        sending knows its request is lost."""
        self._read_monitor()
        return self._drops

    @property
    def refusal(self) -> str | None:
        """Why what listens at the address refused the last connection at its handshake
        (`HANDSHAKE_REFUSALS`: the CURVE keys do not match, or it is not chatpose-serve), or
        None: no refusal since the last connection that went through or found nothing."""
        self._read_monitor()
        if self._refusal_event is None:
            return None
        if self._refusal_event not in _FINAL_REFUSALS:
            if self._refusals < _NO_DETAIL_REFUSALS_COUNTED:
                return None
        return HANDSHAKE_REFUSALS[self._refusal_event][self._keys is None]

    @property
    def silent_listener(self) -> bool:
        """Whether something took the connection but has not answered ZeroMQ's handshake:
        another program (a web server) on the port, not chatpose-serve."""
        self._read_monitor()
        return self._reached and not self._connected

    def no_service_message(
        self, waited_s: float, where_set: str = "", what_to_do: str = "is chatpose-serve running?"
    ) -> str:
        """What to say when no connection came within `waited_s`, ending with ``what_to_do``;
        `where_set` (" (the address is set in ...)") follows it, where the caller's users
        change the address."""
        if self.silent_listener:
            return (
                f"something takes connections at {self.address} but did not complete ZeroMQ's "
                f"handshake within {waited_s:g} s: another program on that port, or a "
                f"chatpose-serve that is stopped or hung?{where_set}"
            )
        text = f"no service at {self.address} (no connection within {waited_s:g} s); {what_to_do}"
        if host := host_name(self.address):
            # ZeroMQ says nothing of a name it cannot resolve: it only never connects.
            text += f" Is {host!r} a name this machine resolves and can reach?"
        return text + where_set

    def _read_monitor(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event in HANDSHAKE_REFUSALS:
                self._refusal_event = event
                self._refusals += 1
                continue
            if event == zmq.EVENT_CONNECTED:
                self._reached = True
                continue
            if event == zmq.EVENT_CLOSED:
                self._refusal_event, self._refusals = None, 0
                self._reached = False
                continue
            self._reached &= event != zmq.EVENT_DISCONNECTED
            # Only a connection that completed its handshake carried requests: one refused
            # at the handshake (wrong CURVE keys) is no service, not a service gone away.
            self._drops += event == zmq.EVENT_DISCONNECTED and self._connected
            self._connected = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if self._connected:
                self._refusal_event, self._refusals = None, 0

    def wait_connected(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.connected:
            remaining_ms = (deadline - time.monotonic()) * 1000
            if remaining_ms <= 0:
                return False
            self._monitor.poll(min(remaining_ms, 50))
        return True

    def reset(self) -> None:
        """A fresh socket: replies to earlier requests are no longer awaited."""
        self.close()
        self._socket = self._connect()

    def close(self) -> None:
        """Closes the socket; closing again (or after a failed `reset`) does nothing."""
        if self._socket.closed:
            return
        # Events not read yet first: a socket retrying an address where nothing listens sends
        # a few a second, and with some two thousand waiting ZeroMQ's I/O thread blocks on the
        # next, holding the lock that disabling the monitor waits for, and Python's with it
        # (Blender hung for good on quitting, after five idle minutes without a service).
        with contextlib.suppress(zmq.ZMQError):
            while self._monitor.poll(0):
                self._monitor.recv_multipart(zmq.NOBLOCK)
        with contextlib.suppress(zmq.ZMQError):
            self._socket.disable_monitor()
        self._monitor.close()
        self._socket.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    # --- non-blocking pieces, for an event loop such as Blender's timers ----------------------

    def check(self, request: Request) -> None:
        """Raises the ProtocolError `send` would for this request's own content (a prompt too
        long, an image too large), without sending it."""
        encode_request(request, self._limits)

    def send(self, request: Request) -> None:
        """Queues the request; it goes out as soon as a connection exists. Never blocks: when
        ZeroMQ's queue is full (a thousand messages toward a service that is not taking them),
        a ProtocolError says so at once (`unreachable`, or `busy` over a live connection).
        A socket whose connection was refused for good (`_FINAL_REFUSALS`) is made anew
        first: the service may have been fixed since (its keys, the authorized clients)."""
        frames = encode_request(request, self._limits)
        self._read_monitor()
        if self._refusal_event in _FINAL_REFUSALS:
            self.reset()
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            connected = self.connected
            raise ProtocolError(
                ErrorCode.BUSY if connected else ErrorCode.UNREACHABLE,
                f"{self.address} is not taking requests"
                + ("" if connected else "; is chatpose-serve running?"),
                request_id=request.id,
                op=request.op,
            ) from None

    def poll(self, timeout_ms: float = 0) -> Reply | None:
        """One reply if one arrives within `timeout_ms`, else None. A reply that does not
        decode is returned as an UndecodableReply, so the caller sees every problem as a
        reply."""
        if not self._socket.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self._socket.recv_multipart(zmq.NOBLOCK)
        try:
            return decode_reply(frames, self._limits)
        except ProtocolError as err:
            message = f"bad reply: {err}"
            if err.code == ErrorCode.UNSUPPORTED_PROTOCOL:  # one side updated, not the other
                message = (
                    f"the service at {self.address} speaks another version of the protocol "
                    f"({err.message.removeprefix('protocol: ')}): install one release of "
                    "ChatPose for Blender on both sides (the add-on or chatpose, and "
                    "chatpose-serve's machine)"
                )
            return UndecodableReply(err.request_id, err.op, err.code, message, None)

    # --- blocking conveniences, for the command line and tests ---------------------------------
    # They serve one request at a time: replies to any other request are dropped.

    def request(
        self, request: Request, timeout_s: float, connect_s: float = CONNECT_TIMEOUT_S
    ) -> Reply:
        """Sends and waits for the final reply; raises ProtocolError(unreachable | timeout)."""
        replies = list(self.stream(request, timeout_s, connect_s))
        return replies[-1]

    def wait_serving(
        self,
        timeout_s: float,
        *,
        gone: Callable[[], str | None] = lambda: None,
        loading: Callable[[str], None] | None = None,
    ) -> StatusReply:
        """The service's status once it serves. Asks again while
        - nothing listens there yet;
        - its model still loads (a `busy` reply). With `loading`, each such message goes to it
          and the wait starts again, so a model seen loading is waited for as long as it takes
          (a 13B model takes minutes);
        - the service there is stopping (`shutting_down`): a restart may take its place.

        Else a ProtocolError:
        - unreachable: at once once `gone()` says why it never will serve (a service process
          that exited), or on a HandshakeRefused; after `timeout_s` when nothing listened;
        - busy: after `timeout_s` when its model was still loading then, saying so;
        - timeout: after `timeout_s` otherwise;
        - any other error reply's code."""
        deadline = time.monotonic() + timeout_s
        reached = False
        stopping = ""  # a service seen stopping: a restart may take its place
        still_loading = ""  # its last `busy` reply: a slow load is no hung service
        asked_again = False
        while True:
            why = gone()
            if why:
                raise ProtocolError(ErrorCode.UNREACHABLE, why)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._not_serving(timeout_s, reached, still_loading, stopping)
            if not self.wait_connected(min(left, 0.2)):  # not past the time given
                still_loading = ""  # gone since: no longer known to be loading
                if self.refusal and not asked_again:
                    # Once more, on a fresh socket: a starting chatpose-serve's check that its
                    # port is free (a socket without its keys, bound for a moment) may have
                    # refused the keys of the one connection it took.
                    asked_again = True
                    self.reset()
                    continue
                if self.refusal:
                    raise HandshakeRefused(
                        ErrorCode.UNREACHABLE,
                        f"{self.address} refused the connection: {self.refusal}",
                    )
                continue
            reached = True
            try:
                wait = min(CONNECT_TIMEOUT_S, left)  # a service gone meanwhile: not past it
                reply = self.request(StatusRequest(self.new_id()), wait, connect_s=wait)
            except HandshakeRefused:
                raise
            except ProtocolError as exc:
                if exc.code not in (ErrorCode.UNREACHABLE, ErrorCode.TIMEOUT):
                    raise
                if exc.code == ErrorCode.UNREACHABLE or wait >= CONNECT_TIMEOUT_S:
                    still_loading = ""  # gone, or no answer in a real wait: not known loading
                continue
            if isinstance(reply, StatusReply):
                return reply
            if isinstance(reply, UndecodableReply):  # a fault there, as any request's reply
                raise ProtocolError(ErrorCode.INTERNAL_ERROR, reply.message)
            still_loading = reply.message if reply.code == ErrorCode.BUSY else ""
            if reply.code == ErrorCode.SHUTTING_DOWN:
                stopping = " (the service there was stopping)"
                time.sleep(max(0.0, min(0.2, deadline - time.monotonic())))
                continue
            if reply.code != ErrorCode.BUSY:
                raise ProtocolError(reply.code, reply.message)
            if loading is not None:
                loading(reply.message)
                deadline = time.monotonic() + timeout_s
            time.sleep(max(0.0, min(0.2, deadline - time.monotonic())))  # loading: answers at once

    def _not_serving(
        self, timeout_s: float, reached: bool, still_loading: str, stopping: str
    ) -> ProtocolError:
        """Why `wait_serving` ended without a status after `timeout_s`: nothing listened, its
        model was still loading (its last `busy` message), or no answer came."""
        if not reached:
            return ProtocolError(ErrorCode.UNREACHABLE, self.no_service_message(timeout_s))
        served = f"{self.address} did not serve within {timeout_s:g} s"
        if still_loading:
            return ProtocolError(ErrorCode.BUSY, f"{served}: {still_loading}")
        return ProtocolError(ErrorCode.TIMEOUT, f"{served}{stopping}")

    def stream(
        self, request: Request, timeout_s: float, connect_s: float = CONNECT_TIMEOUT_S
    ) -> Iterator[Reply]:
        """Sends and yields the replies to it until the final one. `timeout_s` bounds the wait
        for each reply, so a long batch lives as long as items keep coming. The connection has
        its own wait (`connect_s`): a short `timeout_s` must not call a live service absent."""
        connected = self.wait_connected(connect_s)
        up, drops = self.connection_state()  # a connection lost from here on is this request's
        deadline = time.monotonic() + connect_s
        while connected and not up:  # lost since it was seen, and counted: wait for the next
            connected = self.wait_connected(max(0.0, deadline - time.monotonic()))
            up, drops = self.connection_state()
        if not connected:
            refusal, unreached = self.refusal, self.no_service_message(connect_s)
            self.reset()
            if refusal:
                raise HandshakeRefused(
                    ErrorCode.UNREACHABLE,
                    f"{self.address} refused the connection: {refusal}",
                    request_id=request.id,
                    op=request.op,
                )
            raise ProtocolError(
                ErrorCode.UNREACHABLE, unreached, request_id=request.id, op=request.op
            )
        self.send(request)
        finished = False
        try:
            while not finished:
                reply = self._wait_for(request, timeout_s, drops)
                finished = is_final(reply)
                yield reply
        except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C, or the caller stopped reading
            if not finished and request.op != "status":
                self.abandon(request.id)
            raise

    def abandon(self, request_id: str) -> None:
        """Asks the service to stop a request that nobody will wait for (a timeout, Ctrl-C,
        the add-on disabled): else its work (a chat turn, a batch) runs to the end, holding up
        every other client, since the service learns a client is gone only when a reply to it
        cannot be sent. Best effort, on a live connection only; once the socket is closed or
        reset, ZeroMQ goes on sending the cancel for up to _ABANDON_LINGER_MS, in its own
        thread (nothing waits for it)."""
        if self._socket.closed or not self.connected:
            return
        cancel = CancelRequest(self.new_id(), request_id)
        with contextlib.suppress(zmq.ZMQError, ProtocolError):
            self._socket.send_multipart(encode_request(cancel, self._limits), zmq.NOBLOCK)
            self._socket.linger = _ABANDON_LINGER_MS

    def _wait_for(self, request: Request, timeout_s: float, drops: int) -> Reply:
        """The next reply to `request`; unreachable as soon as the connection it went out on
        drops (the service stopped or died: its answer will not come, even if it restarts)."""
        deadline = time.monotonic() + timeout_s
        while (remaining_ms := (deadline - time.monotonic()) * 1000) > 0:
            reply = self.poll(min(remaining_ms, _DROP_CHECK_MS))
            # Late replies to old requests are skipped; one that does not decode far enough to
            # name its request can only be about this one (the one this blocking client sent).
            if reply is not None and (
                reply.id == request.id or (isinstance(reply, UndecodableReply) and reply.id is None)
            ):
                return reply
            self._read_monitor()
            if reply is None and self._drops > drops:
                self.reset()
                raise ProtocolError(
                    ErrorCode.UNREACHABLE,
                    f"the service at {self.address} went away before answering",
                    request_id=request.id,
                    op=request.op,
                )
        code = ErrorCode.TIMEOUT if self.connected else ErrorCode.UNREACHABLE
        if request.op != "status":
            self.abandon(request.id)
        self.reset()
        raise ProtocolError(
            code,
            f"no answer from {self.address} within {timeout_s:g} s",
            request_id=request.id,
            op=request.op,
        )
