import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from inference_service import images
from inference_service.errors import BadImageError
from inference_service.images import check_image, decode_image

from .tiny_llava import image_bytes, png_chunk, png_header


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
    message = r"image: too many pixels to decode \(1,600,000,000 pixels, at most 89,478,485\)"
    with pytest.raises(BadImageError, match=message):
        check_image(bomb)
    truncated = image_bytes((1, 2, 3), size=(64, 64))[:-30]
    check_image(truncated)  # the header is fine; only decoding finds the missing data
    with pytest.raises(BadImageError, match="not a decodable PNG or JPEG"):
        decode_image(truncated)


def test_a_strip_of_an_image_is_refused_before_it_costs_memory():
    with pytest.raises(
        BadImageError, match=r"images\[0\]: 60000 x 1 pixels, its long side more than 20"
    ):
        check_image(png_header(60_000, 1), "images[0]")  # 320 bytes: gigabytes once scaled up
    check_image(png_header(1920, 1080))  # a wide viewport is fine
    check_image(png_header(20, 400))


def test_a_palette_png_without_its_palette_decodes_and_any_pillow_failure_is_a_bad_image(
    monkeypatch,
):
    # 32 x 24, 1-bit palette, a tRNS chunk and no PLTE: Pillow's convert asserts
    # (found by fuzzing the server's image checks).
    broken = bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000200000001801030000 00a19d6d77000000"
        "0174524e530040e6d866 0000000c49444154789c636018180000007800010b61ffffff00"
        "0000 0049454e44ae426082".replace(" ", "")
    )
    assert decode_image(broken).size == (32, 24)  # Pillow's convert asserted on it before

    def asserting(image, mode):  # how Pillow failed on that file: no OSError, an AssertionError
        raise AssertionError

    monkeypatch.setattr(Image.Image, "convert", asserting)
    with pytest.raises(BadImageError, match=r"image: not a decodable PNG or JPEG \(Assertion"):
        decode_image(broken)


def _progressive_jpeg(
    repeats: int = 0, comments: int = 0, where: str = "first", fill: int = 0, after: bytes = b""
) -> bytes:
    """A progressive JPEG: its last scan repeated (each repeat re-decodes the whole image),
    empty comment segments first or after the frame header, 0xFF fill bytes before its first
    marker, and `after` past its end (as a motion photo's video)."""
    buffer = io.BytesIO()
    Image.new("L", (64, 48), 128).save(buffer, "JPEG", progressive=True, exif=b"Exif\0\0MM")
    data = buffer.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    scan = data[last_scan:-2]  # up to the end-of-image marker
    sof = data.index(b"\xff\xc2")  # the progressive frame header
    at = 2 if where == "first" else sof + 2 + int.from_bytes(data[sof + 2 : sof + 4], "big")
    comment = b"\xff\xfe\x00\x02" * comments
    body = data[:at] + comment + data[at:-2] + scan * repeats + data[-2:]
    return body[:2] + b"\xff" * fill + body[2:] + after


def _png_with_chunks(count: int, kind: bytes = b"tEXt", where: str = "before") -> bytes:
    """An 8 x 8 PNG with `count` empty chunks of `kind` before its pixels, or after them."""
    data = image_bytes((1, 2, 3), size=(8, 8))
    at = data.index(b"IDAT") - 4 if where == "before" else data.index(b"IEND") - 4
    chunk = b"\x00\x00\x00\x00" + kind + zlib.crc32(kind).to_bytes(4, "big")
    return data[:at] + chunk * count + data[at:]


