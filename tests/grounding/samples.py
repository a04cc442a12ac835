"""Real answers of the four Qwen-VL generations, each with where it was published.

Model outputs are quoted verbatim (only the Markdown indentation of notebook exports, which
prints stdout indented by four spaces, is removed). The few entries that are documented
*formats* (training data, API docs) rather than a model's answer say so.
"""

from pathlib import Path

DATA = Path(__file__).parent / "data"

# --- Qwen-VL (2023), special tokens, 0-1000 grid -------------------------------------------

# QwenLM/Qwen-VL README.md (commit aa00ed04, 2024-04-09), "Qwen-VL-Chat" quickstart, second
# dialogue turn "框出图中击掌的位置" about assets/demo.jpeg.
QWEN_VL_CHAT_HIGHFIVE = "<ref>击掌</ref><box>(536,509),(588,602)</box>"

# Same README, "Running Qwen-VL" (the base model), decoded with skip_special_tokens=False so
# the prompt's <img> tag is echoed in front of the grounded caption.
QWEN_VL_BASE_CAPTION = (
    "<img>https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg</img>"
    "Generate the caption in English with grounding:<ref> Woman</ref><box>(451,379),(731,806)"
    "</box> and<ref> her dog</ref><box>(219,424),(576,896)</box> playing on the beach"
    "<|endoftext|>"
)

# Same README, ModelScope section, "输出击掌的检测框": the model quoted its own phrase.
QWEN_VL_MODELSCOPE_QUOTED = '<ref>"击掌"</ref><box>(211,412),(577,891)</box>'

# QwenLM/Qwen-VL TUTORIAL.md, "How to get the caption without any box-like annotations":
# two boxes after one phrase.
QWEN_VL_TWO_APPLES = (
    "<ref> Two apples</ref><box>(302,257),(582,671)</box><box>(603,252),(878,642)</box> "
    "and<ref> a bowl</ref><box>(2,269),(304,674)</box>"
)

# QwenLM/Qwen-VL TUTORIAL.md, "请给我框出图中上海环球金融中心和东方明珠": phrases joined by prose.
QWEN_VL_SHANGHAI = (
    "<ref>上海环球金融中心</ref><box>(667,437),(760,874)</box>和"
    "<ref>东方明珠</ref><box>(506,75),(582,946)</box>"
)

# --- Qwen2-VL (2024), special tokens, 0-1000 grid ------------------------------------------

# QwenLM/Qwen2-VL issue #9 (now QwenLM/Qwen3-VL#9), comment of 2024-09-26: Qwen2-VL's answer
# about the Qwen-VL demo picture, decoded with its special tokens.
QWEN2_VL_HIGHFIVE = (
    "<|object_ref_start|>击掌<|object_ref_end|><|box_start|>(531,516),(581,596)<|box_end|>"
    "<|im_end|>"
)

# Documented formats, not model output: ms-swift's custom-dataset docs for qwen2-vl, quoted in
# modelscope/ms-swift#3511 (boxes without a phrase; a click point in a GUI action).
QWEN2_VL_DOC_BOXES_NO_PHRASE = (
    "<|box_start|>(101,201),(150,266)<|box_end|><|box_start|>(401,601),(550,666)<|box_end|>"
)
QWEN2_VL_DOC_CLICK_POINT = "Action: click(start_box='<|box_start|>(246,113)<|box_end|>')"

# Documented format, not model output: a user's grounding fine-tuning data in
# QwenLM/Qwen3-VL#762 (spaces inside the pairs, one line per phrase).
QWEN2_VL_DOC_SPACED_LINES = (
    "<|object_ref_start|>Popup close button<|object_ref_end|><|box_start|>(1769, 1013), "
    "(1778, 1027)<|box_end|>\n<|object_ref_start|>Popup close button<|object_ref_end|>"
    "<|box_start|>(483, 954), (519, 987)<|box_end|>"
)

# --- Qwen2.5-VL (2025), JSON, pixels of the smart_resize'd image ---------------------------

# QwenLM/Qwen2.5-VL cookbooks/spatial_understanding.ipynb, outputs of the
# Qwen2.5-VL-7B-Instruct run of 2025-01-29 (prompts below). The notebook is too large for the
# code snapshot we could read, so these were read from a Markdown export of it held in the
# search tool's code index. Images are the notebook's assets: cakes.png 1024x1024,
# Origamis.jpg 4080x3072, multiple_items.png 640x465 (sizes read from the assets).

# "Outline the position of each small cake and output all the coordinates in JSON format."
QWEN25_CAKES = """```json
[
    {"bbox_2d": [139, 768, 315, 954], "label": "small cake"},
    {"bbox_2d": [366, 679, 536, 849], "label": "small cake"},
    {"bbox_2d": [44, 575, 204, 753], "label": "small cake"},
    {"bbox_2d": [310, 567, 459, 729], "label": "small cake"},
    {"bbox_2d": [533, 579, 689, 738], "label": "small cake"},
    {"bbox_2d": [652, 492, 799, 662], "label": "small cake"},
    {"bbox_2d": [829, 526, 995, 716], "label": "small cake"},
    {"bbox_2d": [765, 393, 895, 552], "label": "small cake"},
    {"bbox_2d": [551, 369, 676, 542], "label": "small cake"},
    {"bbox_2d": [411, 381, 519, 520], "label": "small cake"},
    {"bbox_2d": [262, 392, 384, 558], "label": "small cake"},
    {"bbox_2d": [69, 408, 212, 593], "label": "small cake"}
]
```"""

