"""Values that passed JSON parsing but broke something further in (the tokenizer, vLLM's
serializer, the response encoder), and OpenAI features the server does not implement: each
gets a 400 that says what was wrong, and the server goes on serving. Real HTTP stack and
real tokenizer, scripted engine (the real engine's side is in test_chat_engine.py)."""

from __future__ import annotations

import gzip
import json
import re
import socket
import time

import httpx
import openai
import pytest

from support.app_server import scripted_server


@pytest.fixture(scope="module")
def srv(tiny_tokenizer):
    with scripted_server(tiny_tokenizer) as server:
        yield server


def post(srv, body: dict) -> httpx.Response:
    # Raw JSON text: json.dumps writes a lone surrogate as the escape "\ud800", as a client would.
    return httpx.post(srv.base_url + "/v1/chat/completions", content=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=30)


def body(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def assert_400(r: httpx.Response, *words: str, code: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    for word in words:
        assert word in err["message"], err
    if code:
        assert err["code"] == code, err
    assert "Traceback" not in r.text and "/server/" not in r.text
    return err


def still_serves(srv) -> None:
    r = post(srv, body())
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("request_body, where", [
    (body(messages=[{"role": "user", "content": "a\ud800b"}]), "messages[0].content"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), "messages[0].content[0].text"),
    (body(messages=[{"role": "system", "content": "\ud83d"}, {"role": "user", "content": "x"}]), "messages[0].content"),
    (body(stop=["\ud800"]), "stop[0]"),
    (body(model="\ud800"), "model"),
    (body(stream=True, stop="x\udc00"), "stop"),
])
def test_lone_surrogates_are_refused_with_where(srv, request_body, where):
    err = assert_400(post(srv, request_body), where, "surrogate")
    assert err["type"] == "invalid_request_error"
    assert err["param"] == where
    assert err["message"].startswith(f"'{where}' holds a lone UTF-16 surrogate") and err["message"].count(where) == 1
    still_serves(srv)


@pytest.mark.parametrize("field, value", [
    ("seed", 2**64), ("seed", -(2**63) - 1), ("top_k", 2**64), ("min_tokens", 2**63),
    ("max_tokens", 10**30), ("n", 2**70), ("max_pixels", 2**64),
])
def test_integers_beyond_64_bits_are_refused(srv, field, value):
    err = assert_400(post(srv, body(**{field: value})), field)
    assert err["param"] == field
    still_serves(srv)


def test_the_largest_64_bit_seed_is_served(srv):
    assert post(srv, body(seed=2**63 - 1)).status_code == 200
    assert post(srv, body(seed=-(2**63))).status_code == 200


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"web_search_options": {"search_context_size": "low"}}, "web_search_options"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
])
def test_unimplemented_openai_features_are_refused_not_ignored(srv, extra, param):
    err = assert_400(post(srv, body(**extra)), "not supported", code="unsupported_parameter")
    assert err["param"] == param


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
    {"tools": []},
    {"response_format": {"type": "text"}},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": True}}},
    {"logit_bias": {}},
    {"modalities": ["text"]},
])
def test_feature_fields_that_ask_for_nothing_are_served(srv, extra):
    r = post(srv, body(**extra))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("bias, words", [
    ({"abc": 1}, ["token ids", "'abc'"]),
    ({"-5": 1}, ["token ids"]),
    ({"1.5": 1}, ["token ids"]),
    ({"١": 1}, ["token ids"]),  # an Arabic-Indic digit: a digit to str.isdigit, not an id
    ({"15": 101}, ["100"]),
    ({"15": -100.5}, ["-100"]),
    ({"15": "5"}, ["number"]),
    ({"99999999": 1}, ["token id 99999999", "vocabulary"]),
    ({str(i): 1 for i in range(1025)}, ["at most 1024"]),
    ({"15": 1, "015": -1}, ["more than once"]),
    ({"0" * 40 + "15": 1}, ["token ids"]),
])
def test_bad_logit_bias_is_a_400_naming_it(srv, bias, words):
    err = assert_400(post(srv, body(logit_bias=bias)), *words)
    assert err["param"].startswith("logit_bias"), err
    still_serves(srv)


