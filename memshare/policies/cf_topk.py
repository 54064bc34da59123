"""``cf-topk``: MemShare-style similarity sharing of KV blocks inside one reasoning chain.

Our precise version of MemShare (docs/policies.md), per request:

1. Blocks carry the reasoning step of their first token (segmentation comes from the trace).
2. Each step has a MinHash signature of its token n-grams; the current step's neighbours are
   its ``k`` most similar earlier steps (collaborative filtering), fixed when the step's first
   block is decided. Candidate blocks are the neighbours' blocks plus the blocks those were
   themselves shared with. A candidate is judged by the KV its entry holds now: a block
   shared whole stands for the block it points at (candidates are deduplicated that way),
   and a layer shared with another block is compared by that block's sketch, so shares
   never chain into a drift beyond ``tau`` from the KV actually read.
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

Cost (layer granularity): most blocks have no candidates and cost a lookup; a block with
candidates used to cast and compare every candidate's whole sketch, which made the mean
decision 30 times the median. Now candidates holding the same content as an earlier one are
dropped (they never win a tie), a sound bound on the first ``_PROBE_COORDS`` coordinates of
each candidate's held sketch (float32 rows kept per block, ``Chain.probe_of``) drops the
(candidate, layer) pairs that cannot confirm, and only candidates with a pair left are
compared in full, by the same float32 arithmetic: the decisions are those of comparing every
candidate (``tests/test_cf_topk_reference.py`` checks them against a brute-force reference).
Where a step resumes after a later one began (a candidate may still change), every candidate
is compared in full, as before.

Deterministic: ties break towards the earlier step and the lower block id. This module holds
the policy (recording filled blocks, confirming and making shares); the per-request state and
the candidates of step 2 are :mod:`~memshare.policies.cf_topk_index`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.minhash import NGRAM_MAX, MinHasher, hasher_bytes
from memshare.policies.cf_topk_held import (
    distinct_content,
    held_sketch,
    lowest_total,
    probe_rows,
)
from memshare.policies.cf_topk_index import Chain, Limits, NeighbourIndex, Rows
from memshare.policies.cf_topk_share import layer_share
from memshare.policies.cf_topk_taus import Entry, parse_spec, scales, unscaled
from memshare.policies.cf_topk_taus import table as table_of
from memshare.policies.params import COUNT_MAX, SEED_MAX, Param, check_fields
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo
from memshare.sketch import to_float32

_TINY = np.float32(1e-12)  # norms are clamped to this (an all-zero block)
# tau bounds a relative distance ||x - c|| / ||x||, which is >= 0 and, by the triangle
# inequality, <= 1 + ||c|| / ||x||: at 2 every candidate no larger than the block confirms, at
# 100 every one up to 99 times its norm; a larger tau is the same "share anything" setting
TAU_MAX = 100.0
NUM_PERM_MAX = 4096  # MinHash error sqrt(J(1 - J) / P) <= 0.8% here; more buys nothing
# Layer granularity bounds first: for each (candidate, layer) the float32 sum of squared
# differences over the first _PROBE_COORDS sketch coordinates. Those are some of the very
# float32 differences the full check sums, so the exact partial sum never exceeds the full
# one; the float32 roundings (partial sum, bound: relative < 1e-5; the full check's sum,
# sqrt and division: < 2e-5) are covered by _PROBE_SLACK, float32 underflow (at most
# d * 2**-149 in all) by _PROBE_FLOOR. So a pair whose partial sum exceeds
# (tau ||x||)^2 * _PROBE_SLACK + _PROBE_FLOOR has a full distance > tau: it cannot confirm.
# NaN compares false, so such a pair is always checked in full.
_PROBE_COORDS = 32
_PROBE_SLACK = 1.05
_PROBE_FLOOR = np.float32(1e-30)


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
    tau_layers: str = ""  # per-layer/part thresholds (policies/cf_topk_taus.py); "": tau
    name: str = "cf-topk"
    judges_keys: ClassVar[bool] = True  # compares key sketches (pre-RoPE keys assumed)
    _index: NeighbourIndex = field(init=False, repr=False)
    _chains: dict[str, Chain] = field(init=False, repr=False, default_factory=dict)
    # model depth (layers) -> its constants (probe layers, layers allowed/needed, tau)
    _consts: dict[int, Limits] = field(init=False, repr=False, default_factory=dict)
    _taus: list[Entry] | None = field(init=False, repr=False)
    PARAMS: ClassVar[dict[str, Param]] = {
        "k": Param("int", 4, "neighbour steps per step", 1, COUNT_MAX),
        "tau": Param(
            "float",
            0.2,
            "the relative sketch distance ||x - c|| / ||x|| that confirms a share: 0 only "
            "identical blocks, 2 any candidate no larger than the block",
            0.0,
            TAU_MAX,
        ),
        "granularity": Param("choice", "block", "what one share moves", choices=("block", "layer")),
        # any fraction >= 1e-6 of fewer than 1e3 layers needs at least one layer to confirm
        "min_layers": Param("float", 1.0, "fraction of layers that must confirm", 1e-6, 1.0),
        "share": Param("choice", "kv", "K and V, or keys only", choices=("kv", "k")),
        "window": Param("int", 2, "most recent blocks kept exact", 0, COUNT_MAX),
        "ngram": Param("int", 3, "tokens per MinHash shingle", 1, NGRAM_MAX),
        "num_perm": Param(
            "int",
            32,
            f"MinHash signature length; at {NUM_PERM_MAX} its error is under 0.8%",
            1,
            NUM_PERM_MAX,
            cost=hasher_bytes,
        ),
        "seed": Param("int", 0, "MinHash seed", 0, SEED_MAX),
        "tau_layers": Param(
            "text", "0-9:0.4,10-29:0.1", "per-layer/part taus ([k|v]L-M:TAU|off, @F)"
        ),
    }

    def __post_init__(self) -> None:
        check_fields(self, self.PARAMS, self.name)
        self._taus = parse_spec(self.tau_layers, TAU_MAX) if self.tau_layers.strip() else None
        hasher = MinHasher(self.num_perm, self.ngram, self.seed)
        self._index = NeighbourIndex(
            self.k, self.ngram, self.num_perm, self.granularity == "layer", hasher
        )

    # ------------------------------------------------------------------ protocol
    def check_depth(self, num_layers: int) -> None:
        """Refuse a model whose depth ``tau_layers`` does not fit (InputError)."""
        self._limits(num_layers)

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """No prefix reuse (compose with ``prefix`` for that)."""
        return PrefixHit()

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Record the block; decide on the block that just left the recent window."""
        chain = self._chains.get(blk.req_id)
        if chain is None:
            chain = self._chains[blk.req_id] = Chain()
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
    def _record(self, chain: Chain, blk: FullBlock, block: KVBlock) -> None:
        i = blk.index
        if i in chain.phys:
            chain.in_order = False  # a block filled again: compare every candidate in full
        chain.phys[i] = block.block_id
        sketch, step = blk.sketch, blk.step
        if sketch is not None and blk.norm is not None:
            chain.sketch[i], chain.norm[i] = sketch, blk.norm
            if self.granularity == "block":
                store, limits = chain.probe, chain.limits
                if store is None or limits is None:
                    limits = chain.limits = self._limits(len(sketch))
                    shape = (len(limits.probe), *sketch.shape[1:])
                    store = chain.probe = Rows(shape, np.float32)
                store.put(i, sketch.take(limits.probe, axis=0))  # exact: float16 fits float32
        if step is None:
            return
        chain.step_of[i] = step
        pos = chain.step_pos.get(step)
        if pos is None:
            pos = chain.step_pos[step] = len(chain.step_ids)
            chain.step_ids.append(step)
            chain.step_blocks.append([])
            chain.step_tokens.append([])
            chain.sig_final.append(False)
            chain.sig_parts.append(-1)
            chain.sig_len.append(0)
            chain.sigs.append(None)
            chain.sig_live.append(False)
        if pos < chain.last_pos:
            chain.in_order = False  # an earlier step resumed
        chain.last_pos = pos
        chain.step_blocks[pos].append(i)
        if blk.token_ids is not None:
            chain.step_tokens[pos].append(np.asarray(blk.token_ids))

    # ------------------------------------------------------------------ deciding
    def _decide(self, chain: Chain, j: int, table: Sequence[KVBlock]) -> BlockDecision | None:
        own = table[j]
        if own.ref_cnt != 1 or own.block_hash is not None:
            return None  # not exclusively ours: a prefix hit or a published block
        xs = chain.sketch.get(j)
        if xs is None or own.block_id != chain.phys[j]:
            return None
        cands = self._index.candidates(chain, j)
        if not cands:
            return None
        norm = np.maximum(chain.norm[j], _TINY, dtype=np.float32)
        limits = chain.limits if chain.limits is not None else self._limits(len(xs))
        if limits.scale is not None:  # per-layer thresholds: folded into the norms
            with np.errstate(divide="ignore", invalid="ignore"):
                got = self._decide_scaled(chain, j, xs, cands, norm * limits.scale, limits, table)
            return None if got is None else unscaled(got, limits, self.share == "k")
        return self._decide_scaled(chain, j, xs, cands, norm, limits, table)

    def _decide_scaled(
        self,
        chain: Chain,
        j: int,
        xs: np.ndarray,
        cands: list[int],
        norm: np.ndarray,
        limits: Limits,
        table: Sequence[KVBlock],
    ) -> BlockDecision | None:
        """The decision on block ``j`` against ``cands``, distances over ``norm``."""
        if self.granularity == "layer":
            return self._decide_layer(chain, j, xs, cands, norm, limits, table)
        cands = self._probe_pass(chain, j, cands, norm, limits)
        if not cands:
            return None
        # float32 differences (cast, then subtract: one pass per candidate)
        k_only = self.share == "k"
        x = xs[:, 0] if k_only else xs
        if len(cands) == 1:
            one = held_sketch(chain, cands[0])
            diff = np.subtract(one[:, 0] if k_only else one, x, dtype=np.float32)[None]
        else:
            diff = np.empty((len(cands), *x.shape), dtype=np.float32)
            xf = np.asarray(x, dtype=np.float32)  # the same cast, done once
            for i, c in enumerate(cands):
                held = held_sketch(chain, c)
                np.subtract(held[:, 0] if k_only else held, xf, diff[i], dtype=np.float32)
        dist = self._rel(diff, norm)  # (m, L)
        cols = [0] if k_only else [0, 1]
        return self._block_share(chain, j, cands, dist, limits, cols, table)

    def _decide_layer(
        self,
        chain: Chain,
        j: int,
        xs: np.ndarray,
        cands: list[int],
        norm: np.ndarray,
        limits: Limits,
        table: Sequence[KVBlock],
    ) -> BlockDecision | None:
        """Layer granularity: each layer of block ``j`` points at its nearest confirming
        candidate. A bound on the first ``_PROBE_COORDS`` coordinates drops the (candidate,
        layer) pairs that cannot confirm; only the candidates with a pair left are compared
        in full, with the float32 arithmetic of comparing every candidate, so the decision
        is the one :meth:`_compare_all` gives (tests/test_cf_topk_reference.py)."""
        if not chain.in_order or cands[-1] >= j:  # a candidate may still change: no bound
            chain.in_order = False
            return self._compare_all(chain, j, xs, cands, norm, limits, table)
        k_only = self.share == "k"
        ncol = 1 if k_only else 2
        s = min(_PROBE_COORDS, xs.shape[-1])
        cands = distinct_content(chain, cands)
        rows, order = probe_rows(chain, j, cands, ncol, s)  # (n, L, C, s), n >= m
        x = to_float32(xs[:, 0] if k_only else xs)  # j holds its own sketch: undecided
        xp = np.array(x[:, None, :s] if k_only else x[..., :s])  # (L, C, s), kept below
        g = rows - xp
        part = np.vecdot(g, g)  # (n, L, C): float32 sums over s of the full check's terms
        tau = max(limits.cmp, limits.tau)
        # (tau ||x||)^2 with slack: see _PROBE_SLACK for why a pair above it cannot confirm
        bound = np.square(norm[:, :ncol])  # float32: its roundings are within the slack
        bound *= np.float32(tau * tau * _PROBE_SLACK)
        bound += _PROBE_FLOOR
        out = part > bound  # NaN is never out: such a pair is compared in full
        dead = out.all(axis=(1, 2)) if k_only else out.any(axis=2).all(axis=1)  # (n,)
        picked = [order[i] for i, gone in enumerate(dead.tolist()) if not gone]
        if len(order) > len(cands):  # rows of the step's earlier candidates not in ``cands``
            now = set(cands)
            picked = [c for c in picked if c in now]
        chain.probe_of[j] = xp  # what j holds, unless it shares below
        if not picked:
            return None
        # rows are in order of first appearance: back to the candidates' (sorted) order
        cands = sorted(picked) if len(picked) > 1 else picked
        if len(cands) == 1:
            diff = np.subtract(self._step_f32(chain, j, cands[0]), x)[None]
        else:
            diff = np.stack([self._step_f32(chain, j, c) for c in cands])
            np.subtract(diff, x, out=diff)
        dist = self._rel(diff, norm)  # (m, L)
        cols = [0] if k_only else [0, 1]
        return layer_share(chain, j, cands, dist, dist <= limits.cmp, cols, table, xp)

    def _compare_all(
        self,
        chain: Chain,
        j: int,
        xs: np.ndarray,
        cands: list[int],
        norm: np.ndarray,
        limits: Limits,
        table: Sequence[KVBlock],
    ) -> BlockDecision | None:
        """Layer granularity, every candidate compared in full (used where a candidate may
        still change what it holds, which the bound's cached rows would miss)."""
        k_only = self.share == "k"
        x = xs[:, 0] if k_only else xs
        if len(cands) == 1:
            one = held_sketch(chain, cands[0])
            diff = np.subtract(one[:, 0] if k_only else one, x, dtype=np.float32)[None]
        else:  # every candidate, cast once per step
            diff = np.stack([self._step_f32(chain, j, c) for c in cands])
            np.subtract(diff, np.asarray(x, dtype=np.float32), out=diff)
        dist = self._rel(diff, norm)  # (m, L)
        cols = [0] if k_only else [0, 1]
        return layer_share(chain, j, cands, dist, dist <= limits.cmp, cols, table, None)

    def _step_f32(self, chain: Chain, j: int, c: int) -> np.ndarray:
        """Candidate ``c``'s held sketch (K and V, or K only) as float32, kept while block
        ``j``'s step is being decided (a step's blocks are decided one after another, and what
        a decided block holds no longer changes)."""
        pos = chain.step_pos[chain.step_of[j]]
        if chain.f32_pos != pos:
            chain.f32_pos, chain.f32 = pos, {}
        got = chain.f32.get(c)
        if got is None:
            held = held_sketch(chain, c)
            got = chain.f32[c] = to_float32(held[:, 0] if self.share == "k" else held)
        return got

    def _limits(self, layers: int) -> Limits:
        """The per-depth constants for ``layers`` (computed once per depth)."""
        got = self._consts.get(layers)
        if got is None:
            need = math.ceil(self.min_layers * layers - 1e-9)
            probe = np.unique(np.linspace(0, layers - 1, min(4, layers)).round().astype(np.int64))
            scale, cmp = None, self.tau
            if self._taus is not None:
                scale, cmp = scales(table_of(self._taus, self.tau, layers))
            tau = float(np.float32(cmp))
            got = self._consts[layers] = Limits(probe, layers - need, need, tau, cmp, scale)
        return got

    def _probe_pass(
        self, chain: Chain, j: int, cands: list[int], norm: np.ndarray, limits: Limits
    ) -> list[int]:
        """Candidates (in order) whose probe layers fail ``tau`` at most ``allowed`` times:
        the full check's own arithmetic on those layers, from the float32 probe rows."""
        assert chain.probe is not None
        rows = chain.probe.view()
        xp = rows[j]
        normp = norm.take(limits.probe, axis=0)  # (probe layers, 2)
        # the step's candidates are fixed (block granularity): their rows are gathered once
        step = chain.neighbours[chain.step_pos[chain.step_of[j]]]
        stack = step.probe_rows
        if cands is not step.held:  # kept under python -O: stale rows would share wrongly
            raise RuntimeError("cf-topk: probe candidates are not the step's held blocks")
        if stack is None:
            stack = rows[cands, :, 0] if self.share == "k" else rows.take(cands, axis=0)
            step.probe_rows = stack
        g = stack - (xp[:, 0] if self.share == "k" else xp)
        if limits.allowed != 0:
            pd = self._rel(g, normp)
            bad = np.count_nonzero(pd > limits.cmp, axis=1)
            ok: list[bool] = (bad <= limits.allowed).tolist()
            return [c for c, kept in zip(cands, ok, strict=True) if kept]
        # the worst layer (of K and V) decides; NaN fails
        pd = np.vecdot(g, g)
        np.sqrt(pd, out=pd)
        pd /= normp[:, 0] if self.share == "k" else normp
        worst: list[float] = pd.reshape(len(cands), -1).max(axis=1).tolist()
        tau = limits.tau  # numpy compares float32 distances in float32
        return [c for c, w in zip(cands, worst, strict=True) if w <= tau]

    def _rel(self, diff: np.ndarray, norm: np.ndarray) -> np.ndarray:
        """``||diff|| / norm`` per candidate and layer from float32 differences (m, L, [2,] d),
        overwriting ``diff``; K only (``norm[:, 0]``), or the max of K and V."""
        rel = np.vecdot(diff, diff)
        np.sqrt(rel, out=rel)
        if self.share == "k":
            rel /= norm[:, 0]
            return rel  # type: ignore[no-any-return]
        rel /= norm
        return np.maximum(rel[..., 0], rel[..., 1])  # type: ignore[no-any-return]  # K/V max

    def _block_share(
        self,
        chain: Chain,
        j: int,
        cands: list[int],
        dist: np.ndarray,
        limits: Limits,
        cols: list[int],
        table: Sequence[KVBlock],
    ) -> BlockDecision | None:
        layers = dist.shape[1]
        need, tau = limits.need, limits.tau  # tau: as numpy compares float32 distances
        if need >= layers and len(cands) == 1:  # the common case, without lists
            if not float(dist.max()) <= tau:  # NaN fails
                return None
            best, lowest = 0, float(dist.sum())
        else:
            if need >= layers:  # every layer must confirm: the worst one decides (NaN fails)
                worst = dist.max(axis=1).tolist()
                eligible = [i for i, w in enumerate(worst) if w <= tau]
            else:
                confirmed = np.count_nonzero(dist <= limits.cmp, axis=1).tolist()
                eligible = [i for i, n in enumerate(confirmed) if n >= need]
            if not eligible:
                return None
            best, lowest = lowest_total(dist, eligible)
        c = cands[best]
        target = table[c]
        d = lowest / layers
        chain.content[j] = c  # every compared page of j now holds c's (c is an owner)
        me = chain.phys[j]
        per_layer = np.asarray(dist[best], dtype=np.float32)
        if len(cols) == 2:
            chain.phys[j] = target.block_id
            return BlockDecision(
                j, expect=me, share_block=target.block_id, distance=d, layer_distance=per_layer
            )
        mask = np.zeros(target.pages.shape, dtype=bool)
        mask[:, cols] = True
        return BlockDecision(
            j,
            expect=me,
            share_mask=mask,
            share_source=target.pages,
            distance=d,
            layer_distance=per_layer,
        )
