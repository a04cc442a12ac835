"""Broken, hostile and random input: never an exception, only what can be recovered, and
in linear time."""

from __future__ import annotations

import gc
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.grounding import Family, parse_grounding

SIZE = (1000, 500)  # a 0-1000 grid maps x 1:1 and halves y: easy to read below


def parse(text, family="qwen-vl", sizes=(SIZE,)):
    return parse_grounding(text, family, list(sizes))


# --- recoverable damage ---------------------------------------------------------------------


def test_unclosed_box_at_the_end_keeps_its_complete_pairs():
    (box,) = parse("<ref>dog</ref><box>(10,20),(30,40)")
    assert (box.phrase, box.model_box) == ("dog", (10, 20, 30, 40))


@pytest.mark.parametrize(
    "text",
    [
        "<ref>dog</ref><box>(10,20),(30,",  # cut inside the second pair
        "<ref>dog</ref><box>(10,20)",  # a lone pair may be half a box when the tag is open
        "<ref>dog</ref><box>(10,20),(30,40",  # the last number may be cut short
        "<ref>dog",
        '[{"bbox_2d": [10, 20, 30, 4',
    ],
)
def test_truncated_streams_give_nothing_uncertain(text):
    assert parse(text) == []


def test_unclosed_box_followed_by_prose_keeps_the_pairs_before_the_prose():
    (box,) = parse("<box>(10,20),(30,40) is where it is")
    assert box.model_box == (10, 20, 30, 40)


@pytest.mark.parametrize(
    "text",
    [
        "<box>(a,20),(30,40)</box>",
        "<box>(10,20),(30,forty)</box>",
        "<box>(10,20) and (30,40)</box>",  # a word could shift which numbers pair up
        "<box>(1e999,20),(30,40)</box>",
        '{"bbox_2d": ["a", 20, 30, 40]}',
        '{"bbox_2d": [10, 20, 30]}',
        '{"bbox_2d": [10, 20, 30, 40, 50]}',
        '{"bbox_2d": [10, 20, null, 40]}',
        '{"bbox_2d": [1e999, 20, 30, 40]}',
        '{"point_2d": [1, 2, 3]}',
    ],
)
def test_non_numbers_and_wrong_arity_drop_the_box(text):
    assert parse(text) == []


def test_numeric_strings_in_json_are_numbers():
    (box,) = parse('{"bbox_2d": ["10", "20", "30", "40"], "label": "x"}')
    assert box.model_box == (10, 20, 30, 40)


def test_swapped_corners_are_put_in_order_but_model_box_is_kept():
    (box,) = parse("<box>(600,700),(100,200)</box>")
    assert box.model_box == (600, 700, 100, 200)
    assert box.box == (100, 100, 600, 350)


def test_out_of_range_values_are_clamped_to_the_image():
    (tagged,) = parse("<box>(-20,-5),(1500,2000)</box>")
    assert tagged.box == (0, 0, 1000, 500)
    huge = "9" * 300  # a finite float, far outside any image
    (json_box,) = parse(f'{{"bbox_2d": [-10, -10, {huge}, 1e30]}}')
    assert json_box.box == (0, 0, 1000, 500)
    # whole numbers come back as ints only where every JSON reader keeps them exact
    assert json_box.to_dict()["model_box"] == [-10, -10, float(huge), 1e30]
    assert [type(v) for v in json_box.to_dict()["model_box"]] == [int, int, float, float]


def test_decimals_and_signs_are_numbers():
    (box,) = parse("<box>(10.5,+20),(30.25,40.)</box>")
    assert box.model_box == (10.5, 20, 30.25, 40)


def test_truncated_label_gives_a_box_without_phrase():
    (box,) = parse('[{"bbox_2d": [10, 20, 30, 40], "label": "small ca')
    assert (box.phrase, box.model_box) == (None, (10, 20, 30, 40))


def test_unclosed_fence_and_unclosed_list():
    (box,) = parse('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "a"}')
    assert box.phrase == "a"


def test_json_after_prose_with_apostrophes():
    (box,) = parse('Here\'s the box: {"bbox_2d": [10, 20, 30, 40], "label": "it\'s"}')
    assert box.phrase == "it's"


def test_python_literal_with_single_quotes():
    boxes = parse("[{'bbox_2d': [10, 20, 30, 40], 'label': 'cat'}, {'bbox_2d': [1, 2, 3, 4]}]")
    assert [b.phrase for b in boxes] == ["cat", None]


