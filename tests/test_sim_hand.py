"""Tiny workloads whose TTFT, queueing and preemptions are worked out by hand.

Unless a test says otherwise, the GPU is made infinitely fast and every step costs a fixed
1 s (``step_overhead_s = 1``), so "time" below counts steps: a token computed in step k is
done at t = k. Each test spells out the schedule it expects, step by step, as vLLM v1's
scheduler would run it.
"""

from __future__ import annotations

import pytest

from memshare.sim.config import (
    ArrivalSpec,
    CostCoefficients,
    GpuSpec,
    KVBudget,
    SchedulerConfig,
    SimConfig,
    load_model,
)
from memshare.sim.cost_model import BatchShape, CostModel
from memshare.sim.run import LoadedTrace, RunOutput, run_config
from memshare.sim.workload import SimRequest
from memshare.traces.schema import Manifest, RequestRecord

INSTANT = GpuSpec("instant", peak_flops=1e30, mem_bandwidth=1e30, memory=2**40)
ONE_SECOND = CostCoefficients(step_overhead_s=1.0, seq_overhead_s=0.0)


def run(
    records: list[RequestRecord],
    *,
    block_size: int,
    budget: int,
    kv: KVBudget | None = None,
    policy: str = "none",
    unit_steps: bool = True,
) -> RunOutput:
    cfg = SimConfig(
        trace="<memory>",
        policy=policy,
        model=load_model("smollm2-135m"),
        gpu=INSTANT if unit_steps else SimConfig("x").gpu,
        cost=ONE_SECOND if unit_steps else SimConfig("x").cost,
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16),
        kv=kv or KVBudget(unlimited=True),
        block_size=block_size,
        arrival=ArrivalSpec(),
        check_invariants=True,
    )
    manifest = Manifest(kind="workload", block_size=block_size)
    return run_config(cfg, LoadedTrace.of(records, manifest))


def rec(rid: str, arrival: float, prompt: int, output: int, token: int) -> RequestRecord:
    """A request whose prompt is ``prompt`` copies of ``token`` (distinct blocks per token)."""
    return RequestRecord(rid, arrival, prompt, output, prompt_ids=[token] * prompt)


def by_id(out: RunOutput) -> dict[str, SimRequest]:
    return {r.rid: r for r in out.result.requests}


def test_one_request_alone() -> None:
    # prompt 100, budget 64 tokens/step: step 1 computes 64, step 2 the last 36 and samples
    # the first token (t = 2); 4 more tokens take steps 3..6.
    out = run([rec("a", 0.0, 100, 5, 1)], block_size=16, budget=64)
    (a,) = out.result.requests
    assert (a.first_scheduled, a.first_token, a.finish) == (0.0, 2.0, 6.0)
    m = out.metrics
    assert m["latency_s"]["ttft"]["p50"] == 2.0
    assert m["latency_s"]["tpot"]["p50"] == 1.0  # (6 - 2) / (5 - 1)
    assert m["latency_s"]["e2e"]["p50"] == 6.0
    assert m["latency_s"]["queue"]["p50"] == 0.0
    assert out.result.timeline.scheduled_tokens == [64, 36, 1, 1, 1, 1]
    # KV of 100 prompt + 4 decoded tokens (the last sampled token is never fed back) = 7 blocks
    assert m["kv"]["peak_blocks_in_use"] == 7.0
    assert m["preemptions"] == 0
    assert m["throughput"]["output_tokens_per_s"] == pytest.approx(5 / 6)


def test_one_request_alone_roofline_time() -> None:
    # The same request on the default H100 roofline: its TTFT is the sum of the cost model's
    # times for the two prefill steps, whose batch shapes are worked out here by hand.
    out = run([rec("a", 0.0, 100, 5, 1)], block_size=16, budget=64, unit_steps=False)
    cfg = out.config
    cost = CostModel(cfg.model, cfg.gpu, cfg.cost)
    step1 = BatchShape(
        num_seqs=1,
        num_tokens=64,
        num_sampled=0,
        prefill_seqs=1,
        prefill_tokens=64,
        prefill_pairs=64 * (0 + 65 / 2),
        prefill_kv_tokens=64,
    )
    step2 = BatchShape(
        num_seqs=1,
        num_tokens=36,
        num_sampled=1,
        prefill_seqs=1,
        prefill_tokens=36,
        prefill_pairs=36 * (64 + 37 / 2),
        prefill_kv_tokens=100,
    )
    (a,) = out.result.requests
    assert a.first_token == pytest.approx(cost.step_time(step1) + cost.step_time(step2))
    decode = [
        cost.step_time(BatchShape(1, 1, 1, decode_seqs=1, decode_kv_tokens=101 + k))
        for k in range(4)
    ]
    assert a.finish == pytest.approx(a.first_token + sum(decode))
    assert out.result.timeline.dt_s[0] == cost.step_time(step1)


