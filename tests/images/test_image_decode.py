"""Hostile and unusual images through `decode_image` (no network): each gets its error
code, or the right RGB picture when it can be converted."""

from __future__ import annotations

import io
import re
import struct
import zlib

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


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_a_container_of_countless_empty_segments_is_refused_before_pillow_walks_it(fmt):
    """Pillow parses these segments in Python, about a microsecond and a half each: the
    budget is 65,536 steps plus one per 128 bytes."""
    assert decode(samples.fragmented(fmt, 1000))[1] == (16, 16)  # a few are harmless
    with pytest.raises(ImageDecodeError) as info:
        decode(samples.fragmented(fmt, 200_000))
    assert info.value.code == "image_decode_failed" and "too many small segments" in info.value.message
    assert_clean_message(info.value)


def test_a_jpeg_with_hundreds_of_scans_is_refused():
    assert decode(samples.progressive_jpeg(400))[1] == (64, 64)
    with pytest.raises(ImageDecodeError) as info:
        decode(samples.progressive_jpeg(600))
    assert re.search(r"has 6\d\d scans; at most 500", info.value.message), info.value.message
    assert_clean_message(info.value)


def test_a_large_jpeg_may_hold_fewer_scans():
    """Each scan is a pass over the whole picture: 499 scans of a 7000x7000 JPEG (325 KB) took
    27 s of a decode thread. The bound is scans times pixels (50 scans at 50 megapixels)."""
    from server.images.layout import check_layout, max_jpeg_scans

    assert max_jpeg_scans(64, 64) == 500 and max_jpeg_scans(7000, 7000) == 51
    assert max_jpeg_scans(4000, 3000) == 208 and max_jpeg_scans(100_000, 100_000) == 16
    check_layout(samples.progressive_jpeg(140, size=4000))  # 16 megapixels: 156 scans may pass
    with pytest.raises(ImageDecodeError) as info:
        decode(samples.progressive_jpeg(200, size=4000))
    assert re.search(r"has 2\d\d scans; at most 156 are accepted at 4000x4000 pixels", info.value.message)
    assert_clean_message(info.value)


def test_scans_hidden_behind_an_escaped_ff_are_counted():
    """FF 00 after the SOI once led the walk (which took it for a marker with a length) past
    the file's end before it reached any scan, so none was counted: a 156 KB file of 3,000
    scans then took 6 s of a decode thread."""
    assert decode(samples.progressive_jpeg_behind_escaped_ff(400))[1] == (64, 64)  # still a JPEG to Pillow
    with pytest.raises(ImageDecodeError) as info:
        decode(samples.progressive_jpeg_behind_escaped_ff(600))
    assert re.search(r"has 6\d\d scans; at most 500", info.value.message), info.value.message


@pytest.mark.parametrize(("sample", "fmt"), [
    (samples.jpeg_with_framed_junk, "JPEG"),
    (samples.gif_with_junk, "GIF"),
], ids=["jpeg-framed-by-escaped-ff", "gif"])
def test_stray_bytes_that_pillow_skips_one_by_one_count_against_the_budget(sample, fmt):
    image, size = decode(sample(1000))  # a few are harmless
    assert size == (16, 16) and image.getpixel((8, 8))[1] > 150
    with pytest.raises(ImageDecodeError) as info:
        decode(sample(400_000))  # 400,000 steps against a budget of 68,661
    assert "too many small segments" in info.value.message
    assert_clean_message(info.value)


def test_a_large_run_length_encoded_bmp_is_refused_before_pillow_decodes_it():
    """Pillow decodes RLE BMPs in Python: 30 KB of 7071x7071 pixels took seconds of a decode
    thread. Small ones (icons, old screenshots) still decode."""
    image, size = decode(samples.rle8_bmp(64, 64))
    assert size == (64, 64) and image.mode == "RGB"
    data = samples.rle8_bmp(7071, 7071)
    assert len(data) < 30_000
    with pytest.raises(ImageTooLargeError) as info:
        decode(data)
    assert "run-length-encoded BMP is 7071x7071" in info.value.message
    assert_clean_message(info.value)


