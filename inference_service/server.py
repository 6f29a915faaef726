"""The ZeroMQ server: one ROUTER socket speaking protocol v1, in front of the scheduler.

Threads:
- the I/O thread (`serve_forever`) owns the ROUTER socket: it decodes requests, answers
  `status` and `cancel` itself, hands pose work to the scheduler, and forwards replies;
- the scheduler's worker thread runs the model.
ZeroMQ sockets are not thread-safe, so a thread queues its replies in one locked queue, in
order, and wakes the I/O thread with an empty message on its own inproc PUSH socket; the I/O
thread, which polls the matching PULL socket, forwards them to the client.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import os
import re
import socket
import stat
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from shared_protocol import __version__
from shared_protocol.address import AddressError, check_address, is_ipv6, is_loopback
from shared_protocol.client import DEFAULT_ADDRESS, is_curve_key
from shared_protocol.protocol import (
    DEFAULT_LIMITS,
    HEARTBEAT_INTERVAL_MS,
    HEARTBEAT_TIMEOUT_MS,
    INSTANCE_ENV,
    BatchRequest,
    CancelReply,
    CancelRequest,
    ErrorCode,
    ErrorReply,
    Limits,
    PoseRequest,
    ProtocolError,
    Reply,
    Request,
    StatusReply,
    StatusRequest,
    decode_request,
    encode_reply,
    error_reply_for,
    is_final,
)

from .errors import BadImageError
from .images import check_image
from .scheduler import STOP_WAIT_S, Backend, ClientId, ModelInfo, Scheduler

log = logging.getLogger(__name__)

DEFAULT_BIND = DEFAULT_ADDRESS  # loopback: where clients look first
_POLL_MS = 50  # how often the I/O loop looks at deadlines and the stop flag
# A client whose pipe has stayed full this long, taking no reply, is taken for one that will not
# read again: its work is dropped (until then its replies wait).
STALLED_CLIENT_S = 120.0
# Replies one client may have waiting like that: past it, a client that floods requests and
# reads none would grow the service's memory, and every turn of the I/O loop, without bound.
# A batch is at most 256 replies; a client that reads at all never comes near.
MAX_HELD_REPLIES = 10_000
# Replies all such clients may have waiting, together: many connections each under the cap
# above would hold that much memory (about 19 MB) each. Past it, those holding the most go,
# until the rest are under it.
MAX_HELD_REPLIES_IN_ALL = 50_000
# Clients found gone that the I/O thread remembers, the latest: replies the model queued for
# one before its work was dropped are dropped without a second "client_gone" line. ZeroMQ
# names each connection anew, unless the client names itself (ZMQ_ROUTING_ID): one that
# comes back under its name is forgotten as gone at its first request.
GONE_CLIENTS_KEPT = 1024
RECEIVE_AHEAD = 8
# A connection that has not finished ZeroMQ's handshake (with CURVE, proved its key) in this
# time is closed: anyone who can reach the port could otherwise hold file descriptors open
# with silent connections, libzmq's default 30 s each, until no client could connect.
HANDSHAKE_TIMEOUT_MS = 5_000
# Refused requests logged at most, each window; the rest counted and said in one line: a
# client sending malformed requests as fast as it is answered wrote 4 MB of log a second.
BAD_REQUESTS_LOGGED = 20
BAD_REQUEST_WINDOW_S = 10.0
_instances = itertools.count()


class _BadRequestLog:
    """Logs refused requests, `BAD_REQUESTS_LOGGED` a window at most; those past it are
    counted, and the count is logged once the window is over (`flush`, each I/O turn) or
    the service stops."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._window_start = -math.inf
        self._logged = self._unlogged = 0

    def refused(self, err: ProtocolError) -> None:
        self.flush()
        if self._logged >= BAD_REQUESTS_LOGGED:
            self._unlogged += 1
            return
        self._logged += 1
        log.info(
            "bad request",
            extra={
                "event": "bad_request",
                "code": err.code.value,
                "field": err.field,
                "detail": err.message,
            },
        )

    def flush(self, final: bool = False) -> None:
        """A new window once the last is over (or, `final`, at once), saying how many its
        lines left out."""
        now = self._clock()
        if now - self._window_start < BAD_REQUEST_WINDOW_S and not final:
            return
        if self._unlogged:
            log.warning(
                "%d more bad request(s) in %g s, not logged one by one",
                self._unlogged,
                BAD_REQUEST_WINDOW_S,
                extra={"event": "bad_requests_not_logged", "count": self._unlogged},
            )
        self._window_start, self._logged, self._unlogged = now, 0, 0


