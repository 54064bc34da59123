"""``none``: paged allocation with no reuse at all (the memory baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from memshare.block_pool import BlockPool, KVBlock
from memshare.policies.params import Param
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo


@dataclass
class NoSharing:
    """Never hits, never shares, never publishes. Stateless."""

    name: str = "none"
    PARAMS: ClassVar[dict[str, Param]] = {}  # none
    shares_blocks: ClassVar[bool] = False  # only publishes: asked at reservation
    block_decisions: ClassVar[str] = "none"  # never answers a full block: not asked

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """Nothing is ever cached."""
        return PrefixHit()

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Keep every block private."""
        return ()

    def on_request_end(self, req_id: str) -> None:
        """No per-request state."""
