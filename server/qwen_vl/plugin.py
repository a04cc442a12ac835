"""vLLM general-plugin entry point: registers the first-generation Qwen-VL architecture.

vLLM calls `register()` in every process it starts (API server, engine core, workers), before
it reads a model's config. Three registrations make a published Qwen-VL checkpoint load with
`trust_remote_code` off and without importing any `*.py` file shipped with it:

- `AutoConfig`: model type `qwen` -> `QWenConfig`;
- `AutoTokenizer`: `QWenConfig` -> `QWenTokenizer` (the class name the checkpoints'
  tokenizer_config.json names, so transformers resolves it to this class, not to auto_map);
- vLLM's `ModelRegistry`: `QWenLMHeadModel` (the checkpoints' architecture) and
  `QwenVLForConditionalGeneration` -> `server.qwen_vl.model:QwenVLForConditionalGeneration`,
  as a lazy `module:Class` string (the model module, torch-heavy, is imported only where vLLM
  builds or inspects the model; its multimodal processor registers itself on import).

Every registration overwrites the previous one for the same key, so calling this again is
harmless. It imports transformers and tiktoken (already loaded in any vLLM process), not torch.

The same hook, being the one piece of this project that runs in vLLM's engine core and model
workers, starts `server.engine.parent_watch` there (which does nothing in other processes)
and lets seeded sampling survive a chunked prefill on the CPU build
(`server.engine.seeded_sampling`).
"""

from __future__ import annotations

ARCHITECTURES = ("QWenLMHeadModel", "QwenVLForConditionalGeneration")
MODEL_CLASS = "server.qwen_vl.model:QwenVLForConditionalGeneration"


def register() -> None:
    """Register Qwen-VL with transformers' Auto classes and vLLM. Cheap and re-entrant."""
    from transformers import AutoConfig, AutoTokenizer

    from server.engine.parent_watch import watch_parent
    from server.engine.seeded_sampling import install as install_seeded_sampling
    from server.qwen_vl.config import QWenConfig
    from server.qwen_vl.tokenizer import QWenTokenizer
    from vllm import ModelRegistry

    AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)
    AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, MODEL_CLASS)
    watch_parent()
    install_seeded_sampling()