def test_logit_bias_reaches_the_engine_by_token_id(srv):
    r = post(srv, body(logit_bias={"15": 100, "0": -100.0, "00000000007": 2.5}))
    assert r.status_code == 200, r.text
    assert srv.engine.history[-1].sampling.logit_bias == {15: 100, 0: -100.0, 7: 2.5}


def test_stream_options_need_stream(srv):
    assert_400(post(srv, body(stream_options={"include_usage": True})), "stream_options")


def test_text_far_beyond_the_context_is_refused_before_tokenizing(srv, monkeypatch):
    tokenizer = srv.engine.info.tokenizer
    calls = []
    real = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    size = 4096 * 40  # the scripted engine's context is 4,096 tokens
    err = assert_400(post(srv, body(messages=[{"role": "user", "content": "x " * (size // 2)}])),
                     "characters", code="context_length_exceeded")
    assert err["param"] == "messages"
    assert not calls  # refused on its size alone
    still_serves(srv)


def test_unknown_model_names_are_quoted_short(srv):
    r = post(srv, body(model="m" * 100_000))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert len(r.content) < 2_000
    r = httpx.get(srv.base_url + "/v1/models/" + "n" * 5000)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(r.content) < 2_000


@pytest.mark.parametrize("response_format, param, words", [
    ({"type": "xml"}, "response_format.type", "'json_schema'"),
    ({"type": "json_schema"}, "response_format", "needs a 'json_schema' object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name", "required"),
    ({"type": "json_schema", "json_schema": {"name": "has space"}}, "response_format.json_schema.name", "pattern"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "response_format.json_schema.schema",
     "JSON object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["v" * 70_000]}}},
     "response_format.json_schema.schema", "larger than 65536 bytes"),
    ("json", "response_format", "JSON object"),
    # beyond what the engine compiles in reasonable time (2,000 optional properties: 34 s)
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}}},
     "response_format.json_schema.schema", "2000 properties that are not required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": list(range(1001))}}},
     "response_format.json_schema.schema", "at most 1000"),
    # schemas that allow no answer (the engine would sample from a row of -inf)
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}},
     "response_format.json_schema.schema", "leads back to itself"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$defs": {"A": {"allOf": [{"$ref": "#/$defs/B"}]}, "B": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}}},
     "response_format.json_schema.schema", "leads back to itself"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": []}}},
     "response_format.json_schema.schema", "empty 'anyOf'"),
    # keywords the grammar compiles as if absent (answers broke them and ended with "stop")
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "not": {"enum": [1]}}}},
     "response_format.json_schema.schema", "'not' is not supported"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "boolean"}, "b": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}}}},
     "response_format.json_schema.schema", "'dependentRequired' is not supported"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$defs": {"A": {"type": "object", "properties": {
        "a": {"anyOf": [{"type": "integer"}, {"if": {"type": "integer"}, "then": {"minimum": 1}}]}}}},
        "$ref": "#/$defs/A"}}},
     "response_format.json_schema.schema", "'if' is not supported"),
    # references the grammar cannot follow, and lookarounds it drops with a warning
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "https://example.com/int.json"}}},
     "response_format.json_schema.schema", "only references within the schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$defs": {"a": {"$id": "foo", "type": "integer"}}, "$ref": "foo"}}},
     "response_format.json_schema.schema", "'$ref' 'foo' is not supported"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^(?!a)[ab]$"}}},
     "response_format.json_schema.schema", "lookahead"),
    # anchors inside a pattern, which the grammar drops: "a^b" matches nothing, and "ab" came out
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "a^b"}}, "required": ["a"]}}},
     "response_format.json_schema.schema", "'^' or '$' where something may come before or after it"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(x$|y)z"}}},
     "response_format.json_schema.schema", "'^' or '$' where something may come before or after it"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[^]a$b"}}},
     "response_format.json_schema.schema", "'^' or '$' where something may come before or after it"),
    # length bounds: seconds of compiling each (ten of them in 550 bytes: 92 s)
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        f"p{i}": {"type": "string", "maxLength": 666_666_001 + i} for i in range(10)}}}},
     "response_format.json_schema.schema", "add up to 2560"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "items": {
        "type": "string", "minLength": 200, "maxLength": 300}, "prefixItems": [{"type": "string", "maxLength": 70}]}}},
     "response_format.json_schema.schema", "add up to 326"),
])
def test_a_malformed_response_format_is_a_400_naming_its_field(srv, response_format, param, words):
    err = assert_400(post(srv, body(response_format=response_format)), words)
    assert err["param"] == param


