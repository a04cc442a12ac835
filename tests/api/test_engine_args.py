"""Settings onto vLLM's engine arguments (no engine is started)."""

from __future__ import annotations

import pytest

from server.cli import parse_settings
from server.engine.vllm_engine import engine_args_from_settings


def test_engine_options_reach_vllm_and_unset_ones_keep_vllms_defaults(tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    model = str(tmp_path)
    settings = parse_settings(["--model", model, "--max-num-seqs", "7", "--mm-processor-cache-type", "shm",
                               "--mm-processor-cache-gb", "0.5",
                               "--no-enable-prefix-caching", "--limit-mm-per-prompt", "2"])
    args = engine_args_from_settings(settings, model, "cpu")
    assert args.max_num_seqs == 7 and args.enable_prefix_caching is False
    assert args.mm_processor_cache_type == "shm" and args.limit_mm_per_prompt == {"image": 2}
    assert args.mm_processor_cache_gb == 0.5
    assert args.enforce_eager is True  # CPU default

    plain = engine_args_from_settings(parse_settings(["--model", model]), model, "cpu")
    defaults = AsyncEngineArgs(model=model)
    assert plain.mm_processor_cache_type == defaults.mm_processor_cache_type
    assert plain.mm_processor_cache_gb == defaults.mm_processor_cache_gb
    assert plain.enable_prefix_caching == defaults.enable_prefix_caching


def test_an_unknown_processor_cache_type_is_refused():
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--mm-processor-cache-type", "disk"])
    assert exc.value.code == 2
