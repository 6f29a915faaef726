"""Checking and decoding the image bytes of a request (PNG or JPEG)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from inference_service.errors import BadImageError

# The formats the protocol promises; anything else is refused rather than guessed at.
ACCEPTED_FORMATS = ("PNG", "JPEG")
# The processors scale an image's short side up to the model's size before cropping, so a
# 1 x 60,000 strip of 320 bytes would cost gigabytes; no photo or viewport is this thin.
MAX_ASPECT_RATIO = 20


def check_image(data: bytes, field: str = "image") -> None:
    """Reads only the header: the format and the pixel count. Cheap enough for the server's
    I/O thread, so a wrong format or a decompression bomb is refused before any work starts.
    `field` names the image in the error (``images[1]: not a decodable ...``)."""
    with _opened(data, field):
        pass


def decode_image(data: bytes, field: str = "image") -> Image.Image:
    """PNG or JPEG bytes -> an RGB image, fully decoded; anything else raises BadImageError,
    whose message starts with `field`."""
    with _opened(data, field) as image:
        image.load()  # decode now: truncated files fail here, not inside the model
        return image.convert("RGB")


@contextmanager
def _opened(data: bytes, field: str = "image") -> Iterator[Image.Image]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadImageError(f"{field}: expected bytes, got {type(data).__name__}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; treat that as an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size
                if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
                    raise BadImageError(
                        f"{field}: {width} x {height} pixels is more than {MAX_ASPECT_RATIO} "
                        "times as long as it is wide; crop it"
                    )
                yield image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(
            f"{field}: too many pixels to decode (at most {Image.MAX_IMAGE_PIXELS:,}); "
            f"downscale it ({exc})"
        ) from exc
    except Image.UnidentifiedImageError as exc:  # its message shows an internal object
        raise BadImageError(
            f"{field}: not a decodable PNG or JPEG (neither header, or a damaged one)"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"{field}: not a decodable PNG or JPEG ({exc})") from exc
