"""``prefix``: vLLM v1 automatic prefix caching.

With ``publish="prompt"`` (what compositions with a lossy sharer use) only prompt blocks are
published; generated blocks stay private so a sharer may repoint them.

Full blocks are published under their chained hash; an arriving request hits the longest run
of leading prompt blocks whose hashes are cached (ref count + 1, zero copy). As in vLLM, the
hit is looked up in whole blocks within the first ``prompt_len - 1`` tokens (the model needs
the last prompt token's logits): a fully cached prompt whose length is a multiple of the block
size hits all but its last block, recomputes that block and publishes it again under the same
hash (a second block; the pool keeps both, as vLLM does). Where a workload's hash ids also cover
a partial last block (Mooncake), that block may hit too (``prompt_len - 1`` tokens); the
manager copies it on the first write past the prompt (copy-on-write).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from memshare.block_pool import BlockPool, KVBlock
from memshare.policies.params import Param, check_fields
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo

PUBLISH = ("all", "prompt")


@dataclass
class PrefixCaching:
    """Longest cached block prefix; publish every full block (or prompt blocks only)."""

    publish: Literal["all", "prompt"] = "all"  # which full blocks become findable
    name: str = "prefix"
    shares_blocks: ClassVar[bool] = False  # only publishes: asked at reservation
    block_decisions: ClassVar[str] = "hashed"  # a block without a hash gets no answer
    _prompt_blocks: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    PARAMS: ClassVar[dict[str, Param]] = {
        "publish": Param("choice", "all", "which full blocks become findable", choices=PUBLISH),
    }

    def __post_init__(self) -> None:
        check_fields(self, self.PARAMS, self.name)

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """Walk the prompt's block hashes until the first miss."""
        if self.publish == "prompt":
            self._prompt_blocks[req.req_id] = req.prompt_len // req.block_size
        whole = req.prompt_len // req.block_size
        # whole blocks inside the first prompt_len - 1 tokens, plus a hashed partial tail
        limit = (req.prompt_len - 1) // req.block_size + max(0, req.prompt_blocks - whole)
        hit: list[KVBlock] = []
        for h in req.block_hashes[: min(limit, req.prompt_blocks)]:
            blk = pool.cached_block(h)
            if blk is None:
                break
            hit.append(blk)
        tokens = min(len(hit) * req.block_size, req.prompt_len - 1)
        if tokens <= 0:
            return PrefixHit()
        return PrefixHit(tuple(hit), tokens)

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Publish the block under its chained hash (nothing if it has none)."""
        if blk.block_hash is None:
            return ()
        if self.publish == "prompt" and blk.index >= self._prompt_blocks.get(blk.req_id, 0):
            return ()
        return (BlockDecision(blk.index, publish_hash=blk.block_hash),)

    def on_request_end(self, req_id: str) -> None:
        """Forget the request's prompt length."""
        self._prompt_blocks.pop(req_id, None)
