"""Seeded sampling on vLLM's CPU model runner, made to survive a chunked prefill.

A request whose prompt is prefilled over several engine steps (longer than the step's token
budget, or sharing a step with other prompts) still has a token sampled in each step but the
last, and vLLM throws those tokens away. For a request with its own random generator (a
`seed` at a temperature above 0) it then winds the generator back by what the sample used:
`generator.set_offset(generator.get_offset() - 4)`, which only a CUDA (Philox) generator has.
On the CPU build that call raises in the model worker, and the engine dies with every request
in it: one client sending `seed` and a long prompt took the server down.

Here the CPU model runner saves, just before it samples, the state of the generator of each
request whose token will be thrown away, and after the step puts that state back instead of
vLLM's wind-back (those generators are kept out of vLLM's reach for the step). A chunked
prompt then leaves its generator where it found it, so a seeded answer is the same whether
its prompt was prefilled in one step or in several.

`install()` is called by the project's vLLM plugin (`server.qwen_vl.plugin`), which vLLM
runs in each of its processes; it patches only in the child processes of a CPU build (the
engine core and its model workers, where the runner lives), once.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

_SAVED = "_qwenvl_generator_states"


def install() -> bool:
    """Patch vLLM's CPU model runner (see the module doc); True if it is patched now. A
    no-op outside vLLM's child processes and on other platforms."""
    if multiprocessing.parent_process() is None:  # (the API server: no model runner here)
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    patch_runner(CPUModelRunner)
    return True


def patch_runner(runner_cls: type) -> None:
    """Wrap `runner_cls._sample` and `_bookkeeping_sync` (idempotent)."""
    if getattr(runner_cls, "_qwenvl_seeded_sampling", False):
        return
    sample = runner_cls._sample
    bookkeeping = runner_cls._bookkeeping_sync

    def _sample(self, *args: Any, **kwargs: Any):
        setattr(self, _SAVED, _states_to_keep(self))
        return sample(self, *args, **kwargs)

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any):
        saved = getattr(self, _SAVED, None)
        setattr(self, _SAVED, None)
        if not saved:
            return bookkeeping(self, *args, **kwargs)
        generators = self.input_batch.generators
        held = {i: generators.pop(i) for i in saved if i in generators}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            for i, generator in held.items():
                generator.set_state(saved[i])
                generators[i] = generator

    runner_cls._sample = _sample
    runner_cls._bookkeeping_sync = _bookkeeping_sync
    runner_cls._qwenvl_seeded_sampling = True


def _states_to_keep(runner) -> dict[int, Any]:
    """The state of each generator whose request's sampled token this step throws away."""
    generators = runner.input_batch.generators
    if not generators:
        return {}
    num_reqs = runner.input_batch.num_reqs
    discarded = runner.discard_request_mask.np[:num_reqs].nonzero()[0]
    return {int(i): generators[int(i)].get_state() for i in discarded if int(i) in generators}
