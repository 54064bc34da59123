"""The counters a :class:`~memshare.block_pool.BlockPool` keeps for its driver's reports.

Invariant: every counter only grows over a pool's life, except the gauges, which hold the
largest value seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolStats:
    """Counters a driver reports (all monotone except the gauges)."""

    allocated_blocks: int = 0  # blocks created by allocate()
    evicted_blocks: int = 0  # cached blocks evicted to make room
    hits: int = 0  # blocks touched (prefix-cache hits, shares, held span sources)
    peak_used_pages: int = 0  # gauge: max pages held at once
