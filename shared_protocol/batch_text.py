"""The batch text that the add-on's *Batch Keyframe* and `chatpose batch` both read.

One prompt per line, stripped of the white space around it. A blank line, or one whose first
character that is not white space is ``#`` (a heading or a note: "# shot 12, the proposal"), is
no prompt: it is not sent and not counted, so the frames follow the prompts alone.
"""

from __future__ import annotations

COMMENT = "#"


def prompt_lines(text: str) -> list[tuple[int, str]]:
    """Each prompt of ``text`` with its line number in the text (from 1), in order.

    Lines end where Blender's Text Editor and other editors end them, at ``\n``, ``\r\n`` or
    ``\r``; not where ``str.splitlines`` also would (a form feed, Word's line separator
    ``\u2028``), which would split one line the user sees into two prompts and move every frame
    after it."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = ((number, line.strip()) for number, line in enumerate(text.split("\n"), 1))
    return [(number, line) for number, line in lines if line and not line.startswith(COMMENT)]
