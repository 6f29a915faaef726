"""What the `chatpose` commands share (`cli`, `batch_command`): the exit codes and the error
that carries one, stdout and stderr written without a traceback, the service's connection and
its replies, and --out's checks and write."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from inference_service.commands import EXIT_USAGE
from shared_protocol.address import AddressError
from shared_protocol.client import Client, ClientCurveKeys, UndecodableReply, secret_key_exposure
from shared_protocol.pose import Motion, Pose
from shared_protocol.protocol import (
    DEFAULT_LIMITS,
    ErrorCode,
    ErrorReply,
    ProtocolError,
    timeout_ms_within,
)
from shared_protocol.safe_files import check_writable

EXIT_OK = 0
EXIT_NOT_BUILT = 3
EXIT_BAD_INPUT = 4
EXIT_UNREACHABLE = 5
EXIT_TIMEOUT = 6
EXIT_SERVICE_ERROR = 7
EXIT_BUSY = 8  # worth asking again later, unlike 7
EXIT_CLOSED_OUTPUT = 141  # the shell's code for SIGPIPE: stdout closed (`| head`)


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


def print_out(*values, **options) -> None:
    """`print` to stdout."""
    with _output_failures():
        print(*values, **options)


def flush_output() -> None:
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
        silence_output()
        raise CommandError(EXIT_BAD_INPUT, f"cannot write the output ({exc.strerror})") from None


def silence_output() -> None:
    """Stdout onto the null device: what it still buffers would fail again at exit."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def report(text: str) -> None:
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


def on_terminal() -> bool:
    """Whether stderr is a terminal (not a log file, and not closed: `2>&-` leaves None)."""
    return sys.stderr is not None and sys.stderr.isatty()


def busy_timeout(args: argparse.Namespace) -> str:
    """The service's `timeout` reply in this command's terms: it says the request's own wait,
    a tenth less than --timeout (`waits_ms`), a number the user did not give; or, past the
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


def waits_ms(args: argparse.Namespace) -> int:
    """--timeout as a request's timeout_ms (`timeout_ms_within`): the service keeps work this
    command still waits for (not its own default), and drops the rest."""
    return timeout_ms_within(args.timeout)


def refused_busy(reply) -> bool:
    """The service refused a whole request as busy: its queue is full (other clients' work),
    or its model is still loading. Nothing of it was answered."""
    return isinstance(reply, ErrorReply) and reply.index is None and reply.code == ErrorCode.BUSY


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
        report(f"chatpose: warning: --curve-secret-key: {exposure}")
    return client


def serving_client(args: argparse.Namespace) -> Client:
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


def checked(reply, expected: type):
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


def check_out_writable(path: Path, inputs: Sequence[Path] = (), also: Sequence[Path] = ()) -> None:
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


def write_motion(path: Path, poses: list[Pose], fps: float) -> None:
    try:
        Motion.from_poses(poses, fps=fps).save_npz(path)
    except OSError as exc:
        raise CommandError(EXIT_BAD_INPUT, f"--out: cannot write {path} ({exc.strerror})") from None
    except ValueError as exc:
        raise CommandError(EXIT_BAD_INPUT, f"--out: cannot write {path}: {exc}") from None
