"""Reference images: recognising PNG and JPEG files, and writing RGBA pixels as PNG.

The service takes PNG or JPEG bytes (protocol: ``PNG_MAGIC`` / ``JPEG_MAGIC``). A file the user
picks is checked here before it is sent, so a wrong file gets a clear message at once instead
of a ``bad_image`` error from the service. ``encode_png`` turns the viewport's pixels into a PNG
without touching the disk (zlib only).
"""

from __future__ import annotations

import os
import re
import struct
import zlib

import numpy as np

from shared_protocol.protocol import (
    DEFAULT_LIMITS,
    JPEG_MAGIC,
    MAX_IMAGE_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    PNG_MAGIC,
)

MAX_IMAGE_BYTES = DEFAULT_LIMITS.max_image_bytes


def image_kind(data: bytes) -> str | None:
    """ "png", "jpeg", or None when ``data`` starts like neither."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


# What an animator may pick instead of a PNG or JPEG, named by its first bytes: (offset, bytes),
# with the article its name takes.
_OTHER_PICTURES = {
    "a WebP": ((8, b"WEBP"),),
    "a GIF": ((0, b"GIF87a"), (0, b"GIF89a")),
    "a TIFF": ((0, b"II*\x00"), (0, b"MM\x00*")),
    "a Photoshop": ((0, b"8BPS"),),
    "an OpenEXR": ((0, b"v/1\x01"),),
}
# The major brand of an ISO media file (`ftyp` at byte 4): Apple's photos are HEIC.
_HEIF_BRANDS = {
    b"avif": "an AVIF", b"avis": "an AVIF",
    b"heic": "a HEIC", b"heix": "a HEIC", b"hevc": "a HEIC", b"hevx": "a HEIC",
    b"heim": "a HEIC", b"heis": "a HEIC", b"mif1": "a HEIF", b"msf1": "a HEIF",
}  # fmt: skip
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}  # the bitmap header's own size, at byte 14


def other_picture_kind(data: bytes) -> str | None:
    """ "a GIF", "an AVIF"...: the picture format ChatPose does not take that ``data`` is in,
    if it is one of the usual ones (what a phone or an image editor saves)."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[data[8:12]]
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "a BMP"  # a text that starts with "BM" is none
    for kind, signatures in _OTHER_PICTURES.items():
        if any(data[offset : offset + len(magic)] == magic for offset, magic in signatures):
            return kind
    return None


def check_reference_image(data: bytes, name: str = "image") -> str:
    """The kind of a reference image ("png" or "jpeg"); ValueError with a sentence for the
    user when it is empty, too large for the protocol, not a PNG or JPEG file, or of a size
    its header gives that the service would refuse (too many pixels, too thin)."""
    if not data:
        raise ValueError(f"{name} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(_too_large(name, len(data)))
    kind = image_kind(data)
    if kind is None:
        other = other_picture_kind(data)
        what = f"{other} picture" if other else "not a PNG or JPEG picture"
        raise ValueError(f"{name} is {what}: save it as PNG or JPEG first")
    size = header_size(data)
    if size is not None:
        width, height = size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"{name} is {width} x {height} pixels; the service decodes at most "
                f"{MAX_IMAGE_PIXELS:,} pixels: downscale it"
            )
        if max(width, height) > MAX_IMAGE_ASPECT_RATIO * max(1, min(width, height)):
            raise ValueError(
                f"{name} is {width} x {height} pixels, its long side more than "
                f"{MAX_IMAGE_ASPECT_RATIO} times its short side; crop it"
            )
    return kind


# JPEG frame headers (SOF0-SOF15 but DHT, JPG, DAC) say the picture's size; a walk that finds
# none within this many segments leaves the judgement to the service.
_SOF_CODES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_MAX_SEGMENTS = 1000
_NOT_FILL = re.compile(rb"[^\xff]")  # found in C: a file of fill bytes took seconds in Python


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as a PNG's or JPEG's header gives it, or None when it does not say."""
    if image_kind(data) == "png":
        return png_size(data) if data[12:16] == b"IHDR" and len(data) >= 24 else None
    offset = 2
    for _ in range(_MAX_SEGMENTS):
        offset = data.find(b"\xff", offset)  # stray bytes before a marker: skipped, as Pillow does
        if offset < 0:
            return None
        after_fill = _NOT_FILL.search(data, offset)
        if after_fill is None:
            return None
        offset = after_fill.start()
        code = data[offset]
        offset += 1
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:  # no length
            continue
        if code in (0xD9, 0xDA) or offset + 2 > len(data):  # no frame header before the scan
            return None
        if code in _SOF_CODES:
            if offset + 7 > len(data):
                return None
            height, width = struct.unpack(">HH", data[offset + 3 : offset + 7])
            return width, height
        offset += struct.unpack(">H", data[offset : offset + 2])[0]
    return None


def _too_large(name: str, size: int) -> str:
    return (
        f"{name} is {size / 2**20:.1f} MiB; the service takes images up to "
        f"{MAX_IMAGE_BYTES // 2**20} MiB"
    )


def read_reference_image(path: str | os.PathLike) -> bytes:
    """The bytes of a PNG or JPEG file; ValueError naming the file when it cannot be used."""
    name = os.path.basename(os.fspath(path)) or os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:  # named by its size, not by what was read of it
                raise ValueError(_too_large(name, os.fstat(file.fileno()).st_size))
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{name} is a folder; pick a PNG or JPEG file") from None
    except OSError as exc:
        raise ValueError(f"{name} could not be read ({exc.strerror or exc})") from None
    check_reference_image(data, name)
    return data


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def encode_png(pixels, *, flip_vertical: bool = False) -> bytes:
    """An 8-bit PNG of ``pixels`` (H, W, 3) RGB or (H, W, 4) RGBA, values 0-255.

    ``flip_vertical`` for pixels read from a GPU framebuffer, whose first row is the bottom.
    """
    array = np.asarray(pixels)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or 0 in array.shape:
        raise ValueError(f"pixels: expected shape (H, W, 3 or 4), got {array.shape}")
    array = np.clip(array, 0, 255).astype(np.uint8)
    if flip_vertical:
        array = array[::-1]
    height, width, channels = array.shape
    rows = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # filter byte 0 per row
    rows[:, 1:] = array.reshape(height, width * channels)
    color_type = 6 if channels == 4 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"".join(
        (
            PNG_MAGIC,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes())),
            _chunk(b"IEND", b""),
        )
    )


def shows_nothing(pixels, tolerance: int = 8) -> bool:
    """Whether ``pixels`` (H, W, 3 or 4; 0-255) are only a background: no two neighbouring
    pixels differ by more than ``tolerance`` levels in any of R, G, B. A flat world colour or a
    viewport's gradient passes; any drawn edge, a figure's outline, does not."""
    rgb = np.asarray(pixels, dtype=np.int16)[..., :3]
    across = np.abs(np.diff(rgb, axis=1)).max(initial=0)
    down = np.abs(np.diff(rgb, axis=0)).max(initial=0)
    return max(across, down) <= tolerance


def centre_square(pixels) -> np.ndarray:
    """The middle square of ``pixels`` (H, W, ...), as wide as the shorter side: what the model
    sees of a picture. Its CLIP processor (the release's, the demo's) scales the shorter side
    to its input and crops the middle; the release asks for "the person in the center"."""
    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[top : top + side, left : left + side]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    if image_kind(data) != "png" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return struct.unpack(">II", data[16:24])
