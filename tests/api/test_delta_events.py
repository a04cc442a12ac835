"""The streamed content deltas made from a template (`_DeltaEvents`) are, byte for byte, the
events the general path (the schemas, then `sse_event`) makes of the same delta."""

from __future__ import annotations

import json
import types

import pytest

from server.chat.service import _chunk_json, _DeltaEvents
from server.chat.sse import sse_event
from server.schemas import ChatCompletionRequest, ChunkChoice, DeltaMessage

TEXTS = [
    "", " hello", 'say "hi"\\ and \\"', "tab\tnew\nline\rret", "".join(map(chr, range(32))) + "\x7f",
    "one\u2028two\u2029three\x85four", "中文，标点。", "emoji 🙂👍🏽", "lone \ud800 surrogate",
    "<ref>cat</ref><box>(1,2),(3,4)</box>", "{\"json\": [1, 2]}", "\u00e9\u0301", "a" * 5000,
]

MODELS = ["tiny", 'we"ird\\model\u2028name', "模型/Qwen-VL"]


def prepared(model: str, include_usage: bool | None):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    request = ChatCompletionRequest.model_validate(body)
    return types.SimpleNamespace(completion_id="chatcmpl-0123456789abcdef0123456789abcdef", created=1764806400,
                                 model=model, request=request)


def general(p, index: int, text: str) -> str:
    return sse_event(_chunk_json(p, [ChunkChoice(index=index, delta=DeltaMessage(content=text))], None))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("include_usage", [None, False, True])
def test_template_events_are_the_general_paths_bytes(model, include_usage):
    p = prepared(model, include_usage)
    events = _DeltaEvents(p)
    for index in (0, 3, 0, 12):
        for text in TEXTS:
            assert events.event(index, text) == general(p, index, text), (index, text)


def test_a_template_event_is_one_line_of_json_with_the_text():
    p = prepared("tiny", True)
    events = _DeltaEvents(p)
    for text in TEXTS:
        out = events.event(2, text)
        assert out.startswith("data: ") and out.endswith("\n\n")
        line = out[len("data: "):-2]
        assert len(line.splitlines()) == 1
        chunk = json.loads(line)
        assert chunk["choices"] == [{"index": 2, "delta": {"content": text}, "finish_reason": None, "logprobs": None}]
        assert chunk["usage"] is None and chunk["model"] == "tiny" and chunk["id"] == p.completion_id
