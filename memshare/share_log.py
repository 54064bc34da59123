"""Every share a :class:`~memshare.kv_manager.KVCacheManager` applied, with the first position
that reads it: what the fidelity model (docs/fidelity-model.md) turns into features, for the
simulator's run and the paged engine's alike (both drive the same manager).

Invariants: one event per applied share (a stale decision, skipped by the manager, has none),
in the order applied; ``from_token`` is the request's computed-token count when the share was
applied, so positions ``>= from_token`` are computed after it and read the shared pages, the
positions before it never do; ``weight[l, c]`` is the distance at which page ``(l, c)`` (layer,
K or V) was shared, 0 where it was not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from memshare.policy import BlockDecision


@dataclass
class RequestShares:
    """One request's shares, in the order applied."""

    from_token: list[int] = field(default_factory=list)  # first position reading each share
    weight: list[np.ndarray] = field(default_factory=list)  # (L, 2) float32 each

    def arrays(self, layers: int) -> tuple[np.ndarray, np.ndarray]:
        """``(from_token (E,) int64, weight (E, L, 2) float32)``."""
        if not self.weight:
            return np.zeros(0, np.int64), np.zeros((0, layers, 2), np.float32)
        return np.asarray(self.from_token, np.int64), np.stack(self.weight)


@dataclass
class ShareLog:
    """Shares per request (see the module docstring)."""

    requests: dict[str, RequestShares] = field(default_factory=dict)

    def record(self, rid: str, from_token: int, mask: np.ndarray, d: BlockDecision) -> None:
        """Log the share ``d`` of ``rid``, applied when ``from_token`` tokens were computed;
        ``mask`` (L, 2): the pages it repointed. A page's weight is its layer's distance
        (``d.layer_distance``), else the decision's ``distance``, else 1 (no distance given:
        token-identical blocks, a layer map)."""
        if d.layer_distance is not None:
            per_layer = np.nan_to_num(np.asarray(d.layer_distance, np.float32), nan=0.0)
        else:
            per_layer = np.full(mask.shape[0], 1.0 if d.distance is None else d.distance)
        weight = np.where(mask, per_layer[:, None], 0.0).astype(np.float32)
        got = self.requests.setdefault(rid, RequestShares())
        got.from_token.append(int(from_token))
        got.weight.append(weight)

    def of(self, rid: str) -> RequestShares:
        """``rid``'s shares (none logged: an empty record)."""
        return self.requests.get(rid, RequestShares())

    @property
    def events(self) -> int:
        """Shares logged, over every request."""
        return sum(len(r.from_token) for r in self.requests.values())
