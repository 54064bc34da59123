"""What a ``cf-topk`` chain's blocks hold, for its decisions (:mod:`memshare.policies.cf_topk`):
the sketch an entry holds now (its own, or the layers it shares), whose content each layer
holds, the float32 probe rows of a step's candidates, content keys, and the float32
reductions the decisions share.

Invariants: nothing here decides or changes what a block holds, except that
:func:`probe_rows` fills the step's row cache; every float reduction is numpy's float32
arithmetic, so the decisions stay those of comparing every candidate in full
(tests/test_cf_topk_reference.py).
"""

from __future__ import annotations

import numpy as np

from memshare.policies.cf_topk_index import Chain, Rows


def probe_rows(
    chain: Chain, j: int, cands: list[int], ncol: int, s: int
) -> tuple[np.ndarray, list[int]]:
    """(n, L, C, s) float32 probe rows of every candidate seen in block ``j``'s step and
    the block of each row (order of first appearance; each of ``cands`` is there)."""
    pos = chain.step_pos[chain.step_of[j]]
    store = chain.pstack
    if store is None or chain.pstack_pos != pos:
        if store is None:
            store = chain.pstack = Rows((len(chain.sketch[cands[0]]), ncol, s), np.float32)
        store.clear()
        chain.pstack_pos, chain.pstack_cands, chain.pstack_set = pos, [], set()
    seen, order, rows = chain.pstack_set, chain.pstack_cands, chain.probe_of
    for c in cands:
        if c not in seen:
            row = rows.get(c)
            if row is None:  # never decided with candidates: it holds its own sketch
                if c in chain.layer_content:  # kept under python -O: a wrong bound
                    raise RuntimeError("cf-topk: a shared block has no probe rows")
                row = rows[c] = np.array(chain.sketch[c][:, :ncol, :s], dtype=np.float32)
            store.put(len(order), row)
            order.append(c)
            seen.add(c)
    return store.view(), order


def owners_of(chain: Chain, c: int, layers: int) -> np.ndarray:
    """(L,) the block whose content each layer of block ``c`` holds."""
    got = chain.layer_content.get(c)
    return np.full(layers, c, dtype=np.int64) if got is None else got


def held_sketch(chain: Chain, c: int) -> np.ndarray:
    """The sketch of what block ``c``'s entry holds now: its own, except layers shared
    with another block (layer granularity), which hold that block's content."""
    own: np.ndarray = chain.sketch[c]
    owners = chain.layer_content.get(c)
    if owners is None:
        return own
    first = int(owners[0])
    if (owners == first).all():  # every layer holds one block's content
        return chain.sketch[first]
    held = own.copy()
    for o in np.unique(owners).tolist():  # few owners: one gather each
        if o != c:
            layers = np.flatnonzero(owners == o)
            held[layers] = chain.sketch[o][layers]
    return held


def lowest_total(dist: np.ndarray, eligible: list[int]) -> tuple[int, float]:
    """(row, total) of the ``eligible`` row of ``dist`` with the lowest float32 row sum;
    the first on ties, and numpy's argmin/min rules where a total is NaN."""
    sums = dist.sum(axis=1).tolist()  # float32 row sums, exact as floats
    totals = [sums[i] for i in eligible]
    lowest = min(totals)
    if lowest != lowest or any(t != t for t in totals):
        rows = dist[eligible].sum(axis=1)
        return eligible[int(np.argmin(rows))], float(rows.min())
    return eligible[totals.index(lowest)], lowest


def mean32(values: np.ndarray) -> float:
    """``float(values.mean())`` of a non-empty 1-d float32 array, without ``mean``'s
    overhead: numpy sums in float32, divides that by the count in float64 and rounds the
    quotient to float32."""
    return float(np.float32(float(np.add.reduce(values)) / values.size))


def distinct_content(chain: Chain, cands: list[int]) -> list[int]:
    """``cands`` (sorted) less each candidate that holds, at every layer, the content of an
    earlier one: its distances equal that one's, which wins every tie, so it is never
    chosen. Blocks that shared with the same blocks (a step repeated again and again) are
    the common case."""
    keys = chain.content_key
    seen: set[int | bytes] = set()
    keep: list[int] = []
    for c in cands:
        key = keys.get(c, c)
        if key not in seen:
            seen.add(key)
            keep.append(c)
    return keep


def content_key(held: np.ndarray) -> int | bytes:
    """A key equal for two blocks exactly when their layers hold the same blocks' content
    (``held``: the owner per layer): the owner where it is one block (as for a block that
    holds its own sketch, whose key is its index), else the owners' bytes."""
    first = int(held[0])
    return first if bool((held == first).all()) else held.tobytes()
