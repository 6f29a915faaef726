"""Reference images: recognising PNG and JPEG files, and writing RGBA pixels as PNG.

The service takes PNG or JPEG bytes (protocol: ``PNG_MAGIC`` / ``JPEG_MAGIC``). A file the user
picks is checked here before it is sent, so a wrong file gets a clear message at once instead
of a ``bad_image`` error from the service. ``encode_png`` turns the viewport's pixels into a PNG
without touching the disk (zlib only).
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from shared_protocol.protocol import DEFAULT_LIMITS, JPEG_MAGIC, PNG_MAGIC

MAX_IMAGE_BYTES = DEFAULT_LIMITS.max_image_bytes


def image_kind(data: bytes) -> str | None:
    """ "png", "jpeg", or None when ``data`` starts like neither."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def check_reference_image(data: bytes, name: str = "image") -> str:
    """The kind of a reference image ("png" or "jpeg"); ValueError with a sentence for the
    user when it is empty, too large for the protocol, or not a PNG or JPEG file."""
    if not data:
        raise ValueError(f"{name} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(
            f"{name} is {len(data) / 2**20:.1f} MiB; the service takes images up to "
            f"{MAX_IMAGE_BYTES // 2**20} MiB"
        )
    kind = image_kind(data)
    if kind is None:
        raise ValueError(
            f"{name} is not a PNG or JPEG file (it starts with {data[:8].hex(' ')}); "
            "save it as PNG or JPEG first"
        )
    return kind


def read_reference_image(path: str | os.PathLike) -> bytes:
    """The bytes of a PNG or JPEG file; ValueError naming the file when it cannot be used."""
    name = os.path.basename(os.fspath(path)) or os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_IMAGE_BYTES + 1)
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


def encode_png(pixels, *, flip_vertical: bool = False, level: int = 6) -> bytes:
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
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
            _chunk(b"IEND", b""),
        )
    )


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    if image_kind(data) != "png" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return struct.unpack(">II", data[16:24])