class ServerConfigError(Exception):
    """The server cannot start as configured (unsafe bind, missing key files)."""


@dataclass(frozen=True)
class CurveKeys:
    """ZeroMQ CURVE: the server's secret key file and a folder of authorised client public keys.

    Make them with `python -m inference_service.keys DIR` (see docs/security.md).
    """

    server_secret_file: Path
    authorized_clients_dir: Path

    def load(self) -> tuple[bytes, bytes]:
        """The server's (public, secret) key; ServerConfigError names a path that does not
        hold what it should. Checked before a model loads: a bad clients' folder would
        otherwise refuse every client, with nothing but a line in pyzmq's log to say why."""
        secret_file, clients = self.server_secret_file, self.authorized_clients_dir
        try:
            if not secret_file.exists():  # ZeroMQ's "Invalid certificate file" says otherwise
                raise ServerConfigError(f"--curve-secret-key: no file at {secret_file}")
            public, secret = zmq.auth.load_certificate(secret_file)
        except (OSError, ValueError, IndexError) as exc:
            raise ServerConfigError(
                f"--curve-secret-key: {secret_file} is not a readable CURVE key file ({exc}); "
                "move it away and run python -m inference_service.keys on its folder for a new "
                "key pair"
            ) from None
        if secret is None:
            raise ServerConfigError(
                f"--curve-secret-key: {secret_file} holds a public key only; give the "
                "server's .key_secret file"
            )
        if not (is_curve_key(public) and is_curve_key(secret)):
            raise ServerConfigError(
                f"--curve-secret-key: {secret_file} holds keys that are not 40 Z85 characters"
            )
        try:
            folder = clients.is_dir()
        except OSError as exc:  # a name too long, a folder it may not look into
            raise ServerConfigError(f"--curve-clients: {clients} ({exc.strerror})") from None
        if not folder:
            raise ServerConfigError(
                f"--curve-clients: {clients} is not a folder (of the clients' public .key files)"
            )
        try:
            authorised = zmq.auth.load_certificates(clients)  # as the authenticator reads it
        except (OSError, ValueError, IndexError) as exc:  # pyzmq's own: a line without "="
            raise ServerConfigError(
                f"--curve-clients: {clients} holds a .key file that is not a CURVE key ({exc})"
            ) from None
        if not authorised:
            raise ServerConfigError(
                f"--curve-clients: {clients} holds no client public key (*.key), so every client "
                "would be refused"
            )
        secrets = sorted(path.name for path in clients.glob("*.key_secret"))
        if secrets:
            raise ServerConfigError(
                f"--curve-clients: {clients} holds secret keys ({', '.join(secrets[:3])}): it "
                "is for the clients' public .key files alone (python -m inference_service.keys "
                "makes DIR/authorized_clients); move the secret keys out"
            )
        if set(authorised) == {public}:
            raise ServerConfigError(
                f"--curve-clients: {clients} holds only the server's own public key, so every "
                "client would be refused: give the folder of the clients' keys "
                "(DIR/authorized_clients)"
            )
        return public, secret


