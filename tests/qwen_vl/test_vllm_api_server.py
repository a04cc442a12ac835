"""vLLM's own OpenAI server runs a Qwen-VL checkpoint through the plugin.

`python -m vllm.entrypoints.openai.api_server --model DIR` on the tiny checkpoint in the
pytorch_model-*.bin + index layout, with the remote-code files booby-trapped: a chat completion
with an image must render with the plugin's chat template, expand the image through the
plugin's processor, and score and decode exactly like the PyTorch reference.

With QWENVL_TEST_TENSOR_PARALLEL=2 (and two CPUs) the server runs with
`--tensor-parallel-size 2`, one core per rank, so the same comparison covers the sharded layers:
heads of the fused `c_attn`, the w2/w1 MLP shards, the per-head interleaved vision `in_proj`,
the vocab-parallel embedding and head. Off by default: on a 2-core machine it roughly triples
the server's start-up time.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from server.qwen_vl.tokenizer import QWenTokenizer

from .reference import ReferenceQwenVL, expand_image_pairs, load_checkpoint, preprocess

pytestmark = pytest.mark.engine

STARTUP_TIMEOUT_S = 420
MAX_TOKENS = 8


LOGPROB_TOLERANCE = 2e-3


def _tensor_parallel_setup() -> tuple[int, dict[str, str]]:
    """The TP size to test (QWENVL_TEST_TENSOR_PARALLEL, default 1) and its CPU thread binding:
    vLLM's CPU backend needs one core per rank named explicitly on a single-NUMA-node machine."""
    size = int(os.environ.get("QWENVL_TEST_TENSOR_PARALLEL", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    if size == 1:
        return 1, {}
    if len(cpus) < size:
        pytest.skip(f"tensor parallel size {size} needs {size} CPUs, {len(cpus)} available")
    return size, {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c in cpus[:size])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    tp_size, tp_env = _tensor_parallel_setup()
    # (vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE, whole GiB, win over the flag: a
    # quarter GiB is zeroed at startup in a quarter of the time.)
    env = {**{k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}, "HF_HUB_OFFLINE": "1", **tp_env}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_bin_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",
        "--enforce-eager",
        "--max-num-seqs", "2",
        "--limit-mm-per-prompt", '{"image": 2}',
        "--seed", "0",
        "--tensor-parallel-size", str(tp_size),
        "--kv-cache-memory-bytes", str(2**28),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited ({proc.returncode}):\n{_tail(log_path)}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready in {STARTUP_TIMEOUT_S}s:\n{_tail(log_path)}")
            time.sleep(1)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-6000:]


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_completion_with_image_matches_reference(
    server: str, tiny_bin_dir: Path, images, remote_code_marker: Path
) -> None:
    image = images[1]
    question = "What is in the picture?"
    body = {
        "model": str(tiny_bin_dir),
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _data_url(image)}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "return_token_ids": True,
        "prompt_logprobs": 0,
    }
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()

    tokenizer = QWenTokenizer(vocab_file=str(tiny_bin_dir / "qwen.tiktoken"))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    expected_prompt = expand_image_pairs(tokenizer.encode(rendered, add_special_tokens=False))
    assert data["prompt_token_ids"] == expected_prompt
    assert data["usage"]["prompt_tokens"] == len(expected_prompt)

    reference = ReferenceQwenVL(*load_checkpoint(tiny_bin_dir))
    embeds = reference.vision(preprocess(image)[None])
    pairs = zip(data["prompt_logprobs"][1:], expected_prompt[1:])
    ours = torch.tensor([entry[str(token)]["logprob"] for entry, token in pairs])
    expected = reference.prompt_logprobs(expected_prompt, embeds)
    assert (ours - expected).abs().max().item() < LOGPROB_TOLERANCE
    expected_tokens = reference.greedy(expected_prompt, embeds, MAX_TOKENS)
    choice = data["choices"][0]
    assert choice["token_ids"] == expected_tokens
    expected_text = tokenizer.decode(expected_tokens, skip_special_tokens=True)
    assert choice["message"]["content"] == expected_text
    assert not remote_code_marker.exists()


def test_models_endpoint_lists_the_checkpoint(server: str, tiny_bin_dir: Path) -> None:
    models = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [str(tiny_bin_dir)]
    assert models["data"][0]["max_model_len"] == 2048


def test_reference_is_sensitive_to_the_image(tiny_bin_dir: Path, images) -> None:
    """Guards the comparison above: different images give different reference embeddings."""
    reference = ReferenceQwenVL(*load_checkpoint(tiny_bin_dir))
    a, b = (reference.vision(preprocess(i)[None]) for i in images[:2])
    assert not torch.allclose(a, b, atol=1e-2)
