"""The chat history: what the panel keeps per scene, what goes to the service as context.

The history is a list of messages kept as Blender properties on the scene (so it is saved in
the .blend). An exchange is always stored as a pair, added when its answer comes back: the
user's prompt, then the model's reply (role ``assistant``) or the failure (role ``error``).
Storing both at once keeps the pairs intact when several prompts are in flight.

In chat mode the earlier exchanges go with the prompt as protocol ``Turn``s, user/assistant
pairs in order (the service wants pairs). Failed exchanges are not sent. The most recent pairs
are kept within ``max_pairs`` and ``max_chars`` (and the protocol's limits), so that a long
chat does not overflow the model's context.

The service keeps nothing between requests: a conversation's image goes again with every turn
(LLaVA puts it in the first user message). A chat turn sent without an image of its own takes
the newest one of the exchanges kept (``conversation_image_index``), so that "now raise her left
arm" still sees the photo it follows up on; its exchange keeps it too, so the photo goes on
with the turns after it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from shared_protocol.protocol import DEFAULT_LIMITS, Turn, readable_text

from .wording import wrap

USER = "user"
ASSISTANT = "assistant"
ERROR = "error"
ROLES = (USER, ASSISTANT, ERROR)

DEFAULT_MAX_PAIRS = 8
DEFAULT_MAX_CHARS = 6_000


@dataclass(frozen=True)
class Message:
    role: str
    text: str
    attachment: str = ""  # e.g. "viewport image", "image: photo.png" (what was sent, named)
    poses: int = 0  # how many poses the reply carried
    image_kept: bool = False  # the image sent with it is kept (chat mode), for later turns


def clean_text(text: str, max_chars: int = DEFAULT_LIMITS.max_text_chars) -> str:
    """Text safe to keep in a Blender string property and to send back: control characters
    other than newline and tab removed (Blender strings end at a NUL), surrogates replaced,
    surrounding whitespace stripped, at most ``max_chars`` characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    kept = "".join(
        c for c in text if c in "\n\t" or not unicodedata.category(c).startswith(("Cc", "Cs"))
    )
    return kept.strip()[:max_chars]


def refuses_image(attachment: str, failure: str) -> bool:
    """Whether a failed turn's message is the service refusing the image it sent (named by
    its ``attachment``, or the request's field)."""
    return bool(attachment) and failure.startswith((attachment, "images"))


def exchange(
    prompt: str, reply: str, *, attachment: str = "", poses: int = 0, failed: bool = False
) -> tuple[Message, Message]:
    """The two messages one answered (or failed) prompt adds to the history."""
    return (
        Message(USER, clean_text(prompt), attachment=attachment),
        Message(ERROR if failed else ASSISTANT, clean_text(reply), poses=poses),
    )