def test_recursive_and_fully_required_schemas_are_served(srv):
    """What the SDK's parse() sends for a tree, and objects of many required properties."""
    tree = {"$defs": {"Node": {"type": "object", "properties": {
        "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
        "required": ["name", "children"], "additionalProperties": False}}, "$ref": "#/$defs/Node"}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(500)},
            "required": [f"p{i}" for i in range(450)]}
    # keyword names as property names and in enum values are not keywords
    names = {"type": "object", "properties": {k: {"type": "string", "enum": [{"not": 1}, "if"]} for k in
                                              ("not", "if", "then", "else", "dependentRequired", "$ref")}}
    # anchors at the ends (of alternatives too), and "^" and "$" as characters (escaped, in a
    # class, a class's negation)
    anchored = {"type": "object", "properties": {k: {"type": "string", "pattern": v} for k, v in (
        ("a", "^[a-z]+$"), ("b", "[^$]x\\^"), ("c", "^\\$[0-9]+$"), ("d", "[\\]^]y"), ("e", "^\\d{5}$|^$"),
        ("f", "^(?:ab$|c$)"))}}
    bounded = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 100},
                                                "summary": {"type": "string", "minLength": 10, "maxLength": 200},
                                                "tags": {"type": "array", "maxItems": 5000}}}
    for schema in (tree, wide, names, anchored, bounded):
        r = post(srv, body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
        assert r.status_code == 200, r.text


def test_ignore_eos_with_a_json_answer_is_refused(srv):
    err = assert_400(post(srv, body(ignore_eos=True, response_format={"type": "json_object"})), "ignore_eos")
    assert err["param"] == "ignore_eos"


def test_the_response_format_reaches_the_engine(srv):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for response_format, expected in (
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, (schema, False)),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, (None, True)),  # (no schema: any object)
        ({"type": "json_object"}, (None, True)),
        ({"type": "text"}, (None, False)),
    ):
        assert post(srv, body(response_format=response_format)).status_code == 200
        sampling = srv.engine.history[-1].sampling
        assert (sampling.json_schema, sampling.json_object) == expected


def test_the_openai_sdk_sees_the_refusals_as_bad_requests(srv):
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert info.value.param == "tools" and info.value.code == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize("content", [None, []])
def test_a_user_or_system_message_needs_content(srv, content):
    for role in ("user", "system"):
        messages = [{"role": role, "content": content}] + ([{"role": "user", "content": "x"}] if role == "system" else [])
        err = assert_400(post(srv, body(messages=messages)), "no content")
        assert err["param"] == "messages[0].content"
    # an assistant turn may be empty
    r = post(srv, body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                                 {"role": "user", "content": "b"}]))
    assert r.status_code == 200, r.text


def test_no_body_says_so(srv):
    r = httpx.post(srv.base_url + "/v1/chat/completions", headers={"content-type": "application/json"})
    err = assert_400(r, "no body")
    assert err["param"] is None


def test_with_include_usage_every_chunk_has_the_usage_field(srv):
    lines = []
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=30,
                      json=body(stream=True, stream_options={"include_usage": True})) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line[6:]) for line in lines]
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    # without include_usage the field stays out
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=30, json=body(stream=True)) as r:
        plain = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert plain and not any("usage" in c for c in plain)


@pytest.mark.parametrize("raw", [
    '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + "0" * 5000 + "}",  # 5,001 digits
    '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",  # nested 100,000 deep
], ids=["huge-number", "deep-nesting"])
def test_json_the_parser_gives_up_on_is_named_as_such(srv, raw):
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = assert_400(r, code="invalid_json")
    assert ("too many digits" if "0000" in raw else "too deeply") in err["message"]
    assert err["type"] == "invalid_request_error"
    still_serves(srv)


