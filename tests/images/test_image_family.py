"""Model-family shape rules: what reaches the Qwen2-VL processor never makes its
`smart_resize` raise, and the pixel ceiling can be lowered per request but never raised."""

from __future__ import annotations

import random

import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from server.errors import ImageError
from server.images.family import FAMILIES, check_shape, effective_max_pixels, family_spec, target_size

QWEN2 = FAMILIES["qwen2-vl"]
QWEN3 = FAMILIES["qwen3-vl"]
QWEN1 = FAMILIES["qwen-vl"]


def test_unknown_family():
    with pytest.raises(ValueError):
        family_spec("llava")


def test_ceiling_only_goes_down():
    assert effective_max_pixels(QWEN2, None, None) == 12_845_056
    assert effective_max_pixels(QWEN2, 1_000_000, None) == 1_000_000
    assert effective_max_pixels(QWEN2, 1_000_000, 500_000) == 500_000
    assert effective_max_pixels(QWEN2, 1_000_000, 50_000_000) == 1_000_000  # never raised
    assert effective_max_pixels(QWEN2, None, 10) == QWEN2.min_pixels  # floored
    assert effective_max_pixels(QWEN1, None, None) is None
    assert effective_max_pixels(QWEN1, None, 200_000) == 200_000
    assert effective_max_pixels(QWEN3, None, None) == 16_777_216


def test_low_detail_caps_the_ceiling_where_the_family_has_a_cost_per_pixel():
    assert effective_max_pixels(QWEN2, None, None, "low") == 448 * 448
    assert effective_max_pixels(QWEN3, None, None, "low") == 448 * 448
    assert effective_max_pixels(QWEN2, 100_000, None, "low") == 100_000  # the server's lower ceiling stays
    assert effective_max_pixels(QWEN2, None, 50_000, "low") == 50_000  # and the request's
    for detail in ("high", "auto", None):
        assert effective_max_pixels(QWEN2, None, None, detail) == 12_845_056
    # Qwen-VL resizes every picture to 448x448 itself: "low" changes nothing.
    assert effective_max_pixels(QWEN1, None, None, "low") is None


def test_extreme_aspect_ratio_is_refused_for_every_family():
    """Qwen-VL's processor takes any shape, but stretched to a square a 1x49,000,000 picture
    (69 bytes as a PNG) is noise that took 13 s and 3 GB to decode and resize."""
    for spec in (QWEN1, QWEN2, FAMILIES["qwen2.5-vl"], QWEN3):
        with pytest.raises(ImageError) as info:
            check_shape(spec, 1, 10_000)
        assert info.value.code == "invalid_image"
        assert "aspect ratio" in info.value.message
        check_shape(spec, 1, 200)
        check_shape(spec, 200, 1)


def test_small_images_are_left_to_the_processor():
    """Its own `min_pixels` rule enlarges them: a 5x1000 strip becomes 28x812 (29 image
    tokens), where stretching its short side to 28 first made it 28x5600 (200 tokens)."""
    for spec in (QWEN2, QWEN3):
        for size in ((1, 1), (10, 100), (5, 1000), (27, 27), (100, 27)):
            assert target_size(spec, *size, None) == size
    assert smart_resize(1000, 5, factor=28, min_pixels=3136, max_pixels=12_845_056) == (812, 28)


def test_qwen_vl_pictures_get_its_square_unless_a_ceiling_asks_for_less():
    for size in ((1, 1), (10, 100), (5, 1000), (448, 448), (4000, 3000)):
        assert target_size(QWEN1, *size, None) == (448, 448)
        assert target_size(QWEN1, *size, 448 * 448) == (448, 448)
    assert target_size(family_spec("qwen-vl", square_side=224), 4000, 3000, None) == (224, 224)
    assert family_spec("qwen2-vl", square_side=224).square_side is None  # (keeps its aspect ratio)
    # a ceiling under the square: fewer pixels, the aspect ratio kept (the processor stretches them)
    w, h = target_size(QWEN1, 4000, 3000, 100_000)
    assert w * h <= 100_000 and abs(w / h - 4 / 3) < 0.01
    assert target_size(QWEN1, 200, 100, 100_000) == (200, 100)


