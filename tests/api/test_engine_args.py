"""Settings onto vLLM's engine arguments and sampling parameters (no engine is started)."""

from __future__ import annotations

import contextlib

import pytest

from server.cli import parse_settings
from server.engine.vllm_engine import cpu_kv_cache_bytes, engine_args_from_settings


def test_engine_options_reach_vllm_and_unset_ones_keep_vllms_defaults(tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    model = str(tmp_path)
    settings = parse_settings(["--model", model, "--max-num-seqs", "7", "--mm-processor-cache-type", "shm",
                               "--mm-processor-cache-gb", "0.5",
                               "--no-enable-prefix-caching", "--limit-mm-per-prompt", "2"])
    args = engine_args_from_settings(settings, model, "cpu")
    assert args.max_num_seqs == 7 and args.enable_prefix_caching is False
    assert args.mm_processor_cache_type == "shm" and args.limit_mm_per_prompt == {"image": 2}
    assert args.mm_processor_cache_gb == 0.5
    assert args.enforce_eager is True  # CPU default

    plain = engine_args_from_settings(parse_settings(["--model", model]), model, "cpu")
    defaults = AsyncEngineArgs(model=model)
    assert plain.logits_processors == defaults.logits_processors
    assert plain.mm_processor_cache_type == defaults.mm_processor_cache_type
    assert plain.mm_processor_cache_gb == defaults.mm_processor_cache_gb
    assert plain.enable_prefix_caching == defaults.enable_prefix_caching


def test_logits_processors_reach_vllm_by_name(tmp_path, monkeypatch):
    model = str(tmp_path)
    settings = parse_settings(["--model", model, "--logits-processors", "a.b:C,d:E.F", "--logits-processors", "f:G"])
    assert engine_args_from_settings(settings, model, "cpu").logits_processors == ["a.b:C", "d:E.F", "f:G"]
    monkeypatch.setenv("QWENVL_LOGITS_PROCESSORS", "x:Y")
    assert engine_args_from_settings(parse_settings(["--model", model]), model, "cpu").logits_processors == ["x:Y"]


@pytest.mark.parametrize("name", ["a.b.C", "a:b:C", ":C", "a b:C"])
def test_a_logits_processor_name_vllm_cannot_load_stops_the_server_at_once(name):
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--logits-processors", name])
    assert exc.value.code == 2


def test_an_unknown_processor_cache_type_is_refused():
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--mm-processor-cache-type", "disk"])
    assert exc.value.code == 2


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_ignore_eos_also_lets_generation_run_past_the_chat_turn_end_tokens(ignore_eos):
    """Qwen-VL ends a turn with tokens besides its EOS; vLLM stops on explicit stop ids even
    with ignore_eos, so with ignore_eos they are not passed (as vLLM drops a checkpoint's
    extra EOS ids then)."""
    import asyncio
    from types import SimpleNamespace

    from server.engine.base import GenerationRequest, ModelInfo, SamplingOptions
    from server.engine.vllm_engine import VLLMEngine

    sent = []

    class FakeAsyncLLM:  # what VLLMEngine.start uses of vLLM's AsyncLLM
        errored = False

        async def _process(self, prompt, arrival):
            return {"prompt_token_ids": prompt["prompt_token_ids"]}

        renderer = SimpleNamespace()

        async def generate(self, engine_input, params, request_id):
            sent.append(params)
            return
            yield

    llm = FakeAsyncLLM()
    llm.renderer.process_for_engine_async = llm._process
    info = ModelInfo(family="qwen-vl", max_model_len=64, tokenizer=None, stop_token_ids=(151645, 151644, 151643))
    engine = VLLMEngine(llm, info, stats=None)
    request = GenerationRequest(request_id="r", prompt_token_ids=[1, 2, 3], images=[],
                                sampling=SamplingOptions(max_tokens=8, ignore_eos=ignore_eos))

    async def run():
        async for _ in await engine.start(request):
            pass

    asyncio.run(run())
    (params,) = sent
    assert params.ignore_eos is ignore_eos
    assert (params.stop_token_ids or []) == ([] if ignore_eos else [151645, 151644, 151643])


def test_an_image_ceiling_above_the_checkpoints_raises_the_processors_bound(tiny_model):
    """The engine's processor shrinks every picture to its checkpoint's max_pixels again: a
    higher --image-max-pixels reaches it as a processor argument; a lower one need not."""
    model = str(tiny_model("qwen2-vl"))  # the processor's bound: 448x448 = 200,704 pixels
    raised = engine_args_from_settings(parse_settings(["--model", model, "--image-max-pixels", "409600"]),
                                       model, "cpu")
    assert raised.mm_processor_kwargs == {"max_pixels": 409600}
    for extra in ([], ["--image-max-pixels", "100000"]):
        args = engine_args_from_settings(parse_settings(["--model", model, *extra]), model, "cpu")
        assert not args.mm_processor_kwargs
    qwen_vl = str(tiny_model("qwen-vl"))  # fixed 448x448 input: no such bound
    args = engine_args_from_settings(parse_settings(["--model", qwen_vl, "--image-max-pixels", "409600"]),
                                     qwen_vl, "cpu")
    assert not args.mm_processor_kwargs


def test_a_token_that_is_part_of_a_character_has_its_bytes_as_text():
    """vLLM decodes a token that ends inside a character to nothing, and one that completes
    a character to the whole character; its text is its own bytes, the incomplete character
    escaped, so that alternatives stay apart and the texts joined spell the answer once."""
    from server.engine.vllm_engine import _token_text

    assert _token_text("", "寷".encode()[:1]) == "\\xe5"
    assert _token_text("", b"a" + "寷".encode()[:2]) == "a\\xe5\\xaf"
    assert _token_text("", "é".encode()) == "é"
    assert _token_text("寷", "寷".encode()[2:]) == "\\xb7"  # the character's last byte
    assert _token_text("Ŝ", b"\x9c") == "\\x9c"
    assert _token_text(" Ŝ", " Ŝ".encode()) == " Ŝ"  # vLLM's text where it is the token's bytes
    assert _token_text("<|im_end|>", None) == "<|im_end|>"  # (no bytes known: vLLM's text)
    assert _token_text(None, None) == "" and _token_text("", None) == ""


def test_log_probabilities_json_cannot_carry_become_minus_9999():
    """-inf (a token the sampler ruled out) and NaN (a model gone numerically wrong) are not
    JSON: the response encoder refused them (a 500), and a stream wrote a bare NaN."""
    import math

    from server.engine.vllm_engine import _json_logprob

    assert _json_logprob(float("-inf")) == -9999.0
    assert _json_logprob(float("nan")) == -9999.0
    assert _json_logprob(-1e6) == -9999.0
    assert _json_logprob(-0.25) == -0.25 and _json_logprob(0.0) == 0.0
    assert not math.isnan(_json_logprob(float("inf")))


def test_trust_remote_code_is_dropped_for_first_generation_qwen_vl_only(tiny_model, caplog):
    """With it, transformers loads a Qwen-VL checkpoint's own tokenizer code in place of the
    plugin's (no chat template: every chat request fails)."""
    import logging

    qwen, qwen2 = str(tiny_model("qwen-vl")), str(tiny_model("qwen2-vl"))
    with caplog.at_level(logging.WARNING, logger="server.engine.vllm_engine"):
        args = engine_args_from_settings(parse_settings(["--model", qwen, "--trust-remote-code"]), qwen, "cpu")
    assert args.trust_remote_code is False
    assert any("ignoring --trust-remote-code" in r.getMessage() for r in caplog.records)
    args = engine_args_from_settings(parse_settings(["--model", qwen2, "--trust-remote-code"]), qwen2, "cpu")
    assert args.trust_remote_code is True
    assert engine_args_from_settings(parse_settings(["--model", qwen]), qwen, "cpu").trust_remote_code is False


def test_hub_ids_are_known_by_their_config_too(tmp_path, monkeypatch):
    """A hub id (no local config.json) had no model type: --trust-remote-code stayed on for
    Qwen/Qwen-VL-Chat, and video stayed on for Qwen2-VL. The config comes from the hub cache
    here (the network where it is not cached)."""
    import json

    import huggingface_hub.constants

    import server.engine.vllm_engine as vllm_engine

    for repo, model_type in (("Qwen/Qwen-VL-Chat", "qwen"), ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl")):
        base = tmp_path / f"models--{repo.replace('/', '--')}"
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text("abc")
        (base / "snapshots" / "abc").mkdir(parents=True)
        (base / "snapshots" / "abc" / "config.json").write_text(json.dumps({"model_type": model_type}))
    # a fine-tune's own pixel bounds (the grounding of Qwen2.5-VL's pixel boxes depends on them)
    (tmp_path / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots" / "abc" / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 1024, "max_pixels": 1003520, "patch_size": 14, "merge_size": 2}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(vllm_engine, "_hub_files", {})
    assert vllm_engine._image_processor_config("Qwen/Qwen2-VL-2B-Instruct") == {
        "min_pixels": 1024, "max_pixels": 1003520, "patch_size": 14, "merge_size": 2}
    # at the revision vLLM loads, from the cache it downloads into
    (base / "refs" / "v2").write_text("def")
    (base / "snapshots" / "def").mkdir()
    (base / "snapshots" / "def" / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 200704}))
    other = tmp_path / "elsewhere" / base.name
    (other / "refs").mkdir(parents=True)
    (other / "refs" / "main").write_text("abc")
    (other / "snapshots" / "abc").mkdir(parents=True)
    (other / "snapshots" / "abc" / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 401408}))
    for flags, expected in ((["--revision", "v2"], 200704),
                            (["--download-dir", str(tmp_path / "elsewhere")], 401408)):
        settings = parse_settings(["--model", "Qwen/Qwen2-VL-2B-Instruct", *flags])
        assert vllm_engine._image_processor_config("Qwen/Qwen2-VL-2B-Instruct", settings)["max_pixels"] == expected
    qwen = engine_args_from_settings(parse_settings(["--model", "Qwen/Qwen-VL-Chat", "--trust-remote-code"]),
                                     "Qwen/Qwen-VL-Chat", "cpu")
    assert qwen.trust_remote_code is False and qwen.limit_mm_per_prompt == {"image": 4}
    qwen2 = engine_args_from_settings(parse_settings(["--model", "Qwen/Qwen2-VL-2B-Instruct"]),
                                      "Qwen/Qwen2-VL-2B-Instruct", "cpu")
    assert qwen2.limit_mm_per_prompt == {"image": 4, "video": 0}