@pytest.mark.parametrize("literal, named", [
    ("NaN", "NaN is not a JSON number"), ("Infinity", "Infinity is not a JSON number"),
    ("-Infinity", "-Infinity is not a JSON number"), ("1e400", "the number 1e400 is too large"),
    ("-2.5E+999", "the number -2.5E+999 is too large"),
])
@pytest.mark.parametrize("where", ["metadata", "schema"])
def test_numbers_json_cannot_hold_are_refused_as_invalid_json(srv, literal, named, where):
    """Python's parser takes NaN and the infinities, and turns 1e400 into one: none is JSON,
    and inside a schema they reached the grammar compiler, whose error showed a value the
    client never wrote."""
    if where == "metadata":
        raw = '{"messages": [{"role": "user", "content": "hi"}], "metadata": {"a": %s}}' % literal
    else:
        raw = ('{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", '
               '"json_schema": {"name": "x", "schema": {"type": "integer", "minimum": %s}}}}' % literal)
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = assert_400(r, code="invalid_json")
    assert named in err["message"] and "grammar" not in err["message"]
    still_serves(srv)


def test_large_finite_numbers_still_parse(srv):
    r = post(srv, body(temperature=1.5e-300, metadata={"a": "1"}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("depth", [900, 970, 990, 3000])
def test_deep_nesting_in_an_ignored_field_is_a_400_or_served(srv, depth):
    """Nesting the JSON parser takes but a recursive walk would not (it once ended in a 500)."""
    raw = json.dumps(body())[:-1] + ', "zzz": ' + "[" * depth + "]" * depth + "}"
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert "too deeply" in r.json()["error"]["message"]
    still_serves(srv)


@pytest.mark.parametrize("raw, words", [
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
    ('{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"), "UTF-8"),
    (b'{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    (b"[]", "must be a JSON object, not an array"),
    (b"null", "must be a JSON object, not null"),
    (b'"hi"', "must be a JSON object, not a string"),
])
def test_bodies_that_are_no_json_object_say_what_they_are(srv, raw, words):
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_400(r, words)
    still_serves(srv)


@pytest.mark.parametrize("headers, words", [
    ({}, "Content-Type: none"),
    ({"content-type": "text/plain"}, "'text/plain'"),
    ({"content-type": "application/x-www-form-urlencoded"}, "application/json"),
    ({"content-type": "application/json", "content-encoding": "gzip"}, "Content-Encoding 'gzip'"),
])
def test_bodies_that_are_not_plain_json_get_a_415(srv, headers, words):
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=json.dumps(body()).encode(), headers=headers)
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["code"] == "unsupported_media_type"
    for ok in ("application/json; charset=utf-8", "application/vnd.api+json"):
        r = httpx.post(srv.base_url + "/v1/chat/completions", content=json.dumps(body()).encode(),
                       headers={"content-type": ok})
        assert r.status_code == 200, (ok, r.text)


@pytest.mark.parametrize("request_body, param, message", [
    (body(messages=[{"role": "user", "content": [{"text": "hi"}]}]), "messages[0].content[0]",
     "The content part at 'messages[0].content[0]' has no 'type': use 'text' or 'image_url'."),
    (body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), "messages[0].content[0]",
     "Unsupported content part type at 'messages[0].content[0]': use 'text' or 'image_url'."),
    (body(chat_template_kwargs={"add_vision_id": "yes please"}), "chat_template_kwargs.add_vision_id",
     "Invalid value for 'chat_template_kwargs.add_vision_id': send true, false, a number or null "
     "(template variables take no text)."),
])
def test_messages_say_what_is_wrong_not_what_pydantic_tried(srv, request_body, param, message):
    """A part without `type` was called an unsupported type; a text template variable was
    told to be a boolean (numbers and null are accepted too)."""
    err = assert_400(post(srv, request_body))
    assert (err["param"], err["message"]) == (param, message)


@pytest.mark.parametrize("first, second", [("application/json", "text/plain"), ("text/plain", "application/json"),
                                           ("application/json", "application/json")])
def test_two_content_type_headers_are_a_400_whatever_their_order(srv, first, second):
    """The first one won: JSON then text/plain was served (a proxy in front reading the last
    would disagree about the body), the other order refused with a 415."""
    payload = json.dumps(body()).encode()
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: {first}\r\n"
                     f"Content-Type: {second}\r\nConnection: close\r\nContent-Length: {len(payload)}\r\n\r\n"
                     .encode() + payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400"), data[:300]
    assert b"more than one Content-Type header" in data
    still_serves(srv)


@pytest.mark.parametrize("coding, status", [("gzip, chunked", 415), ("chunked", 200), ("identity, chunked", 200)])
def test_a_body_under_a_transfer_coding_other_than_chunked_gets_a_415(srv, coding, status):
    """The HTTP layer takes off `chunked` only: a gzipped body under `Transfer-Encoding: gzip,
    chunked` reached the JSON parser compressed (a 400 about UTF-8)."""
    payload = json.dumps(body()).encode()
    if "gzip" in coding:
        payload = gzip.compress(payload)
    chunked = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nTransfer-Encoding: " + coding.encode() + b"\r\n\r\n" + chunked)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(f"HTTP/1.1 {status}".encode()), data[:300]
    if status == 415:
        assert b"Transfer-Encoding 'gzip, chunked'" in data
    still_serves(srv)


@pytest.mark.parametrize("cut", ["whole JSON", "half the JSON"])
def test_a_chunked_body_cut_off_by_a_disconnect_is_not_served(srv, cut):
    """A client that sends part of a chunked body and leaves is gone (a 499 in the counts),
    not a body: the part it sent was passed on as complete, a 400 about bad JSON, or, when
    it happened to be whole JSON, a request run to the end for nobody."""
    def cancelled() -> float:
        text = httpx.get(srv.base_url + "/metrics").text
        return float(re.search(r'^qwenvl_requests_total\{outcome="cancelled"\} (\S+)$', text, re.M).group(1))

    engine = srv.runtime.engine
    before, seen = cancelled(), len(engine.history)
    payload = json.dumps(body()).encode()
    if cut != "whole JSON":
        payload = payload[: len(payload) // 2]
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        time.sleep(0.3)  # (the chunk read, the last one still to come)
    deadline = time.monotonic() + 5
    while cancelled() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled() == before + 1
    assert len(engine.history) == seen  # nothing reached the engine
    still_serves(srv)


def test_the_message_count_is_checked_before_the_messages(srv, monkeypatch):
    """90,000 tiny messages (3 MB, under the body cap) are refused on their count, before
    validating or walking each of them held the event loop for seconds."""
    import server.schemas

    walks = []
    real = server.schemas._surrogate_path
    monkeypatch.setattr(server.schemas, "_surrogate_path", lambda value: walks.append(1) or real(value))
    messages = [{"role": "user", "content": "a"}] * 90_000
    r = post(srv, {"messages": messages})
    err = assert_400(r, "Too many messages", code="too_many_messages")
    assert err["param"] == "messages"
    assert not walks
    still_serves(srv)
    assert walks  # the walk itself was patched in: a request under the limit went through it


def test_a_body_of_millions_of_tiny_values_is_refused_before_it_is_parsed(srv, monkeypatch):
    """60 MB of `{},` in a field the server ignores (under the 64 MiB body cap) took 9.6 s of
    the event loop and 1.6 GB to parse, before anything looked at it; it is refused from its
    count of commas. A body just under the count is parsed as before."""
    import server.api.body

    parsed = []
    real = server.api.body.json.loads
    monkeypatch.setattr(server.api.body.json, "loads", lambda text, **kw: parsed.append(1) or real(text, **kw))
    raw = json.dumps(body(foo=[{}] * 3_000_000)).encode()
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=raw, timeout=60,
                   headers={"content-type": "application/json"})
    assert not parsed  # (before the test reads the answer's JSON itself)
    assert_400(r, "3,000,0", "commas", "200,000", code="request_too_complex")
    assert post(srv, body(foo=[{}] * 190_000)).status_code == 200
    assert parsed
    still_serves(srv)


def test_content_parts_are_counted_before_they_are_validated(srv, monkeypatch):
    """One message of 90,000 empty text parts (2 MB) passed the message count, and each
    part then cost pydantic, the walk, the prompt renderer and the template on the event
    loop; it is refused on its count, before any of them."""
    import server.schemas

    walks = []
    real = server.schemas._surrogate_path
    monkeypatch.setattr(server.schemas, "_surrogate_path", lambda value: walks.append(1) or real(value))
    parts = [{"type": "text", "text": ""}] * 90_000
    err = assert_400(post(srv, {"messages": [{"role": "user", "content": parts}]}),
                     "Too many content parts", "90000", code="too_many_content_parts")
    assert err["param"] == "messages"
    assert not walks
    limit = srv.runtime.settings.max_content_parts
    split = [{"role": "user", "content": [{"type": "text", "text": "a"}] * (limit // 2 + 1)}] * 2
    assert_400(post(srv, {"messages": split}), str(limit), code="too_many_content_parts")  # counted over all messages
    at_limit = [{"role": "user", "content": [{"type": "text", "text": "a"}] * limit}]
    assert post(srv, body(messages=at_limit)).status_code == 200
    assert walks


def test_fields_the_server_ignores_are_not_walked_for_surrogates(srv):
    """Unknown fields are dropped unread, so what they hold cannot matter; a field of
    millions of values cost the walk (and its memory) for nothing."""
    r = post(srv, body(zzz=["\ud800"], metadata={"k": "\udfff"}))
    assert r.status_code == 200, r.text
    assert_400(post(srv, body(user="\ud800")), "user", "surrogate")  # a field it reads still is


def test_a_lone_surrogate_deep_in_a_read_field_is_found_with_its_path():
    from server.schemas import _surrogate_path

    deep: object = "\ud800"
    for _ in range(5000):
        deep = [deep]
    assert _surrogate_path({"tools": [{"a": 1}, {"b": deep}]}) == "tools[1].b" + "[0]" * 5000
    assert _surrogate_path({"tools": [{"x\udc00": 1}]}) == "tools[0]"
    assert _surrogate_path({"tools": [[], {}, "ok", 1, None], "stop": ["a", "b\ud83d"]}) == "stop[1]"
    assert _surrogate_path({"stop": ["fine \U0001F600"]}) is None
    assert _surrogate_path("\udfff") == ""


def test_content_of_the_wrong_shape_says_what_it_may_be(srv):
    err = assert_400(post(srv, body(messages=[{"role": "user", "content": {"type": "text", "text": "x"}}])),
                     "a string or a list of content parts")
    assert err["param"] == "messages[0].content"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_named_as_such(srv, value):
    raw = '{"messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % value
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_400(r, f"{value} is not a JSON number", code="invalid_json")
    # a number JSON can write but a double cannot hold, named as written
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=raw.replace(value, "1e999"),
                   headers={"content-type": "application/json"})
    assert_400(r, "1e999", "too large", code="invalid_json")


def test_a_trailing_slash_is_a_json_404_not_a_redirect(srv):
    r = httpx.post(srv.base_url + "/v1/chat/completions/", json=body(), headers={"host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_answer_head(srv, path):
    r = httpx.head(srv.base_url + path)
    assert r.status_code == 200 and r.content == b""
    assert httpx.get(srv.base_url + path).json()["status"] in ("ok", "ready")


@pytest.mark.parametrize("field, value, param", [
    ("stream", "yes", "stream"),
    ("stream", 1, "stream"),
    ("max_tokens", True, "max_tokens"),
    ("max_tokens", "16", "max_tokens"),
    ("max_tokens", 16.5, "max_tokens"),
    ("n", "2", "n"),
    ("temperature", "0.5", "temperature"),
    ("logprobs", "true", "logprobs"),
])
def test_values_of_the_wrong_json_type_are_refused_not_coerced(srv, field, value, param):
    err = assert_400(post(srv, body(**{field: value})))
    assert err["param"] == param


def test_an_integer_is_a_number_where_a_float_is_expected(srv):
    r = post(srv, body(temperature=1, top_p=1, presence_penalty=0))
    assert r.status_code == 200, r.text


def test_whole_number_floats_are_integers_and_a_bom_is_allowed(srv):
    r = post(srv, body(max_tokens=2.0, n=1.0, seed=7.0))
    assert r.status_code == 200, r.text
    raw = b"\xef\xbb\xbf" + json.dumps(body()).encode()  # UTF-8 byte-order mark first
    r = httpx.post(srv.base_url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_the_request_schema_is_listed_where_the_endpoint_refers_to_it(srv):
    spec = httpx.get(srv.base_url + "/openapi.json").json()
    body_schema = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body_schema["$ref"].removeprefix("#/components/schemas/")
    schemas = spec["components"]["schemas"]
    assert "messages" in schemas[name]["properties"]
    refs = set()

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(spec)
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs), refs


def test_a_client_gone_during_the_upload_is_no_server_error(srv, caplog):
    import logging
    import socket

    with caplog.at_level(logging.INFO):
        sock = socket.create_connection((srv.host, srv.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"{" * 1000)
        time.sleep(0.3)
        sock.close()
        time.sleep(0.5)
        still_serves(srv)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert srv.runtime.metrics.errors.labels("internal_error")._value.get() == 0


def test_fields_only_checked_for_presence_are_not_walked_for_surrogates(srv, monkeypatch):
    """`tools` and the like are only checked for whether they ask for something; a 50 MB
    `tools` array held the event loop 10 s in the surrogate walk before being refused."""
    import server.schemas

    walked = []
    real = server.schemas._surrogate_path
    monkeypatch.setattr(server.schemas, "_surrogate_path", lambda value: walked.append(value) or real(value))
    tools = [{"type": "function", "function": {"name": "f\ud800"}}] + [0] * 1000
    assert post(srv, body(tools=tools, tool_choice="none")).status_code == 200  # ignored: fine
    assert_400(post(srv, body(tools=tools)), "Tool calling", code="unsupported_parameter")
    assert walked and not any("tools" in value for value in walked if isinstance(value, dict))


def test_tool_calls_in_the_history_count_as_content_parts(srv):
    limit = srv.runtime.settings.max_content_parts
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [{"role": "assistant", "tool_calls": [call] * (limit // 2 + 1)}] * 2 + [{"role": "user", "content": "x"}]
    err = assert_400(post(srv, {"messages": history}), "Too many content parts", str(limit + 2),
                     code="too_many_content_parts")
    assert err["param"] == "messages"
    # At the limit, the count passes (the prompt of a thousand calls is then too long for
    # the test model's context: refused on its length, after the count).
    per_message = 127  # (a message holds at most 128 calls)
    at_limit = ([{"role": "assistant", "tool_calls": [call] * per_message}] * (limit // per_message)
                + [{"role": "assistant", "tool_calls": [call] * (limit % per_message)}, {"role": "user", "content": "x"}])
    assert_400(post(srv, body(messages=at_limit)), code="context_length_exceeded")
    few = [{"role": "assistant", "tool_calls": [call] * 3}, {"role": "user", "content": "x"}]
    assert post(srv, body(messages=few)).status_code == 200


def test_tool_call_arguments_beyond_the_context_are_refused_before_they_are_decoded(srv, monkeypatch):
    """A history of calls whose arguments nest hundreds of levels deep was decoded and
    encoded again on the event loop (16 s for 54 MB) before its size was checked."""
    import server.chat.prompt

    rendered = []
    real = server.chat.prompt._calls_as_text
    monkeypatch.setattr(server.chat.prompt, "_calls_as_text", lambda msg: rendered.append(1) or real(msg))
    args = "[" * 800 + "]" * 800
    call = {"type": "function", "function": {"name": "f", "arguments": args}}
    history = [{"role": "assistant", "tool_calls": [call] * 100}] * 10 + [{"role": "user", "content": "x"}]
    err = assert_400(post(srv, {"messages": history}), "characters of text", code="context_length_exceeded")
    assert err["param"] == "messages"
    assert not rendered
    ok = [{"role": "assistant", "tool_calls": [call]}, {"role": "user", "content": "x"}]
    assert post(srv, body(messages=ok)).status_code == 200
    assert rendered


@pytest.mark.parametrize("extra", [
    {"stream": True, "stream_options": "x"},
    {"messages": ["hello"]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]},
    {"messages": [{"role": "assistant", "tool_calls": ["x"]}, {"role": "user", "content": "x"}]},
    {"messages": [{"role": "assistant", "function_call": "x"}, {"role": "user", "content": "x"}]},
])
def test_objects_of_the_wrong_type_are_named_without_our_class_names(srv, extra):
    err = assert_400(post(srv, body(**extra)), "should be a JSON object")
    assert err["param"]
    for name in ("StreamOptions", "Message", "ImageURL", "ToolCall", "FunctionCall", "instance of"):
        assert name not in err["message"], err


def test_stream_text_with_unicode_line_separators_stays_one_line_per_event(srv):
    """JSON leaves U+2028, U+2029 and U+0085 raw; line readers built on str.splitlines
    (httpx's iter_lines) split a data line there and could not parse the halves."""
    reply = "one\u2028two\u2029three\x85four"
    srv.engine.enqueue(reply)
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=30,
                      json=body(stream=True, max_tokens=100)) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]  # each line whole JSON
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == reply
    srv.engine.enqueue(reply)
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="scripted", stream=True, max_tokens=100,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply
