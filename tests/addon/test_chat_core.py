"""The chat panel's Blender-free logic: history -> turns, images, batch planning, placement,
request bookkeeping. No bpy in this file."""

from __future__ import annotations

import dataclasses
import struct
import textwrap
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest

from blender_addon.core import batch_plan, chat, placement, wording
from blender_addon.core.batch_plan import BatchRun, check_lines
from blender_addon.core.batch_record import BatchRecord, PendingLine
from blender_addon.core.dispatch import (
    BatchEnded,
    BatchLineFailed,
    BatchLineReady,
    BusyError,
    Dispatcher,
    PoseAnswered,
    PoseFailed,
    PoseJob,
    StatusAnswered,
    StatusFailed,
    StatusJob,
)
from blender_addon.core.images import (
    check_reference_image,
    encode_png,
    image_kind,
    png_size,
    read_reference_image,
)
from blender_addon.core.posing import continuous_quaternions
from blender_addon.core.session import (
    BatchFinished,
    BatchItem,
    PoseResult,
    RequestFailed,
    Service,
    StatusResult,
)
from shared_protocol.batch_requests import BUSY_RETRY_DELAYS_S
from shared_protocol.client import ClientCurveKeys
from shared_protocol.pose import Pose
from shared_protocol.protocol import (
    DEFAULT_LIMITS,
    JPEG_MAGIC,
    PNG_MAGIC,
    ErrorCode,
    PoseReply,
    StatusReply,
    Turn,
)

# --- chat history ---------------------------------------------------------------------------


def _history(*pairs, error_after=None):
    messages = []
    for i, (user, reply) in enumerate(pairs):
        messages += chat.exchange(user, reply, failed=i == error_after)
    return messages


def test_a_history_s_tail_that_holds_the_context_gives_what_the_whole_history_gives():
    # Send reads only the history's latest messages (all of 6,000 took 190 ms): each tail
    # `holds_context` accepts must give the turns, the count left out and the image as all do.
    rng = np.random.default_rng(3)
    messages = []
    for k in range(60):
        failed = rng.random() < 0.3  # failed exchanges between, which no pair counts
        attachment = "image: ref.png" if rng.random() < 0.15 else ""
        reply = "x" * 7000 if rng.random() < 0.1 else f"reply {k}"  # some too long
        messages += chat.exchange(f"prompt {k}", reply, attachment=attachment, failed=failed)
    messages.insert(17, chat.Message(chat.ASSISTANT, "a stray one"))
    for pairs in (0, 1, 3, 8):
        whole = (
            chat.history_turns(messages, max_pairs=pairs),
            chat.too_long_for_context(messages, max_pairs=pairs),
            chat.conversation_image_index(messages, max_pairs=pairs),
        )
        held = 0
        for length in range(1, len(messages) + 1):
            tail = messages[-length:]
            if not chat.holds_context(tail, max_pairs=pairs):
                continue
            held += 1
            index = chat.conversation_image_index(tail, max_pairs=pairs)
            shifted = None if index is None else index + len(messages) - length
            assert (
                chat.history_turns(tail, max_pairs=pairs),
                chat.too_long_for_context(tail, max_pairs=pairs),
                shifted,
            ) == whole, (pairs, length)
        assert held > 0
        assert not chat.holds_context(messages[len(messages) - 2 * pairs :], max_pairs=pairs)


def test_history_becomes_user_assistant_pairs_oldest_first():
    messages = _history(("wave", "Sure, <POSE>."), ("now sit", "Sitting."))
    assert chat.history_turns(messages) == (
        Turn("user", "wave"),
        Turn("assistant", "Sure, <POSE>."),
        Turn("user", "now sit"),
        Turn("assistant", "Sitting."),
    )


def test_failed_exchanges_and_stray_messages_are_not_sent():
    messages = _history(("a", "A"), ("b", "no service"), ("c", "C"), error_after=1)
    messages.insert(0, chat.Message(chat.ASSISTANT, "orphan"))
    messages.append(chat.Message(chat.USER, "unanswered"))
    turns = chat.history_turns(messages)
    assert [t.text for t in turns] == ["a", "A", "c", "C"]
    assert [t.role for t in turns] == ["user", "assistant"] * 2


def test_history_keeps_the_latest_pairs_within_the_limits():
    messages = _history(*[(f"q{i}", f"r{i}") for i in range(50)])
    turns = chat.history_turns(messages, max_pairs=3)
    assert [t.text for t in turns] == ["q47", "r47", "q48", "r48", "q49", "r49"]
    # The protocol allows 64 turns: never more than 32 pairs, whatever is asked.
    assert len(chat.history_turns(messages, max_pairs=1000, max_chars=10**9)) == 64
    long = _history(("x" * 3000, "y" * 2000), ("short", "reply"))
    assert [t.text for t in chat.history_turns(long, max_chars=4000)] == ["short", "reply"]
    # The newest exchange too long: the ones before it still go.
    latest_long = _history(("raise the left arm", "ok"), ("x" * 5000, "y" * 1200))
    turns = chat.history_turns(latest_long, max_chars=6000)
    assert [t.text for t in turns] == ["raise the left arm", "ok"]
    # ... and the user is told of it (a follow-up to it goes without it).
    assert chat.too_long_for_context(latest_long, max_chars=6000) == 1
    assert chat.too_long_for_context(long, max_chars=4000) == 1  # an older one, as latest
    assert chat.too_long_for_context(long, max_pairs=1, max_chars=4000) == 0  # beyond Chat Context
    # Only the latest Chat Context exchanges count: the newest and the one before it too long,
    # one exchange of context (the oldest, which fits, goes): 1, not 2.
    two_long = _history(("short", "reply"), ("a" * 5000, "b"), ("x" * 5000, "y"))
    assert chat.too_long_for_context(two_long, max_pairs=1, max_chars=4000) == 1
    assert chat.too_long_for_context(latest_long, max_pairs=0) == 0
    assert chat.history_turns(messages, max_pairs=0) == ()
    # A pair exactly as long as the limit fits; an answer with no text carries nothing.
    assert len(chat.history_turns(_history(("abc", "def")), max_chars=6)) == 2
    assert chat.history_turns(_history(("abc", "def")), max_chars=5) == ()
    assert chat.history_turns([chat.Message("user", "hi"), chat.Message("assistant", "")]) == ()


