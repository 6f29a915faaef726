"""`chatpose-serve`: the ChatPose model behind a ZeroMQ server (see shared_protocol/PROTOCOL.md)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from shared_protocol.client import secret_key_exposure

from . import logs
from .checkpoint import Checkpoint, work_offline
from .commands import (
    DEVICE_HELP,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    STOP_SIGNALS,
    catchable_signals,
    device_argument,
    positive_int,
    stops_as_interrupts,
    user_path,
)
from .errors import ChatPoseError, CheckpointError
from .scheduler import MAX_WAIT_MS
from .server import (
    DEFAULT_BIND,
    CurveKeys,
    Server,
    ServerConfigError,
    check_address_free,
    check_bind,
)

log = logging.getLogger("chatpose.serve")

EXIT_FAILED = 1  # the server failed while serving (a bug), as a traceback exits
# The bundled demo checkpoint, served when no --checkpoint is given.
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo_checkpoint"


def _wait_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_WAIT_MS:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_WAIT_MS:g} ms, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse's refusals also as a `config_error` JSON line for a log reader, as the service's
    other start-up refusals are; argparse's plain lines come last (the add-on shows the last)."""

    def error(self, message: str):
        if sys.stderr is not None and not sys.stderr.isatty():  # None: `2>&-`
            line = logs.line_now(log.name, logging.ERROR, message, "config_error")
            with contextlib.suppress(OSError, ValueError):
                print(line, file=sys.stderr, flush=True)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chatpose-serve", description="Serve a ChatPose checkpoint over ZeroMQ.")
    parser.add_argument(
        "--checkpoint",
        type=user_path,
        help="checkpoint directory (default: the bundled demo model)",
    )
    parser.add_argument("--bind", default=DEFAULT_BIND, help=f"address (default {DEFAULT_BIND})")
    parser.add_argument("--device", default="auto", type=device_argument, help=DEVICE_HELP)
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=8,
        help="largest micro-batch (default %(default)s)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=_wait_ms,
        default=2.0,
        help=f"how long a micro-batch waits to fill (0 to {MAX_WAIT_MS:g}; default %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=1024,
        help="items waiting, at most (default %(default)s)",
    )
    parser.add_argument(
        "--max-queued-mb",
        type=positive_int,
        default=256,
        help="MiB of images and text waiting, at most (default %(default)s)",
    )
    parser.add_argument(
        "--timeout-ms",
        type=positive_int,
        default=120_000,
        help="deadline of requests that set none (default %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=256,
        help="bound on a chat reply's length (default %(default)s; at most 512)",
    )
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-4bit", action="store_true", help="needs bitsandbytes")
    quantize.add_argument("--load-in-8bit", action="store_true", help="needs bitsandbytes")
    parser.add_argument(
        "--curve-secret-key",
        type=user_path,
        help="the server's CURVE key pair file (docs/security.md)",
    )
    parser.add_argument(
        "--curve-clients", type=user_path, help="folder of authorised clients' CURVE public keys"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument(
        "--stop-with-stdin",
        action="store_true",
        help="stop when standard input closes (the Blender add-on holds a pipe to it, which "
        "closes however Blender ends, a crash too)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _serve(build_parser().parse_args(argv))
    finally:
        logs.flush()  # the log's last lines, written before the process ends


def _serve(args: argparse.Namespace) -> int:
    work_offline()  # before transformers is imported: no request to the Hub, ever
    server = io = None
    try:  # transformers and torch, imported by these, are not in a client-only install
        logs.configure(args.log_level)
        # From the start: a Blender that crashes while a large model loads takes the load
        # with it.
        parent = ParentWatch(sys.stdin.fileno()) if args.stop_with_stdin else None
        # Listening before the model loads (minutes for a large one): a client is told it is
        # loading, not that there is no service.
        raise_open_file_limit()
        server = _listening_server(args)
        io = _IoThread(server)
        io.start()
        # Once loaded, a Ctrl-C stops the server cleanly (as SIGTERM), not the main thread; so
        # does the terminal it was started in closing (SIGHUP), unless `nohup` started it, and
        # on Windows Ctrl+Break (SIGBREAK). Set as loading ends: SIGTERM's default between the
        # two would end it without a log line.
        on_signal = SignalStop(server.stop)
        with stops_as_interrupts(after=on_signal):
            backend = _load_backend(args)
        signal.signal(signal.SIGINT, on_signal)
        if not io.is_alive():  # the I/O loop died while the model loaded: no clean start
            return _io_failed(server, io)
    except BaseException as exc:
        # Stopping already: the same stop sent again (to the process, then its group) waits.
        with _stops_ignored() if isinstance(exc, KeyboardInterrupt) else contextlib.nullcontext():
            if server is not None:
                server.stop()
            if io is not None:
                io.join()
            return _start_failed(exc)
    # The model's objects (torch's and transformers', some hundred thousand) are never
    # garbage, but every full collection walked them all: a 1 MB request header of nested
    # lists took the I/O thread 1.2 s to decode, 0.2 s with them frozen. Let go at the end:
    # frozen, cycles that hold a module (bpy's, in a test process) outlive the interpreter.
    gc.collect()  # what loading left as garbage is freed, not frozen with the rest
    gc.freeze()
    try:
        server.attach(backend, backend.info)
        if parent is not None:
            parent.serving(server.stop)
        while io.is_alive():
            io.join(0.5)  # with a timeout: the signal handlers run between
        return 0 if io.failure is None else _io_failed(server, io)
    finally:
        gc.unfreeze()


# Open files the service asks for at most: each client connection is one. Desktops start a
# process at 256 (macOS) or 1,024 (most Linux), which silent connections fill in seconds.
# macOS refuses more than its kern.maxfilesperproc (10,240 by default) whatever the hard
# limit says: the next is asked for then.
OPEN_FILES_WANTED = (65_536, 10_240, 4_096)


def raise_open_file_limit() -> None:
    """The soft limit on open files raised towards the hard one (no limit on Windows, and no
    say there): as many clients as the system lets one process have."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in OPEN_FILES_WANTED:
        if hard != resource.RLIM_INFINITY:
            wanted = min(wanted, hard)
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return
        except (ValueError, OSError):
            continue


@contextlib.contextmanager
def _stops_ignored() -> Iterator[None]:
    stops = catchable_signals(("SIGINT", *STOP_SIGNALS))
    previous = {n: signal.signal(n, signal.SIG_IGN) for n in stops}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _io_failed(server: Server, io: _IoThread) -> int:
    """The exit of a service whose I/O loop died (a bug): not a clean one."""
    server.close()  # if it died before closing: an open socket would hold the exit
    logs.flush()  # the plain line last, as the add-on shows it
    print(f"chatpose-serve: the server failed: {io.failure!r}; see the log", file=sys.stderr)
    return EXIT_FAILED


class _IoThread(threading.Thread):
    """The server's I/O loop, run while the main thread loads the model and waits for
    signals; `failure`: what ended it, when something did (logged with its traceback)."""

    def __init__(self, server: Server):
        super().__init__(name="chatpose-io")
        self._server = server
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._server.serve_forever()
        except BaseException as exc:
            log.exception("the server's I/O loop failed", extra={"event": "crash"})
            self.failure = exc


def _start_failed(exc: BaseException) -> int:
    """The exit code of a start that failed with `exc`, its message said; anything else (a bug)
    is raised again."""
    logs.flush()  # the plain line below comes last, as the add-on shows the last line
    if isinstance(exc, ModuleNotFoundError):
        from .cli import missing_service_package

        print(f"chatpose-serve: {missing_service_package(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, (ServerConfigError, ChatPoseError)):
        if not sys.stderr.isatty():  # for a log reader; on a terminal the plain line says it
            log.error(str(exc), extra={"event": "config_error"})
            logs.flush()
        print(f"chatpose-serve: {exc}", file=sys.stderr)
        return EXIT_USAGE  # bad arguments, an unsafe bind, a checkpoint that does not load
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C while the model loads: nothing to finish
        log.info("interrupted while loading", extra={"event": "stop"})
        return EXIT_INTERRUPTED
    raise exc


class ParentWatch:
    """Reads the file descriptor `fd` to its end in a thread of its own: nobody writes to it,
    and its end is the death of the process holding the other end of the pipe. Then the
    service stops: cleanly once it serves (`serving`), at once while the model loads (nothing
    is in flight). The descriptor, not sys.stdin: a daemon thread blocked in a buffered read
    aborts the interpreter's exit."""

    def __init__(self, fd: int, exit_now=os._exit):
        self._exit_now = exit_now
        self._lock = threading.Lock()
        self._stop = None
        self._gone = False
        threading.Thread(target=self._watch, args=(fd,), daemon=True).start()

    def serving(self, stop) -> None:
        with self._lock:
            self._stop = stop
            gone = self._gone
        if gone:
            stop()

    def _watch(self, fd: int) -> None:
        while os.read(fd, 4096):
            pass
        log.info(
            "standard input closed: whoever started this service is gone", extra={"event": "stop"}
        )
        with self._lock:
            self._gone = True
            stop = self._stop
        if stop is None:
            logs.flush()  # the line above, written before the process ends
            self._exit_now(0)
        else:
            stop()


class SignalStop:
    """The SIGINT/SIGTERM/SIGHUP handler: the first signal stops the server cleanly (the batch that
    is running finishes, up to 30 s); a second one exits at once, unless it comes within
    `SAME_STOP_S` of the first: `timeout` and process managers send one stop to the process and
    then to its group, twice within milliseconds."""

    SAME_STOP_S = 1.0

    def __init__(self, stop, exit_now=os._exit, clock=time.monotonic):
        self._stop = stop
        self._exit_now = exit_now
        self._clock = clock
        self._signalled_at: float | None = None

    def __call__(self, signum: int, _frame=None) -> None:
        if self._signalled_at is not None:
            if self._clock() - self._signalled_at < self.SAME_STOP_S:
                return
            log.warning("second signal: exiting now", extra={"event": "forced_stop"})
            logs.flush()
            self._exit_now(128 + signum)
            return
        self._signalled_at = self._clock()
        self._stop()


def _listening_server(args: argparse.Namespace) -> Server:
    """The server, its arguments checked and its address bound, with no model yet."""
    if (args.curve_secret_key is None) != (args.curve_clients is None):
        raise ServerConfigError("--curve-secret-key and --curve-clients go together")
    curve = CurveKeys(args.curve_secret_key, args.curve_clients) if args.curve_secret_key else None
    check_bind(args.bind, curve)
    if curve is not None:
        curve.load()
        if exposure := secret_key_exposure(curve.server_secret_file):
            log.warning(f"--curve-secret-key: {exposure}", extra={"event": "key_exposed"})
    check_address_free(args.bind)
    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    if not checkpoint.exists():
        if args.checkpoint is None:
            raise ServerConfigError(
                f"the bundled demo checkpoint is missing from {checkpoint}; rebuild it with "
                "`make demo-model`, or pass --checkpoint DIR"
            )
        raise ServerConfigError(f"--checkpoint: {checkpoint} does not exist")
    try:  # its layout, before listening: a file or another folder was refused after a load
        Checkpoint.open(checkpoint)
    except CheckpointError as exc:
        flag = "--checkpoint" if args.checkpoint is not None else "the bundled demo checkpoint"
        raise ServerConfigError(f"{flag}: {exc}") from None
    from .modeling_chatpose import MAX_NEW_TOKENS_LIMIT  # imports torch

    if args.max_new_tokens > MAX_NEW_TOKENS_LIMIT:  # else every chat request would be refused
        raise ServerConfigError(
            f"--max-new-tokens: at most {MAX_NEW_TOKENS_LIMIT}, got {args.max_new_tokens}"
        )
    return Server(
        None,
        None,
        args.bind,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_queued_mb=args.max_queued_mb,
        default_timeout_ms=args.timeout_ms,
        curve=curve,
    )


def _load_backend(args: argparse.Namespace):
    """The model of `args.checkpoint` (the demo's without one), loaded: minutes for a large one."""
    from .backend import ModelBackend

    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    quantization = "4-bit" if args.load_in_4bit else "8-bit" if args.load_in_8bit else "none"
    log.info(  # said before the minutes it may take, for the admin watching the log
        "loading the model",
        extra={
            "event": "loading",
            "checkpoint": str(Path(checkpoint).resolve()),
            "device": args.device,
            "quantization": quantization,
        },
    )
    return ModelBackend.from_checkpoint(
        checkpoint,
        device=args.device,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        max_new_tokens=args.max_new_tokens,
    )


if __name__ == "__main__":
    sys.exit(main())
