"""The batch keyframe record (pure, no bpy)."""

from __future__ import annotations

import hashlib
import json
import unicodedata

import pytest

from blender_addon.core.batch_record import (
    BatchRecord,
    Entry,
    PendingLine,
    former_record_properties,
    line_hash,
    plan_rerun,
    record_property,
    with_entries_appended,
)
from shared_protocol.batch_text import prompt_lines

TEXT = """
stand with arms crossed

kneel on one knee
stand with arms crossed
   wave with the right hand
"""


def prompts(text: str) -> list[str]:
    """The prompts as the add-on keys them: by their index, without their line numbers."""
    return [prompt for _, prompt in prompt_lines(text)]


def run(record: BatchRecord, lines, start=1, step=10, stop_after=None):
    """Keys the pending lines (up to stop_after of them) and records each; returns the new
    record and the (line, frame) pairs keyed."""
    keyed = []
    for n, item in enumerate(record.pending(lines, start, step)):
        if stop_after is not None and n >= stop_after:
            break
        keyed.append((item.line, item.frame))
        record = record.recorded(item.line, item.text, item.frame)
    return record, keyed


def test_pending_gives_every_line_with_its_frame():
    lines = prompts(TEXT)
    assert BatchRecord().pending(lines, start=1, step=10) == [
        PendingLine(0, lines[0], 1),
        PendingLine(1, lines[1], 11),
        PendingLine(2, lines[2], 21),
        PendingLine(3, lines[3], 31),
    ]


def test_interrupted_run_resumes_without_keying_twice_or_losing_lines():
    lines = prompts(TEXT)
    record, first = run(BatchRecord(), lines, stop_after=2)
    assert first == [(0, 1), (1, 11)]
    record = BatchRecord.from_json(record.to_json())  # stored on the armature and read back
    record, second = run(record, lines)
    assert second == [(2, 21), (3, 31)]  # the repeated prompt on line 2 is not "already done"
    assert record.pending(lines, 1, 10) == []
    _, third = run(record, lines)
    assert third == []


def test_edited_line_is_pending_again_and_replaces_its_entry():
    lines = prompts(TEXT)
    record, _ = run(BatchRecord(), lines)
    edited = list(lines)
    edited[1] = "kneel on both knees"
    assert record.pending(edited, 1, 10) == [PendingLine(1, "kneel on both knees", 11)]
    record, keyed = run(record, edited)
    assert keyed == [(1, 11)]
    assert len(record.entries) == 4
    assert record.entry(1) == Entry(1, line_hash("kneel on both knees"), 11)


def test_labels_are_the_prompts_of_the_keyed_lines_as_the_text_holds_them():
    lines = prompts(TEXT)
    record, _ = run(BatchRecord(), lines, stop_after=3)
    assert record.labels(lines) == {1: lines[0], 11: lines[1], 21: lines[2]}
    edited = [lines[0], "kneel on both knees", *lines[2:]]  # its key is not of this prompt
    assert record.labels(edited) == {1: lines[0], 21: lines[2]}
    assert record.labels(lines[:1]) == {1: lines[0]}  # lines deleted from the text


def test_blank_lines_comments_and_whitespace_change_nothing():
    record, _ = run(BatchRecord(), prompts(TEXT))
    more_blanks = "\n\n" + TEXT.replace("\n", "\n\n") + "   \n"
    assert record.pending(prompts(more_blanks), 1, 10) == []
    notes = "# shot 12\n" + TEXT.replace("kneel", "  # the proposal\nkneel")
    assert record.pending(prompts(notes), 1, 10) == []


def test_a_text_saved_again_in_unicode_s_other_form_is_still_keyed():
    # macOS and some editors write "é" as "e" and a combining accent; it reads the same.
    lines = ["plié with the arms in second", "relevé on both feet"]
    record, _ = run(BatchRecord(), lines)
    decomposed = [unicodedata.normalize("NFD", line) for line in lines]
    assert decomposed != lines
    assert record.pending(decomposed, 1, 10) == []
    assert record.labels(decomposed) == {1: decomposed[0], 11: decomposed[1]}
    assert record.pending(["relevé on one foot", lines[1]], 1, 10) != []  # an edit still counts
    # A record written before lines were normalised holds the hash of the text as it was.
    older = BatchRecord([Entry(0, hashlib.sha256(decomposed[0].encode()).hexdigest()[:16], 1)])
    assert older.pending(decomposed[:1], 1, 10) == []
    assert older.labels(decomposed[:1]) == {1: decomposed[0]}


def test_inserted_line_moves_later_lines_to_new_frames():
    lines = prompts(TEXT)
    record, _ = run(BatchRecord(), lines)
    inserted = [lines[0], "jump", *lines[1:]]
    assert [p.line for p in record.pending(inserted, 1, 10)] == [1, 2, 3, 4]