def test_two_requests_contend_for_the_last_block() -> None:
    # block 4 tokens, budget 5 blocks. a and b: 8-token prompts (2 blocks each), 6 outputs.
    # step 1: both prefill (4 blocks used), both sample token 1 at t=1.
    # step 2: a's token 9 needs a 3rd block: takes the last one. b's needs one too: none is
    #   free, so the newest running request (b itself) is preempted (blocks freed, back to the
    #   front of the waiting queue); no admission in a step that preempted.
    # steps 3..6: a decodes (its 4th block at step 6, token 13); b would need 3 blocks to
    #   recompute its 8 + 1 tokens but at most 2 are free: it waits.
    # a samples its 6th token at t=6, finishes and frees its 4 blocks.
    # step 7: b is admitted and recomputes 9 tokens (3 blocks), sampling token 2; tokens 3..6
    #   at steps 8..11.
    out = run(
        [rec("a", 0.0, 8, 6, 1), rec("b", 0.0, 8, 6, 2)],
        block_size=4,
        budget=64,
        kv=KVBudget(blocks=5),
    )
    reqs = by_id(out)
    a, b = reqs["a"], reqs["b"]
    assert (a.first_token, a.finish, a.preemptions) == (1.0, 6.0, 0)
    assert (b.first_token, b.finish, b.preemptions) == (1.0, 11.0, 1)
    tl = out.result.timeline
    assert tl.preempted == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert tl.scheduled_tokens == [16, 1, 1, 1, 1, 1, 9, 1, 1, 1, 1]
    assert tl.waiting == [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    m = out.metrics
    assert m["preemptions"] == 1
    # all 5 blocks were held only for a moment inside step 2's scheduling (b then freed its
    # 2); blocks in use are sampled per step, as the step ran: a's 4 at step 6.
    assert m["kv"]["peak_blocks_in_use"] == 4.0
    assert m["latency_s"]["e2e"]["p50"] == pytest.approx(8.5)  # median of 6 and 11


def test_budget_blocks_one_request_never_fitting_is_rejected() -> None:
    # 5 blocks hold 20 tokens; a 30-token prompt can never run: rejected at arrival, not run.
    out = run(
        [rec("big", 0.0, 30, 2, 1), rec("ok", 0.0, 8, 2, 2)],
        block_size=4,
        budget=64,
        kv=KVBudget(blocks=5),
    )
    reqs = by_id(out)
    assert reqs["big"].rejected and reqs["ok"].finish == 2.0
    assert out.metrics["requests"]["rejected"] == 1


def test_chunked_prefill_of_a_long_prompt_beside_decodes() -> None:
    # budget 16 tokens/step. d: prompt 4, 10 outputs, arrives at 0. l: prompt 40, 2 outputs,
    # arrives at 1.5, during step 2, and waits for the step to end.
    # step 1 (t 0-1): d prefills 4 -> token 1 at t=1.
    # step 2 (1-2):   d decodes.
    # step 3 (2-3):   d decodes (1 token); l is admitted with the 15 tokens left (queue 0.5 s).
    # step 4 (3-4):   d 1, l 15 (30 done).
    # step 5 (4-5):   d 1, l the last 10 -> l's first token at t=5: TTFT = 5 - 1.5 = 3.5.
    # step 6 (5-6):   d 1, l decodes its 2nd token and finishes at t=6.
    # steps 7-10:     d alone; its 10th token at t=10.
    out = run([rec("d", 0.0, 4, 10, 1), rec("l", 1.5, 40, 2, 2)], block_size=4, budget=16)
    reqs = by_id(out)
    d, long_ = reqs["d"], reqs["l"]
    assert long_.first_scheduled == 2.0
    assert long_.first_token - long_.arrival == 3.5
    assert long_.finish == 6.0
    assert (d.first_token, d.finish) == (1.0, 10.0)
    tl = out.result.timeline
    assert tl.scheduled_tokens == [4, 1, 16, 16, 11, 2, 1, 1, 1, 1]
    assert tl.prefill_tokens == [4, 0, 15, 15, 10, 0, 0, 0, 0, 0]
    assert tl.decode_seqs == [0, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    m = out.metrics
    assert m["latency_s"]["queue"]["p99"] == pytest.approx(0.5, abs=0.01)
    assert m["latency_s"]["tpot"]["n"] == 2


def test_prefix_hit_at_admission_shortens_the_prefill() -> None:
    # Two requests with the same 30-token prompt (block 8, budget 64). a runs alone (steps 1-2,
    # publishing its 3 full prompt blocks). b arrives at t=5 when the engine is idle; at its
    # admission the prefix lookup hits the 3 full blocks (24 tokens), so its prefill step
    # computes only the 6-token tail (step 3, first token at t=6), then one decode step.
    out = run(
        [rec("a", 0.0, 30, 2, 7), rec("b", 5.0, 30, 2, 7)],
        block_size=8,
        budget=64,
        policy="prefix",
    )
    reqs = by_id(out)
    assert reqs["b"].hit_tokens == 24 and reqs["b"].hit_blocks == 3
    assert (reqs["b"].first_scheduled, reqs["b"].first_token, reqs["b"].finish) == (5, 6, 7)
    assert out.result.timeline.scheduled_tokens == [30, 1, 6, 1]
    assert out.metrics["prefix_cache"]["token_hit_rate"] == pytest.approx(24 / 60)
    assert out.metrics["prefix_cache"]["block_hit_rate"] == pytest.approx(3 / 6)
