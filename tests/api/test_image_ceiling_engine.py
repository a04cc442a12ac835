"""--image-max-pixels above the checkpoint's own max_pixels, end to end: the real server and
engine on the tiny Qwen2-VL checkpoint (its processor's bound: 448x448 = 200,704 pixels)."""

from __future__ import annotations

import openai
import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from server.images.family import FAMILIES, LOW_DETAIL_MAX_PIXELS, target_size
from support.images import data_url, picture
from support.live_server import ServerProcess

pytestmark = pytest.mark.engine

RAISED = 640 * 640


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    proc = ServerProcess(
        ["--model", str(tiny_model("qwen2-vl")), "--served-model-name", "tiny", "--max-model-len", "2048",
         "--max-num-seqs", "4", "--image-max-pixels", str(RAISED)],
        tmp_path_factory.mktemp("logs") / "server.log",
    ).start()
    yield proc
    proc.stop()


def image_tokens(width: int, height: int, ceiling: int) -> int:
    w, h = target_size(FAMILIES["qwen2-vl"], width, height, ceiling)
    return (w // 28) * (h // 28)  # 14-pixel patches, merged 2x2


def test_a_ceiling_above_the_checkpoints_reaches_the_model(server):
    """A 700x560 picture: "high" keeps all of it (500 image tokens under the raised ceiling),
    where the checkpoint's own bound would have cut it to 238, as "low" does."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    url = data_url(picture(700, 560))

    def prompt_tokens(detail: str) -> int:
        content = [{"type": "image_url", "image_url": {"url": url, "detail": detail}},
                   {"type": "text", "text": "Describe."}]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                           max_tokens=1)
        return r.usage.prompt_tokens

    high, low = prompt_tokens("high"), prompt_tokens("low")
    assert LOW_DETAIL_MAX_PIXELS == 200_704
    assert high - low == image_tokens(700, 560, RAISED) - image_tokens(700, 560, LOW_DETAIL_MAX_PIXELS) == 262


def test_a_thin_picture_costs_what_the_models_processor_makes_of_it(server):
    """A 5x1000 strip goes to the processor as it is; its `min_pixels` rule makes it 28x812,
    29 image tokens, as vLLM's own server counts. (Stretched to 28 pixels wide first, it was
    28x5600: 200 tokens, and other pixels than the model was trained on.)"""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)

    def prompt_tokens(width: int, height: int) -> int:
        content = [{"type": "image_url", "image_url": {"url": data_url(picture(width, height))}},
                   {"type": "text", "text": "Describe."}]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                           max_tokens=1)
        return r.usage.prompt_tokens

    def processor_tokens(width: int, height: int) -> int:
        h, w = smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=200_704)
        return (w // 28) * (h // 28)

    assert processor_tokens(5, 1000) == 29 and processor_tokens(64, 64) == 4
    assert prompt_tokens(5, 1000) - prompt_tokens(64, 64) == 29 - 4
    assert prompt_tokens(10, 300) - prompt_tokens(64, 64) == processor_tokens(10, 300) - 4