def test_nested_objects_and_escapes():
    text = (
        '{"result": {"objects": [{"name": "cpu \\"i3\\" \\u4e2d", "bbox_2d": [8, 67, 299, 275]}]}}'
    )
    (box,) = parse(text)
    assert box.phrase == 'cpu "i3" 中'


def test_missing_commas_between_members():
    (box,) = parse('{"label": "a" "bbox_2d": [1, 2, 3, 4]}')
    assert (box.phrase, box.model_box) == ("a", (1, 2, 3, 4))


def test_fenced_code_is_preferred_to_numbers_in_prose():
    text = 'I think {"bbox": [1, 2, 3, 4]} maybe.\n```json\n[{"bbox_2d": [5, 6, 7, 8]}]\n```'
    assert [b.model_box for b in parse(text)] == [(5, 6, 7, 8)]


def test_prose_between_boxes_ends_the_phrase_run():
    boxes = parse("<ref>dog</ref><box>(1,2),(3,4)</box> and <box>(5,6),(7,8)</box>")
    assert [b.phrase for b in boxes] == ["dog", None]
    boxes = parse("<ref>dog</ref><box>(1,2),(3,4)</box>\n<box>(5,6),(7,8)</box>")
    assert [b.phrase for b in boxes] == ["dog", None]


def test_coordinates_right_after_a_phrase_without_box_tags():
    # The shape of the Qwen2.5-VL fine-tuning data in QwenLM/Qwen3-VL#733.
    text = "<|object_ref_start|>一只狗<|object_ref_end|>(221,423),(569,886)和<ref>x</ref>y"
    (box,) = parse(text, "qwen2-vl")
    assert (box.phrase, box.model_box) == ("一只狗", (221, 423, 569, 886))


def test_stray_and_nested_tags():
    boxes = parse("</box></ref><ref><ref>cat</ref><box>(1,2),(3,4)</box></box>")
    assert [(b.phrase, b.model_box) for b in boxes] == [("cat", (1, 2, 3, 4))]


def test_several_boxes_in_one_tag():
    boxes = parse("<box>(1,2),(3,4),(5,6),(7,8)</box>")
    assert [b.model_box for b in boxes] == [(1, 2, 3, 4), (5, 6, 7, 8)]


@pytest.mark.parametrize("family", ["qwen-vl", "qwen2-vl"])
def test_quads_keep_their_points(family):
    tags = ("<quad>", "</quad>") if family == "qwen-vl" else ("<|quad_start|>", "<|quad_end|>")
    text = f"<ref>sign</ref>{tags[0]}(100,100),(300,120),(290,300),(90,280){tags[1]}"
    (quad,) = parse(text, family)
    assert quad.kind == "quad"
    assert quad.phrase == "sign"
    assert quad.points == ((100, 50), (300, 60), (290, 150), (90, 140))
    assert quad.box == (90, 50, 300, 150)
    assert len(quad.model_box) == 8


def test_xml_points_with_several_coordinates():
    text = '<points x1="10" y1="20" x2="30" y2="40" alt="two things">two things</points>'
    points = parse(text, "qwen2.5-vl", [(1000, 1000)])
    assert [p.model_box for p in points] == [(10, 20), (30, 40)]
    assert {p.phrase for p in points} == {"two things"}


def test_xml_point_names_of_thousands_of_digits_are_ordered_without_int():
    """int() refuses more than 4,300 digits: a coordinate named x1111...1 made the parser raise
    (a 500, or a stream without its finish)."""
    long = "1" * 5000
    text = f'<points x{long}="5" y{long}="6" x2="7" y2="8" x10="1" y10="2">a</points>'
    points = parse(text, "qwen2.5-vl", [(1000, 1000)])
    assert [p.model_box for p in points] == [(7, 8), (1, 2), (5, 6)]


@pytest.mark.parametrize(
    "text",
    ["1,000,000,000 dollars", "It costs 1,2,3,4 \n", "01,2,3,4 x"],
)
def test_plain_lines_are_strict(text):
    assert parse(text, "qwen2.5-vl") == []


def test_plain_lines_are_only_a_fallback():
    text = '10,20,30,40 cat\n{"bbox_2d": [1, 2, 3, 4], "label": "dog"}'
    assert [b.phrase for b in parse(text, "qwen2.5-vl")] == ["dog"]