def test_the_kv_cache_flag_wins_over_vllms_variable_only_when_given(monkeypatch):
    monkeypatch.delenv("QWENVL_KV_CACHE_SPACE_GIB", raising=False)
    model = "Qwen/Qwen2-VL-2B-Instruct"
    env = {"VLLM_CPU_KVCACHE_SPACE": "7"}
    assert cpu_kv_cache_bytes(parse_settings([]), env) is None
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "7"}  # the operator's own setting decides
    settings = parse_settings(["--model", model, "--kv-cache-space-gib", "0.25"])
    size = cpu_kv_cache_bytes(settings, env)
    assert size == 2**28 and env == {}  # (vLLM's CPU platform would let the variable win)
    assert engine_args_from_settings(settings, model, "cpu", size).kv_cache_memory_bytes == 2**28
    assert engine_args_from_settings(settings, model, "cuda", None).kv_cache_memory_bytes is None
    monkeypatch.setenv("QWENVL_KV_CACHE_SPACE_GIB", "2")
    env = {"VLLM_CPU_KVCACHE_SPACE": "7"}
    assert cpu_kv_cache_bytes(parse_settings([]), env) == 2 * 2**30 and env == {}
    monkeypatch.delenv("QWENVL_KV_CACHE_SPACE_GIB")
    env = {"VLLM_CPU_KVCACHE_SPACE": ""}
    assert cpu_kv_cache_bytes(parse_settings([]), env) == 2**30 and env == {}  # the default


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_a_kv_cache_size_that_is_no_positive_number_is_refused(value):
    with pytest.raises(SystemExit):
        parse_settings(["--kv-cache-space-gib", value])


