"""The batch text format that the add-on and `chatpose batch` share."""

from __future__ import annotations

import pytest

from shared_protocol.batch_text import decode_text, prompt_lines, unreadable


def test_prompts_are_stripped_lines_numbered_as_in_the_file():
    text = "\n  stand with arms crossed \n\nkneel on one knee\r\n\twave\n"
    assert prompt_lines(text) == [
        (2, "stand with arms crossed"),
        (4, "kneel on one knee"),
        (5, "wave"),
    ]


def test_blank_and_comment_lines_are_not_prompts():
    text = "# shot 12: the proposal\nkneel on one knee\n   # hold it\n\nwave #3 times\n"
    assert prompt_lines(text) == [(2, "kneel on one knee"), (5, "wave #3 times")]


def test_a_text_of_notes_alone_has_no_prompts():
    assert prompt_lines("") == []
    assert prompt_lines("\n# nothing yet\n  \n") == []


def test_lines_end_where_an_editor_ends_them_not_at_every_unicode_separator():
    text = "wave\u2028hello\r\nsit\x0cdown\rrun\x0b fast\x85now\n"
    assert prompt_lines(text) == [
        (1, "wave\u2028hello"),
        (2, "sit\x0cdown"),
        (3, "run\x0b fast\x85now"),
    ]


def test_byte_order_marks_and_zero_width_spaces_are_no_part_of_a_line():
    # Blender's Text datablock keeps the mark of a file it loads; a heading after it stays a
    # comment, and the first prompt keeps frame 1.
    assert prompt_lines("\ufeff# shot 12\nwave hello\nkneel") == [(2, "wave hello"), (3, "kneel")]
    assert prompt_lines("\ufeff\nwave") == [(2, "wave")]
    assert prompt_lines("\ufeffwave") == [(1, "wave")]
    # Files saved with a mark, joined (`cat shot1.txt shot2.txt`): a later heading stays one,
    # and a line that shows nothing is no prompt, so no frame moves.
    joined = "\ufeff# shot 1\nwave hello\n\ufeff# shot 2\n\u200b\nsit down \ufeff\n\u2060 \u200bbow"
    assert prompt_lines(joined) == [(2, "wave hello"), (5, "sit down"), (6, "bow")]
    assert prompt_lines("wave\u200bhello") == [(1, "wave\u200bhello")]  # inside: the user's


def test_files_are_utf8_or_utf16_with_a_byte_order_mark():
    text = "café pose\nsit down\n"
    for data in (
        text.encode("utf-8"),
        b"\xef\xbb\xbf" + text.encode("utf-8"),
        text.encode("utf-16"),  # Notepad's "Unicode": little-endian, with its mark
        b"\xfe\xff" + text.encode("utf-16-be"),
        text.encode("utf-32"),  # its mark begins with UTF-16's: it read as a NUL on line 1
        b"\x00\x00\xfe\xff" + text.encode("utf-32-be"),
    ):
        assert decode_text(data) == text
    with pytest.raises(UnicodeDecodeError, match="on line 1$") as error:
        decode_text("café".encode("latin-1"))
    assert error.value.start == 3  # the byte too
    with pytest.raises(UnicodeDecodeError, match="on line 3$"):
        decode_text("wave\nsit\ncafé\n".encode("latin-1"))  # the line an editor shows
    with pytest.raises(UnicodeDecodeError, match="on line 2$"):
        decode_text("a\n".encode("utf-16") + b"\x00\xd8")  # a lone surrogate, line 2
    # Lines end at a lone CR too (an old Mac's files), as prompt_lines counts them: line 1 before.
    with pytest.raises(UnicodeDecodeError, match="on line 3$"):
        decode_text("wave\rsit\r\ncafé\r".encode("latin-1"))
    with pytest.raises(UnicodeDecodeError, match="NUL character on line 2$"):
        decode_text("wave\rsit\0".encode("utf-16"))


def test_an_unreadable_file_is_said_one_way_with_its_remedy():
    for data, said in (
        ("café!".encode("latin-1"), "is not UTF-8 text (invalid continuation byte on line 1)"),
        ("a\n".encode("utf-16") + b"\x00\xd8", "is not UTF-16 text (unexpected end of data"),
    ):
        with pytest.raises(UnicodeDecodeError) as error:
            decode_text(data)
        assert unreadable(error.value).startswith(said)
        assert unreadable(error.value).endswith(": save it as UTF-8 (a text editor's Save As)")


def test_a_nul_character_is_refused_naming_its_line():
    # UTF-16 without a byte order mark is valid UTF-8 with a NUL after every letter; a prompt
    # holding one would be sent as it is, and --resume could not match its label.
    for data, line, at in (
        ("sit\nstand".encode("utf-16-le"), 1, 1),
        ("café\nst\0and".encode(), 2, 8),  # the byte, not the character, is named
        ("a\nb\0".encode("utf-16"), 2, 8),  # a NUL in UTF-16 is no missing mark
    ):
        with pytest.raises(UnicodeDecodeError, match=f"NUL character on line {line}") as error:
            decode_text(data)
        assert error.value.start == at and data[at] == 0
        said = unreadable(error.value)  # no "save it as UTF-8" for a stray NUL in UTF-16
        assert said.startswith(f"holds a NUL character on line {line}: ")
        utf8 = error.value.encoding == "utf-8"
        assert ("if it is UTF-16 without a byte order mark, save it as UTF-8" in said) == utf8
        assert said.endswith("remove the character")
