"""Fixtures for the Qwen-VL plugin tests: tiny checkpoints (with booby-trapped remote code),
test images, and a real vLLM engine (AsyncLLM on a background event loop)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from server.qwen_vl.tiny import write_tiny_qwen_vl

# Engines on these CPU machines: no hub access (and a small KV cache: EngineRunner).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
#: A quarter GiB holds 64K tokens of the tiny checkpoint in float32; vLLM zeroes the cache at startup,
#: about 11 s per GiB on the 2-core machines.
KV_CACHE_BYTES = 2**28

T = TypeVar("T")

REMOTE_CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py")


def add_remote_code_trap(checkpoint: Path, marker: Path) -> None:
    """Put the published checkpoints' remote-code files into `checkpoint`, each of which, if
    imported by anyone, records its name in `marker` and raises."""
    for name in REMOTE_CODE_FILES:
        (checkpoint / name).write_text(
            "import pathlib\n"
            f"with open({str(marker)!r}, 'a') as f:\n"
            f"    f.write({name!r} + '\\n')\n"
            f"raise RuntimeError('remote code {name} must never be imported')\n"
        )


@pytest.fixture(scope="session")
def remote_code_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file that exists only if some process imported a checkpoint's remote code."""
    return tmp_path_factory.mktemp("trap") / "remote_code_imported.txt"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, remote_code_marker: Path) -> Path:
    """The tiny checkpoint (safetensors + index), plus remote-code files that must stay unused."""
    path = write_tiny_qwen_vl(tmp_path_factory.mktemp("qwen_vl") / "tiny", seed=0)
    add_remote_code_trap(path, remote_code_marker)
    return path


@pytest.fixture(scope="session")
def tiny_bin_dir(tmp_path_factory: pytest.TempPathFactory, remote_code_marker: Path) -> Path:
    """The same tiny weights in the other published layout: pytorch_model-*.bin + index."""
    path = write_tiny_qwen_vl(
        tmp_path_factory.mktemp("qwen_vl_bin") / "tiny", seed=0, layout="bin", num_shards=3
    )
    add_remote_code_trap(path, remote_code_marker)
    return path


@pytest.fixture(scope="session")
def plugin_registered() -> None:
    """What vLLM does in each of its processes: run the general plugin."""
    from server.qwen_vl.plugin import register

    register()


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three distinct test images of different sizes and modes."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    x, y = np.meshgrid(np.linspace(0, 255, 640), np.linspace(0, 255, 480))
    gradient = Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))
    checker = Image.fromarray(
        (((np.indices((224, 224)).sum(0) // 28) % 2) * 255).astype(np.uint8)
    ).convert("L")
    return [noise, gradient, checker]


class EngineRunner:
    """An `AsyncLLM` on its own event-loop thread, driven synchronously from tests."""

    def __init__(self, **engine_args: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine = self.run(self._start(engine_args), timeout=600)
        self._next_id = 0

    @staticmethod
    async def _start(engine_args: dict[str, Any]):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM's CPU platform lets this variable (whole GiB; `make test` sets 1) win over the
        # engine argument; the engine processes start inside from_engine_args.
        saved = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        try:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**{"kv_cache_memory_bytes": KV_CACHE_BYTES,
                                                                **engine_args}))
        finally:
            if saved is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def generate(self, prompt: dict, params) -> tuple[Any, list[Any]]:
        """Run one request; return (final RequestOutput, every RequestOutput streamed)."""
        self._next_id += 1
        request_id = f"test-{self._next_id}"

        async def collect():
            outputs = [out async for out in self.engine.generate(prompt, params, request_id)]
            return outputs[-1], outputs

        return self.run(collect())

    def apply_model(self, func) -> Any:
        return self.run(self.engine.collective_rpc("apply_model", args=(func,)))[0]

    def close(self) -> None:
        self.engine.shutdown()

        async def cancel_pending() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_pending(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine_runner_factory() -> Iterator[type[EngineRunner]]:
    """`EngineRunner`, with vLLM's pickle-based serialization allowed while the module runs:
    `apply_model` sends a callable to the engine process."""
    previous = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    try:
        yield EngineRunner
    finally:
        if previous is None:
            os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
        else:
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = previous
