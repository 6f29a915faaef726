"""The batch text that the add-on's *Batch Keyframe* and `chatpose batch` both read.

One prompt per line, stripped of the white space around it. A blank line, or one whose first
character that is not white space is ``#`` (a heading or a note: "# shot 12, the proposal"), is
no prompt: it is not sent and not counted, so the frames follow the prompts alone. A file is
UTF-8, or UTF-16 or UTF-32 with a byte order mark (`decode_text`).
"""

from __future__ import annotations

import os

from shared_protocol.protocol import trimmed

COMMENT = "#"
# Byte order marks: Windows' Notepad saves "Unicode" as UTF-16 with one; UTF-8 may carry one too.
_ENCODINGS_BY_MARK = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),  # before UTF-16's, which begins it
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


# 100,000 prompts of 160 characters, in UTF-16 too; a video or an archive picked by mistake is
# refused before it is read into memory.
MAX_FILE_BYTES = 32 * 1024 * 1024


class NulCharacterError(UnicodeDecodeError):
    """A batch file's text that decoded, but holds a NUL character (``decode_text``)."""


class FileTooLargeError(ValueError):
    """A batch file larger than MAX_FILE_BYTES."""


def read_batch_file(path) -> str:
    """A batch file's text (`decode_text`). OSError as `open` raises it, UnicodeDecodeError,
    and FileTooLargeError for a file over MAX_FILE_BYTES, which is not read."""
    with open(path, "rb") as file:
        # Its size first: reading even the cap's worth from a network share takes seconds.
        too_large = os.fstat(file.fileno()).st_size > MAX_FILE_BYTES
        data = b"" if too_large else file.read(MAX_FILE_BYTES + 1)  # bounded: a pipe has no size
    if too_large or len(data) > MAX_FILE_BYTES:
        raise FileTooLargeError(
            f"larger than {MAX_FILE_BYTES // 2**20} MiB; a batch file is text, one prompt per line"
        )
    return decode_text(data)


def decode_text(data: bytes) -> str:
    """A batch file's text: UTF-8, or UTF-16 or UTF-32 when it starts with a byte order mark
    (the mark is no part of the first prompt). UnicodeDecodeError for anything else, and for a
    NUL character, which a text file without a mark in UTF-16 (every other byte) is full of;
    `unreadable` says it for people."""
    encoding = next((name for mark, name in _ENCODINGS_BY_MARK if data.startswith(mark)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:  # the line, which an editor shows, not only the byte
        before = data[: exc.start].decode(encoding, errors="replace")
        raise UnicodeDecodeError(
            encoding, data, exc.start, exc.end, f"{exc.reason} on line {_line_at(before)}"
        ) from None
    if "\0" in text:  # valid UTF-8, but no prompt holds one, and labels would lose it
        at = text.index("\0")
        unit = {"utf-16": "utf-16-le", "utf-32": "utf-32-le"}.get(encoding, "utf-8")
        width = len("\0".encode(unit))  # bytes of the NUL
        start = len(data) - len(text[at:].encode(unit))
        reason = f"a NUL character on line {_line_at(text[:at])}"
        raise NulCharacterError(encoding, data, start, start + width, reason)
    return text


def unreadable(error: UnicodeDecodeError) -> str:
    """What a `decode_text` error says of a file, after its name, wherever it is shown."""
    save = "save it as UTF-8 (a text editor's Save As)"
    if isinstance(error, NulCharacterError):
        if error.encoding == "utf-8":  # one between every letter: UTF-16 without its mark
            return (
                f"holds {error.reason}: if it is UTF-16 without a byte order mark, {save}; "
                "else remove the character"
            )
        return f"holds {error.reason}: remove the character"
    name = {"utf-16": "UTF-16", "utf-32": "UTF-32"}.get(error.encoding, "UTF-8")
    return f"is not {name} text ({error.reason}): {save}"


def _line_at(text_before: str) -> int:
    """The line, counted as `prompt_lines` counts them, that the text after ``text_before``
    starts on."""
    return text_before.replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1


def prompt_lines(text: str) -> list[tuple[int, str]]:
    """Each prompt of ``text`` with its line number in the text (from 1), in order.

    Lines end where Blender's Text Editor and other editors end them, at ``\n``, ``\r\n`` or
    ``\r``; not where ``str.splitlines`` also would (a form feed, Word's line separator
    ``\u2028``), which would split one line the user sees into two prompts and move every frame
    after it. Byte order marks and zero-width spaces around a line are no part of it: Blender's
    Text keeps a loaded file's mark, unseen, files joined with `cat` hold one on a later line
    (its `#` note would become a prompt), and `str.strip` keeps them."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = ((number, trimmed(line)) for number, line in enumerate(text.split("\n"), 1))
    return [(number, line) for number, line in lines if line and not line.startswith(COMMENT)]
