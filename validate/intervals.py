"""95% intervals of the fidelity figures ``validate`` reports (docs/fidelity.md), from scipy.

- An agreement or an accuracy counted over independent units (generated answers: one per
  problem) gets the exact binomial (Clopper-Pearson) interval, ``scipy.stats.binomtest``.
- Top-1 agreement is counted over positions, which are not independent within a text: it gets
  both the binomial interval over positions (what the count alone supports) and a bootstrap
  over texts (``scipy.stats.bootstrap``, percentile, paired agreeing/scored positions per text,
  the pooled ratio as statistic), which widens with the spread between texts.

Invariants: an interval is ``[low, high]`` within ``[0, 1]``, or None when there is nothing to
count (no unit, or a bootstrap over fewer than two texts); the bootstrap is seeded, so the same
counts give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0


def binomial_interval(successes: int, trials: int) -> list[float] | None:
    """The exact 95% interval of ``successes / trials`` (None without a trial)."""
    if trials <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(trials)).proportion_ci(LEVEL, method="exact")
    return [float(ci.low), float(ci.high)]


def ratio_bootstrap(
    numerators: Sequence[float], denominators: Sequence[float]
) -> list[float] | None:
    """The 95% percentile-bootstrap interval of ``sum(num) / sum(den)`` over units resampled
    whole (texts); None for fewer than two units or units that all agree on the ratio."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.size < 2 or den.sum() <= 0:
        return None
    ratios = num / np.where(den > 0, den, 1.0)
    if np.all(ratios == ratios[0]):  # every resample gives the same ratio
        value = float(num.sum() / den.sum())
        return [value, value]
    from scipy.stats import bootstrap

    def pooled(n: np.ndarray, d: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(n.sum(axis=axis) / np.maximum(d.sum(axis=axis), 1e-300))

    res = bootstrap(
        (num, den),
        pooled,
        paired=True,
        vectorized=True,
        confidence_level=LEVEL,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    ci = res.confidence_interval
    return [float(ci.low), float(ci.high)]