# "Locate the top right brown cake, output its bbox coordinates using JSON format."
QWEN25_TOP_RIGHT_CAKE = """```json
[
\t{"bbox_2d": [765, 394, 891, 550], "label": "top right brown cake"}
]
```"""

# "Locate the shadow of the paper fox, report the bbox coordinates in JSON format."
# y reaches 1900: only a resize grid of 4088x3080 (max_pixels 12845056) holds it.
QWEN25_FOX_SHADOW = """```json
[
\t{"bbox_2d": [1098, 1304, 1576, 1900], "label": "shadow of the paper fox"}
]
```"""

# "Please first output bbox coordinates and names of every item in this image in JSON format,
# and then answer how many items are there in the image." The martini glass reaches x=644,
# y=476: the right and bottom edges of smart_resize(640x465) = 644x476.
QWEN25_ITEMS_AND_COUNT = """```json
[
    {"bbox_2d": [25, 6, 87, 124], "label": "ice cream"},
    {"bbox_2d": [169, 3, 288, 130], "label": "flip-flops"},
    {"bbox_2d": [348, 0, 456, 124], "label": "beach umbrella"},
    {"bbox_2d": [519, 5, 634, 124], "label": "starfish"},
    {"bbox_2d": [14, 182, 118, 297], "label": "cocktail drink"},
    {"bbox_2d": [149, 196, 308, 283], "label": "sunglasses"},
    {"bbox_2d": [353, 196, 467, 300], "label": "lifebuoy"},
    {"bbox_2d": [530, 196, 644, 297], "label": "watermelon slice"},
    {"bbox_2d": [2, 383, 134, 476], "label": "hat"},
    {"bbox_2d": [168, 336, 308, 460], "label": "palm tree"},
    {"bbox_2d": [353, 364, 467, 476], "label": "sun"},
    {"bbox_2d": [548, 342, 644, 476], "label": "martini glass"}
]
```

There are 12 items in the image."""

# System prompt asking for "plain text format 'x1,y1,x2,y2 object'", user "find all cakes".
QWEN25_PLAIN_TEXT = "43,378,996,957 cakes"

# QwenLM/Qwen2.5-VL cookbooks/ocr.ipynb (commit f0af2996, 2025-02-10), "Text Spotting" with
# Qwen2.5-VL-7B-Instruct on assets/ocr/ocr_example3.jpg (870x1398; the notebook prints the
# input as 1400 high, 868 wide). Not valid JSON: a comma before every closing brace.
QWEN25_OCR_SPOTTING = (DATA / "qwen25_ocr_text_spotting.txt").read_text(encoding="utf-8")

# QwenLM/Qwen2.5-VL cookbooks/ocr.ipynb as first committed (d08310cb, 2025-01-28), text
# spotting on a 576x864 receipt (input printed as 868 high, 588 wide). A trailing comma after
# the last object.
QWEN25_OCR_RECEIPT = (DATA / "qwen25_ocr_receipt.txt").read_text(encoding="utf-8")

# Alibaba Cloud Model Studio documentation, "物体定位" (object localisation), point output of
# qwen-vl-max-latest as XML, as found in a Markdown copy of that page in the search tool's code
# index (blanks inside the tags as in that copy).
QWEN25_DOC_XML_POINT = (
    '< points x1 = "284"\ny1 = "305"\nalt = "见义勇为的人" > 见义勇为的人 < /points>'
)

# --- Qwen3-VL (2025), JSON, 0-1000 grid ----------------------------------------------------

# QwenLM/Qwen3-VL#2020 (2026-02-02), Qwen3-VL-235B on 'Please output bounding boxes for each
# instance of the following object: ["watch"]'. The issue's fence put "json" on its own line.
QWEN3_WATCHES = """```
json
[
    {"bbox_2d": [323, 118, 444, 825], "label": "watch"},
    {"bbox_2d": [444, 118, 565, 825], "label": "watch"},
    {"bbox_2d": [565, 118, 686, 825], "label": "watch"},
    {"bbox_2d": [686, 118, 807, 825], "label": "watch"}
]
```"""

# QwenLM/Qwen3-VL cookbooks/spatial_understanding.ipynb (commit 9658872), "Perceive Object
# Affordances": qwen3-vl-235b-a22b-instruct on spatio_case2_aff.png, shown as 480x640.
QWEN3_FREE_SPACE_POINT = """```json
[
\t{"point_2d": [925, 618], "label": "point_1"}
]
```"""

# QwenLM/Qwen3-VL#1720 (2025-10-29), Qwen3-VL-4B-Instruct with max_new_tokens=128: keys
# repeated inside one object, and the answer cut off inside the fourth box.
QWEN3_TRUNCATED_REPEATED_KEYS = """{
  "object_name": "monitor",
  "bbox": [195, 138, 617, 480],
  "object_name": "laptop",
  "bbox": [663, 399, 917, 657],
  "object_name": "keyboard",
  "bbox": [254, 584, 569, 657],
  "object_name": "mouse",
  "bbox": [581, 587, 655, 65"""
