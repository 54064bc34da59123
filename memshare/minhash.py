"""MinHash signatures of token n-gram sets, for cheap step-to-step similarity.

Invariant: ``mean(sig_a == sig_b)`` is an unbiased estimate of the Jaccard similarity of the
two n-gram sets; signatures are deterministic given ``(num_perm, ngram, seed)``. An empty set
has the all-``EMPTY`` signature and is similar to nothing (:func:`similarity` returns 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIG_DTYPE = np.uint32  # 32-bit hashing: vectorised multiplies, ample for ~1e2-1e4 n-grams
EMPTY = np.iinfo(SIG_DTYPE).max
_MIX = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F], dtype=SIG_DTYPE)
NGRAM_MAX = len(_MIX)  # longest shingle (one mixing constant per token)
_SCRATCH_ROWS = 256


def hasher_bytes(num_perm: int) -> int:
    """Bytes a :class:`MinHasher` of ``num_perm`` permutations holds (its hashing buffer and
    its ``a``, ``b`` and empty-signature rows), before any signature."""
    return (_SCRATCH_ROWS + 3) * num_perm * np.dtype(SIG_DTYPE).itemsize


@dataclass
class MinHasher:
    """Hash functions ``h_p(x) = a_p * x + b_p (mod 2^32)`` over n-gram codes."""

    num_perm: int = 32  # signature length
    ngram: int = 3  # tokens per shingle
    seed: int = 0
    a: np.ndarray = field(init=False, repr=False)
    b: np.ndarray = field(init=False, repr=False)
    _off: np.ndarray = field(init=False, repr=False)  # (ngram,) offsets 1..ngram
    _mix: np.ndarray = field(init=False, repr=False)  # (ngram,) mixing constants
    _empty: np.ndarray = field(init=False, repr=False)  # the empty signature (copied out)
    _scratch: np.ndarray = field(init=False, repr=False)  # (rows, P) hashing buffer

    def __post_init__(self) -> None:
        if self.num_perm <= 0 or not 1 <= self.ngram <= len(_MIX):
            raise ValueError(f"num_perm must be > 0 and 1 <= ngram <= {len(_MIX)}")
        rng = np.random.default_rng(self.seed)
        self.a = rng.integers(1, 2**32, size=self.num_perm, dtype=np.uint64).astype(SIG_DTYPE)
        self.a |= SIG_DTYPE(1)  # odd: a bijection mod 2^32
        self.b = rng.integers(0, 2**32, size=self.num_perm, dtype=np.uint64).astype(SIG_DTYPE)
        self._off = np.arange(1, self.ngram + 1, dtype=SIG_DTYPE)
        self._mix = _MIX[: self.ngram].copy()
        self._empty = np.full(self.num_perm, EMPTY, dtype=SIG_DTYPE)
        self._scratch = np.empty((_SCRATCH_ROWS, self.num_perm), dtype=SIG_DTYPE)

    def empty(self) -> np.ndarray:
        """The signature of the empty set."""
        return self._empty.copy()

    def update(self, sig: np.ndarray, tokens: np.ndarray) -> None:
        """Add the n-grams of ``tokens`` (a contiguous run) to ``sig`` in place."""
        t = np.asarray(tokens).astype(SIG_DTYPE)
        n = len(t) - self.ngram + 1
        if n <= 0:
            return
        # code of the n-gram at p: XOR over i of (t[p + i] + i + 1) * MIX[i], all mod 2^32
        mixed = (t[:, None] + self._off) * self._mix  # (len, ngram): one pass, few calls
        codes = mixed[:n, 0]
        if self.ngram > 1:
            codes = codes ^ mixed[1 : 1 + n, 1]
            for i in range(2, self.ngram):
                codes ^= mixed[i : i + n, i]
        hashed = np.multiply.outer(codes, self.a)
        hashed += self.b  # (n, P), wraps mod 2^32
        np.minimum(sig, hashed.min(axis=0), out=sig)

    def update_many(self, sigs: list[np.ndarray], runs: list[np.ndarray]) -> None:
        """:meth:`update` of each ``sigs[i]`` with ``runs[i]``, hashed in one pass (n-grams
        never cross from one run into the next)."""
        keep = [i for i, r in enumerate(runs) if len(r) >= self.ngram]
        if len(keep) <= 1:
            for i in keep:
                self.update(sigs[i], runs[i])
            return
        t = np.concatenate([runs[i] for i in keep]).astype(SIG_DTYPE)
        n = len(t) - self.ngram + 1
        mixed = (t[:, None] + self._off) * self._mix
        codes = mixed[:n, 0]
        if self.ngram > 1:
            codes = codes ^ mixed[1 : 1 + n, 1]
            for i in range(2, self.ngram):
                codes ^= mixed[i : i + n, i]
        if len(self._scratch) < n:  # one reused buffer: it stays in cache
            self._scratch = np.empty((max(n, 2 * len(self._scratch)), self.num_perm), SIG_DTYPE)
        hashed = self._scratch[:n]
        np.multiply(codes[:, None], self.a, out=hashed)
        hashed += self.b
        bounds: list[int] = []
        start = 0
        for i in keep:  # run i's n-grams start in [start, start + len - ngram]
            bounds += (start, start + len(runs[i]) - self.ngram + 1)
            start += len(runs[i])
        mins = np.minimum.reduceat(hashed, bounds[:-1], axis=0)
        for k, i in enumerate(keep):
            np.minimum(sigs[i], mins[2 * k], out=sigs[i])


def similarity(sig: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of ``sig`` (P,) with each row of ``others`` (S, P); 0 for empties."""
    if others.size == 0 or sig[0] == EMPTY:
        return np.zeros(len(others))
    est: np.ndarray = np.count_nonzero(others == sig, axis=1) / len(sig)
    est[others[:, 0] == EMPTY] = 0.0
    return est
