"""Invariant checks of a :class:`~memshare.block_pool.BlockPool`, recomputed from scratch.

:func:`check_pool` rebuilds per-page holder and pin counts from the existing blocks and
compares them with the pool's accounting: the per-page arrays where the pool counts page by
page, the block counts where it counts whole blocks (every page then has at most one holder,
its block). Explicit raises, not ``assert``: the check holds under ``python -O`` too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memshare.kv_block import slot_stack

# The pool is typed Any here: memshare.block_pool imports this module, and the layout keeps
# modules from importing each other (even for types); check_pool reads the pool's private
# fields, which only BlockPool.check hands it.
Pool = Any


class PoolInvariantError(AssertionError):
    """A :class:`BlockPool` invariant is broken (raised by :meth:`BlockPool.check`). An
    ``AssertionError`` so that callers written against the old ``assert`` checks still catch
    it, but raised explicitly: ``python -O`` does not remove it."""


def _require(ok: bool | np.bool_, message: str, *args: object) -> None:
    """Raise :class:`PoolInvariantError` with ``message.format(*args)`` unless ``ok`` (the
    message is formatted only on failure: ``check`` runs once per block on hot paths)."""
    if not ok:
        raise PoolInvariantError(message.format(*args))


def check_pool(pool: Pool, live_refs: dict[int, int] | None = None) -> None:
    """Every invariant of ``pool`` (module doc); ``live_refs``: block id -> block-table entries
    pointing at it, if known. Changes nothing."""
    paged, stored_holders, stored_pins, free = _page_state(pool)
    cap = len(stored_holders)
    fresh = pool._fresh
    ok = len(stored_pins) == cap and fresh <= cap <= pool.num_pages
    _require(ok, "bad capacity")
    holders, pins = _recount(pool, cap)
    _require(np.array_equal(holders, stored_holders), "holder counts drifted")
    _require(np.array_equal(pins, stored_pins), "pin counts drifted")
    _require(paged or not np.any(holders > 1), "a page held twice under whole-block accounting")
    _require(pool._n_pinned == int(np.count_nonzero(pins)), "pinned page count drifted")
    _require(not np.any(holders[fresh:]), "a never-held page is referenced")
    _require(len(np.unique(free)) == len(free), "a page is on the free stack twice")
    _require(bool(np.all(free < fresh)), "a never-held page is on the recycle stack")
    _require(bool(np.all(holders[free] == 0)), "a page is both free and referenced")
    _require(len(free) == pool._n_recycled, "recycled page count")
    ok = pool._n_free == pool._n_recycled + pool.num_pages - fresh
    _require(ok, "free count")
    ok = pool._n_free + int(np.count_nonzero(holders)) == pool.num_pages
    _require(ok, "free + used != total pages")
    if live_refs is not None:
        for bid, blk in pool._blocks.items():
            ok = blk.ref_cnt == live_refs.get(bid, 0)
            _require(ok, "ref count != table refs: {!r}", blk)
        ok = all(bid in pool._blocks for bid in live_refs)
        _require(ok, "table points at a dead block")


def _recount(pool: Pool, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Holders and pins per page id ``< cap`` from the existing blocks; checks each block's
    own invariants (ref count, distinct pages, free queue, hash map) on the way."""
    holders = np.zeros(cap, dtype=np.int64)
    pins = np.zeros(cap, dtype=np.int64)
    queue, by_hash = pool._free_queue, pool._by_hash
    for blk in pool._blocks.values():
        _require(blk.ref_cnt >= 0, "negative ref count: {!r}", blk)
        ok = np.array_equal(blk.distinct, np.unique(blk.pages))
        _require(ok, "stale distinct {!r}", blk)
        holders[blk.distinct] += 1
        if blk.ref_cnt > 0:
            pins[blk.distinct] += 1
            _require(blk.block_id not in queue, "live block queued: {!r}", blk)
        else:
            _require(blk.block_id in queue, "unreferenced block leaked: {!r}", blk)
            _require(blk.block_hash is not None, "unhashed block queued: {!r}", blk)
        if blk.block_hash is not None:
            same = by_hash.get(blk.block_hash, {})
            _require(same.get(blk.block_id) is blk, "hash map misses {!r}", blk)
    for h, same in by_hash.items():
        _require(bool(same), "empty hash entry {}", h)
        for bid, blk in same.items():
            _require(blk.block_hash == h and pool._blocks.get(bid) is blk, "stale hash")
    for bid in queue:
        _require(bid in pool._blocks, "free queue holds destroyed block {}", bid)
    return holders, pins


def _page_state(pool: Pool) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    """``(paged, holders, pins, free stack)`` as stored (page accounting) or as implied by the
    blocks (whole-block accounting: each page held once, by its block); changes nothing."""
    if pool._paged:
        return True, pool._holders, pool._pins, pool._recycled[: pool._n_recycled]
    holders = np.zeros(pool._fresh, dtype=np.int64)
    pins = np.zeros(pool._fresh, dtype=np.int64)
    for blk in pool._blocks.values():
        holders[blk.distinct] += 1
        pins[blk.distinct] += int(blk.ref_cnt > 0)
    free = slot_stack(pool._slots, pool._per)
    return False, holders, pins, free
