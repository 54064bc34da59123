"""Fewer garbage-collector passes while a simulation runs.

A run creates millions of short-lived container objects (blocks, chunks, events) and keeps a
few hundred thousand alive (the trace's records, the requests, the timeline). CPython's default
thresholds then start a young-generation pass every 700 allocations and, now and then, a pass
over everything alive, which costs about a tenth of a long run and frees almost nothing: the
simulator's objects form few reference cycles. :func:`sparse_gc` raises the young generation's
threshold for the duration of a ``with`` block; the collector still runs, only less often.

Invariant: the thresholds in force before the block are restored after it, also on an error;
nothing a run computes depends on when the collector runs.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 100_000  # allocations between young-generation passes (CPython: 700)


@contextmanager
def sparse_gc() -> Iterator[None]:
    """Raise the young generation's collection threshold inside the block (module doc)."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], YOUNG_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
