"""The vLLM general plugin: discoverable by entry point, cheap and re-entrant registration."""

from __future__ import annotations

import pickle
from importlib.metadata import entry_points
from pathlib import Path

from transformers import CONFIG_MAPPING, AutoTokenizer

from server.qwen_vl.config import QWenConfig
from server.qwen_vl.plugin import ARCHITECTURES, MODEL_CLASS, register
from server.qwen_vl.tokenizer import QWenTokenizer


def test_entry_point_is_installed() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("qwen_vl") == "server.qwen_vl.plugin:register"


def test_register_is_re_entrant_and_lazy(tiny_dir: Path) -> None:
    from vllm import ModelRegistry

    register()
    register()
    assert CONFIG_MAPPING["qwen"] is QWenConfig
    assert type(AutoTokenizer.from_pretrained(tiny_dir)) is QWenTokenizer
    supported = ModelRegistry.get_supported_archs()
    for arch in ARCHITECTURES:
        assert arch in supported
        registered = ModelRegistry.models[arch]
        # A lazy `module:Class` reference: registration does not import the model module.
        assert f"{registered.module_name}:{registered.class_name}" == MODEL_CLASS


def test_tokenizer_survives_pickling(tiny_dir: Path) -> None:
    """vLLM may ship the tokenizer to other processes by pickling it."""
    tokenizer = QWenTokenizer(vocab_file=str(tiny_dir / "qwen.tiktoken"))
    clone = pickle.loads(pickle.dumps(tokenizer))
    text = "Picture 1: <img></img>\n你好 <ref>x</ref>"
    assert clone.encode(text) == tokenizer.encode(text)
    assert clone.chat_template == tokenizer.chat_template