def test_a_chat_turn_without_an_image_takes_the_newest_one_of_the_exchanges_kept():
    def photo(prompt, reply="ok"):
        user, answer = chat.exchange(prompt, reply, attachment="image: photo.png")
        return [dataclasses.replace(user, image_kept=True), answer]

    messages = [*photo(""), *_history(("now raise her left arm", "Sure, <POSE>."))]
    assert chat.conversation_image_index(messages) == 0  # an image-only exchange included
    messages = [*photo("first"), *photo("second"), *_history(("wave", "ok"))]
    assert chat.conversation_image_index(messages) == 2  # the newest
    assert chat.conversation_image_index(messages, max_pairs=1) is None  # beyond the kept exchanges
    assert chat.conversation_image_index(messages, max_pairs=2) == 2
    # The newest image not kept (sent in pose mode): that one, not an older one.
    not_kept = [*photo("first"), *chat.exchange("like him", "ok", attachment="image: b.png")]
    assert chat.conversation_image_index(not_kept) == 2 and not not_kept[2].image_kept
    # A failed exchange's image (its prompt given back, sent again): that one, kept or not.
    failed = chat.exchange("copy this", "no service", attachment="viewport image", failed=True)
    assert chat.conversation_image_index([*messages, *failed]) == 6 and not failed[0].image_kept
    unanswered = dataclasses.replace(failed[0], image_kept=True)
    assert chat.conversation_image_index([*messages, unanswered, failed[1]]) == 6
    text_only = chat.exchange("sit", "no service", failed=True)  # passed over, not counted
    assert chat.conversation_image_index([*messages, *text_only], max_pairs=2) == 2
    assert chat.conversation_image_index([unanswered]) is None  # no answer yet
    assert chat.conversation_image_index(_history(("a", "A"), ("b", "B"))) is None


def test_clean_text_keeps_blender_strings_safe():
    assert chat.clean_text("  a\x00b\x07c\nd\te\ud800  ") == "abc\nd\te?"
    assert len(chat.clean_text("x" * 70_000)) == DEFAULT_LIMITS.max_text_chars


def test_display_lines_wrap_and_keep_the_end():
    messages = [
        chat.Message(chat.USER, "make him wave", attachment="viewport image"),
        chat.Message(chat.ASSISTANT, "word " * 30, poses=2),
    ]
    lines = chat.display_lines(messages, width=30, max_lines=100)
    assert lines[0] == ("user", "You: make him wave [viewport")
    assert all(len(line) <= 30 for _, line in lines)
    assert lines[-1][1].endswith("[2 poses]")
    assert chat.display_lines(messages, 30, 2) == lines[-2:]
    assert chat.display_lines(messages, 30, 0) == []
    # The model's pose tokens, kept as markers for the history it is sent, read as poses.
    answer = chat.Message(chat.ASSISTANT, "She waves <POSE>, he bows <POSE>.", poses=2)
    (line,) = chat.display_lines([answer], width=80, max_lines=5)
    assert line[1] == "ChatPose: She waves [pose 1], he bows [pose 2]. [2 poses]"


def test_wide_characters_take_two_columns_of_a_line():
    # Blender's font draws Chinese, Japanese and emoji about twice as wide as Latin letters:
    # counted as one, a line of them ran past the panel's edge and was clipped.
    def columns(line: str) -> int:
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)

    japanese = "ChatPose: 疲れた人はどのように立ちますか？肩を落として、頭を少し下げて立ちます。"
    lines = wording.wrap(japanese, 20)
    assert "".join(lines) == japanese  # broken between characters: nothing lost or added
    assert lines[0] == "ChatPose: 疲れた人は" and all(columns(line) <= 20 for line in lines)
    mixed = wording.wrap("You: make it more dramatic 🎭🔥 please, with both arms raised 🙌", 20)
    assert mixed == ["You: make it more", "dramatic 🎭🔥", "please, with both", "arms raised 🙌"]
    assert wording.wrap("no wide characters here at all", 12) == textwrap.wrap(
        "no wide characters here at all", 12
    )


def test_a_long_message_is_cut_to_a_few_lines_for_the_panel_and_a_popup():
    # A model's crash text of 4,000 characters filled the panel and a popup (50 lines).
    short = "Not answered, 'wave': the service stopped"
    assert wording.message_lines(short, 80) == [short]
    crash = "the model failed: RuntimeError: " + "a frame of the traceback " * 160
    lines = wording.message_lines(crash, 80)
    assert len(lines) == wording.MAX_MESSAGE_LINES and lines[:-1] == wording.wrap(crash, 80)[:7]
    assert lines[-1] == "\u2026 (cut; in full in the console)" == wording.CUT_MARK
    assert len(wording.message_lines(crash, 20)) == wording.MAX_MESSAGE_LINES + 1  # mark wraps
    exact = " ".join(wording.wrap(crash, 80)[: wording.MAX_MESSAGE_LINES])  # fits: not cut
    assert wording.message_lines(exact, 80) == wording.wrap(exact, 80)


def test_lines_break_between_characters_as_the_reader_sees_them():
    # A family emoji is four joined by zero-width joiners, a flag two regional letters, an
    # "é" typed on a Mac a letter and its accent: a line started with a bare joiner or accent.
    family, flags, accented = "👨\u200d👩\u200d👧\u200d👦", "🇯🇵🇫🇷", "cafe\u0301"
    lines = wording.wrap(f"家族 {family} " * 4, 10)
    assert lines == [f"家族 {family} 家", f"族 {family}"] * 2
    assert wording.wrap(f"abcdefg{flags} and more", 8) == ["abcdefg", flags, "and more"]
    assert wording.wrap(f"{accented} " * 4, 8) == [accented] * 4


def test_a_preview_shows_text_as_written_and_cuts_between_characters():
    # repr() showed a Persian prompt's non-joiners and a French one's no-break spaces as
    # escapes ("\u200c", "\xa0"), and the 60-character cut could halve a flag.
    persian, french = "می\u200cخواهم دست\u200cها را بالا ببرم", "«\u00a0lève le bras\u00a0»"
    assert wording.preview(persian) == f"'{persian}'" and wording.preview(french) == f"'{french}'"
    assert wording.preview("x" * 58 + "🇯🇵🇫🇷") == "'" + "x" * 58 + "\u2026'"
    assert wording.preview("x" * 57 + "🇯🇵🇫🇷") == "'" + "x" * 57 + "🇯🇵\u2026'"
    assert wording.preview("wave\nthen\x00bow") == "'wave\\nthen\\x00bow'"  # one line, as repr
    assert wording.preview("abc\u202edef\ud800") == "'abc\\u202edef\\ud800'"  # no reordering
    # Names and paths too: repr doubled a Windows path's backslashes.
    assert wording.quoted("C:\\Program Files\\python.exe") == "'C:\\Program Files\\python.exe'"
    assert wording.quoted("Ελένη 👩\u200d🦰") == "'Ελένη 👩\u200d🦰'"
    assert (
        wording.preview("it's") == '"it\'s"' and wording.preview("x" * 60) == "'" + "x" * 60 + "'"
    )


def test_display_lines_wrap_only_the_end_of_a_long_message_they_show(monkeypatch):
    pasted = " ".join(f"word{i}" for i in range(8000))  # 8,000 words, 70,000 characters
    history = [chat.Message(chat.USER, pasted)]
    wrapped = []
    wrap = wording.wrap
    monkeypatch.setattr(chat, "wrap", lambda text, width: wrapped.append(text) or wrap(text, width))
    lines = [line for _, line in chat.display_lines(history, width=30, max_lines=12)]
    assert len(wrapped[0]) <= 2 * 12 * 30  # not the 70,000 characters
    assert len(lines) == 12 and all(len(line) <= 30 for line in lines)
    assert pasted.endswith(" " + " ".join(lines))  # its end, whole words


