"""Per-request block tables over a :class:`BlockPool`, driven by one :class:`Policy`.

This is the one place where a policy's answers are carried out, so the simulator and the
paged engine, which both call it, execute exactly the same decisions.

Invariants:
- ``len(table) == ceil(num_tokens / block_size)`` after every successful call (a prefix hit may
  leave one extra, partially recomputed block: see :meth:`KVCacheManager.admit`).
- Every entry of every table holds one reference on its block; freeing a request drops them
  tail-first.
- Logical blocks below ``num_full`` have been reported to the policy exactly once.
- A call that returns ``None``/``False`` changed nothing.

Reserve, then commit (docs/scheduler.md): :meth:`KVCacheManager.admit` and
:meth:`KVCacheManager.allocate_slots` *reserve* the blocks a step will write, at schedule time;
after the step ran, :meth:`KVCacheManager.commit` reports the blocks that filled to the policy
(with their KV sketches, from the trace in the simulator, from live KV in the engine, by the
same function) and applies its decisions. So a block's own forward pass always writes its own
pages, and a share repoints the entry only afterwards: no KV is ever written into a page that
another entry reads. A policy whose answers never repoint a block (``shares_blocks`` False:
``none``, ``prefix``, ``kvshare``, ``kvsharer``) is asked at reservation instead, as vLLM
caches a block's hash when it schedules the tokens that fill it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.policy import (
    BlockDecision,
    FullBlock,
    Policy,
    PrefixHit,
    RequestInfo,
    policy_block_decisions,
    policy_check_depth,
    policy_shares_blocks,
)
from memshare.share_log import ShareLog

BlockInfoFn = Callable[[int], FullBlock]  # logical index -> what the policy sees of it
# Called before a share is applied: request id, the decision, the entry's own block (its pages
# still hold the block's KV) and the (L, 2) bool mask of pages the share repoints.
ShareObserver = Callable[[str, BlockDecision, KVBlock, np.ndarray], None]


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def blocks_for_all(lengths: Iterable[int], block_size: int) -> int:
    """The "unlimited" KV budget: every request's tokens (``lengths``: prompt plus output) at
    once, a spare block each (copy-on-write) and one more; the simulator and the engine size
    it with this one function."""
    return sum(cdiv(n, block_size) + 1 for n in lengths) + 1


@dataclass
class RequestState:
    """A running request's cache state."""

    info: RequestInfo
    table: list[KVBlock]  # block table: logical index -> physical block
    num_tokens: int  # tokens whose KV is (being) computed into the table
    num_full: int  # logical blocks already reported full to the policy
    block_info: BlockInfoFn | None  # source of FullBlock data (trace or live KV)
    cow_tail: bool = False  # last entry is a shared partial block: copy before writing past it
    reuse_pins: list[KVBlock] = field(default_factory=list)  # span sources held until copied


