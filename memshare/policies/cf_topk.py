"""``cf-topk``: MemShare-style similarity sharing of KV blocks inside one reasoning chain.

Our precise version of MemShare (SPEC §4), per request:

1. Blocks carry the reasoning step of their first token (segmentation comes from the trace).
2. Each step has a MinHash signature of its token n-grams; the current step's neighbours are
   its ``k`` most similar earlier steps (collaborative filtering). Candidate blocks are the
   neighbours' blocks plus the blocks those were themselves shared with.
3. A block is decided once it leaves the window of the ``window`` most recent blocks: its K/V
   sketch is compared with every candidate's per layer; the relative distance
   ``||x - c|| / ||x||`` (sketch difference over the block's true norm) ``<= tau`` confirms.
   ``share="kv"`` needs both K and V to confirm and shares both; ``share="k"`` judges and
   shares keys only (pre-RoPE keys in our traces). ``granularity="block"``: the block is
   shared with the best candidate if at least a fraction ``min_layers`` of layers confirm
   (a whole-block, zero-copy share when K and V of all layers move); ``"layer"``: each layer
   independently points at its best confirming candidate.
4. The first block (attention sink) and the last ``window`` blocks are never shared; blocks
   that are not exclusively owned (prefix hits, published blocks) are left alone. Shared
   pages are read-only: full blocks are never written again.

Deterministic: ties break towards the earlier step and the lower block id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.minhash import MinHasher, similarity
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo


@dataclass
class _Seen:
    """A full block of the chain as the policy recorded it."""

    phys: int  # physical block id at the time it filled
    step: int | None
    sketch: np.ndarray | None  # (L, 2, d) float32
    norm: np.ndarray | None  # (L, 2) float32


@dataclass
class _Chain:
    """Per-request state."""

    seen: dict[int, _Seen] = field(default_factory=dict)  # logical index -> record
    step_blocks: dict[int, list[int]] = field(default_factory=dict)  # step -> logical indices
    step_ids: list[int] = field(default_factory=list)  # steps in order of first appearance
    step_pos: dict[int, int] = field(default_factory=dict)  # step -> position in step_ids
    sigs: list[np.ndarray] = field(default_factory=list)  # MinHash per step (same order)
    tail: dict[int, np.ndarray] = field(default_factory=dict)  # step -> last ngram-1 tokens
    links: dict[int, set[int]] = field(default_factory=dict)  # logical -> logical shared with


@dataclass
class CfTopK:
    """Collaborative-filtering candidates + sketch-distance confirmation (MemShare)."""

    k: int = 4  # neighbour steps per step
    tau: float = 0.2  # relative sketch distance that confirms a share
    granularity: Literal["block", "layer"] = "block"
    min_layers: float = 1.0  # block granularity: fraction of layers that must confirm
    share: Literal["kv", "k"] = "kv"  # share K and V, or keys only
    window: int = 2  # most recent blocks kept exact (never shared)
    ngram: int = 3  # MinHash shingle length
    num_perm: int = 32  # MinHash signature length
    seed: int = 0
    name: str = "cf-topk"
    _hasher: MinHasher = field(init=False, repr=False)
    _chains: dict[str, _Chain] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.granularity not in ("block", "layer"):
            raise ValueError(f"granularity must be 'block' or 'layer', got {self.granularity!r}")
        if self.share not in ("kv", "k"):
            raise ValueError(f"share must be 'kv' or 'k', got {self.share!r}")
        if self.k < 1 or self.window < 0 or not 0 < self.min_layers <= 1 or self.tau < 0:
            raise ValueError("need k >= 1, window >= 0, 0 < min_layers <= 1, tau >= 0")
        self._hasher = MinHasher(self.num_perm, self.ngram, self.seed)

    # ------------------------------------------------------------------ protocol
    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """No prefix reuse (compose with ``prefix`` for that)."""
        return PrefixHit()

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Record the block; decide on the block that just left the recent window."""
        chain = self._chains.setdefault(blk.req_id, _Chain())
        self._record(chain, blk, table[blk.index])
        j = blk.index - self.window
        if j < 1 or j not in chain.seen:
            return ()
        decision = self._decide(chain, j, table, pool)
        return () if decision is None else (decision,)

    def on_request_end(self, req_id: str) -> None:
        """Drop the chain's state."""
        self._chains.pop(req_id, None)

    # ------------------------------------------------------------------ internals
    def _record(self, chain: _Chain, blk: FullBlock, block: KVBlock) -> None:
        chain.seen[blk.index] = _Seen(block.block_id, blk.step, blk.sketch, blk.norm)
        if blk.step is None:
            return
        if blk.step not in chain.step_blocks:
            chain.step_blocks[blk.step] = []
            chain.step_pos[blk.step] = len(chain.step_ids)
            chain.step_ids.append(blk.step)
            chain.sigs.append(self._hasher.empty())
            chain.tail[blk.step] = np.zeros(0, dtype=np.int64)
        chain.step_blocks[blk.step].append(blk.index)
        if blk.token_ids is not None:
            run = np.concatenate([chain.tail[blk.step], np.asarray(blk.token_ids, np.int64)])
            self._hasher.update(chain.sigs[chain.step_pos[blk.step]], run)
            chain.tail[blk.step] = run[len(run) - (self.ngram - 1) :] if self.ngram > 1 else run[:0]

    def _candidates(self, chain: _Chain, j: int) -> list[int]:
        """Logical indices of candidate blocks for block ``j`` (all older than ``j``)."""
        step = chain.seen[j].step
        if step is None:
            return []
        pos = chain.step_pos[step]
        if pos == 0:
            return []
        sims = similarity(chain.sigs[pos], np.stack(chain.sigs[:pos]))
        order = np.lexsort((np.arange(pos), -sims))  # best first, earlier step on ties
        neighbours = [chain.step_ids[i] for i in order[: self.k] if sims[i] > 0]
        cands: set[int] = set()
        for s in neighbours:
            for i in chain.step_blocks[s]:
                if 1 <= i < j:
                    cands.add(i)
                    cands |= {x for x in chain.links.get(i, ()) if 1 <= x < j}
        return sorted(cands)

    def _decide(
        self, chain: _Chain, j: int, table: Sequence[KVBlock], pool: BlockPool
    ) -> BlockDecision | None:
        me = chain.seen[j]
        own = table[j]
        if me.sketch is None or me.norm is None or own.block_id != me.phys:
            return None
        if own.ref_cnt != 1 or own.block_hash is not None:
            return None  # not exclusively ours: a prefix hit or a published block
        cands = [c for c in self._candidates(chain, j) if chain.seen[c].sketch is not None]
        if not cands:
            return None
        sk = np.stack([chain.seen[c].sketch for c in cands]).astype(np.float32)  # type: ignore[misc]
        x = me.sketch.astype(np.float32)
        rel = np.linalg.norm(sk - x, axis=-1) / np.maximum(me.norm, 1e-12)  # (m, L, 2)
        dist = rel[..., 0] if self.share == "k" else rel.max(axis=-1)  # (m, L)
        ok = dist <= self.tau
        cols = [0] if self.share == "k" else [0, 1]
        if self.granularity == "block":
            return self._block_share(chain, j, cands, dist, ok, cols, table)
        return self._layer_share(chain, j, cands, dist, ok, cols, table)

    def _block_share(
        self,
        chain: _Chain,
        j: int,
        cands: list[int],
        dist: np.ndarray,
        ok: np.ndarray,
        cols: list[int],
        table: Sequence[KVBlock],
    ) -> BlockDecision | None:
        frac = ok.mean(axis=1)
        eligible = np.flatnonzero(frac >= self.min_layers - 1e-9)
        if eligible.size == 0:
            return None
        best = int(eligible[np.argmin(dist[eligible].mean(axis=1))])
        c = cands[best]
        target = table[c]
        d = float(dist[best].mean())
        self._link(chain, j, c)
        me = chain.seen[j].phys
        if cols == [0, 1]:
            chain.seen[j].phys = target.block_id
            return BlockDecision(j, expect=me, share_block=target.block_id, distance=d)
        mask = np.zeros(target.pages.shape, dtype=bool)
        mask[:, cols] = True
        return BlockDecision(j, expect=me, share_mask=mask, share_source=target.pages, distance=d)

    def _layer_share(
        self,
        chain: _Chain,
        j: int,
        cands: list[int],
        dist: np.ndarray,
        ok: np.ndarray,
        cols: list[int],
        table: Sequence[KVBlock],
    ) -> BlockDecision | None:
        masked = np.where(ok, dist, np.inf)
        best = np.argmin(masked, axis=0)  # (L,) best candidate per layer
        layers = np.flatnonzero(np.isfinite(masked[best, np.arange(dist.shape[1])]))
        if layers.size == 0:
            return None
        mask = np.zeros(table[j].pages.shape, dtype=bool)
        source = table[j].pages.copy()
        for layer in layers:
            c = cands[int(best[layer])]
            mask[layer, cols] = True
            source[layer, cols] = table[c].pages[layer, cols]
            self._link(chain, j, c)
        d = float(dist[best[layers], layers].mean())
        return BlockDecision(
            j, expect=chain.seen[j].phys, share_mask=mask, share_source=source, distance=d
        )

    @staticmethod
    def _link(chain: _Chain, a: int, b: int) -> None:
        chain.links.setdefault(a, set()).add(b)
        chain.links.setdefault(b, set()).add(a)
