"""Grounding on the real path: the engine writes a known answer with a box (the test logits
processor of support.forced_answer forces its tokens), the real detokenizer keeps the
grounding tags, and the server must return the box as data, in pixels of the picture the
client sent, streaming or not. Expected pixels are worked out here from each family's own
convention (a 0-1000 grid, or Qwen2.5-VL's pixels of the picture as its Hugging Face
processor resizes it), not with the server's code.

The engine test modules start their servers with `server_options(...)` and call the
`check_*` functions from their own tests, so no extra engine is started for this."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from support.forced_answer import ENV, FORCE_SEED
from support.images import data_url, picture
from support.reference import reference_tokenizer

TESTS = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 640, 480
GRID_BOX = [100, 200, 500, 750]  # x1, y1, x2, y2 on the 0-1000 grid
PIXEL_BOX = [63, 76, 315, 284]  # Qwen2.5-VL: pixels of its resized picture

#: family -> (the forced answer, the grounding tags it must hold as single tokens)
ANSWERS = {
    "qwen-vl": ("<ref>the dog</ref><box>(100,200),(500,750)</box>", ["<ref>", "</ref>", "<box>", "</box>"]),
    "qwen2-vl": ("<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(100,200),(500,750)<|box_end|>",
                 ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]),
    "qwen2.5-vl": ('```json\n[{"bbox_2d": [63, 76, 315, 284], "label": "the dog"}]\n```', []),
    "qwen3-vl": ('```json\n[{"bbox_2d": [100, 200, 500, 750], "label": "the dog"}]\n```', []),
}


def server_options(arch: str, model_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Command-line arguments and environment that load the forcing processor into a
    server of `arch`, primed with that family's answer."""
    tok = reference_tokenizer(SimpleNamespace(arch=arch, model_dir=model_dir))
    answer, tags = ANSWERS[arch]
    ids = tok.encode(answer, add_special_tokens=False)
    for tag in tags:  # each tag is the model's own token, as it writes them, not spelled out
        assert tok.convert_tokens_to_ids(tag) in ids, tag
    ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return (["--logits-processors", "support.forced_answer:ForcedAnswer"],
            {"PYTHONPATH": path, ENV: ",".join(map(str, ids))})


def expected_box(server) -> list[float]:
    """The box in pixels of the 640x480 picture, by the family's convention."""
    if server.arch != "qwen2.5-vl":
        x1, y1, x2, y2 = GRID_BOX
        return [x1 * WIDTH / 1000, y1 * HEIGHT / 1000, x2 * WIDTH / 1000, y2 * HEIGHT / 1000]
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(server.model_dir)
    _, rows, cols = processor(images=[Image.new("RGB", (WIDTH, HEIGHT))], return_tensors="pt")["image_grid_thw"][0]
    width, height = int(cols) * processor.patch_size, int(rows) * processor.patch_size
    x1, y1, x2, y2 = PIXEL_BOX
    return [x1 * WIDTH / width, y1 * HEIGHT / height, x2 * WIDTH / width, y2 * HEIGHT / height]


def _messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture(WIDTH, HEIGHT))}},
                                         {"type": "text", "text": "Where is the dog?"}]}]


def _check_boxes(server, grounding: list[dict]) -> None:
    assert len(grounding) == 1, grounding
    (found,) = grounding
    assert found["phrase"] == "the dog" and found["kind"] == "box" and found["image_index"] == 0
    assert found["model_box"] == (PIXEL_BOX if server.arch == "qwen2.5-vl" else GRID_BOX)
    assert found["box"] == pytest.approx(expected_box(server), abs=1)


def check_box_comes_back_as_data(client, server, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=_messages(), seed=FORCE_SEED, max_tokens=64)
    choice = r.choices[0]
    assert choice.message.content == ANSWERS[server.arch][0]  # grounding tags kept, as the model wrote them
    assert choice.finish_reason == "stop"
    _check_boxes(server, choice.message.model_extra["grounding"])


def check_streamed_boxes_arrive_in_the_last_chunk(client, server, model: str) -> None:
    chunks = list(client.chat.completions.create(model=model, messages=_messages(), seed=FORCE_SEED, max_tokens=64,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWERS[server.arch][0]
    with_boxes = [c for c in chunks if c.choices and (c.choices[0].delta.model_extra or {}).get("grounding")]
    assert len(with_boxes) == 1 and with_boxes[0].choices[0].finish_reason == "stop"
    _check_boxes(server, with_boxes[0].choices[0].delta.model_extra["grounding"])


def check_grounding_off_leaves_the_text_alone(client, server, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=_messages(), seed=FORCE_SEED, max_tokens=64,
                                       extra_body={"grounding": False})
    assert r.choices[0].message.content == ANSWERS[server.arch][0]
    assert (r.choices[0].message.model_extra or {}).get("grounding") is None
    other = client.chat.completions.create(model=model, messages=_messages(), seed=1, max_tokens=8)
    assert other.choices[0].message.content != ANSWERS[server.arch][0]  # (only the forced seed is forced)
