"""``kvshare``: KVShare-style cross-request reuse of aligned token spans at any position.

On arrival, the longest cached block prefix hits exactly as ``prefix`` (the only case where
memory is shared: whole blocks identical at the same position). Past it, every window of
``window`` prompt tokens whose tokens also fill a window of a block still in the cache (live or
in the LRU free queue) is *matched*: its KV can be copied from there instead of computed.
KVShare recomputes the matched tokens with the highest deviation too, a fraction
``recompute`` of them (default 0.15, as in the paper); the rest are *reused*. The policy answers
``PrefixHit.matched_tokens`` (KVShare's KV hit) and ``reused_tokens`` (prefill compute saved).

Windows are indexed per full block (those inside one block), keyed by a 64-bit polynomial hash
of their tokens and mapped to the chained hash of a block holding them; an entry is valid only
while that block is still in the pool. Deterministic; no clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.policies.prefix import PrefixCaching
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo

_BASE = np.uint64(0x100000001B3)


def window_hashes(tokens: np.ndarray, window: int) -> np.ndarray:
    """Polynomial hash (mod 2^64) of every ``window``-token run of ``tokens``."""
    t = np.asarray(tokens).astype(np.uint64) + np.uint64(1)
    if len(t) < window:
        return np.zeros(0, dtype=np.uint64)
    powers = _BASE ** np.arange(window - 1, -1, -1, dtype=np.uint64)
    runs = np.lib.stride_tricks.sliding_window_view(t, window)
    hashes: np.ndarray = (runs * powers).sum(axis=1, dtype=np.uint64)
    return hashes


@dataclass
class KVShare:
    """Prefix hits plus position-independent span reuse with partial recompute."""

    window: int = 8  # w: tokens per matched window (<= block size)
    recompute: float = 0.15  # r: share of matched tokens recomputed (highest deviation)
    name: str = "kvshare"
    shares_blocks: ClassVar[bool] = False  # only publishes: asked at reservation
    _prefix: PrefixCaching = field(default_factory=PrefixCaching, init=False, repr=False)
    _index: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window < 1 or not 0.0 <= self.recompute <= 1.0:
            raise ValueError("need window >= 1 and 0 <= recompute <= 1")

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """Exact prefix blocks, then matched windows past the prefix."""
        hit = self._prefix.lookup_prefix(req, pool)
        if req.prompt_ids is None or len(req.prompt_ids) < self.window:
            return hit
        # the last prompt token is always computed, like the prefix rule
        rest = np.asarray(req.prompt_ids[hit.num_tokens : req.prompt_len - 1])
        matched = np.zeros(len(rest), dtype=bool)
        for start, h in enumerate(window_hashes(rest, self.window).tolist()):
            owner = self._index.get(h)
            if owner is not None and pool.cached_block(owner) is not None:
                matched[start : start + self.window] = True
        n = int(matched.sum())
        reused = n - math.ceil(self.recompute * n)
        return PrefixHit(hit.blocks, hit.num_tokens, reused, hit.num_tokens + n)

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Publish the block (as ``prefix``) and index its windows under its hash."""
        if blk.block_hash is None:
            return ()
        if blk.token_ids is not None:
            for h in window_hashes(blk.token_ids, self.window).tolist():
                self._index.setdefault(h, blk.block_hash)
        return self._prefix.on_block_full(blk, table, pool)

    def on_request_end(self, req_id: str) -> None:
        """No per-request state (index entries die with their blocks)."""
