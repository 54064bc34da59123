"""What the paged engine records: its confirmed shares, copied spans and steps, and a run's
result (:class:`PagedRunResult`), as ``shares.jsonl``, ``reuses.jsonl`` and ``metrics.json``
write them.

Invariants: a share is recorded once per source block it takes layers from (a layer's K and V
from one block: part ``kv``; else ``k`` or ``v`` apart); blocks are counted within requests;
every record names the engine step at whose end it was applied or that copied it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from memshare.request import Request

Owner = tuple[str, int]  # (request, block within it) that wrote a page


@dataclass
class ShareRecord:
    """One confirmed share, as ``shares.jsonl`` writes it (blocks counted within requests):
    the layers of ``block`` that now read what ``source_block`` of ``source_request`` wrote.
    A decision that takes layers from several blocks gives one record per source block."""

    request: str
    block: int
    source_request: str
    source_block: int
    layers: list[int]  # layers with any page repointed
    parts: str  # "kv" (keys and values), "k" (keys only) or "v" (values only: exact-dedup)
    sketch_distance: float | None  # the distance the policy confirmed on
    exact_distance: list[float]  # per shared layer, on the live KV (max over shared parts)
    step: int  # engine step at whose end the share was applied (reads from the next step on)


@dataclass
class ReuseRecord:
    """One reused span (KVShare) the engine copied: positions ``position ..
    position + length - 1`` of ``request`` hold, in every layer, the K/V that
    ``source_request`` computed at ``source_position ..``."""

    request: str
    position: int
    length: int
    source_request: str
    source_position: int
    step: int  # engine step that copied it (and computed the rest of the chunk)


@dataclass
class StepRecord:
    """One engine step, for metrics."""

    seqs: int
    tokens: int  # scheduled (as the simulator counts them)
    computed: int  # of which run through the model (the rest copied: KVShare spans)
    wall_s: float  # forward pass + sampling + commit
    commit_s: float  # of which complete(): sketches, policy decisions, frees
    live_pages: int  # pages held by running requests once the step is scheduled (reserved)
    used_pages: int  # pages held at all (running + prefix cache), at the same point


@dataclass
class PagedRunResult:
    """What a paged engine's run produced."""

    requests: list[Request]  # input order
    shares: list[ShareRecord]
    reuses: list[ReuseRecord]
    steps: list[StepRecord]
    wall_s: float
    preemptions: int
    page_bytes: int
    store_bytes: int  # measured from the page tensor
    num_pages: int
    pool_pages: int  # pages the pool accounts (must equal num_pages)
    sketch_s: float  # time spent sketching live blocks


def share_records(
    rid: str,
    block: int,
    sketch: float | None,
    mask: np.ndarray,
    target: npt.NDArray[np.int64],
    dist: np.ndarray,
    owner: dict[int, Owner],
    step: int,
) -> list[ShareRecord]:
    """The records of one share of ``rid``'s ``block``: ``mask`` ``(L, 2)`` the repointed
    pages, ``target`` ``(L, 2)`` the pages they now read, ``dist`` ``(L, 2)`` the exact
    distances, ``owner`` who wrote each page. The repointed pages are grouped by the block that
    wrote them, and by part: ``kv`` where a layer's K and V both come from that block, else
    ``k`` (or ``v``)."""
    groups: dict[tuple[str, int, str], list[tuple[int, float]]] = {}
    for layer in np.flatnonzero(mask.any(axis=1)).tolist():
        owners = [
            owner.get(int(target[layer, kv]), ("?", -1)) if mask[layer, kv] else None
            for kv in (0, 1)
        ]
        if owners[0] is not None and owners[0] == owners[1]:
            parts = [("kv", owners[0], float(max(dist[layer])))]
        else:
            parts = [
                (name, o, float(dist[layer, kv]))
                for kv, (name, o) in enumerate(zip(("k", "v"), owners, strict=True))
                if o is not None
            ]
        for name, (src_rid, src_block), value in parts:
            groups.setdefault((src_rid, src_block, name), []).append((layer, value))
    return [
        ShareRecord(
            rid,
            block,
            src_rid,
            src_block,
            [layer for layer, _ in rows],
            name,
            sketch,
            [value for _, value in rows],
            step,
        )
        for (src_rid, src_block, name), rows in groups.items()
    ]
