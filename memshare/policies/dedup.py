"""Two baselines for similarity sharing, both position-independent and across live requests.

- ``exact-dedup``: a page (one layer's K or V of a block) is shared only with a page whose
  KV is identical, judged on the sketches (pre-RoPE keys, so equal content at another position
  still matches): equal float16 sketch bytes and equal norm, i.e. distance 0 within float16
  rounding. Lossless up to a sketch collision: the floor any lossy policy must beat.
  Token-identical blocks have identical first-layer KV whatever their context, so this finds
  at least those pages.
- ``token-dedup``: a whole block is shared with a live block holding the same token ids.
  Lossy: the same tokens in another context have other KV past the first layers; it shows why
  similarity must be judged on KV, not on tokens.

The first block of a request (attention sink) is never shared, and only exclusively owned,
unpublished blocks are shared. Index entries are dropped when their request ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.policies.params import Param
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo


def _exclusive(block: KVBlock) -> bool:
    return block.ref_cnt == 1 and block.block_hash is None


@dataclass
class _LiveIndex:
    """Content key -> (owning request, block id, ...), for live requests' blocks only."""

    _index: dict[bytes, tuple[Any, ...]] = field(default_factory=dict, init=False, repr=False)
    _owned: dict[str, list[bytes]] = field(default_factory=dict, init=False, repr=False)
    PARAMS: ClassVar[dict[str, Param]] = {}  # none

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """No prefix reuse."""
        return PrefixHit()

    def _register(self, req_id: str, key: bytes, value: tuple[Any, ...]) -> None:
        self._index[key] = (req_id, *value)
        self._owned.setdefault(req_id, []).append(key)

    def on_request_end(self, req_id: str) -> None:
        """Forget what this request registered."""
        for key in self._owned.pop(req_id, ()):
            if self._index.get(key, ("",))[0] == req_id:
                del self._index[key]


@dataclass
class ExactDedup(_LiveIndex):
    """Page-level sharing of bit-identical KV (per layer, K and V separately): equal float16
    sketch bytes and equal norm (identical KV gives identical sketches)."""

    name: str = "exact-dedup"
    judges_keys: ClassVar[bool] = True  # equal key sketches (pre-RoPE keys assumed)

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Point every page whose exact twin is live at the twin's page."""
        own = table[blk.index]
        if blk.sketch is None or blk.norm is None or blk.index == 0 or not _exclusive(own):
            return ()
        sk = np.ascontiguousarray(blk.sketch, dtype=np.float16)
        norm = np.asarray(blk.norm, dtype=np.float32)
        mask = np.zeros(own.pages.shape, dtype=bool)
        source = own.pages.copy()
        for layer in range(sk.shape[0]):
            for kv in (0, 1):
                key = sk[layer, kv].tobytes() + norm[layer, kv].tobytes() + bytes([kv])
                twin = self._index.get(key)
                if twin is not None:
                    page = self._live_page(pool, twin)
                    if page is not None:
                        mask[layer, kv], source[layer, kv] = True, page
                        continue
                self._register(blk.req_id, key, (own.block_id, layer, kv))
        if not mask.any():
            return ()
        return (
            BlockDecision(
                blk.index, expect=own.block_id, share_mask=mask, share_source=source, distance=0.0
            ),
        )

    @staticmethod
    def _live_page(pool: BlockPool, twin: tuple[Any, ...]) -> int | None:
        _, block_id, layer, kv = twin
        try:
            return int(pool.block(block_id).pages[layer, kv])
        except KeyError:
            return None


@dataclass
class TokenDedup(_LiveIndex):
    """Whole-block sharing of token-identical blocks, at any position (lossy)."""

    name: str = "token-dedup"

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Share with a live block of the same tokens, else register this one."""
        own = table[blk.index]
        if blk.token_ids is None or blk.index == 0 or not _exclusive(own):
            return ()
        key = np.asarray(blk.token_ids, dtype="<i8").tobytes()
        twin = self._index.get(key)
        if twin is not None:
            try:
                target = pool.block(twin[1])
            except KeyError:
                target = None
            if target is not None and target.ref_cnt > 0:
                return (BlockDecision(blk.index, expect=own.block_id, share_block=target.block_id),)
        self._register(blk.req_id, key, (own.block_id,))
        return ()
