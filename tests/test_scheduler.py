"""The shared scheduler driven directly: no simulator, no engine, no clock.

Requests are the engine's kind (token ids known, sampled one by one); "sampling" here is a
fixed rule, so every assertion is about the scheduler, the manager and the policy alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from memshare.block_pool import BlockPool
from memshare.hashing import chain_hashes
from memshare.kv_manager import KVCacheManager
from memshare.policy import FullBlock
from memshare.registry import make_policy
from memshare.request import Request, new_request, resumed_info
from memshare.scheduler import Scheduler, SchedulerConfig, StepPlan

BS = 4
L = 2


def scheduler(policy: str = "none", blocks: int = 64, **cfg: Any) -> Scheduler:
    pool = BlockPool(num_blocks=blocks, num_layers=L)
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(pool, make_policy(policy), BS))


def sampled(plan: StepPlan, token: int = 7) -> list[int | None]:
    """Every sampling chunk samples ``token + its request's output count``."""
    return [token + c.req.num_output if c.samples else None for c in plan.chunks]


def drain(s: Scheduler, token: int = 7) -> list[StepPlan]:
    plans = []
    while not s.idle:
        plan = s.schedule()
        assert not plan.empty
        assert plan.num_tokens <= s.cfg.max_num_batched_tokens
        assert len(s.running) <= s.cfg.max_num_seqs
        s.complete(plan, sampled(plan, token))
        s.manager.pool.check(s.manager.table_refs())
        plans.append(plan)
    return plans


def test_sampled_tokens_extend_the_hashes_and_stop_ids_end_requests() -> None:
    s = scheduler()
    a = new_request("a", [1, 2, 3, 4, 5, 6], BS, 20, stop_ids=frozenset({9}))
    b = new_request("b", [1, 2, 3], BS, 5)
    s.add(a)
    s.add(b)
    drain(s)
    assert a.output_ids == [7, 8, 9] and a.finish_reason == "stop"  # 9 is a stop id
    assert b.output_ids == [7, 8, 9, 10, 11] and b.finish_reason == "length"
    for r in (a, b):
        assert r.token_ids is not None
        assert r.hashes == chain_hashes(r.token_ids, BS)  # extended as tokens arrived
    assert not s.manager.requests and s.manager.pool.pinned_pages == 0


def test_plan_lists_chunks_with_their_first_position() -> None:
    s = scheduler(max_num_batched_tokens=6)
    r = new_request("r", list(range(10)), BS, 2)
    s.add(r)
    plans = drain(s)
    chunks = [(c.start, c.num_tokens, c.samples) for p in plans for c in p.chunks]
    assert chunks == [(0, 6, False), (6, 4, True), (10, 1, True)]


def blocks_of(tokens: np.ndarray, rid: str) -> object:
    """A FullBlock source whose sketch is a function of the block's tokens only."""

    def info(i: int) -> FullBlock:
        t = tokens[i * BS : (i + 1) * BS]
        sk = np.repeat(t.astype(np.float32)[None, None, :], L, 0).repeat(2, 1)
        return FullBlock(rid, i, None, t, 0, sk, np.full((L, 2), float(np.linalg.norm(t))))

    return info


def test_sharing_decisions_wait_for_commit_after_the_step() -> None:
    s = scheduler("token-dedup")
    mgr = s.manager
    prompt = [5, 6, 7, 8, 1, 2, 3, 4, 1, 2, 3, 4]  # blocks 1 and 2 hold the same tokens
    r = new_request("r", prompt, BS, 1)
    r.block_info = blocks_of(np.asarray(prompt), "r")  # type: ignore[assignment]
    s.add(r)
    plan = s.schedule()
    table = mgr.requests["r"].table
    assert len({b.block_id for b in table}) == 3  # reserved: three blocks of its own
    used = mgr.pool.used_pages
    s.complete(plan, sampled(plan))
    assert r.finished  # one token, then freed; the share happened before
    assert mgr.stats.shared_blocks == 1 and mgr.stats.full_blocks == 3
    assert used == 3 * 2 * L


def test_prefix_publishes_at_reservation_like_vllm() -> None:
    s = scheduler("prefix")
    prompt = list(range(12))
    a, b = new_request("a", prompt, BS, 1), new_request("b", prompt, BS, 1)
    s.add(a)
    plan = s.schedule()  # a's blocks are reserved and published in this step
    s.complete(plan, sampled(plan))
    s.add(b)
    s.schedule()
    # vLLM looks up whole blocks within the first 11 tokens: the last block is recomputed
    assert b.hit_tokens == 8 and b.hit_blocks == 2
    c = new_request("c", prompt, BS, 1)
    d = new_request("d", prompt, BS, 1)
    s2 = scheduler("prefix")
    s2.add(c)
    s2.add(d)
    s2.schedule()  # same step: d hits what c reserved (c writes before d reads, per layer)
    assert d.hit_tokens == 8


def test_preempted_request_recomputes_prompt_and_generated_tokens() -> None:
    s = scheduler("prefix", blocks=7)
    a = new_request("a", list(range(8)), BS, 12)
    b = new_request("b", list(range(100, 108)), BS, 12)
    s.add(a)
    s.add(b)
    drain(s)
    assert s.num_preemptions >= 1
    for r in (a, b):
        assert r.output_ids == list(range(7, 19)) and r.finish_reason == "length"
        assert r.hashes == chain_hashes(r.token_ids or [], BS)
    loser = b if b.preemptions else a
    info = resumed_info(loser)
    assert info.prompt_len == loser.num_tokens
    assert list(info.block_hashes) == loser.hashes  # generated blocks are looked up too


