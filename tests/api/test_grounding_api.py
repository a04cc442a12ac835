"""Grounding through the real server code: a scripted engine writes grounding answers (tiny
random models never do), the server returns content unchanged plus boxes as data."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server.engine.base import ModelInfo
from server.engine.scripted import ScriptedEngine
from support.app_server import AppServer, scripted_app
from support.images import data_url, picture

QWEN2_ANSWER = ("<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(100,200),(500,750)<|box_end|>"
                " and <|object_ref_start|>猫<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>")


def engine_for(tokenizer, family: str, reply: str) -> ScriptedEngine:
    engine = ScriptedEngine(ModelInfo(family=family, max_model_len=4096, tokenizer=tokenizer,
                                      image_processor={"min_pixels": 3136, "max_pixels": 12845056}),
                            chunk_chars=4)
    engine.enqueue(reply)
    return engine


def image_message(width=640, height=480, text="find the dog"):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(picture(width, height))}},
        {"type": "text", "text": text}]}]


@pytest.fixture
def qwen2_server(tiny_tokenizer):
    engine = engine_for(tiny_tokenizer, "qwen2-vl", QWEN2_ANSWER)
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        srv.engine = engine
        yield srv


def test_boxes_in_original_pixels_non_streaming(qwen2_server):
    r = httpx.post(qwen2_server.base_url + "/v1/chat/completions", json={"messages": image_message()})
    assert r.status_code == 200
    message = r.json()["choices"][0]["message"]
    assert message["content"] == QWEN2_ANSWER  # tags kept: they are the answer
    boxes = message["grounding"]
    assert [b["phrase"] for b in boxes] == ["the dog", "猫"]
    assert boxes[0]["model_box"] == [100, 200, 500, 750]
    assert boxes[0]["box"] == [64, 96, 320, 360]  # 0-1000 grid → 640x480 pixels
    assert boxes[1]["box"] == [0, 0, 640, 480]
    assert {b["image_index"] for b in boxes} == {0}


def test_boxes_arrive_with_final_chunk(qwen2_server):
    client = openai.OpenAI(base_url=qwen2_server.base_url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="scripted", messages=image_message(), stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == QWEN2_ANSWER
    with_boxes = [c for c in chunks if c.choices and (c.choices[0].delta.model_extra or {}).get("grounding")]
    assert len(with_boxes) == 1
    final = with_boxes[0]
    assert final.choices[0].finish_reason == "stop"
    boxes = final.choices[0].delta.model_extra["grounding"]
    assert boxes[0]["box"] == [64, 96, 320, 360]


def test_grounding_can_be_turned_off(qwen2_server):
    r = httpx.post(qwen2_server.base_url + "/v1/chat/completions",
                   json={"messages": image_message(), "grounding": False})
    message = r.json()["choices"][0]["message"]
    assert message["content"] == QWEN2_ANSWER
    assert message.get("grounding") is None


@pytest.mark.parametrize("piece", [10_000, 3], ids=["whole", "split"])
def test_other_special_tokens_do_not_leak(tiny_tokenizer, piece):
    """Also when the deltas split special tokens, as vLLM's do when the request has stop
    strings (it holds back any text that might begin one)."""
    reply = "<|vision_start|>" + QWEN2_ANSWER + "<|im_start|>x<|endoftext|><|im_"
    expected = QWEN2_ANSWER + "x<|im_"  # an unfinished special token at the end is text
    engine = engine_for(tiny_tokenizer, "qwen2-vl", reply)
    engine.chunk_chars = piece
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": image_message()})
        message = r.json()["choices"][0]["message"]
        assert message["content"] == expected
        assert [b["phrase"] for b in message["grounding"]] == ["the dog", "猫"]
        engine.enqueue(reply)
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        chunks = list(client.chat.completions.create(model="scripted", messages=image_message(), stream=True))
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(deltas) == expected
        assert not any("<|vision" in d or "<|endoftext" in d for d in deltas)
        engine.enqueue(reply)
        r = httpx.post(srv.base_url + "/v1/chat/completions",
                       json={"messages": image_message(), "skip_special_tokens": False})
        assert r.json()["choices"][0]["message"]["content"] == reply


def test_qwen25_pixels_of_resized_image(tiny_tokenizer):
    # Qwen2.5-VL answers in pixels of the processor's resized image: 1000x500 → 1008x504.
    answer = '```json\n[{"bbox_2d": [504, 252, 1008, 504], "label": "right half"}]\n```'
    engine = engine_for(tiny_tokenizer, "qwen2.5-vl", answer)
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": image_message(1000, 500)})
        box = r.json()["choices"][0]["message"]["grounding"][0]
        assert box["phrase"] == "right half"
        assert box["box"] == [500, 250, 1000, 500]


def test_truncated_stream_recovers_what_it_can(tiny_tokenizer):
    engine = engine_for(tiny_tokenizer, "qwen2-vl", QWEN2_ANSWER)
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    with AppServer(app) as srv:
        # 20 pieces of 4 characters end inside the second box.
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": image_message(), "max_tokens": 20})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert [b["phrase"] for b in choice["message"]["grounding"]] == ["the dog"]


def test_boxes_refer_to_the_last_image(tiny_tokenizer):
    engine = engine_for(tiny_tokenizer, "qwen2-vl", QWEN2_ANSWER)
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(picture(100, 100))}},
        {"type": "image_url", "image_url": {"url": data_url(picture(200, 100))}},
        {"type": "text", "text": "find"}]}]
    with AppServer(app) as srv:
        boxes = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": messages}).json()[
            "choices"][0]["message"]["grounding"]
        assert boxes[0]["image_index"] == 1
        assert boxes[0]["box"] == [20, 20, 100, 75]
        assert json.dumps(boxes)


@pytest.mark.parametrize("stream", [False, True])
def test_grounding_image_names_the_picture_the_boxes_refer_to(tiny_tokenizer, stream):
    """Qwen2.5-VL's pixels are of the named picture as resized: 1000x500 (to 1008x504) first,
    a 300x1200 one last."""
    answer = '```json\n[{"bbox_2d": [504, 252, 1008, 504], "label": "right half"}]\n```'
    engine = engine_for(tiny_tokenizer, "qwen2.5-vl", answer)
    engine.enqueue(answer, answer)
    app, _ = scripted_app(tiny_tokenizer, engine=engine)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(picture(1000, 500))}},
        {"type": "image_url", "image_url": {"url": data_url(picture(300, 1200))}},
        {"type": "text", "text": "find"}]}]
    client_of = lambda srv: openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)  # noqa: E731

    def boxes(srv, **extra):
        kwargs = {"model": "scripted", "messages": messages, "extra_body": extra}
        if not stream:
            return client_of(srv).chat.completions.create(**kwargs).choices[0].message.model_extra["grounding"]
        chunks = list(client_of(srv).chat.completions.create(stream=True, **kwargs))
        return next(c.choices[0].delta.model_extra["grounding"] for c in chunks
                    if c.choices and c.choices[0].finish_reason)

    with AppServer(app) as srv:
        for index in (0, -2):
            (box,) = boxes(srv, grounding_image=index)
            assert box["image_index"] == 0 and box["box"] == [500, 250, 1000, 500], box
        (box,) = boxes(srv)  # the last picture, by default
        assert box["image_index"] == 1
        with pytest.raises(openai.BadRequestError) as info:
            boxes(srv, grounding_image=2)
        assert info.value.body["param"] == "grounding_image"


@pytest.mark.parametrize("stream", [False, True])
def test_escaped_emoji_in_a_json_label_is_served_whole(tiny_tokenizer, stream):
    """JSON writes a character beyond U+FFFF as two escapes; their halves alone cannot be
    encoded, and once broke the response (a 500, or a stream cut off without [DONE])."""
    reply = '[{"bbox_2d": [10, 20, 30, 40], "label": "smiley \\ud83d\\ude00"}]'
    engine = engine_for(tiny_tokenizer, "qwen2.5-vl", reply)
    app, _ = scripted_app(tiny_tokenizer, engine=engine, family="qwen2.5-vl")
    with AppServer(app) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions",
                       json={"messages": image_message(), "stream": stream}, timeout=30)
        assert r.status_code == 200, r.text
        if stream:
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            boxes = [g for e in events[:-1] for c in json.loads(e)["choices"] for g in c["delta"].get("grounding") or []]
        else:
            boxes = r.json()["choices"][0]["message"]["grounding"]
        assert [b["phrase"] for b in boxes] == ["smiley \U0001f600"]


@pytest.fixture(scope="module")
def thinking_tokenizer(tiny_model):
    """The tiny tokenizer as a thinking model's: `<think>` and `</think>` tokens, and a
    template whose generation prompt opens the reasoning (as Qwen3-VL Thinking's does),
    unless `enable_thinking` is false (then it writes an empty, closed block)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2-vl"))
    tok.add_tokens(["<think>", "</think>"])
    ending = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    assert tok.chat_template.endswith(ending)
    tok.chat_template = tok.chat_template[: -len(ending)] + (
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
        "enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")
    return tok


DRAFT = 'A first guess: {"bbox_2d": [10, 20, 900, 950], "label": "dog"}, but that looks too big, the dog is'


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reply, thinking, phrases", [
    (DRAFT, True, []),  # cut off by max_tokens while reasoning: no answer yet
    (DRAFT + ' really small.</think>{"bbox_2d": [100, 100, 200, 200], "label": "cat"}', True, ["cat"]),
    (DRAFT, False, ["dog"]),  # thinking switched off: the text is the answer
])
def test_a_reasoning_draft_cut_off_before_its_end_gives_no_boxes(thinking_tokenizer, reply, thinking, phrases, stream):
    engine = engine_for(thinking_tokenizer, "qwen3-vl", reply)
    app, _ = scripted_app(thinking_tokenizer, engine=engine, family="qwen3-vl")
    body = {"messages": image_message(), "stream": stream}
    if not thinking:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    with AppServer(app) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    prompt = thinking_tokenizer.decode(engine.history[-1].prompt_token_ids)
    assert prompt.endswith("<think>\n") == thinking
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {") and '"grounding"' in line]
        [boxes] = [e["choices"][0]["delta"]["grounding"] for e in events]
    else:
        boxes = r.json()["choices"][0]["message"]["grounding"]
    assert [b["phrase"] for b in boxes] == phrases


def test_a_think_tag_in_the_users_text_does_not_hide_the_boxes(tiny_model):
    """`<think>` is an ordinary token in Qwen3's vocabulary, so a question can end with it;
    only the template's own assistant header opens the reasoning."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2-vl"))
    # (the template stays one without reasoning; "assistant" one token, as in the real
    # vocabulary, so that the question's end is among the prompt's last ids)
    tok.add_tokens(["<think>", "</think>", "assistant"])
    engine = engine_for(tok, "qwen3-vl", '{"bbox_2d": [100, 100, 200, 200], "label": "cat"}')
    app, _ = scripted_app(tok, engine=engine, family="qwen3-vl")
    with AppServer(app) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=30,
                       json={"messages": image_message(text="find the cat. Do not write <think>")})
    assert r.status_code == 200, r.text
    assert tok.convert_tokens_to_ids("<think>") in engine.history[-1].prompt_token_ids[-8:]
    assert [b["phrase"] for b in r.json()["choices"][0]["message"]["grounding"]] == ["cat"]
