"""The checkpoint layout (names, shapes), the strict loader on the full-size model (meta
device, nothing allocated), the config class, the tiny checkpoint writer and preprocessing."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from server.qwen_vl.checkpoint import checkpoint_tensor_shapes, vllm_parameter_for
from server.qwen_vl.config import QWenConfig
from server.qwen_vl.image import preprocess_image
from server.qwen_vl.tiny import TINY_CONFIG, write_tiny_qwen_vl

from .reference import preprocess

# config.json of Qwen-VL-Chat (architecture fields as published).
QWEN_VL_CHAT_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "attn_dropout_prob": 0.0,
    "bf16": False,
    "emb_dropout_prob": 0.0,
    "fp16": False,
    "fp32": False,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 22016,
    "kv_channels": 128,
    "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192,
    "model_type": "qwen",
    "no_bias": True,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "onnx_safe": None,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 2048,
    "tie_word_embeddings": False,
    "tokenizer_type": "QWenTokenizer",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.31.0",
    "use_cache": True,
    "use_dynamic_ntk": True,
    "use_flash_attn": False,
    "use_logn_attn": True,
    "visual": {
        "heads": 16,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 48,
        "mlp_ratio": 4.9231,
        "output_dim": 4096,
        "patch_size": 14,
        "width": 1664,
    },
    "vocab_size": 151936,
}
# Sum of the bf16 checkpoint index's tensors: its total_size is twice this.
QWEN_VL_CHAT_PARAMETERS = 9_656_935_168


@pytest.fixture(scope="module")
def full_shapes() -> dict[str, tuple[int, ...]]:
    return checkpoint_tensor_shapes(QWenConfig(**QWEN_VL_CHAT_CONFIG))


def test_full_size_layout_is_the_published_one(full_shapes) -> None:
    assert len(full_shapes) == 853
    visual = [n for n in full_shapes if n.startswith("transformer.visual.")]
    assert len(visual) == 594 and len(full_shapes) - len(visual) == 259
    assert sum(math.prod(s) for s in full_shapes.values()) == QWEN_VL_CHAT_PARAMETERS
    assert 2 * QWEN_VL_CHAT_PARAMETERS == 19_313_870_336  # the index's total_size
    spot_checks = {
        "transformer.wte.weight": (151936, 4096),
        "transformer.h.31.attn.c_attn.weight": (12288, 4096),
        "transformer.h.31.attn.c_attn.bias": (12288,),
        "transformer.h.0.mlp.w1.weight": (11008, 4096),
        "transformer.h.0.mlp.w2.weight": (11008, 4096),
        "transformer.h.0.mlp.c_proj.weight": (4096, 11008),
        "lm_head.weight": (151936, 4096),
        "transformer.visual.conv1.weight": (1664, 3, 14, 14),
        "transformer.visual.positional_embedding": (256, 1664),
        "transformer.visual.transformer.resblocks.47.attn.in_proj.weight": (4992, 1664),
        "transformer.visual.transformer.resblocks.47.mlp.c_fc.weight": (8192, 1664),
        "transformer.visual.attn_pool.kv_proj.weight": (4096, 1664),
        "transformer.visual.attn_pool.attn.in_proj_weight": (12288, 4096),
        "transformer.visual.attn_pool.pos_embed": (256, 4096),
        "transformer.visual.proj": (4096, 4096),
    }
    for name, shape in spot_checks.items():
        assert full_shapes[name] == shape, name


def test_only_the_mlp_is_renamed(full_shapes) -> None:
    assert vllm_parameter_for("transformer.h.3.mlp.w2.weight") == (
        "transformer.h.3.mlp.gate_up_proj.weight",
        0,
    )
    assert vllm_parameter_for("transformer.h.3.mlp.w1.weight") == (
        "transformer.h.3.mlp.gate_up_proj.weight",
        1,
    )
    renamed = [n for n in full_shapes if vllm_parameter_for(n) != (n, None)]
    assert len(renamed) == 2 * 32


def test_full_size_model_on_meta_device_loads_exactly_the_layout(tmp_path: Path) -> None:
    """Build the real vLLM module tree for Qwen-VL-Chat without allocating it, and check that
    its loader accepts exactly the 853 tensors and names what is missing or unexpected."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN_VL_CHAT_CONFIG))
    script = Path(__file__).with_name("meta_load.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["architecture"] == ["QWenLMHeadModel"]
    assert result["max_model_len"] == 2048
    assert result["num_checkpoint_tensors"] == 853
    assert result["num_parameters"] == QWEN_VL_CHAT_PARAMETERS
    assert result["loaded_equals_parameters"], result["params_not_loaded"]
    assert result["dropped"] in result["missing_error"]
    assert "transformer.h.0.mlp.w3.weight" in result["unexpected_error"]
    assert "transformer.wte.weight" in result["bad_shape_error"]
    assert "151935" in result["bad_shape_error"]


def test_config_reads_published_fields() -> None:
    config = QWenConfig(**QWEN_VL_CHAT_CONFIG)
    assert config.model_type == "qwen"
    assert config.head_dim == 128 and config.mlp_width == 11008
    visual = config.visual_config
    assert (visual.head_dim, visual.mlp_width, visual.n_queries) == (104, 8192, 256)
    assert (visual.grid_size, visual.query_grid_size, visual.pool_heads) == (32, 16, 32)
    with pytest.raises(ValueError, match="text-only"):
        QWenConfig().visual_config


def test_longer_context_than_seq_length_is_refused(tiny_dir: Path) -> None:
    from server.qwen_vl.model import check_engine_config

    config = QWenConfig(**TINY_CONFIG)

    def engine_config(max_model_len: int):
        return SimpleNamespace(
            model_config=SimpleNamespace(max_model_len=max_model_len), quant_config=None
        )

    check_engine_config(config, engine_config(2048))
    with pytest.raises(ValueError, match="at most 2048 tokens"):
        check_engine_config(config, engine_config(4096))


def test_tiny_checkpoint_layout_and_determinism(tiny_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["QWenLMHeadModel"]
    assert config["visual"]["image_start_id"] == 151857
    assert config["hidden_size"] // config["num_attention_heads"] == config["kv_channels"] == 64
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(checkpoint_tensor_shapes(QWenConfig(**config)))
    tokenizer_config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "QWenTokenizer"
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 151643
    vocab = (tiny_dir / "qwen.tiktoken").read_bytes()
    assert vocab.count(b"\n") == 151643

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        for file in sorted(path.glob("*.safetensors")):
            h.update(file.read_bytes())
        return h.hexdigest()

    again = write_tiny_qwen_vl(tmp_path / "again", seed=0)
    other = write_tiny_qwen_vl(tmp_path / "other", seed=1)
    assert digest(again) == digest(tiny_dir.parent / "tiny") != digest(other)


def test_bin_layout_holds_the_same_tensors(tiny_dir: Path, tiny_bin_dir: Path) -> None:
    from safetensors.torch import load_file

    index = json.loads((tiny_bin_dir / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    safetensors = {}
    for file in tiny_dir.glob("*.safetensors"):
        safetensors.update(load_file(str(file)))
    bins = {}
    for file in tiny_bin_dir.glob("pytorch_model-*.bin"):
        bins.update(torch.load(file, weights_only=True))
    assert safetensors.keys() == bins.keys() == index["weight_map"].keys()
    assert all(torch.equal(safetensors[n], bins[n]) for n in bins)


def test_preprocessing_matches_the_published_torchvision_pipeline(images) -> None:
    for image in images:
        ours = preprocess_image(image, 448)
        expected = preprocess(image)
        assert ours.shape == expected.shape == (3, 448, 448)
        assert (ours - expected).abs().max().item() < 1e-5
