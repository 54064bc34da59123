"""How a ``cf-topk`` block shares at layer granularity
(:mod:`memshare.policies.cf_topk`): each layer of the block points at its nearest confirming
candidate, and the chain records what the block then holds (owners per layer, content key,
probe rows, links).

Invariant: the decision is a pure function of the distances and the confirmations given; the
first candidate wins a tie (numpy's argmin), as in comparing every candidate in full.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memshare.block_pool import KVBlock
from memshare.policies.cf_topk_held import content_key, mean32, owners_of
from memshare.policies.cf_topk_index import Chain, link
from memshare.policy import BlockDecision


def layer_share(
    chain: Chain,
    j: int,
    cands: list[int],
    dist: np.ndarray,
    ok: np.ndarray,
    cols: list[int],
    table: Sequence[KVBlock],
    probe: np.ndarray | None,
) -> BlockDecision | None:
    """Each layer of ``j`` points at its nearest confirming candidate (the first on
    ties); ``probe``: j's own probe rows, which then take the shared layers' content."""
    if len(cands) == 1:  # the common case: one candidate left after the bound
        return _share_one(chain, j, cands[0], dist[0], ok[0], cols, table, probe)
    nlayers = dist.shape[1]
    masked = np.where(ok, dist, np.inf)
    best = np.argmin(masked, axis=0)  # (L,) best candidate per layer
    layers = np.flatnonzero(np.isfinite(masked[best, np.arange(nlayers)]))
    if layers.size == 0:
        return None
    mask = np.zeros(table[j].pages.shape, dtype=bool)
    source = table[j].pages.copy()
    held = np.full(nlayers, j, dtype=np.int64)  # whose content each layer holds
    pick = best[layers]  # the chosen candidate (row) of each shared layer
    rows = np.unique(pick).tolist()
    pages = np.stack([table[cands[r]].pages for r in rows])  # (chosen, L, 2)
    owners = np.stack([owners_of(chain, cands[r], len(held)) for r in rows])
    at = np.searchsorted(rows, pick)
    for col in cols:
        mask[layers, col] = True
        source[layers, col] = pages[at, layers, col]
    held[layers] = owners[at, layers]
    for r in rows:
        link(chain, j, cands[r])
    chain.layer_content[j] = held
    chain.content_key[j] = content_key(held)
    if probe is not None:
        probe[layers] = np.stack([chain.probe_of[cands[r]] for r in rows])[at, layers]
    chosen = dist[best[layers], layers]
    per_layer = np.full(nlayers, np.nan, dtype=np.float32)
    per_layer[layers] = chosen
    return BlockDecision(
        j,
        expect=chain.phys[j],
        share_mask=mask,
        share_source=source,
        distance=mean32(chosen),
        layer_distance=per_layer,
    )


def _share_one(
    chain: Chain,
    j: int,
    c: int,
    dist: np.ndarray,
    here: np.ndarray,
    cols: list[int],
    table: Sequence[KVBlock],
    probe: np.ndarray | None,
) -> BlockDecision | None:
    """:func:`layer_share` with one candidate ``c``: the layers ``here`` (L,) of
    ``j`` point at ``c``'s (``dist``: their (L,) distances)."""
    n = int(np.count_nonzero(here))
    if n == 0:
        return None
    mine = table[j].pages
    mask = np.zeros(mine.shape, dtype=bool)
    source = mine.copy()
    pages = table[c].pages
    for col in cols:
        mask[:, col] = here
        np.copyto(source[:, col], pages[:, col], where=here)
    owners = chain.layer_content.get(c)
    held = chain.layer_content[j] = np.where(here, c if owners is None else owners, j)
    chain.content_key[j] = content_key(held)
    link(chain, j, c)
    if probe is not None:  # j's rows now hold c's content where it shares
        np.copyto(probe, chain.probe_of[c], where=here[:, None, None])
    d = float(np.float32(float(np.add.reduce(dist[here])) / n))  # see mean32
    per_layer = np.where(here, dist, np.float32(np.nan)).astype(np.float32, copy=False)
    return BlockDecision(
        j,
        expect=chain.phys[j],
        share_mask=mask,
        share_source=source,
        distance=d,
        layer_distance=per_layer,
    )
