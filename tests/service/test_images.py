import pytest

from inference_service.errors import BadImageError
from inference_service.images import check_image, decode_image

from .tiny_llava import image_bytes, png_header


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_png_and_jpeg_decode_to_rgb(fmt):
    image = decode_image(image_bytes((10, 20, 30), size=(40, 30), fmt=fmt))
    assert image.mode == "RGB"
    assert image.size == (40, 30)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", image_bytes((1, 2, 3))[:60], image_bytes((1, 2, 3), fmt="GIF")],
    ids=["empty", "text", "truncated", "gif"],
)
def test_bad_bytes_raise_bad_image(data):
    with pytest.raises(BadImageError, match="not a decodable PNG or JPEG") as error:
        decode_image(data)
    assert error.value.code == "bad_image"
    assert "object at 0x" not in str(error.value)  # no Python internals in a user's message


def test_non_bytes_raise_bad_image():
    with pytest.raises(BadImageError, match="expected bytes"):
        decode_image("image.png")


def test_the_header_check_refuses_a_decompression_bomb_without_decoding():
    bomb = png_header(40_000, 40_000)  # 1.6 gigapixels claimed, no pixel data
    with pytest.raises(BadImageError, match=r"image: too many pixels to decode .*downscale it"):
        check_image(bomb)
    truncated = image_bytes((1, 2, 3), size=(64, 64))[:-30]
    check_image(truncated)  # the header is fine; only decoding finds the missing data
    with pytest.raises(BadImageError, match="not a decodable PNG or JPEG"):
        decode_image(truncated)


def test_a_strip_of_an_image_is_refused_before_it_costs_memory():
    with pytest.raises(BadImageError, match=r"images\[0\]: 60000 x 1 pixels is more than 20 times"):
        check_image(png_header(60_000, 1), "images[0]")  # 320 bytes: gigabytes once scaled up
    check_image(png_header(1920, 1080))  # a wide viewport is fine
    check_image(png_header(20, 400))