@dataclass
class ManagerStats:
    """Counters over all admissions (including re-admissions after preemption)."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    hit_tokens: int = 0  # of which served from the prefix cache
    prompt_blocks: int = 0  # hashed prompt blocks of admitted requests
    hit_blocks: int = 0  # of which hit in the prefix cache
    matched_tokens: int = 0  # prompt tokens matched anywhere in the cache (KVShare's hit)
    reused_tokens: int = 0  # prompt tokens past the prefix whose KV is copied (when scheduled)
    full_blocks: int = 0  # blocks reported full to the policy
    shared_blocks: int = 0  # full blocks replaced by an existing physical block
    pages_written: int = 0  # pages of blocks reported full
    pages_shared: int = 0  # of which pointed at other pages instead (whole or partial share)
    cow_copies: int = 0  # shared partial blocks copied before a write
    shared_distance_sum: float = 0.0  # sum of confirmed share distances (where reported)
    shared_distance_n: int = 0
    layer_pages_shared: np.ndarray | None = None  # (L, 2) shared pages per layer, K/V (or None)
    # request -> its pages_shared (requests with a share only); the per-request view validate
    # compares between executors
    request_pages_shared: dict[str, int] = field(default_factory=dict)


@dataclass
class KVCacheManager:
    """Block tables for running requests; every reuse decision comes from ``policy``."""

    pool: BlockPool
    policy: Policy
    block_size: int
    requests: dict[str, RequestState] = field(default_factory=dict)
    stats: ManagerStats = field(default_factory=ManagerStats)
    after_step: bool = field(init=False)  # the policy decides at commit (else at reservation)
    observer: ShareObserver | None = None  # sees every share before it is applied (audit)
    ask_all: bool = False  # ask the policy about every full block, even where it answers none
    share_log: ShareLog | None = None  # every applied share and when (the fidelity model)

    def __post_init__(self) -> None:
        policy_check_depth(self.policy, self.pool.num_layers)
        self.after_step = policy_shares_blocks(self.policy)
        # which full blocks to ask the policy about
        self._decides = "all" if self.ask_all else policy_block_decisions(self.policy)
        self._entry_shape = (self.pool.num_layers, 2)  # every block's page map: (L, 2)
        self._entry_pages = 2 * self.pool.num_layers  # pages one table entry names

    def lookup(self, info: RequestInfo) -> PrefixHit:
        """The policy's cached prefix for ``info`` now (changes nothing). A scheduler that sizes
        a chunk by the hit first (as vLLM's does) passes the answer on to :meth:`admit`."""
        return self.policy.lookup_prefix(info, self.pool)

    def admit(
        self,
        info: RequestInfo,
        num_new_tokens: int,
        block_info: BlockInfoFn | None = None,
        hit: PrefixHit | None = None,
        reserve_tokens: int | None = None,
    ) -> PrefixHit | None:
        """Start (or restart) a request: look up its cached prefix and allocate the blocks for
        ``num_new_tokens`` uncached tokens after it. ``None`` (no change) if that doesn't fit.

        The caller computes ``hit.num_tokens`` onwards; ``num_new_tokens`` is clamped to the
        prompt's uncached rest. ``hit``: the answer of :meth:`lookup` for ``info``, taken with
        no pool change since (the policy is then not asked twice). ``reserve_tokens``: admit
        only if blocks for that many tokens (the whole prompt) would fit, though only the
        chunk's are allocated (vLLM's ``full_sequence_must_fit`` admission gate).
        """
        if info.req_id in self.requests:
            raise ValueError(f"request {info.req_id!r} is already admitted")
        if hit is None:
            hit = self.policy.lookup_prefix(info, self.pool)
        n_new = min(num_new_tokens, info.prompt_len - hit.num_tokens)
        hit_blocks = list(hit.blocks)
        covered = len(hit_blocks) * self.block_size
        cow_tail = covered > info.prompt_len  # a hashed partial tail block was hit
        need = max(0, cdiv(hit.num_tokens + n_new, self.block_size) - len(hit_blocks))
        pins = list({id(sp.source): sp.source for sp in hit.spans}.values())
        if not self._fits(need, hit_blocks, pins, reserve_tokens):
            return None
        self.pool.touch(hit_blocks)
        self.pool.touch(pins)
        new = self.pool.allocate(need)
        if new is None:  # the gate above admitted it: a pool that refuses now is a bug
            raise RuntimeError(f"the pool refused {need} blocks its free pages admitted")
        state = RequestState(
            info, hit_blocks + new, hit.num_tokens + n_new, len(hit_blocks), block_info
        )
        state.cow_tail = cow_tail
        state.reuse_pins = pins
        self.requests[info.req_id] = state
        st = self.stats
        st.prompt_tokens += info.prompt_len
        st.hit_tokens += hit.num_tokens
        st.prompt_blocks += info.prompt_blocks
        st.hit_blocks += len(hit_blocks)
        st.matched_tokens += max(hit.matched_tokens, hit.num_tokens)
        if not self.after_step:
            self._report_full(state)
        return hit

    def admits(
        self, info: RequestInfo, num_new_tokens: int, hit: PrefixHit, reserve_tokens: int | None
    ) -> bool:
        """Whether :meth:`admit` with these arguments would admit the request now (changes
        nothing)."""
        n_new = min(num_new_tokens, info.prompt_len - hit.num_tokens)
        hit_blocks = list(hit.blocks)
        need = max(0, cdiv(hit.num_tokens + n_new, self.block_size) - len(hit_blocks))
        pins = list({id(sp.source): sp.source for sp in hit.spans}.values())
        return self._fits(need, hit_blocks, pins, reserve_tokens)

    def _fits(
        self, need: int, hit_blocks: list[KVBlock], pins: list[KVBlock], reserve: int | None
    ) -> bool:
        """The admission gate: ``need`` new blocks (at least the blocks of ``reserve`` tokens
        beyond the hit) fit beside the pages touching the hit and span sources would pin.

        Hit blocks with ref 0 sit in the free queue: touching them pins their pages, which our
        own allocation then may not evict, so the check discounts them. So do the sources of
        reused spans (KVShare): held until the request's prompt is computed."""
        revive = self.pool.pages_pinned_by_touch(hit_blocks + pins)
        gate = need
        if reserve is not None:
            gate = max(need, cdiv(reserve, self.block_size) - len(hit_blocks))
        return gate * self.pool.pages_per_block <= self.pool.available_pages - revive

    def allocate_slots(self, req_id: str, num_new_tokens: int) -> bool:
        """Grow a request's table for ``num_new_tokens`` more tokens; False (no change) if the
        pool cannot supply the blocks. Reports blocks that become full to the policy."""
        state = self.requests[req_id]
        total = state.num_tokens + num_new_tokens
        cow = state.cow_tail and total > state.info.prompt_len
        need = -(-total // self.block_size) - len(state.table)
        if need < 0:
            need = 0
        if cow:
            need += 1
        new = self.pool.allocate(need)
        if new is None:
            return False
        if cow:
            copy = new.pop(0)
            old = state.table[-1]
            state.table[-1] = copy
            self.pool.free([old])
            state.cow_tail = False
            self.stats.cow_copies += 1
        state.table.extend(new)
        state.num_tokens = total
        if not self.after_step:
            self._report_full(state)
        return True

    def commit(self, req_id: str) -> None:
        """After the step that computed the reserved tokens: report the blocks that filled
        to the policy and apply its decisions (a no-op for policies asked at reservation)."""
        if self.after_step:
            self._report_full(self.requests[req_id])

    def release_reuse(self, req_id: str) -> None:
        """Drop the request's hold on its reused spans' sources (their KV has been copied)."""
        state = self.requests[req_id]
        if state.reuse_pins:
            self.pool.free(state.reuse_pins[::-1])
            state.reuse_pins = []

    def page_table(self, req_id: str) -> np.ndarray:
        """The request's block table as page ids, ``(blocks, layers, 2)`` (K = 0, V = 1): what
        the engine reads and writes. Shared entries name the same pages as their source."""
        table = self.requests[req_id].table
        if not table:
            return np.zeros((0, self.pool.num_layers, 2), dtype=np.int64)
        return np.stack([blk.pages for blk in table])

    def free(self, req_id: str) -> None:
        """Release a finished or preempted request's blocks, tail first."""
        self.release_reuse(req_id)
        state = self.requests.pop(req_id)
        self.pool.free(state.table[::-1])
        self.policy.on_request_end(req_id)

    def asks_from(self, state: RequestState, index: int) -> bool:
        """Whether the policy may be asked about logical block ``index`` of ``state`` or a
        later one when it fills (else filling them only moves counters, which
        :meth:`allocate_slots` brings up to date whenever it is next called)."""
        mode = self._decides
        if mode == "all":
            return True
        if mode == "none":
            return False
        return state.block_info is not None or index < len(state.info.block_hashes)

    def num_blocks_needed(self, req_id: str, num_new_tokens: int) -> int:
        """Blocks ``allocate_slots(req_id, num_new_tokens)`` would take from the pool."""
        state = self.requests[req_id]
        total = state.num_tokens + num_new_tokens
        cow = state.cow_tail and total > state.info.prompt_len
        return max(0, cdiv(total, self.block_size) - len(state.table)) + int(cow)

    def table_refs(self) -> dict[int, int]:
        """Block id -> references the manager holds on it: table entries, and reused spans'
        sources not yet copied (for invariant checks)."""
        refs: dict[int, int] = {}
        for state in self.requests.values():
            for blk in (*state.table, *state.reuse_pins):
                refs[blk.block_id] = refs.get(blk.block_id, 0) + 1
        return refs

    # ----------------------------------------------------------------- internals
    def _report_full(self, state: RequestState) -> None:
        """Tell the policy about blocks that became full (or a prompt's hashed tail)."""
        info = state.info
        n_full = state.num_tokens // self.block_size
        if (
            info.hashes_cover_tail
            and state.num_tokens >= info.prompt_len
            and info.prompt_len % self.block_size
        ):
            n_full = max(
                n_full, min(cdiv(info.prompt_len, self.block_size), len(info.block_hashes))
            )
        if n_full <= state.num_full:
            return
        self.stats.full_blocks += n_full - state.num_full
        self.stats.pages_written += (n_full - state.num_full) * self._entry_pages
        if self._decides == "none":  # the policy would answer nothing
            state.num_full = n_full
            return
        unhashed = self._decides == "hashed" and state.block_info is None
        hashes = info.block_hashes
        for i in range(state.num_full, n_full):
            state.num_full = i + 1
            if unhashed and i >= len(hashes):  # no hash: the policy would answer nothing
                continue
            fb = self._full_block(state, i)
            for decision in self.policy.on_block_full(fb, state.table, self.pool):
                self._apply(state, decision)

    def _full_block(self, state: RequestState, i: int) -> FullBlock:
        if state.block_info is not None:
            return state.block_info(i)
        hashes = state.info.block_hashes
        return FullBlock(state.info.req_id, i, hashes[i] if i < len(hashes) else None)

    def _apply(self, state: RequestState, d: BlockDecision) -> None:
        """Carry out one decision on a full block of ``state`` (stale ones are skipped)."""
        if not 0 <= d.index < state.num_full:
            raise ValueError(f"decision for block {d.index} of {state.info.req_id!r}: not full")
        own = state.table[d.index]
        if d.expect is not None and own.block_id != d.expect:
            return
        st = self.stats
        if self.observer is not None and d.shares and d.share_block != own.block_id:
            mask = d.share_mask if d.share_mask is not None else np.ones(self._entry_shape, bool)
            self.observer(state.info.req_id, d, own, np.asarray(mask, dtype=bool))
        if d.share_block is not None and d.share_block != own.block_id:
            target = self.pool.block(d.share_block)
            self.pool.touch([target])
            self.pool.free([own])
            state.table[d.index] = target
            st.shared_blocks += 1
            self._count_pages(state, self._entry_pages)
            whole = np.ones(self._entry_shape, dtype=bool)
            self._count_layers(whole)
            if self.share_log is not None:
                self.share_log.record(state.info.req_id, state.num_tokens, whole, d)
        elif d.share_mask is not None:
            assert d.share_source is not None
            self.pool.share_pages(own, d.share_mask, d.share_source)
            self._count_pages(state, int(d.share_mask.sum()))
            self._count_layers(np.asarray(d.share_mask, dtype=bool))
            if self.share_log is not None:
                mask = np.asarray(d.share_mask, dtype=bool)
                self.share_log.record(state.info.req_id, state.num_tokens, mask, d)
        if d.shares and d.distance is not None:
            st.shared_distance_sum += d.distance
            st.shared_distance_n += 1
        if d.publish_hash is not None and state.table[d.index].block_hash is None:
            self.pool.publish(state.table[d.index], d.publish_hash)

    def _count_pages(self, state: RequestState, pages: int) -> None:
        """Add a share's repointed pages to the totals and to its request's."""
        st = self.stats
        st.pages_shared += pages
        rid = state.info.req_id
        st.request_pages_shared[rid] = st.request_pages_shared.get(rid, 0) + pages

    def _count_layers(self, mask: np.ndarray) -> None:
        """Add a share's (L, 2) page mask to the per-layer counters."""
        st = self.stats
        if st.layer_pages_shared is None:
            st.layer_pages_shared = np.zeros(mask.shape, dtype=np.int64)
        st.layer_pages_shared += mask