@pytest.mark.parametrize("text", ["", " ", "no boxes here", "<ref></ref>", "```json\n```"])
def test_nothing_to_find(text):
    assert parse(text) == []


# --- fuzzing --------------------------------------------------------------------------------

FRAGMENTS = [
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<points ", 'x1="', 'y1="', "</points>", ">",
    "(", ")", ",", "-", ".", "1", "99", "1e999", "1000", "\n", " ", '"', "'", "\\",
    "{", "}", "[", "]", ":", "```", "```json\n", '"bbox_2d"', '"point_2d"', '"label"',
    '"bbox"', "null", "NaN", "击掌", "a", "\\ud83d", "\\ude00", "\\u00e9",
]  # fmt: skip

grammarish = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)
sizes = st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), min_size=1, max_size=3)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=300), grammarish), family=st.sampled_from(Family),
       image_sizes=sizes)  # fmt: skip
def test_any_text_parses_without_error_into_valid_boxes(text, family, image_sizes):
    boxes = parse_grounding(text, family, image_sizes)
    width, height = image_sizes[-1]
    for box in boxes:
        x1, y1, x2, y2 = box.box
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert len(box.model_box) == {"box": 4, "point": 2, "quad": 8}[box.kind]
        assert box.image_index == len(image_sizes) - 1
        assert box.phrase is None or (box.phrase and box.phrase == box.phrase.strip())
        for x, y in box.points:
            assert x1 <= x <= x2 and y1 <= y <= y2
        box.to_dict()
        if box.phrase is not None:
            box.phrase.encode("utf-8")  # no lone surrogate, which no response encoder takes


def test_json_escaped_characters_beyond_the_bmp_are_joined_and_lone_halves_replaced():
    text = '[{"bbox_2d": [10, 20, 30, 40], "label": "smiley \\ud83d\\ude00"}, ' \
           '{"bbox_2d": [1, 2, 3, 4], "label": "half \\ud83d and \\ude00 \\u00e9"}]'
    first, second = parse(text, "qwen2.5-vl")
    assert first.phrase == "smiley \U0001f600"
    assert second.phrase == "half \ufffd and \ufffd \u00e9"


# --- hostile input: linear time ---------------------------------------------------------------

