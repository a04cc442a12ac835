"""The OpenAI API end to end: the real `qwen-vl-serve` process, the real vLLM engine on a
tiny checkpoint, the official `openai` SDK, images from a real local HTTP server.

The engine starts once per model family (module-scoped fixture, parametrized)."""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Literal

import httpx
import openai
import pytest
from PIL import Image
from pydantic import BaseModel

from support import grounding_case
from support.http_server import redirect, start_server, static
from support.images import data_url, picture
from support.live_server import ServerProcess
from support.reference import hf_prompt_tokens, reference_tokenizer

pytestmark = pytest.mark.engine

IMAGE_HOST = "127.0.0.2"  # the image server's address; the API server allows only it
MAX_MODEL_LEN = 1024
ARCHS = ["qwen2-vl", "qwen-vl"]
TINY_MAX_PIXELS = 640 * 640


@pytest.fixture(scope="module")
def image_server():
    state, httpd = start_server(IMAGE_HOST)
    state.routes.update({
        "/a.png": static(picture(96, 64, (220, 40, 40)), "image/png"),
        "/b.jpg": static(picture(128, 96, (40, 200, 40), fmt="JPEG"), "image/jpeg"),
        "/not-an-image.png": static(b"<html>hello</html>", "image/png"),
        "/bad-redirect.png": redirect("http://[::1/x.png"),
    })
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module", params=ARCHS)
def server(request, tiny_model, tmp_path_factory, image_server):
    arch = request.param
    # Qwen2-VL's processor here takes up to 640x640 pixels, so that a picture can be sent
    # larger than `detail: "low"` allows (the tiny checkpoints' default is 448x448).
    model_dir = tiny_model(arch, max_pixels=TINY_MAX_PIXELS) if arch == "qwen2-vl" else tiny_model(arch)
    forcing_args, forcing_env = grounding_case.server_options(arch, model_dir)  # (seed FORCE_SEED only)
    proc = ServerProcess(
        [
            "--model", str(model_dir),
            "--served-model-name", f"tiny-{arch}",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", "16",
            "--limit-mm-per-prompt", "3",
            "--image-allow-networks", f"{IMAGE_HOST}/32",
            *forcing_args,
        ],
        tmp_path_factory.mktemp("logs") / f"server-{arch}.log",
        env=forcing_env,
    ).start()
    proc.arch = arch
    proc.model_dir = model_dir
    yield proc
    proc.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def model_name(server) -> str:
    return f"tiny-{server.arch}"


def ask(client, server, content, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=model_name(server), messages=[{"role": "user", "content": content}], **kwargs
    )


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# --- happy paths --------------------------------------------------------------------------


def test_plain_text(client, server):
    r = ask(client, server, "Hello, who are you?", max_tokens=5)
    assert r.object == "chat.completion"
    assert r.model == model_name(server)
    assert r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_image_by_http_url(client, server, image_server):
    before = len(image_server.requests)
    r = ask(client, server, [image_part(image_server.url("/a.png")), {"type": "text", "text": "What is this?"}])
    assert r.choices[0].message.content is not None
    assert any(path == "/a.png" for path, _ in image_server.requests[before:])
    text_only = ask(client, server, "What is this?")
    assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 4  # image tokens are counted


def test_image_by_data_url(client, server):
    r = ask(client, server, [{"type": "text", "text": "Describe"}, image_part(data_url(picture(80, 80)))])
    assert r.usage.prompt_tokens > 10
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_repeated_prompt_reports_its_prefix_cache_hit(client, server):
    """usage.prompt_tokens_details.cached_tokens, as OpenAI's: the prompt tokens vLLM found
    in its prefix cache (whole blocks of 128 tokens on CPU: a picture of 256 tokens or more
    fills one). A colour no other test sends, so the first request's picture is new."""
    content = [image_part(data_url(picture(448, 448, color=(3, 141, 59)))), {"type": "text", "text": "Cache me."}]
    first = ask(client, server, content, max_tokens=2)
    again = ask(client, server, content, max_tokens=2)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens
    # (whole blocks of the prompt, its last token never: the engine computes at least one)
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    streamed = ask(client, server, content, max_tokens=2, stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in streamed if chunk.usage][-1]
    assert usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens


def test_a_cache_salt_keeps_the_prefix_cache_of_others_apart(client, server):
    """Requests share cached prompt blocks only with requests of the same cache_salt (vLLM's
    extension, for tenants who must not learn from each other's cache hits)."""
    content = [image_part(data_url(picture(448, 448, color=(201, 7, 133)))), {"type": "text", "text": "Salt me."}]
    cached = lambda r: r.usage.prompt_tokens_details.cached_tokens  # noqa: E731
    first = ask(client, server, content, max_tokens=2, extra_body={"cache_salt": "tenant-a"})
    same = ask(client, server, content, max_tokens=2, extra_body={"cache_salt": "tenant-a"})
    other = ask(client, server, content, max_tokens=2, extra_body={"cache_salt": "tenant-b"})
    unsalted = ask(client, server, content, max_tokens=2)
    assert cached(same) > cached(first)
    assert cached(other) == cached(first) and cached(unsalted) == cached(first)


def test_two_images_in_one_message(client, server, image_server):
    one = ask(client, server, [image_part(image_server.url("/a.png")), {"type": "text", "text": "Compare."}])
    two = ask(client, server, [image_part(image_server.url("/a.png")), image_part(image_server.url("/b.jpg")),
                               {"type": "text", "text": "Compare."}])
    assert two.usage.prompt_tokens > one.usage.prompt_tokens


