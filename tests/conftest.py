"""Session fixtures shared by the whole suite: tiny checkpoints built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(arch, max_pixels=None)` → directory of a tiny random-weight checkpoint
    (built once per argument set; see `write_tiny_model`)."""
    built: dict[tuple[str, int | None], Path] = {}

    def get(arch: str, max_pixels: int | None = None) -> Path:
        key = (arch, max_pixels)
        if key not in built:
            from server.tiny_model import write_tiny_model

            name = f"tiny-{arch}" if max_pixels is None else f"tiny-{arch}-{max_pixels}px"
            built[key] = write_tiny_model(arch, tmp_path_factory.mktemp(name), seed=0, max_pixels=max_pixels)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    """The tiny Qwen2-VL checkpoint's tokenizer (real chat template and special tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("qwen2-vl"))
