"""``memshare bench engine --vs vllm`` (issue 24): real vLLM's CPU build timed on the same
prompts and output lengths as HF ``generate`` and the paged engine, greedy; both produce the
same tokens. Marker ``vllm`` (.venv-vllm). A small run: the figures are printed, never judged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_cli import memshare_process as memshare
from helpers_cli import ok

pytestmark = pytest.mark.vllm


def test_bench_engine_vs_vllm_times_all_three_on_the_same_work(model_cache: Path) -> None:
    res = memshare(
        "bench", "engine", "--vs", "vllm", "--repeats", "1", "--batch", "3",
        "--concurrency", "2", "--max-new-tokens", "12", "--json",
    )  # fmt: skip
    figures = json.loads(ok(res))
    print(json.dumps({k: figures[k] for k in ("batch_1", "mixed_3", "mixed_3_at_2")}))
    for label, requests in (("batch_1", 1), ("mixed_3", 3), ("mixed_3_at_2", 3)):
        f = figures[label]
        for key in ("hf_tokens_per_s", "engine_tokens_per_s", "vllm_tokens_per_s"):
            assert f[key] > 0, (label, key)
        assert f["engine_over_vllm"] > 0 and len(f["vllm_s"]) == 1
        assert f["vllm_same_tokens"] == f"{requests} of {requests} requests", (label, f)
    assert figures["decode_step"]["over_weights_once"] > 0