def test_display_lines_wrap_only_the_messages_they_show(monkeypatch):
    history = [chat.Message(chat.USER, f"pose {i} " + "word " * 40) for i in range(5_000)]
    everything = chat.display_lines(history, width=30, max_lines=10**9)
    wrapped = []
    wrap = wording.wrap
    monkeypatch.setattr(chat, "wrap", lambda text, width: wrapped.append(text) or wrap(text, 30))
    assert chat.display_lines(history, width=30, max_lines=12) == everything[-12:]
    assert len(wrapped) == 2  # the last two messages hold the 12 lines shown


# --- images ---------------------------------------------------------------------------------


def _decode_png(data: bytes) -> np.ndarray:
    """A minimal reader for what encode_png writes (filter 0, one IDAT)."""
    width, height = png_size(data)
    color_type = data[25]
    channels = 4 if color_type == 6 else 3
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, -1)
    assert np.all(rows[:, 0] == 0)
    return rows[:, 1:].reshape(height, width, channels)


def test_encode_png_round_trips_and_flips():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    data = encode_png(pixels)
    assert image_kind(data) == "png" and png_size(data) == (5, 7)
    np.testing.assert_array_equal(_decode_png(data), pixels)
    np.testing.assert_array_equal(_decode_png(encode_png(pixels, flip_vertical=True)), pixels[::-1])
    np.testing.assert_array_equal(_decode_png(encode_png(pixels[..., :3])), pixels[..., :3])
    with pytest.raises(ValueError, match="expected shape"):
        encode_png(np.zeros((4, 4)))


def test_encode_png_is_readable_by_pillow():
    import io

    from PIL import Image as image_module

    pixels = np.zeros((10, 20, 4), np.uint8)
    pixels[..., 0] = 200
    pixels[..., 3] = 255
    with image_module.open(io.BytesIO(encode_png(pixels))) as image:
        assert image.size == (20, 10) and image.getpixel((3, 3))[:3] == (200, 0, 0)


def test_a_picture_of_only_background_shows_nothing():
    from blender_addon.core.images import shows_nothing

    flat = np.full((60, 80, 4), 51)
    gradient = np.broadcast_to(np.linspace(40, 200, 60)[:, None, None], (60, 80, 3))  # 3 a row
    assert shows_nothing(flat) and shows_nothing(gradient)
    figure = flat.copy()
    figure[20:50, 38:42, :3] = 200  # one limb, a few pixels wide
    assert not shows_nothing(figure)
    faint = flat.copy()
    faint[30, 40, 2] = 51 + 9  # one pixel, one channel, just past the tolerance
    assert not shows_nothing(faint) and shows_nothing(faint, tolerance=9)


def test_reference_images_are_checked_by_their_bytes(tmp_path):
    png = encode_png(np.zeros((2, 2, 3)))
    assert check_reference_image(png) == "png"
    assert check_reference_image(JPEG_MAGIC + b"\xe0rest") == "jpeg"
    # Named by what it is, not by its first bytes in hex ("47 49 46 38"), which told an
    # animator nothing.
    with pytest.raises(ValueError, match="^anim.gif is a GIF picture: save it as PNG or JPEG"):
        check_reference_image(b"GIF89a..", "anim.gif")
    phone = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00"
    with pytest.raises(ValueError, match="^IMG_0001.HEIC is a HEIC picture"):
        check_reference_image(phone, "IMG_0001.HEIC")
    webp = b"RIFF\x10\x00\x00\x00WEBPVP8 "
    with pytest.raises(ValueError, match="is a WebP picture"):
        check_reference_image(webp, "ref.webp")
    with pytest.raises(ValueError, match="is an AVIF picture"):
        check_reference_image(b"\x00\x00\x00\x1cftypavis\x00\x00", "clip.avif")
    bmp = b"BM" + bytes(12) + (40).to_bytes(4, "little")
    with pytest.raises(ValueError, match="is a BMP picture"):
        check_reference_image(bmp, "scan.bmp")
    with pytest.raises(ValueError, match="notes.png is not a PNG or JPEG picture"):
        check_reference_image(b"BMX tricks, and more notes", "notes.png")  # "BM" alone
    mp4 = b"\x00\x00\x00\x18ftypisom" + bytes(40)  # ISO media, but no picture's brand
    with pytest.raises(ValueError, match="clip.mp4 is not a PNG or JPEG picture"):
        check_reference_image(mp4, "clip.mp4")
    for tiff in (b"II*\x00", b"MM\x00*"):  # either byte order
        with pytest.raises(ValueError, match="scan.tif is a TIFF picture"):
            check_reference_image(tiff + bytes(40), "scan.tif")
    with pytest.raises(ValueError, match="is empty"):
        check_reference_image(b"")
    with pytest.raises(ValueError, match="up to 16 MiB"):
        check_reference_image(PNG_MAGIC + bytes(DEFAULT_LIMITS.max_image_bytes))
    (tmp_path / "fake.png").write_text("not really a png")
    with pytest.raises(ValueError, match="fake.png is not a PNG or JPEG"):
        read_reference_image(tmp_path / "fake.png")
    with pytest.raises(ValueError, match="no such file"):
        read_reference_image(tmp_path / "missing.jpg")
    (tmp_path / "ok.png").write_bytes(png)
    assert read_reference_image(tmp_path / "ok.png") == png
    with open(tmp_path / "scan.png", "wb") as big:  # its size, not the 16 MiB read of it
        big.write(PNG_MAGIC)
        big.truncate(45 * 2**20)
    with pytest.raises(ValueError, match=r"scan\.png is 45\.0 MiB; the service takes images"):
        read_reference_image(tmp_path / "scan.png")


