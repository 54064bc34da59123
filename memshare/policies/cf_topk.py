"""``cf-topk``: MemShare-style similarity sharing of KV blocks inside one reasoning chain.

Our precise version of MemShare (SPEC §4), per request:

1. Blocks carry the reasoning step of their first token (segmentation comes from the trace).
2. Each step has a MinHash signature of its token n-grams; the current step's neighbours are
   its ``k`` most similar earlier steps (collaborative filtering), fixed when the step's first
   block is decided. Candidate blocks are the neighbours' blocks plus the blocks those were
   themselves shared with.
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

NO_CANDIDATES = np.zeros(0, dtype=np.int64)


class _Rows:
    """A growable array of rows (amortised O(1) append; ``view()`` is the filled part)."""

    def __init__(self, shape: tuple[int, ...], dtype: type[np.generic], fill: object = 0) -> None:
        self._a = np.full((16, *shape), fill, dtype=dtype)
        self._fill = fill
        self.n = 0

    def put(self, i: int, row: np.ndarray) -> None:
        """Set row ``i`` (growing to hold it)."""
        if i >= len(self._a):
            shape = (max(2 * len(self._a), i + 1), *self._a.shape[1:])
            grown = np.full(shape, self._fill, dtype=self._a.dtype)
            grown[: len(self._a)] = self._a
            self._a = grown
        self._a[i] = row
        self.n = max(self.n, i + 1)

    def view(self) -> np.ndarray:
        """Rows ``0 .. n-1``."""
        return self._a[: self.n]


@dataclass
class _Chain:
    """Per-request state; logical block indices key everything. Sketches are kept by
    reference (a trace's memory map, or live KV sketches), never copied, except the few
    probe layers used to drop hopeless candidates early."""

    phys: dict[int, int] = field(default_factory=dict)  # logical -> physical id seen at fill
    step_of: dict[int, int] = field(default_factory=dict)  # logical -> step, where known
    sketch: dict[int, np.ndarray] = field(default_factory=dict)  # logical -> (L, 2, d)
    norm: dict[int, np.ndarray] = field(default_factory=dict)  # logical -> (L, 2)
    probe: _Rows | None = None  # (n, probe layers, 2, d) float16 copy of probe layers
    step_ids: list[int] = field(default_factory=list)  # steps in order of first appearance
    step_pos: dict[int, int] = field(default_factory=dict)  # step -> position in step_ids
    step_blocks: list[list[int]] = field(default_factory=list)  # by position: blocks
    step_tokens: list[list[np.ndarray]] = field(default_factory=list)  # by position: tokens
    sigs: _Rows | None = None  # (steps, P) MinHash by position
    sig_final: list[bool] = field(default_factory=list)  # signature of a closed step is done
    sig_done: int = 0  # every position below this has its final signature
    sig_parts: list[int] = field(default_factory=list)  # token arrays in each signature
    neighbours: dict[int, np.ndarray] = field(default_factory=dict)  # position -> candidates
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
        chain = self._chains.get(blk.req_id)
        if chain is None:
            chain = self._chains[blk.req_id] = _Chain()
        self._record(chain, blk, table[blk.index])
        j = blk.index - self.window
        if j < 1 or j not in chain.phys:
            return ()
        decision = self._decide(chain, j, table)
        return () if decision is None else (decision,)

    def on_request_end(self, req_id: str) -> None:
        """Drop the chain's state."""
        self._chains.pop(req_id, None)

    # ------------------------------------------------------------------ recording
    def _record(self, chain: _Chain, blk: FullBlock, block: KVBlock) -> None:
        i = blk.index
        chain.phys[i] = block.block_id
        if blk.sketch is not None and blk.norm is not None:
            chain.sketch[i], chain.norm[i] = blk.sketch, blk.norm
            if self.granularity == "block":
                probe = _probe_layers(blk.sketch.shape[0])
                if chain.probe is None:
                    chain.probe = _Rows((len(probe), *blk.sketch.shape[1:]), np.float16)
                chain.probe.put(i, blk.sketch[probe])
        if blk.step is None:
            return
        chain.step_of[i] = blk.step
        pos = chain.step_pos.get(blk.step)
        if pos is None:
            pos = chain.step_pos[blk.step] = len(chain.step_ids)
            chain.step_ids.append(blk.step)
            chain.step_blocks.append([])
            chain.step_tokens.append([])
            chain.sig_final.append(False)
            chain.sig_parts.append(-1)
        chain.step_blocks[pos].append(i)
        if blk.token_ids is not None:
            chain.step_tokens[pos].append(np.asarray(blk.token_ids))

    def _signatures(self, chain: _Chain, upto: int) -> np.ndarray:
        """MinHash rows of step positions ``0..upto`` (closed steps computed once)."""
        if chain.sigs is None:
            chain.sigs = _Rows((self.num_perm,), np.uint64)
        last = len(chain.step_ids) - 1
        for pos in range(chain.sig_done, upto + 1):
            if chain.sig_final[pos]:
                continue
            parts = chain.step_tokens[pos]
            if chain.sig_parts[pos] != len(parts):  # new tokens since the last signature
                sig = self._hasher.empty()
                if parts:
                    self._hasher.update(sig, np.concatenate(parts))
                chain.sigs.put(pos, sig)
                chain.sig_parts[pos] = len(parts)
            chain.sig_final[pos] = pos < last  # a later step exists: this one is closed
        while chain.sig_done <= upto and chain.sig_final[chain.sig_done]:
            chain.sig_done += 1
        return chain.sigs.view()[: upto + 1]

    # ------------------------------------------------------------------ deciding
    def _candidates(self, chain: _Chain, j: int) -> np.ndarray:
        """Logical indices of candidate blocks for block ``j``, sorted. The step's neighbours
        are fixed at its first decision (its signature then covers ``window + 1`` blocks)."""
        step = chain.step_of.get(j)
        if step is None:
            return NO_CANDIDATES
        pos = chain.step_pos[step]
        base = chain.neighbours.get(pos)
        if base is None:
            base = chain.neighbours[pos] = self._neighbour_blocks(chain, pos)
        if not chain.links or base.size == 0:
            return base
        linked = {x for b in base.tolist() for x in chain.links.get(b, ()) if 1 <= x < j}
        if not linked:
            return base
        return np.union1d(base, np.fromiter(linked, dtype=np.int64, count=len(linked)))

    def _neighbour_blocks(self, chain: _Chain, pos: int) -> np.ndarray:
        if pos == 0:
            return NO_CANDIDATES
        sigs = self._signatures(chain, pos)
        sims = similarity(sigs[pos], sigs[:pos])
        order = np.argsort(-sims, kind="stable")[: self.k]  # best first, earlier on ties
        blocks = [b for p in order.tolist() if sims[p] > 0 for b in chain.step_blocks[p]]
        cands = sorted({b for b in blocks if b >= 1 and b in chain.sketch})
        return np.asarray(cands, dtype=np.int64)

    def _decide(self, chain: _Chain, j: int, table: Sequence[KVBlock]) -> BlockDecision | None:
        own = table[j]
        if j not in chain.sketch or own.block_id != chain.phys[j]:
            return None
        if own.ref_cnt != 1 or own.block_hash is not None:
            return None  # not exclusively ours: a prefix hit or a published block
        cands = self._candidates(chain, j)
        if cands.size == 0:
            return None
        x = np.asarray(chain.sketch[j], dtype=np.float32)
        norm = np.maximum(np.asarray(chain.norm[j], dtype=np.float32), 1e-12)
        layers = x.shape[0]
        if self.granularity == "block":
            # cascade: probe layers first; candidates failing more than allowed are dropped
            allowed = layers - int(np.ceil(self.min_layers * layers - 1e-9))
            probe = _probe_layers(layers)
            assert chain.probe is not None
            pd = self._dist(chain.probe.view()[cands], x[probe], norm[probe])
            cands = cands[np.count_nonzero(pd > self.tau, axis=1) <= allowed]
            if cands.size == 0:
                return None
        cand = np.stack([chain.sketch[c] for c in cands.tolist()])
        dist = self._dist(cand, x, norm)  # (m, L)
        ok = dist <= self.tau
        cols = [0] if self.share == "k" else [0, 1]
        if self.granularity == "block":
            return self._block_share(chain, j, cands, dist, ok, cols, table)
        return self._layer_share(chain, j, cands, dist, ok, cols, table)

    def _dist(self, cand: np.ndarray, x: np.ndarray, norm: np.ndarray) -> np.ndarray:
        """Relative distance per candidate and layer (m, L): K only, or max of K and V."""
        if self.share == "k":
            diff = cand[:, :, 0].astype(np.float32) - x[:, 0]
            np.square(diff, out=diff)
            return np.sqrt(diff.sum(axis=-1)) / norm[:, 0]  # type: ignore[no-any-return]
        diff = cand.astype(np.float32) - x
        np.square(diff, out=diff)
        rel = np.sqrt(diff.sum(axis=-1)) / norm
        return rel.max(axis=-1)  # type: ignore[no-any-return]

    def _block_share(
        self,
        chain: _Chain,
        j: int,
        cands: np.ndarray,
        dist: np.ndarray,
        ok: np.ndarray,
        cols: list[int],
        table: Sequence[KVBlock],
    ) -> BlockDecision | None:
        need = int(np.ceil(self.min_layers * dist.shape[1] - 1e-9))
        eligible = np.flatnonzero(np.count_nonzero(ok, axis=1) >= need)
        if eligible.size == 0:
            return None
        totals = dist[eligible].sum(axis=1)
        best = int(eligible[int(np.argmin(totals))])
        c = int(cands[best])
        target = table[c]
        d = float(totals.min()) / dist.shape[1]
        self._link(chain, j, c)
        me = chain.phys[j]
        if len(cols) == 2:
            chain.phys[j] = target.block_id
            return BlockDecision(j, expect=me, share_block=target.block_id, distance=d)
        mask = np.zeros(target.pages.shape, dtype=bool)
        mask[:, cols] = True
        return BlockDecision(j, expect=me, share_mask=mask, share_source=target.pages, distance=d)

    def _layer_share(
        self,
        chain: _Chain,
        j: int,
        cands: np.ndarray,
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
        for layer in layers.tolist():
            c = int(cands[int(best[layer])])
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