class AuthorizedClients:
    """The clients' public keys, read again as the folder changes, so that a client added (or
    revoked) while the service runs is let in (or refused) at its next connection, with no
    restart. pyzmq's authenticator asks `callback` at each CURVE handshake, in its own thread,
    which an exception would end (and every handshake after it with "no service"): nothing
    escapes. Each `NAME.key` is read on its own: one being copied in keeps the key it had (none
    if new), a name gone takes its key with it. Refusals are logged, at most one line per
    REFUSALS_LOGGED_EVERY_S with their count: anyone who reaches the port can knock."""

    REFUSALS_LOGGED_EVERY_S = 10.0

    def __init__(self, folder: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = folder
        self._files: dict[str, tuple[tuple, bytes | None]] = {}  # name: (stat stamp, key)
        self._clock = clock
        self._refusals_lock = threading.Lock()  # the authenticator's thread, and the I/O one
        self._refused, self._said_at, self._last_key = 0, -math.inf, b""
        self._said: str | None = None  # the last problem logged, said once

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            self._read_changes()
            allowed = key in {known for _, known in self._files.values()}
            if not allowed:
                self._log_refusal(key)
            return allowed
        except Exception:  # noqa: BLE001 (a bug here must not end the authenticator)
            log.exception(
                "checking a client's key failed; it is refused", extra={"event": "client_refused"}
            )
            return False

    def _read_changes(self) -> None:
        try:
            entries = [e for e in os.scandir(self.folder) if e.name.endswith(".key")]
        except OSError as exc:  # the folder gone or renamed: the keys read last still hold
            self._say_once(f"cannot list the authorized clients in {self.folder} ({exc})")
            return
        files = {}
        for entry in entries:
            try:
                info = entry.stat()  # a link's target: a link left dangling is no key
            except OSError:
                continue
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            known = self._files.get(entry.name)
            if known is not None and known[0] == stamp:
                files[entry.name] = known
                continue
            try:
                key = zmq.auth.load_certificate(entry.path)[0]
            except Exception as exc:  # noqa: BLE001 (half copied: pyzmq raises IndexError too)
                key = known[1] if known is not None else None
                self._say_once(f"{entry.path} is not a readable CURVE key ({exc!r})")
            files[entry.name] = (stamp, key)
        self._files = files

    def _say_once(self, text: str) -> None:
        if text != self._said:
            log.warning(text, extra={"event": "clients_unreadable"})
            self._said = text

    def _log_refusal(self, key: bytes) -> None:
        with self._refusals_lock:
            self._refused += 1
            self._last_key = key
        self.log_refusals()

    def log_refusals(self, final: bool = False) -> None:
        """Logs the refusals not logged yet, unless a line went out less than
        REFUSALS_LOGGED_EVERY_S ago (`final`: the service stops, said now); the I/O thread
        calls it too, so that knocks after a logged one are said once that time is up, not
        only at the next knock."""
        with self._refusals_lock:
            now = self._clock()
            recent = now - self._said_at < self.REFUSALS_LOGGED_EVERY_S
            if not self._refused or (recent and not final):
                return
            refused, key = self._refused, self._last_key
            self._refused, self._said_at = 0, now
        log.warning(
            "refused %d client handshake(s) with a key not among the authorized clients in %s "
            "(the last: %s...)",
            refused,
            self.folder,
            key[:8].decode("ascii", "replace"),
            extra={"event": "client_refused"},
        )


def check_bind(bind: str, curve: CurveKeys | None) -> None:
    """Refuses a malformed address, and a non-loopback one unless CURVE keys guard it."""
    try:
        check_address(bind, bind=True)
    except AddressError as exc:
        raise ServerConfigError(f"cannot listen on {bind}: {exc}") from None
    if not is_loopback(bind) and curve is None:
        raise ServerConfigError(
            f"refusing to listen on {bind}: it is not a loopback address, and without CURVE "
            "keys anyone who can reach it could use the model. Bind to tcp://127.0.0.1:PORT, "
            "or configure keys with --curve-secret-key and --curve-clients."
        )


def check_address_free(bind: str) -> None:
    """Refuses an address something already listens on, before a model takes minutes to load
    (the real bind can still lose a race; it reports the same way)."""
    _refuse_a_live_ipc_socket(bind)  # before the probe: binding there would take it over
    context = zmq.Context()
    probe = context.socket(zmq.ROUTER)
    probe.ipv6 = is_ipv6(bind)
    try:
        probe.bind(bind)
    except zmq.ZMQError as exc:
        raise ServerConfigError(_bind_failure(bind, exc)) from None
    finally:
        probe.close(linger=0)
        context.term()


def _refuse_a_live_ipc_socket(bind: str) -> None:
    """ZeroMQ binds an ipc path by removing the file that is there, so a second server would
    silently take the address of a running one, which no client could reach again, and a
    mistyped path would delete the user's file. Only a socket file no one listens on (left by
    a server that is gone) may be replaced."""
    path = bind.removeprefix("ipc://")
    if path == bind or path.startswith("@") or not hasattr(socket, "AF_UNIX"):
        return  # not ipc, or Linux's abstract namespace, which ZeroMQ refuses twice itself
    try:
        kind = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ServerConfigError(f"cannot listen on {bind}: {exc}") from None
    if not stat.S_ISSOCK(kind):  # ZeroMQ would delete it: a file of the user's, say
        raise ServerConfigError(
            f"cannot listen on {bind}: {path} is there and is not a socket, and listening "
            "there would delete it; choose another path"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # a file left by a server that is gone: ZeroMQ replaces it
    raise ServerConfigError(_bind_failure(bind, zmq.ZMQError(errno.EADDRINUSE)))


def _instance_token() -> str:
    """What status replies name this service by: the token of the program that started it
    (INSTANCE_ENV), else one of its own. A token the replies could not carry (too long, not
    text) would break every status reply: it is said in the log and replaced."""
    given = os.environ.get(INSTANCE_ENV, "")
    if re.fullmatch(r"[\w.-]{1,64}", given, flags=re.ASCII):
        return given
    if given:
        log.warning(
            "%s is not a token of 1 to 64 letters, digits, '.', '-' or '_'; not used",
            INSTANCE_ENV,
            extra={"event": "bad_instance"},
        )
    return uuid.uuid4().hex


def _reply_id(frames: list[bytes]) -> str | None:
    """The request id a reply's frames (client, header) answer, for the log."""
    try:
        return json.loads(frames[1]).get("id")
    except (ValueError, AttributeError, IndexError):
        return None


def _local_end(bind: str) -> str:
    """Where a client on this machine reaches a --bind address: a wildcard host is reached
    through loopback."""
    for wildcard in ("://*:", "://0.0.0.0:", "://[::]:"):
        bind = bind.replace(wildcard, "://127.0.0.1:")
    return bind


def _bind_failure(bind: str, exc: zmq.ZMQError) -> str:
    if exc.errno == errno.EADDRINUSE:
        if bind.startswith("tcp://"):
            # The same host: an admin serving the network on 0.0.0.0 must not be sent to loopback.
            other = f"another port with --bind {bind.rsplit(':', 1)[0]}:PORT"
        else:
            other = "another path with --bind ipc://PATH"
        return (
            f"cannot listen on {bind}: the address is already in use. Is another chatpose-serve "
            f"running there (`chatpose status --address {_local_end(bind)}` tells)? Stop it, or "
            f"choose "
            f"{other}."
        )
    return f"cannot listen on {bind}: {exc}"


class Server:
    """The service's socket and its I/O loop (`serve_forever`). Made without a backend, it
    listens at once and answers every request `busy` (the model is still loading) until
    `attach` gives it one: a client finds the service there while a large model loads."""

    def __init__(
        self,
        backend: Backend | None,
        info: ModelInfo | None,
        bind: str = DEFAULT_BIND,
        *,
        limits: Limits = DEFAULT_LIMITS,
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        max_queued_mb: int = 256,
        default_timeout_ms: int = 120_000,
        curve: CurveKeys | None = None,
    ):
        check_bind(bind, curve)
        _refuse_a_live_ipc_socket(bind)
        self._instance = _instance_token()
        self._bad_requests = _BadRequestLog()
        self._info = info
        self._limits = limits
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._authenticator: ThreadAuthenticator | None = None
        self._clients: AuthorizedClients | None = None  # with CURVE keys
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client raises, not drops
        self._router.setsockopt(zmq.MAXMSGSIZE, self._max_frame_bytes())
        # A client gone silent (a laptop asleep, a dropped flow) is let go, and its work with it.
        self._router.heartbeat_ivl = HEARTBEAT_INTERVAL_MS
        self._router.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS
        self._router.handshake_ivl = HANDSHAKE_TIMEOUT_MS
        # Requests read off each connection ahead of the I/O thread, at most (libzmq's default
        # is 1,000, each up to 9 frames of 16 MiB): a client sending more waits in its own
        # queue, not in the service's memory (60 requests of 16 MiB behind a busy I/O thread
        # took 1 GB; now 128 MB). A client has a few in flight: a request, a status, a cancel.
        self._router.rcvhwm = RECEIVE_AHEAD
        self._router.linger = 1000
        self._router.ipv6 = is_ipv6(bind)
        if curve is not None:
            self._configure_curve(curve)
        self._outboxes: list[zmq.Socket] = []
        self._outbox_lock = threading.Lock()
        try:
            self._router.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise ServerConfigError(_bind_failure(bind, exc)) from None
        self.address = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._inbox_address = f"inproc://chatpose-replies-{next(_instances)}"
        self._inbox = self._context.socket(zmq.PULL)
        self._inbox.rcvhwm = 0  # unbounded: a full pipe would block the thread that emits
        self._inbox.bind(self._inbox_address)
        self._local = threading.local()
        self._replies: deque[list[bytes]] = deque()  # to send, in order (_emit)
        self._replies_lock = threading.Lock()
        # Replies a slow client's full pipe could not take yet, and since when it has been full
        # (the I/O thread's own: no lock).
        self._held: deque[list[bytes]] = deque()
        self._stalled_since: dict[ClientId, float] = {}
        self._gone: dict[ClientId, None] = {}  # in the order found, at most GONE_CLIENTS_KEPT
        # When and what each request in flight came in as, for its "request done" line. A list:
        # a request reusing an id in flight (refused, or a status or cancel) is answered at once,
        # so the newest entry under a key is always the one a final reply ends.
        self._received: dict[tuple[ClientId, str], list[tuple[float, str]]] = {}
        self._received_lock = threading.Lock()
        self._scheduler_options = dict(
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_queued_bytes=max_queued_mb << 20,
            default_timeout_ms=default_timeout_ms,
        )
        self.scheduler: Scheduler | None = None  # None while the model loads
        self._attach_lock = threading.Lock()
        self._serving = False  # serve_forever has started
        if backend is not None:
            self.attach(backend, info)

    def attach(self, backend: Backend, info: ModelInfo) -> None:
        """The loaded model: requests go to it from now on. Safe while `serve_forever` runs in
        another thread."""
        scheduler = Scheduler(backend, self._emit, **self._scheduler_options)
        with self._attach_lock:
            self._info = info
            if self._serving:
                scheduler.start()
                self._log_serving(info)
            self.scheduler = scheduler  # published started: the I/O thread submits to it

    def _max_frame_bytes(self) -> int:
        """ZeroMQ's MAXMSGSIZE, which libzmq applies to each frame: the largest one the limits
        let through (a header or an image), with room for a reply's worth of slack."""
        limits = self._limits
        return max(limits.max_header_bytes, limits.max_image_bytes) + 4096

    def _configure_curve(self, curve: CurveKeys) -> None:
        public, secret = curve.load()
        self._authenticator = ThreadAuthenticator(self._context)
        self._authenticator.start()
        self._clients = AuthorizedClients(curve.authorized_clients_dir)
        self._authenticator.configure_curve_callback(domain="*", credentials_provider=self._clients)
        self._router.curve_secretkey = secret
        self._router.curve_publickey = public
        self._router.curve_server = True

    # --- replies, from any thread -------------------------------------------------------------

    def _emit(self, client: ClientId, reply: Reply, *, decoded: bool = True) -> None:
        """Queues a reply for the I/O thread, which alone may use the ROUTER. Replies leave in
        the order they are queued, whichever thread queues them (the scheduler's worker, or
        the I/O thread itself for a cancel), so a batch's items never come after its end; the
        inproc PUSH only wakes the I/O thread. A reply to a request that did not decode
        (``decoded`` False) ends no logged request, even one in flight under its id."""
        frames = [client, *encode_reply(reply)]  # a ProtocolError goes back to the caller
        with self._replies_lock:
            wake = not self._replies
            self._replies.append(frames)
        if wake:
            self._outbox().send(b"")
        if decoded and is_final(reply):
            self._log_request_done(client, reply)

    def _outbox(self) -> zmq.Socket:
        """This thread's PUSH socket to the I/O thread (ZeroMQ sockets are not shared)."""
        outbox = getattr(self._local, "outbox", None)
        if outbox is None:
            outbox = self._context.socket(zmq.PUSH)
            outbox.sndhwm = 0  # unbounded, as the inbox
            outbox.connect(self._inbox_address)
            with self._outbox_lock:
                self._outboxes.append(outbox)
            self._local.outbox = outbox
        return outbox

    def _log_request_done(self, client: ClientId, reply: Reply) -> None:
        with self._received_lock:
            entries = self._received.get((client, reply.id))
            if not entries:
                return
            started, op = entries.pop()
            if not entries:
                del self._received[(client, reply.id)]
        failed = isinstance(reply, ErrorReply)
        # A status answered is at debug: the add-on asks every 2 s while it waits, and a
        # farm's log grew by 40,000 such lines a day for each animator.
        level = logging.DEBUG if op == "status" and not failed else logging.INFO
        log.log(
            level,
            "request done",
            extra={
                "event": "request",
                "id": reply.id,
                "op": op,
                "ok": not failed,
                "code": reply.code.value if failed else None,
                "ms": round((time.monotonic() - started) * 1000, 2),
            },
        )

    def _forward_replies(self) -> None:
        while True:  # the wake-ups
            try:
                self._inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        with self._replies_lock:
            replies, self._replies = self._replies, deque()
        pending, self._held = [*self._held, *replies], deque()  # a client's replies in order
        full: Counter[ClientId] = Counter()  # clients whose pipe is full: replies held
        took: set[ClientId] = set()  # clients that took a reply this turn: reading, if slowly
        gone_now: list[ClientId] = []
        for frames in pending:
            client = frames[0]
            if client in self._gone:
                continue
            if client in full:  # after one that waits, so that none overtakes it
                self._held.append(frames)
                full[client] += 1
                continue
            try:
                self._router.send_multipart(frames, zmq.NOBLOCK)
                took.add(client)
            except zmq.Again:  # connected, but not reading: its pipe is full
                full[client] += 1
                self._held.append(frames)
            except zmq.ZMQError as exc:  # gone (EHOSTUNREACH)
                # Named: its "request done" line was logged when the reply was queued.
                log.warning(
                    "client unreachable; dropping its work",
                    extra={
                        "event": "client_gone",
                        "error": str(exc),
                        "undelivered": _reply_id(frames),
                    },
                )
                self._gone[client] = None
                if len(self._gone) > GONE_CLIENTS_KEPT:
                    del self._gone[next(iter(self._gone))]
                gone_now.append(client)  # its later replies are skipped above
        # Dropped together: one at a time, each a pass over every held reply, 20,000 stalled
        # clients held the I/O thread 5 s (and 5,000 gone ones, 6 s).
        self._drop_clients(gone_now)
        now = time.monotonic()
        self._stalled_since = {
            c: now if c in took else self._stalled_since.get(c, now) for c in full
        }
        stalled: dict[ClientId, str] = {}
        for client, since in self._stalled_since.items():
            if now - since > STALLED_CLIENT_S:
                stalled[client] = f"its replies waited {now - since:.0f} s"
            elif full[client] > MAX_HELD_REPLIES:
                stalled[client] = f"{full[client]} replies waited for it"
        left = Counter(frames[0] for frames in self._held if frames[0] not in stalled)
        excess = over = sum(left.values()) - MAX_HELD_REPLIES_IN_ALL
        for client, count in left.most_common():
            if excess <= 0:
                break
            stalled[client] = f"{count} replies waited for it, with {over} too many in all"
            excess -= count
        for why in stalled.values():
            log.warning(
                "client stopped reading; dropping its work",
                extra={"event": "client_stalled", "error": why},
            )
        self._drop_clients(list(stalled))

    def _drop_clients(self, clients: Sequence[ClientId]) -> None:
        """Forgets clients that can no longer be reached: their work, their replies not yet
        sent, and their requests' log entries (which only a final reply would remove)."""
        gone = set(clients)
        if not gone:
            return
        self._held = deque(frames for frames in self._held if frames[0] not in gone)
        for client in gone:
            self._stalled_since.pop(client, None)
            if self.scheduler is not None:  # none while the model loads: no work to cancel
                self.scheduler.cancel_client(client)
        with self._received_lock:
            for key in [key for key in self._received if key[0] in gone]:
                del self._received[key]

    # --- requests, on the I/O thread ----------------------------------------------------------

    def _decoded(self, frames: list[bytes]) -> Request | None:
        """The request in `frames`, or None when it is malformed (its error reply sent)."""
        client, content = frames[0], frames[1:]
        try:
            request = decode_request(content, self._limits)
        except ProtocolError as err:
            self._bad_requests.refused(err)
            self._emit(client, error_reply_for(err), decoded=False)
            return None
        with self._received_lock:
            entry = (time.monotonic(), request.op)
            self._received.setdefault((client, request.id), []).append(entry)
        return request

    def _dispatch(self, client: bytes, request: Request) -> None:
        if self.scheduler is None:
            self._answer_while_loading(client, request)
            return
        match request:
            case StatusRequest() if self._stop.is_set():
                # Not its usual status: a restart would find the address taken, and every
                # request is refused, while the last work runs.
                message = (
                    f"the service is stopping: the work running finishes (up to {STOP_WAIT_S:.0f}"
                    " s), then it exits and frees its address"
                )
                self._emit(
                    client, ErrorReply(request.id, "status", ErrorCode.SHUTTING_DOWN, message)
                )
            case StatusRequest():
                self._emit(client, self._status(request.id))
            case CancelRequest():
                found = self.scheduler.cancel(client, request.target)
                self._emit(client, CancelReply(request.id, request.target, found))
            # A reused id is refused as one (by `submit_pose`), whatever its images.
            case PoseRequest() if not self.scheduler.in_flight(client, request.id) and (
                (refusal := self._refuse_images(request)) is not None
            ):
                self._emit(client, refusal)
            case PoseRequest():
                self.scheduler.submit_pose(client, request)
            case BatchRequest():
                self.scheduler.submit_batch(client, request)

    def _answer_while_loading(self, client: bytes, request: Request) -> None:
        """`busy` for every request while the model loads (a cancel finds nothing to cancel)."""
        if isinstance(request, CancelRequest):
            self._emit(client, CancelReply(request.id, request.target, False))
            return
        waited = time.monotonic() - self._started
        message = (
            f"the model is still loading ({waited:.0f} s so far); ask again once it has loaded"
        )
        self._emit(client, ErrorReply(request.id, request.op, ErrorCode.BUSY, message, None))

    def _refuse_images(self, request: PoseRequest) -> ErrorReply | None:
        """Too many images, or one whose header shows a wrong format or too many pixels: an
        error reply before the request is queued (decoding in full is the model worker's)."""
        allowed = self._info.max_images
        if len(request.images) > allowed:
            message = (
                f"images: this model takes at most {allowed} image(s) per request, "
                f"got {len(request.images)}"
            )
            return ErrorReply(request.id, "pose", ErrorCode.UNSUPPORTED_INPUT, message, None)
        for index, data in enumerate(request.images):
            try:
                check_image(data, f"images[{index}]")
            except BadImageError as exc:
                return ErrorReply(request.id, "pose", ErrorCode.BAD_IMAGE, str(exc), None)
        return None

    def _status(self, request_id: str) -> StatusReply:
        info = self._info
        return StatusReply(
            id=request_id,
            model=info.model,
            device=info.device,
            dtype=info.dtype,
            queue_depth=self.scheduler.queue_depth,
            uptime_s=round(time.monotonic() - self._started, 3),
            version=__version__,
            supports_images=info.supports_images,
            max_images=info.max_images,
            instance=self._instance,
        )

    # --- running and stopping -----------------------------------------------------------------

    def _log_serving(self, info: ModelInfo) -> None:
        log.info(
            "serving",
            extra={
                "event": "start",
                "address": self.address,
                "model": info.model,
                "device": info.device,
                "dtype": info.dtype,
                **self._curve_fields(),
            },
        )

    def _curve_fields(self) -> dict:
        """For the TD's log: whether clients need keys, and which folder lets them in."""
        if self._clients is None:
            return {"curve": False}
        return {"curve": True, "authorized_clients": str(self._clients.folder)}

    def serve_forever(self) -> None:
        """Serves until `stop()`; then finishes in-flight work and closes everything."""
        with self._attach_lock:
            self._serving = True
            if self.scheduler is not None:
                self.scheduler.start()
                self._log_serving(self._info)
            else:
                log.info(
                    "listening; requests are answered busy until the model has loaded",
                    extra={"event": "listening", "address": self.address, **self._curve_fields()},
                )
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._inbox, zmq.POLLIN)

        def serve_once() -> None:
            events = dict(poller.poll(_POLL_MS))
            if self._router in events:
                self._drain_requests()
            if self._inbox in events or self._held:  # held replies: tried again each turn
                self._forward_replies()

        try:
            while not self._stop.is_set():
                serve_once()
                if self.scheduler is not None:
                    self.scheduler.expire()
                if self._clients is not None:
                    self._clients.log_refusals()
                self._bad_requests.flush()
        finally:
            with self._attach_lock:
                self._serving = False  # a model that loads now is not started
                scheduler = self.scheduler
            # Requests that come while the last micro-batch runs get `shutting_down`, not
            # silence until their client's timeout.
            if scheduler is not None:
                log.info(
                    "stopping: new requests are refused, the work running finishes",
                    extra={"event": "stopping"},
                )
                scheduler.stop(while_waiting=serve_once)
            self._forward_replies()  # the last answers and the shutting_down errors
            self._bad_requests.flush(final=True)  # counted and not said yet
            try:
                self.close()
            finally:  # once the authenticator has stopped: no knock comes after it
                if self._clients is not None:
                    self._clients.log_refusals(final=True)
            log.info("stopped", extra={"event": "stop"})

    def _drain_requests(self, budget: int = 256, budget_s: float = 0.05) -> None:
        """Handles the requests waiting, `budget` of them or for `budget_s` at most, so that
        replies keep flowing under a flood of them, or of costly ones."""
        until = time.monotonic() + budget_s
        for _ in range(budget):
            if time.monotonic() > until:
                return
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._gone.pop(frames[0], None)  # a client that names itself, back: answered again
            request = None
            try:
                request = self._decoded(frames)
                if request is not None:
                    self._dispatch(frames[0], request)
            except Exception:  # one request must never take the server down
                log.exception(
                    "internal error while handling a request", extra={"event": "internal_error"}
                )
                # Under the request's id when it decoded: its client is waiting for that one.
                rid, op = (request.id, request.op) if request is not None else (None, None)
                message = "internal error; see the service log"
                self._emit(frames[0], ErrorReply(rid, op, ErrorCode.INTERNAL_ERROR, message, None))

    def stop(self) -> None:
        """Asks `serve_forever` to finish; safe from any thread and from signal handlers."""
        self._stop.set()

    def close(self) -> None:
        with self._outbox_lock:
            for outbox in self._outboxes:
                outbox.close(linger=0)
            self._outboxes.clear()
        for sock in (getattr(self, "_inbox", None), self._router):
            if sock is not None:
                sock.close()
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()
