"""Test helpers that run inside vLLM's engine processes (so they live in an importable module:
the engine pickles them by reference).

- `ForceTokens`, a logits processor: a request whose
  `SamplingParams.extra_args["force_token_ids"]` is set samples exactly those ids (then keeps
  repeating the last one), whatever the random weights say. Lets a test drive the real engine
  and detokenizer through a known text.
- `run_vision_tower`, for `apply_model`: the model's vision tower on given pixels.
"""

from __future__ import annotations

import torch

from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor


class ForceTokens(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        forced = (params.extra_args or {}).get("force_token_ids")
        if not forced:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            target = forced[min(len(output_ids), len(forced) - 1)]
            out = torch.full_like(logits, float("-inf"))
            out[target] = 0.0
            return out

        return force


def run_vision_tower(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.transformer.visual(pixels).float().cpu()
