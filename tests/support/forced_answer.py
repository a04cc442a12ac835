"""A vLLM logits processor for engine tests, loaded into a real server with
`--logits-processors support.forced_answer:ForcedAnswer` (it runs in the engine's processes,
so it lives in an importable module; the server's environment puts tests/ on PYTHONPATH).

A request with `seed` FORCE_SEED samples exactly the token ids listed in the environment
variable FORCED_TOKEN_IDS (comma-separated), then keeps repeating the last one; every other
request is left alone. A test can thus drive a known answer (a grounding box, say) through
the real engine, detokenizer and HTTP server of a random-weight checkpoint."""

from __future__ import annotations

import os

import torch

from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FORCE_SEED = 424242
ENV = "FORCED_TOKEN_IDS"


class ForcedAnswer(AdapterLogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.ids = [int(i) for i in os.environ.get(ENV, "").split(",") if i]

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        if params.seed != FORCE_SEED or not self.ids:
            return None
        ids = self.ids

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            out = torch.full_like(logits, float("-inf"))
            out[ids[min(len(output_ids), len(ids) - 1)]] = 0.0
            return out

        return force