def history_turns(
    messages: Sequence[Message],
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> tuple[Turn, ...]:
    """The conversation context for a chat request: the latest answered exchanges as
    user/assistant ``Turn`` pairs, oldest first.

    A user message followed by an assistant message is a pair; anything else (an error reply,
    a stray message) is skipped. From the newest pair backwards, pairs are kept while there are
    at most ``max_pairs`` of them (and the protocol's history limit) and their texts total at
    most ``max_chars`` characters: a pair too long for what is left is left out
    (``too_long_for_context`` counts them), and the older ones that fit still go (one long
    exchange would otherwise cut off all context). Pairs with an empty side carry nothing and
    are skipped.
    """
    kept, _ = _context_pairs(messages, max_pairs, max_chars)
    turns: list[Turn] = []
    for user, assistant in reversed(kept):
        turns += [Turn(USER, user), Turn(ASSISTANT, assistant)]
    return tuple(turns)


def too_long_for_context(
    messages: Sequence[Message],
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> int:
    """How many of the latest ``max_pairs`` answered exchanges ``history_turns`` leaves out
    for their length: the user is told, as a follow-up to one of them goes without it."""
    _, skipped = _context_pairs(messages, max_pairs, max_chars)
    return skipped


def _context_pairs(
    messages: Sequence[Message], max_pairs: int, max_chars: int
) -> tuple[list[tuple[str, str]], int]:
    """(the pairs sent, newest first; how many of the latest ``max_pairs`` were left out for
    their length)."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(messages):
        first = messages[i]
        second = messages[i + 1] if i + 1 < len(messages) else None
        if first.role == USER and second is not None and second.role == ASSISTANT:
            user, assistant = first.text.strip(), second.text.strip()
            if user and assistant:
                pairs.append((user, assistant))
            i += 2
        else:
            i += 1
    limit = _pair_limit(max_pairs)
    kept: list[tuple[str, str]] = []
    used = skipped = 0
    for age, (user, assistant) in enumerate(reversed(pairs)):
        if len(kept) >= limit:
            break
        size = len(user) + len(assistant)
        if used + size > max_chars:
            skipped += age < limit
            continue
        kept.append((user, assistant))
        used += size
    return kept, skipped


def conversation_image_index(
    messages: Sequence[Message], *, max_pairs: int = DEFAULT_MAX_PAIRS
) -> int | None:
    """The index of the user message whose image goes with a chat turn that has none of its
    own: the newest that sent one among the last ``max_pairs`` answered exchanges, whatever
    their length (``history_turns`` may leave a long or image-only one out), or a failed
    exchange after them (sending its prompt again, given back, is about its image); None when
    none of them sent one. Its ``image_kept`` says whether the image is kept: one that is not
    (sent in pose mode, refused, unpacked since) is not made up for with an older one, which
    the latest turns are not about."""
    limit = _pair_limit(max_pairs)
    pairs = 0
    i = len(messages) - 1
    while i > 0 and pairs < limit:
        if messages[i].role in (ASSISTANT, ERROR) and messages[i - 1].role == USER:
            if messages[i - 1].image_kept or messages[i - 1].attachment:
                return i - 1
            pairs += messages[i].role == ASSISTANT
            i -= 2
        else:
            i -= 1
    return None


def holds_context(messages: Sequence[Message], *, max_pairs: int = DEFAULT_MAX_PAIRS) -> bool:
    """Whether the latest ``messages`` of a history (a tail of it) hold all that a chat turn
    reads of it: more answered exchanges than ``max_pairs``, so that ``history_turns``,
    ``too_long_for_context`` and ``conversation_image_index`` stop within them."""
    answered = sum(
        first.role == USER and second.role == ASSISTANT
        for first, second in zip(messages, messages[1:], strict=False)
    )
    return answered > _pair_limit(max_pairs)


def _pair_limit(max_pairs: int) -> int:
    """``max_pairs``, within 0 and the protocol's history limit (in pairs)."""
    return min(max(0, max_pairs), DEFAULT_LIMITS.max_history_turns // 2)


def display_lines(messages: Sequence[Message], width: int, max_lines: int) -> list[tuple[str, str]]:
    """The last ``max_lines`` lines of the history for the panel, as (role, line); the first
    line of each message is prefixed with who said it. Only the messages those lines come from
    are wrapped: the panel draws this on every redraw, and a history only grows."""
    if max_lines <= 0:
        return []
    out: list[tuple[str, str]] = []
    for message in reversed(messages):
        if len(out) >= max_lines:
            break
        head = {USER: "You", ASSISTANT: "ChatPose", ERROR: "Failed"}.get(message.role, "?")
        extras = []
        if message.attachment:
            extras.append(message.attachment)
        if message.poses:
            extras.append(f"{message.poses} pose{'s' if message.poses != 1 else ''}")
        suffix = f" [{', '.join(extras)}]" if extras else ""
        text = f"{head}: {readable_text(message.text) or '(no text)'}{suffix}"
        out[:0] = [(message.role, line) for line in wrap(_tail(text, max_lines * width), width)]
    return out[-max_lines:]


def _tail(text: str, characters: int) -> str:
    """The end of a long message that fills more than ``characters`` columns, what the panel
    shows of it, so that a redraw does not wrap the whole of a pasted 8,000-character prompt:
    from a line's start, which wraps as the whole does; in one long paragraph, from a word's
    start (its lines may break elsewhere than the whole's would)."""
    if len(text) <= 8 * characters:
        return text
    tail = text[-2 * characters :]
    line = tail.find("\n")
    if 0 <= line < characters:
        return tail[line + 1 :]
    word = tail.find(" ")
    return tail[word + 1 :] if 0 <= word < characters else tail