def test_a_reference_image_the_service_would_refuse_for_its_size_is_named_before_sending():
    # Sent, it came back as bad_image after the round trip, and the prompt was gone.
    import io
    import struct

    from PIL import Image as image_module

    from blender_addon.core.images import header_size

    def jpeg(size, **options):
        buffer = io.BytesIO()
        image_module.new("RGB", size).save(buffer, "JPEG", **options)
        return buffer.getvalue()

    assert header_size(jpeg((321, 123), progressive=True, exif=b"Exif\0\0MM")) == (321, 123)
    stray = jpeg((64, 48))
    stray = stray[:20] + b"\x00\x17" + stray[20:]  # bytes between segments: Pillow skips them
    assert header_size(stray) == (64, 48)
    marker = stray.index(b"\xff\xdb")
    assert header_size(stray[:marker] + b"\xff" * 1000 + stray[marker:]) == (64, 48)  # fill
    assert header_size(b"\xff\xd8" + b"\xff" * 10_000) is None
    with pytest.raises(
        ValueError, match=r"pano\.jpg is 9600 x 400 pixels, its long side more than 20"
    ):
        check_reference_image(jpeg((9600, 400)), "pano.jpg")
    png = encode_png(np.zeros((2, 2, 3)))
    huge = png[:16] + struct.pack(">II", 12_000, 8_400) + png[24:]  # a 0.1 MB picture of 100 MP
    with pytest.raises(ValueError, match=r"12000 x 8400 pixels; the service decodes at most"):
        check_reference_image(huge, "huge.png")
    # Exactly 20 times as long as it is wide: the service takes it, so the add-on sends it.
    assert check_reference_image(png[:16] + struct.pack(">II", 2000, 100) + png[24:]) == "png"
    with pytest.raises(ValueError, match=r"2001 x 100 pixels, its long side more than 20"):
        check_reference_image(png[:16] + struct.pack(">II", 2001, 100) + png[24:])


# --- batch planning -------------------------------------------------------------------------


def _pending(n: int, start: int = 1, step: int = 1) -> list[PendingLine]:
    return BatchRecord().pending([f"prompt {i}" for i in range(n)], start, step)


def test_a_run_walks_its_chunks_and_counts_by_line():
    run = BatchRun("SMPL", "text 'moves'", _pending(300), total_lines=300)
    first = run.next_prompts()
    assert len(first) == 256 and first[0] == "prompt 0" and run.requests == 1
    assert run.line_for(3) == PendingLine(3, "prompt 3", 4) and run.line_for(256) is None
    for i in range(256):
        run.item_keyed(run.line_for(i))
    assert run.request_finished() is True
    second = run.next_prompts()
    assert second == [f"prompt {i}" for i in range(256, 300)]
    run.item_keyed(PendingLine(5, "prompt 5", 6))  # a late report for the first chunk counts once
    run.item_failed(run.line_for(0), "model_error: no pose")
    for i in range(1, 44):
        run.item_keyed(run.line_for(i))
    assert run.request_finished() is False and run.state == batch_plan.FINISHED
    assert (run.keyed, run.remaining, len(run.failed_lines)) == (299, 1, 1)
    summary = run.summary()
    assert "299 lines keyed on SMPL; 1 of 300 still to key" in summary
    assert "1 failed (prompt 257 at frame 257): model_error: no pose." in summary
    assert "again" in summary


def test_recheck_forgets_keyed_lines_the_record_no_longer_holds():
    run = BatchRun("SMPL", "text 'moves'", _pending(12), total_lines=12)
    run.next_prompts()
    for i in range(12):
        run.item_keyed(run.line_for(i))
    assert run.request_finished() is False and run.remaining == 0
    assert run.recheck(lambda line: line.line >= 4) == 4  # an undo took lines 0-3 back
    assert (run.keyed, run.remaining) == (8, 4)
    assert "8 lines keyed on SMPL; 4 of 12 still to key" in run.summary()
    assert run.recheck(lambda line: True) == 0


def test_recheck_counts_lines_of_earlier_runs_the_record_no_longer_holds_still_to_key():
    lines = _pending(12)
    run = BatchRun("SMPL", "text 'moves'", lines[6:], total_lines=12, keyed_before=lines[:6])
    assert run.already_keyed == 6
    run.recheck(lambda line: line.line >= 2)  # an undo past the run that keyed lines 0 and 1
    assert (run.already_keyed, run.remaining) == (4, 8)
    assert "2 lines keyed before this run taken back by an undo." in run.summary()
    run.recheck(lambda line: True)  # a redo brings them back
    assert (run.already_keyed, run.remaining) == (6, 6)
    assert "before this run" not in run.summary()


def test_lines_an_undo_takes_back_are_keyed_again_from_their_answers_and_a_redo_counts_them():
    run = BatchRun("SMPL", "text 'moves'", _pending(12), total_lines=12)
    run.next_prompts()
    poses = [Pose(np.full((24, 3), i / 100)) for i in range(12)]
    for i in range(6):
        run.item_answered(run.line_for(i), poses[i])
        run.item_keyed(run.line_for(i))
    assert run.recheck(lambda line: line.line < 2) == 4  # an undo took lines 2-5 back
    assert (run.keyed, run.taken_back, run.remaining) == (2, 4, 10)
    assert "2/12 lines keyed on SMPL, 4 taken back by an undo" in run.status_text()
    assert run.recheck(lambda line: line.line < 3) == 0  # a redo brought line 2 back
    assert (run.keyed, run.taken_back) == (3, 3)
    again = run.lines_to_key_again(2)  # first lines first, each with its answer
    assert [(line.line, line.frame) for line, _ in again] == [(3, 4), (4, 5)]
    assert [pose for _, pose in again] == poses[3:5]
    assert (run.keyed, run.taken_back) == (3, 1)  # being keyed: neither, until reported
    for line, _ in again:
        run.item_keyed(line)
    (last, _), *more = run.lines_to_key_again(2)
    assert not more and run.lines_to_key_again(2) == []
    run.item_failed(last, "could not key it (locked)")
    assert (run.keyed, run.taken_back, len(run.failed_lines)) == (5, 0, 1)


def test_a_run_s_summary_says_how_many_lines_an_undo_took_back():
    run = BatchRun("SMPL", "text 'moves'", _pending(4), total_lines=4)
    run.next_prompts()
    for i in range(4):
        run.item_answered(run.line_for(i), Pose(np.zeros((24, 3))))
        run.item_keyed(run.line_for(i))
    assert run.request_finished() is False and "all 4 lines keyed" in run.summary()
    run.recheck(lambda line: line.line == 0)  # the run's own step undone, but for line 0
    assert run.summary() == (
        "Batch from text 'moves': 1 line keyed on SMPL; 3 of 4 still to key. 3 lines it keyed "
        "were taken back by an undo. Run Batch Keyframe again to key the rest (nothing is keyed "
        "twice)."
    )
    run.recheck(lambda line: line.line != 3)
    assert "1 line it keyed was taken back by an undo." in run.summary()
    run.recheck(lambda line: True)  # redone
    assert "done: 4 lines keyed on SMPL; all 4 lines keyed" in run.summary()


def test_cancel_between_chunks_sends_nothing_more():
    run = BatchRun("SMPL", "f.txt", _pending(300), total_lines=310)  # 10 keyed before
    assert run.already_keyed == 10
    run.next_prompts()
    run.item_keyed(run.line_for(0))
    run.cancel()
    assert run.state == batch_plan.CANCELLING and "cancelling" in run.status_text()
    assert run.next_prompts() is None
    assert run.request_finished() is False and run.state == batch_plan.CANCELLED
    assert run.done == 11 and "cancelled" in run.summary()


