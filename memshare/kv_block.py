"""A physical KV block (the target of block-table entries) and where its pages lie.

A block's ``pages`` (L x 2: layer, K/V) name the pages holding its KV; ``distinct`` is their
sorted unique ids. While the pool counts whole blocks (no page shared yet), a block's own pages
are the ``pages_per_block`` consecutive ids of its *slot* (``slot * per .. slot * per + per -
1``), laid over the layers by :class:`PageLayout`, and both arrays are built only when read;
under page accounting they are explicit (``slot`` is then -1).

Invariant: for a slotted block, ``pages`` and ``distinct`` are exactly what the page-accounting
pool would have given it (its own fresh or recycled pages, ascending, owner layers' K and V in
order, the layer map applied).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PageMap = np.ndarray  # (num_layers, 2) int64 page ids: [layer, 0] = K page, [layer, 1] = V page


@dataclass(frozen=True, eq=False)
class PageLayout:
    """How a block's own pages map onto layers: owner layers hold pages, the rest read an
    owner's (``layer_map``, cross-layer sharing)."""

    num_layers: int
    layer_map: np.ndarray  # (L,) the owner layer each layer uses
    owners: np.ndarray = field(init=False)  # sorted owner layers
    per: int = field(init=False)  # pages a block holds: 2 per owner layer

    def __post_init__(self) -> None:
        owners = np.unique(self.layer_map)
        object.__setattr__(self, "owners", owners)
        object.__setattr__(self, "per", 2 * len(owners))

    def place(self, own: np.ndarray) -> PageMap:
        """The (L, 2) page map of a block whose own pages are ``own`` (owner layers' K, V)."""
        own = own.reshape(-1, 2)
        if len(self.owners) == self.num_layers:
            return own.copy()
        pages = np.empty((self.num_layers, 2), dtype=np.int64)
        pages[self.owners] = own
        placed: PageMap = pages[self.layer_map]
        return placed


@dataclass(eq=False, slots=True)
class KVBlock:
    """A physical KV block: the target of block-table entries (module doc)."""

    block_id: int  # unique for the pool's lifetime, never reused (deterministic handle)
    slot: int  # whole-block accounting: the block's pages are its slot's; -1: explicit
    layout: PageLayout = field(repr=False)
    ref_cnt: int = 0  # number of block-table entries (requests) pointing at this block
    block_hash: int | None = None  # published prefix-cache key, or None
    _pages: PageMap | None = field(default=None, repr=False)
    _distinct: np.ndarray | None = field(default=None, repr=False)

    @property
    def pages(self) -> PageMap:
        """Page ids holding this block's KV, per layer and K/V."""
        if self._pages is None:
            self._build()
        assert self._pages is not None
        return self._pages

    @pages.setter
    def pages(self, value: PageMap) -> None:
        self._pages = value

    @property
    def distinct(self) -> np.ndarray:
        """Sorted unique page ids of ``pages`` (what this block holds)."""
        if self._distinct is None:
            self._build()
        assert self._distinct is not None
        return self._distinct

    @distinct.setter
    def distinct(self, value: np.ndarray) -> None:
        self._distinct = value

    def _build(self) -> None:
        """Build both arrays from the slot (a block under page accounting has them)."""
        per = self.layout.per
        own = np.arange(self.slot * per, (self.slot + 1) * per, dtype=np.int64)
        self._distinct = own
        self._pages = self.layout.place(own)

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


def slot_stack(slots: list[int], per: int) -> np.ndarray:
    """The page stack (top at end) that released ``slots`` (pushed in order) stand for: each
    slot's ``per`` pages pushed highest first, so that they pop lowest first."""
    stack = [np.arange((s + 1) * per - 1, s * per - 1, -1, dtype=np.int64) for s in slots]
    return np.concatenate(stack) if stack else np.zeros(0, dtype=np.int64)


def all_distinct(pages: np.ndarray) -> bool:
    """Whether no page id repeats in ``pages`` (a sort, cheaper than ``np.unique``)."""
    if len(pages) < 2:
        return True
    p = np.sort(pages)
    return not bool((p[1:] == p[:-1]).any())
