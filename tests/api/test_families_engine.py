"""Qwen2.5-VL and Qwen3-VL (vLLM's built-in models) on the real engine, through the real
HTTP stack and the official client: each family's image token count matches its own
processor (Qwen3-VL's 16-pixel patches included), `detail: "low"` downscales as that
processor would, pictures of many sizes batch together, streaming gives the same answer,
and grounding boxes come back as data (support.grounding_case). Qwen2-VL and the
first-generation Qwen-VL plugin: test_chat_engine.py."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from PIL import Image

from support import grounding_case
from support.http_server import start_server, static
from support.images import data_url, picture
from support.live_server import ServerProcess
from support.reference import hf_prompt_tokens

pytestmark = pytest.mark.engine

IMAGE_HOST = "127.0.0.2"
MAX_PIXELS = 640 * 640  # above what detail "low" allows, so that it has something to lower


@pytest.fixture(scope="module")
def image_server():
    state, httpd = start_server(IMAGE_HOST)
    state.routes["/wide.jpg"] = static(picture(500, 180, (30, 160, 60), fmt="JPEG"), "image/jpeg")
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def server(request, tiny_model, tmp_path_factory, image_server):
    arch = request.param
    model_dir = tiny_model(arch, max_pixels=MAX_PIXELS)
    forcing_args, forcing_env = grounding_case.server_options(arch, model_dir)  # (seed FORCE_SEED only)
    proc = ServerProcess(
        ["--model", str(model_dir), "--served-model-name", "tiny", "--max-model-len", "2048",
         "--max-num-seqs", "16", "--limit-mm-per-prompt", "3", "--image-allow-networks", f"{IMAGE_HOST}/32",
         *forcing_args],
        tmp_path_factory.mktemp("logs") / f"server-{arch}.log",
        env=forcing_env,
    ).start()
    proc.arch, proc.model_dir = arch, model_dir
    yield proc
    proc.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, content, **kwargs):
    kwargs.setdefault("max_tokens", 6)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kwargs)


def rgb(raw: bytes) -> Image.Image:
    return Image.open(io.BytesIO(raw)).convert("RGB")


def test_image_tokens_match_the_familys_own_processor(client, server, image_server):
    square, wide = picture(333, 222), picture(500, 180, (30, 160, 60), fmt="JPEG")
    text = "Compare the two pictures."
    r = ask(client, [{"type": "image_url", "image_url": {"url": data_url(square)}},
                     {"type": "image_url", "image_url": {"url": image_server.url("/wide.jpg")}},
                     {"type": "text", "text": text}])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == hf_prompt_tokens(server, [rgb(square), rgb(wide)], text)
    assert r.usage.prompt_tokens > hf_prompt_tokens(server, [], text) + 2 * 40  # the pictures count


def test_low_detail_downscales_as_the_processor_would(client, server):
    from server.images.family import FAMILIES, LOW_DETAIL_MAX_PIXELS, target_size

    raw, text = picture(640, 600), "Describe."

    def tokens(detail: str) -> int:
        part = {"type": "image_url", "image_url": {"url": data_url(raw), "detail": detail}}
        return ask(client, [part, {"type": "text", "text": text}], max_tokens=1).usage.prompt_tokens

    low, high = tokens("low"), tokens("high")
    assert high == hf_prompt_tokens(server, [rgb(raw)], text)
    small = rgb(raw).resize(target_size(FAMILIES[server.arch], 640, 600, LOW_DETAIL_MAX_PIXELS))
    assert low == hf_prompt_tokens(server, [small], text) and low < high - 50
    # at most 448x448 pixels' worth of image tokens, by the checkpoint's own patch size
    # (+2: the vision start and end tokens around them)
    patch = json.loads((server.model_dir / "config.json").read_text())["vision_config"]["patch_size"]
    image_tokens = low - hf_prompt_tokens(server, [], text) - 2
    assert 0 < image_tokens <= LOW_DETAIL_MAX_PIXELS // (2 * patch) ** 2


def test_pictures_of_many_sizes_in_one_batch(client, server):
    sizes = [(64, 64), (300, 90), (90, 300), (450, 450), (129, 257), (512, 200), (33, 640), (200, 200)]

    def one(size):
        raw = picture(*size, color=(size[0] % 256, size[1] % 256, 90))
        r = ask(client, [{"type": "image_url", "image_url": {"url": data_url(raw)}},
                         {"type": "text", "text": "What is it?"}], max_tokens=16)
        return r.usage.prompt_tokens, hf_prompt_tokens(server, [rgb(raw)], "What is it?"), r.usage.completion_tokens

    with ThreadPoolExecutor(len(sizes)) as pool:
        results = list(pool.map(one, sizes))
    for size, (served, reference, completion) in zip(sizes, results):
        assert served == reference, size
        assert completion >= 1


def test_streaming_gives_the_same_answer(client, server):
    content = [{"type": "image_url", "image_url": {"url": data_url(picture(120, 80))}},
               {"type": "text", "text": "Tell me a story."}]
    whole = ask(client, content, max_tokens=16, seed=3)
    stream = ask(client, content, max_tokens=16, seed=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


# --- grounding on the real path (support.grounding_case) ---------------------------------


def test_a_box_the_model_writes_comes_back_as_data_in_the_pictures_pixels(client, server):
    grounding_case.check_box_comes_back_as_data(client, server, "tiny")


def test_streamed_boxes_arrive_in_the_choices_last_chunk(client, server):
    grounding_case.check_streamed_boxes_arrive_in_the_last_chunk(client, server, "tiny")


def test_grounding_off_leaves_the_text_alone(client, server):
    grounding_case.check_grounding_off_leaves_the_text_alone(client, server, "tiny")


def test_a_photo_with_an_exif_orientation_reaches_the_model_upright_once(client):
    """A phone photo stored sideways with EXIF orientation 6 must give the model exactly the
    pixels of the same photo stored upright (vLLM turns any image still tagged, so the
    server's upright copy must carry no tag)."""
    upright = Image.open(io.BytesIO(picture(96, 64))).convert("RGB")

    def png(im: Image.Image, orientation: int | None = None) -> str:
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        buf = io.BytesIO()
        im.save(buf, "PNG", exif=exif.tobytes())
        return data_url(buf.getvalue())

    def logprobs(url: str) -> list[float]:
        r = ask(client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}],
                max_tokens=4, logprobs=True, top_logprobs=3)
        return [t.logprob for c in r.choices[0].logprobs.content for t in c.top_logprobs]

    reference = logprobs(png(upright))
    # stored turned 90 degrees counter-clockwise; orientation 6 says "turn it clockwise"
    assert logprobs(png(upright.transpose(Image.Transpose.ROTATE_90), 6)) == reference
    # the check can fail: the model does see which way up a picture is
    assert logprobs(png(upright.transpose(Image.Transpose.ROTATE_180))) != reference