@pytest.mark.parametrize("idat", [
    b"\x78\x01\x07\x00",  # a zlib header, then a deflate block of the reserved type
    zlib.compress((b"\x00" + b"\x80" * 3 * 256) * 100 + b"\x07" + b"\x80" * 3 * 256),  # a filter type PNG does not have
], ids=["bad-deflate-block", "bad-row-filter"])
def test_a_png_whose_pixel_data_is_corrupt_is_refused_not_half_black(idat):
    """Reading the EXIF loads a PNG's pixels; the decoder error there was taken for bad EXIF,
    and the picture went on partly black."""
    with pytest.raises(ImageDecodeError) as info:
        decode(samples.raw_png(256, 256, 8, 2, idat=idat))
    assert info.value.code == "image_decode_failed"


@pytest.mark.filterwarnings("ignore:.*[Tt]ag")  # (Pillow's note on each skipped tag)
def test_exif_tags_sharing_one_large_block_are_not_copied_each():
    """2,000 EXIF tags pointing at one 1 MB block: Pillow before 13 copied the block for every
    tag while reading the orientation (1.9 GB from a 1 MB file); the project needs 13."""
    import tracemalloc

    data = samples.exif_amplifier_png(2000, 1_000_000)
    assert len(data) < 1_100_000
    tracemalloc.start()
    try:
        image, size = decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == (1, 1) and image.size == (1, 1)
    assert peak < 50_000_000, peak


def test_pillow_bomb_guard_also_maps_to_too_large():
    # Our limit above Pillow's own: Pillow's DecompressionBombError/Warning still ends as a 400.
    with pytest.raises(ImageTooLargeError):  # above 2x Pillow's limit: DecompressionBombError
        decode(samples.header_bomb_png(20_000), limits=DecodeLimits(10**12, 1000))
    with pytest.raises(ImageTooLargeError):  # between 1x and 2x: the warning, made an error
        decode(samples.header_bomb_png(10_000), limits=DecodeLimits(10**12, 1000))


