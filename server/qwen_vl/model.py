"""Qwen-VL (first generation) for vLLM: the Qwen-7B language model on paged attention plus the
vision tower of `vision.py`, registered for the `QWenLMHeadModel` architecture of the published
checkpoints (and the `QwenVLForConditionalGeneration` name vLLM <= 0.23 used).

Module names mirror the checkpoint (`transformer.wte`, `transformer.h.N.attn.c_attn`,
`transformer.visual...`, `lm_head`), so `load_weights` is the short mapping of `checkpoint.py`.
Linear layers are vLLM's parallel ones, so tensor parallelism shards attention heads and MLP
widths; the layer stack is split with `make_layers` for pipeline parallelism.

Context length: the published model switches on dynamic-NTK RoPE and log-n attention scaling
past `seq_length` (2048) tokens. This implementation does not, so it refuses a `max_model_len`
above `seq_length`; vLLM's derived default is already 2048 (min of max_position_embeddings and
seq_length), and within 2048 tokens both tricks are identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from server.qwen_vl.checkpoint import (
    CheckpointError,
    check_complete,
    check_tensor,
    checkpoint_tensor_shapes,
    vllm_parameter_for,
)
from server.qwen_vl.config import QWenConfig
from server.qwen_vl.processing import (
    IMAGE_PLACEHOLDER,
    QwenVLDummyInputsBuilder,
    QwenVLMultiModalProcessor,
    QwenVLProcessingInfo,
)
from server.qwen_vl.vision import VisionTransformer
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsMultiModal,
    SupportsPP,
)
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors


class QWenAttention(nn.Module):
    """Causal multi-head attention with the fused, biased `c_attn` ([Q; K; V] blocks) and
    NeoX-style RoPE over `rotary_pct` of each head."""

    def __init__(
        self,
        config: QWenConfig,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        heads, head_dim = config.num_attention_heads, config.kv_channels
        if heads % tp_size:
            raise ValueError(
                f"attention heads ({heads}) must divide by tensor_parallel_size ({tp_size})"
            )
        self.num_heads = heads // tp_size
        self.head_dim = head_dim
        self.c_attn = QKVParallelLinear(
            config.hidden_size, head_dim, heads, bias=True, prefix=f"{prefix}.c_attn"
        )
        self.c_proj = RowParallelLinear(
            heads * head_dim, config.hidden_size, bias=False, prefix=f"{prefix}.c_proj"
        )
        self.rotary_emb = get_rope(
            head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": float(config.rotary_emb_base),
                "partial_rotary_factor": float(config.rotary_pct),
            },
        )
        self.attn = Attention(
            self.num_heads,
            head_dim,
            head_dim**-0.5,
            cache_config=cache_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(hidden_states)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class QWenMLP(nn.Module):
    """c_proj(w1(x) * silu(w2(x))), with w2 and w1 fused as `gate_up_proj` shards 0 and 1."""

    def __init__(self, config: QWenConfig, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.mlp_width] * 2,
            bias=False,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.act_fn = SiluAndMul()
        self.c_proj = RowParallelLinear(
            config.mlp_width, config.hidden_size, bias=False, prefix=f"{prefix}.c_proj"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.c_proj(self.act_fn(gate_up))
        return x


class QWenBlock(nn.Module):
    """Pre-norm decoder block: h = x + attn(ln_1(x)); out = h + mlp(ln_2(h)).

    The residual is carried separately so vLLM's fused add + RMSNorm can be used.
    """

    def __init__(
        self,
        config: QWenConfig,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, cache_config, prefix=f"{prefix}.attn")
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config, prefix=f"{prefix}.mlp")

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.ln_1(hidden_states)
        else:
            hidden_states, residual = self.ln_1(hidden_states, residual)
        hidden_states = self.attn(positions, hidden_states)
        hidden_states, residual = self.ln_2(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": {0: "b"},
        "positions": {0: "b"},
        "intermediate_tensors": {0: "b"},
        "inputs_embeds": {0: "b"},
    }
)
class QWenModel(nn.Module):
    """The checkpoint's `transformer`: token embedding, decoder blocks, final norm, and the
    vision tower (`visual`, used through `QwenVLForConditionalGeneration.embed_multimodal`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: QWenConfig = vllm_config.model_config.hf_config
        cache_config = vllm_config.cache_config
        pp_group = get_pp_group()
        self.config = config

        if pp_group.is_first_rank:
            self.wte = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, prefix=f"{prefix}.wte"
            )
            self.visual = VisionTransformer(
                config.visual_config, prefix=maybe_prefix(prefix, "visual")
            )
        else:
            self.wte = PPMissingLayer()
            self.visual = PPMissingLayer()
        self.start_layer, self.end_layer, self.h = make_layers(
            config.num_hidden_layers,
            lambda prefix: QWenBlock(config, cache_config, prefix=prefix),
            prefix=f"{prefix}.h",
        )
        if pp_group.is_last_rank:
            self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        else:
            self.ln_f = PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            if inputs_embeds is None:
                inputs_embeds = self.embed_input_ids(input_ids)
            hidden_states, residual = inputs_embeds, None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.h, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.ln_f(hidden_states, residual)
        return hidden_states