def test_files_whose_headers_or_scans_would_cost_seconds_are_refused_from_their_structure():
    assert decode_image(_progressive_jpeg(repeats=50)).size == (64, 48)  # within the limits
    video = bytes(np.random.default_rng(0).integers(0, 256, 8_000_000, dtype=np.uint8))
    assert video.count(b"\xff\xda") > 100  # a motion photo's video, after the picture
    assert decode_image(_progressive_jpeg(after=video)).size == (64, 48)
    assert decode_image(_progressive_jpeg(comments=900)).size == (64, 48)
    assert decode_image(_png_with_chunks(900)).size == (8, 8)
    with pytest.raises(BadImageError, match=r"images\[1\]: more than 100 JPEG scans"):
        check_image(_progressive_jpeg(repeats=500), "images[1]")
    with pytest.raises(BadImageError, match="more than 1000 JPEG markers"):
        check_image(_progressive_jpeg(comments=1_000_000))
    with pytest.raises(BadImageError, match="more than 1000 JPEG markers"):  # after the frame
        check_image(_progressive_jpeg(comments=1_000_000, where="after the frame"))
    with pytest.raises(BadImageError, match="more than 1000 JPEG markers"):
        check_image(_progressive_jpeg(fill=8_000_000))  # fill bytes, read one by one
    with pytest.raises(BadImageError, match="more than 1000 PNG chunks"):
        check_image(_png_with_chunks(1_000_000))
    # Found by a security review: what Pillow also reads one by one, or inflates each time.
    with pytest.raises(BadImageError, match="more than 1000 PNG chunks"):  # after the pixels
        check_image(_png_with_chunks(1_000_000, where="after"))
    frames = [Image.new("RGB", (8, 8), (k % 256, 0, 0)) for k in range(1100)]
    animation = io.BytesIO()  # an APNG: Pillow reads its first frame, to the second's fcTL
    frames[0].save(animation, "PNG", save_all=True, append_images=frames[1:])
    assert decode_image(animation.getvalue()).size == (8, 8)
    with pytest.raises(BadImageError, match=r"pixels come in more than \d+ PNG chunks"):
        check_image(_png_with_chunks(1_000_000, kind=b"IDAT", where="after"))
    profile = png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(bytes(1 << 20)))
    png = image_bytes((1, 2, 3), size=(8, 8))
    at = png.index(b"IDAT") - 4
    assert decode_image(png[:at] + profile + png[at:]).size == (8, 8)  # one, as allowed
    with pytest.raises(BadImageError, match=r"more than one colour profile \(PNG iCCP"):
        check_image(png[:at] + profile * 900 + png[at:])
    # A still PNG with a stray fcTL after its pixels: Pillow reads on to the end, so must the
    # check (found by a review: 2,000 colour profiles after it went unchecked).
    end = png.index(b"IEND") - 4
    stray = png[:end] + png_chunk(b"fcTL", bytes(26)) + profile * 3 + png[end:]
    with pytest.raises(BadImageError, match="more than one colour profile"):
        check_image(stray)
    stray = _progressive_jpeg()
    stray = stray[:20] + bytes(8_000_000) + stray[20:]  # between segments, skipped byte by byte
    with pytest.raises(BadImageError, match="more than 1000 JPEG markers .or stray bytes"):
        check_image(stray)
    with pytest.raises(BadImageError, match="more than 1000 JPEG markers .or stray bytes"):
        check_image(stray[:20] + b"\xff\x00" * 4_000_000)  # and no marker after them
    # A long run of 0xFF before a 0x00 in a scan is read once: each search from each of its
    # bytes made this quadratic, and 100 KB of them held the server's I/O thread for a minute.
    jpeg = _progressive_jpeg()
    scan = (
        jpeg.index(b"\xff\xda") + 2 + int.from_bytes(jpeg[jpeg.index(b"\xff\xda") + 2 :][:2], "big")
    )
    check_image(jpeg[:scan] + b"\xff" * 100_000 + b"\x00" + jpeg[scan:])
    # Start and end of image before the first scan: Pillow reads on past both, each a bare
    # marker, so the check must count what follows (a review: 16 MB of them held the I/O
    # thread for seconds, accepted).
    with pytest.raises(BadImageError, match="more than 1000 JPEG markers"):
        check_image(b"\xff\xd8\xff\xd9" + b"\xff\xe1\x00\x02" * 4_000_000 + jpeg[2:])
    with pytest.raises(BadImageError, match="more than 1000 JPEG markers"):
        check_image(b"\xff\xd8" * 8_000_000 + jpeg[2:])


def test_compressed_png_text_is_not_inflated():
    # A review: 63 zTXt chunks, 67 KB in all, each inflating to a megabyte, held the server's
    # I/O thread for 0.35 s; 70 were refused only after as long.
    png = image_bytes((1, 2, 3), size=(8, 8))
    at = png.index(b"IDAT") - 4
    inflating = zlib.compress(b"a" * 2**20, 9)
    text = [png_chunk(b"zTXt", b"k%d\x00\x00" % k + inflating) for k in range(70)]
    text.append(png_chunk(b"iTXt", b"Description\x00\x01\x00\x00\x00" + inflating))
    text.append(png_chunk(b"tEXt", b"Software\x00any"))
    with_text = png[:at] + b"".join(text) + png[at:]
    assert len(with_text) < 100_000
    with_text_decoded = np.asarray(decode_image(with_text))
    np.testing.assert_array_equal(with_text_decoded, np.asarray(decode_image(png)))
    check_image(with_text)
    # What Pillow itself makes of them: every chunk inflated, until it gives up.
    with pytest.raises(ValueError, match="Too much memory used in text chunks"):
        Image.open(io.BytesIO(with_text)).load()


