"""Block pool and manager: worked examples and hypothesis-driven invariants."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

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

from memshare.block_pool import BlockPool, KVBlock, PoolInvariantError
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
    tokens = list(range(10))  # 2 full blocks and 2 tokens
    mgr.admit(info("a", tokens), 10)
    mgr.free("a")
    hit = mgr.admit(info("b", tokens), 10)
    assert hit is not None and hit.num_tokens == 8 and len(hit.blocks) == 2
    assert mgr.stats.hit_tokens == 8 and mgr.stats.hit_blocks == 2
    pool.check(mgr.table_refs())


def test_block_aligned_repeat_recomputes_its_last_block_and_caches_it_twice() -> None:
    """vLLM looks a hit up in whole blocks within the first P - 1 tokens: a fully cached
    prompt of 3 whole blocks hits 2 (8 tokens, not 11), recomputes the third and publishes it
    again under the same hash; the pool keeps both, the first published answers lookups."""
    pool = BlockPool(num_blocks=8)
    mgr = KVCacheManager(pool, make_policy("prefix"), BS)
    tokens = list(range(12))
    hashes = chain_hashes(tokens, BS)
    mgr.admit(info("a", tokens), 12)
    first = mgr.requests["a"].table[2]
    mgr.free("a")
    hit = mgr.admit(info("b", tokens), 12)
    assert hit is not None and hit.num_tokens == 8 and len(hit.blocks) == 2
    second = mgr.requests["b"].table[2]
    assert second is not first and second.block_hash == first.block_hash == hashes[2]
    assert pool.cached_block(hashes[2]) is first
    mgr.free("b")
    assert pool.num_cached_free == 4  # a's 3 blocks and b's copy of the last one
    pool.check(mgr.table_refs())
    pool.evict_all_cached()
    assert pool.cached_block(hashes[2]) is None and pool.used_pages == 0
    pool.check(mgr.table_refs())


def test_duplicate_hash_lookup_falls_to_the_next_block_when_the_first_is_evicted() -> None:
    pool = BlockPool(num_blocks=2)
    a, b = pool.allocate(1), pool.allocate(1)
    assert a is not None and b is not None
    assert pool.publish(a[0], 7) and pool.publish(b[0], 7) and not pool.publish(b[0], 8)
    pool.free(a)
    pool.free(b)  # free queue: a, then b
    assert pool.cached_block(7) is a[0]
    c = pool.allocate(1)  # never-used pages are gone: evicts the head, a
    assert c is not None and pool.cached_block(7) is b[0]
    pool.check({c[0].block_id: 1})


def test_a_cached_block_is_evicted_only_when_no_other_block_is_free() -> None:
    """vLLM 0.32's free queue: freed blocks without a hash go to its front (reused first),
    never-used ones follow, cached ones are appended; so a cached block freed before a plain
    one survives while the plain one's pages are free."""
    pool = BlockPool(num_blocks=4)
    mgr = KVCacheManager(pool, make_policy("prefix"), BS)
    tokens = list(range(8))
    mgr.admit(info("a", tokens), 8)  # 2 blocks, both published
    mgr.free("a")
    mgr.admit(info("x", [50, 51, 52]), 3)  # 1 block, never full: not published
    mgr.admit(info("y", [60, 61, 62]), 3)  # the last never-used block
    mgr.free("x")
    mgr.free("y")
    assert pool.used_pages == 4 and pool.num_cached_free == 2
    assert mgr.admit(info("z", [70, 71]), 2) is not None  # takes a plain free block
    assert pool.stats.evicted_blocks == 0 and pool.num_cached_free == 2
    assert mgr.admit(info("w", [80, 81]), 2) is not None
    assert mgr.admit(info("v", [90, 91]), 2) is not None  # none left: evicts a's tail
    assert pool.stats.evicted_blocks == 1
    hit = make_policy("prefix").lookup_prefix(info("c", [*tokens, 1]), pool)
    assert len(hit.blocks) == 1 and hit.num_tokens == 4
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


def _corrupt(how: str) -> tuple[BlockPool, dict[int, int]]:
    """A pool with two live blocks, one invariant broken by hand as ``how`` names."""
    pool = BlockPool(num_blocks=4, num_layers=2)
    a, b = pool.allocate(2) or []
    refs = {a.block_id: 1, b.block_id: 1}
    pool.check(refs)  # sound before the corruption
    if how == "ref":
        a.ref_cnt = -1
    elif how == "holders":
        pool.holders[b.distinct[0]] += 1
    elif how == "free count":
        pool._n_free -= 1
    elif how == "table":
        refs[a.block_id] = 2
    return pool, refs


CORRUPTIONS = {
    "ref": "negative ref count: KVBlock(id=0",
    "holders": "holder counts drifted",
    "free count": "free count",
    "table": "ref count != table refs: KVBlock(id=0",
}


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_check_names_the_broken_invariant(how: str) -> None:
    pool, refs = _corrupt(how)
    with pytest.raises(PoolInvariantError, match=re.escape(CORRUPTIONS[how])):
        pool.check(refs)


