"""The Qwen-VL vision tower on vLLM layers: OpenCLIP ViT-bigG/14 + a 256-query resampler.

Module names mirror the checkpoint under `transformer.visual.` (see `checkpoint.py`), so every
tensor loads into the parameter of the same name.

Pipeline for a [B, 3, 448, 448] batch: conv1 (14x14, stride 14, no bias) -> 1024 patch tokens
+ the 16x16 position table bicubic-interpolated to 32x32 -> ln_pre -> 48 pre-norm blocks ->
resampler (`attn_pool`: 256 learned queries cross-attending to the patches) -> ln_post ->
`x @ proj` = [B, 256, output_dim], the image's embeddings for its 256 `<imgpad>` positions.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from server.qwen_vl.checkpoint import POSITION_TABLE_SIZE
from server.qwen_vl.config import VisualConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import MMEncoderAttention
from vllm.model_executor.layers.conv import Conv2dLayer
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.resampler import Resampler2, get_abs_pos
from vllm.model_executor.models.utils import maybe_prefix

# Every LayerNorm of the tower, the resampler's included, uses eps 1e-6.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class VisualAttention(nn.Module):
    """Bidirectional self-attention of a ViT block.

    The fused `in_proj` rows are ordered per head, [q_h0, k_h0, v_h0, q_h1, ...] (not [Q; K; V]).
    A column-parallel split of those rows therefore hands each tensor-parallel rank whole heads
    with their q, k and v, and no de-interleaving is needed.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if heads % tp_size:
            raise ValueError(
                f"vision heads ({heads}) must divide by tensor_parallel_size ({tp_size})"
            )
        self.heads_per_rank = heads // tp_size
        self.head_dim = width // heads
        self.in_proj = ColumnParallelLinear(
            width, 3 * width, bias=True, quant_config=quant_config, prefix=f"{prefix}.in_proj"
        )
        self.out_proj = RowParallelLinear(
            width, width, bias=True, quant_config=quant_config, prefix=f"{prefix}.out_proj"
        )
        self.attn = MMEncoderAttention(
            self.heads_per_rank, self.head_dim, scale=self.head_dim**-0.5, prefix=f"{prefix}.attn"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv, _ = self.in_proj(x)
        q, k, v = qkv.view(batch, seq, self.heads_per_rank, 3, self.head_dim).unbind(dim=3)
        out = self.attn(q, k, v).reshape(batch, seq, self.heads_per_rank * self.head_dim)
        out, _ = self.out_proj(out)
        return out


class VisualMLP(nn.Module):
    """c_fc -> exact (erf) GELU -> c_proj, both with bias."""

    def __init__(
        self,
        width: int,
        mlp_width: int,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(
            width, mlp_width, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_fc"
        )
        self.act = get_act_fn("gelu")
        self.c_proj = RowParallelLinear(
            mlp_width, width, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_proj"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.c_fc(x)
        x, _ = self.c_proj(self.act(x))
        return x


class VisualAttentionBlock(nn.Module):
    """Pre-norm ViT block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(
        self,
        config: VisualConfig,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.width)
        self.attn = VisualAttention(config.width, config.heads, quant_config, f"{prefix}.attn")
        self.ln_2 = LayerNorm(config.width)
        self.mlp = VisualMLP(config.width, config.mlp_width, quant_config, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """The stack of ViT blocks (`transformer.resblocks.N` in the checkpoint)."""

    def __init__(
        self,
        config: VisualConfig,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            VisualAttentionBlock(config, quant_config, f"{prefix}.resblocks.{i}")
            for i in range(config.layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """Pixels [B, 3, S, S] -> image embeddings [B, n_queries, output_dim]."""

    def __init__(
        self,
        config: VisualConfig,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.config = config
        self.conv1 = Conv2dLayer(
            3, config.width, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.positional_embedding = nn.Parameter(torch.empty(POSITION_TABLE_SIZE, config.width))
        self.ln_pre = LayerNorm(config.width)
        self.transformer = VisualTransformer(
            config, quant_config, prefix=maybe_prefix(prefix, "transformer")
        )
        # vLLM's resampler has the checkpoint's names (query, pos_embed, kv_proj, attn = torch
        # MultiheadAttention, ln_q, ln_kv); ln_post and proj live on the tower, not in it.
        self.attn_pool = Resampler2(
            grid_size=config.query_grid_size,
            embed_dim=config.output_dim,
            num_heads=config.pool_heads,
            kv_dim=config.width,
            norm_layer=LayerNorm,
            adaptive=False,
            do_post_projection=False,
            quant_config=quant_config,
            prefix=maybe_prefix(prefix, "attn_pool"),
        )
        # Resampler2 builds pos_embed as a float32 sin-cos table; the checkpoint stores it (in the
        # model dtype), so keep a model-dtype parameter for the loader to fill.
        self.attn_pool.pos_embed = nn.Parameter(
            torch.empty(config.n_queries, config.output_dim), requires_grad=False
        )
        self.ln_post = LayerNorm(config.output_dim)
        self.proj = nn.Parameter(torch.empty(config.output_dim, config.output_dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(dtype=self.dtype))  # [B, width, grid, grid]
        batch, width, grid_h, grid_w = x.shape
        x = x.reshape(batch, width, grid_h * grid_w).permute(0, 2, 1)  # row-major patches
        x = x + get_abs_pos(self.positional_embedding, (grid_h, grid_w))
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.attn_pool(x)  # [B, n_queries, output_dim]
        x = self.ln_post(x)
        return x @ self.proj
