"""cf-topk's layer-granularity decisions against a brute-force reference.

The policy drops (candidate, layer) pairs by a bound on the first sketch coordinates and
compares only the candidates left in full; the reference compares every candidate at every
layer, one row at a time, straight from the sketches of the blocks whose content each layer
holds. Both run through the real manager on the same seeded chains, built so that many
distances fall near ``tau`` (and some differences sit wholly in the bounded coordinates, where
the bound is tight); every decision, its distance included, must be the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from memshare.block_pool import BlockPool, KVBlock
from memshare.hashing import chain_hashes
from memshare.kv_manager import KVCacheManager, ManagerStats
from memshare.policies.cf_topk import CfTopK
from memshare.policies.cf_topk_index import Chain, Limits, link
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo

BS, LAYERS = 4, 5


@dataclass
class Req:
    """One request's blocks: tokens (n, BS), steps, sketches (n, L, 2, d), norms (n, L, 2)."""

    tokens: np.ndarray
    steps: list[int]
    sketch: np.ndarray
    norm: np.ndarray


def make_req(
    rng: np.random.Generator, d: int, dtype: type[np.floating], tau: float, resume: bool = False
) -> Req:
    """Steps of 1-3 blocks; about half repeat an earlier step's tokens with KV at relative
    distances of 0.5 to 1.5 tau per layer (some differences only in the first 32
    coordinates, some far below float32's resolution), a few sketches with NaN or inf;
    ``resume``: some blocks go back to an earlier step (its blocks then come after later
    steps' blocks, so a candidate may be a block not yet decided)."""
    steps: list[int] = []
    src: list[int] = []  # per block: the block it copies, or -1
    while len(steps) < 40:
        s = len(set(steps))
        n = int(rng.integers(1, 4))
        earlier = sorted(set(steps))
        if earlier and rng.random() < 0.55:
            t = int(rng.choice(earlier))
            blocks = [i for i, x in enumerate(steps) if x == t]
            src += [blocks[i % len(blocks)] for i in range(n)]
        else:
            src += [-1] * n
        steps += [s] * n
    count = len(steps)
    if resume:
        for i in rng.choice(np.arange(8, count), size=6, replace=False).tolist():
            steps[i] = int(rng.integers(0, steps[i]))
    tokens = rng.integers(100, 50_000, size=(count, BS))
    sketch = rng.standard_normal((count, LAYERS, 2, d)).astype(np.float32)
    scale = max(tau, 0.05)
    for i, c in enumerate(src):
        if c < 0:
            continue
        tokens[i] = tokens[c]
        base = sketch[c].astype(dtype).astype(np.float32)
        direction = rng.standard_normal((LAYERS, 2, d)).astype(np.float32)
        kind = rng.random()
        if kind < 0.3:  # the whole difference in the coordinates the bound reads
            direction[..., 32:] = 0.0
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        rel = scale * rng.uniform(0.5, 1.5, size=(LAYERS, 2, 1)).astype(np.float32)
        if kind > (0.5 if tau == 0 else 0.9):  # identical, or differing by next to nothing
            rel *= np.float32(0.0 if rng.random() < 0.5 else 1e-30)
        norm = np.linalg.norm(base, axis=-1, keepdims=True)
        sketch[i] = base + rel * norm * direction
    sketch = sketch.astype(dtype)
    norm = np.linalg.norm(sketch.astype(np.float32), axis=-1)
    for _ in range(2):  # NaN and inf sketch values, inside and beyond the bounded coordinates
        i, layer = int(rng.integers(1, count)), int(rng.integers(0, LAYERS))
        sketch[i, layer, 0, int(rng.integers(0, d))] = rng.choice([np.nan, np.inf])
    return Req(tokens, steps, sketch, norm)


