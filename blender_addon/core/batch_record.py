"""The record of a "batch keyframe from text" run: which prompt lines are keyed at which frames.

A batch turns a text, one prompt per line, into poses keyed at ``start + index * step``. The
record lives on the armature's action (a JSON string custom property, ``RECORD_PROPERTY``) so that
a run that stops half way (service gone, Blender closed, user cancel) resumes where it stopped:
``pending`` gives the lines still to do, a rerun keys nothing twice and loses nothing.

Identity of a line: its index among the prompts (``shared_protocol.batch_text``) **and** a hash
of its text (stripped).
- Index alone would miss edits: a line rewritten in place would count as done.
- Text alone would confuse repeated prompts ("stand" twice) and would not follow the frames.
- With both, an edited line is pending again (and its new key replaces the old one at that
  frame); untouched lines stay done; blank and ``#`` lines (added or removed) change nothing,
  because they are not prompts and are not counted. Inserting or deleting a prompt line moves the
  lines after it to other frames, so those are pending again: what each frame holds always
  matches the text.
- The frame is part of an entry too: changing start or step makes every line pending whose
  frame changes; its key at the old frame stays (``moved`` names them).

JSON layout (``version`` 1)::

    {"version": 1,
     "entries": [{"line": 0, "hash": "9f86d081884c7d65", "frame": 1}, ...]}

``frame`` is the key's time in the action, which a scaled NLA strip in tweak mode puts between
whole frames (scene frame 11 of a strip scaled 3 times is its action's frame 4.333...): a
number, kept as it is, so that it maps back to the scene frame it was keyed at.

``hash`` is the first 16 hex digits of SHA-256 of the stripped line, UTF-8. At most one entry
per line index: recording a line again replaces the entry for that index.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .timeline import frames_for

RECORD_PROPERTY = "chatpose_batch_record"
RECORD_VERSION = 1


def line_hash(line: str) -> str:
    return hashlib.sha256(line.strip().encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    line: int
    hash: str
    frame: int | float  # a scene frame; stored in the action's time, which may fall between


@dataclass(frozen=True)
class PendingLine:
    """A prompt still to key: its index among the prompts, its text and its frame."""

    line: int
    text: str
    frame: int


@dataclass(frozen=True)
class BatchRecord:
    entries: tuple[Entry, ...] = ()
    # Entries by line, so that a query or an update costs no scan: a batch of 30,000 lines is
    # resumed and recorded on Blender's main thread.
    _by_line: dict[int, Entry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_line = {e.line: e for e in self.entries}
        if len(by_line) != len(self.entries):
            raise ValueError("entries: more than one entry for a line")
        object.__setattr__(self, "entries", tuple(by_line[line] for line in sorted(by_line)))
        object.__setattr__(self, "_by_line", by_line)

    # --- queries ----------------------------------------------------------------------------

    def entry(self, line: int) -> Entry | None:
        return self._by_line.get(line)

    def is_keyed(self, line: int, text: str, frame: int) -> bool:
        e = self.entry(line)
        return e is not None and e.hash == line_hash(text) and e.frame == frame

    def pending(self, lines: Sequence[str], start: int, step: int = 1) -> list[PendingLine]:
        """The prompts ``lines`` (``batch_text.prompt_lines``, without their numbers) not keyed
        yet, in order, with the frame each goes on."""
        frames = frames_for(len(lines), start, step)
        return [
            PendingLine(i, text, frame)
            for i, (text, frame) in enumerate(zip(lines, frames, strict=True))
            if not self.is_keyed(i, text, frame)
        ]

    def labels(self, lines: Sequence[str]) -> dict[int, str]:
        """Each recorded line's prompt by the (whole) scene frame it is keyed at, for the
        prompts ``lines`` as the text holds them now: a line edited since keeps no label."""
        return {
            round(e.frame): lines[e.line]
            for e in self.entries
            if e.line < len(lines) and e.hash == line_hash(lines[e.line])
        }

    # --- updates (a new record each time) ---------------------------------------------------

    def recorded(self, line: int, text: str, frame: int) -> BatchRecord:
        """This record plus ``line`` keyed at ``frame`` (replacing an older entry for it)."""
        return self.recorded_lines([(line, text, frame)])

    def recorded_lines(self, lines: Iterable[tuple[int, str, int]]) -> BatchRecord:
        """This record plus each (line, text, frame) keyed, in one update."""
        by_line = dict(self._by_line)
        for line, text, frame in lines:
            if line < 0:
                raise ValueError(f"line: expected >= 0, got {line}")
            by_line[line] = Entry(line, line_hash(text), int(frame))
        return BatchRecord(tuple(by_line.values()))

    def with_frames(self, convert: Callable[[int | float], int | float]) -> BatchRecord:
        """This record with every entry's frame converted (between a scene's time and an
        action's, say)."""
        return BatchRecord(tuple(Entry(e.line, e.hash, convert(e.frame)) for e in self.entries))

    def without_lines(self, lines: Iterable[int]) -> BatchRecord:
        drop = set(lines)
        return BatchRecord(tuple(e for e in self.entries if e.line not in drop))

    def moved(self, lines: Sequence[str], start: int, step: int = 1) -> tuple[Entry, ...]:
        """Entries keyed at another frame than their line goes on now (start or step changed
        since): the keys at the old frames stay, as for `past_the_end`."""
        frames = frames_for(len(lines), start, step)
        return tuple(e for e in self.entries if e.line < len(lines) and e.frame != frames[e.line])

    def past_the_end(self, line_count: int) -> tuple[Entry, ...]:
        """Entries of lines a text of ``line_count`` prompts no longer has (deleted lines):
        their keys stay, as they may have been edited by hand since."""
        return tuple(e for e in self.entries if e.line >= line_count)

    # --- storage ------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": RECORD_VERSION,
                "entries": [
                    {"line": e.line, "hash": e.hash, "frame": e.frame} for e in self.entries
                ],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> BatchRecord:
        """Reads ``to_json``'s output; an empty or missing value is an empty record. Raises
        ValueError for anything else that does not parse."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"batch record: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            raise ValueError(f"batch record: expected an object with version {RECORD_VERSION}")
        raw = data.get("entries")
        if not isinstance(raw, list):
            raise ValueError("batch record: entries must be a list")
        entries = []
        for item in raw:
            if not (
                isinstance(item, dict)
                and _is_int(item.get("line"))
                and item["line"] >= 0
                and _is_frame(item.get("frame"))
                and isinstance(item.get("hash"), str)
            ):
                raise ValueError(f"batch record: bad entry {item!r}")
            entries.append(Entry(item["line"], item["hash"], item["frame"]))
        return cls(tuple(entries))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_frame(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
