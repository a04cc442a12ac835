"""Property: formatting boxes in a family's format and parsing the text gives the same boxes,
within the rounding of the model's integer grid, for any image size."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from server.grounding import Family, GroundingBox, format_boxes, parse_grounding
from server.grounding.coords import model_frame, to_model

# Phrases as a model writes them: no tag or fence characters (the formats have no escaping),
# no surrounding blanks (parsing strips them).
phrase_text = (
    st.text(
        alphabet=st.characters(
            blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="<>`"
        ),
        min_size=1,
        max_size=20,
    )
    .map(str.strip)
    .filter(bool)
)
phrases = st.one_of(st.none(), phrase_text)
image_sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000))


@st.composite
def shapes(draw, size, kinds):
    """(phrase, pixel coordinates) of a box, point or quad inside an image of `size`."""
    width, height = size
    kind = draw(st.sampled_from(kinds))
    x = st.integers(0, width)
    y = st.integers(0, height)
    if kind == "point":
        coords = [draw(x), draw(y)]
    elif kind == "quad":
        coords = [v for _ in range(4) for v in (draw(x), draw(y))]
    else:
        x1, x2 = sorted((draw(x), draw(x)))
        y1, y2 = sorted((draw(y), draw(y)))
        coords = [x1, y1, x2, y2]
    return draw(phrases), kind, coords


def _check_round_trip(family, size, model_size, entries):
    boxes_in = [(phrase, coords) for phrase, _, coords in entries]
    text = format_boxes(boxes_in, family, size, model_size=model_size)
    parsed = parse_grounding(text, family, [size], model_sizes=[model_size or size])
    assert len(parsed) == len(entries), text

    width, height = size
    frame_w, frame_h = model_frame(Family(family), model_size or size)
    tolerance_x = 0.5 * width / frame_w + 0.5
    tolerance_y = 0.5 * height / frame_h + 0.5
    for (phrase, kind, coords), box in zip(entries, parsed, strict=True):
        assert box.phrase == phrase
        assert box.kind == kind
        # The model-frame numbers are exactly those written.
        expected_grid = tuple(
            to_model(v, frame_w, width) if k % 2 == 0 else to_model(v, frame_h, height)
            for k, v in enumerate(coords)
        )
        assert box.model_box == expected_grid
        got = list(box.box) if kind == "box" else [v for p in box.points for v in p]
        for k, (want, have) in enumerate(zip(coords, got, strict=True)):
            assert abs(want - have) <= (tolerance_x if k % 2 == 0 else tolerance_y), text


@pytest.mark.parametrize("family", ["qwen-vl", "qwen2-vl"])
@settings(max_examples=150)
@given(data=st.data(), size=image_sizes)
def test_tag_families_round_trip(family, data, size):
    entries = data.draw(st.lists(shapes(size, ["box", "box", "point", "quad"]), max_size=6))
    _check_round_trip(family, size, None, entries)


@settings(max_examples=150)
@given(data=st.data(), size=image_sizes)
def test_qwen3_json_round_trip(data, size):
    entries = data.draw(st.lists(shapes(size, ["box", "box", "point"]), max_size=6))
    _check_round_trip("qwen3-vl", size, None, entries)


@settings(max_examples=150)
@given(data=st.data(), size=image_sizes, downscale=st.sampled_from([None, 1, 2, 3]))
def test_qwen25_json_round_trip_through_smart_resize(data, size, downscale):
    width, height = size
    assume(max(width, height) / min(width, height) <= 200)  # what the processor accepts
    model_size = None
    if downscale is not None:  # the server shrank the image before the processor saw it
        model_size = (max(1, width // downscale), max(1, height // downscale))
        assume(max(model_size) / min(model_size) <= 200)
    entries = data.draw(st.lists(shapes(size, ["box", "box", "point"]), max_size=6))
    _check_round_trip("qwen2.5-vl", size, model_size, entries)


def test_grounding_boxes_format_like_tuples():
    box = GroundingBox("cat", (10, 20, 30, 40), (10, 20, 30, 40), 0)
    point = GroundingBox("dot", (5, 5, 5, 5), (5, 5), 0, "point", ((5, 5),))
    size = (1000, 1000)
    assert format_boxes([box, point], "qwen-vl", size) == format_boxes(
        [("cat", (10, 20, 30, 40)), ("dot", (5, 5))], "qwen-vl", size
    )
    assert format_boxes([box], "qwen-vl", size) == "<ref>cat</ref><box>(10,20),(30,40)</box>"


def test_format_groups_a_run_of_boxes_under_one_phrase():
    text = format_boxes(
        [("apples", (1, 2, 3, 4)), ("apples", (5, 6, 7, 8)), (None, (9, 9, 10, 10))],
        "qwen2-vl",
        (1000, 1000),
    )
    assert text == (
        "<|object_ref_start|>apples<|object_ref_end|>"
        "<|box_start|>(1,2),(3,4)<|box_end|><|box_start|>(5,6),(7,8)<|box_end|>\n"
        "<|box_start|>(9,9),(10,10)<|box_end|>"
    )


def test_json_families_have_no_quad():
    with pytest.raises(ValueError):
        format_boxes([("q", (0, 0, 1, 0, 1, 1, 0, 1))], "qwen3-vl", (10, 10))
    with pytest.raises(ValueError):
        format_boxes([("q", (0, 0, 1))], "qwen-vl", (10, 10))
