"""Build the vLLM Qwen-VL model for a checkpoint directory on the meta device and feed its
`load_weights` meta tensors of the checkpoint's names and shapes; print a JSON summary.

Run as a script (in its own process: it initializes torch.distributed and vLLM's parallel
state, which must not leak into the test process):

    python meta_load.py CHECKPOINT_DIR

Nothing is allocated, so this works for the full-size 9.7B-parameter config.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meta_weights(shapes: dict[str, tuple[int, ...]]):
    return [(n, torch.empty(s, dtype=torch.bfloat16, device="meta")) for n, s in shapes.items()]


def _error_of(model, weights) -> str:
    try:
        model.load_weights(iter(weights))
    except Exception as exc:  # noqa: BLE001 - report whatever the loader raised
        return f"{type(exc).__name__}: {exc}"
    return ""


def main(checkpoint: Path) -> dict:
    from server.qwen_vl.checkpoint import checkpoint_tensor_shapes
    from server.qwen_vl.model import QwenVLForConditionalGeneration
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs

    vllm_config = EngineArgs(
        model=str(checkpoint), skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16"
    ).create_engine_config()
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
            local_rank=0,
            backend="gloo",
        )
        initialize_model_parallel(1, 1)
        with torch.device("meta"):
            model = QwenVLForConditionalGeneration(vllm_config=vllm_config)

    shapes = checkpoint_tensor_shapes(vllm_config.model_config.hf_config)
    parameters = {name for name, _ in model.named_parameters()}
    loaded = model.load_weights(iter(_meta_weights(shapes)))

    weights = _meta_weights(shapes)
    dropped = weights.pop(len(weights) // 2)[0]
    bogus = ("transformer.h.0.mlp.w3.weight", torch.empty(4, 4, device="meta"))
    first_name, first_tensor = _meta_weights(shapes)[0]
    return {
        "architecture": vllm_config.model_config.architectures,
        "max_model_len": vllm_config.model_config.max_model_len,
        "num_checkpoint_tensors": len(shapes),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "loaded_equals_parameters": loaded == parameters,
        "params_not_loaded": sorted(parameters - loaded),
        "dropped": dropped,
        "missing_error": _error_of(model, weights),
        "unexpected_error": _error_of(model, _meta_weights(shapes) + [bogus]),
        "bad_shape_error": _error_of(
            model, [(first_name, first_tensor[:-1])] + _meta_weights(shapes)[1:]
        ),
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(Path(sys.argv[1]))))