N = 100_000
# Each builds a hostile text of about n characters.
HOSTILE = {
    "open refs": lambda n: "<ref>" * (n // 5),
    "open boxes with a pair start": lambda n: "<box>(1," * (n // 8),
    "open parens": lambda n: "(" * n,
    "paren digit": lambda n: "(1" * (n // 2),
    "one long number": lambda n: "<box>(" + "9" * n + ",1),(1,1)</box>",
    "long number in json": lambda n: '{"bbox_2d": [' + "9" * n,
    "open braces": lambda n: "{" * n,
    "open brackets": lambda n: "[" * n,
    "quotes": lambda n: '"' * n,
    "apostrophes": lambda n: "'a" * (n // 2),
    "escaped apostrophes": lambda n: "{'" + "\\'" * (n // 2),
    "escaped apostrophes in prose": lambda n: "[{'label': 'it\\'s " + "don\\'t " * (n // 7),
    "backslashes in a string": lambda n: '{"label": "' + "\\" * n,
    "repeated keys": lambda n: '{"bbox_2d": [' * (n // 13),
    "points elements": lambda n: "<points " * (n // 8),
    "points attribute names": lambda n: "<points " + "a" * n + ">",
    "fences": lambda n: "```" * (n // 3),
    "plain line spaces": lambda n: "1,2,3,4 x" + " " * n + "y",
    "plain lines": lambda n: "1,2,3,4 x\n" * (n // 10),
    "qwen2 box tokens": lambda n: "<|box_start|>" * (n // 13),
    "boxes": lambda n: "<box>(1,2),(3,4)</box>" * (n // 22),
}


def _parse_time(text: str) -> float:
    """Best of three, with the garbage collector paused: late in a long test session the
    heap is large and a full collection triggered by the parser's allocations costs time
    proportional to the heap, not to the input (which is what this check measures)."""
    best = float("inf")
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            start = time.perf_counter()
            for family in ("qwen-vl", "qwen2.5-vl"):
                parse_grounding(text, family, [SIZE])
            best = min(best, time.perf_counter() - start)
    finally:
        gc.enable()
    return best


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_parsed_in_linear_time(name):
    small = _parse_time(HOSTILE[name](N // 4))
    large = _parse_time(HOSTILE[name](N))
    # Four times the text: linear work takes about four times as long, quadratic sixteen.
    # The constant absorbs timer noise on runs of a few milliseconds.
    assert large < 10 * small + 0.1, f"{name}: {small:.3f}s for {N // 4}, {large:.3f}s for {N}"
    assert large < 20.0, f"{name}: {large:.2f}s for {N} characters"


@pytest.mark.parametrize(("text", "family", "size"), [
    ("700,10,900,45 are the numbers on the jerseys.", "qwen2.5-vl", (640, 480)),  # past its 644x476 frame
    ("10,20,1200,40 dollars", "qwen2-vl", (4000, 3000)),  # past the 0-1000 grid
    ("Scores:\n3,1,2,0 was the final tally", "qwen3-vl", (1000, 1000)),  # prose around it
    ("3,1,2,0 was the final tally", "qwen3-vl", (1000, 1000)),  # corners out of order
    ("The population is:\n1,425,775,862 people", "qwen2-vl", (640, 480)),
    ("10,20,30,40 cat\nand a dog", "qwen2.5-vl", (1024, 1024)),
])
def test_numbers_in_prose_are_not_plain_boxes(text, family, size):
    assert parse(text, family, [size]) == []


def test_an_answer_of_plain_box_lines_is_read():
    boxes = parse("43,378,996,957 cakes\n\n10,20,30,40 plate\n", "qwen2.5-vl", [(1024, 1024)])
    assert [(b.phrase, b.model_box) for b in boxes] == [("cakes", (43, 378, 996, 957)), ("plate", (10, 20, 30, 40))]


def test_a_thinking_models_reasoning_is_not_read():
    draft = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "dog"}]\n```'
    answer = '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "dog"}]\n```'
    for text in (f"<think>Draft: {draft}</think>\n{answer}", f"Draft: {draft}</think>\n{answer}"):
        assert [b.model_box for b in parse(text, "qwen3-vl", [(1000, 1000)])] == [(100, 200, 300, 400)]
    assert parse(f"<think>Draft: {draft}", "qwen3-vl", [(1000, 1000)]) == []  # cut off while thinking
    assert len(parse(answer, "qwen3-vl", [(1000, 1000)])) == 1
    # an ordinary answer that mentions the tag keeps its boxes
    mention = f"Tags like <think> are not used here.\n{answer}"
    assert [b.model_box for b in parse(mention, "qwen2.5-vl", [(1000, 1000)])] == [(100, 200, 300, 400)]


@pytest.mark.parametrize("text", [
    "<box>(1,2),(3,4),(5,6)</box>",  # three corners: which two make the box?
    "<|box_start|>(10,20),(30,40),(50,60)<|box_end|>",
    "<quad>(1,2),(3,4),(5,6),(7,8),(9,9)</quad>",
    "<quad>(1,2),(3,4),(5,6)</quad>",
])
def test_a_closed_tag_with_pairs_that_make_no_whole_box_is_dropped(text):
    assert parse(text, "qwen-vl") == []


@pytest.mark.parametrize("array", [
    "[\u2212100, 200, 300, 400]",  # a Unicode minus: the sign would be lost
    "[100/2, 200, 300]",  # a fraction would pair up as two numbers
    "[100-200, 300, 400]",  # a range
    "[10%; 20%; 30%; 40%]",
    "[10, 20, 30, 40 px]",
])
def test_a_geometry_array_with_characters_outside_json_is_dropped(array):
    text = f'[{{"bbox_2d": {array}, "label": "dog"}}, {{"bbox_2d": [5, 6, 70, 80], "label": "cat"}}]'
    assert [(b.phrase, b.model_box) for b in parse(text, "qwen2.5-vl")] == [("cat", (5, 6, 70, 80))]


def test_full_width_commas_and_colons_separate_as_ascii_ones():
    text = '[{"bbox_2d"\uff1a [100\uff0c200\uff0c300\uff0c400]\uff0c "label"\uff1a "\u72d7"}]'
    assert [(b.phrase, b.model_box) for b in parse(text, "qwen2.5-vl")] == [("\u72d7", (100, 200, 300, 400))]