def test_a_failed_run_says_why_and_what_is_left():
    run = BatchRun("SMPL", "text 't'", _pending(12), total_lines=12)
    run.next_prompts()
    for i in range(5):
        run.item_keyed(run.line_for(i))
    run.fail("the service at tcp://127.0.0.1:5 went away during the request")
    assert run.ended and run.state == batch_plan.FAILED
    assert run.summary().startswith("Batch from text 't' stopped: the service at")
    assert "5 lines keyed on SMPL; 7 of 12 still to key" in run.summary()


@pytest.mark.parametrize("service_says", ["finished", "cancelled", "already finished"])
def test_a_run_the_add_on_stops_ends_failed_whatever_the_service_says(service_says):
    run = BatchRun("SMPL", "text 't'", _pending(4), total_lines=4, chunk_size=2)
    run.next_prompts()
    run.item_keyed(run.line_for(0))
    second = run.line_for(1)
    if service_says == "already finished":  # its last lines were still being keyed
        run.next_prompts()
        assert run.request_finished() is False and run.state == batch_plan.FINISHED
    reason = "the armature 'SMPL' is gone"
    run.item_failed(second, reason)
    run.stop(reason)
    if service_says == "finished":
        assert run.request_finished() is False
    elif service_says == "cancelled":
        run.request_cancelled()
    assert run.state == batch_plan.FAILED and run.next_prompts() is None
    assert run.summary().startswith(f"Batch from text 't' stopped: {reason}.")
    # The reason said once: its line was answered, and not keyed for it (no service failure).
    assert "1 answered but not keyed (prompt 2 at frame 2)." in run.summary()


def test_failures_are_counted_shown_five_at_most_and_dropped_once_keyed():
    run = BatchRun("SMPL", "t", _pending(8), total_lines=8)
    run.next_prompts()
    for i in range(7):
        run.item_failed(run.line_for(i), "no pose")
    assert run.status_text().endswith("0/8 lines keyed on SMPL, 7 failed")
    run.item_keyed(run.line_for(0))  # sent again by hand, say, and keyed: no longer failed
    assert "1/8 lines keyed on SMPL, 6 failed" in run.status_text()
    run.stop("the armature 'SMPL' is gone")
    run.stop("the service went away")  # the first reason is the one the run ended for
    assert run.request_finished() is False
    summary = run.summary()
    assert summary.startswith("Batch from t stopped: the armature 'SMPL' is gone.")
    shown = ", ".join(f"prompt {i} at frame {i}" for i in range(2, 7))
    assert f"6 failed ({shown} ...): no pose." in summary
    five = BatchRun("SMPL", "t", _pending(5), total_lines=5)
    five.next_prompts()
    for i in range(5):
        five.item_failed(five.line_for(i), "no pose")
    shown = ", ".join(f"prompt {i} at frame {i}" for i in range(1, 6))
    assert f"5 failed ({shown}): no pose." in five.summary()  # all of them shown: no "..."


def test_a_run_with_nothing_pending_is_done_at_once():
    run = BatchRun("SMPL", "t", [], total_lines=4)
    assert run.next_prompts() is None and run.request_finished() is False
    assert run.state == batch_plan.FINISHED and "all 4 lines keyed" in run.summary()


def test_check_lines_names_the_line_of_a_prompt_that_is_too_long():
    check_lines([(1, "ok"), (2, "x" * DEFAULT_LIMITS.max_prompt_chars)])
    with pytest.raises(ValueError, match="line 5 has 8001 characters"):
        check_lines([(1, "ok"), (5, "x" * 8001)])


def test_failed_lines_are_named_by_their_line_in_the_text_and_their_frame():
    pending = _pending(3, start=1, step=10)
    run = BatchRun("SMPL", "text 't'", pending, total_lines=3, line_numbers=[2, 5, 6])
    run.next_prompts()
    run.item_keyed(run.line_for(0))
    run.item_failed(run.line_for(1), "the model exploded")
    run.item_failed(run.line_for(2), "the model exploded")
    assert "2 failed (line 5 at frame 11, line 6 at frame 21): the model exploded." in run.summary()
    plain = BatchRun("SMPL", "t", _pending(2), total_lines=2)
    plain.next_prompts()
    plain.item_failed(plain.line_for(1), "no")
    assert "1 failed (prompt 2 at frame 2): no." in plain.summary()


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        deepest = max(deepest, depth)
    return deepest


def test_a_summary_holds_no_brackets_in_brackets():
    # "2 failed (line 5 (frame 11), line 6 (frame 21): no answer ... (the timeout ...))" and
    # "... the rest (edit the lines ... first: ...) (nothing is keyed twice)" were hard to read.
    timeout = "no answer from tcp://127.0.0.1:5 within 30 s (the timeout is set in preferences)"
    run = BatchRun("SMPL", "text 't'", _pending(3), total_lines=3, line_numbers=[2, 5, 6])
    run.next_prompts()
    run.item_failed(run.line_for(0), timeout, ErrorCode.TIMEOUT)
    run.item_failed(run.line_for(1), timeout, ErrorCode.TIMEOUT)
    run.item_failed(run.line_for(2), "this model knows none of its words", ErrorCode.BAD_SCHEMA)
    run.request_finished()
    summary = run.summary()
    assert _bracket_depth(summary) == 1, summary
    assert summary == (  # each line under its own reason, not all under the first's
        "Batch from text 't': 0 lines keyed on SMPL; 3 of 3 still to key. 2 failed (line 2 at "
        f"frame 1, line 5 at frame 2): {timeout}. 1 failed (line 6 at frame 3): this model "
        "knows none of its words. Edit the lines the service refused, then run Batch Keyframe "
        "again to key the rest (nothing is keyed twice)."
    )


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.EMPTY_PROMPT,
        ErrorCode.TOO_LARGE,
        ErrorCode.UNSUPPORTED_INPUT,  # a prompt the model knows no word of
        ErrorCode.BAD_SCHEMA,
    ],
)
def test_each_refusal_of_a_line_s_own_text_asks_for_an_edit(code):
    run = BatchRun("SMPL", "text 't'", _pending(1), total_lines=1, line_numbers=[1])
    run.next_prompts()
    run.item_failed(run.line_for(0), "refused", code)
    run.request_finished()
    assert "Edit the line the service refused, then run Batch Keyframe" in run.summary()


