"""Test policies whose sharing decisions are fixed in advance (engine tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo
from memshare.sketch import DEFAULT_DIM


@dataclass
class FixedShares:
    """Shares fixed blocks of request ``r1`` with ``r0``'s: block 2 whole with ``r0``'s block
    ``whole_from``, and block 3's keys in layers 0-4 only with ``r0``'s block ``keys_from``
    (what per-layer, keys-only sharing does). Asserts every full block carries a sketch of
    its live KV (the engine's)."""

    whole_from: int = 2
    keys_from: int = 3
    name: str = "fixed-shares"
    tables: dict[str, Sequence[KVBlock]] = field(default_factory=dict)

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        return PrefixHit()

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        assert blk.sketch is not None and blk.sketch.shape[1:] == (2, DEFAULT_DIM)  # live KV
        self.tables[blk.req_id] = table
        src = self.tables.get("r0")
        if blk.req_id != "r1" or src is None or blk.index not in (2, 3):
            return ()
        if blk.index == 2:
            return (BlockDecision(2, share_block=src[self.whole_from].block_id, distance=0.0),)
        mask = np.zeros(table[3].pages.shape, dtype=bool)
        mask[:5, 0] = True
        source = src[self.keys_from].pages.copy()
        return (BlockDecision(3, share_mask=mask, share_source=source),)

    def on_request_end(self, req_id: str) -> None:
        self.tables.pop(req_id, None)
