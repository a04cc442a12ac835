"""vLLM's own request extensions, as clients moving from `vllm serve` send them: the ones
served (stop_token_ids, include_stop_str_in_output, allowed_token_ids, bad_words, cache_salt,
structured_outputs, chat_template_kwargs, stream_options.continuous_usage_stats) reach the engine and the template; the ones not
implemented are a 400 naming the field, never an answer that silently lacks them. Real HTTP
stack, the official `openai` SDK and the real tokenizer, scripted engine (the real engine's
side is at the end of test_chat_engine.py)."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from server.engine.base import ModelInfo
from server.engine.scripted import ScriptedEngine
from support.app_server import scripted_server


@pytest.fixture(scope="module")
def srv(tiny_tokenizer):
    engine = ScriptedEngine(ModelInfo(family="qwen2-vl", max_model_len=4096, tokenizer=tiny_tokenizer),
                            default_reply="one two three")
    with scripted_server(tiny_tokenizer, engine=engine) as server:
        yield server


@pytest.fixture
def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)


def post(srv, body: dict) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    return httpx.post(srv.base_url + "/v1/chat/completions", content=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=30)


def sampling(srv):
    return srv.engine.history[-1].sampling


# --- refused ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("echo", True), ("prompt_logprobs", 0), ("prompt_logprobs", 5), ("use_beam_search", True), ("best_of", 3),
    ("continue_final_message", True), ("add_generation_prompt", False), ("chat_template", "{{ messages }}"),
    ("mm_processor_kwargs", {"max_pixels": 100}), ("truncate_prompt_tokens", 10), ("priority", 1),
    ("guided_json", {"type": "object"}), ("guided_regex", "a+"), ("guided_choice", ["a"]), ("guided_grammar", "x"),
    ("return_tokens_as_token_ids", True), ("return_token_ids", True), ("documents", [{"title": "a", "text": "b"}]),
    ("thinking_token_budget", 100), ("include_reasoning", False), ("logprob_token_ids", [1, 2]),
    ("repetition_detection", {"max_pattern_size": 4}), ("kv_transfer_params", {}),
    ("media_io_kwargs", {"image": {"mode": "L"}}), ("vllm_xargs", {"k": 1}),
])
def test_extensions_not_implemented_are_a_400_naming_the_field(srv, field, value):
    before = len(srv.engine.history)
    r = post(srv, {field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter", error
    assert error["type"] == "invalid_request_error"
    assert len(srv.engine.history) == before  # nothing reached the engine


@pytest.mark.parametrize("body", [
    {"echo": False}, {"best_of": 1}, {"best_of": 2, "n": 2, "temperature": 1}, {"use_beam_search": False},
    {"add_generation_prompt": True}, {"continue_final_message": False}, {"priority": 0},
    {"mm_processor_kwargs": {}}, {"prompt_logprobs": None}, {"guided_json": None},
    {"return_token_ids": False}, {"documents": []}, {"include_reasoning": True}, {"vllm_xargs": {}},
])
def test_the_same_fields_asking_for_nothing_are_served(srv, body):
    assert post(srv, body).status_code == 200


@pytest.mark.parametrize("so, param", [
    ({"regex": "a+"}, "structured_outputs.regex"),
    ({"grammar": "root ::= \"a\""}, "structured_outputs.grammar"),
    ({"structural_tag": "{}"}, "structured_outputs.structural_tag"),
])
def test_structured_outputs_kinds_not_implemented_are_refused(srv, so, param):
    r = post(srv, {"structured_outputs": so})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize("body, param", [
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": "[1, 2]"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": {"anyOf": []}}}, "structured_outputs.json"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": [""]}}, "structured_outputs.choice[0]"),
    ({"structured_outputs": {"choice": ["a"] * 1001}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a" * 900] * 100}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a"], "json_object": True}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "ignore_eos": True}, "ignore_eos"),
    ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"stop_token_ids": "5"}, "stop_token_ids"),
    ({"stop_token_ids": [5.5]}, "stop_token_ids[0]"),
    ({"stop_token_ids": [True]}, "stop_token_ids[0]"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
    ({"allowed_token_ids": [-3]}, "allowed_token_ids[0]"),
    ({"bad_words": [""]}, "bad_words[0]"),
    ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": ["w"] * 129}, "bad_words"),
    ({"allowed_token_ids": list(range(1025))}, "allowed_token_ids"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"cache_salt": "tenant/a"}, "cache_salt"),
    ({"cache_salt": "x" * 129}, "cache_salt"),
    ({"cache_salt": 5}, "cache_salt"),
    ({"chat_template_kwargs": {"add_vision_id": "<|im_start|>"}}, "chat_template_kwargs.add_vision_id"),
    ({"chat_template_kwargs": ["add_vision_id"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_vision_id": {"a": 1}}}, "chat_template_kwargs.add_vision_id"),
])
def test_bad_extension_values_are_a_400_naming_the_field(srv, body, param):
    r = post(srv, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# --- served ----------------------------------------------------------------------------------

def test_structured_outputs_reach_the_engine(srv):
    assert post(srv, {"structured_outputs": {"choice": ["yes", "no"]}}).status_code == 200
    s = sampling(srv)
    assert s.choice == ["yes", "no"] and s.constraint_param == "structured_outputs"
    assert post(srv, {"structured_outputs": {"json": '{"type": "object"}'}}).status_code == 200
    assert sampling(srv).json_schema == {"type": "object"}
    assert post(srv, {"structured_outputs": {"json_object": True}}).status_code == 200
    assert sampling(srv).json_object and sampling(srv).json_schema is None
    assert post(srv, {"response_format": {"type": "json_object"}}).status_code == 200
    assert sampling(srv).constraint_param == "response_format"
    assert post(srv, {"structured_outputs": {"json_object": False}}).status_code == 200  # asks for nothing
    assert not sampling(srv).json_object and sampling(srv).choice is None


def test_stop_token_ids_and_include_stop_str_reach_the_engine(srv):
    assert post(srv, {"stop_token_ids": [5, 7.0, 5], "include_stop_str_in_output": True, "stop": ["x"]}).status_code == 200
    s = sampling(srv)
    assert s.stop_token_ids == [5, 7] and s.include_stop_str_in_output and s.stop == ["x"]
    assert post(srv, {}).status_code == 200
    assert sampling(srv).stop_token_ids == [] and not sampling(srv).include_stop_str_in_output


def test_allowed_token_ids_bad_words_and_cache_salt_reach_the_engine(srv):
    body = {"allowed_token_ids": [5, 9, 5.0], "bad_words": ["one", " two"], "cache_salt": "tenant-a"}
    assert post(srv, body).status_code == 200
    s, request = sampling(srv), srv.engine.history[-1]
    assert s.allowed_token_ids == [5, 9] and s.bad_words == ["one", " two"] and request.cache_salt == "tenant-a"
    assert post(srv, {}).status_code == 200
    s, request = sampling(srv), srv.engine.history[-1]
    assert s.allowed_token_ids is None and s.bad_words == [] and request.cache_salt is None


def test_an_empty_model_name_is_the_default_model(srv):
    r = post(srv, {"model": ""})
    assert r.status_code == 200 and r.json()["model"] == "scripted"


def test_chat_template_kwargs_set_the_templates_own_variables(srv):
    """Qwen2-VL's template numbers the pictures with `add_vision_id`; names the template does
    not read, and the ones the renderer sets itself, change nothing."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1PX}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]

    def prompt(**extra) -> str:
        assert post(srv, {"messages": messages, **extra}).status_code == 200
        return srv.engine.info.tokenizer.decode(srv.engine.history[-1].prompt_token_ids)

    plain = prompt()
    assert "Picture 1:" not in plain
    assert "Picture 1:" in prompt(chat_template_kwargs={"add_vision_id": True})
    assert prompt(chat_template_kwargs={"add_vision_id": False}) == plain
    assert prompt(chat_template_kwargs={"add_vision_id": None}) == plain
    assert prompt(chat_template_kwargs={"unknown_flag": True, "add_generation_prompt": True, "messages": 1,
                                        "continue_final_message": False}) == plain


