"""A paged KV block pool with vLLM v1 prefix-caching semantics, accounted in pages.

Memory model (docs/policies.md): one *page* is one layer's K (or V) for one block of tokens. A
:class:`KVBlock` is what a block-table entry points at; its ``pages`` array (L x 2: layer,
K/V) names the pages that hold its KV. In the common case a block's 2L pages are its own;
sharing points some of them at another block's pages (per-layer or keys-only sharing), and a
layer map (cross-layer sharing) lets several layers of one block use the same pages.

Block lifecycle (vLLM v1 ``BlockPool``): ``allocate`` gives blocks with ``ref_cnt == 1``;
``touch`` adds a reference (a prefix-cache hit) and takes the block out of the free queue;
``free`` drops references, and a block whose count reaches 0 goes to the tail of the LRU free
queue if it is published under a hash (so a later request may still hit it), or is destroyed at
once if it is not (nothing could ever find it again). Allocation takes free pages first (the
last released first, then never-held ones), then evicts free-queue blocks from the head (least
recently freed first). Callers free a request's blocks tail-first, so chain ends are evicted
before their prefixes. This is vLLM 0.32's order exactly: its ``free_blocks`` prepends blocks
without a hash to its free queue (reused first, last freed first), never-used blocks follow,
and cached blocks are appended, so a cached block is evicted only once no other block is free
(docs/policies.md, "Eviction order").

Invariants (checked by :meth:`BlockPool.check`, which raises :class:`PoolInvariantError`,
also under ``python -O``; driven by the property tests):

- ``ref_cnt >= 0``; a block with ``ref_cnt == 0`` exists only while it is in the free queue,
  and every block in the free queue has ``ref_cnt == 0`` and a hash.
- ``holders[p]`` = number of existing blocks whose page map contains page ``p`` (counted once
  per block); ``pins[p]`` = the same over blocks with ``ref_cnt > 0``.
- A page is free iff ``holders[p] == 0``; free pages + held pages = total pages.
- Memory follows use, not the budget: pages are handed out lazily. Page ids ``>= _fresh``
  (the high-water mark) have never been held and exist only as a count; released pages go on
  a recycle stack and are reused first (last released, first reused), then fresh ids in
  increasing order. This is exactly the order of one free stack initialised to all pages, so
  page ids are deterministic; ``holders``/``pins`` cover ids ``< _fresh`` (their capacity
  grows by doubling), so a pool of 10^9 free blocks costs what the blocks in use cost.
- Whole-block accounting (until the first page-level share, unless ``page_accounting``):
  every block holds its own ``pages_per_block`` pages, one *slot* of consecutive ids, so the
  counts follow from block counts and the page stack holds whole slots; the same page ids,
  counts and order as page accounting (``tests/test_pool_accounting.py``), page arrays built
  when read (:mod:`memshare.kv_block`). ``holders``/``pins`` switch to page accounting.
- The hash map maps ``h`` to the existing blocks whose ``block_hash == h``, in the order they
  were published; a lookup finds the first (vLLM keeps duplicates: a fully cached, block-aligned
  prompt recomputes its last block and publishes it again under the same hash).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from memshare.kv_block import KVBlock, PageLayout, PageMap, all_distinct, slot_stack
from memshare.pool_check import PoolInvariantError, check_pool
from memshare.pool_stats import PoolStats

__all__ = ["BlockPool", "KVBlock", "PageMap", "PoolInvariantError", "PoolStats"]


@dataclass
class BlockPool:
    """Pages, blocks, ref counts, the prefix-cache hash map and the LRU free queue.

    ``num_blocks`` is the KV budget in blocks of ``2 * num_layers`` pages each (the unit the
    user sets); memory is nevertheless tracked page by page.
    """

    num_blocks: int
    num_layers: int = 1
    layer_map: np.ndarray | None = None  # (L,) layer whose pages each layer uses; None = own
    stats: PoolStats = field(default_factory=PoolStats)
    # count page by page from the start (else only from the first page-level share): the same
    # page ids and counts either way, the plain path the fast one is checked against
    page_accounting: bool = False

    def __post_init__(self) -> None:
        if self.num_blocks < 0 or self.num_layers <= 0:
            raise ValueError("num_blocks must be >= 0 and num_layers > 0")
        lm = np.arange(self.num_layers) if self.layer_map is None else np.asarray(self.layer_map)
        if (
            lm.shape != (self.num_layers,)
            or np.any(lm[lm] != lm)
            or np.any(lm > np.arange(len(lm)))
        ):
            raise ValueError("layer_map must map each layer to itself or an earlier owner layer")
        self.layer_map = lm
        self._layout = PageLayout(self.num_layers, lm)
        self._owner_layers = self._layout.owners  # layers that own pages
        self._per = self._layout.per
        self.num_pages = self.num_blocks * 2 * self.num_layers
        # per-page counts for ids < capacity (>= _fresh); ids >= _fresh were never held
        self._holders = np.zeros(0, dtype=np.int32)
        self._pins = np.zeros(0, dtype=np.int32)
        self._fresh = 0  # next never-held page id (high-water mark)
        self._recycled = np.zeros(0, dtype=np.int64)  # released pages, a stack: top at end
        self._n_recycled = 0
        # Whole-block accounting (``_paged`` False): the page stack only ever holds whole
        # blocks' pages, by induction one *slot* of ``per`` consecutive ids each; ``_slots``
        # (top at end) pops them in the page stack's order. ``_to_pages`` ends it for good.
        self._paged = False
        self._slots: list[int] = []
        self._n_free = self.num_pages  # recycled + never-held pages
        self._n_pinned = 0
        self._next_id = 0
        self._blocks: dict[int, KVBlock] = {}
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict()  # LRU head first
        self._by_hash: dict[int, dict[int, KVBlock]] = {}  # hash -> blocks, first published first
        if self.page_accounting:
            self._to_pages()

    # ----------------------------------------------------------------- queries
    @property
    def pages_per_block(self) -> int:
        """Pages a freshly allocated block holds (2L, fewer under a cross-layer map)."""
        return self._per

    @property
    def used_pages(self) -> int:
        """Pages holding KV (live or cached)."""
        return self.num_pages - self._n_free

    @property
    def pinned_pages(self) -> int:
        """Pages held by at least one live block (not reclaimable)."""
        return self._n_pinned

    @property
    def available_pages(self) -> int:
        """Pages an allocation may obtain: free ones plus those only cached blocks hold."""
        return self.num_pages - self._n_pinned

    @property
    def num_cached_free(self) -> int:
        """Blocks waiting in the LRU free queue."""
        return len(self._free_queue)

    def cached_block(self, block_hash: int) -> KVBlock | None:
        """The first block published under ``block_hash`` that still exists (vLLM's lookup)."""
        blocks = self._by_hash.get(block_hash)
        return next(iter(blocks.values())) if blocks else None

    def block(self, block_id: int) -> KVBlock:
        """An existing block by id (KeyError if it was destroyed)."""
        return self._blocks[block_id]

    @property
    def holders(self) -> np.ndarray:
        """Per page id ``< capacity``: existing blocks holding it (page accounting from now)."""
        self._to_pages()
        return self._holders

    @property
    def pins(self) -> np.ndarray:
        """Per page id ``< capacity``: live blocks holding it (page accounting from now)."""
        self._to_pages()
        return self._pins

    def pages_pinned_by_touch(self, blocks: list[KVBlock]) -> int:
        """Reclaimable pages that ``touch(blocks)`` would pin (so no allocation may take)."""
        if not self._paged:  # an idle block's pages are its own and unpinned: count blocks
            return self._per * len({id(b) for b in blocks if not b.ref_cnt})
        idle = [b.distinct for b in blocks if b.ref_cnt == 0]
        if not idle:
            return 0
        pages = np.concatenate(idle)
        if not all_distinct(pages):
            pages = np.unique(pages)
        return int(np.count_nonzero(self._pins[pages] == 0))

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed now."""
        return n * self.pages_per_block <= self.available_pages

    # ----------------------------------------------------------------- mutation
    def allocate(self, n: int) -> list[KVBlock] | None:
        """``n`` new blocks with ``ref_cnt == 1``, or ``None`` (no change) if they don't fit."""
        if n == 0:
            return []
        per = self._per
        need = n * per
        if need > self.num_pages - self._n_pinned:  # available pages
            return None
        while self._n_free < need:
            self._evict_one()
        self._n_pinned += need  # free pages are distinct and unpinned: pinning is a count
        nid, layout, table = self._next_id, self._layout, self._blocks
        if n == 1 and not self._paged:  # a decode's next block: the commonest call
            blk = table[nid] = KVBlock(nid, self._take_slots(1)[0], layout, 1)
            blocks = [blk]
        elif self._paged:
            taken = self._take(need).reshape(n, per)
            self._holders[taken] += 1
            self._pins[taken.ravel()] += 1
            distinct = np.sort(taken, axis=1)
            blocks = [
                KVBlock(nid + i, -1, layout, 1, None, layout.place(taken[i]), distinct[i])
                for i in range(n)
            ]
            table.update(zip(range(nid, nid + n), blocks, strict=True))
        else:
            ids = range(nid, nid + n)
            blocks = list(map(KVBlock, ids, self._take_slots(n), repeat(layout, n), repeat(1, n)))
            table.update(zip(ids, blocks, strict=True))
        self._next_id = nid + n
        self.stats.allocated_blocks += n
        used = self.num_pages - self._n_free
        if used > self.stats.peak_used_pages:
            self.stats.peak_used_pages = used
        return blocks

    def touch(self, blocks: list[KVBlock]) -> None:
        """Add one reference to each block (a hit or a share), reviving cached-free ones."""
        revived: list[KVBlock] = []
        for blk in blocks:
            if blk.ref_cnt == 0:
                del self._free_queue[blk.block_id]
                revived.append(blk)
            blk.ref_cnt += 1
        self.stats.hits += len(blocks)
        if not revived:
            return
        if self._paged:
            self._pin(np.concatenate([blk.distinct for blk in revived]))
        else:  # a revived block's pages were its own and unpinned
            self._n_pinned += self._per * len(revived)

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block, in the order given (pass a table reversed).

        A block reaching 0 is queued for LRU eviction if it has a hash, else destroyed.
        """
        if not self._paged:
            self._free_whole(blocks)
            return
        released: list[KVBlock] = []
        for blk in blocks:
            if blk.ref_cnt <= 0:
                raise ValueError(f"double free of {blk!r}")
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                released.append(blk)
        if not released:
            return
        self._unpin(np.concatenate([blk.distinct for blk in released]))
        for blk in released:
            if blk.block_hash is not None:
                self._free_queue[blk.block_id] = blk
            else:
                self._destroy(blk)

    def _free_whole(self, blocks: list[KVBlock]) -> None:
        """:meth:`free` under whole-block accounting, in one pass: a released block's pages
        were its own; one with a hash is queued, one without goes back as its slot."""
        table, queue, push = self._blocks, self._free_queue, self._slots.append
        released = gone = 0
        for blk in blocks:
            ref = blk.ref_cnt
            if ref == 1:
                blk.ref_cnt = 0
                released += 1
                if blk.block_hash is None:  # _destroy, for a block without a hash
                    del table[blk.block_id]
                    push(blk.slot)
                    gone += 1
                else:
                    queue[blk.block_id] = blk
            elif ref > 1:
                blk.ref_cnt = ref - 1
            else:
                raise ValueError(f"double free of {blk!r}")
        per = self._per
        self._n_pinned -= released * per
        self._n_recycled += gone * per
        self._n_free += gone * per

    def publish(self, blk: KVBlock, block_hash: int) -> bool:
        """Make a live, full block findable under ``block_hash`` (after any block already
        published under it, as vLLM does); False if ``blk`` already has a hash."""
        if blk.block_hash is not None:
            return False
        blk.block_hash = block_hash
        self._by_hash.setdefault(block_hash, {})[blk.block_id] = blk
        return True

    def share_pages(self, blk: KVBlock, mask: np.ndarray, source: PageMap) -> int:
        """Point ``blk``'s pages where ``mask`` (L x 2) is set at ``source`` pages (zero copy).

        ``blk`` must be live; source pages must hold KV (held by some block). Pages ``blk`` no
        longer uses are released. Returns the number of pages freed by the share.
        """
        if blk.ref_cnt <= 0:
            raise ValueError(f"share_pages on a block that is not live: {blk!r}")
        self._to_pages()
        src = np.asarray(source)[mask]
        if src.size and (
            np.any(src < 0) or np.any(src >= self._fresh) or np.any(self._holders[src] <= 0)
        ):
            raise ValueError("share_pages: a source page holds no KV")
        new_pages = blk.pages.copy()
        new_pages[mask] = src
        new_distinct = np.unique(new_pages)
        gained = np.setdiff1d(new_distinct, blk.distinct, assume_unique=True)
        lost = np.setdiff1d(blk.distinct, new_distinct, assume_unique=True)
        self._holders[gained] += 1
        self._pin(gained)
        self._unpin(lost)
        self._holders[lost] -= 1
        self._release(lost)
        blk.pages, blk.distinct = new_pages, new_distinct
        return int(np.count_nonzero(self._holders[lost] == 0))

    def evict_all_cached(self) -> None:
        """Drop every cached-free block (e.g. a cache reset)."""
        while self._free_queue:
            self._evict_one()

    # ----------------------------------------------------------------- internals
    def _take_slots(self, n: int) -> list[int]:
        """Whole-block accounting: ``n`` slots, in the order ``_take`` would give their pages
        (released slots, last first, then fresh ones); takes them."""
        per, slots = self._per, self._slots
        self._n_free -= n * per
        if n == 1 and slots:  # a decode's new block, the commonest call
            self._n_recycled -= per
            return [slots.pop()]
        k = min(n, len(slots))
        got = slots[len(slots) - k :][::-1]
        del slots[len(slots) - k :]
        if k < n:
            first = self._fresh // per
            got.extend(range(first, first + n - k))
            self._fresh += (n - k) * per
        self._n_recycled -= k * per
        return got

    def _to_pages(self) -> None:
        """Switch to page-by-page accounting (once): give every block its arrays and build
        ``holders``, ``pins`` and the page stack from the blocks and the released slots."""
        if self._paged:
            return
        self._paged = True
        self._grow(self._fresh)
        for blk in self._blocks.values():
            self._holders[blk.distinct] += 1
            if blk.ref_cnt > 0:
                self._pins[blk.distinct] += 1
            blk.slot = -1
        self._recycled = slot_stack(self._slots, self._per)
        self._slots = []
        self._n_recycled = len(self._recycled)

    def _take(self, need: int) -> np.ndarray:
        """``need`` free pages: recycled ones (last released first), then fresh ids in
        increasing order. The caller has made sure ``need <= _n_free``."""
        k = min(need, self._n_recycled)
        top = self._n_recycled
        recycled = self._recycled[top - k : top][::-1]
        self._n_recycled = top - k
        fresh = np.arange(self._fresh, self._fresh + need - k, dtype=np.int64)
        if len(fresh):
            self._fresh += len(fresh)
            self._grow(self._fresh)
        self._n_free -= need
        return np.concatenate([recycled, fresh]) if k else fresh

    def _grow(self, size: int) -> None:
        """Make ``holders``/``pins`` cover page ids ``< size`` (capacity doubles, capped at
        the budget)."""
        cap = len(self._holders)
        if size <= cap:
            return
        new_cap = min(max(size, 2 * cap, 1024), self.num_pages)
        for name in ("_holders", "_pins"):
            old = getattr(self, name)
            arr = np.zeros(new_cap, dtype=np.int32)
            arr[:cap] = old
            setattr(self, name, arr)

    def _pin(self, pages: np.ndarray) -> None:
        """One more live holder for each entry of ``pages`` (repeats allowed)."""
        if all_distinct(pages):  # the common case: plain fancy indexing, no ufunc.at / unique
            self._pins[pages] += 1
            self._n_pinned += int(np.count_nonzero(self._pins[pages] == 1))
            return
        np.add.at(self._pins, pages, 1)
        touched = np.unique(pages)
        counts = self._pins[touched]
        # a page is newly pinned iff its count now equals its multiplicity in ``pages``
        mult = np.bincount(np.searchsorted(touched, pages), minlength=len(touched))
        self._n_pinned += int(np.count_nonzero(counts == mult))

    def _unpin(self, pages: np.ndarray) -> None:
        """One live holder fewer for each entry of ``pages`` (repeats allowed)."""
        if all_distinct(pages):
            self._pins[pages] -= 1
            self._n_pinned -= int(np.count_nonzero(self._pins[pages] == 0))
            return
        np.subtract.at(self._pins, pages, 1)
        self._n_pinned -= int(np.count_nonzero(self._pins[np.unique(pages)] == 0))

    def _release(self, pages: np.ndarray) -> None:
        """Push pages whose holder count reached 0 onto the free stack."""
        gone = pages[self._holders[pages] == 0]
        k = len(gone)
        if not k:
            return
        top = self._n_recycled
        if top + k > len(self._recycled):
            grown = np.empty(max(top + k, 2 * len(self._recycled), 1024), dtype=np.int64)
            grown[:top] = self._recycled[:top]
            self._recycled = grown
        self._recycled[top : top + k] = gone[::-1]
        self._n_recycled = top + k
        self._n_free += k

    def _destroy(self, blk: KVBlock) -> None:
        del self._blocks[blk.block_id]
        if blk.block_hash is not None:
            same = self._by_hash[blk.block_hash]
            del same[blk.block_id]
            if not same:
                del self._by_hash[blk.block_hash]
        if self._paged:
            self._holders[blk.distinct] -= 1
            self._release(blk.distinct)
        else:  # its pages were its own: they go back as its slot
            self._slots.append(blk.slot)
            self._n_recycled += self._per
            self._n_free += self._per

    def _evict_one(self) -> None:
        _, blk = self._free_queue.popitem(last=False)
        self.stats.evicted_blocks += 1
        self._destroy(blk)

    # ----------------------------------------------------------------- checking
    def check(self, live_refs: dict[int, int] | None = None) -> None:
        """Recompute every invariant from scratch; :class:`PoolInvariantError` names the first
        broken one (:func:`memshare.pool_check.check_pool`; it changes no accounting mode).

        ``live_refs``: block id -> number of block-table entries pointing at it, if known.
        """
        check_pool(self, live_refs)
