"""Structured logging for the service: one JSON object per line on stderr.

Call sites log an event name plus fields through `extra=`; this formatter puts every such field
into the line, so start-up, each request's timing and errors can be read by machines and people.
Lines are written by a thread of their own: a reader of stderr that stops reading (a stopped
pager, a stalled `| tee`) loses lines, counted, and never holds up the service.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sys
import threading
import time

# Lines waiting for a slow reader, at most; past them lines are dropped, and counted.
MAX_WAITING_LINES = 10_000
# How long a flush (the process's end, a message printed after the log's lines) waits for the
# lines still waiting to be written.
FLUSH_WAIT_S = 2.0

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        line.setdefault("event", record.name)  # a library's line, or one said in words alone
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class LineWriter(logging.Handler):
    """Formats a record where it is logged and hands the line to a writer thread, never
    waiting: a full queue drops the line and counts it, said in a line once there is room."""

    def __init__(self, stream, max_waiting: int = MAX_WAITING_LINES):
        super().__init__()
        self.setFormatter(JsonLines())
        self._stream = stream
        # Lines; an Event a flush waits on; None, the end.
        self._lines: queue.Queue[str | threading.Event | None] = queue.Queue(max_waiting)
        self._dropped = 0
        self._cut = False  # the last write failed part way, perhaps: the next starts a line
        self._writes = 0  # lines written so far
        self._stalled_at: int | None = None  # `_writes` when a flush last waited in vain
        self._thread = threading.Thread(target=self._write, name="chatpose-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # one count, whichever thread logs
            try:
                if self._dropped:
                    self._lines.put_nowait(self._dropped_line())
                    self._dropped = 0
                self._lines.put_nowait(line)
            except queue.Full:
                self._dropped += 1

    def _dropped_line(self) -> str:
        record = logging.LogRecord("chatpose.logs", logging.WARNING, "", 0, "", None, None)
        record.msg = f"{self._dropped} log lines dropped: nothing read them in time"
        record.event, record.dropped = "log_lines_dropped", self._dropped
        return self.format(record)

    def _write(self) -> None:
        while (line := self._lines.get()) is not None:
            if isinstance(line, threading.Event):
                line.set()
                continue
            try:
                self._stream.write(("\n" if self._cut else "") + line + "\n")
                self._stream.flush()
                self._cut = False
                self._writes += 1
            except (OSError, ValueError):  # a full disk, a closed or broken stream: dropped
                self._cut = True

    def flush(self) -> None:
        """Waits, up to FLUSH_WAIT_S, for the lines logged so far to be written: a reader that
        never reads again must not hold up the end of the process."""
        if self._stalled_at == self._writes:  # nothing written since it last waited in vain
            return
        written, deadline = threading.Event(), time.monotonic() + FLUSH_WAIT_S
        try:
            self._lines.put(written, timeout=FLUSH_WAIT_S)
        except queue.Full:
            self._stalled_at = self._writes
            return
        if not written.wait(max(0.0, deadline - time.monotonic())):
            self._stalled_at = self._writes

    def close(self) -> None:
        self.flush()
        with contextlib.suppress(queue.Full):
            self._lines.put_nowait(None)
        super().close()


def line_now(logger: str, level: int, message: str, event: str) -> str:
    """One JSON line, formatted as the handler would, for a process whose logging is not set up
    yet (argparse's refusals come before it)."""
    record = logging.LogRecord(logger, level, "", 0, message, None, None)
    record.event = event
    return JsonLines().format(record)


def flush() -> None:
    """The lines logged so far written (within FLUSH_WAIT_S): before a plain line that must come
    after them, and at the end."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure(level: str = "info") -> None:
    root = logging.getLogger()
    for earlier in [h for h in root.handlers if isinstance(h, LineWriter)]:
        earlier.close()  # its thread ends (a process that serves twice: the tests)
    root.handlers[:] = [LineWriter(sys.stderr)]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings too, as JSON lines
    # transformers writes its own handler's plain lines and progress bars ("Loading weights")
    # to stderr; its records go through the root's JSON handler instead, and no bars.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
