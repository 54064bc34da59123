"""Streaming fidelity metrics of a shared run against the unshared run (docs/fidelity.md).

``memshare validate`` runs the same texts teacher-forced through two engines, one without
sharing ("base") and one under a lossy policy ("shared"), and compares their logits position
by position. Full logits are never kept (about 49k floats a position): each aligned chunk is
reduced at once to a few numbers a position (KL, two NLLs) and two counters. The 95%
intervals of the figures (:func:`binomial_interval`, :func:`ratio_bootstrap`) are at the end.

Intended use, two engines stepping in lockstep::

    acc = FidelityAccumulator()
    buf = LogitsBuffer(lambda rid, pos, base, shared: acc.add(
        rid, pos, base, shared,
        next_token_targets(tokens[rid], pos, len(base)),
        after_share_mask(pos, len(base), first_share.get(rid)),
    ))
    base_engine = PagedEngine(..., logits_sink=buf.sink("base"))
    shared_engine = PagedEngine(..., logits_sink=buf.sink("shared"))
    while base_engine.step() | shared_engine.step(): ...
    acc.metrics()  # pooled; acc.metrics(rid) for one request

Invariants: a position is counted at most once per request (``add`` rejects an overlapping
range); KL is KL(base || shared) in nats from float64 ``log_softmax``, never negative, exactly
0 for identical logits; the buffer holds a chunk only until the other run's chunk with the
same (request, first position) arrives, so lockstep engines hold at most one step's logits.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Run = Literal["base", "shared"]
PairFn = Callable[[str, int, Any, Any], None]  # request id, first position, base, shared
ROWS = 64  # positions reduced at once: bounds the float64 work tensors to ROWS x vocab


@dataclass(frozen=True)
class FidelityMetrics:
    """Fidelity of one request or pooled over requests (docs/fidelity.md). Fractions and means
    are ``None`` when no position counts; ``kl_p99`` is numpy's default (linear) percentile."""

    positions: int  # positions compared
    top1_agree: int  # positions where base and shared argmax agree
    top1_agreement: float | None
    positions_after_first_share: int
    top1_agree_after_first_share: int
    top1_agreement_after_first_share: float | None
    kl_mean: float | None  # mean KL(base || shared), nats
    kl_p99: float | None
    scored_positions: int  # positions with a known next token (the perplexity's)
    ppl_base: float | None  # exp(mean NLL of the next tokens) under base
    ppl_shared: float | None

    def to_json(self) -> dict[str, int | float | None]:
        """Plain ints and floats; a non-finite float (NaN, inf) becomes ``None``."""
        out: dict[str, int | float | None] = {}
        for k, v in asdict(self).items():
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out


@dataclass
class _Tally:
    positions: int = 0
    agree: int = 0
    after: int = 0
    after_agree: int = 0
    kl: list[npt.NDArray[np.float64]] = field(default_factory=list)
    nll_base: list[npt.NDArray[np.float64]] = field(default_factory=list)
    nll_shared: list[npt.NDArray[np.float64]] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # sorted, disjoint
    # per chunk, as added: (first position, top-1 agreed (n,), KL (n,)): the fidelity fit's
    chunks: list[tuple[int, npt.NDArray[np.bool_], npt.NDArray[np.float64]]] = field(
        default_factory=list
    )

    def claim(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.ranges, (start, end))
        before = self.ranges[i - 1] if i > 0 else None
        after = self.ranges[i] if i < len(self.ranges) else None
        if (before and before[1] > start) or (after and after[0] < end):
            raise ValueError(f"positions {start}..{end - 1} overlap positions already added")
        self.ranges.insert(i, (start, end))