def test_changing_start_or_step_makes_lines_pending():
    lines = prompts(TEXT)
    record, _ = run(BatchRecord(), lines)
    assert len(record.pending(lines, start=1, step=5)) == 3  # line 0 stays at frame 1
    assert len(record.pending(lines, start=2, step=10)) == 4
    assert [e.frame for e in record.moved(lines, start=1, step=5)] == [11, 21, 31]
    assert record.moved(lines, start=1, step=10) == ()
    assert record.moved(lines[:2], start=1, step=5) == (record.entry(1),)  # only lines kept


def test_a_record_s_property_is_named_by_its_slot_s_handle_and_found_where_it_was_before():
    assert record_property(None) == "chatpose_batch_record"  # Blender 4.2, 4.3: no slots
    assert record_property(2**31 - 1) == "chatpose_batch_record:#2147483647"  # 33 bytes
    assert former_record_properties("OBSMPL", 2) == ("chatpose_batch_record:OBSMPL",)
    # In an action of one slot, 4.2's record (4.4 gives its actions a slot when it opens them).
    assert former_record_properties("OBLegacy Slot", 1) == (
        "chatpose_batch_record:OBLegacy Slot",
        "chatpose_batch_record",
    )
    long_names = ["OB" + "Shot010_CharacterRig_MainDancer_Performance_Take03", "OB" + "é" * 30]
    names = [former_record_properties(slot, 2)[0] for slot in long_names]
    assert all(len(name.encode()) <= 63 for name in names) and len(set(names)) == 2


def test_json_layout_and_round_trip():
    record = BatchRecord().recorded(2, "jump", 21).recorded(0, "stand", 1)
    data = json.loads(record.to_json())
    assert data == {
        "version": 1,
        "entries": [
            {"line": 0, "hash": line_hash("stand"), "frame": 1},
            {"line": 2, "hash": line_hash("jump"), "frame": 21},
        ],
    }
    assert len(line_hash("x")) == 16
    assert BatchRecord.from_json(record.to_json()) == record
    assert BatchRecord.from_json("") == BatchRecord()
    assert BatchRecord.from_json(None) == BatchRecord()
    assert record.without_lines([0]).entries == (Entry(2, line_hash("jump"), 21),)
    # In the time of an action on a scaled NLA strip, a frame falls between whole ones.
    in_action_time = record.with_frames(lambda frame: frame / 3)
    assert BatchRecord.from_json(in_action_time.to_json()).entries[1].frame == 7.0
    assert BatchRecord.from_json(in_action_time.to_json()).entries[0].frame == 1 / 3


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"version": 2, "entries": []}',
        '{"version": 1}',
        '{"version": 1, "entries": [{"line": -1, "hash": "ab", "frame": 1}]}',
        '{"version": 1, "entries": [{"line": true, "hash": "ab", "frame": 1}]}',
        '{"version": 1, "entries": [{"line": 0, "hash": 5, "frame": 1}]}',
        '{"version": 1, "entries": [{"line": 0, "hash": "a", "frame": "1"}]}',
        '{"version": 1, "entries": [{"line": 0, "hash": "a", "frame": NaN}]}',
        '{"version": 1, "entries": [{"line": 0, "hash": "a", "frame": 1, "translation": 1}]}',
        "[" * 100_000 + "]" * 100_000,  # a crafted .blend's: JSON nested past Python's stack
    ],
)
def test_bad_json_is_a_value_error(text):
    with pytest.raises(ValueError):
        BatchRecord.from_json(text)


def test_recording_several_lines_at_once_equals_one_at_a_time():
    items = [(3, "jump", 31), (0, "stand", 1), (3, "jump higher", 41), (7, "sit", 71)]
    one_by_one = BatchRecord()
    for line, text, frame in items:
        one_by_one = one_by_one.recorded(line, text, frame)
    at_once = BatchRecord().recorded_lines(items)
    assert at_once == one_by_one
    assert [e.line for e in at_once.entries] == [0, 3, 7]
    assert at_once.is_keyed(3, "jump higher", 41) and not at_once.is_keyed(3, "jump", 31)
    assert BatchRecord.from_json(at_once.to_json()) == at_once
    with pytest.raises(ValueError, match="line: expected >= 0"):
        at_once.recorded_lines([(-1, "x", 1)])


def test_entries_appended_to_the_stored_text_read_as_the_record_plus_them():
    record = BatchRecord().recorded_lines([(0, "stand", 1), (1, "sit", 11)])
    later = record.recorded_lines([(1, "sit down", 11), (2, "jump", 21)], translation=True)
    added = [later.entry(1), later.entry(2)]
    stored = with_entries_appended(record.to_json(), added)
    assert BatchRecord.from_json(stored) == later  # the later entry for line 1 replaces it
    assert len(json.loads(stored)["entries"]) == 4
    assert len(json.loads(later.to_json())["entries"]) == 3  # written whole: once a line
    empty = with_entries_appended(BatchRecord().to_json(), added)
    assert BatchRecord.from_json(empty) == BatchRecord(added)
    assert with_entries_appended(stored, []) == stored
    # Not as to_json writes it (edited by hand, say): the caller writes the whole record.
    assert with_entries_appended('{"entries": [], "version": 1}', added) is None


