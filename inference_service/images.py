"""Checking and decoding the image bytes of a request (PNG or JPEG)."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from inference_service.errors import BadImageError
from shared_protocol.protocol import MAX_IMAGE_ASPECT_RATIO, MAX_IMAGE_PIXELS, PNG_MAGIC

# The formats the protocol promises; anything else is refused rather than guessed at.
ACCEPTED_FORMATS = ("PNG", "JPEG")
# Pillow reads every PNG chunk before the pixels, and every JPEG marker before the first scan,
# in Python: a few million empty ones hold the server's I/O thread for seconds. Real files have
# a few dozen.
MAX_HEADER_PARTS = 1000
# Each scan of a progressive JPEG decodes the whole image again: 500 repeated scans of an
# 8000 x 8000 image (300 KB) take 20 s. Encoders write about 10.
MAX_JPEG_SCANS = 100


# How far a picture's pixels may stray from one colour and still show nothing: the 8 levels of
# the add-on's test of a blank viewport (`core.images.shows_nothing`).
FLAT_TOLERANCE = 8


def check_image(data: bytes, field: str = "image") -> None:
    """Reads only the header: the format and the pixel count. Cheap enough for the server's
    I/O thread, so a wrong format or a decompression bomb is refused before any work starts.
    `field` names the image in the error (``images[1]: not a decodable ...``)."""
    with _opened(data, field):
        pass


class CropBox(NamedTuple):
    """A square around a person, in the upright picture's pixels, as HMR-style data gives
    one per image (docs/training.md)."""

    center_x: float
    center_y: float
    side: float


def decode_image(
    data: bytes, field: str = "image", min_side: int | None = None, box: CropBox | None = None
) -> Image.Image:
    """PNG or JPEG bytes -> an RGB image, fully decoded; anything else raises BadImageError,
    whose message starts with `field`.

    With `box`, only that square of the picture, black where it leaves the picture (as HMR
    crops its people).

    With `min_side` (the model's input size), a larger picture (or box) is reduced by a whole
    factor (a JPEG already while decoding) to between two and four times that on its short
    side: the processor scales it down to `min_side` anyway, and a batch of full-size photos
    would otherwise be held decoded all at once (a 12-megapixel one is 36 MB)."""
    with _opened(data, field) as image:
        stored_width = image.width
        span = image.size if box is None else (box.side, box.side)
        factor = _reduction(span, min_side)
        # A camera's JPEG with a preview picture opens as MPO: the same decoder.
        if factor > 1 and image.format in ("JPEG", "MPO"):
            image.draft(None, (max(1, image.width // factor), max(1, image.height // factor)))
        image.load()  # decode now: truncated files fail here, not inside the model
        if _sixteen_bit_rgb_png(data):
            # Pillow reduces its pixels to 8 bits but keeps its transparent colour in 16:
            # compared with them, the wrong pixels would turn grey. Taken as opaque.
            image.info.pop("transparency", None)
        drafted = image.width / stored_width  # what a JPEG's decoder reduced it by
        left = image.size if box is None else (box.side * drafted, box.side * drafted)
        image = _reduced(image, _reduction(left, min_side))
        draft_ratio = image.width / stored_width  # what the pixels were reduced by, in all
        rgb = _as_rgb(_upright(image))
    if box is not None:
        rgb = _cropped(rgb, box, draft_ratio)
    factor = _reduction(rgb.size, min_side)
    return rgb.reduce(factor) if factor > 1 else rgb


# Modes reduced as they are decoded; the others (a palette, 16-bit grey, a transparent
# colour) are converted at full size first, as they are rarely large.
_REDUCED_AS_DECODED = {"RGB": "RGB", "L": "L", "RGBA": "RGBa", "LA": "La"}


def refuse_flat(image: Image.Image, field: str = "image") -> None:
    """BadImageError for a picture of one flat colour (a blank, a 1 x 1 image, a cut-out
    whose alpha is 0 everywhere, laid on the backdrop): it shows no body, and a pose guessed
    from it would be noise that lands on the character as if it were an answer."""
    if all(high - low <= FLAT_TOLERANCE for low, high in image.getextrema()):
        raise BadImageError(
            f"{field}: shows one flat colour and no body (a blank picture, or one whose "
            "pixels are all transparent); pick a picture of the person to pose"
        )


def _reduced(image: Image.Image, factor: int) -> Image.Image:
    """`image` reduced by `factor` before it is turned upright and made RGB: each of those
    steps on a PNG's full size took seconds and gigabytes (a 9000 x 9000 RGBA one: 7 s and
    2 GB). With alpha it is reduced premultiplied, so that what is stored under transparent
    pixels does not colour their neighbours."""
    reduced_as = _REDUCED_AS_DECODED.get(image.mode)
    if factor <= 1 or reduced_as is None or "transparency" in image.info:
        return image
    if reduced_as == image.mode:
        return image.reduce(factor)
    return image.convert(reduced_as).reduce(factor).convert(image.mode)


def _cropped(image: Image.Image, box: CropBox, draft_ratio: float) -> Image.Image:
    half = box.side * draft_ratio / 2
    left = round(box.center_x * draft_ratio - half)
    top = round(box.center_y * draft_ratio - half)
    side = max(1, round(2 * half))
    return image.crop((left, top, left + side, top + side))  # black outside the picture


def _sixteen_bit_rgb_png(data: bytes) -> bool:
    """Whether `data` is a PNG of 16-bit RGB (IHDR bit depth 16, colour type 2)."""
    return data[12:16] == b"IHDR" and data[24:26] == b"\x10\x02"


def _reduction(size: tuple[int, int], min_side: int | None) -> int:
    """The whole factor that keeps the short side of `size` at least twice `min_side`, so
    the processor's own resampling still does the last step."""
    return 1 if min_side is None else max(1, int(min(size) // (2 * min_side)))


def _upright(image: Image.Image) -> Image.Image:
    """The picture as a viewer shows it (a phone's portrait stands up), by its EXIF
    orientation; as it is stored when that metadata cannot be read."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # damaged metadata is no reason to refuse the pixels
        return image


# What shows through a picture's transparent pixels: a mid grey, within the range of the
# backgrounds behind the training renders' mannequin (render_pairs), not whatever colour the
# file stores under them (a cut-out saved as transparent red would reach the model red).
TRANSPARENT_BACKDROP = (128, 128, 128)


def _as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grey (Pillow's I;16 mode, or I holding 16-bit values, as older
    releases open a 16-bit PNG) is scaled to 8 bits first: converted as it is, every value
    above 255 would clip to white. A picture with transparency (a cut-out reference) is laid
    on ``TRANSPARENT_BACKDROP``."""
    if image.mode.startswith("I;16") or image.mode == "I":
        transparent = image.info.get("transparency")  # one 16-bit grey value, in a PNG
        wide = image.convert("I")
        high = 65535 if wide.getextrema()[1] <= 65535 else 2**31 - 1
        grey = wide.point(lambda value: value * (255 / high)).convert("L")
        if not isinstance(transparent, int):
            return grey.convert("RGB")
        opaque = np.asarray(wide) != transparent
        image = Image.merge("LA", (grey, Image.fromarray(opaque.astype(np.uint8) * 255)))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKDROP, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")


Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # the protocol's, whatever Pillow's default becomes


@contextmanager
def _opened(data: bytes, field: str = "image") -> Iterator[Image.Image]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadImageError(f"{field}: expected bytes, got {type(data).__name__}")
    data = _check_structure(bytes(data), field)
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; treat that as an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size
                if max(width, height) > MAX_IMAGE_ASPECT_RATIO * max(1, min(width, height)):
                    raise BadImageError(
                        f"{field}: {width} x {height} pixels, its long side more than "
                        f"{MAX_IMAGE_ASPECT_RATIO} times its short side; crop it"
                    )
                yield image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's message gives the limit it refused at: twice this one for an error.
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(size[1]):,} pixels, " if size else ""
        raise BadImageError(
            f"{field}: too many pixels to decode ({pixels}at most {Image.MAX_IMAGE_PIXELS:,}); "
            "downscale it"
        ) from exc
    except Image.UnidentifiedImageError as exc:  # its message shows an internal object
        raise BadImageError(
            f"{field}: not a decodable PNG or JPEG (neither header, or a damaged one)"
        ) from exc
    except BadImageError:
        raise
    except Exception as exc:  # Pillow on a damaged file: OSError, ValueError, SyntaxError,
        # and AssertionError (a palette PNG without its palette) among others
        problem = str(exc) or type(exc).__name__
        raise BadImageError(f"{field}: not a decodable PNG or JPEG ({problem})") from exc


def _check_structure(data: bytes, field: str) -> bytes:
    """BadImageError for a file whose header parts or scans would cost Pillow seconds; each
    limit is far above what an encoder writes. Anything else is left to Pillow. Returns what
    Pillow is given: a PNG without its compressed text (``_check_png``)."""
    if data.startswith(PNG_MAGIC):
        return _without(data, _check_png(data, field))
    if data.startswith(b"\xff\xd8"):  # the start-of-image marker, all Pillow asks of a JPEG
        _check_jpeg(data, field)
    return data


def _without(data: bytes, spans: Sequence[tuple[int, int]]) -> bytes:
    """`data` with the (start, end) `spans`, in order, cut out."""
    if not spans:
        return data
    kept, start = [], 0
    for cut_from, cut_to in spans:
        kept.append(data[start:cut_from])
        start = cut_to
    return b"".join([*kept, data[start:]])


_PIXEL_CHUNKS = (b"IDAT", b"fdAT")  # an image's pixels, an animation frame's
# Encoders split the pixels into chunks of 8 KB or more; empty ones cost Pillow as much each.
_PNG_PIXEL_CHUNK_BYTES = 4096


def _check_png(data: bytes, field: str) -> list[tuple[int, int]]:
    """Every chunk up to the end, or to an animation's second frame: Pillow reads the ones
    after the pixels too, one by one, but stops there when (by its rules) it is animated.
    Returns where the compressed text chunks are that Pillow need not read: it inflates each,
    up to 64 MB in all (67 KB of them held the server's I/O thread for a third of a second),
    and of their metadata only the first of each that may say the orientation is read."""
    offset, parts, chunks, profiles = 8, 0, 0, 0
    compressed_text = []
    orientation_kept: set[bytes] = set()
    most_chunks = MAX_HEADER_PARTS + len(data) // _PNG_PIXEL_CHUNK_BYTES
    frames: int | None = None  # acTL's frame count; 0 for a second or an invalid acTL
    frame_before_pixels = False
    while offset + 8 <= len(data):
        kind = data[offset + 4 : offset + 8]
        pixels_seen = chunks > parts
        if kind == b"IEND":
            return compressed_text
        if kind == b"fcTL" and pixels_seen:
            if frames and (frames > 1 or not frame_before_pixels):  # Pillow's is_animated
                return compressed_text
        elif kind == b"fcTL":
            frame_before_pixels = True
        elif kind == b"acTL" and not pixels_seen:
            count = int.from_bytes(data[offset + 8 : offset + 12], "big")
            frames = count if frames is None and 0 < count <= 0x80000000 else 0
        chunks += 1
        if kind not in _PIXEL_CHUNKS:
            parts += 1
        if parts > MAX_HEADER_PARTS:
            raise BadImageError(f"{field}: more than {MAX_HEADER_PARTS} PNG chunks")
        if chunks > most_chunks:
            raise BadImageError(f"{field}: its pixels come in more than {most_chunks} PNG chunks")
        if kind == b"iCCP":  # each one is inflated, up to a megabyte; the format allows one
            profiles += 1
            if profiles > 1:
                raise BadImageError(f"{field}: more than one colour profile (PNG iCCP chunk)")
        end = offset + 12 + int.from_bytes(data[offset : offset + 4], "big")
        keyword = _compressed_text_keyword(data, offset, end)
        if keyword in _ORIENTATION_KEYWORDS and keyword not in orientation_kept:
            orientation_kept.add(keyword)
        elif keyword is not None:
            compressed_text.append((offset, end))
        offset = end
    return compressed_text


# Compressed text Pillow reads the orientation from (`getexif`): ImageMagick's EXIF, and XMP.
_ORIENTATION_KEYWORDS = {b"Raw profile type exif", b"Raw profile type APP1", b"XML:com.adobe.xmp"}


def _compressed_text_keyword(data: bytes, offset: int, end: int) -> bytes | None:
    """The keyword of the PNG chunk at `offset` when it is compressed text (a zTXt, or an
    iTXt whose flag after its keyword says compressed), else None."""
    kind = data[offset + 4 : offset + 8]
    keyword_end = data.find(b"\0", offset + 8, end)
    if kind not in (b"zTXt", b"iTXt") or keyword_end < 0:
        return None
    if kind == b"iTXt" and data[keyword_end + 1 : keyword_end + 2] != b"\1":
        return None
    return data[offset + 8 : keyword_end]


# A marker: 0xFF, any fill bytes (more 0xFF), then its code. In a scan's data a 0xFF is
# followed by 0x00 (a stuffed byte) or a restart code (0xD0-0xD7), so those are no marker.
# The fill bytes are taken possessively, and a search starts only at the first 0xFF of a run:
# else a long run of 0xFF before a 0x00 is read again from each of its bytes (quadratic:
# 40 KB of them held the server's I/O thread for 14 s).
_MARKER = re.compile(rb"\xff++([^\x00\xff\xd0-\xd7])")
_NEXT_MARKER = re.compile(rb"(?<!\xff)\xff++([^\x00\xff\xd0-\xd7])")
_END_OF_IMAGE, _START_OF_SCAN = 0xD9, 0xDA


def _check_jpeg(data: bytes, field: str) -> None:
    """Walks the markers as a decoder does, up to the end of the image (a motion photo's video,
    or an MPO's second picture, after it is no part of it): every segment and fill byte is a
    part, every scan's data is skipped in one search, and so is anything between segments
    where a marker belongs (decoders skip it, Pillow byte by byte), each byte a part."""
    offset, parts, scans = 2, 0, 0
    while True:
        marker = _MARKER.match(data, offset)
        if marker is None:
            marker = _NEXT_MARKER.search(data, offset)
            parts += (len(data) if marker is None else marker.start()) - offset
            if parts > MAX_HEADER_PARTS:
                raise BadImageError(
                    f"{field}: more than {MAX_HEADER_PARTS} JPEG markers (or stray bytes between "
                    "them)"
                )
            if marker is None:
                return
        code = marker.group(1)[0]
        parts += marker.end() - marker.start() - 1  # the fill bytes and the marker
        if parts > MAX_HEADER_PARTS:
            raise BadImageError(
                f"{field}: more than {MAX_HEADER_PARTS} JPEG markers (or stray bytes between them)"
            )
        # Before the first scan Pillow reads on past an end of image, as past a start of one:
        # markers without a length, as are the restarts and TEM.
        if code == _END_OF_IMAGE and scans:
            return
        offset = marker.end()
        if 0xD0 <= code <= 0xD9 or code == 0x01:
            continue
        offset += int.from_bytes(data[offset : offset + 2], "big")
        if code == _START_OF_SCAN:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise BadImageError(f"{field}: more than {MAX_JPEG_SCANS} JPEG scans")
            following = _NEXT_MARKER.search(data, offset)
            if following is None:
                return
            offset = following.start()
