"""``kvshare``: KVShare-style cross-request reuse of aligned token spans at any position.

On arrival, the longest cached block prefix hits exactly as ``prefix`` (the only case where
memory is shared: whole blocks identical at the same position). Past it, every window of
``window`` prompt tokens whose tokens also fill a window of a block still in the cache (live or
in the LRU free queue) is *matched*: its KV can be copied from there instead of computed.
KVShare recomputes the matched tokens with the highest deviation too, a fraction
``recompute`` of them (default 0.15, as in the paper); the rest are *reused*: their K and V, in
every layer, are copied from the cached block (keys are stored before RoPE, so a copy is
attended at its new position as if computed there). The policy answers
``PrefixHit.matched_tokens`` (KVShare's KV hit), ``reused_tokens`` (prefill compute saved) and
``spans``: for each reused run, its positions, source block and offset, which the paged engine
copies (docs/policies.md).

Which matched tokens to recompute is decided here, from tokens alone, so that the simulator and
the engine recompute the same ones. KVShare ranks tokens by the deviation of their reused KV,
which needs the KV this lookup does not have; our proxy is the token's depth in its matched
run (how many tokens before it were copied consecutively from the same source): the first
tokens of a run follow a context that differs from the source's, so their KV deviates most.
The ``ceil(recompute * matched)`` shallowest tokens are recomputed (ties: earlier first).

Windows are indexed per full block (those inside one block), keyed by a 64-bit polynomial hash
of their tokens and mapped to the chained hash of a block holding them and the window's offset
in it; an entry is valid only while that block is still in the pool. A position takes the first
matching window that covers it. Deterministic; no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.errors import InputError
from memshare.policies.params import COUNT_MAX, Param, check_fields
from memshare.policies.prefix import PrefixCaching
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo, ReusedSpan

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
    _index: dict[int, tuple[int, int]] = field(default_factory=dict, init=False, repr=False)

    PARAMS: ClassVar[dict[str, Param]] = {
        # at most the block size too (windows lie inside one block): :func:`check_window`
        "window": Param("int", 8, "tokens per matched window", 1, COUNT_MAX),
        "recompute": Param("float", 0.15, "share of matched tokens recomputed", 0.0, 1.0),
    }

    def __post_init__(self) -> None:
        check_fields(self, self.PARAMS, self.name)

    @staticmethod
    def check_block_size(params: Mapping[str, Any], block_size: int, where: str) -> None:
        """A given ``window <= block_size``: windows are indexed inside one full block, so a
        longer window would never match (InputError naming ``window``)."""
        window = params.get("window")  # the default is not the user's to fix
        if window is not None and window > block_size:
            raise InputError(
                where,
                f"kvshare window={window} is longer than a block ({block_size} tokens); a "
                "window lies inside one block, so it would match nothing",
                f"give 1 <= window <= {block_size}, e.g. window={min(KVShare.window, block_size)}",
            )

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """Exact prefix blocks, then matched windows past the prefix (see the module doc)."""
        hit = self._prefix.lookup_prefix(req, pool)
        if req.prompt_ids is None or len(req.prompt_ids) < self.window:
            return hit
        lo = hit.num_tokens
        # the last prompt token is always computed, like the prefix rule
        rest = np.asarray(req.prompt_ids[lo : req.prompt_len - 1])
        src: list[KVBlock | None] = [None] * len(rest)
        off = np.zeros(len(rest), dtype=np.int64)
        w = self.window
        filled = 0  # positions below this are taken by earlier windows (or not coverable)
        for start, h in enumerate(window_hashes(rest, w).tolist()):
            entry = self._index.get(h)
            if entry is None:
                continue
            blk = pool.cached_block(entry[0])
            if blk is None:
                continue
            for j in range(max(start, filled), start + w):
                src[j] = blk
                off[j] = entry[1] + j - start
            filled = start + w
        matched = np.array([b is not None for b in src], dtype=bool)
        n = int(matched.sum())
        if n == 0:
            return hit
        # depth: tokens before it copied consecutively from the same source
        depth = np.zeros(len(rest), dtype=np.int64)
        for i in range(1, len(rest)):
            if matched[i] and src[i] is src[i - 1] and off[i] == off[i - 1] + 1:
                depth[i] = depth[i - 1] + 1
        where = np.flatnonzero(matched)
        order = where[np.lexsort((where, depth[where]))]
        reuse = matched.copy()
        reuse[order[: math.ceil(self.recompute * n)]] = False
        spans: list[ReusedSpan] = []
        for i in np.flatnonzero(reuse).tolist():
            blk = src[i]
            assert blk is not None
            last = spans[-1] if spans else None
            if (
                last is not None
                and last.source is blk
                and last.start + last.length == lo + i
                and last.offset + last.length == int(off[i])
            ):
                spans[-1] = ReusedSpan(last.start, last.length + 1, blk, last.offset)
            else:
                spans.append(ReusedSpan(lo + i, 1, blk, int(off[i])))
        reused = int(reuse.sum())
        return PrefixHit(hit.blocks, hit.num_tokens, reused, hit.num_tokens + n, tuple(spans))

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Publish the block (as ``prefix``) and index its windows under its hash."""
        if blk.block_hash is None:
            return ()
        if blk.token_ids is not None:
            for offset, h in enumerate(window_hashes(blk.token_ids, self.window).tolist()):
                self._index.setdefault(h, (blk.block_hash, offset))
        return self._prefix.on_block_full(blk, table, pool)

    def on_request_end(self, req_id: str) -> None:
        """No per-request state (index entries die with their blocks)."""
