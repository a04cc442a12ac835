"""`QWenConfig`: the `qwen` model type of the published Qwen-VL checkpoints, without remote code.

Field names and defaults are those of the checkpoints' `config.json` (Qwen-VL-Chat). The vision
tower is described by the `visual` dict; `VisualConfig` gives it typed access with the
constructor defaults that `config.json` leaves out (`n_queries`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

# The ViT-bigG tower of Qwen-VL (config.json "visual"), used when a config omits a key.
DEFAULT_VISUAL: dict[str, Any] = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
}
# Absent from config.json; the published VisionTransformer's constructor default.
DEFAULT_N_QUERIES = 256


@dataclass(frozen=True)
class VisualConfig:
    """Typed view of `QWenConfig.visual` with the derived sizes."""

    width: int
    layers: int
    heads: int
    mlp_ratio: float
    image_size: int
    patch_size: int
    output_dim: int
    image_start_id: int
    n_queries: int

    @classmethod
    def from_dict(cls, visual: dict[str, Any]) -> VisualConfig:
        merged = {**DEFAULT_VISUAL, "n_queries": DEFAULT_N_QUERIES, **visual}
        return cls(**{name: merged[name] for name in cls.__dataclass_fields__})

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_width(self) -> int:
        # int(1664 * 4.9231) = 8192 for the real tower.
        return int(self.width * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        """Patches per side of the input image (448 / 14 = 32)."""
        return self.image_size // self.patch_size

    @property
    def query_grid_size(self) -> int:
        """Side of the square grid of resampler queries and stored position tables (16)."""
        side = int(round(self.n_queries**0.5))
        if side * side != self.n_queries:
            raise ValueError(f"visual.n_queries={self.n_queries} is not a square number")
        return side

    @property
    def pool_heads(self) -> int:
        """Heads of the resampler's attention: head_dim 128 at output_dim."""
        return self.output_dim // 128


class QWenConfig(PretrainedConfig):
    """Configuration of `QWenLMHeadModel` checkpoints (Qwen-7B language model + `visual`)."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 8192,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        kv_channels: int = 128,
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        use_flash_attn: str | bool = "auto",
        intermediate_size: int = 22016,
        no_bias: bool = True,
        tie_word_embeddings: bool = False,
        seq_length: int = 2048,
        visual: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        # vLLM reads the attention head size from `head_dim`.
        self.head_dim = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        # The standard names of the same two values, which vLLM's RoPE handling looks up.
        self.rope_theta = rotary_emb_base
        self.partial_rotary_factor = rotary_pct
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.no_bias = no_bias
        self.seq_length = seq_length
        self.visual = visual
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def visual_config(self) -> VisualConfig:
        """The vision tower's sizes; raises for a text-only (Qwen-7B) config."""
        if not self.visual:
            raise ValueError(
                "this `qwen` config has no `visual` section: it is a text-only Qwen checkpoint, "
                "which this plugin does not serve (it serves Qwen-VL / Qwen-VL-Chat)"
            )
        return VisualConfig.from_dict(self.visual)

    @property
    def mlp_width(self) -> int:
        """Width of each MLP branch (w1, w2): half of `intermediate_size` (11008 for Qwen-7B)."""
        return self.intermediate_size // 2

