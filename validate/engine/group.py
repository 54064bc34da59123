"""Several paged engines stepping in one forward pass (docs/validate.md, "Runs in one pass").

``memshare validate`` of a sweep runs one engine per configuration over the same texts. Each
engine keeps its own scheduler, manager, policy and pages, so its decisions are exactly its
own; only the forward pass is shared, as continuous batching shares it between requests. The
engines' page stores are consecutive parts of one arena (:meth:`PageStore.part`); a step
gathers every engine's chunks, shifts their page ids by the engine's first arena page, runs
them through one :class:`~memshare.validate.engine.model.PagedModel` over the arena, and hands
each engine its own chunks' logits.

Invariants: a chunk reads and writes only pages of its own engine's part (ids shifted by that
part's offset), so what an engine computes does not depend on the other engines (up to the
floating-point order of a larger matrix product); every engine in a group has the group's
layer map; an engine that has finished takes no part in later steps. The step's wall time is
the shared pass's, so an engine's own time is not measured in a group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.block_pool import BlockPool
from memshare.policy import Policy, policy_layer_map
from memshare.validate.engine.model import PagedModel, SeqChunk
from memshare.validate.engine.paged_engine import PagedEngine
from memshare.validate.engine.store import PageStore


class EngineGroup:
    """An arena of pages cut into one part per engine, and the model pass they share."""

    def __init__(
        self,
        model: Any,
        num_pages: Sequence[int],
        block_size: int,
        layer_map: npt.ArrayLike | None = None,
    ) -> None:
        """``num_pages[i]``: pages of engine ``i`` (its pool's ``num_pages``)."""
        if not num_pages or min(num_pages) <= 0:
            raise ValueError("an engine group needs at least one engine with pages")
        self.arena = PageStore.for_model(model, sum(num_pages), block_size)
        starts = np.concatenate([[0], np.cumsum(num_pages)[:-1]]).astype(np.int64)
        self.offsets: list[int] = [int(x) for x in starts]
        self.stores = [
            self.arena.part(o, int(n)) for o, n in zip(self.offsets, num_pages, strict=True)
        ]
        self.model = PagedModel(model, self.arena, layer_map=layer_map)
        self.engines: list[PagedEngine] = []
        self.passes = 0  # shared forward passes run

    def attach(self, engines: Sequence[PagedEngine]) -> None:
        """The engines built on :attr:`stores` (in order); checks stores and layer maps."""
        if len(engines) != len(self.stores):
            raise ValueError(f"{len(engines)} engines for {len(self.stores)} stores")
        for i, (eng, store) in enumerate(zip(engines, self.stores, strict=True)):
            if eng.store is not store:
                raise ValueError(f"engine {i} does not run on the group's store {i}")
            if not np.array_equal(np.asarray(eng.pool.layer_map), self.model.layer_map):
                raise ValueError(f"engine {i} has another layer map than the group")
        self.engines = list(engines)

    def step(self) -> list[bool]:
        """One step of every engine that has work, in one forward pass; per engine, whether
        it stepped (False: it had finished)."""
        pending = [e.begin_step() for e in self.engines]
        chunks: list[SeqChunk] = []
        for p, off in zip(pending, self.offsets, strict=True):
            if p is not None:
                chunks.extend(_shifted(c, off, self.arena.block_size) for c in p.chunks)
        if not chunks:
            return [False] * len(self.engines)
        t = time.perf_counter()
        logits = self.model.step(chunks)
        forward_s = time.perf_counter() - t
        self.passes += 1
        i = 0
        for eng, p in zip(self.engines, pending, strict=True):
            if p is not None:
                eng.finish_step(p, logits[i : i + len(p.chunks)], forward_s)
                i += len(p.chunks)
        return [p is not None for p in pending]

    def close(self) -> None:
        """Remove the forward hooks the shared pass put on the model (the engines' runs
        stay readable)."""
        self.model.close()


def _shifted(c: SeqChunk, offset: int, block_size: int) -> SeqChunk:
    """``c`` with its page ids (and copy rows) moved to the engine's part of the arena."""
    pages = np.asarray(c.pages, dtype=np.int64) + offset
    src = None if c.copy_src is None else np.asarray(c.copy_src, np.int64) + offset * block_size
    return replace(c, pages=pages, copy_src=src)


Groups = list[tuple[EngineGroup, list[int]]]  # each group and the indices of its engines


def grouped_engines(
    model: Any,
    policies: Sequence[Policy],
    num_blocks: int,
    block_size: int,
    make: Callable[[int, PageStore], PagedEngine],
) -> tuple[list[PagedEngine], Groups]:
    """One engine per policy (``make(i, store)`` builds engine ``i`` on its part of an arena,
    for a pool of ``num_blocks``), in one :class:`EngineGroup` per KV layer map; returns the
    engines in ``policies`` order and the groups with the indices of their engines."""
    layers = int(model.config.num_hidden_layers)
    pages = BlockPool(num_blocks=num_blocks, num_layers=layers).num_pages
    maps: dict[bytes, tuple[Any, list[int]]] = {}
    for j, policy in enumerate(policies):
        try:
            lm = policy_layer_map(policy, layers)
        except ValueError:
            lm = None  # the engine refuses it, in one line
        key = b"" if lm is None else np.asarray(lm, np.int64).tobytes()
        maps.setdefault(key, (lm, []))[1].append(j)
    engines: dict[int, PagedEngine] = {}
    groups: Groups = []
    for lm, members in maps.values():
        group = EngineGroup(model, [pages] * len(members), block_size, layer_map=lm)
        for j, store in zip(members, group.stores, strict=True):
            engines[j] = make(j, store)
        group.attach([engines[j] for j in members])
        groups.append((group, members))
    return [engines[j] for j in range(len(policies))], groups


def step_groups(groups: Groups, num_engines: int) -> list[bool]:
    """One step of every group; per engine (by index), whether it stepped."""
    stepped = [False] * num_engines
    for group, members in groups:
        for j, flag in zip(members, group.step(), strict=True):
            stepped[j] = flag
    return stepped