def test_multi_turn_with_images(client, server, image_server):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [image_part(image_server.url("/a.png")), {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A red block."},
        {"role": "user", "content": [image_part(data_url(picture(40, 60, (1, 2, 3)))), {"type": "text", "text": "And this?"}]},
    ]
    r = client.chat.completions.create(model=model_name(server), messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None
    assert r.usage.prompt_tokens > 20


def test_the_image_shapes_the_answer_and_a_repeat_gives_the_same_one(client, server):
    """The engine caches images (processor cache, prefix cache) under the server's content
    ids: a repeated image must give exactly the same answer, a different one another."""

    def answer(picture_bytes: bytes) -> list[tuple[str, float]]:
        r = ask(client, server, [image_part(data_url(picture_bytes)), {"type": "text", "text": "Describe."}],
                max_tokens=4, logprobs=True, extra_body={"ignore_eos": True})
        return [(item.token, item.logprob) for item in r.choices[0].logprobs.content]

    def differ(a, b) -> bool:
        return any(x[0] != y[0] or abs(x[1] - y[1]) > 1e-4 for x, y in zip(a, b))

    def data_url_hits() -> float:
        text = httpx.get(server.base_url + "/metrics").text
        return float(re.search(r'^qwenvl_image_cache_total\{cache="data_url",result="hit"\} (\S+)$', text, re.M)[1])

    black, white = picture(112, 112, (0, 0, 0)), picture(112, 112, (255, 255, 255))
    first = answer(black)
    other = answer(white)
    hits = data_url_hits()
    repeat = answer(black)
    assert data_url_hits() == hits + 1  # (found by its text: its base64 was not decoded again)
    assert not differ(first, repeat), (first, repeat)
    assert differ(first, other), (first, other)


def test_prompt_tokens_match_hf_processor(client, server):
    """usage.prompt_tokens counts image tokens exactly as the checkpoint's own processor."""

    raw = picture(200, 120)
    content = [image_part(data_url(raw)), {"type": "text", "text": "How many objects are there? 这是什么？"}]
    r = ask(client, server, content, max_tokens=1)
    assert r.usage.prompt_tokens == hf_prompt_tokens(server, [Image.open(io.BytesIO(raw)).convert("RGB")],
                                                     "How many objects are there? 这是什么？")


def test_low_detail_sends_a_smaller_picture(client, server):
    """image_url.detail "low" caps the picture at 448x448 pixels' worth: fewer image tokens,
    exactly what the processor gives for the downscaled picture. Qwen-VL's fixed 448x448
    input has one cost whatever the detail."""

    from server.images.family import FAMILIES, LOW_DETAIL_MAX_PIXELS, target_size

    raw, text = picture(700, 560), "Describe."

    def prompt_tokens(detail: str) -> int:
        part = {"type": "image_url", "image_url": {"url": data_url(raw), "detail": detail}}
        return ask(client, server, [part, {"type": "text", "text": text}], max_tokens=1).usage.prompt_tokens

    low, high, auto = prompt_tokens("low"), prompt_tokens("high"), prompt_tokens("auto")
    assert high == auto == prompt_tokens("original")  # ("original": newer SDKs' value)
    if server.arch == "qwen-vl":
        assert low == high
        return
    original = Image.open(io.BytesIO(raw)).convert("RGB")
    assert high == hf_prompt_tokens(server, [original], text)
    small = original.resize(target_size(FAMILIES[server.arch], 700, 560, LOW_DETAIL_MAX_PIXELS))
    assert low == hf_prompt_tokens(server, [small], text) and low < high - 200


def test_first_generation_pictures_reach_the_model_as_its_own_pipeline_makes_them(client, server):
    """Qwen-VL stretches every picture to its square: the server does it in its decode pool
    (the processor did it on the event loop), with the processor's own resize, so a large
    picture gives the model what the picture pre-stretched by the client gives it. The
    published pipeline's `convert("RGB")` drops transparency (the colour under it stays),
    and a picture over 200:1 is refused before it is decoded."""
    if server.arch != "qwen-vl":
        pytest.skip("the first-generation model's pipeline")

    def logprobs(raw: bytes) -> list[float]:
        r = ask(client, server, [image_part(data_url(raw)), {"type": "text", "text": "Describe."}],
                max_tokens=3, logprobs=True, top_logprobs=3)
        return [t.logprob for c in r.choices[0].logprobs.content for t in c.top_logprobs]

    def png(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    large = Image.open(io.BytesIO(picture(1500, 1000))).convert("RGB")
    stretched = large.resize((448, 448), Image.Resampling.BICUBIC)
    assert logprobs(png(large)) == logprobs(png(stretched))
    # red under transparent pixels: the model sees red, as the model's own pipeline shows it
    clear = Image.new("RGBA", (64, 48), (200, 30, 30, 0))
    assert logprobs(png(clear)) == logprobs(png(Image.new("RGB", (64, 48), (200, 30, 30))))
    assert logprobs(png(clear)) != logprobs(png(Image.new("RGB", (64, 48), (255, 255, 255))))
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, server, [image_part(data_url(png(Image.new("L", (1, 2000))))), {"type": "text", "text": "x"}])
    assert info.value.body["code"] == "invalid_image" and "aspect ratio" in info.value.body["message"]


# --- grounding on the real path (support.grounding_case) ---------------------------------


def test_a_box_the_model_writes_comes_back_as_data_in_the_pictures_pixels(client, server):
    grounding_case.check_box_comes_back_as_data(client, server, model_name(server))


def test_streamed_boxes_arrive_in_the_choices_last_chunk(client, server):
    grounding_case.check_streamed_boxes_arrive_in_the_last_chunk(client, server, model_name(server))


def test_grounding_off_leaves_the_text_alone(client, server):
    grounding_case.check_grounding_off_leaves_the_text_alone(client, server, model_name(server))


def test_grounding_tags_in_the_request_are_read_as_the_model_writes_them(client, server):
    """A referring expression and an earlier answer's box, in each generation's own tags:
    the prompt holds the tags as single tokens, as the reference processor makes it."""

    if server.arch == "qwen-vl":
        text = "Where is <ref>the dog</ref>? Earlier: <ref>cat</ref><box>(1,2),(300,400)</box>"
    else:
        text = ("Where is <|object_ref_start|>the dog<|object_ref_end|>? Earlier: "
                "<|box_start|>(1,2),(300,400)<|box_end|>")
    raw = picture(64, 64)
    r = ask(client, server, [image_part(data_url(raw)), {"type": "text", "text": text}], max_tokens=1)
    assert r.usage.prompt_tokens == hf_prompt_tokens(server, [Image.open(io.BytesIO(raw)).convert("RGB")], text)


def test_logit_bias_reaches_the_sampler(client, server):
    """+100 makes a token the greedy choice at every step; -100 rules out the token greedy
    decoding picked (token ids, as OpenAI's API takes them)."""
    from server.engine.vllm_engine import token_bytes_of

    tok = reference_tokenizer(server)
    for letter in "AB":
        (target,) = tok.encode(letter)
        r = ask(client, server, "Tell me about the sea.", max_tokens=4, logit_bias={str(target): 100})
        assert r.choices[0].message.content == letter * 4 and r.usage.completion_tokens == 4
    # (the tiny model's first pick is often a piece of a character: found by its bytes)
    first = bytes(ask(client, server, "Hello", max_tokens=1, logprobs=True).choices[0].logprobs.content[0].bytes)
    token_bytes = token_bytes_of(tok)
    banned = [i for i in range(len(tok)) if token_bytes(i) == first]
    assert len(banned) == 1, banned
    r = ask(client, server, "Hello", max_tokens=1, logprobs=True, logit_bias={str(banned[0]): -100})
    assert bytes(r.choices[0].logprobs.content[0].bytes) != first


def test_streaming_matches_non_streaming(client, server):
    content = [image_part(data_url(picture(64, 64))), {"type": "text", "text": "Tell me a story 关于猫."}]
    full = ask(client, server, content, max_tokens=24, seed=1)
    stream = ask(client, server, content, max_tokens=24, seed=1, stream=True,
                 stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens


def test_sse_wire_format(server):
    """Raw SSE: data lines with JSON, one final [DONE], the anti-buffering header."""
    body = {"model": f"tiny-{server.arch}", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no"
        lines = [line for line in r.iter_lines() if line]
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert data.count("[DONE]") == 1
    for payload in data[:-1]:
        assert json.loads(payload)["object"] == "chat.completion.chunk"


def test_n_choices(client, server):
    r = ask(client, server, "Say something", n=2, max_tokens=6, temperature=0.9, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 12  # both choices counted
    greedy = ask(client, server, "Say something", n=2, max_tokens=6)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_n_choices_streaming(client, server):
    stream = ask(client, server, "Count", n=2, max_tokens=5, stream=True)
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}


def test_n_choices_at_a_near_zero_temperature(client, server):
    """vLLM samples greedily below 1e-5 and refuses n>1 there (Qwen2.5-VL's generation
    config defaults to 1e-6): one generation, fanned out to n identical choices. The client's
    usage counts both choices; the server's counter of generated tokens, the engine's work,
    counts the one generation."""
    def generated() -> float:
        text = httpx.get(server.base_url + "/metrics").text
        return float(re.search(r"^qwenvl_completion_tokens_total (\S+)$", text, re.M).group(1))

    before = generated()
    r = ask(client, server, "Count", n=2, max_tokens=4, temperature=1e-6, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    assert r.usage.completion_tokens == 8
    assert generated() - before == 4


def test_stop_sequence(client, server):
    free = ask(client, server, "Write a long sentence.", max_tokens=20)
    text = free.choices[0].message.content
    # Pick a stop string the greedy answer contains beyond its first characters.
    stop = next((text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].strip()), None)
    assert stop, f"greedy output too short to pick a stop string: {text!r}"
    stopped = ask(client, server, "Write a long sentence.", max_tokens=20, stop=[stop])
    out = stopped.choices[0].message.content
    assert stop not in out
    assert text.startswith(out)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == stop  # (vLLM's field: which stop matched)
    assert free.choices[0].model_extra["stop_reason"] is None
    chunks = list(ask(client, server, "Write a long sentence.", max_tokens=20, stop=[stop], stream=True))
    [last] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.choices[0].model_extra["stop_reason"] == stop


def test_stop_strings_let_no_special_token_into_the_text(client, server):
    """With a stop string, vLLM holds back text that might begin it, so a special token can
    arrive split across two deltas; none may reach `content` (grounding tags aside)."""
    specials = re.compile(r"<\|(?:im_start|im_end|endoftext|image_pad|video_pad|vision_start|vision_end|vision_pad)\|>"
                          r"|<img>|</img>|<imgpad>|<\|extra_\d+\|>")
    for seed in (17, 22, 5):
        kwargs = dict(max_tokens=300, temperature=1.0, seed=seed, stop=["\n\n"], extra_body={"ignore_eos": True})
        whole = ask(client, server, "hello", **kwargs).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, server, "hello", stream=True, **kwargs)
                           if c.choices)
        assert not specials.search(whole), whole
        assert streamed == whole

def test_max_tokens_gives_length(client, server):
    r = ask(client, server, "Write a novel.", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    r2 = ask(client, server, "Write a novel.", max_completion_tokens=2, max_tokens=None,
             extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 2


def test_max_tokens_left_out_takes_the_models_default_length(client, server):
    """The tiny Qwen-VL checkpoint's generation_config.json says max_new_tokens 512 (as
    Qwen-VL-Chat's does); the tiny Qwen2-VL's sets none, so the context is the limit."""
    r = client.chat.completions.create(model=model_name(server), temperature=0,
                                       messages=[{"role": "user", "content": "Count."}],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    if server.arch == "qwen-vl":
        assert r.usage.completion_tokens == 512
    else:
        assert r.usage.total_tokens == MAX_MODEL_LEN


def test_min_tokens_beyond_the_default_length_is_refused_not_cut(client, server):
    """Without max_tokens the length is the model's default (512 on the tiny Qwen-VL) or the
    context left; a min_tokens above it is a 400 naming min_tokens, as vLLM's server answers,
    not an answer silently shorter than asked."""
    limit = 512 if server.arch == "qwen-vl" else MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_name(server), messages=[{"role": "user", "content": "Count."}],
                                       extra_body={"min_tokens": limit + 1})
    assert err.value.param == "min_tokens", err.value.message
    assert f"min_tokens is {limit + 1}" in err.value.message
    if server.arch == "qwen-vl":
        assert "at most 512 tokens" in err.value.message
    r = ask(client, server, "Count.", max_tokens=4, extra_body={"min_tokens": 4})
    assert r.usage.completion_tokens == 4


def test_histories_with_tool_results_and_a_final_assistant_turn(client, server):
    r = client.chat.completions.create(model=model_name(server), max_tokens=3, temperature=0, n=None,
                                       presence_penalty=None, messages=[
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": "It is"},
    ])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10


def test_logprobs(client, server):
    r = ask(client, server, "hi", max_tokens=3, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob


def test_logprob_bytes_are_the_tokens_own(client, server):
    """A token can be a piece of a UTF-8 character: its bytes are still the token's, and
    together they spell the answer; its text is those bytes too, the incomplete character
    escaped (`\\xe5`), never empty (a client keying alternatives by their text lost all of
    those but one) nor the whole character it ends (the texts joined repeated its bytes)."""
    # (top_p 1: the whole vocabulary, not the checkpoint's default nucleus)
    kwargs = dict(max_tokens=40, temperature=1.0, top_p=1.0, logprobs=True, top_logprobs=2,
                  extra_body={"ignore_eos": True, "skip_special_tokens": False})
    pieces = []
    for seed in range(3, 11):  # (until random weights have written a piece of a character)
        r = ask(client, server, "hi", seed=seed, **kwargs)
        items = r.choices[0].logprobs.content
        # (ids past the tokenizer, which random weights can pick, have neither text nor bytes)
        spelled = b"".join(bytes(item.bytes) for item in items)
        # (random weights also pick byte sequences that are no UTF-8; the text marks them with
        # replacement characters, placed as the detokenizer sees fit)
        assert spelled.decode("utf-8", errors="ignore") == r.choices[0].message.content.replace("\ufffd", "")
        for item in items:
            for text, raw in [(item.token, item.bytes)] + [(alt.token, alt.bytes) for alt in item.top_logprobs]:
                assert text or not raw, (text, raw)
                if raw:
                    assert text == bytes(raw).decode("utf-8", "backslashreplace"), (text, raw)
        pieces += [item for item in items if item.bytes and not _whole_characters(bytes(item.bytes))]
        if pieces:
            break
    assert pieces, "no token was a piece of a character in 8 answers"


def _whole_characters(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: Special tokens that `content` leaves out: all but the grounding tags (both tokenizers).
HIDDEN_SPECIAL = re.compile("|".join(
    [r"<\|(?!(?:object_ref|box|quad)_(?:start|end)\|>)[^|<>]+\|>", "</?img>", "<imgpad>"]))


def test_stop_strings_never_match_inside_a_hidden_special_token(client, server):
    """`content` has no special tokens but the grounding tags, and a stop string is matched
    against that text: not against the name of a token the client never sees."""
    kwargs = dict(max_tokens=24, temperature=1.0, top_p=1.0)
    for seed in range(60):
        raw = ask(client, server, "hi", seed=seed, **kwargs,
                  extra_body={"ignore_eos": True, "skip_special_tokens": False}).choices[0].message.content
        visible = HIDDEN_SPECIAL.sub("", raw)
        names = [t.strip("<|>/") for t in HIDDEN_SPECIAL.findall(raw)]
        names = [name for name in names if name not in visible]
        if names:
            break
    else:
        pytest.fail("no seed made the model write a hidden special token")
    r = ask(client, server, "hi", seed=seed, **kwargs, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == visible
    r = ask(client, server, "hi", seed=seed, **kwargs, stop=[names[0]], extra_body={"ignore_eos": True})
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (visible, "length")
    assert r.usage.completion_tokens == 24
    chunks = client.chat.completions.create(model=model_name(server), messages=[{"role": "user", "content": "hi"}],
                                            seed=seed, stop=[names[0]], stream=True, extra_body={"ignore_eos": True},
                                            **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == visible


def test_sixteen_concurrent_requests(server):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        tasks = [
            aclient.chat.completions.create(
                model=f"tiny-{server.arch}",
                messages=[{"role": "user", "content": [image_part(data_url(picture(32 + i, 32))),
                                                       {"type": "text", "text": f"request {i}"}]}],
                max_tokens=8, temperature=0, stream=(i % 2 == 0),
            )
            for i in range(16)
        ]
        results = await asyncio.gather(*tasks)
        texts = []
        for r in results:
            if isinstance(r, openai.AsyncStream):
                texts.append("".join([c.choices[0].delta.content or "" async for c in r if c.choices]))
            else:
                texts.append(r.choices[0].message.content)
        await aclient.close()
        return texts

    texts = asyncio.run(run())
    assert len(texts) == 16
    assert all(isinstance(t, str) for t in texts)


def test_models_health_ready(server):
    models = httpx.get(server.base_url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [f"tiny-{server.arch}"]
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/ready").json() == {"status": "ready"}


def test_engine_core_runs_below_the_front_end_and_the_workers(server):
    """On CPU the busy-polling engine core gets nice +10; the model workers do not."""
    import psutil

    front = psutil.Process(server.proc.pid)
    cores = front.children()
    workers = [w for core in cores for w in core.children(recursive=True)]
    assert cores and workers, "the engine core and its workers run in child processes"
    for core in cores:
        assert core.nice() == min(19, front.nice() + 10), (core.name(), core.nice(), front.nice())
    for worker in workers:
        assert worker.nice() == front.nice(), (worker.name(), worker.nice(), front.nice())


def test_metrics(client, server):
    ask(client, server, [image_part(data_url(picture(50, 50))), {"type": "text", "text": "m"}], max_tokens=2)
    text = httpx.get(server.base_url + "/metrics").text
    for name in [
        "qwenvl_requests_total", "qwenvl_time_to_first_token_seconds_bucket",
        "qwenvl_time_per_output_token_seconds_bucket", "qwenvl_request_duration_seconds_bucket",
        "qwenvl_prompt_tokens_total", "qwenvl_completion_tokens_total", "qwenvl_requests_running",
        "qwenvl_requests_waiting", "qwenvl_image_fetch_seconds_bucket", "qwenvl_image_decode_seconds_bucket",
        "qwenvl_kv_cache_usage_ratio",
    ]:
        assert name in text, name
    assert 'qwenvl_requests_total{outcome="success"}' in text
    from server import __version__

    assert f'qwenvl_build_info{{model="{model_name(server)}",version="{__version__}"}} 1.0' in text
    rss = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M)
    assert rss and float(rss.group(1)) > 50e6  # the front end, engine loaded


def test_request_id_echoed(server):
    r = httpx.get(server.base_url + "/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


# --- errors -------------------------------------------------------------------------------


def expect_error(fn, status: int, code: str | None = None) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    err = info.value
    assert err.status_code == status, err.response.text
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["message"] and "Traceback" not in body["message"] and "0x" not in body["message"]
    if code is not None:
        assert body["code"] == code, body
    return err


def test_error_unknown_model(client, server):
    err = expect_error(lambda: client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "hi"}]), 404, "model_not_found")
    assert "no-such-model" in err.response.json()["error"]["message"]


def test_values_the_engine_cannot_take_are_refused_before_it(client, server):
    """A lone surrogate or a seed beyond 64 bits failed inside vLLM (500s, and a request the
    engine client never released); now a 400, and the engine holds nothing afterwards."""
    def raw(**extra):
        payload = {"model": model_name(server), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                   **extra}
        return httpx.post(server.base_url + "/v1/chat/completions", content=json.dumps(payload),
                          headers={"content-type": "application/json"}, timeout=60)

    for extra in ({"stop": ["\ud800"]}, {"seed": 2**64}, {"top_k": 2**64}, {"stream": True, "seed": -(2**63) - 1},
                  {"messages": [{"role": "user", "content": "\udfff"}]}, {"tools": [{"type": "function"}]}):
        r = raw(**extra)
        assert r.status_code == 400, (extra, r.text)
    assert raw(seed=2**63 - 1).status_code == 200
    metrics = httpx.get(server.base_url + "/metrics").text
    assert re.search(r"^qwenvl_engine_unfinished_requests 0(\.0)?$", metrics, re.M), metrics


def test_request_heads_are_bounded_in_size(server):
    """The server process runs uvicorn with our protocol (server/http_protocol.py)."""
    r = httpx.get(server.base_url + "/health", headers={"X-Big": "a" * 100_000})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert httpx.get(server.base_url + "/health", headers={"X-Fine": "a" * 8_000}).status_code == 200


def test_error_schema(client, server):
    expect_error(lambda: ask(client, server, "hi", temperature=7), 400)
    expect_error(lambda: client.chat.completions.create(model=model_name(server), messages=[]), 400)
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.base_url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]})
    assert r.status_code == 400
    assert "messages[0].content[0]" in r.json()["error"]["param"]


def test_unknown_fields_ignored(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", json={
        "model": f"tiny-{server.arch}", "messages": [{"role": "user", "content": "hi", "weird": 1}],
        "max_tokens": 2, "some_future_field": {"a": 1}, "parallel_tool_calls": False})
    assert r.status_code == 200, r.text


def test_error_bad_image_urls(client, server, image_server):
    expect_error(lambda: ask(client, server, [image_part("data:image/png;base64,!!!notbase64")]), 400)
    expect_error(lambda: ask(client, server, [image_part(image_server.url("/not-an-image.png"))]), 400,
                 "image_decode_failed")
    expect_error(lambda: ask(client, server, [image_part(image_server.url("/missing.png"))]), 400,
                 "image_fetch_failed")
    expect_error(lambda: ask(client, server, [image_part("http://127.0.0.1:9/x.png")]), 400, "image_url_forbidden")
    expect_error(lambda: ask(client, server, [image_part("ftp://example.com/x.png")]), 400)
    # malformed hosts, in the request or in an image server's redirect: 400s, not 500s
    expect_error(lambda: ask(client, server, [image_part("file://[x]/a.png")]), 400, "image_url_forbidden")
    expect_error(lambda: ask(client, server, [image_part(image_server.url("/bad-redirect.png"))]), 400,
                 "image_url_forbidden")
    # a JPEG padded with 200,000 empty segments (seconds of Pillow's parsing): refused first
    jpeg = picture(16, 16, fmt="JPEG")
    fragmented = jpeg[:2] + b"\xff\xe1\x00\x02" * 200_000 + jpeg[2:]
    err = expect_error(lambda: ask(client, server, [image_part(data_url(fragmented, "image/jpeg"))]), 400,
                       "image_decode_failed")
    assert "too many small segments" in err.response.json()["error"]["message"]


def test_error_too_many_images(client, server):
    url = data_url(picture(8, 8))
    err = expect_error(lambda: ask(client, server, [image_part(url)] * 4), 400, "too_many_images")
    assert "3" in err.response.json()["error"]["message"]


def test_error_prompt_too_long(client, server):
    expect_error(lambda: ask(client, server, "word " * (MAX_MODEL_LEN * 2)), 400, "context_length_exceeded")


def test_a_prompt_that_fills_the_context_is_refused_and_one_token_less_is_served(client, server):
    """The boundary: a prompt of exactly the context's length leaves no room for an answer
    (its message said only that the context is that long); one token shorter gets its token."""
    def prompt_tokens(text: str) -> int:
        return ask(client, server, text, max_tokens=1).usage.prompt_tokens

    base = prompt_tokens("a")
    assert prompt_tokens("a" + " a" * 10) == base + 10  # " a" is one token in both tiny vocabularies
    fits = "a" + " a" * (MAX_MODEL_LEN - 1 - base)
    served = ask(client, server, fits, max_tokens=1)
    assert served.usage.prompt_tokens == MAX_MODEL_LEN - 1 and served.usage.completion_tokens == 1
    err = expect_error(lambda: ask(client, server, fits + " a", max_tokens=None), 400, "context_length_exceeded")
    message = err.response.json()["error"]["message"]
    assert f"The prompt is {MAX_MODEL_LEN} tokens" in message and "no room for an answer" in message, message


def test_an_answer_cut_off_inside_a_character_keeps_its_last_text(client, server):
    """vLLM's detokenizer holds back text while it ends in part of a UTF-8 character; when
    max_tokens ended the answer there, that text (whole characters before the broken one
    too) was dropped: a token of one Cyrillic letter and half of the next, written 3 times,
    gave ''. The answer is now the tokens' text as the tokenizer decodes it."""
    from server.engine.vllm_engine import token_bytes_of

    if server.arch == "qwen-vl":
        from server.qwen_vl.tokenizer import QWenTokenizer

        tokenizer = QWenTokenizer(vocab_file=str(server.model_dir / "qwen.tiktoken"))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    token_bytes = token_bytes_of(tokenizer)

    def whole_then_part(token_id: int) -> bool:  # e.g. "世" and the first two bytes of "界"
        text = (token_bytes(token_id) or b"").decode("utf-8", "replace")
        return text.endswith("\ufffd") and "\ufffd" not in text[:-1] and bool(text[:-1].strip())

    token = next(i for i in range(min(len(tokenizer), 50_000)) if whole_then_part(i))
    for max_tokens in (1, 3):
        expected = tokenizer.decode([token] * max_tokens)
        assert expected.endswith("\ufffd") and len(expected) > 1
        answer = ask(client, server, "hi", max_tokens=max_tokens, logprobs=True,
                     extra_body={"allowed_token_ids": [token]})
        choice = answer.choices[0]
        assert choice.finish_reason == "length" and answer.usage.completion_tokens == max_tokens
        assert choice.message.content == expected
        assert b"".join(bytes(t.bytes) for t in choice.logprobs.content) == token_bytes(token) * max_tokens
        stream = ask(client, server, "hi", max_tokens=max_tokens, stream=True,
                     extra_body={"allowed_token_ids": [token]})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    # vLLM never looks for stop strings in that text; one there ends the answer all the same.
    expected = tokenizer.decode([token] * 3)
    stop = expected[len(expected) // 2:len(expected) // 2 + 2]
    at = expected.index(stop)
    for include, content in ((False, expected[:at]), (True, expected[:at + len(stop)])):
        extra = {"allowed_token_ids": [token], "include_stop_str_in_output": include}
        answer = ask(client, server, "hi", max_tokens=3, stop=[stop, "never"], extra_body=extra)
        assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (content, "stop")
        chunks = [c for c in ask(client, server, "hi", max_tokens=3, stop=[stop], stream=True, extra_body=extra)
                  if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_error_max_tokens_over_context(client, server):
    err = expect_error(lambda: ask(client, server, "hi", max_tokens=MAX_MODEL_LEN + 1), 400, "context_length_exceeded")
    assert err.response.json()["error"]["param"] == "max_tokens"
    # the field the client sent is the one named
    err = expect_error(lambda: ask(client, server, "hi", max_tokens=None, max_completion_tokens=MAX_MODEL_LEN + 1),
                       400, "context_length_exceeded")
    body = err.response.json()["error"]
    assert body["param"] == "max_completion_tokens" and body["message"].startswith("max_completion_tokens is")


def test_a_request_refused_after_its_picture_was_processed_leaves_the_picture_usable(client, server):
    """Refusals that need the processed prompt's length (max_tokens beyond the context,
    min_tokens beyond the default length) and a schema the engine cannot follow come after
    vLLM's front end noted the picture as sent to its engine. It never was: the next request
    with the same picture went without its data and failed with a 500 (generation_failed)."""
    import random

    color = tuple(random.randrange(256) for _ in range(3))  # a picture no earlier test sent
    content = [image_part(data_url(picture(72, 56, color))), {"type": "text", "text": "What is it?"}]
    refusals = [
        (dict(max_tokens=MAX_MODEL_LEN), "context_length_exceeded"),
        (dict(max_tokens=None, extra_body={"min_tokens": MAX_MODEL_LEN - 8}), None),
        (dict(response_format={"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "number", "multipleOf": 3}}}), None),
    ]
    for kwargs, code in refusals:
        expect_error(lambda: ask(client, server, content, **kwargs), 400, code)
        r = ask(client, server, content, max_tokens=3)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1


def test_server_still_serves_after_errors(client, server):
    r = ask(client, server, "still there?", max_tokens=2)
    assert r.choices[0].message.content is not None


# --- structured outputs (response_format) -------------------------------------------------

class Verdict(BaseModel):
    """An answer the random-weight model can only finish: a choice of three and a boolean."""

    colour: Literal["red", "green", "blue"]
    ok: bool


def test_the_sdks_parse_gets_an_answer_that_follows_the_schema(client, server):
    """`client.beta.chat.completions.parse` sends the model class as a strict json_schema and
    reads the answer back into it; random weights could only write that under the grammar."""
    for _ in range(3):
        completion = client.beta.chat.completions.parse(
            model=model_name(server), messages=[{"role": "user", "content": "Pick a colour."}],
            response_format=Verdict, max_tokens=60, temperature=1.0)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Verdict)
        assert json.loads(choice.message.content) == choice.message.parsed.model_dump()
        assert " " not in choice.message.content and "\n" not in choice.message.content  # compact


def test_a_streamed_answer_follows_the_schema_too(client, server):
    schema = Verdict.model_json_schema()
    stream = client.chat.completions.create(
        model=model_name(server), messages=[{"role": "user", "content": "Pick a colour."}], stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        max_tokens=60)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    Verdict.model_validate_json(text)


def test_json_object_makes_the_answer_a_json_object(client, server):
    def answer(**kwargs) -> str:
        return ask(client, server, "Answer in JSON.", max_tokens=24, temperature=0, **kwargs).choices[0].message.content

    constrained = answer(response_format={"type": "json_object"})
    assert constrained.startswith('{"') or constrained == "{}", constrained
    assert not answer().startswith("{")  # (what the same greedy model writes unconstrained)
    assert answer(response_format={"type": "text"}) == answer()


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"type": "nonsense"}}}, 'Unsupported type "nonsense"'),
    ({"$ref": "#/definitions/missing"}, "missing"),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}}}, "multipleOf on numbers"),
    ({"type": "integer", "minimum": -1e30}, "Integer exceeds minimum limit"),
])
def test_a_schema_the_engine_cannot_follow_is_a_400_that_says_why(client, server, schema, words):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=model_name(server), messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=stream,
                response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}})
        error = caught.value.body
        assert error["param"] == "response_format" and error["code"] == "invalid_response_format"
        assert words in error["message"]
        assert ".cc" not in error["message"] and "/project" not in error["message"]  # no native source paths
        assert "Check failed" not in error["message"]  # nor the native library's assertions
    assert ask(client, server, "still serving?").choices[0].finish_reason in ("stop", "length")