def test_a_picture_the_engine_lacks_is_sent_again_once():
    """vLLM's front end sends a picture's data only while it believes its engine lacks it; when
    the two disagree the engine ends the request with "error" before any token (and has the
    front end forget the picture). The request is processed and sent again, once, instead of
    failing with a 500; an error after that, or one without pictures, stays an error."""
    import asyncio
    from types import SimpleNamespace

    from server.engine.base import GenerationRequest, ModelInfo, SamplingOptions
    from server.engine.vllm_engine import VLLMEngine

    def output(reason, tokens=(), index=0, finished=None):
        choice = SimpleNamespace(index=index, text="x" * len(tokens), token_ids=list(tokens), logprobs=None,
                                 finish_reason=reason, stop_reason=None)
        return SimpleNamespace(outputs=[choice], finished=reason is not None if finished is None else finished,
                               prompt_token_ids=[1, 2, 3], num_cached_tokens=0)

    class FakeAsyncLLM:
        errored = False

        def __init__(self, scripts):
            self.scripts = list(scripts)
            self.processed = 0
            self.renderer = SimpleNamespace(process_for_engine_async=self._process, mm_processor_cache=None)

        async def _process(self, prompt, arrival):
            self.processed += 1
            return {"prompt_token_ids": prompt["prompt_token_ids"], "mm_hashes": {"image": ["h"]}}

        async def generate(self, engine_input, params, request_id):
            for out in self.scripts.pop(0):
                yield out

        async def abort(self, request_id):
            pass

    info = ModelInfo(family="qwen2-vl", max_model_len=64, tokenizer=None)

    def run(scripts, images):
        llm = FakeAsyncLLM(scripts)
        engine = VLLMEngine(llm, info, stats=None)
        request = GenerationRequest(request_id="r", prompt_token_ids=[1, 2, 3], images=images,
                                    image_ids=["id"] * len(images), sampling=SamplingOptions(max_tokens=8))

        async def collect():
            # (choice 0's finish reason; another choice's with its index)
            return [c.choices[0].finish_reason if not c.choices[0].index else (c.choices[0].index, c.choices[0].finish_reason)
                    async for c in await engine.start(request)]

        return asyncio.run(collect()), llm.processed

    picture = object()
    miss, answer = [output("error")], [output(None, [5]), output("length", [6])]
    assert run([miss, answer], [picture]) == ([None, "length"], 2)
    assert run([miss, miss], [picture]) == (["error"], 2)  # once only
    assert run([miss], []) == (["error"], 1)  # no picture: nothing to resend
    assert run([[output(None, [5]), output("error")]], [picture]) == ([None, "error"], 1)  # after a token: no
    # n=2: vLLM runs a request per choice, each reporting its miss apart; only the last is finished
    misses = [output("error", index=0, finished=False), output("error", index=1, finished=True)]
    answers = [output("length", [5], index=0, finished=False), output("length", [6], index=1, finished=True)]
    assert run([misses, answers], [picture]) == (["length", (1, "length")], 2)
    # one choice failing while the other answers is not a missing picture: both reach the client
    mixed = [output("error", index=0, finished=False), output("length", [6], index=1, finished=True)]
    assert run([mixed], [picture]) == (["error", (1, "length")], 1)


