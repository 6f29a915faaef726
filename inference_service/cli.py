"""`chatpose`: the client command line.

    chatpose status                      the service's status
    chatpose pose "TEXT" [--image FILE]  one request; prints the reply and the poses
    chatpose batch FILE.txt --out a.npz  one prompt per line, streamed, keyed as an animation
    chatpose demo                        what `make demo` runs

Exit codes follow the protocol's error codes, so scripts can tell what went wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from inference_service.commands import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    device_argument,
    interrupts_deferred,
    positive_float,
    stops_as_interrupts,
    user_path,
    utf8_output,
)
from shared_protocol import __version__
from shared_protocol.address import AddressError, check_address
from shared_protocol.batch_requests import BUSY_RETRY_DELAYS_S, BatchRequests
from shared_protocol.batch_text import (
    FileTooLargeError,
    prompt_lines,
    read_batch_file,
    unreadable,
)
from shared_protocol.client import (
    DEFAULT_ADDRESS,
    Client,
    ClientCurveKeys,
    UndecodableReply,
    secret_key_exposure,
)
from shared_protocol.pose import DEFAULT_FPS, FPS_RANGE, Motion, Pose
from shared_protocol.protocol import (
    DEFAULT_LIMITS,
    JPEG_MAGIC,
    PNG_MAGIC,
    BatchDoneReply,
    BatchItemReply,
    BatchRequest,
    ErrorCode,
    ErrorReply,
    PoseReply,
    PoseRequest,
    ProtocolError,
    StatusReply,
    StatusRequest,
    decode_request,
    encode_reply,
    encode_request,
    error_reply_for,
    readable_text,
    timeout_ms_within,
)
from shared_protocol.safe_files import check_writable
from shared_protocol.skeleton import JOINT_NAMES

EXIT_OK = 0
EXIT_NOT_BUILT = 3
EXIT_BAD_INPUT = 4
EXIT_UNREACHABLE = 5
EXIT_TIMEOUT = 6
EXIT_SERVICE_ERROR = 7
EXIT_BUSY = 8  # worth asking again later, unlike 7
EXIT_CLOSED_OUTPUT = 141  # the shell's code for SIGPIPE: stdout closed (`| head`)
DEFAULT_TIMEOUT_S = 60.0
LOCAL_ID = "local"  # the request id of --local's replies: no service numbered them
# A batch's answers are also written this often while it runs, so that one killed outright
# keeps them (_SavedProgress).
PROGRESS_SAVE_S = 30.0
# How often a batch whose stderr is a log, not a terminal, says how far it is: a farm's log
# showed nothing for hours.
PROGRESS_LOG_S = 30.0
_progress_log_due = [0.0]

_EXIT_FOR_CODE = {
    ErrorCode.UNREACHABLE: EXIT_UNREACHABLE,
    ErrorCode.TIMEOUT: EXIT_TIMEOUT,
    ErrorCode.BUSY: EXIT_BUSY,
    **{
        code: EXIT_BAD_INPUT
        for code in (
            ErrorCode.BAD_JSON,
            ErrorCode.BAD_SCHEMA,
            ErrorCode.UNSUPPORTED_PROTOCOL,
            ErrorCode.UNKNOWN_OP,
            ErrorCode.TOO_LARGE,
            ErrorCode.BAD_IMAGE,
            ErrorCode.EMPTY_PROMPT,
            ErrorCode.UNSUPPORTED_INPUT,
        )
    },
}
EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}  success
  {EXIT_USAGE}  bad command-line arguments, or a package this command needs is not installed
  {EXIT_NOT_BUILT}  the bundled demo model is missing (`make demo-model` rebuilds it)
  {EXIT_BAD_INPUT}  bad input: a prompt, image or file the service (or this command) refused
  {EXIT_UNREACHABLE}  no service at the address
  {EXIT_TIMEOUT}  the service did not answer in time
  {EXIT_SERVICE_ERROR}  the service failed (model error, shutting down, cancelled), or gave no
      pose for --out
  {EXIT_BUSY}  the service is busy (other users' work fills its queue, or its model is still
      loading): ask again later, or with --wait
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C, SIGTERM, SIGHUP, Ctrl+Break); a batch writes what was
      answered
  {EXIT_CLOSED_OUTPUT}  stdout closed early (`| head`); --out was written before printing"""