@pytest.mark.parametrize("name, value", [("add_generation_prompt", False), ("add_generation_prompt", 0),
                                         ("continue_final_message", True), ("continue_final_message", 1)])
def test_chat_template_kwargs_that_ask_for_what_the_fields_would_are_refused_as_they_are(srv, name, value):
    """vLLM's server lets chat_template_kwargs set these; ignoring them here would answer a
    request the client did not make."""
    before = len(srv.engine.history)
    r = post(srv, {"chat_template_kwargs": {name: value}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == f"chat_template_kwargs.{name}" and error["code"] == "unsupported_parameter", error
    assert len(srv.engine.history) == before


# (a 1x1 PNG)
PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def test_continuous_usage_stats(client, srv):
    stream = client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    assert chunks and all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == chunks[-1].usage.total_tokens - chunks[-1].usage.prompt_tokens
    assert counts[-1] == 5  # "one two three" in pieces of 3 characters: 5 pieces
    assert chunks[-1].choices == [] and chunks[0].choices[0].delta.role == "assistant"
    # without include_usage the flag asks for nothing, as in vLLM
    plain = list(client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": False, "continuous_usage_stats": True}))
    assert all(c.usage is None for c in plain)
    # with n choices, each chunk counts its own choice's tokens, as vLLM does
    chunks = list(client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True, n=2,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    per_choice = {0: [], 1: []}
    for c in chunks[:-1]:
        per_choice[c.choices[0].index].append(c.usage.completion_tokens)
    assert per_choice[0] == per_choice[1] and per_choice[0][-1] == 5, per_choice
    assert chunks[-1].usage.completion_tokens == 10


# --- an answer the grammar leaves no way to finish ---------------------------------------------

def test_a_constrained_answer_the_engine_ends_with_an_error_is_the_clients_400(srv):
    """vLLM ends a request with "error" when its grammar allows no next token: for a request
    with a constraint that is the constraint's fault, not the server's (no retry helps)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}}
    srv.engine.enqueue_cut("\"a", "error")
    r = post(srv, {"response_format": fmt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format" and r.json()["error"]["code"] == "invalid_response_format"
    # streamed, failing on its first output: the response has not begun, the same 400
    srv.engine.enqueue_cut("ab", "error")
    r = post(srv, {"structured_outputs": {"choice": ["abc"]}, "stream": True})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_structured_outputs"
    # failing later: an error event ends the stream begun
    srv.engine.enqueue_cut("abcdef", "error")
    r = post(srv, {"structured_outputs": {"choice": ["abcdefg"]}, "stream": True})
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert [e["choices"][0]["delta"].get("content") for e in events[:2]] == ["", "abc"]
    assert events[-1]["error"]["code"] == "invalid_structured_outputs", events[-1]
    # without a constraint, the same engine failure stays a server error
    srv.engine.enqueue_cut("ab", "error")
    assert post(srv, {}).status_code == 500


def test_long_prompts_are_tokenized_off_the_event_loop(srv):
    renderer = srv.app.state.runtime.chat_service().renderer
    threads = []
    render = renderer.render

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return render(*args, **kwargs)

    renderer.render = recording
    try:
        assert post(srv, {"messages": [{"role": "user", "content": "short"}]}).status_code == 200
        assert post(srv, {"messages": [{"role": "user", "content": "long text " * 400}]}).status_code == 200
    finally:
        del renderer.render
    assert not threads[0].startswith("prompt") and threads[1].startswith("prompt"), threads
