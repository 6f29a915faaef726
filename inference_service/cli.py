"""`chatpose`: the client command line.

    chatpose status                      the service's status
    chatpose pose "TEXT" [--image FILE]  one request; prints the reply and the poses
    chatpose batch FILE.txt --out a.npz  one prompt per line, streamed, keyed as an animation
    chatpose demo                        what `make demo` runs

Exit codes follow the protocol's error codes, so scripts can tell what went wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from inference_service.batch_command import run_batch
from inference_service.cli_common import (
    EXIT_BAD_INPUT,
    EXIT_BUSY,
    EXIT_CLOSED_OUTPUT,
    EXIT_NOT_BUILT,
    EXIT_OK,
    EXIT_SERVICE_ERROR,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    CommandError,
    busy_timeout,
    check_out_writable,
    checked,
    exit_code_for,
    exit_code_for_all,
    flush_output,
    on_terminal,
    print_out,
    refused_busy,
    report,
    serving_client,
    silence_output,
    waits_ms,
    write_motion,
)
from inference_service.commands import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    device_argument,
    positive_float,
    stops_as_interrupts,
    user_path,
    utf8_output,
)
from shared_protocol import __version__
from shared_protocol.address import AddressError, check_address
from shared_protocol.batch_requests import BUSY_RETRY_DELAYS_S
from shared_protocol.client import DEFAULT_ADDRESS, Client, UndecodableReply
from shared_protocol.pose import DEFAULT_FPS, FPS_RANGE
from shared_protocol.protocol import (
    DEFAULT_LIMITS,
    JPEG_MAGIC,
    PNG_MAGIC,
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
)
from shared_protocol.skeleton import JOINT_NAMES

DEFAULT_TIMEOUT_S = 60.0
LOCAL_ID = "local"  # the request id of --local's replies: no service numbered them

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
        "batch": run_batch,
        "demo": _demo,
    }[args.command]
    try:
        _service_flags(args)
        with stops_as_interrupts():  # SIGTERM, SIGHUP: as Ctrl-C, with its message and code
            code = command(args)
            flush_output()  # here, where a closed stdout is caught, not at exit
        return code
    except CommandError as exc:
        report(f"chatpose {args.command}: {exc}")
        return exc.exit_code
    except ProtocolError as exc:
        report(f"chatpose {args.command}: {exc.message}")
        return exit_code_for(exc.code)
    except KeyboardInterrupt:
        report(f"chatpose {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:  # a client-only install (`pip install .`): no torch
        report(f"chatpose {args.command}: {missing_service_package(exc)}")
        return EXIT_USAGE
    except BrokenPipeError:  # stdout's reader left (`| head`): what it wanted, it has
        silence_output()
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


# --- sub-commands -----------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    with serving_client(args) as client:
        request = StatusRequest(client.new_id())
        reply = _first_reply(client, request, args.timeout)
    answered = isinstance(reply, (StatusReply, ErrorReply))
    if args.json and answered and not isinstance(reply, UndecodableReply):
        print_out(encode_reply(reply)[0].decode("utf-8"))
    reply = checked(reply, StatusReply)
    if args.json:
        return EXIT_OK
    images = f"up to {reply.max_images}" if reply.supports_images else "no"
    print_out(f"service   {args.address}")
    print_out(f"model     {reply.model} on {reply.device} ({reply.dtype})")
    print_out(f"images    {images} per request")
    print_out(f"queue     {reply.queue_depth} waiting")
    print_out(f"uptime    {reply.uptime_s:.0f} s")
    print_out(f"version   {reply.version}")
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
        check_out_writable(args.out, inputs=[args.image] if args.image else [])
    images = (_read_image(args.image),) if args.image else ()
    mode = "chat" if args.chat else "pose"
    # No reply (unreachable, timed out): raises.
    answer = _image_refusal(images) or _pose_reply(args, images, mode)
    # A script reading stdout gets the service's error reply too (not one made up here for a
    # reply that did not decode).
    if args.json and isinstance(answer, ErrorReply) and not isinstance(answer, UndecodableReply):
        print_out(encode_reply(answer)[0].decode("utf-8"))
    if isinstance(answer, ErrorReply) and args.image and answer.message.startswith("images[0]"):
        # The service names the request's field; the user gave a file.
        message = f"--image {args.image}{answer.message.removeprefix('images[0]')}"
        answer = dataclasses.replace(answer, message=message)
    if isinstance(answer, ErrorReply) and answer.code == ErrorCode.TIMEOUT:
        answer = dataclasses.replace(answer, message=busy_timeout(args))
    reply = checked(answer, PoseReply)
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
            write_motion(args.out, list(reply.poses), fps=DEFAULT_FPS)
            report(f"wrote {len(reply.poses)} pose(s) to {args.out}")
        except CommandError as exc:
            unwritten = exc
    if args.json:
        print_out(encode_reply(reply)[0].decode("utf-8"))
    else:
        _print_pose_reply(reply)
    if reply.truncated:  # its text stops mid-way; a pose it would have given may be missing
        report(
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
    with serving_client(args) as client:
        for tries in itertools.count():
            request = PoseRequest(
                client.new_id(), args.text, images=images, mode=mode, timeout_ms=waits_ms(args)
            )
            reply = _refusal(request) or _first_reply(client, request, args.timeout)
            left = 0.0 if waited_until is None else waited_until - time.monotonic()
            if not refused_busy(reply):
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
            report(f"chatpose pose: {busy}; asking again in {min(delay, left):.3g} s")
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
    print_out(f"\n{posed} of {len(result.answers)} prompts answered with a pose. Written:")
    print_out(f"  {result.blend}   Blender scene: the batch keyed on frames {result.keyed_frames}")
    print_out(f"  {result.contact_sheet}   one panel per prompt")
    if result.animation is not None:
        print_out(f"  {result.animation}   the batch as an AMASS-layout animation")
    else:
        print_out("  (no animation.npz: the batch got no pose)")
    print_out(f"  {result.reference}   the picture sent with the image prompt")
    print_out(f"  {result.panels}/   each answer's picture alone")
    print_out(f"  {result.service_log}   the service's log")
    failed = [a for a in result.answers if a.error]
    for answer in failed:
        report(f"chatpose demo: {answer.kind} prompt failed: {answer.error}")
    return exit_code_for_all([a.code or ErrorCode.MODEL_ERROR for a in failed])


# --- helpers ----------------------------------------------------------------------------------


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


def _first_reply(client: Client, request, timeout_s: float):
    """The one reply a pose or status request gets: a first reply of another kind (a batch
    item) is a bad reply at once, not a wait for a final one until the time is up."""
    return next(iter(client.stream(request, timeout_s)))


def _local_reply(args: argparse.Namespace, images: tuple[bytes, ...], mode: str) -> PoseReply:
    from .checkpoint import work_offline

    work_offline()  # before transformers is imported: no request to the Hub, ever
    checkpoint = _checkpoint(args)  # before torch loads: seconds, for a mistyped path
    from .backend import ModelBackend  # torch: only when asked to run the model here
    from .errors import ChatPoseError, CheckpointError
    from .scheduler import WorkItem

    item = WorkItem(args.text, images, mode=mode)
    if not on_terminal():  # transformers' "Loading weights" bar: on a terminal only
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


def _npz_file(text: str) -> Path:
    """--out's file: a name ending in a separator means a folder, which Path would drop."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} names a folder; name a .npz file in it")
    if not text.lower().endswith(".npz"):  # else `--out shots.txt` would write over notes
        raise argparse.ArgumentTypeError(f"{text} is not a .npz file name; the poses go into one")
    return user_path(text)


def _print_pose_reply(reply: PoseReply) -> None:
    print_out(readable_text(reply.text))
    for number, pose in enumerate(reply.poses, start=1):
        print_out(f"\npose {number} of {len(reply.poses)} (axis-angle; degrees about the axis)")
        for name, rotation in zip(JOINT_NAMES, pose.axis_angle, strict=True):
            angle = float(np.linalg.norm(rotation))
            axis = rotation / angle if angle > 1e-9 else np.zeros(3)
            print_out(
                f"  {name:<15} {np.degrees(angle):7.1f}°  axis ({axis[0]:+.2f}, "
                f"{axis[1]:+.2f}, {axis[2]:+.2f})"
            )


if __name__ == "__main__":
    sys.exit(main())