@pytest.mark.parametrize("policy", ["none", "prefix", "token-dedup", "exact-dedup"])
def test_random_workload_keeps_every_invariant(policy: str) -> None:
    rng = np.random.default_rng(3)
    s = scheduler(policy, blocks=40, max_num_batched_tokens=24, max_num_seqs=5)
    reqs: list[Request] = []
    for i in range(30):
        shared = list(rng.integers(0, 3, size=8))  # much repetition: hits and shares
        prompt = shared + list(rng.integers(0, 50, size=int(rng.integers(1, 20))))
        r = new_request(f"r{i}", [int(t) for t in prompt], BS, int(rng.integers(1, 12)))
        r.block_info = blocks_of(np.asarray(r.token_ids), r.rid)  # type: ignore[assignment]
        reqs.append(r)
        s.add(r)
    drain(s)
    assert all(r.finished and r.num_output == r.max_tokens for r in reqs)
    assert not s.manager.requests and s.manager.pool.pinned_pages == 0


def hashed_blocks(r: Request) -> Callable[[int], FullBlock]:
    """A FullBlock source with the request's chained hashes and tokens (as they arrive)."""

    def info(i: int) -> FullBlock:
        toks = np.asarray((r.token_ids or [])[i * BS : (i + 1) * BS])
        return FullBlock(r.rid, i, r.hashes[i], toks)

    return info


def test_kvshare_spans_follow_their_chunks_and_hold_sources_until_copied() -> None:
    """Reused spans (KVShare) are split over chunked prefill exactly, each chunk lists the
    positions it copies with their sources, and the sources stay pinned until the step that
    completes the prompt, also through preemption."""
    rng = np.random.default_rng(5)
    pool = BlockPool(num_blocks=14, num_layers=L)
    mgr = KVCacheManager(pool, make_policy("kvshare", window=2, recompute=0.25), BS)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=4), mgr)
    passages = [[int(t) for t in rng.integers(100, 200, size=12)] for _ in range(2)]
    reqs: list[Request] = []
    for i in range(14):
        head = [int(t) for t in rng.integers(0, 100, size=int(rng.integers(1, 7)))]
        prompt = head + passages[i % 2] + [int(t) for t in rng.integers(0, 100, size=3)]
        r = new_request(f"r{i}", prompt, BS, int(rng.integers(4, 14)))
        r.block_info = hashed_blocks(r)
        reqs.append(r)
        s.add(r)
    copied: dict[str, int] = {}
    pinned_steps = 0
    while not s.idle:
        plan = s.schedule()
        for c in plan.chunks:
            assert sum(sp.length for sp in c.spans) == c.reused
            end = c.start + c.num_tokens
            for sp in c.spans:
                assert c.start <= sp.start and sp.start + sp.length <= end
                assert sp.start + sp.length < c.req.num_tokens  # the last token is computed
                assert sp.offset + sp.length <= BS and sp.source.block_hash is not None
                assert c.req.token_ids is not None
                # the source block holds these very tokens: its hash chains over them
                copied[c.req.rid] = copied.get(c.req.rid, 0) + sp.length
            st = c.req.state
            if st is not None and st.reuse_pins:
                assert all(b.ref_cnt > 0 for b in st.reuse_pins)
                pinned_steps += 1
        s.manager.pool.check(mgr.table_refs())
        s.complete(plan, sampled(plan))
        for r in s.running:
            if not r.reuse_spans:
                assert r.state is not None and not r.state.reuse_pins  # released once copied
        s.manager.pool.check(mgr.table_refs())
    assert all(r.finished for r in reqs)
    assert mgr.stats.reused_tokens > 20 and pinned_steps > 0
    assert sum(copied.values()) == mgr.stats.reused_tokens  # every reused token copied once
    assert s.num_preemptions > 0  # the budget was tight: pins released on preemption too
    assert not mgr.requests and pool.pinned_pages == 0


@pytest.mark.parametrize("reserve", [True, False])
def test_admission_waits_until_the_whole_prompt_fits_like_vllm(reserve: bool) -> None:
    """vLLM 0.32 (``scheduler_reserve_full_isl``, on by default) admits a waiting request only
    if blocks for its whole prompt are free, though a chunked prefill allocates only the first
    chunk's; without the gate the second request starts on its first chunk and is preempted."""
    s = scheduler(blocks=7, max_num_batched_tokens=8, reserve_full_prompt=reserve)
    a = new_request("a", list(range(16)), BS, 2)  # 4 blocks, then 1 for its output
    b = new_request("b", list(range(100, 112)), BS, 2)  # 3 blocks
    s.add(a)
    s.add(b)
    first = s.schedule()  # a's first chunk of 8 takes the whole token budget
    assert [c.req.rid for c in first.chunks] == ["a"]
    s.complete(first, sampled(first))
    second = s.schedule()  # a's last 8 tokens (2 more blocks: 4 used of 7)
    assert [c.req.rid for c in second.chunks] == ["a"]
    s.complete(second, sampled(second))
    # a decodes into a 5th block; 2 are left: b's first chunk (7 tokens) fits, its prompt not
    third = s.schedule()
    rids = [c.req.rid for c in third.chunks]
    assert rids == (["a"] if reserve else ["a", "b"])
    drain(s)
    assert (s.num_preemptions > 0) is not reserve
