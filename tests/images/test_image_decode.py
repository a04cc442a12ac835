"""Hostile and unusual images through `decode_image` (no network): each gets its error
code, or the right RGB picture when it can be converted."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image, ImageOps

from server.errors import ImageDecodeError, ImageError, ImageTooLargeError
from server.images.decode import DecodeLimits, decode_image, prepare
from server.images.family import FAMILIES

import image_samples as samples

LIMITS = DecodeLimits(max_input_pixels=50_000_000, max_frames=1000)


@pytest.fixture(autouse=True)
def _prepared():
    prepare()  # as ImageLoader does at startup (pytest resets warning filters per test)


def decode(data: bytes, family: str = "qwen2-vl", max_pixels: int | None = None, limits: DecodeLimits = LIMITS):
    return decode_image(data, limits=limits, family=FAMILIES[family], max_pixels=max_pixels)


def assert_clean_message(err: ImageError) -> None:
    """No object repr, address or library exception text in what the client sees."""
    assert not re.search(r"0x[0-9a-f]{6,}|<|Error|Traceback|PIL", err.message), err.message


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (samples.bomb_png(), ImageTooLargeError, "image_too_large"),
        (samples.header_bomb_png(), ImageTooLargeError, "image_too_large"),
        (samples.noise_jpeg(256, 256)[:3000], ImageDecodeError, "image_decode_failed"),
        (samples.noise_jpeg(256, 256)[:200], ImageDecodeError, "image_decode_failed"),
        (samples.png(256, 256, (1, 2, 3))[:-40], ImageDecodeError, "image_decode_failed"),
        (samples.png(256, 256, (1, 2, 3))[:60], ImageDecodeError, "image_decode_failed"),
        (samples.random_bytes(), ImageDecodeError, "image_decode_failed"),
        (samples.HTML, ImageDecodeError, "image_decode_failed"),
        (samples.SVG, ImageDecodeError, "image_decode_failed"),
        (b"", ImageDecodeError, "image_decode_failed"),
        (samples.animated_gif(5000), ImageTooLargeError, "image_too_large"),
        (samples.encode(Image.new("RGB", (4, 4)), "TIFF"), ImageDecodeError, "image_decode_failed"),
        (samples.encode(Image.new("RGB", (4, 4)), "ICO"), ImageDecodeError, "image_decode_failed"),
        (samples.png(1, 10000), ImageError, "invalid_image"),
        (samples.png(10000, 1), ImageError, "invalid_image"),
    ],
    ids=["bomb", "header-bomb", "truncated-jpeg", "jpeg-header-only", "truncated-png", "png-header-only",
         "random", "html", "svg", "empty", "5000-frames", "tiff", "ico", "1x10000", "10000x1"],
)
def test_refused(data, error, code):
    with pytest.raises(error) as info:
        decode(data)
    assert info.value.code == code
    assert_clean_message(info.value)


def test_pillow_bomb_guard_also_maps_to_too_large():
    # Our limit above Pillow's own: Pillow's DecompressionBombError/Warning still ends as a 400.
    with pytest.raises(ImageTooLargeError):  # above 2x Pillow's limit: DecompressionBombError
        decode(samples.header_bomb_png(20_000), limits=DecodeLimits(10**12, 1000))
    with pytest.raises(ImageTooLargeError):  # between 1x and 2x: the warning, made an error
        decode(samples.header_bomb_png(10_000), limits=DecodeLimits(10**12, 1000))


def test_frame_limit_is_configurable_and_first_frame_is_used():
    image, size = decode(samples.animated_gif(50), family="qwen-vl")
    assert size == (1, 1) and image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ImageTooLargeError):
        decode(samples.animated_gif(50), limits=DecodeLimits(50_000_000, 10))


def test_cmyk_jpeg_becomes_rgb():
    image, _ = decode(samples.cmyk_jpeg(), family="qwen-vl")
    r, g, b = image.getpixel((5, 5))
    assert image.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_16_bit_png_is_scaled_not_clipped():
    image, _ = decode(samples.png16_rgb(8, 8, (65535, 0, 32768)), family="qwen-vl")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 128)
    grey, _ = decode(samples.png16_grey([0, 30000, 65535]), family="qwen-vl")
    assert [grey.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (117, 117, 117), (255, 255, 255)]


def test_exif_orientation_is_applied():
    data = samples.rotated_jpeg()
    image, size = decode(data, family="qwen-vl")
    assert size == (20, 40) and image.size == (20, 40)
    top, bottom = image.getpixel((10, 2)), image.getpixel((10, 37))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert image.tobytes() == expected.tobytes()


def test_rotated_jpeg_is_resized_in_display_orientation():
    image, size = decode(samples.rotated_jpeg(), family="qwen2-vl", max_pixels=3136)
    assert size == (20, 40)
    assert image.size[0] < image.size[1]


def test_alpha_and_palette_transparency_composite_on_white():
    image, _ = decode(samples.transparent_png(), family="qwen-vl")
    assert image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((5, 5)) == (255, 255, 255)
    image, _ = decode(samples.palette_png_with_transparency(), family="qwen-vl")
    assert image.getpixel((0, 0)) == (0, 255, 0) and image.getpixel((5, 5)) == (255, 255, 255)
    for mode, color in (("L", 128), ("LA", (128, 255)), ("1", 1), ("P", 3)):
        image, _ = decode(samples.png(4, 4, color, mode=mode), family="qwen-vl")
        assert image.mode == "RGB"


def test_tiny_and_elongated_images():
    image, size = decode(samples.png(1, 1))
    assert size == (1, 1) and image.size == (28, 28) and image.getpixel((3, 3)) == (255, 0, 0)
    image, size = decode(samples.png(1, 1), family="qwen-vl")
    assert image.size == (1, 1)
    image, size = decode(samples.png(1, 10000), family="qwen-vl")  # Qwen-VL stretches to 448x448 itself
    assert size == (1, 10000)
    image, _ = decode(samples.png(3, 500))
    assert image.size == (28, 4667)


def test_pixel_ceiling_and_jpeg_draft():
    data = samples.noise_jpeg(3000, 2000)
    image, size = decode(data, max_pixels=500_000)
    assert size == (3000, 2000)
    assert image.width * image.height <= 500_000 and image.mode == "RGB"
    assert abs(image.width / image.height - 1.5) < 0.01
    full, _ = decode(data)
    assert full.size == (3000, 2000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_allowed_formats_decode(fmt):
    image, size = decode(samples.encode(Image.new("RGB", (64, 40), (0, 128, 255)), fmt))
    assert size == (64, 40) and image.mode == "RGB" and image.size == (64, 40)


def test_animated_png_and_webp_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("PNG", "WEBP"):
        extra = {"lossless": True} if fmt == "WEBP" else {}
        data = samples.encode(frames[0], fmt, save_all=True, append_images=frames[1:], **extra)
        image, _ = decode(data)
        assert image.getpixel((8, 8)) == (255, 0, 0)
        with pytest.raises(ImageTooLargeError):
            decode(data, limits=DecodeLimits(50_000_000, 2))