def test_lines_refused_for_their_text_are_to_be_edited_not_only_run_again():
    # "Run Batch Keyframe again" sent the same line, and it was refused the same way.
    unknown = "prompt: this model knows none of its words"
    run = BatchRun("SMPL", "text 't'", _pending(3), total_lines=3, line_numbers=[1, 2, 3])
    run.next_prompts()
    run.item_keyed(run.line_for(0))
    run.item_failed(run.line_for(1), unknown, ErrorCode.UNSUPPORTED_INPUT)
    run.item_failed(run.line_for(2), "out of memory", ErrorCode.MODEL_ERROR)
    run.request_finished()
    # Not "done.": lines are still to key.
    assert run.summary().startswith("Batch from text 't': 1 line keyed on SMPL; 2 of 3 still")
    assert run.summary().endswith(
        "Edit the lines the service refused, then run Batch Keyframe again to key the rest "
        "(nothing is keyed twice)."
    )
    run.item_failed(run.line_for(2), unknown, ErrorCode.UNSUPPORTED_INPUT)  # only those left
    assert run.summary().endswith(
        "Edit the lines the service refused, then run Batch Keyframe again to key them "
        "(nothing is keyed twice)."
    )
    run.item_keyed(run.line_for(2))
    assert run.summary().endswith("Edit the line the service refused, then run Batch Keyframe "
                                  "again to key it (nothing is keyed twice).")  # fmt: skip
    cut = BatchRun("SMPL", "t", _pending(2), total_lines=2)
    cut.next_prompts()
    cut.item_failed(cut.line_for(0), "the service went away", ErrorCode.UNREACHABLE)
    cut.request_cancelled()
    assert cut.summary().endswith(
        "Run Batch Keyframe again to key the rest (nothing is keyed twice)."
    )


# --- placement ------------------------------------------------------------------------------


def test_people_get_names_and_places_beside_the_target():
    assert [placement.extra_person_name("SMPL", k) for k in (1, 2)] == [
        "SMPL.person2",
        "SMPL.person3",
    ]
    assert placement.person_location((1.0, 2.0, 0.9), 2) == (3.0, 2.0, 0.9)
    assert placement.person_location((0, 0, 0), 1, spacing=1.5) == (1.5, 0.0, 0.0)
    with pytest.raises(ValueError):
        placement.extra_person_name("SMPL", 0)
    long_name = "L" * 58 + "é"  # 60 bytes
    names = [placement.extra_person_name(long_name, k) for k in (1, 2, 12)]
    assert all(len(n.encode()) <= 63 for n in names) and len(set(names)) == 3
    assert names[0].endswith(".person2") and names[2].endswith(".person13")
    # Two long names alike in their first 55 bytes: each target keeps a person of its own.
    pair = "Shot010_CharacterRig_MainDancer_Performance_Take03_Pair_{}_v1"
    a, b = (placement.extra_person_name(pair.format(side), 1) for side in "AB")
    assert a != b and len(a.encode()) == len(b.encode()) == 63
    assert a == placement.extra_person_name(pair.format("A"), 1)  # found again by it
    assert placement.suffixed_name("x" * 55, ".person2") == "x" * 55 + ".person2"  # 63 bytes


def test_continuous_quaternions_follow_the_previous_sign():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(50, 24, 4))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    start = rng.normal(size=(24, 4))
    out = continuous_quaternions(q, start)
    assert np.all(np.abs(np.abs(out) - np.abs(q)) < 1e-12)
    assert np.all(np.sum(out[0] * start, axis=-1) >= 0)
    assert np.all(np.sum(out[1:] * out[:-1], axis=-1) >= 0)


# --- the dispatcher ---------------------------------------------------------------------------


class FakeSession:
    """Session's interface; the test queues the events tick() returns."""

    def __init__(self, address: str, timeout_s: float, curve=None):
        self.address, self.timeout_s, self.curve = address, timeout_s, curve
        self.sent: list[tuple] = []
        self.cancelled: list[str] = []
        self.events: list = []
        self.closed = False
        self._ids = 0
        self._open: set[str] = set()
        self.holding = False
        self.held_ends: list[str] = []  # "released", or the code held requests failed with

    def hold(self):
        self.holding = True

    def release(self):
        self.holding = False
        self.held_ends.append("released")

    def fail_held(self, code, message):
        self.holding = False
        self.held_ends.append(code)

    def _id(self, *request) -> str:
        self._ids += 1
        request_id = f"r{self._ids}"
        self.sent.append((request_id, *request))
        self._open.add(request_id)
        return request_id

    @property
    def busy(self) -> bool:
        return bool(self._open)

    def request_pose(self, prompt, images=(), history=(), mode="pose"):
        return self._id("pose", prompt, tuple(images), tuple(history), mode)

    def request_batch(self, prompts):
        return self._id("batch", list(prompts))

    def request_status(self):
        return self._id("status")

    def cancel(self, request_id):
        self.cancelled.append(request_id)

    def tick(self):
        events, self.events = self.events, []
        for e in events:
            if not isinstance(e, BatchItem) and not (isinstance(e, RequestFailed) and not e.final):
                self._open.discard(e.request_id)
        return events

    def close(self):
        self.closed = True


POSE = Pose(np.zeros((24, 3)))
JOB = PoseJob("wave", "pose", "Scene", "SMPL", frame=3)
STATUS = StatusReply("s", "tiny", "cpu", "float32", 0, 1.0, "0.1.0", True, 1)


@pytest.fixture
def made():
    return []


@pytest.fixture
def now():
    """The dispatcher's clock, which a test moves on: [seconds]."""
    return [0.0]


@pytest.fixture
def dispatcher(made, now):
    def make(address, timeout_s, curve=None):
        made.append(FakeSession(address, timeout_s, curve))
        return made[-1]

    return Dispatcher(make, clock=lambda: now[0])


def test_pose_and_status_answers_come_back_with_their_jobs(dispatcher, made):
    history = (Turn("user", "a"), Turn("assistant", "b"))
    pose_id = dispatcher.send_pose(Service("tcp://127.0.0.1:5555", 30.0), JOB, [b"img"], history)
    status_id = dispatcher.request_status(Service("tcp://127.0.0.1:5555", 30.0), probe=True)
    [session] = made
    assert session.sent[0] == (pose_id, "pose", "wave", (b"img",), history, "pose")
    assert dispatcher.pending_jobs() == [JOB] and dispatcher.status_in_flight(probe=True)
    session.events = [
        PoseResult(pose_id, PoseReply(pose_id, "Sure.", (POSE, POSE))),
        StatusResult(status_id, STATUS),
        PoseResult("someone-else", PoseReply("someone-else", "x")),
    ]
    outcomes = dispatcher.tick()
    assert outcomes[0] == PoseAnswered(JOB, PoseReply(pose_id, "Sure.", (POSE, POSE)))
    assert isinstance(outcomes[1], StatusAnswered) and outcomes[1].job.probe
    assert len(outcomes) == 2 and dispatcher.pending_jobs() == []


def test_requests_to_a_starting_service_are_held_by_its_session_until_it_is_ready(dispatcher, made):
    starting, other = Service("tcp://127.0.0.1:5555", 30.0), Service("tcp://127.0.0.1:6", 30.0)
    dispatcher.hold_for(starting.address)  # before any session: the one made for it holds
    dispatcher.send_pose(starting, JOB)
    assert made[0].holding and dispatcher.holding
    dispatcher.release_held()
    assert made[0].held_ends == ["released"] and not dispatcher.holding
    made[0].events = [PoseResult(made[0].sent[0][0], PoseReply("r", "", (POSE,)))]
    dispatcher.tick()
    dispatcher.hold_for(starting.address)  # a session already there holds from now on
    assert made[0].holding
    dispatcher.fail_held(ErrorCode.UNREACHABLE, "it did not start")
    assert made[0].held_ends == ["released", ErrorCode.UNREACHABLE]
    dispatcher.hold_for(starting.address)
    dispatcher.send_pose(other, JOB)  # a session for another address holds nothing
    assert not made[1].holding and not dispatcher.holding
    dispatcher.release_held()  # and has nothing to release
    assert made[1].held_ends == []