def test_downscale_respects_the_ceiling_and_ratio():
    w, h = target_size(QWEN2, 4000, 3000, 1_000_000)
    assert w * h <= 1_000_000 and abs(w / h - 4 / 3) < 0.05
    assert target_size(QWEN2, 640, 480, 1_000_000) == (640, 480)  # under the ceiling: as it is


@pytest.mark.parametrize("spec", [QWEN2, QWEN3])
def test_a_downscaled_picture_is_one_the_processor_keeps(spec):
    """Sides on the processor's grid and the area under the ceiling: `smart_resize` with the
    same ceiling leaves the size alone, so the ceiling bounds the image tokens exactly."""
    rng = random.Random(11)
    for _ in range(2000):
        width, height = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(width, height) > 200 * min(width, height):
            continue
        ceiling = rng.choice([200_704, 409_600, 1_003_520])
        w, h = target_size(spec, width, height, ceiling)
        if width * height <= ceiling:
            continue
        assert w % spec.factor == 0 and h % spec.factor == 0 and w * h <= ceiling
        assert smart_resize(h, w, factor=spec.factor, min_pixels=spec.min_pixels, max_pixels=ceiling) == (h, w)
    # 700x560 under a 448x448 ceiling: 476x392 (238 tokens), not 504x392 (252).
    assert target_size(QWEN2, 700, 560, 448 * 448) == (476, 392)


@pytest.mark.parametrize("spec", [QWEN2, QWEN3])
def test_a_thin_picture_keeps_under_a_small_ceiling(spec):
    """Its short side cannot shrink below one patch, so the long side gives way: a 3000x16
    picture under max_pixels 20,000 was sent as 1920x32 (three times the ceiling, and more
    tokens than with no ceiling at all). Nor does keeping the aspect ratio within 200:1 after
    rounding take it over the ceiling or off the processor's grid (7585x41 under 247,247
    pixels went out as 7588x38)."""
    f = spec.factor
    assert target_size(spec, 3000, 16, 20_000) == (20_000 // (f * f) * f, f)
    assert target_size(spec, 16, 3000, 20_000) == (f, 20_000 // (f * f) * f)
    rng = random.Random(5)
    for _ in range(2000):
        short, ratio = rng.randint(1, 60), rng.randint(2, 200)
        width, height = (short * ratio, short) if rng.random() < 0.5 else (short, short * ratio)
        ceiling = rng.randint(1, 400_000)
        w, h = target_size(spec, width, height, ceiling)
        if width * height > ceiling:
            assert w * h <= max(ceiling, f * f), (width, height, ceiling, w, h)
            assert w % f == 0 and h % f == 0 and max(w, h) <= 200 * min(w, h)


@pytest.mark.parametrize("spec", [QWEN2, QWEN3])
def test_smart_resize_accepts_every_image_we_pass_on(spec):
    rng = random.Random(7)
    shapes = [(1, 1), (1, 200), (200, 1), (41, 8190), (8190, 41), (3, 599), (27, 27), (28, 5600), (1, 150)]
    shapes += [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(300)]
    shapes += [(s := rng.randint(1, 60), min(s * rng.randint(100, 200), 12000)) for _ in range(300)]
    for width, height in shapes:
        try:
            check_shape(spec, width, height)
        except ImageError:
            continue
        for ceiling in (None, 3136, 200_000, 1_003_520):
            limit = effective_max_pixels(spec, None, ceiling)
            w, h = target_size(spec, width, height, limit)
            assert max(w, h) <= 200 * min(w, h)
            # The processor's own call (the checkpoint defaults) must not raise.
            resized = smart_resize(h, w, factor=spec.factor, min_pixels=3136, max_pixels=12_845_056)
            assert min(resized) >= spec.factor
