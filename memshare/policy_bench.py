"""``memshare bench policy``: a policy's decision time per filled block at scale.

A synthetic but realistically shaped workload: ``chains`` requests of ``blocks_per_chain``
blocks stay resident together (100k blocks by default), each a reasoning chain whose steps
(``step_blocks`` blocks each) partly repeat earlier steps' tokens and, with small noise,
their K/V sketches (SmolLM2-135M shape: 30 layers, d = 64). The manager and pool are the real
ones; only the policy's ``on_block_full`` is timed (perf_counter_ns around each call).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.hashing import chain_hashes
from memshare.kv_manager import KVCacheManager
from memshare.policy import BlockDecision, FullBlock, Policy, PrefixHit, RequestInfo
from memshare.registry import make_policy
from memshare.sketch import DEFAULT_DIM


@dataclass
class _Timed:
    """Forwards to a policy and records how long each ``on_block_full`` takes."""

    inner: Policy
    ns: list[int]
    name: str = "timed"

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        return self.inner.lookup_prefix(req, pool)

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        t0 = time.perf_counter_ns()
        out = self.inner.on_block_full(blk, table, pool)
        self.ns.append(time.perf_counter_ns() - t0)
        return out

    def on_request_end(self, req_id: str) -> None:
        self.inner.on_request_end(req_id)


def _chain(
    rng: np.random.Generator, n: int, bs: int, layers: int, d: int, step_blocks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Tokens (n, bs), sketches (n, L, 2, d), norms (n, L, 2), step per block."""
    tokens = rng.integers(0, 49_152, size=(n, bs))
    sketch = rng.standard_normal((n, layers, 2, d)).astype(np.float16)
    steps = [i // step_blocks for i in range(n)]
    for s in range(2, n // step_blocks):
        if rng.random() < 0.3:  # a repeated step ("wait, let me check ...")
            src = int(rng.integers(0, s - 1))
            a, b = s * step_blocks, src * step_blocks
            tokens[a : a + step_blocks] = tokens[b : b + step_blocks]
            noise = rng.standard_normal((step_blocks, layers, 2, d)) * 0.05
            sketch[a : a + step_blocks] = sketch[b : b + step_blocks] + noise
    norm = np.linalg.norm(sketch.astype(np.float32), axis=-1)
    return tokens, sketch, norm, steps


def bench_policy(
    policy: str = "cf-topk",
    params: dict[str, Any] | None = None,
    resident_blocks: int = 100_000,
    blocks_per_chain: int = 1_000,
    block_size: int = 16,
    layers: int = 30,
    sketch_dim: int = DEFAULT_DIM,
    step_blocks: int = 6,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Fill ``resident_blocks`` blocks through the manager; per-call decision times in µs."""
    rng = np.random.default_rng(seed)
    chains = max(1, resident_blocks // blocks_per_chain)
    ns: list[int] = []
    inner = make_policy(policy, **(params or {}))
    timed = _Timed(inner, ns, inner.name)
    pool = BlockPool(num_blocks=chains * blocks_per_chain + 1, num_layers=layers)
    mgr = KVCacheManager(pool, timed, block_size)
    for c in range(chains):
        tokens, sketch, norm, steps = _chain(
            rng, blocks_per_chain, block_size, layers, sketch_dim, step_blocks
        )
        rid = f"chain-{c}"
        info = RequestInfo(rid, block_size, block_size, chain_hashes(tokens.ravel(), block_size))

        def block(i: int, rid: str = rid, t: Any = (tokens, sketch, norm, steps)) -> FullBlock:
            return FullBlock(rid, i, None, t[0][i], t[3][i], t[1][i], t[2][i])

        if mgr.admit(info, block_size, block) is None:
            raise RuntimeError("benchmark pool too small")
        mgr.commit(rid)
        for _ in range(blocks_per_chain - 1):
            if not mgr.allocate_slots(rid, block_size):
                raise RuntimeError("benchmark pool too small")
            mgr.commit(rid)
        if progress is not None:
            progress(c + 1, chains)
    us = np.asarray(ns, dtype=np.float64) / 1e3
    return {
        "policy": policy,
        "params": params or {},
        "resident_logical_blocks": len(ns),
        "resident_physical_blocks": pool.used_pages / pool.pages_per_block,
        "us_per_block_mean": float(us.mean()),
        "us_per_block_p50": float(np.percentile(us, 50)),
        "us_per_block_p99": float(np.percentile(us, 99)),
        "shared_blocks": mgr.stats.shared_blocks,
        "pages_shared": mgr.stats.pages_shared,
        "pages_written": mgr.stats.pages_written,
        "target_us": 20.0,
    }
