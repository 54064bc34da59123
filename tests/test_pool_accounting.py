"""Whole-block pool accounting against page accounting: under random allocate / publish /
touch / free / evict sequences (and a page-level share part way, which switches the fast pool
to page accounting), both pools give every block the same page ids and agree on every count."""

from __future__ import annotations

import numpy as np
import pytest

from memshare.block_pool import BlockPool, KVBlock


def _state(pool: BlockPool, live: list[KVBlock]) -> tuple[object, ...]:
    return (
        pool.used_pages,
        pool.pinned_pages,
        pool.available_pages,
        pool.num_cached_free,
        tuple((b.block_id, b.ref_cnt, b.block_hash, b.pages.tobytes()) for b in live),
    )


@pytest.mark.parametrize("layer_map", [None, [0, 1, 1, 3]])
@pytest.mark.parametrize("share_at", [None, 150])
@pytest.mark.parametrize("seed", range(4))
def test_whole_block_and_page_accounting_agree(
    seed: int, share_at: int | None, layer_map: list[int] | None
) -> None:
    lm = None if layer_map is None else np.array(layer_map)
    fast = BlockPool(num_blocks=12, num_layers=4, layer_map=lm)
    plain = BlockPool(num_blocks=12, num_layers=4, layer_map=lm, page_accounting=True)
    pools = (fast, plain)
    live: tuple[list[KVBlock], list[KVBlock]] = ([], [])  # one entry per reference held
    rng = np.random.default_rng(seed)
    for step in range(300):
        op = rng.integers(5)
        if step == share_at and live[0] and len(live[0]) > 1:
            i, j = rng.integers(len(live[0]), size=2)
            mask = rng.random((4, 2)) < 0.5
            for pool, held in zip(pools, live, strict=True):
                pool.share_pages(held[i], mask, held[j].pages)
        elif op == 0:
            n = int(rng.integers(1, 4))
            got = [pool.allocate(n) for pool in pools]
            assert (got[0] is None) == (got[1] is None)
            if got[0] is not None and got[1] is not None:
                live[0].extend(got[0])
                live[1].extend(got[1])
        elif op == 1 and live[0]:
            i = int(rng.integers(len(live[0])))
            h = int(rng.integers(4))
            for pool, held in zip(pools, live, strict=True):
                if held[i].block_hash is None:
                    pool.publish(held[i], h)
        elif op == 2 and live[0]:
            i = int(rng.integers(len(live[0])))
            for pool, held in zip(pools, live, strict=True):
                pool.free([held.pop(i)])
        elif op == 3:
            h = int(rng.integers(4))
            a, b = (pool.cached_block(h) for pool in pools)
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert fast.pages_pinned_by_touch([a]) == plain.pages_pinned_by_touch([b])
                fast.touch([a])
                plain.touch([b])
                live[0].append(a)
                live[1].append(b)
        elif op == 4 and rng.random() < 0.1:
            for pool in pools:
                pool.evict_all_cached()
        assert _state(fast, live[0]) == _state(plain, live[1])
        for pool in pools:
            pool.check()
    assert fast.stats == plain.stats
