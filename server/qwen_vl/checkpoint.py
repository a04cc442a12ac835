"""The tensors of a Qwen-VL checkpoint: names, shapes, and where each one goes in the vLLM model.

One enumeration serves the weight loader (which accepts exactly this set), the tiny-checkpoint
writer and the tests. Shapes use PyTorch's Linear convention, [out, in]. For the full-size
Qwen-VL-Chat config this is 853 tensors, 9,656,935,168 parameters.

The vLLM module tree mirrors these names. The only renaming is the MLP: the checkpoint's `w2`
(the SiLU gate) and `w1` (the multiplied "up" branch) are fused into `gate_up_proj` as shards 0
and 1, the order vLLM's SiluAndMul expects (silu(first half) * second half).
"""

from __future__ import annotations

import re

from server.qwen_vl.config import QWenConfig

VISUAL_PREFIX = "transformer.visual."
# The ViT's learned absolute position table: 16 x 16 (the 224-pixel grid), interpolated to the
# 32 x 32 patch grid at run time. Fixed in the published code, independent of the config.
POSITION_TABLE_SIZE = 256

_MLP_GATE_UP = re.compile(r"^(transformer\.h\.\d+\.mlp\.)(w2|w1)(\.weight)$")
_GATE_UP_SHARD = {"w2": 0, "w1": 1}


class CheckpointError(ValueError):
    """A checkpoint does not match the Qwen-VL layout its config implies."""


def checkpoint_tensor_shapes(config: QWenConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen-VL checkpoint for `config` holds, mapped to its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    hidden, vocab = config.hidden_size, config.vocab_size
    projection = config.kv_channels * config.num_attention_heads
    ff = config.mlp_width

    shapes["transformer.wte.weight"] = (vocab, hidden)
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        shapes[p + "ln_1.weight"] = (hidden,)
        shapes[p + "attn.c_attn.weight"] = (3 * projection, hidden)
        shapes[p + "attn.c_attn.bias"] = (3 * projection,)
        shapes[p + "attn.c_proj.weight"] = (hidden, projection)
        shapes[p + "ln_2.weight"] = (hidden,)
        shapes[p + "mlp.w1.weight"] = (ff, hidden)
        shapes[p + "mlp.w2.weight"] = (ff, hidden)
        shapes[p + "mlp.c_proj.weight"] = (hidden, ff)
    shapes["transformer.ln_f.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)

    vis = config.visual_config
    w, out, mlp, nq = vis.width, vis.output_dim, vis.mlp_width, vis.n_queries
    v = VISUAL_PREFIX
    shapes[v + "conv1.weight"] = (w, 3, vis.patch_size, vis.patch_size)
    shapes[v + "positional_embedding"] = (POSITION_TABLE_SIZE, w)
    shapes[v + "ln_pre.weight"] = (w,)
    shapes[v + "ln_pre.bias"] = (w,)
    for i in range(vis.layers):
        p = f"{v}transformer.resblocks.{i}."
        shapes[p + "ln_1.weight"] = (w,)
        shapes[p + "ln_1.bias"] = (w,)
        shapes[p + "attn.in_proj.weight"] = (3 * w, w)
        shapes[p + "attn.in_proj.bias"] = (3 * w,)
        shapes[p + "attn.out_proj.weight"] = (w, w)
        shapes[p + "attn.out_proj.bias"] = (w,)
        shapes[p + "ln_2.weight"] = (w,)
        shapes[p + "ln_2.bias"] = (w,)
        shapes[p + "mlp.c_fc.weight"] = (mlp, w)
        shapes[p + "mlp.c_fc.bias"] = (mlp,)
        shapes[p + "mlp.c_proj.weight"] = (w, mlp)
        shapes[p + "mlp.c_proj.bias"] = (w,)
    pool = v + "attn_pool."
    shapes[pool + "query"] = (nq, out)
    shapes[pool + "pos_embed"] = (nq, out)
    if w != out:
        # The resampler projects the ViT width to output_dim only when they differ.
        shapes[pool + "kv_proj.weight"] = (out, w)
    shapes[pool + "attn.in_proj_weight"] = (3 * out, out)
    shapes[pool + "attn.in_proj_bias"] = (3 * out,)
    shapes[pool + "attn.out_proj.weight"] = (out, out)
    shapes[pool + "attn.out_proj.bias"] = (out,)
    shapes[pool + "ln_q.weight"] = (out,)
    shapes[pool + "ln_q.bias"] = (out,)
    shapes[pool + "ln_kv.weight"] = (out,)
    shapes[pool + "ln_kv.bias"] = (out,)
    shapes[v + "ln_post.weight"] = (out,)
    shapes[v + "ln_post.bias"] = (out,)
    # A bare parameter used as `x @ proj`, i.e. stored [in, out].
    shapes[v + "proj"] = (out, out)
    return shapes


def vllm_parameter_for(checkpoint_name: str) -> tuple[str, int | None]:
    """The vLLM parameter a checkpoint tensor loads into, and its shard of a fused parameter.

    `None` as shard means the tensor fills the whole parameter (the fused `c_attn` [Q; K; V]
    included: vLLM's QKVParallelLinear splits and shards it itself).
    """
    match = _MLP_GATE_UP.match(checkpoint_name)
    if match:
        prefix, branch, suffix = match.groups()
        return f"{prefix}gate_up_proj{suffix}", _GATE_UP_SHARD[branch]
    return checkpoint_name, None


def check_tensor(
    name: str, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]]
) -> None:
    """Raise `CheckpointError` naming `name` if it is not a tensor of the layout or has the
    wrong shape."""
    if name not in expected:
        raise CheckpointError(
            f"unexpected tensor {name!r} in the checkpoint: not part of the Qwen-VL layout for "
            "this config (quantized or differently shaped checkpoints are not supported)"
        )
    if tuple(shape) != expected[name]:
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(shape)}, the config implies {expected[name]}"
        )


def check_complete(seen: set[str], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise `CheckpointError` listing the tensors of the layout the checkpoint lacked."""
    missing = [name for name in expected if name not in seen]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise CheckpointError(f"tensors missing from the checkpoint: {shown}{more}")