@dataclass
class Reference(CfTopK):
    """cf-topk whose layer decisions compare every candidate at every layer, row by row."""

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
        cols = [0] if self.share == "k" else [0, 1]
        layers = xs.shape[0]
        tau = np.float32(self.tau)
        mask = np.zeros(table[j].pages.shape, dtype=bool)
        source = table[j].pages.copy()
        held = np.full(layers, j, dtype=np.int64)
        chosen: list[np.float32] = []
        picked: set[int] = set()
        for layer in range(layers):
            best: tuple[np.float32, int] | None = None
            for row, c in enumerate(cands):
                owners = chain.layer_content.get(c)
                owner = c if owners is None else int(owners[layer])
                dist = None
                for col in cols:
                    a = np.asarray(chain.sketch[owner][layer, col], dtype=np.float32)
                    diff = a - np.asarray(xs[layer, col], dtype=np.float32)
                    rel = np.sqrt(np.vecdot(diff, diff)) / norm[layer, col]
                    dist = rel if dist is None else np.maximum(dist, rel)
                assert dist is not None
                if dist <= tau and (best is None or dist < best[0]):
                    best = (dist, row)
            if best is None:
                continue
            c = cands[best[1]]
            owners = chain.layer_content.get(c)
            for col in cols:
                mask[layer, col] = True
                source[layer, col] = table[c].pages[layer, col]
            held[layer] = c if owners is None else owners[layer]
            chosen.append(best[0])
            picked.add(best[1])
        if not chosen:
            return None
        for row in sorted(picked):
            link(chain, j, cands[row])
        chain.layer_content[j] = held
        d = float(np.array(chosen, dtype=np.float32).mean())
        return BlockDecision(
            j, expect=chain.phys[j], share_mask=mask, share_source=source, distance=d
        )


@dataclass
class Recorder:
    """Forwards to a policy and keeps every decision it makes."""

    inner: CfTopK
    seen: list[BlockDecision]
    name: str = "recorded"

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        return self.inner.lookup_prefix(req, pool)

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        out = self.inner.on_block_full(blk, table, pool)
        self.seen.extend(out)
        return out

    def on_request_end(self, req_id: str) -> None:
        self.inner.on_request_end(req_id)


def drive(policy: CfTopK, reqs: list[Req]) -> tuple[list[BlockDecision], ManagerStats]:
    """Fill every request through the manager, the requests interleaved block by block."""
    seen: list[BlockDecision] = []
    total = sum(len(r.steps) for r in reqs)
    pool = BlockPool(num_blocks=total + 8, num_layers=LAYERS)
    mgr = KVCacheManager(pool, Recorder(policy, seen), BS)
    for n, r in enumerate(reqs):
        rid = f"r{n}"

        def block(i: int, rid: str = rid, r: Req = r) -> FullBlock:
            return FullBlock(rid, i, None, r.tokens[i], r.steps[i], r.sketch[i], r.norm[i])

        info = RequestInfo(rid, BS, BS, chain_hashes(r.tokens.ravel(), BS))
        assert mgr.admit(info, BS, block) is not None
        mgr.commit(rid)
    for i in range(1, max(len(r.steps) for r in reqs)):
        for n, r in enumerate(reqs):
            if i < len(r.steps):
                assert mgr.allocate_slots(f"r{n}", BS)
                mgr.commit(f"r{n}")
    pool.check(mgr.table_refs())
    return seen, mgr.stats


def same(a: BlockDecision, b: BlockDecision) -> bool:
    def eq(x: np.ndarray | None, y: np.ndarray | None) -> bool:
        return (x is None and y is None) or (
            x is not None and y is not None and np.array_equal(x, y)
        )

    return (
        (a.index, a.expect, a.share_block) == (b.index, b.expect, b.share_block)
        and eq(a.share_mask, b.share_mask)
        and eq(a.share_source, b.share_source)
        and (a.distance == b.distance or (a.distance != a.distance and b.distance != b.distance))
    )


@pytest.mark.parametrize("share", ["k", "kv"])
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.4, 1.5])
@pytest.mark.parametrize(
    ("d", "dtype", "resume"),
    [
        (256, np.float16, False),
        (64, np.float32, False),
        (16, np.float16, False),
        (64, np.float16, True),
    ],
)
def test_layer_decisions_equal_the_brute_force_reference(
    share: str, tau: float, d: int, dtype: type[np.floating], resume: bool
) -> None:
    rng = np.random.default_rng([7, d, int(tau * 10), len(share), int(resume)])
    reqs = [make_req(rng, d, dtype, tau, resume) for _ in range(3)]
    params: dict[str, object] = {
        "granularity": "layer",
        "share": share,
        "tau": tau,
        "k": 3,
        "window": int(rng.integers(0, 2)),
    }
    got, got_stats = drive(CfTopK(**params), reqs)  # type: ignore[arg-type]
    want, want_stats = drive(Reference(**params), reqs)  # type: ignore[arg-type]
    print(
        len(want),
        sum(int(np.count_nonzero(w.share_mask)) for w in want if w.share_mask is not None),
    )
    assert len(want) > 5  # the data must give the check something to compare
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert same(a, b), (a, b)
    assert got_stats.layer_pages_shared is not None and want_stats.layer_pages_shared is not None
    assert np.array_equal(got_stats.layer_pages_shared, want_stats.layer_pages_shared)
    got_stats.layer_pages_shared = want_stats.layer_pages_shared = None
    assert got_stats == want_stats
