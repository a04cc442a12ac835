"""Session fixtures shared by the whole suite: tiny checkpoints built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(arch)` → directory of a tiny random-weight checkpoint (built once)."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            from server.tiny_model import write_tiny_model

            built[arch] = write_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    """The tiny Qwen2-VL checkpoint's tokenizer (real chat template and special tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("qwen2-vl"))
