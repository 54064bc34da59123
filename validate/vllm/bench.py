"""Real vLLM in ``memshare bench engine --vs vllm``: the same prompts, output lengths and
weights as the paged engine and HF ``generate``, timed the same way (docs/paged-kv.md).

One in-process ``vllm.LLM`` (the CPU build) on the loaded model's safetensors folder, fp32,
prefix caching off (the engine's ``none`` caches nothing), block size 32 (the CPU kernel's
smallest), the paged engine's scheduler limits (:class:`~memshare.scheduler.SchedulerConfig`
defaults, ``max_num_seqs`` the largest batch asked for) and KV for every request at once.
A run serves its prompts greedily with ``ignore_eos`` and exactly the asked output lengths,
at most ``seqs`` in flight (a closed loop: the next prompt joins when one finishes, as the
engine refills a slot), stepped by :func:`~memshare.validate.vllm.engine.run_engine`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memshare.scheduler import SchedulerConfig
from memshare.traces.capture.vllm import kv_bytes_per_token
from memshare.validate.vllm.engine import VllmSettings, VllmSpec, open_engine, run_engine

BLOCK = 32  # tokens per vLLM KV block (the CPU attention's smallest)


@dataclass
class VllmRuns:
    """An engine that serves the benchmark's runs (see the module docstring)."""

    llm: Any
    start_s: float  # seconds vLLM took to start

    def __call__(
        self, prompts: Sequence[list[int]], lengths: Sequence[int], seqs: int
    ) -> tuple[float, list[list[int]]]:
        """Seconds to serve ``prompts`` (``lengths[i]`` tokens each, at most ``seqs`` at a
        time) and each one's output ids."""
        specs = [
            VllmSpec(f"b{i}", p, n) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]
        t = time.perf_counter()
        run = run_engine(self.llm, specs, clients=seqs)
        return time.perf_counter() - t, [r.output_ids for r in run.requests]


def vllm_runs(backend: Any, max_seqs: int, max_tokens: int) -> VllmRuns:
    """vLLM on ``backend``'s model (a :class:`~memshare.traces.model.loader.LoadedModel`) for
    batches of up to ``max_seqs`` requests of at most ``max_tokens`` tokens each."""
    longest = -(-max_tokens // BLOCK) * BLOCK
    t = time.perf_counter()
    llm = open_engine(
        VllmSettings(
            folder=backend.folder,
            block_size=BLOCK,
            num_blocks=max_seqs * (longest // BLOCK),
            scheduler=SchedulerConfig(max_num_seqs=max_seqs),
            prefix_caching=False,
            max_model_len=longest,
            kv_bytes_per_token=kv_bytes_per_token(backend.model_info()),
        )
    )
    return VllmRuns(llm, time.perf_counter() - t)