def test_a_limit_above_pillows_own_is_honoured(monkeypatch):
    """--image-max-input-pixels 150 M: a 90 M-pixel picture (over Pillow's default bomb
    threshold of 89.5 M) decodes; one over the setting is still refused, by our check."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    limits = DecodeLimits(150_000_000, 1000)
    prepare(limits.max_input_pixels)
    buf = io.BytesIO()
    Image.new("L", (9500, 9500), 128).save(buf, "JPEG", quality=50)
    out, size = decode(buf.getvalue(), max_pixels=448 * 448, limits=limits)
    assert size == (9500, 9500) and out.size == (448, 448) and out.getpixel((5, 5)) == (128, 128, 128)
    with pytest.raises(ImageTooLargeError) as info:
        decode(buf.getvalue(), limits=DecodeLimits(90_000_000, 1000))
    assert info.value.message == "The image is 9500x9500 pixels; at most 90,000,000 pixels are accepted."


def test_oversized_png_metadata_is_named():
    from PIL import PngImagePlugin

    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=True)
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=info)
    assert len(buf.getvalue()) < 20_000  # a small file whose text inflates past Pillow's cap
    with pytest.raises(ImageTooLargeError) as err:
        decode(buf.getvalue())
    assert "metadata" in err.value.message
    assert_clean_message(err.value)


def test_frame_limit_is_configurable_and_first_frame_is_used():
    image, size = decode(samples.animated_gif(50))
    assert size == (1, 1) and image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ImageTooLargeError):
        decode(samples.animated_gif(50), limits=DecodeLimits(50_000_000, 10))


def test_cmyk_jpeg_becomes_rgb():
    image, _ = decode(samples.cmyk_jpeg())
    r, g, b = image.getpixel((5, 5))
    assert image.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_16_bit_png_is_scaled_not_clipped():
    image, _ = decode(samples.png16_rgb(8, 8, (65535, 0, 32768)))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 128)
    grey, _ = decode(samples.png16_grey([0, 30000, 65535]))
    assert [grey.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (117, 117, 117), (255, 255, 255)]


def test_exif_orientation_is_applied():
    data = samples.rotated_jpeg()
    image, size = decode(data)
    assert size == (20, 40) and image.size == (20, 40)
    top, bottom = image.getpixel((10, 2)), image.getpixel((10, 37))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert image.tobytes() == expected.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("max_pixels", [None, 3136])
def test_the_engine_sees_the_picture_upright_once(orientation, max_pixels):
    """vLLM applies EXIF orientation to every image it is handed (its `normalize_image`);
    the decoded image must carry none, or the engine turns it a second time."""
    from vllm.multimodal.image import normalize_image

    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 10))  # a quadrant, so every transpose shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = samples.encode(stored, "PNG", exif=exif.tobytes())  # lossless: pixels compare exactly
    for family in ("qwen-vl", "qwen2-vl"):
        image, size = decode(data, family=family, max_pixels=max_pixels)
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        assert size == upright.size
        seen = normalize_image(image)
        assert seen.size == image.size and seen.tobytes() == image.tobytes()
        if image.size == upright.size:
            assert image.tobytes() == upright.tobytes()


def test_rotated_jpeg_is_resized_in_display_orientation():
    image, size = decode(samples.rotated_jpeg(), family="qwen2-vl", max_pixels=3136)
    assert size == (20, 40)
    assert image.size[0] < image.size[1]


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_alpha_and_palette_transparency_composite_on_white(family):
    image, _ = decode(samples.transparent_png(), family=family)
    assert image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((5, 5)) == (255, 255, 255)
    image, _ = decode(samples.palette_png_with_transparency(), family=family)
    assert image.getpixel((0, 0)) == (0, 255, 0) and image.getpixel((5, 5)) == (255, 255, 255)
    image, _ = decode(samples.rgb_png_with_colour_key(), family=family)
    assert image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((5, 5)) == (255, 255, 255)
    image, _ = decode(samples.encode(Image.new("L", (8, 8), 0), "PNG", transparency=0), family=family)
    assert image.getpixel((5, 5)) == (255, 255, 255)  # a greyscale colour key too
    for mode, color in (("L", 128), ("LA", (128, 255)), ("1", 1), ("P", 3)):
        image, _ = decode(samples.png(4, 4, color, mode=mode), family=family)
        assert image.mode == "RGB"


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_the_colour_key_of_1_2_4_and_16_bit_greyscale_matches_its_own_pixels(family):
    """Pillow scales 1-, 2- and 4-bit grey up to 8 bits but kept the key as the file's sample
    value (and drops a 1-bit image's key), so the key's pixels stayed their grey: black for
    1-bit key 0, 85 for 2-bit key 1. A 16-bit key matches the 16-bit samples only."""
    white, black = (255, 255, 255), (0, 0, 0)
    for depth, row, key, expected in (
            (1, bytes([0b01111111]), 0, [white] * 8),  # key 0: the black pixel
            (2, bytes([0b00011011]), 1, [black, white, (170,) * 3, white]),  # pixels 0-3, key 1 (grey 85)
            (4, bytes([0x01, 0x2F]), 1, [black, white, (34,) * 3, white])):  # key 1 (grey 17)
        width = len(row) * 8 // depth
        data = samples.raw_png(width, 1, depth, 0, rows=[row], trns=struct.pack(">H", key))
        image, _ = decode(data, family=family)
        pixels = [image.resize((width, 1), Image.Resampling.NEAREST).getpixel((x, 0)) for x in range(width)]
        assert pixels == expected, (depth, pixels)
    values = [0x1234, 0x1235, 0x12FF]  # the same high byte: only the first is the key
    data = samples.raw_png(3, 1, 16, 0, rows=[b"".join(struct.pack(">H", v) for v in values)],
                           trns=struct.pack(">H", 0x1234))
    image, _ = decode(data, family=family)
    assert image.resize((3, 1), Image.Resampling.NEAREST).getpixel((0, 0)) == (255, 255, 255)
    assert image.resize((3, 1), Image.Resampling.NEAREST).getpixel((2, 0)) == (0x12, 0x12, 0x12)


def test_qwen_vl_drops_transparency_as_its_published_pipeline_does():
    """Qwen-VL's own `visual.py` opens a picture and calls `convert("RGB")`: the colour
    under a transparent pixel stays (here red, or the palette's black), not white."""
    for data in (samples.transparent_png(), samples.palette_png_with_transparency(),
                 samples.rgb_png_with_colour_key(), samples.png(4, 4, (128, 0), mode="LA")):
        image, _ = decode(data, family="qwen-vl")
        expected = Image.open(io.BytesIO(data)).convert("RGB").resize((448, 448), Image.Resampling.BICUBIC)
        assert image.mode == "RGB" and image.tobytes() == expected.tobytes()
    image, _ = decode(samples.transparent_png(), family="qwen-vl")
    assert image.getpixel((447, 447)) == (255, 0, 0)


@pytest.mark.parametrize("make", [
    lambda: samples.noise_jpeg(1200, 900),  # larger than the square: no JPEG draft, the full decode
    lambda: samples.noise_jpeg(300, 200),
    lambda: samples.encode(Image.new("RGB", (990, 5), (10, 200, 30)), "PNG"),
    samples.rotated_jpeg,
])
def test_qwen_vl_pictures_reach_its_model_as_its_processor_made_them(make):
    """The plugin's preprocessing of the decoded picture (already its square) gives the very
    tensor it gave for the upright picture as sent (which it stretched itself)."""
    from server.qwen_vl.image import preprocess_image

    data = make()
    image, size = decode(data, family="qwen-vl")
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert image.size == (448, 448) and size == upright.size
    assert preprocess_image(image, 448).equal(preprocess_image(upright, 448))
    # a ceiling under the square: the picture is downscaled, its shape kept
    small, _ = decode(data, family="qwen-vl", max_pixels=20_000)
    assert small.width * small.height <= 20_000 or small.size == upright.size
    assert abs(small.width / small.height - upright.width / upright.height) < 0.2 * upright.width / upright.height


def test_an_elongated_picture_is_refused_before_its_pixels_are_decoded(monkeypatch):
    from PIL import ImageFile

    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: loads.append(im.size))
    for family in ("qwen-vl", "qwen2-vl", "qwen3-vl"):
        with pytest.raises(ImageError) as info:
            decode(samples.png(1, 300), family=family)
        assert "aspect ratio" in info.value.message and loads == []


def test_a_thin_picture_of_a_few_bytes_is_refused_at_once():
    """69 bytes of PNG: 1x49,000,000 grey pixels, four rows of them in the data. Qwen-VL
    took it (3 s to decode, then 10 s and 3 GB in its processor's resize, on the event loop)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") + (49_000_000).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\x07" * 4))
            + chunk(b"IEND", b""))
    assert len(data) < 100
    for family in ("qwen-vl", "qwen2-vl"):
        with pytest.raises(ImageError) as info:
            decode(data, family=family)
        assert info.value.code == "invalid_image" and "1x49000000" in info.value.message


def test_tiny_and_elongated_images():
    # Left as they are: the model's processor enlarges them to its own minimum.
    image, size = decode(samples.png(1, 1))
    assert size == (1, 1) and image.size == (1, 1) and image.getpixel((0, 0)) == (255, 0, 0)
    image, size = decode(samples.png(1, 1), family="qwen-vl")  # stretched to Qwen-VL's square
    assert size == (1, 1) and image.size == (448, 448) and image.getpixel((200, 300)) == (255, 0, 0)
    image, size = decode(samples.png(1, 200), family="qwen-vl")
    assert size == (1, 200) and image.size == (448, 448)
    image, _ = decode(samples.png(3, 500))
    assert image.size == (3, 500)


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
