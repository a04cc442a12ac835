"""`parse_json_body`: its fast parser (msgspec) answers exactly as Python's parser with the
body checks does, for every body: the same values where a body is accepted, the same 400
where it is not."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server.api.body as body
from server.api.body import parse_json_body
from server.errors import InvalidRequestError

EDGE_BODIES = [
    b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}', b'[-1e400]', b'[1.8e308]',
    b'[123456789012345678901234567890]', b'[' + b'9' * 5000 + b']', b'[' + b'9' * 4000 + b']',
    b'{"a": "\\ud800"}', b'{"a": "\\udfff x"}', b'{"a": "\\ud83d\\ude00"}', b'\xef\xbb\xbf{"a": 1}',
    b'{"a": "\xff"}', b'{"a": "\xed\xa0\x80"}', b'{"a": 1, "a": 2}', b'{"a": 1} x', b'{"a": "x\x01y"}',
    b'[-0, -0.0, 1E2, 1e-400, 0.1, 5e-324, 1.7976931348623157e308]', b' \n{"a": 1}\r\n ',
    b'{"a": "\\u0000"}', b'"x"', b'12', b'[' * 5000 + b']' * 5000, b'{"a": [1, 2,]}', b'{"a" 1}',
    b'{"a": tru}', b'[01]', b'[1.]', b'["\\x41"]', b'\xef\xbb\xbf', b' ',
]


def outcome(raw: bytes) -> tuple:
    try:
        return ("ok", repr(parse_json_body(raw)))
    except InvalidRequestError as exc:
        return ("error", exc.code, str(exc))


def python_parser_only(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise msgspec.DecodeError("forced")

    monkeypatch.setattr(body.msgspec.json, "decode", refuse)


@pytest.mark.parametrize("raw", EDGE_BODIES)
def test_edge_bodies_are_answered_as_by_pythons_parser(raw, monkeypatch):
    fast = outcome(raw)
    python_parser_only(monkeypatch)
    assert fast == outcome(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_any_json_is_parsed_to_the_same_values(value, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    fast = parse_json_body(raw)
    assert repr(fast) == repr(json.loads(raw))


def test_a_long_body_is_parsed_without_pythons_parser(monkeypatch):
    """The fast parser is the one that runs for a well-formed body (a photo's data: URL in
    it); Python's is there for the bodies it refuses."""
    def no(*args, **kwargs):
        raise AssertionError("Python's JSON parser ran")

    monkeypatch.setattr(body.json, "loads", no)
    url = "data:image/jpeg;base64," + "QUJD" * 250_000
    raw = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert parse_json_body(raw.encode())["messages"][0]["content"][0]["image_url"]["url"] == url
    with pytest.raises(AssertionError, match="Python's JSON parser ran"):
        parse_json_body(b'{"a": NaN}')