def test_a_schema_no_answer_can_follow_is_a_400_not_a_server_error(client, server):
    """A string pattern that matches nothing passes the grammar compiler; vLLM then ends the
    request with an error at the first token the grammar cannot take. Sending it again can
    never help: a 400 naming the field (an error event once the stream has begun)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "none", "schema": {"type": "string", "pattern": "[^\\s\\S]"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, server, "x", max_tokens=4, response_format=fmt)
    assert caught.value.body["param"] == "response_format" and caught.value.body["code"] == "invalid_response_format"
    stream = client.chat.completions.create(model=model_name(server), messages=[{"role": "user", "content": "x"}],
                                            max_tokens=4, stream=True, response_format=fmt)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert caught.value.body["code"] == "invalid_response_format", caught.value.body
    # Mid-answer: the text before the dead end is sent, but not the placeholder token vLLM
    # puts in the failed output (it came as content before the error event, breaking the schema).
    fmt = {"type": "json_schema", "json_schema": {"name": "dead_end", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "a[^\\s\\S]b"}},
        "required": ["a"], "additionalProperties": False}}}
    stream = client.chat.completions.create(model=model_name(server), messages=[{"role": "user", "content": "x"}],
                                            max_tokens=40, temperature=0, stream=True, response_format=fmt)
    sent = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            sent += [c.delta.content or "" for c in chunk.choices]
    assert caught.value.body["code"] == "invalid_response_format", caught.value.body
    assert "".join(sent) == '{"a":"a'
    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'qwenvl_requests_total{outcome="server_error"} 0.0' in metrics
    assert ask(client, server, "still serving?").choices[0].finish_reason in ("stop", "length")


# --- vLLM's request extensions --------------------------------------------------------------

def test_structured_outputs_choice_and_json(client, server):
    """vLLM's `structured_outputs` (json, choice) constrains the answer as response_format does."""
    for _ in range(3):
        r = ask(client, server, "Pick one.", max_tokens=16, temperature=1.0,
                extra_body={"structured_outputs": {"choice": ["alpha", "beta gamma", "42"]}})
        assert r.choices[0].message.content in ("alpha", "beta gamma", "42"), r.choices[0].message.content
    schema = Verdict.model_json_schema()
    for spelled in (schema, json.dumps(schema)):  # an object, or JSON text of one, as vLLM takes it
        r = ask(client, server, "Pick a colour.", max_tokens=60, temperature=1.0,
                extra_body={"structured_outputs": {"json": spelled}})
        Verdict.model_validate_json(r.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, server, "x", extra_body={"structured_outputs": {"json": {"$ref": "#/definitions/missing"}}})
    assert caught.value.body["param"] == "structured_outputs"
    assert caught.value.body["code"] == "invalid_structured_outputs"


def test_stop_token_ids_end_the_answer(client, server):
    """Token 300, made near certain by its bias, ends the answer when it is a stop token; its
    text is left out, as vLLM does."""
    forced = {"logit_bias": {"300": 100}, "max_tokens": 8}
    free = ask(client, server, "Write a long sentence.", **forced, extra_body={"ignore_eos": True})
    assert free.usage.completion_tokens == 8 and free.choices[0].finish_reason == "length"
    stopped = ask(client, server, "Write a long sentence.", **forced,
                  extra_body={"ignore_eos": True, "stop_token_ids": [7, 300]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].message.content == ""
    assert stopped.choices[0].model_extra["stop_reason"] == 300


def test_allowed_token_ids_limit_the_answer_to_them(client, server):
    """With only tokens 300 and 301 allowed, the first token is one of them, and ends the
    answer as a stop token (stop_reason names it)."""
    body = {"ignore_eos": True, "stop_token_ids": [300, 301]}
    free = ask(client, server, "Write a long sentence.", max_tokens=4, extra_body=body)
    assert free.choices[0].model_extra["stop_reason"] not in (300, 301)  # (a random model's 2 in 151k)
    only = ask(client, server, "Write a long sentence.", max_tokens=4,
               extra_body={**body, "allowed_token_ids": [300, 301]})
    assert only.usage.completion_tokens == 1 and only.choices[0].model_extra["stop_reason"] in (300, 301)


def test_bad_words_are_never_written(client, server):
    """Token 300, forced by its bias, is a bad word's only token: never written."""
    word = reference_tokenizer(server).decode([300])  # ("la" in Qwen2's vocabulary, "as" in Qwen's)
    assert word.isalpha()
    forced = {"logit_bias": {"300": 100}, "max_tokens": 4}
    body = {"ignore_eos": True, "stop_token_ids": [300]}
    free = ask(client, server, "Write a long sentence.", **forced, extra_body=body)
    assert free.choices[0].model_extra["stop_reason"] == 300
    banned = ask(client, server, "Write a long sentence.", **forced, extra_body={**body, "bad_words": [word]})
    # (token 300 would have ended it: four other tokens came instead)
    assert banned.choices[0].finish_reason == "length" and banned.usage.completion_tokens == 4


@pytest.mark.parametrize("extra, param", [
    # vLLM's GPU model runner refuses these in its engine core, which then dies: a 400 first
    ({"bad_words": [" "]}, "bad_words"),  # no token to ban
    ({"bad_words": ["".join(chr(0x4E00 + (i * 7919 + k * 104729) % 20000) for k in range(200))
                    for i in range(8)]}, "bad_words"),  # thousands of tokens
    ({"min_tokens": 2, "stop_token_ids": list(range(130))}, "stop_token_ids"),
    # 127 of the client's and the end-of-sequence ids vLLM adds (ignore_eos or not): 129
    ({"min_tokens": 2, "stop_token_ids": list(range(127))}, "stop_token_ids"),
    ({"min_tokens": 2, "ignore_eos": True, "stop_token_ids": list(range(127))}, "stop_token_ids"),
])
def test_what_the_model_runner_has_no_room_for_is_a_400(client, server, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, server, "hi", max_tokens=4, extra_body=extra)
    assert info.value.body["param"] == param, info.value.body
    assert ask(client, server, "hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_too_many_bad_word_spellings_are_refused_without_echoing_the_list(client, server):
    """128 words (of the 128 allowed) come to more spellings once vLLM adds each word's
    leading-space one; its error text carried the client's whole list along."""
    words = [f"word{i}" for i in range(128)]
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, server, "hi", max_tokens=2, extra_body={"bad_words": words})
    message = info.value.body["message"]
    assert info.value.body["param"] == "bad_words"
    assert message.startswith("bad_words cannot be used: Too many bad words after tokenization"), message
    assert "word1" not in message and "value=" not in message


def test_min_tokens_with_as_many_stop_token_ids_as_the_model_runner_masks_is_served(client, server):
    """The table holds 128: the client's ids and the model's own end-of-sequence ids."""
    from server.engine.vllm_engine import _MAX_MASKED_STOP_IDS

    with pytest.raises(openai.BadRequestError) as info:
        ask(client, server, "hi", max_tokens=4, extra_body={"min_tokens": 2, "stop_token_ids": list(range(200))})
    room = int(info.value.body["message"].split("at most ")[1].split()[0])
    assert 0 < room < _MAX_MASKED_STOP_IDS
    answer = ask(client, server, "hi", max_tokens=4, extra_body={"min_tokens": 2, "stop_token_ids": list(range(room))})
    assert answer.usage.completion_tokens >= 2


def test_include_stop_str_in_output_keeps_the_stop_string(client, server):
    free = ask(client, server, "Write a long sentence.", max_tokens=20)
    text = free.choices[0].message.content
    stop = next((text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].strip()), None)
    assert stop, f"greedy output too short to pick a stop string: {text!r}"
    cut = ask(client, server, "Write a long sentence.", max_tokens=20, stop=[stop]).choices[0].message.content
    kept = ask(client, server, "Write a long sentence.", max_tokens=20, stop=[stop],
               extra_body={"include_stop_str_in_output": True}).choices[0].message.content
    assert kept == cut + stop and text.startswith(kept)


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client, server):
    stream = client.chat.completions.create(
        model=model_name(server), messages=[{"role": "user", "content": "Count"}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 6
    assert {c.usage.prompt_tokens for c in chunks} == {chunks[-1].usage.prompt_tokens}
    assert chunks[-1].choices == []


def test_chat_template_kwargs_reach_the_template(client, server):
    """Qwen2-VL's template numbers pictures ("Picture 1: ") with `add_vision_id`; the
    first-generation template has no such variable, and the flag changes nothing there."""
    messages = [{"role": "user", "content": [image_part(data_url(picture(56, 56, (9, 9, 9)))),
                                             {"type": "text", "text": "What is it?"}]}]

    def prompt_tokens(**kwargs) -> int:
        return client.chat.completions.create(model=model_name(server), messages=messages, max_tokens=1,
                                              **kwargs).usage.prompt_tokens

    plain, numbered = prompt_tokens(), prompt_tokens(extra_body={"chat_template_kwargs": {"add_vision_id": True}})
    if server.arch == "qwen2-vl":
        assert numbered > plain
    else:
        assert numbered == plain
    with pytest.raises(openai.BadRequestError) as caught:
        prompt_tokens(extra_body={"chat_template_kwargs": {"add_vision_id": "<|im_start|>"}})
    assert caught.value.body["param"].startswith("chat_template_kwargs")