class CommandError(Exception):
    """A failure with its exit code and a message for the user."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_for(code: ErrorCode) -> int:
    return _EXIT_FOR_CODE.get(code, EXIT_SERVICE_ERROR)


def exit_code_for_all(codes: Sequence[ErrorCode]) -> int:
    """The exit code of a command whose requests failed with `codes`: 0 for none, the one they
    share (bad input alone: 4), else the service's failure."""
    exits = {exit_code_for(code) for code in codes}
    if not exits:
        return EXIT_OK
    return exits.pop() if len(exits) == 1 else EXIT_SERVICE_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatpose",
        description="Ask a ChatPose service for SMPL poses from text and images.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chatpose {__version__}")
    connection = argparse.ArgumentParser(add_help=False)
    # Their defaults are set once parsed (_service_flags): --local must see what was given.
    connection.add_argument(
        "--address",
        type=_address,
        help=f"the service's address (default {DEFAULT_ADDRESS})",
    )
    connection.add_argument(
        "--timeout",
        type=positive_float,
        metavar="S",
        help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    connection.add_argument(
        "--wait",
        type=positive_float,
        metavar="S",
        help="wait up to S seconds for the service to serve: one just started, loading its "
        "model, restarting (batch: in the middle of a run too, the lines answered kept), or "
        "with its queue full of other users' work (by default a service not there within 2 s, "
        "loading, stopping or busy, is an error)",
    )
    connection.add_argument(
        "--curve-secret-key",
        type=user_path,
        metavar="FILE",
        help="for a service with CURVE keys: your NAME.key_secret (docs/security.md)",
    )
    connection.add_argument(
        "--curve-server-key",
        type=user_path,
        metavar="FILE",
        help="with it: the server's server.key",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pose = commands.add_parser("pose", parents=[connection], help="pose from text and/or image")
    pose.add_argument(
        "text",
        nargs="?",
        default="",
        help="what the person should do (may be left out with --image)",
    )
    pose.add_argument("--image", type=user_path, metavar="FILE", help="a PNG or JPEG reference")
    pose.add_argument("--chat", action="store_true", help="a free reply instead of a pose only")
    pose.add_argument(
        "--json",
        action="store_true",
        help="print the service's reply as JSON, an error reply too (no reply, as with no "
        "service, none in time or an unreadable --image, prints nothing on stdout: see the "
        "exit code and stderr)",
    )
    pose.add_argument("--out", type=_npz_file, metavar="FILE.npz", help="write AMASS-layout .npz")
    pose.add_argument("--local", action="store_true", help="run the model in this process")
    pose.add_argument("--checkpoint", type=user_path, help="with --local (default: the demo model)")

    batch = commands.add_parser(
        "batch", parents=[connection], help="one prompt per line (# lines are notes)"
    )
    batch.add_argument("file", type=user_path, metavar="FILE.txt")
    batch.add_argument("--out", type=_npz_file, metavar="FILE.npz", required=True)
    batch.add_argument(
        "--fps", type=_frame_rate, help="frames per second (30; with --resume, the earlier file's)"
    )
    batch.add_argument(
        "--resume",
        action="store_true",
        help="ask only the lines that a batch cut short left unanswered (its FILE.partial.npz, "
        "else --out)",
    )
    batch.add_argument(
        "--json",
        action="store_true",
        help="print a summary as JSON once the run ends, cut short too: where the poses went, "
        "and each line's outcome by its number in the file",
    )

    status = commands.add_parser("status", parents=[connection], help="the service's status")
    status.add_argument(
        "--json",
        action="store_true",
        help="print the service's reply as JSON, an error reply too (for health checks)",
    )
    demo = commands.add_parser("demo", help="what `make demo` runs: the whole system, end to end")
    demo.add_argument(
        "--checkpoint", type=user_path, help="the model to serve (default: the bundled demo model)"
    )
    demo.add_argument(
        "--out", type=user_path, default=Path("demo_output"), help="output folder (demo_output)"
    )
    demo.add_argument("--size", type=int, default=256, help="panel pixels, 32 to 2048 (256)")
    demo.add_argument(
        "--device",
        type=device_argument,
        default="cpu",
        help="the service's device: auto, cpu, cuda or cuda:N (cpu)",
    )
    demo.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        metavar="S",
        help="seconds to wait for an answer (default 120)",
    )
    return parser


def _address(text: str) -> str:
    try:
        return check_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _frame_rate(text: str) -> float:
    low, high = FPS_RANGE
    value = positive_float(text)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected a frame rate from {low:g} to {high:g}")
    return value


def main(argv: list[str] | None = None) -> int:
    utf8_output(sys.stdout)
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a first try: the help, not an error
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = {
        "status": _status,
        "pose": _pose,
        "batch": _batch,
        "demo": _demo,
    }[args.command]
    try:
        _service_flags(args)
        with stops_as_interrupts():  # SIGTERM, SIGHUP: as Ctrl-C, with its message and code
            code = command(args)
            _flush_output()  # here, where a closed stdout is caught, not at exit
        return code
    except CommandError as exc:
        _report(f"chatpose {args.command}: {exc}")
        return exc.exit_code
    except ProtocolError as exc:
        _report(f"chatpose {args.command}: {exc.message}")
        return exit_code_for(exc.code)
    except KeyboardInterrupt:
        _report(f"chatpose {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:  # a client-only install (`pip install .`): no torch
        _report(f"chatpose {args.command}: {missing_service_package(exc)}")
        return EXIT_USAGE
    except BrokenPipeError:  # stdout's reader left (`| head`): what it wanted, it has
        _silence_output()
        return EXIT_CLOSED_OUTPUT


# The flags of a service's connection, which `pose --local` (no service) refuses rather than
# ignores: a script's --address or --timeout would otherwise seem to have been used.
_SERVICE_FLAGS = {
    "address": "--address",
    "timeout": "--timeout",
    "wait": "--wait",
    "curve_secret_key": "--curve-secret-key",
    "curve_server_key": "--curve-server-key",
}


def _service_flags(args: argparse.Namespace) -> None:
    """Refuses service flags given with --local; else sets the defaults of those not given."""
    if args.command == "demo":  # its own --timeout; it starts its service
        return
    if getattr(args, "local", False):
        given = [flag for dest, flag in _SERVICE_FLAGS.items() if getattr(args, dest) is not None]
        if given:
            verb = "is" if len(given) == 1 else "are"
            raise CommandError(
                EXIT_USAGE,
                f"{' and '.join(given)} {verb} for a service; --local runs the model in this "
                "process and needs none",
            )
    if args.address is None:
        args.address = DEFAULT_ADDRESS
    if args.timeout is None:
        args.timeout = DEFAULT_TIMEOUT_S


# Modules whose package is named otherwise on the package index.
_PACKAGE_OF_MODULE = {"PIL": "pillow"}


def missing_service_package(exc: ModuleNotFoundError) -> str:
    """What to say when the model's packages are not installed."""
    module = (exc.name or "").partition(".")[0]
    package = _PACKAGE_OF_MODULE.get(module, module)
    others = ", ".join(p for p in ("torch", "transformers", "pillow") if p != package)
    return (
        f"this runs the model here, which needs the '{package}' package and the service's "
        f"others ({others}): in the project's folder, pip install "
        "'.[service]' (a client-only install has status, pose and batch against a running "
        "service)"
    )


def _out(*values, **options) -> None:
    """`print` to stdout."""
    with _output_failures():
        print(*values, **options)


def _flush_output() -> None:
    if sys.stdout is not None:  # `>&-`: print wrote nothing, and there is nothing to flush
        with _output_failures():
            sys.stdout.flush()


@contextlib.contextmanager
def _output_failures():
    """Stdout failing (`> result.json` on a full disk) as a CommandError naming it, not a
    traceback; a closed pipe stays BrokenPipeError (exit 141)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        _silence_output()
        raise CommandError(EXIT_BAD_INPUT, f"cannot write the output ({exc.strerror})") from None


def _silence_output() -> None:
    """Stdout onto the null device: what it still buffers would fail again at exit."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _report(text: str) -> None:
    """A line on stderr, which may be a terminal that closed (SIGHUP) or closed from the start
    (`2>&-`: print would write to stdout instead): the work is written by then, and the exit
    code must still say what happened."""
    if sys.stderr is None:
        return
    # A file name that is not UTF-8 is kept as surrogates, which a strict stream refuses.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        print(text, file=sys.stderr)
    except OSError:
        pass


def _on_terminal() -> bool:
    """Whether stderr is a terminal (not a log file, and not closed: `2>&-` leaves None)."""
    return sys.stderr is not None and sys.stderr.isatty()


# --- sub-commands -----------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    with _serving_client(args) as client:
        request = StatusRequest(client.new_id())
        reply = _first_reply(client, request, args.timeout)
    answered = isinstance(reply, (StatusReply, ErrorReply))
    if args.json and answered and not isinstance(reply, UndecodableReply):
        _out(encode_reply(reply)[0].decode("utf-8"))
    reply = _checked(reply, StatusReply)
    if args.json:
        return EXIT_OK
    images = f"up to {reply.max_images}" if reply.supports_images else "no"
    _out(f"service   {args.address}")
    _out(f"model     {reply.model} on {reply.device} ({reply.dtype})")
    _out(f"images    {images} per request")
    _out(f"queue     {reply.queue_depth} waiting")
    _out(f"uptime    {reply.uptime_s:.0f} s")
    _out(f"version   {reply.version}")
    return EXIT_OK


def _pose(args: argparse.Namespace) -> int:
    if args.checkpoint and not args.local:
        raise CommandError(EXIT_USAGE, "--checkpoint names the model for --local; add --local")
    if not args.text and args.image is None:  # a first try with nothing to ask: the usage
        raise CommandError(
            EXIT_USAGE,
            'say what the person should do (chatpose pose "TEXT"), give --image FILE, or both',
        )
    try:
        args.text.encode("utf-8")
    except UnicodeEncodeError:  # Python keeps a non-UTF-8 argument's bytes as surrogates
        raise CommandError(
            EXIT_BAD_INPUT, "the prompt is not UTF-8 text; set the terminal's encoding to UTF-8"
        ) from None
    if args.out:
        _check_writable(args.out, inputs=[args.image] if args.image else [])
    images = (_read_image(args.image),) if args.image else ()
    mode = "chat" if args.chat else "pose"
    # No reply (unreachable, timed out): raises.
    answer = _image_refusal(images) or _pose_reply(args, images, mode)
    # A script reading stdout gets the service's error reply too (not one made up here for a
    # reply that did not decode).
    if args.json and isinstance(answer, ErrorReply) and not isinstance(answer, UndecodableReply):
        _out(encode_reply(answer)[0].decode("utf-8"))
    if isinstance(answer, ErrorReply) and args.image and answer.message.startswith("images[0]"):
        # The service names the request's field; the user gave a file.
        message = f"--image {args.image}{answer.message.removeprefix('images[0]')}"
        answer = dataclasses.replace(answer, message=message)
    if isinstance(answer, ErrorReply) and answer.code == ErrorCode.TIMEOUT:
        answer = dataclasses.replace(answer, message=_busy_timeout(args))
    reply = _checked(answer, PoseReply)
    # The file first: a reader that closes stdout early (`| head`) must not cost it; and a
    # file that cannot be written must not cost the reply.
    unwritten = None
    if args.out and not reply.poses:  # a chat reply may hold none: keep what --out holds
        # Not a success: a script going on to read --out would read an older run's file.
        unwritten = CommandError(
            EXIT_SERVICE_ERROR, f"the reply holds no pose; {args.out} was not written"
        )
    elif args.out:
        try:
            _write_motion(args.out, list(reply.poses), fps=DEFAULT_FPS)
            _report(f"wrote {len(reply.poses)} pose(s) to {args.out}")
        except CommandError as exc:
            unwritten = exc
    if args.json:
        _out(encode_reply(reply)[0].decode("utf-8"))
    else:
        _print_pose_reply(reply)
    if reply.truncated:  # its text stops mid-way; a pose it would have given may be missing
        _report(
            "chatpose pose: the reply was cut at the service's limit of new tokens "
            "(chatpose-serve --max-new-tokens), before the model ended it"
        )
    if unwritten is not None:
        raise unwritten
    return EXIT_OK


def _pose_reply(args: argparse.Namespace, images: tuple[bytes, ...], mode: str):
    """The service's reply (an error reply too), or the local model's as one; a ProtocolError
    when none came (unreachable, timed out)."""
    if args.local:
        request = PoseRequest(LOCAL_ID, args.text, images=images, mode=mode)
        # Before the model loads, with the image's header too (pillow: installed with it).
        return _refusal(request, check_images=True) or _local_reply(args, images, mode)
    # --wait covers a full queue too: other users' work, asked again until the wait is up.
    waited_until = None if args.wait is None else time.monotonic() + args.wait
    with _serving_client(args) as client:
        for tries in itertools.count():
            request = PoseRequest(
                client.new_id(), args.text, images=images, mode=mode, timeout_ms=_waits_ms(args)
            )
            reply = _refusal(request) or _first_reply(client, request, args.timeout)
            left = 0.0 if waited_until is None else waited_until - time.monotonic()
            if not _refused_busy(reply):
                return reply
            busy = reply.message.removesuffix("; try again shortly")  # this command will, or
            if left <= 0:  # says how
                more = (
                    "; add --wait S to ask again for up to S s"
                    if args.wait is None
                    else f"; still so after --wait {args.wait:g} s"
                )
                return dataclasses.replace(reply, message=busy + more)
            delay = BUSY_RETRY_DELAYS_S[min(tries, len(BUSY_RETRY_DELAYS_S) - 1)]
            _report(f"chatpose pose: {busy}; asking again in {min(delay, left):.3g} s")
            time.sleep(min(delay, left))


def _refusal(request: PoseRequest, check_images: bool = False):
    """The service's own checks of a request (a blank prompt, the size limits; with
    ``check_images``, each image's header): the error reply it would send, or None, its
    message naming the request's field as the service's does."""
    try:
        decode_request(encode_request(request))
    except ProtocolError as exc:
        return error_reply_for(exc, op="pose")
    if not check_images:
        return None
    from .errors import BadImageError
    from .images import check_image

    for index, data in enumerate(request.images):
        try:
            check_image(data, f"images[{index}]")
        except BadImageError as exc:
            return ErrorReply(request.id, "pose", ErrorCode.BAD_IMAGE, str(exc))
    return None


def _batch(args: argparse.Namespace) -> int:
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
                _out(json.dumps(run.summary(finished)))
    return run.exit_code()


class _BatchRun:
    """One `chatpose batch`: the prompt file's lines, the pose or the error each got so far
    (by line number), and where the answers go."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lines = _read_prompts(args.file)  # (line number in the file, prompt)
        partial = _partial_path(args.out)
        _check_writable(args.out, inputs=[args.file], also=[partial])
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
        _progress_log_due[0] = time.monotonic() + PROGRESS_LOG_S

    def _not_answered(self, lines: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        return [
            (n, prompt) for n, prompt in lines if n not in self.poses and n not in self.failures
        ]

    def ask_every_line(self) -> None:
        """Asks the service for the lines without an answer, in requests of as many lines as it
        takes (`BatchRequests` halves them for a service whose queue holds fewer)."""
        if not self.sendable:
            return
        with _serving_client(self.args) as client:
            plan = BatchRequests([prompt for _, prompt in self.sendable])
            while (positions := plan.next()) is not None:
                asked = self.sendable[positions.start : positions.stop]
                request = BatchRequest(
                    client.new_id(),
                    [prompt for _, prompt in asked],
                    timeout_ms=_waits_ms(self.args),
                )
                # With --wait, a service that stops mid-run (a restart) is waited for.
                waits_through = self.args.wait is not None and self.restarts < MAX_RESTARTS_WAITED
                replies = _until_gone(client.stream(request, self.args.timeout), waits_through)
                gone = self._take_replies(replies, plan, asked)
                if gone is not None:  # the lines not answered yet, asked again once it serves
                    self.restarts += 1
                    if _on_terminal():
                        _report("")  # past the progress bar's line
                    waiting = f"waiting up to {self.args.wait:g} s for it to serve again"
                    _report(f"chatpose batch: {gone}; {waiting}")
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
            delay = plan.delay_before_again() if _refused_busy(reply) else None
            if delay is not None:
                if _on_terminal():
                    _report("")  # past the progress bar's line
                _report(f"chatpose batch: {reply.message}; asking again in {delay:g} s")
                time.sleep(delay)  # Ctrl-C stops it as any wait
                return None
            plan.taken()
            if isinstance(reply, BatchItemReply) and reply.poses:
                number, prompt = asked[reply.index]
                # Labelled with its line's prompt, which --resume matches it by.
                self.poses[number] = dataclasses.replace(reply.poses[0], label=prompt)
            elif isinstance(reply, ErrorReply) and reply.index is not None:
                busy = reply.code == ErrorCode.TIMEOUT
                message = _busy_timeout(self.args) if busy else reply.message
                self.failures[asked[reply.index][0]] = (reply.code, message)
            elif not isinstance(reply, BatchItemReply):  # the whole request failed, or ended
                _checked(reply, BatchItemReply)
            self.saved.offer(self.poses, self.fps)
            _progress(len(self.poses) + len(self.failures), len(self.lines))
        return None

    def write_answers(self, finished: bool) -> None:
        """Writes the answers where they belong (or, for a run cut short, where they keep the
        user's files), and says what was written and which lines got no pose, and why."""
        args, poses = self.args, self.poses
        if _on_terminal() and self.sendable:
            _report("")  # past the progress bar's line
        answered_all = len(poses) == len(self.lines)
        # A file another run wrote at --out meanwhile is as much the user's as one there
        # before: a run cut short does not replace it.
        out_existed = self.out_existed or (self.saved.path == args.out and self.saved.appeared())
        self.out = _batch_destination(
            args.out, finished, answered_all, self.resumed_from, out_existed
        )
        if not finished and len(poses) == self.earlier and self.resumed_from is not None:
            _report(f"no new answers; {self.resumed_from} is kept as it was")
        elif poses:
            self.written = _write_or_rescue(self.out, [poses[i] for i in sorted(poses)], self.fps)
        elif finished:  # every line failed: the errors below say why
            _report(f"no line got a pose; {args.out} was not written")
        if self.written is not None:
            gaps = " (a frame per answered line, in file order)" if not answered_all else ""
            kept = (
                f"; {args.out} is kept as it was"
                if self.written != args.out and out_existed
                else ""
            )
            _report(f"wrote {len(poses)} of {len(self.lines)} poses to {self.written}{gaps}{kept}")
        if finished and self.written == args.out:
            _drop_answered_partial(args, self.lines, poses)
        for number, (code, message) in sorted(self.failures.items()):
            _report(f"chatpose batch: line {number}: {code.value}: {message}")
        unanswered = [n for n, _ in self._not_answered(self.lines)]
        stopped_before_any = not finished and len(poses) == self.earlier == 0
        if unanswered and not stopped_before_any:  # else the cause, said last, is all
            resumable = self.written is not None or self.resumed_from is not None
            hint = "the same command with --resume asks only the lines without a pose"
            if self.written not in (None, self.out):  # --resume reads `out`, not the rescue
                hint = f"move {self.written} to {self.out}; then {hint}"
            hint = f" ({hint})"
            _report(f"chatpose batch: not answered: {_line_ranges(unanswered)}{hint * resumable}")

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


def _busy_timeout(args: argparse.Namespace) -> str:
    """The service's `timeout` reply in this command's terms: it says the request's own wait,
    a tenth less than --timeout (`_waits_ms`), a number the user did not give; or, past the
    longest wait a request may ask for, that one."""
    longest_s = DEFAULT_LIMITS.max_timeout_ms / 1000
    if args.timeout > longest_s:  # raising --timeout would change nothing
        return (
            f"not started within {longest_s:g} s, the longest a request may wait: the service "
            "was busy with other work; ask again later"
        )
    return (
        f"not started within --timeout {args.timeout:g} s: the service was busy with other "
        "work; raise --timeout, or ask again later"
    )


def _waits_ms(args: argparse.Namespace) -> int:
    """--timeout as a request's timeout_ms (`timeout_ms_within`): the service keeps work this
    command still waits for (not its own default), and drops the rest."""
    return timeout_ms_within(args.timeout)


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


# Restarts one batch waits through in a row (`--wait`) with no answer between them: a service
# that fails as it starts is not waited for again and again.
MAX_RESTARTS_WAITED = 3


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


def _refused_busy(reply) -> bool:
    """The service refused a whole request as busy: its queue is full (other clients' work),
    or its model is still loading. Nothing of it was answered."""
    return isinstance(reply, ErrorReply) and reply.index is None and reply.code == ErrorCode.BUSY


def _earlier_answers(
    args: argparse.Namespace, lines: Sequence[tuple[int, str]]
) -> tuple[Path | None, dict[int, Pose], float | None]:
    """For --resume: the earlier file to go on from, its poses by the line each answers, and
    its frame rate. FILE.partial.npz when it is there, even with fewer answers than --out: it
    holds the newest run's (one without --resume is refused while it is there), which may be
    a new model's, asked again on purpose; refused when it does not fit the prompts (a run cut
    short would write over it). Else --out itself."""
    partial = _partial_path(args.out)
    if partial.exists():  # a run without --resume is refused while it is there (_batch)
        path, start_over = partial, f"move or delete {partial}"
    elif args.out.exists():
        path, start_over = args.out, "run without --resume"
    else:
        _report(
            f"chatpose batch: nothing to resume ({args.out} is not there yet): asking every line"
        )
        return None, {}, None
    answered, fps = _answers_in(path, lines, args.file, start_over)
    _report(f"resuming {path}: {len(answered)} of {len(lines)} lines answered there")
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
    _report(f"chatpose batch: {partial} is kept: it holds answers that {args.out} does not")


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
            _report(
                f"chatpose batch: {self.path} was written by another program meanwhile; the "
                "answers are kept here and written at the end"
            )
            return
        try:
            _write_motion(self.path, [poses[i] for i in sorted(poses)], fps)
            self.expected = _file_identity(self.path)
        except CommandError as exc:
            self.failed = True
            _report(f"chatpose batch: {exc}; the answers are kept here and written at the end")
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


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfigError, DemoError, DemoOutputError, DemoSetupError, run_demo

    if not 32 <= args.size <= 2048:  # a contact sheet of a few panels, not gigabytes
        raise CommandError(EXIT_USAGE, f"--size: 32 to 2048 pixels, got {args.size}")
    checkpoint = _checkpoint(args)
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(EXIT_BAD_INPUT, f"--out: {args.out} is a file; the demo writes a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(
            EXIT_BAD_INPUT, f"--out: cannot make the folder {args.out} ({exc.strerror})"
        ) from None
    try:
        result = run_demo(
            checkpoint, args.out, size=args.size, device=args.device, timeout_s=args.timeout
        )
    except DemoSetupError as exc:
        raise CommandError(EXIT_USAGE, str(exc)) from None
    except (DemoOutputError, DemoConfigError) as exc:  # as a bad --out or --local --checkpoint
        raise CommandError(EXIT_BAD_INPUT, str(exc)) from None
    except DemoError as exc:
        raise CommandError(EXIT_SERVICE_ERROR, str(exc)) from None
    posed = sum(1 for a in result.answers if a.poses)
    _out(f"\n{posed} of {len(result.answers)} prompts answered with a pose. Written:")
    _out(f"  {result.blend}   Blender scene: the batch keyed on frames {result.keyed_frames}")
    _out(f"  {result.contact_sheet}   one panel per prompt")
    if result.animation is not None:
        _out(f"  {result.animation}   the batch as an AMASS-layout animation")
    else:
        _out("  (no animation.npz: the batch got no pose)")
    _out(f"  {result.reference}   the picture sent with the image prompt")
    _out(f"  {result.panels}/   each answer's picture alone")
    _out(f"  {result.service_log}   the service's log")
    failed = [a for a in result.answers if a.error]
    for answer in failed:
        _report(f"chatpose demo: {answer.kind} prompt failed: {answer.error}")
    return exit_code_for_all([a.code or ErrorCode.MODEL_ERROR for a in failed])


# --- helpers ----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    """A client for --address, with CURVE keys when both key files are given."""
    secret, server = args.curve_secret_key, args.curve_server_key
    if (secret is None) != (server is None):
        raise CommandError(EXIT_USAGE, "--curve-secret-key and --curve-server-key go together")
    curve = None
    if secret is not None:
        for flag, path in (("--curve-secret-key", secret), ("--curve-server-key", server)):
            try:
                found = path.is_file()
            except OSError as exc:  # a key's text pasted for its path: a name too long
                raise CommandError(EXIT_BAD_INPUT, f"{flag}: {path} ({exc.strerror})") from None
            if not found:
                raise CommandError(EXIT_BAD_INPUT, f"{flag}: no key file at {path}")
        curve = ClientCurveKeys(secret, server)
    try:
        client = Client(args.address, curve=curve)
    except AddressError as exc:  # well formed, but not one ZeroMQ takes
        raise CommandError(EXIT_USAGE, f"--address: {exc}") from None
    except ValueError as exc:  # a key file, named
        raise CommandError(EXIT_BAD_INPUT, str(exc)) from None
    except OSError as exc:
        raise CommandError(EXIT_BAD_INPUT, f"the CURVE key files cannot be read ({exc})") from None
    # Once it is known to be a secret key: not "chmod 600" for a public key given in its place.
    if secret is not None and (exposure := secret_key_exposure(secret)):
        _report(f"chatpose: warning: --curve-secret-key: {exposure}")
    return client


def _checkpoint(args: argparse.Namespace) -> Path:
    """--checkpoint, else the bundled demo model; exit 3 when that is missing, 4 when the one
    named is not a checkpoint."""
    from .serve import DEMO_CHECKPOINT

    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    if (checkpoint / "chatpose.json").is_file():
        return checkpoint
    if args.checkpoint is None:
        raise CommandError(
            EXIT_NOT_BUILT,
            f"the bundled demo model is missing from {checkpoint}; rebuild it with "
            "`make demo-model` (docs/evaluation.md), or pass --checkpoint",
        )
    from .checkpoint import Checkpoint, CheckpointError

    if checkpoint.is_dir():  # what it is instead: a training run's folder, with its last step
        try:
            Checkpoint.open(checkpoint)
        except CheckpointError as exc:
            raise CommandError(EXIT_BAD_INPUT, f"--checkpoint: {exc}") from None
    raise CommandError(EXIT_BAD_INPUT, f"--checkpoint: no checkpoint at {checkpoint}")


def _serving_client(args: argparse.Namespace) -> Client:
    """`_client`, once the service serves when --wait asks for it (a script that has just
    started chatpose-serve)."""
    client = _client(args)
    if args.wait is not None:
        try:
            client.wait_serving(args.wait)
        except BaseException:
            client.close()
            raise
    return client


def _first_reply(client: Client, request, timeout_s: float):
    """The one reply a pose or status request gets: a first reply of another kind (a batch
    item) is a bad reply at once, not a wait for a final one until the time is up."""
    return next(iter(client.stream(request, timeout_s)))


def _checked(reply, expected: type):
    """The reply, or a ProtocolError for an error reply (a CommandError for one that did not
    decode or is not an `expected` one: a fault of the service, whatever code the decoder gave
    it)."""
    if isinstance(reply, UndecodableReply):
        raise CommandError(EXIT_SERVICE_ERROR, reply.message)
    if isinstance(reply, ErrorReply):
        raise ProtocolError(reply.code, reply.message, request_id=reply.id)
    if not isinstance(reply, expected):
        raise CommandError(
            EXIT_SERVICE_ERROR, f"bad reply: {reply.op!r} where {expected.op!r} was asked for"
        )
    return reply


def _local_reply(args: argparse.Namespace, images: tuple[bytes, ...], mode: str) -> PoseReply:
    from .checkpoint import work_offline

    work_offline()  # before transformers is imported: no request to the Hub, ever
    checkpoint = _checkpoint(args)  # before torch loads: seconds, for a mistyped path
    from .backend import ModelBackend  # torch: only when asked to run the model here
    from .errors import ChatPoseError, CheckpointError
    from .scheduler import WorkItem

    item = WorkItem(args.text, images, mode=mode)
    if not _on_terminal():  # transformers' "Loading weights" bar: on a terminal only
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        backend = ModelBackend.from_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise CommandError(EXIT_BAD_INPUT, f"--checkpoint: {exc}") from None
    except ChatPoseError as exc:  # too little memory, a missing package: not the input's fault
        raise CommandError(
            EXIT_SERVICE_ERROR,
            f"--local: cannot load the model: {exc}. Any options named there are "
            "chatpose-serve's: start the service with them and send this without --local",
        ) from None
    try:
        if mode == "chat":
            answer = backend.answer_chat(item)
        elif isinstance(answer := backend.answer_poses([item])[0], ChatPoseError):
            raise answer  # refused on its own, as in a batch (no word the model knows)
    except ChatPoseError as exc:  # what the service would reply
        return ErrorReply(LOCAL_ID, "pose", exc.code, str(exc))
    return PoseReply(LOCAL_ID, answer.text, answer.poses, answer.truncated, answer.history_left_out)


def _read_image(path: Path) -> bytes:
    """The file's bytes, at most what one image may be (`/dev/zero`, a huge file: not all read)."""
    limit = DEFAULT_LIMITS.max_image_bytes
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise CommandError(
            EXIT_BAD_INPUT, f"--image: cannot read {path} ({exc.strerror})"
        ) from None
    return data


def _image_refusal(images: tuple[bytes, ...]) -> ErrorReply | None:
    """The error reply the service would give an image that is no PNG or JPEG, or too large,
    before anything is sent (or a model loaded); None when there is none."""
    for k, data in enumerate(images):
        limit = DEFAULT_LIMITS.max_image_bytes
        if not data.startswith((PNG_MAGIC, JPEG_MAGIC)):
            problem = ErrorCode.BAD_IMAGE, f"images[{k}]: not a PNG or JPEG file"
        elif len(data) > limit:
            problem = ErrorCode.TOO_LARGE, f"images[{k}]: larger than {limit >> 20} MiB"
        else:
            continue
        return ErrorReply(LOCAL_ID, "pose", *problem)
    return None


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


def _npz_file(text: str) -> Path:
    """--out's file: a name ending in a separator means a folder, which Path would drop."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} names a folder; name a .npz file in it")
    if not text.lower().endswith(".npz"):  # else `--out shots.txt` would write over notes
        raise argparse.ArgumentTypeError(f"{text} is not a .npz file name; the poses go into one")
    return user_path(text)


def _check_writable(path: Path, inputs: Sequence[Path] = (), also: Sequence[Path] = ()) -> None:
    """Before any work: an --out that cannot be written would lose every answer, and one
    that is an input of the command would destroy it. `also`: other files the command may
    write beside it (a batch's partial file), whose names are longer."""
    folder = path.parent
    target = path
    try:
        if path.is_dir():
            raise CommandError(EXIT_BAD_INPUT, f"--out: {path} is a folder; name a .npz file")
        if any(path.resolve() == source.resolve() for source in inputs):
            raise CommandError(EXIT_BAD_INPUT, f"--out: {path} is this command's input")
        if folder.exists() and not folder.is_dir():
            raise CommandError(EXIT_BAD_INPUT, f"--out: {folder} is a file, not a folder")
        if not folder.is_dir():
            raise CommandError(EXIT_BAD_INPUT, f"--out: the folder {folder} does not exist")
        for target in (path, *also):
            check_writable(target)  # as the write will: its temporary file made and removed
    except OSError as exc:  # a name too long, a folder that may not be written
        raise CommandError(
            EXIT_BAD_INPUT, f"--out: cannot write {target} ({exc.strerror})"
        ) from None


def _partial_path(path: Path) -> Path:
    """Where a batch cut short writes when `path` exists: anim.npz -> anim.partial.npz."""
    return path.with_name(f"{path.stem}.partial{path.suffix or '.npz'}")


def _write_or_rescue(path: Path, poses: list[Pose], fps: float) -> Path | None:
    """Where a batch's answers were written: `path`, or when that fails (a full disk, a folder
    removed meanwhile) a file in the temporary folder, named, so that a long batch's answers
    outlive a failed write. None, said, when neither can be written."""
    try:
        _write_motion(path, poses, fps)
        return path
    except CommandError as exc:
        _report(f"chatpose batch: {exc}")
    # Named after --out, shortened: a name that was too long may be why the write failed.
    rescue = Path(tempfile.gettempdir()) / f"{path.stem[:64]}.rescued-{os.getpid()}.npz"
    try:
        _write_motion(rescue, poses, fps)
    except CommandError as exc:
        _report(f"chatpose batch: {exc}; the {len(poses)} answers are lost")
        return None
    _report(f"chatpose batch: the answers are in {rescue} instead")
    return rescue


def _write_motion(path: Path, poses: list[Pose], fps: float) -> None:
    try:
        Motion.from_poses(poses, fps=fps).save_npz(path)
    except OSError as exc:
        raise CommandError(EXIT_BAD_INPUT, f"--out: cannot write {path} ({exc.strerror})") from None
    except ValueError as exc:
        raise CommandError(EXIT_BAD_INPUT, f"--out: cannot write {path}: {exc}") from None


def _print_pose_reply(reply: PoseReply) -> None:
    _out(readable_text(reply.text))
    for number, pose in enumerate(reply.poses, start=1):
        _out(f"\npose {number} of {len(reply.poses)} (axis-angle; degrees about the axis)")
        for name, rotation in zip(JOINT_NAMES, pose.axis_angle, strict=True):
            angle = float(np.linalg.norm(rotation))
            axis = rotation / angle if angle > 1e-9 else np.zeros(3)
            _out(
                f"  {name:<15} {np.degrees(angle):7.1f}°  axis ({axis[0]:+.2f}, "
                f"{axis[1]:+.2f}, {axis[2]:+.2f})"
            )


def _progress(done: int, total: int) -> None:
    """A progress bar on a terminal; in a log, a line every PROGRESS_LOG_S, not one an answer."""
    if not _on_terminal():
        now = time.monotonic()
        if now >= _progress_log_due[0]:
            _report(f"chatpose batch: {done} of {total} lines answered")
            _progress_log_due[0] = now + PROGRESS_LOG_S
        return
    width = 30
    filled = width * done // total
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
        end="",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
