"""The service's log: JSON lines, written by a thread of their own so that a reader that stops
reading never holds up the service."""

from __future__ import annotations

import json
import logging
import threading
import time

from inference_service import logs


class StalledReader:
    """A stderr whose reader stopped reading: a write waits until `read_again`; the first
    `failing` writes fail part way (a full disk)."""

    def __init__(self, failing: int = 0):
        self.written: list[str] = []
        self.reading = threading.Event()
        self.failing = failing

    def write(self, text: str) -> None:
        self.reading.wait()
        if self.failing:
            self.failing -= 1
            self.written.append(text[:10])
            raise OSError(28, "No space left on device")
        self.written.append(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        return "".join(self.written).splitlines()


def record(message: str, **fields) -> logging.LogRecord:
    entry = logging.LogRecord("chatpose.test", logging.INFO, "", 0, message, None, None)
    entry.__dict__.update(fields)
    return entry


def test_a_reader_that_stops_reading_loses_lines_counted_and_holds_nothing_up():
    # The daemon review: `chatpose-serve 2>&1 | (sleep 40; cat)` froze the service, status and
    # SIGTERM included, once 64 KiB of lines filled the pipe.
    reader = StalledReader()
    writer = logs.LineWriter(reader, max_waiting=5)
    started = time.monotonic()
    for k in range(50):
        writer.emit(record(f"request {k}", event="request"))
    assert time.monotonic() - started < 5  # none waited for the reader
    reader.reading.set()
    writer.flush()  # what waited, written
    for later in ("after", "and after"):  # said once: a count kept would come before each
        writer.emit(record(later, event="request"))
    writer.flush()
    lines = [json.loads(line) for line in reader.lines()]
    messages = [line["msg"] for line in lines]
    # Lines kept in order; the rest dropped and said, once there was room (more than once when
    # the writer freed a place while they were logged); none lost uncounted.
    kept = [m for m in messages[:-2] if m.startswith("request")]
    assert kept == [f"request {k}" for k in range(len(kept))]
    assert messages[-2:] == ["after", "and after"]
    dropped = [line["dropped"] for line in lines if line["event"] == "log_lines_dropped"]
    assert dropped and len(kept) + sum(dropped) == 50
    writer.close()


def test_a_line_cut_by_a_full_disk_does_not_join_the_next():
    # The daemon review: the next line after a full disk was glued to the cut one.
    reader = StalledReader(failing=1)
    reader.reading.set()
    writer = logs.LineWriter(reader)
    writer.emit(record("cut", event="request"))
    writer.emit(record("whole", event="request"))
    writer.emit(record("and the next", event="request"))  # no blank line before it
    writer.flush()
    assert [json.loads(line)["msg"] for line in reader.lines()[1:]] == ["whole", "and the next"]
    writer.close()


def test_every_line_names_an_event():
    line = json.loads(logs.JsonLines().format(record("a library's words")))
    assert line["event"] == "chatpose.test" and line["msg"] == "a library's words"
    line = json.loads(logs.JsonLines().format(record("served", event="start")))
    assert line["event"] == "start"


def test_a_flush_waits_for_a_stalled_reader_once(monkeypatch):
    # The end of the process flushes more than once (the service, then logging's own exit):
    # each waited its two seconds on a reader that never read again.
    monkeypatch.setattr(logs, "FLUSH_WAIT_S", 0.2)
    reader = StalledReader()
    writer = logs.LineWriter(reader)
    writer.emit(record("stuck", event="request"))
    started = time.monotonic()
    writer.flush()
    assert time.monotonic() - started >= 0.2
    monkeypatch.setattr(logs, "FLUSH_WAIT_S", 30.0)  # what a second wait would take
    started = time.monotonic()
    writer.flush()
    writer.close()
    assert time.monotonic() - started < 15
    reader.reading.set()


def test_a_flush_waits_again_once_a_stalled_reader_reads(monkeypatch):
    # Not waiting after one stall is for a reader that never reads again; one that recovers
    # gets the process's last lines, the plain one that must come after them too.
    monkeypatch.setattr(logs, "FLUSH_WAIT_S", 0.2)
    reader = StalledReader()
    writer = logs.LineWriter(reader)
    writer.emit(record("stuck", event="request"))
    writer.flush()  # in vain
    reader.reading.set()
    deadline = time.monotonic() + 10
    while not writer._writes and time.monotonic() < deadline:  # the stuck line goes out
        time.sleep(0.01)
    monkeypatch.setattr(logs, "FLUSH_WAIT_S", 30.0)
    writer.emit(record("the last", event="stop"))
    writer.flush()
    assert json.loads(reader.lines()[-1])["msg"] == "the last"
    writer.close()
