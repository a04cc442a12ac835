"""Each generation's format, on real answers (see samples.py for where each comes from).

Expected pixels are computed here from each family's published mapping (x / 1000 * width for
the grid families; x / resized_width * width for Qwen2.5-VL with the resized size the
notebook itself printed), not copied from the parser's output.
"""

from __future__ import annotations

import math

import pytest

from server.grounding import Family, family_for_model_type, parse_grounding

from . import samples as S

DEMO_JPEG = (2048, 1365)  # QwenLM/Qwen-VL assets/demo.jpeg


def grid_to_pixels(box, size, frame=(1000, 1000)):
    """Reference mapping: scale, round to nearest, clamp, put corners in order."""
    (width, height), (frame_w, frame_h) = size, frame
    xs = [min(max(math.floor(v * width / frame_w + 0.5), 0), width) for v in box[0::2]]
    ys = [min(max(math.floor(v * height / frame_h + 0.5), 0), height) for v in box[1::2]]
    return (min(xs), min(ys), max(xs), max(ys))


def phrases(boxes):
    return [b.phrase for b in boxes]


# --- Qwen-VL ------------------------------------------------------------------------------


def test_qwen_vl_chat_answer():
    (box,) = parse_grounding(S.QWEN_VL_CHAT_HIGHFIVE, "qwen-vl", [DEMO_JPEG])
    assert box.phrase == "击掌"
    assert box.kind == "box"
    assert box.model_box == (536, 509, 588, 602)
    assert box.box == grid_to_pixels((536, 509, 588, 602), DEMO_JPEG)
    assert box.image_index == 0


def test_qwen_vl_base_caption_ignores_the_echoed_image_tag_and_strips_phrases():
    boxes = parse_grounding(S.QWEN_VL_BASE_CAPTION, Family.QWEN_VL, [DEMO_JPEG])
    assert phrases(boxes) == ["Woman", "her dog"]
    assert [b.model_box for b in boxes] == [(451, 379, 731, 806), (219, 424, 576, 896)]
    assert boxes[1].box == grid_to_pixels((219, 424, 576, 896), DEMO_JPEG)


def test_qwen_vl_phrase_keeps_the_quotes_the_model_wrote():
    (box,) = parse_grounding(S.QWEN_VL_MODELSCOPE_QUOTED, "qwen-vl", [DEMO_JPEG])
    assert box.phrase == '"击掌"'


def test_qwen_vl_several_boxes_after_one_phrase():
    size = (1802, 1309)  # QwenLM/Qwen-VL assets/apple.jpeg
    boxes = parse_grounding(S.QWEN_VL_TWO_APPLES, "qwen-vl", [size])
    assert phrases(boxes) == ["Two apples", "Two apples", "a bowl"]
    assert boxes[1].box == grid_to_pixels((603, 252, 878, 642), size)


def test_qwen_vl_phrases_separated_by_prose():
    size = (5304, 3540)  # QwenLM/Qwen-VL assets/mm_tutorial/Shanghai.jpg
    boxes = parse_grounding(S.QWEN_VL_SHANGHAI, "qwen-vl", [size])
    assert phrases(boxes) == ["上海环球金融中心", "东方明珠"]
    assert boxes[1].box == grid_to_pixels((506, 75, 582, 946), size)


# --- Qwen2-VL -----------------------------------------------------------------------------


def test_qwen2_vl_special_token_answer():
    (box,) = parse_grounding(S.QWEN2_VL_HIGHFIVE, "qwen2-vl", [DEMO_JPEG])
    assert (box.phrase, box.model_box) == ("击掌", (531, 516, 581, 596))
    assert box.box == grid_to_pixels((531, 516, 581, 596), DEMO_JPEG)


def test_qwen2_vl_boxes_without_phrase():
    boxes = parse_grounding(S.QWEN2_VL_DOC_BOXES_NO_PHRASE, "qwen2-vl", [(640, 480)])
    assert phrases(boxes) == [None, None]
    assert [b.model_box for b in boxes] == [(101, 201, 150, 266), (401, 601, 550, 666)]


def test_qwen2_vl_one_pair_in_a_box_tag_is_a_point():
    size = (1080, 2400)
    (point,) = parse_grounding(S.QWEN2_VL_DOC_CLICK_POINT, "qwen2-vl", [size])
    expected = grid_to_pixels((246, 113), size)[:2]
    assert point.kind == "point"
    assert point.points == (expected,)
    assert point.box == (*expected, *expected)
    assert point.to_dict()["points"] == [list(expected)]


