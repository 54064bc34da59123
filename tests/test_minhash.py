"""MinHash step signatures: unbiased Jaccard estimates, one-pass hashing equals per-run."""

from __future__ import annotations

import numpy as np

from memshare.minhash import EMPTY, MinHasher, similarity


def _ngrams(t: np.ndarray, n: int = 3) -> set[tuple[int, ...]]:
    return {tuple(t[i : i + n]) for i in range(len(t) - n + 1)}


def test_signature_agreement_estimates_jaccard() -> None:
    rng = np.random.default_rng(0)
    h = MinHasher(num_perm=32, ngram=3, seed=0)
    errors = []
    for _ in range(400):
        a = rng.integers(0, 49_152, 120)
        b = a.copy()
        cut = int(rng.integers(0, 120))
        b[cut:] = rng.integers(0, 49_152, 120 - cut)  # a shared prefix of random length
        true = len(_ngrams(a) & _ngrams(b)) / len(_ngrams(a) | _ngrams(b))
        sa, sb = h.empty(), h.empty()
        h.update(sa, a)
        h.update(sb, b)
        errors.append(float(similarity(sa, sb[None])[0]) - true)
    err = np.asarray(errors)
    assert abs(err.mean()) < 0.02  # unbiased
    assert np.sqrt((err**2).mean()) < np.sqrt(0.25 / 32) * 1.2  # within the MinHash bound


def test_update_many_equals_update_per_run_and_incremental() -> None:
    rng = np.random.default_rng(1)
    h = MinHasher(num_perm=16, ngram=3, seed=3)
    runs = [rng.integers(0, 1000, n) for n in (50, 2, 0, 17, 3)]
    one = [h.empty() for _ in runs]
    for sig, run in zip(one, runs, strict=True):
        h.update(sig, run)
    many = [h.empty() for _ in runs]
    h.update_many(many, runs)
    for x, y in zip(one, many, strict=True):
        assert np.array_equal(x, y)
    assert np.all(one[1] == EMPTY) and np.all(one[2] == EMPTY)  # too short for an n-gram
    # hashing a run in two pieces (overlapping by ngram - 1 tokens) gives the same signature
    split = h.empty()
    h.update(split, runs[0][:20])
    h.update(split, runs[0][18:])
    assert np.array_equal(split, one[0])


def test_signatures_are_seeded_and_empty_matches_nothing() -> None:
    t = np.arange(40)
    s1, s2, s3 = MinHasher(seed=5).empty(), MinHasher(seed=5).empty(), MinHasher(seed=6).empty()
    MinHasher(seed=5).update(s1, t)
    MinHasher(seed=5).update(s2, t)
    MinHasher(seed=6).update(s3, t)
    assert np.array_equal(s1, s2) and not np.array_equal(s1, s3)
    empty = MinHasher().empty()
    assert similarity(empty, s1[None])[0] == 0.0
    assert similarity(s1, empty[None])[0] == 0.0
