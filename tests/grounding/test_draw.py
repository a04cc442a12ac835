"""Drawing: pixels of the written PNG, colours, labels inside the picture, Chinese glyphs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from server.grounding import GroundingBox, parse_grounding
from server.grounding.draw import (
    PALETTE,
    assign_colours,
    colour_for,
    draw_boxes,
    fit_text,
    label_origin,
)
from server.grounding.fonts import find_cjk_font, has_cjk_glyphs, load_font

GREY = (128, 128, 128)


def box(phrase, coords, kind="box", points=()):
    return GroundingBox(phrase, coords, tuple(coords), 0, kind, points)


def written(tmp_path, image, boxes, **kwargs):
    """Draw, write the PNG, and read it back as the user would."""
    path = tmp_path / "out.png"
    draw_boxes(image, boxes, **kwargs).save(path, format="PNG")
    with Image.open(path) as png:
        assert png.format == "PNG"
        return png.convert("RGB")


def test_box_edges_are_drawn_where_the_box_is(tmp_path):
    image = Image.new("RGB", (200, 150), GREY)
    # The Qwen-VL answer, on a 0-1000 grid: (200,333)-(800,800) of a 200x150 picture.
    boxes = parse_grounding(
        "<ref>击掌</ref><box>(200,333),(800,800)</box>", "qwen-vl", [image.size]
    )
    assert boxes[0].box == (40, 50, 160, 120)
    png = written(tmp_path, image, boxes)
    colour = colour_for(0)
    # Outline 2 px wide inside the edges; x2/y2 are exclusive edges.
    for xy in [(40, 85), (41, 85), (159, 85), (158, 85), (100, 119), (100, 118), (150, 50)]:
        assert png.getpixel(xy) == colour, xy
    for xy in [(42, 85), (157, 85), (100, 85), (39, 85), (160, 85), (100, 121), (10, 140)]:
        assert png.getpixel(xy) == GREY, xy
    assert png.size == image.size


def test_input_image_is_left_untouched():
    image = Image.new("RGB", (50, 50), GREY)
    draw_boxes(image, [box("x", (5, 5, 40, 40))])
    assert image.getcolors() == [(2500, GREY)]


def test_phrases_get_distinct_colours_and_repeats_share_theirs():
    boxes = [
        box("cake", (0, 0, 1, 1)),
        box("cup", (0, 0, 1, 1)),
        box("cake", (0, 0, 1, 1)),
        box(None, (0, 0, 1, 1)),
        box(None, (0, 0, 1, 1)),
    ]
    colours = assign_colours(boxes)
    assert colours[0] == colours[2]
    assert len({colours[0], colours[1], colours[3], colours[4]}) == 4
    assert len({colour_for(i) for i in range(200)}) == 200  # never runs out


def test_two_phrases_are_drawn_in_two_colours(tmp_path):
    image = Image.new("RGB", (300, 200), GREY)
    png = written(tmp_path, image, [box("a", (20, 80, 100, 180)), box("b", (150, 80, 280, 180))])
    assert png.getpixel((20, 150)) == PALETTE[0]
    assert png.getpixel((150, 150)) == PALETTE[1]


def test_points_and_quads(tmp_path):
    image = Image.new("RGB", (200, 200), GREY)
    point = box("p", (50, 60, 50, 60), "point", ((50, 60),))
    quad = box("q", (100, 100, 180, 180), "quad", ((100, 100), (180, 100), (180, 180), (100, 180)))
    png = written(tmp_path, image, [point, quad])
    assert png.getpixel((50, 60)) == PALETTE[0]
    assert png.getpixel((180, 140)) == PALETTE[1]  # right side of the quad
    assert png.getpixel((140, 140)) == GREY


def test_degenerate_boxes_do_not_fail(tmp_path):
    image = Image.new("RGB", (10, 10), GREY)
    written(tmp_path, image, [box("flat", (3, 3, 3, 9)), box("zero", (0, 0, 0, 0))])


def _pixels_of(png, colour):
    width, height = png.size
    return [(x, y) for y in range(height) for x in range(width) if png.getpixel((x, y)) == colour]


def test_label_at_the_right_edge_moves_left_into_the_picture(tmp_path):
    image = Image.new("RGB", (300, 200), GREY)
    png = written(tmp_path, image, [box("a rather long label", (280, 100, 300, 150))])
    filled = _pixels_of(png, PALETTE[0])
    xs = [x for x, _ in filled]
    assert min(xs) < 280  # the tag starts left of the box instead of running off the right
    assert max(xs) == 299


def test_label_of_a_box_at_the_top_goes_inside_it(tmp_path):
    image = Image.new("RGB", (300, 200), GREY)
    png = written(tmp_path, image, [box("top", (100, 0, 200, 100))])
    tag_rows = [y for x, y in _pixels_of(png, PALETTE[0]) if 110 <= x <= 115]
    assert min(tag_rows) == 0 and max(tag_rows) > 5  # a filled tag below the top edge


def test_a_label_wider_than_the_picture_is_shortened():
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = load_font(14)
    room = 100
    short = fit_text(draw, "x" * 500, font, room)
    assert short.endswith("…") and short[:-1] == "x" * (len(short) - 1)
    assert draw.textlength(short, font=font) <= room
    assert draw.textlength(short[:-1] + "x…", font=font) > room  # the longest that fits
    assert fit_text(draw, "fits", font, room) == "fits"


@given(
    corner=st.tuples(st.integers(-50, 3000), st.integers(-50, 3000)),
    tag=st.tuples(st.integers(1, 400), st.integers(1, 60)),
    image=st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
)
def test_label_tags_stay_inside_the_image_whenever_they_fit(corner, tag, image):
    x, y = label_origin(corner, tag, image)
    assert x >= 0 and y >= 0
    if tag[0] <= image[0]:
        assert x + tag[0] <= image[0]
    if tag[1] <= image[1]:
        assert y + tag[1] <= image[1]


def test_a_cjk_font_is_installed():
    font = find_cjk_font()
    assert font is not None, (
        "no font with Chinese glyphs: install Debian's fonts-wqy-microhei (deploy/install.sh)"
    )
    assert has_cjk_glyphs(font)


def test_chinese_labels_are_drawn_as_real_glyphs(tmp_path):
    # Without CJK glyphs both labels would be the same two ".notdef" boxes.
    image = Image.new("RGB", (200, 100), GREY)
    first = written(tmp_path, image, [box("击掌", (20, 50, 180, 90))])
    second = written(tmp_path, image, [box("东方", (20, 50, 180, 90))])
    assert first.tobytes() != second.tobytes()


def test_an_explicit_font_that_cannot_load_raises(tmp_path):
    with pytest.raises(OSError):
        draw_boxes(Image.new("RGB", (10, 10)), [box("a", (1, 1, 5, 5))], font_path=tmp_path / "x")