def test_spaced_pairs_and_one_phrase_per_line():
    boxes = parse_grounding(S.QWEN2_VL_DOC_SPACED_LINES, "qwen2.5-vl", [(1920, 1080)])
    assert phrases(boxes) == ["Popup close button"] * 2
    assert [b.model_box for b in boxes] == [(1769, 1013, 1778, 1027), (483, 954, 519, 987)]


# --- Qwen2.5-VL ---------------------------------------------------------------------------


def test_qwen25_cakes_are_pixels_of_the_resized_image():
    size = (1024, 1024)  # cakes.png; smart_resize gives 1036x1036
    boxes = parse_grounding(S.QWEN25_CAKES, "qwen2.5-vl", [size])
    assert phrases(boxes) == ["small cake"] * 12
    assert boxes[0].model_box == (139, 768, 315, 954)
    assert boxes[0].box == grid_to_pixels((139, 768, 315, 954), size, (1036, 1036))


def test_qwen25_single_object_in_a_tab_indented_list():
    (box,) = parse_grounding(S.QWEN25_TOP_RIGHT_CAKE, "qwen2.5-vl", [(1024, 1024)])
    assert box.phrase == "top right brown cake"


def test_qwen25_large_photo():
    size = (4080, 3072)  # Origamis.jpg; resized to 4088x3080 under the default max_pixels
    (box,) = parse_grounding(S.QWEN25_FOX_SHADOW, "qwen2.5-vl", [size])
    assert box.box == grid_to_pixels((1098, 1304, 1576, 1900), size, (4088, 3080))


def test_qwen25_boxes_reaching_the_resized_edges_reach_the_image_edges():
    # multiple_items.png is 640x465, resized to 644x476; the martini glass touches that
    # frame's right and bottom edges, so it must touch the picture's.
    boxes = parse_grounding(S.QWEN25_ITEMS_AND_COUNT, "qwen2.5-vl", [(640, 465)])
    assert len(boxes) == 12  # the prose after the fence ("There are 12 items") adds nothing
    martini = boxes[-1]
    assert martini.phrase == "martini glass"
    assert martini.box[2:] == (640, 465)
    # Read on a 0-1000 grid instead, the same answer would leave the picture's right third.
    wrong = parse_grounding(S.QWEN25_ITEMS_AND_COUNT, "qwen3-vl", [(640, 465)])[-1]
    assert wrong.box[2] < 0.7 * 640


def test_qwen25_ocr_spotting_with_a_comma_before_every_brace():
    size = (870, 1398)  # printed input: 1400 high, 868 wide
    boxes = parse_grounding(S.QWEN25_OCR_SPOTTING, "qwen2.5-vl", [size])
    assert len(boxes) == S.QWEN25_OCR_SPOTTING.count('"bbox_2d"')
    assert boxes[0].phrase == "UNIHAKKA INTERNATIONAL SDN BHD"  # from "text_content"
    assert boxes[-1].phrase == "Facebook.com/BarWangRice"
    assert boxes[-1].box == grid_to_pixels((228, 1328, 667, 1352), size, (868, 1400))


def test_qwen25_ocr_receipt_with_a_trailing_comma():
    size = (576, 864)  # printed input: 868 high, 588 wide
    boxes = parse_grounding(S.QWEN25_OCR_RECEIPT, "qwen2.5-vl", [size])
    assert len(boxes) == 14
    assert boxes[0].phrase == "AuntieAnne's"
    assert boxes[0].box == grid_to_pixels((109, 175, 556, 240), size, (588, 868))


def test_qwen25_plain_text_line():
    (box,) = parse_grounding(S.QWEN25_PLAIN_TEXT, "qwen2.5-vl", [(1024, 1024)])
    assert (box.phrase, box.model_box) == ("cakes", (43, 378, 996, 957))


def test_xml_point_with_blanks_inside_the_tags():
    (point,) = parse_grounding(S.QWEN25_DOC_XML_POINT, "qwen2.5-vl", [(1138, 640)])
    assert point.kind == "point"
    assert point.phrase == "见义勇为的人"
    assert point.model_box == (284, 305)


# --- Qwen3-VL -----------------------------------------------------------------------------


def test_qwen3_boxes_are_on_a_1000_grid_of_the_original():
    size = (1920, 1080)  # the issue does not give the picture's size; any size will do
    boxes = parse_grounding(S.QWEN3_WATCHES, "qwen3-vl", [size])
    assert phrases(boxes) == ["watch"] * 4
    assert [b.box for b in boxes] == [grid_to_pixels(b.model_box, size) for b in boxes]
    assert boxes[3].model_box == (686, 118, 807, 825)