def test_check_raises_under_python_O() -> None:
    """``check`` raises explicitly, so ``python -O`` (which strips ``assert``) keeps it."""
    script = textwrap.dedent(
        """
        import sys
        from test_block_pool import CORRUPTIONS, _corrupt
        from memshare.block_pool import PoolInvariantError
        assert False, "not stripped"  # proves -O is in force: this line must not raise
        for how in CORRUPTIONS:
            pool, refs = _corrupt(how)
            try:
                pool.check(refs)
            except PoolInvariantError as e:
                print(how, "->", e)
            else:
                sys.exit(f"{how}: check() passed a corrupted pool under -O")
        """
    )
    res = subprocess.run(
        [sys.executable, "-O", "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == len(CORRUPTIONS)
    for line, (how, msg) in zip(lines, CORRUPTIONS.items(), strict=True):
        assert line.startswith(f"{how} -> {msg}"), line


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
TestPoolMachine = pytest.mark.slow(PoolMachine.TestCase)  # 150 runs of 40 steps


class VllmFreeQueue:
    """vLLM 0.32's block pool, block by block, as its source reads (the oracle for the order;
    vllm/v1/core/block_pool.py): one free queue, never-used blocks in id order at first;
    ``free_blocks`` prepends a block without a hash (reused first, LIFO) and appends a cached
    one; an allocation pops the head and evicts a popped block's hash; a hash maps to its
    blocks in publication order, a lookup takes the first."""

    def __init__(self, num_blocks: int) -> None:
        self.queue: list[int] = list(range(num_blocks))  # head first
        self.ref = [0] * num_blocks
        self.hash: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, dict[int, None]] = {}

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.queue):
            return None
        got, self.queue = self.queue[:n], self.queue[n:]
        for b in got:
            h = self.hash[b]
            if h is not None:  # evicted as it is reused
                del self.by_hash[h][b]
                if not self.by_hash[h]:
                    del self.by_hash[h]
                self.hash[b] = None
            self.ref[b] = 1
        return got

    def free(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.hash[b] is None:
                self.queue.insert(0, b)
            else:
                self.queue.append(b)

    def touch(self, b: int) -> None:
        if self.ref[b] == 0:
            self.queue.remove(b)
        self.ref[b] += 1

    def publish(self, b: int, h: int) -> None:
        self.hash[b] = h
        self.by_hash.setdefault(h, {})[b] = None

    def lookup(self, h: int) -> int | None:
        return next(iter(self.by_hash.get(h, {})), None)


class VllmOrderMachine(RuleBasedStateMachine):
    """The pool against :class:`VllmFreeQueue` under random allocate / publish (duplicate hashes
    included) / free / hit sequences on a tight budget: every allocation succeeds or fails
    alike, and after every step the same hashes are cached, the same blocks under each hash in
    the same order, and a lookup finds the same block."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(num_blocks=6, num_layers=2)
        self.ref = VllmFreeQueue(6)
        self.live: list[tuple[KVBlock, int]] = []  # one entry per reference held
        self.tag: dict[int, int] = {}  # pool block id -> publication number
        self.ref_tag: dict[int, int] = {}  # oracle block id -> publication number (while hashed)
        self.n = 0

    @rule(n=st.integers(1, 3))
    def allocate(self, n: int) -> None:
        got, want = self.pool.allocate(n), self.ref.allocate(n)
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            self.live += list(zip(got, want, strict=True))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), h=st.integers(0, 3))
    def publish(self, data: st.DataObject, h: int) -> None:
        blk, b = data.draw(st.sampled_from(self.live))
        if blk.block_hash is None:
            self.n += 1
            assert self.pool.publish(blk, h)
            self.ref.publish(b, h)
            self.tag[blk.block_id] = self.ref_tag[b] = self.n

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.live) - 1))
        blk, b = self.live.pop(i)
        self.pool.free([blk])
        self.ref.free(b)

    @rule(h=st.integers(0, 3))
    def hit(self, h: int) -> None:
        blk, b = self.pool.cached_block(h), self.ref.lookup(h)
        assert (blk is None) == (b is None)
        if blk is not None and b is not None:
            assert self.tag[blk.block_id] == self.ref_tag[b]
            self.pool.touch([blk])
            self.ref.touch(b)
            self.live.append((blk, b))

    @invariant()
    def same_cache(self) -> None:
        self.pool.check()
        for h in range(4):
            mine = self.pool._by_hash.get(h, {})
            theirs = self.ref.by_hash.get(h, {})
            assert [self.tag[i] for i in mine] == [self.ref_tag[b] for b in theirs]
        assert self.pool.available_pages == 2 * 2 * len(self.ref.queue)


VllmOrderMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
TestVllmOrderMachine = pytest.mark.slow(VllmOrderMachine.TestCase)  # 300 runs of 50 steps
