"""Block pool and manager: worked examples and hypothesis-driven invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from memshare.block_pool import BlockPool
from memshare.hashing import chain_hashes
from memshare.kv_manager import KVCacheManager
from memshare.policy import RequestInfo
from memshare.registry import make_policy

BS = 4


def info(req_id: str, tokens: list[int]) -> RequestInfo:
    return RequestInfo(req_id, len(tokens), BS, chain_hashes(tokens, BS))


def test_allocate_returns_none_and_changes_nothing_when_full() -> None:
    pool = BlockPool(num_blocks=3, num_layers=2)
    assert pool.pages_per_block == 4
    a = pool.allocate(2)
    assert a is not None and pool.used_pages == 8
    assert pool.allocate(2) is None
    assert pool.used_pages == 8 and pool.stats.allocated_blocks == 2
    pool.check({b.block_id: 1 for b in a})


def test_lru_evicts_chain_tail_first_and_keeps_prefix() -> None:
    pool = BlockPool(num_blocks=4)
    mgr = KVCacheManager(pool, make_policy("prefix"), BS)
    tokens = list(range(16))  # 4 full blocks
    assert mgr.admit(info("a", tokens), 16) is not None
    mgr.free("a")  # tail first: block 3 freed first, so it is evicted first
    assert pool.num_cached_free == 4
    assert mgr.admit(info("b", [99] * 4), 4) is not None  # needs one block: evicts a's tail
    hit = make_policy("prefix").lookup_prefix(info("c", tokens), pool)
    assert len(hit.blocks) == 3 and hit.num_tokens == 12
    pool.check(mgr.table_refs())


def test_prefix_hit_recomputes_last_prompt_token() -> None:
    pool = BlockPool(num_blocks=8)
    mgr = KVCacheManager(pool, make_policy("prefix"), BS)
    tokens = list(range(8))
    mgr.admit(info("a", tokens), 8)
    mgr.free("a")
    hit = mgr.admit(info("b", tokens), 8)
    assert hit is not None and hit.num_tokens == 7 and len(hit.blocks) == 2
    assert mgr.stats.hit_tokens == 7 and mgr.stats.hit_blocks == 2
    pool.check(mgr.table_refs())


def test_admit_does_not_fit_changes_nothing() -> None:
    pool = BlockPool(num_blocks=2)
    mgr = KVCacheManager(pool, make_policy("prefix"), BS)
    assert mgr.admit(info("a", list(range(12))), 12) is None
    assert pool.used_pages == 0 and not mgr.requests
    pool.check({})


def test_shared_page_keeps_data_until_last_reference() -> None:
    pool = BlockPool(num_blocks=4, num_layers=2)
    a, b = pool.allocate(2) or []
    mask = np.zeros((2, 2), dtype=bool)
    mask[1, 0] = True  # layer 1 keys
    freed = pool.share_pages(b, mask, a.pages)
    assert freed == 1 and pool.used_pages == 7
    shared_page = a.pages[1, 0]
    pool.free([a])  # a had no hash: destroyed, but b still holds the shared page
    assert pool.holders[shared_page] == 1 and pool.used_pages == 4
    pool.check({b.block_id: 1})
    pool.free([b])
    assert pool.used_pages == 0
    pool.check({})


def test_cross_layer_map_allocates_fewer_pages() -> None:
    pool = BlockPool(num_blocks=4, num_layers=4, layer_map=np.array([0, 1, 1, 3]))
    assert pool.pages_per_block == 6
    (blk,) = pool.allocate(1) or []
    assert np.array_equal(blk.pages[2], blk.pages[1]) and len(blk.distinct) == 6
    pool.check({blk.block_id: 1})


def test_page_ids_follow_one_free_stack_order() -> None:
    # Fresh ids in increasing order; released pages are reused first, last released first.
    pool = BlockPool(num_blocks=4, num_layers=1)
    a, b = pool.allocate(2) or []
    assert a.pages.ravel().tolist() == [0, 1] and b.pages.ravel().tolist() == [2, 3]
    pool.free([a])  # unhashed: destroyed at once, its pages recycled
    pool.free([b])
    c, d = pool.allocate(2) or []
    assert c.pages.ravel().tolist() == [2, 3] and d.pages.ravel().tolist() == [0, 1]
    (e,) = pool.allocate(1) or []
    assert e.pages.ravel().tolist() == [4, 5]
    pool.check({c.block_id: 1, d.block_id: 1, e.block_id: 1})


def test_a_billion_free_blocks_cost_what_the_used_blocks_cost() -> None:
    # Issue 11, defect 4: memory followed the budget (15.7 GB for 10^9 blocks), not use.
    import tracemalloc

    tracemalloc.start()
    try:
        pool = BlockPool(num_blocks=10**9, num_layers=30)
        blocks = pool.allocate(100)
        assert blocks is not None and pool.used_pages == 100 * 60
        pool.free(blocks[::-1])
        again = pool.allocate(100)
        assert again is not None
        pool.check({blk.block_id: 1 for blk in again})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pool.available_pages == 10**9 * 60 - 100 * 60
    assert peak < 5_000_000, peak


def test_double_free_is_refused() -> None:
    pool = BlockPool(num_blocks=1)
    (blk,) = pool.allocate(1) or []
    pool.free([blk])
    with pytest.raises(ValueError, match="double free"):
        pool.free([blk])


class PoolMachine(RuleBasedStateMachine):
    """Random admit / decode / share / free sequences through the real prefix policy."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(num_blocks=12, num_layers=3, layer_map=None)
        self.mgr = KVCacheManager(self.pool, make_policy("prefix"), BS)
        self.n = 0

    @rule(
        prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
        rest=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    )
    def admit(self, prefix: list[int], rest: list[int]) -> None:
        self.n += 1
        self.mgr.admit(info(f"r{self.n}", prefix + rest), len(prefix + rest))

    @precondition(lambda self: bool(self.mgr.requests))
    @rule(data=st.data(), k=st.integers(1, 6))
    def decode(self, data: st.DataObject, k: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.mgr.requests)))
        self.mgr.allocate_slots(rid, k)

    @precondition(lambda self: bool(self.mgr.requests))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self.mgr.free(data.draw(st.sampled_from(sorted(self.mgr.requests))))

    @precondition(lambda self: len(self.mgr.requests) >= 1)
    @rule(data=st.data())
    def share_pages(self, data: st.DataObject) -> None:
        tables = [s.table for s in self.mgr.requests.values() if s.table]
        if not tables:
            return
        dst = data.draw(st.sampled_from(data.draw(st.sampled_from(tables))))
        src = data.draw(st.sampled_from(data.draw(st.sampled_from(tables))))
        mask = np.array(data.draw(st.lists(st.booleans(), min_size=6, max_size=6))).reshape(3, 2)
        self.pool.share_pages(dst, mask, src.pages)

    @precondition(lambda self: len(self.mgr.requests) >= 1)
    @rule(data=st.data())
    def share_whole_block(self, data: st.DataObject) -> None:
        states = [s for s in self.mgr.requests.values() if s.table]
        if len(states) < 1:
            return
        state = data.draw(st.sampled_from(states))
        i = data.draw(st.integers(0, len(state.table) - 1))
        target = data.draw(st.sampled_from(data.draw(st.sampled_from(states)).table))
        self.pool.touch([target])
        self.pool.free([state.table[i]])
        state.table[i] = target

    @rule()
    def evict_all(self) -> None:
        self.pool.evict_all_cached()

    @invariant()
    def invariants_hold(self) -> None:
        self.pool.check(self.mgr.table_refs())
        for state in self.mgr.requests.values():
            assert all(b.ref_cnt > 0 for b in state.table)


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase
