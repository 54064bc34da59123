"""The 95% intervals of validate's fidelity figures (memshare.validate.fidelity)."""

from __future__ import annotations

import math

from memshare.validate.fidelity import binomial_interval, ratio_bootstrap


def test_binomial_interval_is_clopper_pearson() -> None:
    # Clopper-Pearson for 62/64 (R's binom.test: 0.8916295 0.9961928)
    lo, hi = binomial_interval(62, 64) or [math.nan, math.nan]
    assert math.isclose(lo, 0.8916295, abs_tol=1e-6) and math.isclose(hi, 0.9961928, abs_tol=1e-6)
    # 16,000 positions: a much narrower interval than 64 answers at a similar rate
    wide, narrow = binomial_interval(62, 64), binomial_interval(15_500, 16_000)
    assert wide is not None and narrow is not None
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5
    assert binomial_interval(64, 64) is not None and binomial_interval(64, 64)[1] == 1.0  # type: ignore[index]
    assert binomial_interval(0, 0) is None


def test_bootstrap_over_texts_is_seeded_and_widens_with_the_spread() -> None:
    agree, scored = [990, 700, 980, 995], [1000, 1000, 1000, 1000]
    first = ratio_bootstrap(agree, scored)
    assert first is not None and first == ratio_bootstrap(agree, scored)  # same seed, same CI
    pooled = sum(agree) / sum(scored)
    assert first[0] < pooled < first[1] and first[0] >= 0.0 and first[1] <= 1.0
    even = ratio_bootstrap([916, 917, 916, 917], scored)
    assert even is not None and even[1] - even[0] < (first[1] - first[0]) / 10
    assert ratio_bootstrap([5], [10]) is None  # one text: nothing to resample
    assert ratio_bootstrap([10, 20], [10, 20]) == [1.0, 1.0]  # every text agrees everywhere