class FidelityAccumulator:
    """Per-request tallies of aligned base/shared logits (see the module docstring)."""

    def __init__(self) -> None:
        self._tallies: dict[str, _Tally] = {}

    def add(
        self,
        rid: str,
        first_pos: int,
        base_logits: Any,
        shared_logits: Any,
        targets: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
        after_share: Sequence[bool] | npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """Count positions ``first_pos .. first_pos + n - 1`` of ``rid``: ``[n, vocab]``
        logits of both runs; ``targets[i]`` the true next token of position ``first_pos + i``
        (-1 or ``None``: unknown); ``after_share[i]`` whether that position comes after the
        request's first share (``None``: none does)."""
        add_pairs(rid, first_pos, base_logits, [(self, shared_logits, after_share)], targets)

    def _tally(self, rid: str) -> _Tally:
        return self._tallies.setdefault(rid, _Tally())

    def requests(self) -> list[str]:
        """Request ids seen, in first-seen order."""
        return list(self._tallies)

    def metrics(self, rid: str | None = None) -> FidelityMetrics:
        """Metrics of ``rid``, or pooled over every request (each position weighs the same)."""
        if rid is not None and rid not in self._tallies:
            raise KeyError(f"no positions of request {rid!r} were added")
        tallies = [self._tallies[rid]] if rid is not None else list(self._tallies.values())
        return _summarize(tallies)

    def positions(
        self, rid: str
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
        """``(positions, top-1 agreed, KL)`` of every position of ``rid`` compared, in order."""
        chunks = sorted(self._tallies[rid].chunks, key=lambda c: c[0])
        if not chunks:
            return np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.float64)
        pos = np.concatenate([np.arange(p, p + len(a), dtype=np.int64) for p, a, _ in chunks])
        agree = np.concatenate([a for _, a, _ in chunks])
        kl = np.concatenate([k for _, _, k in chunks])
        return pos, agree, kl

    def per_request(self) -> dict[str, FidelityMetrics]:
        """``metrics(rid)`` of every request."""
        return {rid: self.metrics(rid) for rid in self._tallies}


Mask = Sequence[bool] | npt.NDArray[np.bool_] | None


def add_pairs(
    rid: str,
    first_pos: int,
    base_logits: Any,
    runs: Sequence[tuple[FidelityAccumulator, Any, Mask]],
    targets: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
) -> None:
    """:meth:`FidelityAccumulator.add` for several shared runs against one base chunk:
    ``runs`` holds (accumulator, shared logits, after-share mask) per run. The base's
    log-softmax is computed once for all of them (the work that dominates)."""
    import torch

    base = torch.as_tensor(base_logits).detach()
    if base.dim() != 2:
        raise ValueError(f"logits must be [n, vocab], got {tuple(base.shape)}")
    n, vocab = int(base.shape[0]), int(base.shape[1])
    tgt = np.full(n, -1, np.int64) if targets is None else np.asarray(targets, np.int64)
    if tgt.shape != (n,):
        raise ValueError(f"targets need {n} entries a chunk")
    if tgt.max(initial=-1) >= vocab or tgt.min(initial=-1) < -1:
        raise ValueError(f"a target is outside the vocabulary [0, {vocab})")
    _check_finite(rid, first_pos, base)
    checked: list[tuple[_Tally, Any, npt.NDArray[np.bool_]]] = []
    for acc, shared_logits, after_share in runs:
        shared = torch.as_tensor(shared_logits).detach()
        if base.shape != shared.shape:
            raise ValueError(f"logits must be two [n, vocab]: {base.shape} vs {shared.shape}")
        late = np.zeros(n, bool) if after_share is None else np.asarray(after_share, bool)
        if late.shape != (n,):
            raise ValueError(f"after_share needs {n} entries a chunk")
        _check_finite(rid, first_pos, shared)
        checked.append((acc._tally(rid), shared, late))
    for tally, _, _ in checked:
        tally.claim(first_pos, first_pos + n)
    agree = [np.empty(n, bool) for _ in checked]
    kls = [np.empty(n, np.float64) for _ in checked]
    for s in range(0, n, ROWS):
        e = min(n, s + ROWS)
        ref = _BaseRows(base[s:e], tgt[s:e])
        for (tally, shared, _), ag, kc in zip(checked, agree, kls, strict=True):
            ag[s:e], kl, ns = ref.against(shared[s:e])
            kc[s:e] = kl
            tally.kl.append(kl)
            tally.nll_base.append(ref.nll)
            tally.nll_shared.append(ns)
    for (tally, _, late), ag, kc in zip(checked, agree, kls, strict=True):
        tally.chunks.append((first_pos, ag, kc))
        tally.positions += n
        tally.agree += int(ag.sum())
        tally.after += int(late.sum())
        tally.after_agree += int((ag & late).sum())


def _check_finite(rid: str, first_pos: int, t: Any) -> None:
    import torch

    if bool((torch.isnan(t) | torch.isposinf(t)).any()):
        raise ValueError(f"logits of {rid!r} at {first_pos} hold NaN or +inf")


class _BaseRows:
    """The base run's rows of one slice, reduced once: float64 log-probabilities, their
    probabilities, argmax, and the NLL of the known next tokens."""

    def __init__(self, base: Any, targets: npt.NDArray[np.int64]) -> None:
        import torch

        self.lp = torch.log_softmax(base.to(torch.float64), dim=-1)
        self.p = self.lp.exp()
        self.top = base.argmax(-1)
        self.known = torch.as_tensor(np.flatnonzero(targets >= 0), device=self.lp.device)
        self.idx = torch.as_tensor(targets[targets >= 0], device=self.lp.device)
        self.nll: npt.NDArray[np.float64] = _cpu(-self.lp[self.known, self.idx])

    def against(
        self, shared: Any
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Top-1 agreement and KL(base || shared) per position, NLL of the shared run."""
        import torch

        lq = torch.log_softmax(shared.to(torch.float64), dim=-1)
        terms = torch.where(self.p > 0, self.p * (self.lp - lq), torch.zeros_like(self.p))
        kl = terms.sum(-1).clamp_min(0.0)
        agree = self.top == shared.argmax(-1)
        return _cpu(agree), _cpu(kl), _cpu(-lq[self.known, self.idx])


def _cpu(t: Any) -> Any:
    return t.detach().cpu().numpy()


def _summarize(tallies: list[_Tally]) -> FidelityMetrics:
    def cat(parts: list[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
        return np.concatenate(parts) if parts else np.zeros(0, np.float64)

    kl = cat([a for t in tallies for a in t.kl])
    nb = cat([a for t in tallies for a in t.nll_base])
    ns = cat([a for t in tallies for a in t.nll_shared])
    positions = sum(t.positions for t in tallies)
    agree = sum(t.agree for t in tallies)
    after = sum(t.after for t in tallies)
    after_agree = sum(t.after_agree for t in tallies)
    return FidelityMetrics(
        positions=positions,
        top1_agree=agree,
        top1_agreement=agree / positions if positions else None,
        positions_after_first_share=after,
        top1_agree_after_first_share=after_agree,
        top1_agreement_after_first_share=after_agree / after if after else None,
        kl_mean=float(kl.mean()) if kl.size else None,
        kl_p99=_p99(kl),
        scored_positions=int(nb.size),
        ppl_base=_ppl(nb),
        ppl_shared=_ppl(ns),
    )


def _p99(kl: npt.NDArray[np.float64]) -> float | None:
    """numpy's default (linear) 99th percentile; inf when it falls among infinite KLs."""
    if not kl.size:
        return None
    with np.errstate(invalid="ignore"):  # inf - inf while interpolating: NaN, read as inf
        p = float(np.percentile(kl, 99))
    return math.inf if math.isnan(p) else p


def _ppl(nll: npt.NDArray[np.float64]) -> float | None:
    if not nll.size:
        return None
    mean = float(nll.mean())
    return math.exp(mean) if mean < 700 else math.inf


def next_token_targets(tokens: Sequence[int], first_pos: int, n: int) -> npt.NDArray[np.int64]:
    """Targets of positions ``first_pos .. first_pos + n - 1``: token ``p + 1`` of the text
    for position ``p``, -1 past its end."""
    out = np.full(n, -1, np.int64)
    known = tokens[first_pos + 1 : first_pos + 1 + n]
    out[: len(known)] = known
    return out


def after_share_mask(first_pos: int, n: int, first_share_pos: int | None) -> npt.NDArray[np.bool_]:
    """Which of positions ``first_pos ..`` come at or after ``first_share_pos``, the first
    position computed after the request's first share (``None``: no share yet). In the
    teacher-forced engine a share of block ``b`` applies once block ``b``'s pass is done, so
    that position is ``(b + 1) * block_size``."""
    pos = np.arange(first_pos, first_pos + n)
    return np.zeros(n, bool) if first_share_pos is None else pos >= first_share_pos


class LogitsBuffer:
    """Pairs the two runs' logits chunk by chunk (see the module docstring).

    A chunk is held (a copy, on its device) until the other run's chunk with the same
    (request id, first position) arrives; then both go to ``on_pair(rid, first_pos, base,
    shared)`` and nothing of them stays. Both runs must chunk alike (teacher-forced engines
    do: one block a chunk); a second chunk of one run for a held key is an error.
    """

    def __init__(self, on_pair: PairFn) -> None:
        self._on_pair = on_pair
        self._held: dict[tuple[str, int], tuple[Run, Any]] = {}

    def sink(self, run: Run) -> Callable[[str, int, Any], None]:
        """An engine ``logits_sink`` that offers its chunks as ``run``."""
        if run not in ("base", "shared"):
            raise ValueError(f"run must be 'base' or 'shared', got {run!r}")
        return lambda rid, first_pos, logits: self.offer(run, rid, first_pos, logits)

    def offer(self, run: Run, rid: str, first_pos: int, logits: Any) -> None:
        """Hold ``logits`` or, when the other run's chunk is held, pair the two."""
        key = (rid, first_pos)
        held = self._held.get(key)
        if held is None:
            self._held[key] = (run, logits.detach().clone())
            return
        if held[0] == run:
            raise ValueError(f"{run} run gave positions {first_pos}.. of {rid!r} twice")
        del self._held[key]
        if tuple(held[1].shape) != tuple(logits.shape):
            raise ValueError(
                f"chunks at {first_pos} of {rid!r} differ: {held[1].shape} vs {logits.shape}"
            )
        base, shared = (held[1], logits) if run == "shared" else (logits, held[1])
        self._on_pair(rid, first_pos, base, shared)

    @property
    def held(self) -> int:
        """Chunks waiting for their pair."""
        return len(self._held)

    def pending(self) -> list[tuple[Run, str, int]]:
        """(run, request id, first position) of each chunk waiting for its pair."""
        return [(run, rid, pos) for (rid, pos), (run, _) in self._held.items()]


# --------------------------------------------------------------------------- 95% intervals
# An agreement or an accuracy counted over independent units (generated answers: one per
# problem) gets the exact binomial (Clopper-Pearson) interval, scipy.stats.binomtest. Top-1
# agreement is counted over positions, which are not independent within a text: it gets both
# the binomial interval over positions and a percentile bootstrap over texts
# (scipy.stats.bootstrap, paired agreeing/scored positions per text, the pooled ratio as
# statistic). An interval is [low, high] within [0, 1], or None when there is nothing to count;
# the bootstrap is seeded, so the same counts give the same interval.
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
