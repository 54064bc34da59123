"""What ``memshare inspect`` reports: summary, verification and prefix reuse potential.

The reuse potential is not a formula of its own: it runs the registered ``prefix`` policy
through the same :class:`~memshare.kv_manager.KVCacheManager` the simulator drives, with a
pool large enough never to evict (unlimited cache), requests in arrival order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from memshare.block_pool import BlockPool
from memshare.kv_manager import KVCacheManager, cdiv
from memshare.registry import make_policy
from memshare.traces.request_blocks import default_block_size, request_info
from memshare.traces.schema import Manifest, RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class ReuseReport:
    """Prefix reuse at unlimited cache, as the ``prefix`` policy finds it."""

    policy: str
    block_size: int
    prompt_tokens: int
    hit_tokens: int
    prompt_blocks: int
    hit_blocks: int

    @property
    def token_hit_rate(self) -> float:
        """Share of prompt tokens served from cache."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def block_hit_rate(self) -> float:
        """Share of hashed prompt blocks found in cache."""
        return self.hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the rates."""
        d = asdict(self)
        d["token_hit_rate"] = self.token_hit_rate
        d["block_hit_rate"] = self.block_hit_rate
        return d


def prefix_reuse(
    records: Sequence[RequestRecord], manifest: Manifest, block_size: int | None = None
) -> ReuseReport | None:
    """Run ``prefix`` at unlimited cache; ``None`` if no request carries block identity (token
    ids or hash ids). Prompts too short to fill one block give a report of 0 prompt blocks."""
    if not any(r.prompt_ids is not None or r.hash_ids for r in records):
        return None
    bs = block_size or default_block_size(manifest)
    ordered = sorted(records, key=lambda r: r.arrival_s)
    infos = [request_info(r, manifest, bs) for r in ordered]
    pool = BlockPool(num_blocks=sum(cdiv(i.prompt_len, bs) for i in infos) + 1)
    policy = make_policy("prefix")
    manager = KVCacheManager(pool, policy, bs)
    for info in infos:
        if manager.admit(info, info.prompt_len) is None:  # cannot happen: pool is unlimited
            raise RuntimeError("unlimited pool ran out of blocks")
        manager.free(info.req_id)
    s = manager.stats
    return ReuseReport(
        policy.name, bs, s.prompt_tokens, s.hit_tokens, s.prompt_blocks, s.hit_blocks
    )


def _dist(values: Sequence[int] | Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    d = {"min": float(a.min()), "mean": float(a.mean()), "max": float(a.max())}
    d.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    return d


def summarize(records: Sequence[RequestRecord], manifest: Manifest) -> dict[str, Any]:
    """Counts, arrival span and length percentiles of the committed requests."""
    arrivals = [r.arrival_s for r in records]
    return {
        "kind": manifest.kind,
        "requests": len(records),
        "prompt_tokens": sum(r.prompt_len for r in records),
        "output_tokens": sum(r.output_len for r in records),
        "arrival_span_s": (max(arrivals) - min(arrivals)) if arrivals else 0.0,
        "block_size": manifest.block_size,
        "hash_block_size": manifest.hash_block_size,
        "model": asdict(manifest.model) if manifest.model else None,
        "source": manifest.source,
        "prompt_len": _dist([r.prompt_len for r in records]),
        "output_len": _dist([r.output_len for r in records]),
        "total_len": _dist([r.total_len for r in records]),
    }