@pytest.mark.parametrize("where", ["ImageMagick's EXIF", "compressed XMP"])
def test_a_png_s_orientation_in_compressed_text_is_still_read(where):
    # A review: cutting every compressed text chunk laid such a portrait on its side.
    landscape = image_bytes((200, 0, 0), size=(80, 40))
    at = landscape.index(b"IDAT") - 4
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown a quarter turn clockwise
    if where == "ImageMagick's EXIF":
        raw = f"\nexif\n{len(exif.tobytes()):8d}\n{exif.tobytes().hex()}\n".encode()
        body = b"Raw profile type exif\x00\x00" + zlib.compress(raw)
        kind = b"zTXt"
    else:
        xmp = (
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
            b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
            b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
        )
        body, kind = b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(xmp), b"iTXt"
    tagged = landscape[:at] + png_chunk(kind, body) + landscape[at:]
    assert decode_image(tagged).size == (40, 80)


def test_a_phone_s_portrait_reaches_the_model_standing(monkeypatch):
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned, the viewer turns the picture back
    Image.new("RGB", (400, 300), (200, 30, 30)).save(buffer, "JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (300, 400)

    def damaged(image):  # Pillow on metadata it cannot rewrite ("required argument is not...")
        raise TypeError("required argument is not an integer")

    monkeypatch.setattr(ImageOps, "exif_transpose", damaged)
    assert decode_image(buffer.getvalue()).size == (400, 300)  # the pixels, as stored


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped_to_white():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    buffer = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint16)).save(buffer, "PNG")
    decoded = [decode_image(buffer.getvalue())]
    # Older Pillow releases opened such a file in mode I: 32-bit integers holding 16-bit values.
    decoded.append(images._as_rgb(Image.fromarray(ramp.astype(np.int32))))
    for image in decoded:
        pixels = np.asarray(image)
        assert pixels.min() == 0 and pixels.max() == 255
        assert abs(pixels.mean() - 127.5) < 1  # a mid grey on average, as the picture is
    # With one grey value transparent (a tRNS chunk), it was clipped to white all the same.
    buffer = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint16)).save(buffer, "PNG", transparency=0)
    pixels = np.asarray(decode_image(buffer.getvalue()))
    assert tuple(pixels[0, 0]) == images.TRANSPARENT_BACKDROP  # the transparent black
    assert abs(pixels.mean() - 127.5) < 1 and (pixels == 255).mean() < 0.01


