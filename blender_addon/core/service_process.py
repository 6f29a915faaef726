"""An optional local ``chatpose-serve`` process, started and stopped from the preferences.

No bpy here. The process is ``<python> -m inference_service.serve --checkpoint DIR --bind ADDR
--device DEV --stop-with-stdin``; its stdout and stderr go to a log file (never a pipe, which
could fill up and stall it), whose last line the panel shows when the process has exited.
Nothing blocks: ``start`` returns once the process is spawned (the model loads in the
background), ``poll`` is a non-blocking ``Popen.poll``, ``stop`` sends SIGTERM (chatpose-serve
finishes the work it is running and exits) and a later ``poll`` kills it if it is still there
after the grace time; ``stop(wait=True)`` waits, for Blender's exit.

A process started here does not outlive Blender: ``atexit`` stops every live one (Blender runs
``atexit`` hooks when it quits), the add-on's ``unregister`` stops it, and if Blender dies
without running either, the service's stdin, a pipe whose other end only Blender holds, closes,
which stops it (``--stop-with-stdin``; while the model loads, at once), on every platform; on
Linux the kernel also sends it SIGTERM (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared_protocol.address import tcp_host_port
from shared_protocol.protocol import INSTANCE_ENV

from .wording import quoted

SERVE_MODULE = "inference_service.serve"
STOP_GRACE_S = 5.0
# What quitting Blender waits for a service still finishing its work, before it is killed: a
# quit held for the whole grace time looked hung, and the service keeps nothing of its work.
QUIT_WAIT_S = 1.0
LOG_NAME = "chatpose-serve.log"
_TAIL_BYTES = 8192
_MAX_LINE_CHARS = 300

STOPPED = "stopped"
RUNNING = "running"
STOPPING = "stopping"
EXITED = "exited"


class ServiceProcessError(Exception):
    """The process cannot be started as asked; the message is for the user."""


def _lock_exclusively(log) -> bool:
    """Locks the log file for the service about to write it; False when another process holds
    it. The lock goes with the open file, which the service inherits as its stdout: it holds
    while the service runs, even if this Blender ends, so another Blender starting a service
    on the same address is refused before anything starts, and the log the first one writes
    is not emptied. Not on Windows (no fcntl): there the second service fails at its bind."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        return True
    try:
        fcntl.flock(log.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held by another process
        return False
    except OSError:  # a file system without locks (some network folders): not checked
        return True
    return True


def address_in_use(address: str) -> bool:
    """Whether something already listens on the address (a service of another session or
    started in a terminal, say): a local service started there would fail, and the ready
    check would be answered by the other one."""
    path = address.removeprefix("ipc://")
    if path != address:
        if path.startswith("@") or not hasattr(socket, "AF_UNIX"):
            return False  # Linux's abstract names: the service's bind says
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:  # no file, or a socket nobody listens on
                return False
        return True
    host_port = tcp_host_port(address)
    if host_port is None:
        return False
    with socket.socket(socket.AF_INET6 if ":" in host_port[0] else socket.AF_INET) as probe:
        # As ZeroMQ binds; not on Windows, where ZeroMQ holds its port exclusively
        # (SO_EXCLUSIVEADDRUSE): a probe with SO_REUSEADDR is refused there as "access
        # denied", a plain one as "in use".
        if sys.platform != "win32":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(host_port)
        except OSError as exc:  # another refusal (a port reserved or below 1024): the service's
            return exc.errno == errno.EADDRINUSE
    return False


@dataclass(frozen=True)
class ProcessState:
    state: str  # STOPPED (never started, or stopped here), RUNNING, STOPPING, EXITED
    pid: int | None = None
    returncode: int | None = None
    last_line: str = ""

    @property
    def alive(self) -> bool:
        return self.state in (RUNNING, STOPPING)

    def describe(self) -> str:
        if self.state == RUNNING:
            return f"running (pid {self.pid})"
        if self.state == STOPPING:
            return f"stopping (pid {self.pid})"
        if self.state == EXITED:
            if self.returncode is not None and self.returncode < 0:  # POSIX: by a signal
                # Not its last output: a line the loading model wrote before the kill would be
                # read as the cause. Where its log is, the callers say (Open Log, "its log:").
                return f"exited: {_killed_by(-self.returncode)}"
            text = f"exited with code {self.returncode}"
            if not self.last_line:
                return text
            text = f"{text}: {self.last_line}"
            if "No module named" in self.last_line:  # the service's packages are elsewhere
                text += (
                    "; the Python set in the add-on's preferences (Local Service) lacks "
                    "chatpose-blender[service]: pick the project's .venv/bin/python "
                    "(.venv\\Scripts\\python.exe on Windows)"
                )
            elif "unrecognized arguments: --" in self.last_line:  # an option it predates
                text += (
                    "; the service installed for that Python is older than this add-on: "
                    "update it (git pull, then make setup)"
                )
            elif "8-bit loading need a CUDA device" in self.last_line:  # Device Auto, no GPU
                text += (
                    "; set Weights to As Stored in the add-on's preferences (Local Service), "
                    "or run the service on a machine with a GPU"
                )
            elif named := [f"{o} is {s}" for o, s in _SET_IN_PREFERENCES if o in self.last_line]:
                # chatpose-serve names its own options; the add-on started it from these.
                text += f"; in the add-on's preferences (Local Service), {', '.join(named)}"
            return text
        return "stopped"


# chatpose-serve's options the add-on sets from its preferences, by the settings' names.
_SET_IN_PREFERENCES = (
    ("--device", "Device (and GPU)"),
    ("--load-in-8bit", "Weights: 8-bit"),
    ("--load-in-4bit", "Weights: 4-bit"),
)


def _killed_by(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == getattr(signal, "SIGKILL", None):  # what the kernel's out-of-memory killer sends
        # A likely cause, not a known one: a user's `kill -9` sends it too. No brackets: a
        # failure adds this in brackets ("(the local service exited: ...)").
        return f"killed by {name}; often the system ran out of memory"
    return f"killed by {name}"


# chatpose-serve's options for the weights' precision on a GPU (bitsandbytes): a 13B model
# needs more than 26 GB as stored, about 14 GB in 8 bits, about 8 GB in 4.
QUANTIZATION_FLAGS = {"none": (), "8bit": ("--load-in-8bit",), "4bit": ("--load-in-4bit",)}


# Programs beside the environment's python that the Python setting is easily given instead:
# run with `-m inference_service.serve`, they fail with usage errors that point elsewhere.
_NOT_PYTHON = ("chatpose", "pip")


def serve_command(
    python: str, checkpoint: str, bind: str, device: str = "auto", quantization: str = "none"
) -> list[str]:
    """The command line of a local chatpose-serve; ServiceProcessError names a missing piece.
    ``device``: auto, cpu, cuda or cuda:N; ``quantization``: a key of QUANTIZATION_FLAGS."""
    python = python.strip()
    if not python:
        raise ServiceProcessError(
            "set the Python interpreter that has chatpose-blender[service] installed "
            "(add-on preferences > Local Service)"
        )
    python = os.path.expanduser(python)
    resolved = python if os.path.sep in python else shutil.which(python)  # a bare name: PATH
    if resolved and os.path.isdir(resolved):  # the environment's folder, or its bin
        raise ServiceProcessError(
            f"Python interpreter {quoted(python)} is a folder; pick the python program in it "
            "(bin/python, or python.exe on Windows)"
        )
    if not resolved or not os.path.isfile(resolved):
        raise ServiceProcessError(f"Python interpreter {quoted(python)} not found")
    program = os.path.basename(resolved).lower().removesuffix(".exe")
    if program.startswith(_NOT_PYTHON):
        raise ServiceProcessError(
            f"{quoted(python)} is the {program} program, not a Python interpreter; pick the python "
            "beside it (bin/python, or Scripts\\python.exe on Windows)"
        )
    resolved = os.path.abspath(resolved)  # the service runs in its log folder (`start`)
    checkpoint = checkpoint.strip()
    if not checkpoint:
        raise ServiceProcessError("set the checkpoint directory (add-on preferences)")
    # Absolute: the service runs in its log folder (`start`), not in Blender's working one.
    checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
    if os.path.isfile(checkpoint):  # a file of it picked in the file browser, say
        raise ServiceProcessError(
            f"checkpoint {quoted(checkpoint)} is a file; set its folder "
            f"({quoted(os.path.dirname(checkpoint))}, if it holds chatpose.json)"
        )
    if not os.path.isdir(checkpoint):
        raise ServiceProcessError(f"checkpoint directory {quoted(checkpoint)} does not exist")
    return [
        resolved,
        "-m",
        SERVE_MODULE,
        "--checkpoint",
        checkpoint,
        "--bind",
        bind,
        "--device",
        device or "auto",
        "--stop-with-stdin",  # `start` holds the pipe: it closes when Blender ends, a crash too
        *QUANTIZATION_FLAGS[quantization],
    ]


def summarize_log_line(line: str) -> str:
    """A log line for the panel: chatpose-serve writes JSON lines (``level``, ``msg``), which
    are shown as "level: msg"; anything else as it is. Shortened to a few hundred characters."""
    line = line.strip()
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("msg"), str):
            level = record.get("level", "")
            line = f"{level}: {record['msg']}" if level else record["msg"]
            if isinstance(record.get("exception"), str):
                line += " (" + record["exception"].strip().splitlines()[-1] + ")"
    return line if len(line) <= _MAX_LINE_CHARS else line[: _MAX_LINE_CHARS - 3] + "..."


def last_line(path: str) -> str:
    """The last non-empty line of a text file ("" when there is none or it cannot be read)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - _TAIL_BYTES))
            tail = file.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when Blender dies
    (``PR_SET_PDEATHSIG``). libc is loaded here, in the parent: the hook itself only makes one
    call, so nothing in the forked child can wait on a lock another thread held."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        return None

    def hook() -> None:  # pragma: no cover - runs in the child
        prctl(1, int(signal.SIGTERM))

    return hook


_live: weakref.WeakSet[ServiceProcess] = weakref.WeakSet()


def log_name_for(bind: str) -> str:
    """The log file of a local service on ``bind``: one per port (an ``ipc://`` address: per
    path), since two Blenders, each with a service of its own, would truncate and write over
    one file, and the file's lock (`start`) stands for the address."""
    host_port = tcp_host_port(bind)
    if host_port:
        return f"chatpose-serve-{host_port[1]}.log"
    digest = hashlib.sha256(bind.encode("utf-8")).hexdigest()[:10]
    return f"chatpose-serve-{digest}.log"


class ServiceProcess:
    """At most one child process at a time; ``log_dir`` holds its log file."""

    def __init__(
        self,
        log_dir: str,
        *,
        popen: Callable[..., subprocess.Popen] = subprocess.Popen,
        clock: Callable[[], float] = time.monotonic,
        grace_s: float = STOP_GRACE_S,
    ):
        self.log_dir = log_dir
        self.log_path = os.path.join(log_dir, LOG_NAME)
        self.grace_s = grace_s
        self._popen = popen
        self._clock = clock
        self._process: subprocess.Popen | None = None
        self._stop_deadline: float | None = None
        self._stopped_here = False
        self._last_words: str | None = None  # the exited process's last log line, read once
        self.instance: str | None = None  # the token the process was started with

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(
        self, argv: Sequence[str], env: dict[str, str] | None = None, log_name: str = LOG_NAME
    ) -> ProcessState:
        """Spawns ``argv`` (e.g. ``serve_command(...)``), its output to ``log_name`` in the log
        folder (``log_name_for`` its address); ServiceProcessError when one is still running or
        the program cannot be started."""
        state = self.poll()
        if state.alive:
            raise ServiceProcessError(f"the local service is already {state.describe()}")
        log_path = os.path.join(self.log_dir, log_name)
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            # Not "wb": that would empty the log of a service another Blender runs there.
            log = open(log_path, "ab")  # noqa: SIM115 (closed below, once handed over)
        except OSError as exc:
            raise ServiceProcessError(
                f"cannot write the service's log {log_path}: {exc.strerror or exc}"
            ) from None
        if not _lock_exclusively(log):
            log.close()
            raise ServiceProcessError(
                "a local service for this address is running or loading its model in another "
                "Blender on this machine, or one stopped here (the add-on disabled) is still "
                f"finishing (its log {log_path} is in use): wait a few seconds, stop it there, "
                "or set another Service Address"
            )
        log.truncate(0)
        log.seek(0)  # the service writes from here (on Windows it does not inherit "append")
        self.log_path = log_path
        # Given back in its status replies (INSTANCE_ENV): another service answering where
        # this one failed to listen is not taken for it.
        self.instance = secrets.token_hex(8)
        env = dict(os.environ if env is None else env, **{INSTANCE_ENV: self.instance})
        options: dict = {}
        hook = _die_with_parent_hook()
        if hook is not None:
            options["preexec_fn"] = hook
        if sys.platform == "win32":  # pragma: no cover
            options["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        with log:
            try:
                self._process = self._popen(
                    list(argv),
                    # Never written; a service started with --stop-with-stdin stops when it
                    # closes, which the system does when Blender ends in any way.
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # Not Blender's folder: an `inference_service/` there would shadow the
                    # installed one (`-m` puts the working folder first on the path).
                    cwd=self.log_dir,
                    **options,
                )
            except OSError as exc:
                self._process = None
                raise ServiceProcessError(
                    f"could not start {argv[0]}: {exc.strerror or exc}"
                ) from None
        self._stop_deadline = None
        self._stopped_here = False
        self._last_words = None
        _live.add(self)
        _register_atexit()
        return self.poll()

    def poll(self) -> ProcessState:
        """The process's state now; never blocks. Kills a process that was asked to stop and
        is still there after the grace time."""
        process = self._process
        if process is None:
            return ProcessState(STOPPED)
        code = process.poll()
        if code is None:
            if self._stop_deadline is not None:
                if self._clock() >= self._stop_deadline:
                    process.kill()
                    self._stop_deadline = self._clock() + self.grace_s
                return ProcessState(STOPPING, process.pid)
            return ProcessState(RUNNING, process.pid)
        if self._stopped_here:
            return ProcessState(STOPPED, process.pid, code)
        if self._last_words is None:  # once: the panel and the buttons poll on every redraw
            self._last_words = summarize_log_line(last_line(self.log_path))
        return ProcessState(EXITED, process.pid, code, self._last_words)

    def stop(self, *, wait: bool = False, timeout_s: float | None = None) -> ProcessState:
        """Asks the process to stop (SIGTERM; on Windows, by closing its standard input). With
        ``wait``, waits up to ``timeout_s`` (the grace time by default), then kills it and
        reaps it."""
        process = self._process
        if process is None or process.poll() is not None:
            if process is not None:
                self._stopped_here = True
            return self.poll()
        if self._stop_deadline is None:
            # Once: chatpose-serve takes a second signal for "exit now", and the kill must not
            # be put off by each press of Stop.
            self._stopped_here = True
            if sys.platform == "win32":
                # No SIGTERM there (terminate() is TerminateProcess, a kill): closing its
                # standard input asks chatpose-serve (--stop-with-stdin) to stop cleanly.
                with contextlib.suppress(OSError, AttributeError):
                    process.stdin.close()
            else:
                process.terminate()
            self._stop_deadline = self._clock() + self.grace_s
        if wait:
            try:
                process.wait(self.grace_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return self.poll()


_atexit_registered = False


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(stop_all)
        _atexit_registered = True


def stop_all(timeout_s: float = QUIT_WAIT_S) -> None:
    """Stops every live process started by a ServiceProcess (Blender quitting)."""
    for manager in list(_live):
        try:
            manager.stop(wait=True, timeout_s=timeout_s)
        except Exception:  # pragma: no cover - never let one failure keep others running
            pass


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment for the service's interpreter: Blender's, without the variables that
    point a Python at Blender's own bundled installation (PYTHONHOME), and in UTF-8 mode: its
    log is read as UTF-8, and on Windows its output would be in the system's code page."""
    return {k: v for k, v in environ.items() if k != "PYTHONHOME"} | {"PYTHONUTF8": "1"}
