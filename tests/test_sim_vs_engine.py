"""One scheduler, two executors: the simulator and the paged engine make the same decisions.

The same requests (shared prefixes, a KV budget that preempts) run through the simulator
(SimPy, cost model) and through the real engine (a tiny seeded Qwen2 model, the trace's output
tokens forced as the sampled ones, as a replay does). Step by step, the batches (sequences,
tokens) and the pages in use (live and cached) must be identical for lossless policies:
anything else would be a second implementation hiding in one of the executors.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from helpers_models import tiny_model

from memshare.block_pool import BlockPool
from memshare.kv_manager import KVCacheManager
from memshare.registry import make_policy
from memshare.scheduler import Scheduler, SchedulerConfig
from memshare.sim.config import CostCoefficients, load_gpu, load_model, parse_arrival
from memshare.sim.cost_model import CostModel
from memshare.sim.engine import Engine
from memshare.sim.workload import build_requests
from memshare.traces.schema import Manifest, RequestRecord

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BS = 16
LAYERS = 3


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model("qwen2", LAYERS)


def workload(n: int = 12, seed: int = 0, passages: bool = False) -> list[RequestRecord]:
    """Shared system prompts; with ``passages``, also a shared passage at shifting positions
    (what ``kvshare`` reuses)."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 256, size=48).tolist() for _ in range(3)]
    passage = rng.integers(0, 256, size=40).tolist()
    out = []
    for i in range(n):
        prompt = systems[i % 3] + rng.integers(0, 256, size=int(rng.integers(3, 40))).tolist()
        if passages:
            prompt += passage + rng.integers(0, 256, size=int(rng.integers(1, 9))).tolist()
        output = rng.integers(0, 256, size=int(rng.integers(1, 40))).tolist()
        out.append(RequestRecord(f"r{i}", 0.0, len(prompt), len(output), prompt, output))
    return out


@pytest.mark.parametrize(
    ("policy", "blocks", "reserve"),
    [
        ("none", 400, True),
        ("prefix", 400, True),
        pytest.param("prefix", 14, True, marks=pytest.mark.slow),  # tight budgets: many steps
        pytest.param("prefix", 14, False, marks=pytest.mark.slow),
        ("kvshare", 400, True),
        pytest.param("kvshare", 18, True, marks=pytest.mark.slow),
        pytest.param("kvshare", 18, False, marks=pytest.mark.slow),
    ],
)
def test_simulator_and_engine_take_identical_steps(
    policy: str, blocks: int, reserve: bool, model: Any
) -> None:
    """``reserve``: admit only whole prompts (vLLM 0.32's default); without it a tight budget
    admits first chunks it cannot finish, and preempts."""
    from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine

    records = workload(passages=policy == "kvshare")
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=6, reserve_full_prompt=reserve)
    manifest = Manifest(kind="workload", block_size=BS)
    reqs = build_requests(records, manifest, BS)
    mgr = KVCacheManager(BlockPool(blocks, num_layers=LAYERS), make_policy(policy), BS)
    sim = Engine(
        reqs,
        Scheduler(cfg, mgr),
        CostModel(load_model("smollm2-135m"), load_gpu("h100"), CostCoefficients()),
        parse_arrival("trace"),
        trace_times=[r.arrival_s for r in records],
    ).run()
    tl = sim.timeline
    predicted = list(
        zip(
            tl.scheduled_seqs,
            tl.scheduled_tokens,
            tl.live_pages,
            [a + b for a, b in zip(tl.live_pages, tl.cached_pages, strict=True)],
            strict=True,
        )
    )
    specs = [
        EngineSpec(r.id, r.prompt_ids or [], r.output_len, forced=r.output_ids) for r in records
    ]
    engine = PagedEngine(
        copy.deepcopy(model),
        make_policy(policy),
        specs,
        EngineOptions(kv_blocks=blocks, scheduler=cfg),
    )
    engine.run()
    measured = [(s.seqs, s.computed, s.live_pages, s.used_pages) for s in engine.steps]
    assert measured == predicted
    assert engine.scheduler.num_preemptions == sim.preemptions
    if blocks < 20 and not reserve:
        assert sim.preemptions > 0
    if blocks >= 20:
        assert sim.preemptions == 0
    if policy == "kvshare":  # spans were copied by the engine, and charged as copies
        assert len(engine.reuses) > 0
        reused = sum(x.length for x in engine.reuses)
        assert reused == mgr.stats.reused_tokens > 0
        assert sum(s.tokens - s.computed for s in engine.steps) == reused
    assert engine.manager.stats == mgr.stats  # hits, blocks, pages: every counter
    assert [r.output_ids for r in engine.requests] == [r.output_ids for r in records]