def check_engine_config(config: QWenConfig, vllm_config: VllmConfig) -> None:
    """Refuse engine settings this implementation cannot serve faithfully."""
    max_model_len = vllm_config.model_config.max_model_len
    if max_model_len > config.seq_length and (config.use_dynamic_ntk or config.use_logn_attn):
        raise ValueError(
            f"Qwen-VL supports at most {config.seq_length} tokens of context here (got "
            f"max_model_len={max_model_len}): beyond seq_length the model needs dynamic-NTK "
            "RoPE and log-n attention scaling, which this plugin does not implement. "
            f"Use --max-model-len {config.seq_length} or less."
        )
    if vllm_config.quant_config is not None:
        raise ValueError(
            "quantized Qwen-VL checkpoints (e.g. the GPTQ Int4 release) are not supported; "
            "serve the bf16 checkpoint"
        )


@MULTIMODAL_REGISTRY.register_processor(
    QwenVLMultiModalProcessor,
    info=QwenVLProcessingInfo,
    dummy_inputs=QwenVLDummyInputsBuilder,
)
class QwenVLForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """Qwen-VL / Qwen-VL-Chat: `transformer` (language model + vision tower) and `lm_head`."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return f"Picture {i}: {IMAGE_PLACEHOLDER}"
        raise ValueError(f"Qwen-VL supports images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: QWenConfig = vllm_config.model_config.hf_config
        check_engine_config(config, vllm_config)
        self.config = config

        with self._mark_composite_model(
            vllm_config,
            language_targets=QWenBlock,
            tower_targets={"image": VisionTransformer},
        ):
            self.transformer = QWenModel(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer")
            )
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
            )
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors

    # --- images -------------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Image embeddings, one [n_queries, hidden] tensor per image in prompt order."""
        pixel_values = kwargs.get("pixel_values")
        image_embeds = kwargs.get("image_embeds")
        if pixel_values is None and image_embeds is None:
            return []
        visual = self.config.visual_config
        if image_embeds is not None:
            embeds = _stack(image_embeds)
            _check_shape("image_embeds", embeds, (visual.n_queries, self.config.hidden_size))
            return list(embeds.to(self.transformer.visual.dtype).unbind(0))
        pixels = _stack(pixel_values)
        _check_shape("pixel_values", pixels, (3, visual.image_size, visual.image_size))
        return list(self.transformer.visual(pixels).unbind(0))

    # --- language model -----------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # --- weights ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a Qwen-VL checkpoint; accepts exactly the tensors `checkpoint_tensor_shapes`
        lists for this config.

        Raises `CheckpointError` naming the first unexpected, misshapen or repeated tensor, or
        the missing ones. Returns the names of the parameters it filled.
        """
        expected = checkpoint_tensor_shapes(self.config)
        params = dict(self.named_parameters())
        seen: set[str] = set()
        loaded: set[str] = set()
        for name, tensor in weights:
            check_tensor(name, tuple(tensor.shape), expected)
            if name in seen:
                raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint")
            seen.add(name)
            param_name, shard = vllm_parameter_for(name)
            if is_pp_missing_parameter(param_name, self):
                continue  # lives on another pipeline stage
            param = params[param_name]
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard)
            loaded.add(param_name)
        check_complete(seen, expected)
        return loaded


def _stack(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    tensors = list(value) if isinstance(value, (list, tuple)) else []
    if tensors and all(isinstance(v, torch.Tensor) for v in tensors):
        return torch.stack(tensors)
    raise TypeError(f"expected a tensor or a list of tensors, got {type(value).__name__}")


def _check_shape(name: str, value: torch.Tensor, item_shape: tuple[int, ...]) -> None:
    if value.dim() != len(item_shape) + 1 or tuple(value.shape[1:]) != item_shape:
        raise ValueError(
            f"{name} must have shape (num_images, {', '.join(map(str, item_shape))}), "
            f"got {tuple(value.shape)}"
        )
