"""Random request bodies, from near-valid to nonsense, through the real HTTP stack (scripted
engine): none may get a 5xx, an error must be OpenAI-shaped, a stream must end with
`[DONE]` and no error event, and a plain answer must have choices."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from support.app_server import scripted_server


def _png(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


URLS = [_png((200, 0, 0)), _png((0, 0, 200)), "data:image/png;base64,AAAA", "data:,", "http://127.0.0.1/x.png",
        "file:///etc/passwd", "ftp://example.com/x.png", "http://[::1]/", "", "data:image/png;base64," + "A" * 10]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)

any_part = st.one_of(values, st.fixed_dictionaries({
    "type": st.sampled_from(["text", "image_url", "refusal", "input_audio", "x"]),
    "text": values,
    "image_url": st.one_of(values, st.fixed_dictionaries({"url": st.one_of(values, st.sampled_from(URLS)),
                                                          "detail": values})),
    "refusal": values,
}))
any_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool", "function"]), values),
     "content": st.one_of(st.text(max_size=30), st.lists(any_part, max_size=3), values)},
    optional={"name": values, "tool_calls": values, "tool_call_id": values})
FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
          "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "stream", "stream_options", "user",
          "tools", "tool_choice", "response_format", "logit_bias", "top_k", "min_p", "repetition_penalty",
          "min_tokens", "ignore_eos", "skip_special_tokens", "grounding", "max_pixels", "functions", "modalities",
          "web_search_options"]
any_value = st.one_of(st.integers(min_value=-3, max_value=40), st.floats(min_value=-3, max_value=3), st.booleans(),
                      st.none(), st.text(max_size=5), st.lists(st.text(max_size=3), max_size=3), values)
nonsense = st.fixed_dictionaries({"messages": st.one_of(st.lists(any_message, max_size=3), values)},
                                 optional=dict.fromkeys(FIELDS, any_value))

good_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": st.sampled_from(URLS[:2])}, optional={"detail": st.sampled_from(["low", "high", "auto", "original"])})}),
)
good_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "assistant", "tool"]),
                           "content": st.text(min_size=1, max_size=40)}),
    st.fixed_dictionaries({"role": st.just("user"),
                           "content": st.one_of(st.text(min_size=1, max_size=40), st.lists(good_part, min_size=1, max_size=3))}),
)
near_valid = st.fixed_dictionaries({"messages": st.lists(good_message, min_size=1, max_size=4)}, optional={
    "max_tokens": st.integers(1, 30), "max_completion_tokens": st.integers(1, 30), "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1), "n": st.integers(1, 4), "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "logprobs": st.booleans(),
    "stream": st.booleans(), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.01, 10), "min_tokens": st.integers(0, 1), "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(), "grounding": st.booleans(), "user": st.text(max_size=5),
    "model": st.sampled_from(["scripted", None]), "max_pixels": st.integers(1, 10**6),
    "logit_bias": st.dictionaries(st.integers(0, 2000).map(str), st.floats(-100, 100), max_size=3),
})

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def srv(tiny_tokenizer):
    with scripted_server(tiny_tokenizer, image_allow_networks=[]) as server:
        yield server


def check(srv, body: dict) -> int:
    raw = json.dumps(body)
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=raw,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code < 500, (raw[:1500], r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"] and "Traceback" not in r.text
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        assert '"error"' not in r.text, r.text[-500:]
    else:
        assert r.json()["choices"]
    return r.status_code


@FUZZ
@given(body=nonsense)
def test_nonsense_bodies_get_a_4xx_or_an_answer_never_a_5xx(srv, body):
    check(srv, body)


@FUZZ
@given(body=near_valid)
def test_near_valid_bodies_are_answered_or_refused_cleanly(srv, body):
    check(srv, body)


def test_the_near_valid_bodies_are_mostly_answered(srv):
    """(So that the property above exercises answers, not only refusals.)"""
    statuses = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=near_valid)
    def sample(body):
        statuses.append(check(srv, body))

    sample()
    assert statuses.count(200) > len(statuses) // 2, statuses