def test_a_request_never_sent_has_its_pictures_forgotten():
    """Processing a request tells vLLM's front end that its pictures went to the engine; they
    go when the stream is first read. A stream closed, or dropped, before that (a deadline or a
    disconnect in between), a start cancelled while the processing ran on (in vLLM's thread),
    and a request vLLM refused as it added it have vLLM's cache forget them, so the next
    request with one of them sends its data; a stream that was read does not."""
    import asyncio
    import gc
    from types import SimpleNamespace

    from server.engine.base import GenerationRequest, ModelInfo, SamplingOptions
    from server.engine.vllm_engine import VLLMEngine

    forgotten = []
    answer = SimpleNamespace(outputs=[SimpleNamespace(index=0, text="x", token_ids=[5], logprobs=None,
                                                      finish_reason="length", stop_reason=None)],
                             finished=True, prompt_token_ids=[1, 2, 3], num_cached_tokens=0)

    class FakeAsyncLLM:
        errored = False
        renderer = SimpleNamespace(mm_processor_cache=SimpleNamespace(invalidate=forgotten.append))
        processing_time = 0.0
        refuse = False

        async def _process(self, prompt, arrival):
            await asyncio.sleep(self.processing_time)
            return {"prompt_token_ids": prompt["prompt_token_ids"], "mm_hashes": {"image": ["h1", "h2"]}}

        async def generate(self, engine_input, params, request_id):
            if self.refuse:  # (vLLM refusing the request as it adds it: never sent)
                raise RuntimeError("cannot serialize")
            yield answer

        async def abort(self, request_id):
            pass

    llm = FakeAsyncLLM()
    FakeAsyncLLM.renderer.process_for_engine_async = llm._process
    engine = VLLMEngine(llm, ModelInfo(family="qwen2-vl", max_model_len=64, tokenizer=None), stats=None)
    request = GenerationRequest(request_id="r", prompt_token_ids=[1, 2, 3], images=[object(), object()],
                                image_ids=["a", "b"], sampling=SamplingOptions(max_tokens=8))

    async def closed_unread():
        stream = await engine.start(request)
        await stream.aclose()

    async def read_then_closed():
        stream = await engine.start(request)
        assert [c.choices[0].finish_reason async for c in stream] == ["length"]
        await stream.aclose()

    async def read_cancelled_before_it_ran():
        stream = await engine.start(request)
        reading = asyncio.ensure_future(stream.__anext__())
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await stream.aclose()

    async def dropped_unread():
        await engine.start(request)
        gc.collect()
        await asyncio.sleep(0)  # (the event loop forgets them)

    async def cancelled_while_processing():
        llm.processing_time = 0.2
        starting = asyncio.ensure_future(engine.start(request))
        await asyncio.sleep(0.05)
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        before = list(forgotten)
        await asyncio.sleep(0.3)  # the processing ends, and counts them sent
        llm.processing_time = 0.0
        return before

    async def refused_as_it_was_sent():
        llm.refuse = True
        with pytest.raises(RuntimeError):
            async for _ in await engine.start(request):
                pass
        llm.refuse = False

    asyncio.run(closed_unread())
    assert forgotten == ["h1", "h2"]
    forgotten.clear()
    asyncio.run(read_then_closed())
    assert forgotten == []
    asyncio.run(read_cancelled_before_it_ran())
    assert forgotten == ["h1", "h2"]
    forgotten.clear()
    asyncio.run(dropped_unread())
    assert forgotten == ["h1", "h2"]
    forgotten.clear()
    assert asyncio.run(cancelled_while_processing()) == []
    assert forgotten == ["h1", "h2"]
    forgotten.clear()
    asyncio.run(refused_as_it_was_sent())
    assert forgotten == ["h1", "h2"]
