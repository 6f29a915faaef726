"""What the command-line programs share: argument types and how they take a stop signal.

No torch here: the argument types run before a command loads its model.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import math
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

DEVICE_HELP = "auto (CUDA when there is one), cpu, cuda or cuda:N"


EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C, which SIGTERM and SIGHUP give here too
# What asks a command to stop besides Ctrl-C: `kill`, a scheduler's preemption (SIGTERM); a
# closed terminal (SIGHUP); on Windows, Ctrl+Break (SIGBREAK; a closed console window sends it
# too, but Windows ends the process before a Python handler runs).
STOP_SIGNALS = ("SIGTERM", "SIGHUP", "SIGBREAK")


def device_argument(text: str) -> str:
    """`--device`, checked as the arguments are read: a typo would otherwise be found only
    once the data or the model has loaded, minutes later."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def user_path(text: str) -> Path:
    """A path argument, `~` expanded: the shell leaves `--checkpoint=~/model` as it is."""
    return Path(text).expanduser()


def positive_int(text: str) -> int:
    """An argument that counts something: a whole number of at least 1."""
    return _number(text, int, lambda value: value >= 1, "a whole number of at least 1")


def non_negative_int(text: str) -> int:
    """A whole number of 0 or more (0 often meaning "none" or "at the end")."""
    return _number(text, int, lambda value: value >= 0, "a whole number of 0 or more")


def positive_float(text: str) -> float:
    """A finite number above 0 (a rate, a time)."""
    fits = lambda value: math.isfinite(value) and value > 0  # noqa: E731
    return _number(text, float, fits, "a positive number")


def _number(text: str, parse: Callable, fits: Callable, expected: str):
    """`text` read by `parse` (int, float), refused as argparse refuses a value when it does
    not read or does not `fit`, saying what was `expected`."""
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not fits(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def catchable_signals(names: tuple[str, ...]) -> list[int]:
    """The signals of `names` this platform has and nobody set to be ignored (`nohup` ignores
    SIGHUP so that a command outlives its terminal: left so)."""
    numbers = (getattr(signal, name, None) for name in names)
    return [n for n in numbers if n is not None and signal.getsignal(n) is not signal.SIG_IGN]


def utf8_output(stream) -> None:
    """Writes `stream` (stdout) in UTF-8: redirected on Windows it would take the system's code
    page, where a reply's text, a degree sign or a λ may not exist, and `--json` is UTF-8."""
    if isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding).name != "utf-8":
        stream.reconfigure(encoding="utf-8")


@contextlib.contextmanager
def stops_as_interrupts(after=None) -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal, `kill`, a scheduler's preemption) stop the block
    as Ctrl-C does, so that the command still says where its work is, and keeps it (their
    default ends the process on the spot). `after`: their handler once the block has ended
    without an error, set in place of the interrupt (no moment with the default between)."""
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield
        return

    def interrupt(number, frame):
        raise KeyboardInterrupt

    previous = {n: signal.signal(n, interrupt) for n in catchable_signals(STOP_SIGNALS)}
    ended = False
    try:
        yield
        ended = True
    finally:
        for number, handler in previous.items():
            signal.signal(number, after if ended and after is not None else handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait for the block to end (work being written), then stop
    the command as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def defer(number, frame):
        caught.append(number)

    previous = {n: signal.signal(n, defer) for n in catchable_signals(("SIGINT", *STOP_SIGNALS))}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught:
        raise KeyboardInterrupt