def test_cancel_all_counts_the_user_s_requests_not_the_add_on_s_probes(dispatcher, made):
    # A file opened while the local service loads: no "1 request(s) cancelled" the user never made.
    service = Service("tcp://127.0.0.1:5555", 30.0)
    dispatcher.request_status(service, probe=True)
    assert dispatcher.cancel_all(forget=True) == 0
    dispatcher.send_pose(service, JOB)
    dispatcher.request_status(service, probe=True)
    assert dispatcher.cancel_all(forget=True) == 1


def test_failures_come_back_as_outcomes(dispatcher, made):
    pose_id = dispatcher.send_pose(Service("tcp://127.0.0.1:5555", 30.0), JOB)
    status_id = dispatcher.request_status(Service("tcp://127.0.0.1:5555", 30.0))
    made[0].events = [
        RequestFailed(pose_id, ErrorCode.UNREACHABLE, "no service"),
        RequestFailed(status_id, ErrorCode.UNREACHABLE, "no service"),
    ]
    assert dispatcher.tick() == [
        PoseFailed(JOB, ErrorCode.UNREACHABLE, "no service"),
        StatusFailed(StatusJob(False, "tcp://127.0.0.1:5555"), ErrorCode.UNREACHABLE, "no service"),
    ]


def test_a_new_address_gets_a_new_session_only_when_idle(dispatcher, made):
    dispatcher.request_status(Service("tcp://127.0.0.1:1", 5.0))
    with pytest.raises(BusyError):
        dispatcher.send_pose(Service("tcp://127.0.0.1:2", 5.0), JOB)
    made[0].events = [StatusResult(made[0].sent[0][0], STATUS)]
    dispatcher.tick()
    dispatcher.send_pose(Service("tcp://127.0.0.1:2", 7.0), JOB)
    assert len(made) == 2 and made[0].closed and made[1].timeout_s == 7.0
    made[1].events = [PoseResult(made[1].sent[0][0], PoseReply("r", "", (POSE,)))]
    dispatcher.tick()
    keys = ClientCurveKeys(Path("me.key_secret"), Path("server.key"))
    dispatcher.send_pose(Service("tcp://127.0.0.1:2", 7.0, keys), JOB)  # the same address
    assert len(made) == 3 and made[1].closed and made[2].curve == keys


def test_a_key_file_copied_over_the_same_path_gets_a_new_session(dispatcher, made, tmp_path):
    """The session reads its key files once: the right key put where a wrong one was must be
    read again, or every request keeps failing until Blender restarts."""
    secret, server = tmp_path / "me.key_secret", tmp_path / "server.key"
    secret.write_text("secret")
    server.write_text("the wrong server key")
    service = Service("tcp://10.0.0.2:5555", 5.0, ClientCurveKeys(secret, server))
    dispatcher.request_status(service)
    made[0].events = [StatusResult(made[0].sent[0][0], STATUS)]
    dispatcher.tick()
    dispatcher.request_status(service)  # the files as they were: the same session
    assert len(made) == 1
    made[0].events = [StatusResult(made[0].sent[1][0], STATUS)]
    dispatcher.tick()
    server.write_text("the server's right key, longer")
    dispatcher.request_status(service)
    assert len(made) == 2 and made[0].closed


def _items(request_id, count):
    return [BatchItem(request_id, i, (POSE,)) for i in range(count)]


def test_a_batch_streams_lines_and_sends_its_chunks_one_after_the_other(dispatcher, made):
    run = BatchRun("SMPL", "t", _pending(300, start=1, step=2), total_lines=300)
    first = dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), run)
    session = made[0]
    assert session.sent[0][1] == "batch" and len(session.sent[0][2]) == 256
    assert dispatcher.batch_running
    session.events = [
        *_items(first, 255),
        RequestFailed(first, ErrorCode.UNSUPPORTED_INPUT, "prompt: no word known", index=255),
        BatchFinished(first),
    ]
    outcomes = dispatcher.tick()
    ready = [o for o in outcomes if isinstance(o, BatchLineReady)]
    assert [o.line.frame for o in ready[:3]] == [1, 3, 5]
    assert [o.line.line for o in outcomes if isinstance(o, BatchLineFailed)] == [255]
    # The next chunk went out at once; the lines are reported by the bpy side afterwards.
    second_id, kind, prompts = session.sent[1]
    assert kind == "batch" and prompts == [f"prompt {i}" for i in range(256, 300)]
    for outcome in ready:
        run.item_keyed(outcome.line)
    session.events = [*_items(second_id, 44), BatchFinished(second_id)]
    outcomes = dispatcher.tick()
    assert isinstance(outcomes[-1], BatchEnded) and run.state == batch_plan.FINISHED
    for outcome in outcomes[:-1]:
        run.item_keyed(outcome.line)
    assert run.keyed == 299 and run.remaining == 1
    assert "Edit the line the service refused, then run" in run.summary()  # the code was kept
    assert dispatcher.batch_running  # until the bpy side has shown the end
    run.close()
    assert not dispatcher.batch_running


def _first_request_refused(dispatcher, made, code: ErrorCode, message: str):
    """A 300-line run whose first request the service refused whole, the run going on:
    (the run, its session)."""
    run = BatchRun("SMPL", "t", _pending(300), total_lines=300)
    first = dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), run)
    made[0].events = [RequestFailed(first, code, message)]
    assert dispatcher.tick() == [] and run.state == batch_plan.RUNNING
    return run, made[0]


def test_a_batch_to_a_service_that_queues_fewer_asks_in_smaller_requests(dispatcher, made):
    # chatpose-serve --max-queue 100 refuses a request of 256 prompts whole (it would never fit
    # its queue): the run asks again in halves, not failing every line.
    refusal = "256 prompts; this service queues at most 100 prompts (chatpose-serve --max-queue)"
    run, session = _first_request_refused(dispatcher, made, ErrorCode.TOO_LARGE, refusal)
    second, _, prompts = session.sent[1]
    assert prompts == [f"prompt {i}" for i in range(128)]
    session.events = [RequestFailed(second, ErrorCode.TOO_LARGE, refusal)]
    dispatcher.tick()
    sent = 0
    while run.state == batch_plan.RUNNING:
        request_id, _, prompts = session.sent[-1]
        assert prompts == [f"prompt {i}" for i in range(sent, sent + len(prompts))]
        assert len(prompts) <= 64
        session.events = [*_items(request_id, len(prompts))]
        session.events.append(BatchFinished(request_id))
        for outcome in dispatcher.tick():
            if isinstance(outcome, BatchLineReady):
                run.item_keyed(outcome.line)
        sent += len(prompts)
    assert run.state == batch_plan.FINISHED and run.keyed == 300 and sent == 300
    # A refusal of one line, or of a request half answered, is not about its size: it ends
    # the run as before.
    single = BatchRun("SMPL", "t", _pending(1), total_lines=1)
    single.next_prompts()
    assert not single.ask_in_smaller_requests()
    half = BatchRun("SMPL", "t", _pending(10), total_lines=10)
    half.next_prompts()
    half.item_keyed(half.line_for(0))
    assert not half.ask_in_smaller_requests()