def test_a_line_keyed_without_the_root_s_location_is_pending_for_a_run_with_it():
    lines = ["walk", "run"]
    record = BatchRecord().recorded_lines([(0, "walk", 1), (1, "run", 11)])
    assert record.pending(lines, 1, 10) == []
    assert [p.line for p in record.pending(lines, 1, 10, translation=True)] == [0, 1]
    with_location = record.recorded(1, "run", 11, translation=True)
    assert [p.line for p in with_location.pending(lines, 1, 10, translation=True)] == [0]
    assert with_location.pending(lines, 1, 10) == []  # with it is keyed for a run without
    assert BatchRecord.from_json(with_location.to_json()) == with_location
    assert [e.get("translation") for e in json.loads(with_location.to_json())["entries"]] == [
        None,
        True,
    ]


def test_a_line_keyed_off_the_floor_is_pending_for_a_run_that_keeps_it_on_the_floor():
    lines = ["kneel", "sit"]
    record = BatchRecord().recorded_lines([(0, "kneel", 1), (1, "sit", 11)], translation=True)
    assert [p.line for p in record.pending(lines, 1, 10, on_floor=True)] == [0, 1]
    on_floor = record.recorded_lines([(1, "sit", 11)], on_floor=True)
    assert [p.line for p in on_floor.pending(lines, 1, 10, on_floor=True)] == [0]
    assert [p.line for p in on_floor.pending(lines, 1, 10, True, True)] == [0, 1]
    assert on_floor.pending(lines, 1, 10) == []  # on the floor is keyed for a run without
    assert BatchRecord.from_json(on_floor.to_json()) == on_floor
    assert [e.get("on_floor") for e in json.loads(on_floor.to_json())["entries"]] == [None, True]
    with pytest.raises(ValueError, match="bad entry"):
        BatchRecord.from_json(
            '{"version": 1, "entries": [{"line": 0, "hash": "a", "frame": 1, "on_floor": 1}]}'
        )


def test_entries_past_the_end_of_a_shorter_text():
    record = BatchRecord().recorded_lines([(0, "a", 1), (2, "c", 21), (3, "d", 31)])
    assert [e.line for e in record.past_the_end(3)] == [3]
    assert record.past_the_end(4) == ()


def test_a_rerun_forgets_lines_deleted_or_whose_frame_another_line_takes():
    # Keyed every 10 frames: a at 1, b at 11, c at 21, d at 31, e at 41; then Step 20 and
    # e deleted: b goes to 21 (c's old frame), c to 41 (e's), d to 61.
    record = BatchRecord().recorded_lines([(i, text, 1 + 10 * i) for i, text in enumerate("abcde")])
    plan = plan_rerun(record, list("abcd"), 1, 20, translation=False, keep_on_floor=False)
    # c's old frame is b's now, e's (deleted) is c's: both entries go; b and d keep theirs
    # until keyed again (their old frames 11 and 31 hold no other line's pose).
    assert plan.forgotten == {2, 4}
    assert [e.line for e in plan.record.entries] == [0, 1, 3]
    assert [(p.line, p.frame) for p in plan.pending] == [(1, 21), (2, 41), (3, 61)]
    assert plan.to_place == plan.to_record == []
    assert [(p.line, p.text, p.frame) for p in plan.keyed_before] == [(0, "a", 1)]
    assert "; 1 recorded line(s) are no longer in the text;" in plan.notes  # e, its key replaced
    assert "; Start or Step changed since 3 line(s) were keyed" in plan.notes
    assert "; other lines now go where 2 old key(s) are (frame 21, 41), and replace them" in (
        plan.notes
    )
    assert plan.notes.endswith("; the old keys at frame 11, 31 are left as they are")


def test_a_rerun_with_keep_on_floor_places_lines_keyed_without_it_and_asks_nothing():
    record = (
        BatchRecord()
        .recorded_lines([(0, "kneel", 1)])
        .recorded_lines([(1, "sit", 11)], translation=True, on_floor=True)
    )
    lines = ["kneel", "sit", "jump"]
    plan = plan_rerun(record, lines, 1, 10, translation=False, keep_on_floor=True)
    assert [p.line for p in plan.pending] == [2]  # only the new line is asked
    assert [p.line for p in plan.to_place] == [0] and plan.to_record == []
    assert "1 line(s) keyed before without Keep on Floor are put on the floor" in plan.notes
    plan = plan_rerun(record, lines, 1, 10, translation=True, keep_on_floor=False)
    assert [p.line for p in plan.to_place] == [0]  # its root's location is keyed at rest
    assert "without Translation get the root's location keyed at rest" in plan.notes
