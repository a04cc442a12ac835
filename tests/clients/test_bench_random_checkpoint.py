"""The GPU recipe's random checkpoints, written at shrunken sizes: every tensor the
architecture needs, under the published names, in shards with a consistent index."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from clients.random_checkpoint import QWEN2_VL, write_random_checkpoint, write_shards


def read_index(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shapes = {}
    for file_name in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / file_name), "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == file_name
                shapes[name] = tuple(f.get_slice(name).get_shape())
    assert set(shapes) == set(index["weight_map"])
    return index, shapes


def test_shards_respect_the_size_and_index(tmp_path):
    shapes = {f"layer{i}.weight": (64, 64) for i in range(10)} | {"norm.weight": (64,), "fc.bias": (64,)}
    n = write_shards(tmp_path, shapes, seed=1, shard_bytes=3 * 64 * 64 * 2)
    index, written = read_index(tmp_path)
    assert written == shapes and n == 10 * 64 * 64 + 128
    assert index["metadata"]["total_size"] == 2 * n
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 4  # 3 + 3 + 3 + (1 + 2 small)
    with safe_open(str(tmp_path / index["weight_map"]["norm.weight"]), "pt") as f:
        assert f.get_tensor("norm.weight").float().eq(1).all()
    with safe_open(str(tmp_path / index["weight_map"]["fc.bias"]), "pt") as f:
        assert f.get_tensor("fc.bias").float().eq(0).all()


SMALL_QWEN2_VL = {
    "text": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1},
    "vision": {"depth": 1, "embed_dim": 128, "num_heads": 2, "hidden_size": 256},
}


def test_qwen2_vl_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    n = write_random_checkpoint("qwen2-vl", tmp_path, "2b", shrink=SMALL_QWEN2_VL)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [16, 24, 24]  # head_dim 128
    assert config["vision_config"]["depth"] == 1 and config["dtype"] == "bfloat16"
    assert (tmp_path / "tokenizer.json").exists() and not (tmp_path / "model.safetensors").exists()
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    own = sum(p.numel() for p in model.parameters())
    assert n == own


def test_full_sizes_are_the_published_ones():
    assert QWEN2_VL["7b"]["text"]["hidden_size"] == 3584 and QWEN2_VL["2b"]["text"]["tie_word_embeddings"]


def test_qwen_vl_checkpoint_matches_its_tensor_list(tmp_path):
    from server.qwen_vl.checkpoint import checkpoint_tensor_shapes
    from server.qwen_vl.config import QWenConfig

    shrink = {"hidden_size": 128, "num_attention_heads": 1, "kv_channels": 128, "intermediate_size": 256,
              "num_hidden_layers": 1, "visual": {"layers": 1, "width": 64, "heads": 1, "output_dim": 128}}
    n = write_random_checkpoint("qwen-vl", tmp_path, shrink=shrink)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == 151936 and (tmp_path / "qwen.tiktoken").exists()
    _, shapes = read_index(tmp_path)
    assert shapes == checkpoint_tensor_shapes(QWenConfig(**config))
    assert n == sum(math.prod(s) for s in shapes.values())


def test_unknown_arch_or_size(tmp_path):
    with pytest.raises(ValueError):
        write_random_checkpoint("llama", tmp_path)
    with pytest.raises(ValueError):
        write_random_checkpoint("qwen2-vl", tmp_path, size="70b")
