"""Policies composed where they are orthogonal: ``prefix+cf-topk``, ``...+kvsharer``.

Members are asked in order. The arrival answer is the first non-empty member answer; block
decisions are the members' decisions concatenated (each names its block and the block it
expects there, so a later member's decision on a block an earlier one replaced is skipped);
the layer map is the first member's that has one.

With a lossy sharer present, ``prefix`` publishes prompt blocks only: a published block must
stay exact (another request may hit it), while generated reasoning blocks are the sharer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.policy import (
    BlockDecision,
    FullBlock,
    Policy,
    PrefixHit,
    RequestInfo,
    policy_check_depth,
    policy_judges_keys,
    policy_layer_map,
    policy_shares_blocks,
)


@dataclass
class Composite:
    """Several policies acting as one."""

    members: tuple[Policy, ...]
    name: str

    @property
    def shares_blocks(self) -> bool:
        """Whether any member may repoint blocks (then all decide after the step)."""
        return any(policy_shares_blocks(m) for m in self.members)

    @property
    def judges_keys(self) -> bool:
        """Whether any member compares key sketches."""
        return any(policy_judges_keys(m) for m in self.members)

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """The first member hit that covers any tokens."""
        for member in self.members:
            hit = member.lookup_prefix(req, pool)
            if hit.num_tokens or hit.matched_tokens:
                return hit
        return PrefixHit()

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """All members' decisions, in member order."""
        out: list[BlockDecision] = []
        for member in self.members:
            out.extend(member.on_block_full(blk, table, pool))
        return out

    def on_request_end(self, req_id: str) -> None:
        """Every member forgets the request."""
        for member in self.members:
            member.on_request_end(req_id)

    def check_depth(self, num_layers: int) -> None:
        """Every member's depth check."""
        for member in self.members:
            policy_check_depth(member, num_layers)

    def layer_map(self, num_layers: int) -> np.ndarray | None:
        """The first member layer map, if any."""
        for member in self.members:
            lm = policy_layer_map(member, num_layers)
            if lm is not None:
                return lm
        return None