def test_a_16_bit_rgb_png_s_transparent_colour_turns_no_other_pixel_grey():
    # Pillow reads such a file's pixels in 8 bits but its tRNS colour in 16: compared with
    # each other, a key of black matched every dark pixel, which reached the model grey.
    pixels = np.full((4, 4, 3), 200, ">u2")  # dark: 200 of 65535, not the key
    pixels[:, 2:] = 0  # the key's colour
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
        + png_chunk(b"tRNS", struct.pack(">HHH", 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )
    np.testing.assert_array_equal(np.asarray(decode_image(data)), np.zeros((4, 4, 3)))


def test_transparent_pixels_show_a_grey_backdrop_not_the_colour_stored_under_them():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, stored under
    rgba[0, :, 3] = 255  # an opaque first row
    rgba[1, :, 3] = 128  # a half-transparent second row; the rest fully transparent
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    pixels = np.asarray(decode_image(buffer.getvalue())).astype(int)
    backdrop = np.array(images.TRANSPARENT_BACKDROP)
    np.testing.assert_array_equal(pixels[0], [[255, 0, 0]] * 4)
    half = 128 / 255
    blended = half * np.array([255, 0, 0]) + (1 - half) * backdrop
    np.testing.assert_allclose(pixels[1], np.broadcast_to(blended, (4, 3)), atol=1)
    np.testing.assert_array_equal(pixels[2:], np.broadcast_to(backdrop, (2, 4, 3)))
    # A palette picture whose transparency is one palette entry.
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255])
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=0)
    np.testing.assert_array_equal(
        np.asarray(decode_image(buffer.getvalue())), [[backdrop, [0, 0, 255]]]
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_large_picture_is_reduced_to_a_few_times_the_model_s_size(fmt):
    ramp = np.linspace(0, 255, 1500)[None, :, None].repeat(1000, axis=0).repeat(3, axis=2)
    buffer = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint8)).save(buffer, fmt)
    full = decode_image(buffer.getvalue())
    reduced = decode_image(buffer.getvalue(), min_side=64)
    assert full.size == (1500, 1000)
    assert reduced.size[0] / reduced.size[1] == pytest.approx(1.5, rel=0.01)
    assert 128 <= reduced.size[1] < 256
    # what the processor then makes of it: the same picture at the model's size
    as_seen = [
        np.asarray(image.resize((96, 64), Image.BICUBIC), float) for image in (full, reduced)
    ]
    assert np.abs(as_seen[0] - as_seen[1]).max() < 3
    small = decode_image(image_bytes((1, 2, 3), size=(200, 150)), min_side=64)
    assert small.size == (200, 150)  # under twice the model's size: as it is


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA"])
def test_a_large_png_is_reduced_before_it_is_turned_upright_and_made_rgb(mode, monkeypatch):
    # A review: a 9000 x 9000 RGBA PNG took 7 s and 2 GB made RGB at its full size first.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (600, 900, len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(axis=2) if mode == "L" else pixels, mode).save(buffer, "PNG")
    full = decode_image(buffer.getvalue())
    made_rgb = []
    as_rgb = images._as_rgb
    monkeypatch.setattr(
        images, "_as_rgb", lambda image: made_rgb.append(image.size) or as_rgb(image)
    )
    reduced = decode_image(buffer.getvalue(), min_side=64)
    assert made_rgb == [reduced.size] == [(225, 150)]  # by 4, its short side 2-4 times 64
    as_seen = [np.asarray(i.resize((96, 64), Image.BICUBIC), float) for i in (full, reduced)]
    assert np.abs(as_seen[0] - as_seen[1]).mean() < 2


def test_a_reduced_png_keeps_the_colour_stored_under_transparent_pixels_out():
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[..., 1] = 255  # green stored under the transparent half
    rgba[:, :258] = (0, 0, 255, 255)  # opaque blue: two columns into the last block of 4
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    reduced = np.asarray(decode_image(buffer.getvalue(), min_side=64)).astype(float)
    assert reduced.shape == (128, 128, 3)
    backdrop = np.array(images.TRANSPARENT_BACKDROP)
    np.testing.assert_array_equal(reduced[:, :64], np.broadcast_to([0, 0, 255], (128, 64, 3)))
    np.testing.assert_allclose(
        reduced[:, 64],
        np.broadcast_to(0.5 * np.array([0, 0, 255]) + 0.5 * backdrop, (128, 3)),
        atol=1,
    )  # no green in it
    np.testing.assert_array_equal(reduced[:, 65:], np.broadcast_to(backdrop, (128, 63, 3)))


def test_a_box_of_a_large_png_is_cut_from_the_reduced_picture_where_it_lies():
    pixels = np.zeros((800, 1200, 3), np.uint8)
    pixels[200:600, 500:900] = (255, 0, 0)  # a red square, the box around it
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    box = images.CropBox(center_x=700, center_y=400, side=400)
    cut = decode_image(buffer.getvalue(), box=box)
    reduced = decode_image(buffer.getvalue(), min_side=64, box=box)
    assert cut.size == (400, 400) and reduced.size == (133, 133)  # reduced by 3
    assert (np.asarray(reduced)[2:-2, 2:-2] == (255, 0, 0)).all()


def test_a_camera_jpeg_with_a_preview_is_reduced_while_decoding_as_a_plain_one_is():
    # Cameras add a small preview picture (MPF), and Pillow opens those files as MPO.
    picture = Image.fromarray(np.full((1000, 1500, 3), 90, np.uint8))
    plain, camera = io.BytesIO(), io.BytesIO()
    picture.save(plain, "JPEG")
    picture.save(camera, "MPO", save_all=True, append_images=[picture.resize((150, 100))])
    assert Image.open(camera).format == "MPO"
    # The decoder's own reduction (by 4) leaves more than the whole-factor reduce (by 7) would.
    assert decode_image(plain.getvalue(), min_side=64).size == (375, 250)
    assert decode_image(camera.getvalue(), min_side=64).size == (375, 250)