def test_a_batch_the_service_is_too_busy_for_is_sent_again_later(dispatcher, made, now):
    # Other clients' work fills the service's queue (or its model loads): the request is sent
    # again after a wait, not the run ended at a 'busy' that says to try again shortly.
    full = "the queue is too full for these 256 prompt(s): 900 wait; try again shortly"
    run, session = _first_request_refused(dispatcher, made, ErrorCode.BUSY, full)
    assert len(session.sent) == 1 and run.status_text().endswith("asking again shortly)")
    now[0] = 0.9
    assert dispatcher.tick() == [] and len(session.sent) == 1  # not before its second
    now[0] = 1.0
    dispatcher.tick()
    again, _, prompts = session.sent[1]
    assert prompts == [f"prompt {i}" for i in range(256)] and run.retry_at is None
    session.events = [*_items(again, 256), BatchFinished(again)]
    for outcome in dispatcher.tick():
        if isinstance(outcome, BatchLineReady):
            run.item_keyed(outcome.line)
    assert run.keyed == 256 and session.sent[2][2] == [f"prompt {i}" for i in range(256, 300)]
    # Busy for as long as it waits (BUSY_RETRY_DELAYS_S, 90 s in all): the run ends, saying why.
    for _ in range(len(BUSY_RETRY_DELAYS_S) + 1):
        request_id = session.sent[-1][0]
        session.events = [RequestFailed(request_id, ErrorCode.BUSY, full)]
        outcomes = dispatcher.tick()
        now[0] += 60.0
        outcomes += dispatcher.tick()
    assert isinstance(outcomes[-1], BatchEnded) and run.state == batch_plan.FAILED
    assert f"stopped: {full}" in run.summary() and len(session.sent) == 3 + 9
    # Cancelled while it waits (nothing in flight to cancel): it ends on the next tick.
    waiting = BatchRun("SMPL", "t", _pending(3), total_lines=3)
    run.close()
    request_id = dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), waiting)
    session.events = [RequestFailed(request_id, ErrorCode.BUSY, full)]
    dispatcher.tick()
    assert dispatcher.cancel_batch()
    [ended] = dispatcher.tick()
    assert ended.run is waiting and waiting.state == batch_plan.CANCELLED
    # ... and the panel's Cancel (cancel_all) counts it, not saying "Nothing to cancel".
    waiting.close()
    again = BatchRun("SMPL", "t", _pending(3), total_lines=3)
    request_id = dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), again)
    session.events = [RequestFailed(request_id, ErrorCode.BUSY, full)]
    dispatcher.tick()
    assert dispatcher.cancel_all() == 1
    [ended] = dispatcher.tick()
    assert ended.run.state == batch_plan.CANCELLED


@pytest.mark.parametrize(
    ("code", "refusal"),
    [
        (ErrorCode.TOO_LARGE, "256 prompts; this service queues at most 100 (--max-queue)"),
        (ErrorCode.BUSY, "the queue is too full for these 256 prompt(s) (--max-queue)"),
    ],
)
def test_a_cancel_wins_over_a_queue_refusal_that_crossed_it(dispatcher, made, code, refusal):
    # Cancel pressed while the service's refusal of the request whole (its --max-queue) was on
    # its way: the run ended "stopped: ... --max-queue", in the service's words, not the user's.
    run = BatchRun("SMPL", "text 't'", _pending(300), total_lines=300)
    batch_id = dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), run)
    assert dispatcher.cancel_batch()
    made[0].events = [RequestFailed(batch_id, code, refusal)]
    [ended] = dispatcher.tick()
    assert ended == BatchEnded(run) and run.state == batch_plan.CANCELLED
    assert len(made[0].sent) == 1  # not asked again, smaller or later
    assert run.summary().startswith("Batch from text 't' cancelled. 0 lines keyed on SMPL")
    assert "max-queue" not in run.summary()
    # The add-on's own stop still says why it stopped.
    run.close()
    stopped = BatchRun("SMPL", "text 't'", _pending(300), total_lines=300)
    batch_id = dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), stopped)
    stopped.stop("the armature 'SMPL' is gone")
    made[0].events = [RequestFailed(batch_id, code, refusal)]
    dispatcher.tick()
    assert stopped.summary().startswith("Batch from text 't' stopped: the armature 'SMPL' is")


def test_cancel_a_batch_and_a_dead_service(dispatcher, made):
    run = BatchRun("SMPL", "t", _pending(10), total_lines=10)
    batch_id = dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), run)
    with pytest.raises(BusyError):
        dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), BatchRun("SMPL", "t", [], 0))
    assert dispatcher.cancel_batch() and made[0].cancelled == [batch_id]
    made[0].events = [*_items(batch_id, 2), RequestFailed(batch_id, ErrorCode.CANCELLED, "x")]
    outcomes = dispatcher.tick()
    assert [type(o) for o in outcomes] == [BatchLineReady, BatchLineReady, BatchEnded]
    assert run.state == batch_plan.CANCELLED
    run.close()

    again = BatchRun("SMPL", "t", _pending(10)[2:], total_lines=10)
    batch_id = dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), again)
    made[0].events = [RequestFailed(batch_id, ErrorCode.UNREACHABLE, "the service went away")]
    [ended] = dispatcher.tick()
    assert ended.run is again and again.state == batch_plan.FAILED
    assert "stopped: the service went away" in again.summary()


def test_cancel_all_with_forget_drops_the_answers(dispatcher, made):
    dispatcher.send_pose(Service("tcp://127.0.0.1:5555", 30.0), JOB)
    run = BatchRun("SMPL", "t", _pending(3), total_lines=3)
    batch_id = dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), run)
    assert dispatcher.cancel_all(forget=True) == 2
    assert run.closed and run.state == batch_plan.FAILED and not dispatcher.batch_running
    made[0].events = _items(batch_id, 3)
    assert dispatcher.tick() == []


def test_nothing_pending_sends_nothing(dispatcher, made):
    run = BatchRun("SMPL", "t", [], total_lines=5)
    assert dispatcher.start_batch(Service("tcp://127.0.0.1:5555", 30.0), run) is None
    assert made == [] and run.closed and not dispatcher.batch_running
