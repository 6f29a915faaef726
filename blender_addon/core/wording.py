"""Text as the add-on shows it: names, paths and prompts quoted as written, previews cut and
lines wrapped between the characters a reader sees (an accented letter, an emoji, a flag is
one), for messages and the panel's labels."""

from __future__ import annotations

import textwrap
import unicodedata


def preview(text: str, limit: int = 60) -> str:
    """`text` quoted for a message, cut to `limit` characters (an ellipsis marks the cut): a
    pasted brief of 8,000 characters filled the panel's message box, 215 lines of it. The cut
    falls between what a reader sees as characters (`_clusters`: not inside an accented
    letter, an emoji or a flag), and only control characters are escaped, so that a Persian
    prompt's zero-width non-joiners or a French one's no-break spaces show as written."""
    if len(text) > limit:
        kept, used = [], 0
        for cluster in _clusters(text):
            used += len(cluster)
            if used > limit - 1:
                break
            kept.append(cluster)
        text = "".join(kept) + "\u2026"
    return quoted(text)


def quoted(text: str) -> str:
    """A name, a path or a prompt in quotes for a message: as written, where repr would
    escape a Persian name's non-joiners and double a Windows path's backslashes; only control
    characters, lone surrogates and bidirectional overrides escaped."""
    quote = '"' if "'" in text and '"' not in text else "'"  # as repr chooses
    return quote + "".join(repr(c)[1:-1] if _is_control(c) else c for c in text) + quote


def _is_control(character: str) -> bool:
    """A character that would break a message's line, reorder its text (bidirectional
    overrides and isolates), or is no character at all (a lone surrogate)."""
    return (
        unicodedata.category(character) in ("Cc", "Zl", "Zp", "Cs")
        or "\u202a" <= character <= "\u202e"
        or "\u2066" <= character <= "\u2069"
    )


_ZERO_WIDTH_JOINER = "\u200d"


def _clusters(text: str) -> list[str]:
    """`text` as the characters a reader sees, near enough Unicode's grapheme clusters: a
    letter with its combining accents, an emoji with its modifiers and the emoji joined to it,
    a flag's two regional letters."""
    clusters: list[str] = []
    for character in text:
        if clusters and (
            _extends(character)
            or clusters[-1].endswith(_ZERO_WIDTH_JOINER)
            or (_is_regional(character) and len(clusters[-1]) == 1 and _is_regional(clusters[-1]))
        ):
            clusters[-1] += character
        else:
            clusters.append(character)
    return clusters


def _extends(character: str) -> bool:
    """A combining mark, a joiner, a variation selector, a skin tone or an emoji tag."""
    return (
        unicodedata.category(character) in ("Mn", "Me", "Mc")
        or character == _ZERO_WIDTH_JOINER
        or "\ufe00" <= character <= "\ufe0f"
        or "\U0001f3fb" <= character <= "\U0001f3ff"
        or "\U000e0020" <= character <= "\U000e007f"
    )


def _is_regional(character: str) -> bool:
    return "\U0001f1e6" <= character <= "\U0001f1ff"


def wrap(text: str, width: int) -> list[str]:
    """``text`` broken into lines of at most ``width`` columns (panel labels do not wrap): a
    character as a reader sees it (`_clusters`) is a column, an East Asian wide one (Chinese,
    Japanese, most emoji) or a flag two, as Blender's font draws them about twice as wide."""
    width = max(8, width)
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        clusters = _clusters(paragraph)
        if len(clusters) < len(paragraph) or any(_columns(c) > 1 for c in clusters):
            lines += _wrap_clusters(clusters, width) or [""]
        else:
            lines += textwrap.wrap(paragraph, width, break_long_words=True) or [""]
    return lines


MAX_MESSAGE_LINES = 8


def message_lines(text: str, width: int, max_lines: int = MAX_MESSAGE_LINES) -> list[str]:
    """`wrap`, at most ``max_lines`` lines, for the panel's message and a popup: a model's
    crash text of thousands of characters filled both (50 lines of a popup). A message too
    long for them is printed whole to the console (`feedback.set_message`)."""
    lines = wrap(text, width)
    if len(lines) <= max_lines:
        return lines
    return [*lines[: max_lines - 1], *wrap(CUT_MARK, width)]


CUT_MARK = "\u2026 (cut; in full in the console)"
LONG_MESSAGE_CHARS = 150  # past what Blender's status bar shows, or a few panel lines


def _columns(cluster: str) -> int:
    wide = any(unicodedata.east_asian_width(c) in ("W", "F") for c in cluster)
    return 2 if wide or _is_regional(cluster[0]) else 1


def _wrap_clusters(clusters: list[str], width: int) -> list[str]:
    """``wrap`` for a paragraph with wide or composed characters, never broken inside one: a
    word of narrow ones at the last space before it, wide ones between any two (Chinese and
    Japanese have no spaces between words)."""
    lines: list[str] = []
    line: list[str] = []
    used = 0
    for cluster in clusters:
        size = _columns(cluster)
        if used + size > width and "".join(line).strip():
            cut = max((i for i, c in enumerate(line) if c == " "), default=-1) if size == 1 else -1
            head, line = (line[:cut], line[cut + 1 :]) if cut > 0 else (line, [])
            lines.append("".join(head).rstrip())
            used = sum(_columns(c) for c in line)
        if line or not cluster.isspace():  # no line starts with a space
            line.append(cluster)
            used += size
    if "".join(line).strip():
        lines.append("".join(line).rstrip())
    return lines
