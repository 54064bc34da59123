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

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.minhash import MinHasher, similarity
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo


class _Rows:
    """A growable array of rows (amortised O(1) append; ``view()`` is the filled part)."""

    def __init__(self, shape: tuple[int, ...], dtype: type[np.generic], fill: object = 0) -> None:
        self._a = np.full((16, *shape), fill, dtype=dtype)
        self._fill = fill
        self.n = 0

    def put(self, i: int, row: np.ndarray) -> None:
        """Set row ``i`` (growing to hold it)."""
        if i >= len(self._a):
            grown = np.full(
                (max(2 * len(self._a), i + 1), *self._a.shape[1:]), self._fill, dtype=self._a.dtype
            )
            grown[: len(self._a)] = self._a
            self._a = grown
        self._a[i] = row
        self.n = max(self.n, i + 1)

    def view(self) -> np.ndarray:
        """Rows ``0 .. n-1``."""
        return self._a[: self.n]


@dataclass
class _Chain:
    """Per-request state. Logical block indices key everything."""

    phys: dict[int, int] = field(default_factory=dict)  # logical -> physical id seen at fill
    step_of: dict[int, int] = field(default_factory=dict)  # logical -> step (if known)
    sketch: _Rows | None = None  # (n, L, 2, d) float32 sketches by logical index
    norm: _Rows | None = None  # (n, L, 2) float32 norms by logical index
    has_sketch: set[int] = field(default_factory=set)  # logical indices with a sketch
    step_blocks: dict[int, list[int]] = field(default_factory=dict)  # step -> logical indices
    step_ids: list[int] = field(default_factory=list)  # steps in order of first appearance
    step_pos: dict[int, int] = field(default_factory=dict)  # step -> position in step_ids
    sigs: _Rows | None = None  # (steps, P) MinHash per step, in step_ids order
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
        if j < 1 or j not in chain.phys:
            return ()
        decision = self._decide(chain, j, table, pool)
        return () if decision is None else (decision,)

    def on_request_end(self, req_id: str) -> None:
        """Drop the chain's state."""
        self._chains.pop(req_id, None)

    # ------------------------------------------------------------------ internals
    def _record(self, chain: _Chain, blk: FullBlock, block: KVBlock) -> None:
        i = blk.index
        chain.phys[i] = block.block_id
        if blk.sketch is not None and blk.norm is not None:
            if chain.sketch is None or chain.norm is None:
                chain.sketch = _Rows(blk.sketch.shape, np.float32)
                chain.norm = _Rows(blk.norm.shape, np.float32)
            chain.sketch.put(i, blk.sketch)
            chain.norm.put(i, blk.norm)
            chain.has_sketch.add(i)
        if blk.step is None:
            return
        chain.step_of[i] = blk.step
        if blk.step not in chain.step_blocks:
            if chain.sigs is None:
                chain.sigs = _Rows((self.num_perm,), np.uint64, fill=np.iinfo(np.uint64).max)
            chain.step_blocks[blk.step] = []
            chain.step_pos[blk.step] = len(chain.step_ids)
            chain.step_ids.append(blk.step)
            chain.sigs.put(chain.step_pos[blk.step], self._hasher.empty())
            chain.tail[blk.step] = np.zeros(0, dtype=np.int64)
        chain.step_blocks[blk.step].append(i)
        if blk.token_ids is not None:
            assert chain.sigs is not None
            run = np.concatenate([chain.tail[blk.step], np.asarray(blk.token_ids, np.int64)])
            self._hasher.update(chain.sigs.view()[chain.step_pos[blk.step]], run)
            keep = self.ngram - 1
            chain.tail[blk.step] = run[len(run) - keep :] if keep else run[:0]

    def _candidates(self, chain: _Chain, j: int) -> np.ndarray:
        """Logical indices of candidate blocks for block ``j`` (all older than ``j``, sorted)."""
        step = chain.step_of.get(j)
        if step is None or chain.sigs is None:
            return np.zeros(0, dtype=np.int64)
        pos = chain.step_pos[step]
        if pos == 0:
            return np.zeros(0, dtype=np.int64)
        sigs = chain.sigs.view()
        sims = similarity(sigs[pos], sigs[:pos])
        order = np.lexsort((np.arange(pos), -sims))[: self.k]  # best first, earlier on ties
        cands: set[int] = set()
        for p in order:
            if sims[p] <= 0:
                break
            for i in chain.step_blocks[chain.step_ids[p]]:
                if 1 <= i < j:
                    cands.add(i)
                    cands.update(x for x in chain.links.get(i, ()) if 1 <= x < j)
        cands &= chain.has_sketch
        return np.fromiter(sorted(cands), dtype=np.int64, count=len(cands))

    def _decide(
        self, chain: _Chain, j: int, table: Sequence[KVBlock], pool: BlockPool
    ) -> BlockDecision | None:
        own = table[j]
        if j not in chain.has_sketch or own.block_id != chain.phys[j]:
            return None
        if own.ref_cnt != 1 or own.block_hash is not None:
            return None  # not exclusively ours: a prefix hit or a published block
        cands = self._candidates(chain, j)
        if cands.size == 0:
            return None
        assert chain.sketch is not None and chain.norm is not None
        x, norm = chain.sketch.view()[j], np.maximum(chain.norm.view()[j], 1e-12)
        sk = chain.sketch.view()
        layers = x.shape[0]
        if self.granularity == "block":
            # cascade: a few probe layers first; candidates failing too many are dropped
            allowed = layers - int(np.ceil(self.min_layers * layers - 1e-9))
            probe = _probe_layers(layers)
            pd = self._dist(sk[cands][:, probe], x[probe], norm[probe])
            cands = cands[(pd > self.tau).sum(axis=1) <= allowed]
            if cands.size == 0:
                return None
        dist = self._dist(sk[cands], x, norm)  # (m, L)
        ok = dist <= self.tau
        cols = [0] if self.share == "k" else [0, 1]
        cl = [int(c) for c in cands]
        if self.granularity == "block":
            return self._block_share(chain, j, cl, dist, ok, cols, table)
        return self._layer_share(chain, j, cl, dist, ok, cols, table)

    def _dist(self, cand: np.ndarray, x: np.ndarray, norm: np.ndarray) -> np.ndarray:
        """Relative distance per candidate and layer (m, L): K only, or max of K and V."""
        diff = cand - x
        rel = np.sqrt(np.einsum("mlkd,mlkd->mlk", diff, diff)) / norm
        return rel[..., 0] if self.share == "k" else rel.max(axis=-1)

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
        me = chain.phys[j]
        if cols == [0, 1]:
            chain.phys[j] = target.block_id
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
            j, expect=chain.phys[j], share_mask=mask, share_source=source, distance=d
        )

    @staticmethod
    def _link(chain: _Chain, a: int, b: int) -> None:
        chain.links.setdefault(a, set()).add(b)
        chain.links.setdefault(b, set()).add(a)


@functools.cache
def _probe_layers(layers: int) -> np.ndarray:
    """Up to four layers spread over the depth, checked first to drop hopeless candidates."""
    return np.unique(np.linspace(0, layers - 1, min(4, layers)).round().astype(np.int64))