def test_qwen3_point():
    size = (480, 640)
    (point,) = parse_grounding(S.QWEN3_FREE_SPACE_POINT, "qwen3-vl", [size])
    assert point.kind == "point"
    assert point.phrase == "point_1"
    assert point.points == (grid_to_pixels((925, 618), size)[:2],)


def test_qwen3_truncated_answer_with_repeated_keys():
    boxes = parse_grounding(S.QWEN3_TRUNCATED_REPEATED_KEYS, "qwen3-vl", [(1000, 1000)])
    # Each "bbox" pairs with the "object_name" before it; the fourth box was cut off.
    assert phrases(boxes) == ["monitor", "laptop", "keyboard"]
    assert boxes[2].model_box == (254, 584, 569, 657)


# --- Which image, and the family decides the frame ---------------------------------------


def test_boxes_refer_to_the_last_image_unless_told_otherwise():
    sizes = [(100, 100), (2000, 1000)]
    (last,) = parse_grounding(S.QWEN_VL_CHAT_HIGHFIVE, "qwen-vl", sizes)
    assert last.image_index == 1
    assert last.box == grid_to_pixels(last.model_box, sizes[1])
    (first,) = parse_grounding(S.QWEN_VL_CHAT_HIGHFIVE, "qwen-vl", sizes, image_index=0)
    assert first.image_index == 0
    assert first.box == grid_to_pixels(first.model_box, sizes[0])
    assert parse_grounding(S.QWEN_VL_CHAT_HIGHFIVE, "qwen-vl", sizes, image_index=-2) == [first]
    with pytest.raises(ValueError):
        parse_grounding(S.QWEN_VL_CHAT_HIGHFIVE, "qwen-vl", sizes, image_index=2)


def test_no_image_means_no_boxes():
    assert parse_grounding(S.QWEN_VL_CHAT_HIGHFIVE, "qwen-vl", []) == []


def test_downscaled_by_the_server_maps_back_to_the_original():
    # The server gave the model a half-size copy of a 4080x3072 photo; Qwen2.5-VL answers in
    # smart_resize(2040x1536) = 2044x1540 pixels. The centre of that frame is the centre of
    # the original.
    text = '{"bbox_2d": [1022, 770, 2044, 1540], "label": "lower right quarter"}'
    (box,) = parse_grounding(text, "qwen2.5-vl", [(4080, 3072)], model_sizes=[(2040, 1536)])
    assert box.box == (2040, 1536, 4080, 3072)


def test_lower_max_pixels_changes_the_frame():
    text = '{"bbox_2d": [0, 0, 100, 100]}'
    default = parse_grounding(text, "qwen2.5-vl", [(4080, 3072)])[0]
    small = parse_grounding(text, "qwen2.5-vl", [(4080, 3072)], max_pixels=1280 * 28 * 28)[0]
    assert small.box[2] > default.box[2]  # a smaller frame: each unit covers more pixels


@pytest.mark.parametrize("bad", [[(0, 10)], [(-5, 10)], [(10.5, 10)]])
def test_invalid_image_sizes_are_caller_errors(bad):
    with pytest.raises(ValueError):
        parse_grounding("", "qwen-vl", bad)


def test_unknown_family_is_a_caller_error():
    with pytest.raises(ValueError):
        parse_grounding("", "qwen4-vl", [(10, 10)])


def test_to_dict_is_json_ready():
    (box,) = parse_grounding(S.QWEN_VL_CHAT_HIGHFIVE, "qwen-vl", [DEMO_JPEG])
    assert box.to_dict() == {
        "phrase": "击掌",
        "kind": "box",
        "box": list(box.box),
        "model_box": [536, 509, 588, 602],
        "image_index": 0,
    }
    assert all(type(v) is int for v in box.to_dict()["model_box"])


@pytest.mark.parametrize(
    ("model_type", "family"),
    [
        ("qwen", Family.QWEN_VL),
        ("qwen2_vl", Family.QWEN2_VL),
        ("qwen2_5_vl", Family.QWEN2_5_VL),
        ("qwen3_vl", Family.QWEN3_VL),
        ("qwen3_vl_moe", Family.QWEN3_VL),
        ("llava", None),
    ],
)
def test_family_from_a_checkpoint_model_type(model_type, family):
    assert family_for_model_type(model_type) is family
