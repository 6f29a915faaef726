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
- So are the settings it was keyed with that key the root's location: Translation
  (``translation``) and Keep on Floor (``on_floor``). A line keyed without one is pending for
  a run with it on, which keys its root's location from its keys, not asking again
  (``blender.batch_store.place_keyed_lines``); turned off, nothing is keyed again.

JSON layout (``version`` 1)::

    {"version": 1,
     "entries": [{"line": 0, "hash": "9f86d081884c7d65", "frame": 1},
                 {"line": 1, "hash": "...", "frame": 11, "translation": true},
                 {"line": 2, "hash": "...", "frame": 21, "on_floor": true}, ...]}

``frame`` is the key's time in the action, which a scaled NLA strip in tweak mode puts between
whole frames (scene frame 11 of a strip scaled 3 times is its action's frame 4.333...): a
number, kept as it is, so that it maps back to the scene frame it was keyed at.

``hash`` is the first 16 hex digits of SHA-256 of the stripped line, UTF-8. At most one entry
per line index: recording a line again replaces the entry for that index. A running batch adds
its lines to the stored text (``with_entries_appended``), whose cost is that of the new lines,
not of the record: there a later entry for a line replaces an earlier one, and ``to_json``
writes each line once again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .timeline import frames_for

RECORD_PROPERTY = "chatpose_batch_record"
RECORD_VERSION = 1
_MAX_PROPERTY_NAME_BYTES = 63  # Blender's custom property names


def record_property(slot_handle: int | None) -> str:
    """The custom property of the action that holds the record of its slot ``slot_handle``
    (None: an action without slots, before Blender 4.4). By the handle, which a rename of the
    slot keeps, and short: a name from the slot's identifier passed Blender's 63 bytes for a
    long armature name, which refused every line of a batch."""
    return RECORD_PROPERTY if slot_handle is None else f"{RECORD_PROPERTY}:#{slot_handle}"


def former_record_properties(slot_identifier: str | None, slot_count: int) -> tuple[str, ...]:
    """Where an older record of that slot may be, read when ``record_property`` holds none
    (and moved there when written): by the slot's identifier, as this add-on wrote it before;
    and, in an action of one slot, without one, as written by Blender 4.2 and 4.3, whose
    actions 4.4 gives a slot when it opens the file."""
    names = []
    if slot_identifier is not None:
        name = f"{RECORD_PROPERTY}:{slot_identifier}"
        if len(name.encode("utf-8")) > _MAX_PROPERTY_NAME_BYTES:
            name = f"{RECORD_PROPERTY}:{hashlib.sha1(slot_identifier.encode()).hexdigest()}"
        names.append(name)
        if slot_count == 1:
            names.append(RECORD_PROPERTY)
    return tuple(names)


def line_hash(line: str) -> str:
    """The line's text as the record knows it: the same for a line saved again in Unicode's
    other form ("é" as one character or as "e" and its accent), which reads the same."""
    return _hash(unicodedata.normalize("NFC", line.strip()))


def _holds(stored: str, line: str) -> bool:
    """Whether the hash `stored` is of `line`: as `line_hash` gives it, or as records written
    before it normalised gave it (the line's text as it was)."""
    return stored == line_hash(line) or stored == _hash(line.strip())


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    line: int
    hash: str
    frame: int | float  # a scene frame; stored in the action's time, which may fall between
    translation: bool = False  # keyed with Translation on (the root's location too)
    on_floor: bool = False  # keyed with Keep on Floor on

    def to_dict(self) -> dict:
        data = {"line": self.line, "hash": self.hash, "frame": self.frame}
        if self.translation:
            data["translation"] = True
        if self.on_floor:
            data["on_floor"] = True
        return data


@dataclass(frozen=True)
class PendingLine:
    """A prompt still to key: its index among the prompts, its text and its frame."""

    line: int
    text: str
    frame: int


class BatchRecord:
    """Which lines are keyed: at most one ``Entry`` per line, ``entries`` in line order.
    Immutable: each update gives a new record.

    Entries are held by line, so that a query or an update costs no scan and no sort: a batch
    of 30,000 lines is resumed and recorded on Blender's main thread, a few lines at a time."""

    __slots__ = ("_by_line", "_entries")

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        by_line: dict[int, Entry] = {}
        for e in entries:
            if e.line in by_line:
                raise ValueError("entries: more than one entry for a line")
            by_line[e.line] = e
        self._by_line = by_line
        self._entries: tuple[Entry, ...] | None = None

    @classmethod
    def _of(cls, by_line: dict[int, Entry]) -> BatchRecord:
        record = cls.__new__(cls)
        record._by_line, record._entries = by_line, None
        return record

    @property
    def entries(self) -> tuple[Entry, ...]:
        if self._entries is None:  # sorted when first asked for, not at each update
            self._entries = tuple(self._by_line[line] for line in sorted(self._by_line))
        return self._entries

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchRecord) and self._by_line == other._by_line

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"BatchRecord({self.entries!r})"

    # --- queries ----------------------------------------------------------------------------

    def entry(self, line: int) -> Entry | None:
        return self._by_line.get(line)

    def is_keyed(
        self, line: int, text: str, frame: int, translation: bool = False, on_floor: bool = False
    ) -> bool:
        """Whether ``line`` holding ``text`` is keyed at ``frame``, with the root's location
        from the pose's translation and on the floor where ``translation`` and ``on_floor``
        ask for them."""
        e = self.entry(line)
        return (
            e is not None
            and _holds(e.hash, text)
            and e.frame == frame
            and (e.translation or not translation)
            and (e.on_floor or not on_floor)
        )

    def pending(
        self,
        lines: Sequence[str],
        start: int,
        step: int = 1,
        translation: bool = False,
        on_floor: bool = False,
    ) -> list[PendingLine]:
        """The prompts ``lines`` (``batch_text.prompt_lines``, without their numbers) not keyed
        yet (as ``is_keyed`` asks), in order, with the frame each goes on."""
        frames = frames_for(len(lines), start, step)
        return [
            PendingLine(i, text, frame)
            for i, (text, frame) in enumerate(zip(lines, frames, strict=True))
            if not self.is_keyed(i, text, frame, translation, on_floor)
        ]

    def labels(self, lines: Sequence[str]) -> dict[int, str]:
        """Each recorded line's prompt by the (whole) scene frame it is keyed at, for the
        prompts ``lines`` as the text holds them now: a line edited since keeps no label."""
        return {
            round(e.frame): lines[e.line]
            for e in self.entries
            if e.line < len(lines) and _holds(e.hash, lines[e.line])
        }

    # --- updates (a new record each time) ---------------------------------------------------

    def recorded(self, line: int, text: str, frame: int, translation: bool = False) -> BatchRecord:
        """This record plus ``line`` keyed at ``frame`` (replacing an older entry for it)."""
        return self.recorded_lines([(line, text, frame)], translation)

    def recorded_lines(
        self,
        lines: Iterable[tuple[int, str, int]],
        translation: bool = False,
        on_floor: bool = False,
    ) -> BatchRecord:
        """This record plus each (line, text, frame) keyed (the root's location from the
        pose's translation, for ``translation``, on the floor for ``on_floor``), in one
        update."""
        by_line = dict(self._by_line)
        for line, text, frame in lines:
            if line < 0:
                raise ValueError(f"line: expected >= 0, got {line}")
            by_line[line] = Entry(line, line_hash(text), int(frame), translation, on_floor)
        return BatchRecord._of(by_line)

    def with_frames(self, convert: Callable[[int | float], int | float]) -> BatchRecord:
        """This record with every entry's frame converted (between a scene's time and an
        action's, say)."""
        return BatchRecord(dataclasses.replace(e, frame=convert(e.frame)) for e in self.entries)

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
            {"version": RECORD_VERSION, "entries": [e.to_dict() for e in self.entries]},
            separators=_SEPARATORS,
        )

    @classmethod
    def from_json(cls, text: str | None) -> BatchRecord:
        """Reads ``to_json``'s or ``with_entries_appended``'s output (a later entry for a line
        replaces an earlier one); an empty or missing value is an empty record. Raises
        ValueError for anything else that does not parse."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:  # nested deeper than Python goes
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
                and isinstance(item.get("translation", False), bool)
                and isinstance(item.get("on_floor", False), bool)
            ):
                raise ValueError(f"batch record: bad entry {item!r}")
            entries.append(
                Entry(
                    item["line"],
                    item["hash"],
                    item["frame"],
                    item.get("translation", False),
                    item.get("on_floor", False),
                )
            )
        return cls._of({e.line: e for e in entries})


@dataclass(frozen=True)
class Rerun:
    """What a Batch Keyframe run over the text's lines makes of the armature's record."""

    record: BatchRecord  # without the entries ``forgotten`` (saved once the run starts)
    forgotten: frozenset[int]  # lines deleted from the text, or whose frame another now takes
    pending: list[PendingLine]  # to ask the service for
    to_place: list[PendingLine]  # keyed before without a setting now on: the root's location
    # is keyed from their keys, not asked again (``blender.batch_store.place_keyed_lines``)
    to_record: list[PendingLine]  # on the floor already: only recorded with the settings
    notes: str  # for the run's message: each part starts with "; "
    keyed_before: list[PendingLine]  # the lines not pending: keyed (placed or not) already


def plan_rerun(
    record: BatchRecord,
    lines: Sequence[str],
    start: int,
    step: int,
    *,
    translation: bool,
    keep_on_floor: bool,
) -> Rerun:
    """What a run of ``lines`` keyed from ``start`` every ``step`` frames does with ``record``:
    entries of deleted lines and of lines whose old frame another line now goes on are
    forgotten (a run stopped before keying them again would leave two entries at one frame,
    and count a line keyed that is not); the rest is ``pending`` or placed from its keys."""
    frames = frames_for(len(lines), start, step)
    new_frames = set(frames)
    gone = record.past_the_end(len(lines))  # lines deleted from the text
    moved = record.moved(lines, start, step)  # Start or Step changed: keyed at new frames
    overwritten = sorted(
        (entry for entry in (*gone, *moved) if entry.frame in new_frames), key=lambda e: e.frame
    )
    forgotten = frozenset(entry.line for entry in (*gone, *overwritten))
    record = record.without_lines(forgotten)
    pending = record.pending(lines, start, step)
    asked = {line.line for line in pending}
    keyed_before = [
        PendingLine(i, text, frame)
        for i, (text, frame) in enumerate(zip(lines, frames, strict=True))
        if i not in asked
    ]
    lacking = [  # keyed, but without a setting now on
        line
        for line in record.pending(lines, start, step, translation, keep_on_floor)
        if line.line not in asked
    ]
    placed = [keep_on_floor and record.entry(line.line).on_floor for line in lacking]
    to_place = [line for line, on_floor in zip(lacking, placed, strict=True) if not on_floor]
    to_record = [line for line, on_floor in zip(lacking, placed, strict=True) if on_floor]
    notes = ""
    if gone:
        notes = f"; {len(gone)} recorded line(s) are no longer in the text"
        gone_kept = [entry for entry in gone if entry.frame not in new_frames]
        if gone_kept:
            notes += f", their keys (frame {_frame_list(gone_kept)}) are left as they are"
    if to_place:
        notes += (
            f"; {len(to_place)} line(s) keyed before without Keep on Floor are put on the floor "
            "from their current keys, not asked again"
            if keep_on_floor
            else f"; {len(to_place)} line(s) keyed before without Translation get the root's "
            "location keyed at rest, not asked again"
        )
    if moved:
        notes += (
            f"; Start or Step changed since {len(moved)} line(s) were keyed, so they are keyed "
            "at their new frames"
        )
    if overwritten:
        notes += (
            f"; other lines now go where {len(overwritten)} old key(s) are (frame "
            f"{_frame_list(overwritten)}), and replace them"
        )
    moved_kept = [entry for entry in moved if entry.frame not in new_frames]
    if moved_kept:
        notes += f"; the old keys at frame {_frame_list(moved_kept)} are left as they are"
    return Rerun(record, forgotten, pending, to_place, to_record, notes, keyed_before)


def _frame_list(entries: Sequence[Entry]) -> str:
    return ", ".join(str(e.frame) for e in entries[:5]) + (" ..." if len(entries) > 5 else "")


_SEPARATORS = (",", ":")
_END = "]}"  # of to_json's text: the entries are its last member


def with_entries_appended(stored: str, entries: Sequence[Entry]) -> str | None:
    """``stored`` (``to_json``'s or this function's output) with ``entries`` added at its end,
    at the cost of the new entries, not of the record; None when ``stored`` does not end as
    ``to_json`` writes it (the caller writes the whole record instead)."""
    if not stored.endswith(_END):
        return None
    if not entries:
        return stored
    head = stored[: -len(_END)]
    added = json.dumps([e.to_dict() for e in entries], separators=_SEPARATORS)[1:-1]
    return head + ("" if head.endswith("[") else ",") + added + _END


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_frame(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
