"""Fit the simulator's cost-model coefficients to measured step times (docs/cost-fit.md).

The roofline of :mod:`memshare.sim.cost_model` is, per step, with ``g = 1/gemm_efficiency``,
``a = 1/attn_efficiency``, ``w = 1/bandwidth_efficiency``::

    T = max(Lc*g, Lb*w) + max(Pc*a, Pb*w) + max(Dc*a, Db*w) + step_overhead + seq_overhead*S

where ``Lc..Db`` are the FLOP and byte counts of the step's :class:`BatchShape` divided by
the GPU's peaks, and ``S`` its sequence count. Each ``max`` picks a regime (compute- or
memory-bound); with the regimes fixed, ``T`` is linear in ``x = (g, a, w, step, seq)``.
:func:`fit_cost_model` alternates: assign each step's regimes under the current ``x``
(starting from the prior, by default ``presets/cost.toml``), solve the linear least squares
with scipy, repeat until no regime changes or ``max_iter``; it returns the iterate with the
smallest training objective.

Invariants:

- The objective is the sum of squared *relative* errors ``((T_model - T)/T)^2`` (rows weighted
  by ``1/T``), so millisecond decode steps count as much as second-long prefills.
- Bounded least squares (``scipy.optimize.lsq_linear``, BVLS: the exact bounded optimum, an
  active set): efficiencies stay in ``[EFFICIENCY_MIN, 1]`` (``1`` is the most
  :class:`CostCoefficients` and ``simulate --cost-model`` accept), overheads ``>= 0``; values
  the optimum puts on a bound are listed in ``CostFit.at_bound``.
- A coefficient that the data cannot determine (its column is zero, or a combination of
  earlier ones, under the final regimes; e.g. ``attn_efficiency`` from decode-only steps on a
  GPU where decode attention is bandwidth-bound) keeps its prior value exactly and is listed
  in ``CostFit.not_fitted``; ``fitted`` and ``not_fitted`` partition the five names.
- Errors before (prior) and after (fit) are measured with :class:`CostModel` itself on the
  ``test`` steps, which the fit never sees; the caller picks them (e.g. other requests' steps,
  or :func:`split_steps`).
- :func:`write_cost_fit` writes the ``[coefficients]`` TOML that ``simulate --cost-model``
  reads, atomically, after checking that :func:`~memshare.sim.config.load_cost` reads the
  temp file back to exactly the fitted coefficients.

Imports numpy, scipy (lazily) and the simulator's config and cost model only (no simpy, no
torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.atomic import write_atomic
from memshare.errors import InputError
from memshare.sim.config import CostCoefficients, GpuSpec, ModelConfig, cost_toml, load_cost
from memshare.sim.cost_model import BatchShape, CostModel

COST_TOML = "cost_model.toml"  # what validate --fit-cost-model writes into the run directory

Step = tuple[BatchShape, float]  # a batch shape and its measured seconds
Array = npt.NDArray[np.float64]
NAMES = tuple(f.name for f in fields(CostCoefficients))  # gemm, attn, bw, step, seq
EFFICIENCY_MIN = 1e-4  # lowest efficiency a fit may return
RANK_TOL = 1e-9  # relative singular value below which a column adds nothing


@dataclass(frozen=True)
class StepError:
    """Absolute percentage error of a model's step times on some steps."""

    mape_pct: float  # mean |T_model - T| / T, in percent
    median_ape_pct: float  # median of the same
    steps: int


@dataclass(frozen=True)
class CostFit:
    """What :func:`fit_cost_model` found."""

    coefficients: CostCoefficients  # fitted, with the prior where not fitted
    prior: CostCoefficients  # the starting point (and the "before" model)
    fitted: tuple[str, ...]  # coefficient names the data determined
    not_fitted: tuple[str, ...]  # names kept at the prior
    at_bound: tuple[str, ...]  # fitted names clipped to a bound
    before: StepError  # prior on the test steps
    after: StepError  # fit on the test steps
    train_steps: int
    iterations: int  # regime assignments solved
    converged: bool  # the regimes stopped changing before max_iter


def fit_cost_model(
    train: Sequence[Step],
    test: Sequence[Step],
    model: ModelConfig,
    gpu: GpuSpec,
    *,
    prior: CostCoefficients | None = None,
    max_iter: int = 50,
) -> CostFit:
    """Fit on ``train`` by regime-iterated relative least squares; report errors on ``test``.

    Raises :class:`InputError` on no steps or a time that is not a positive finite number.
    """
    _check(train, "train")
    _check(test, "test")
    if max_iter < 1:
        raise InputError("max_iter", f"must be >= 1, got {max_iter}", "e.g. 50")
    prior = load_cost(None) if prior is None else prior
    terms = _terms([b for b, _ in train], model, gpu)
    t = np.array([s for _, s in train], dtype=np.float64)
    x0 = _to_x(prior)
    regimes = _regimes(terms, x0)
    best: tuple[float, Array, tuple[int, ...], tuple[int, ...]] = (math.inf, x0, (), ())
    iterations, converged = 0, False
    while iterations < max_iter and not converged:
        iterations += 1
        x, free, bound = _solve(terms, regimes, t, x0)
        objective = float(np.sum((_predict(terms, x) / t - 1.0) ** 2))
        if objective < best[0]:
            best = (objective, x, free, bound)
        new = _regimes(terms, x)
        converged = bool(np.array_equal(new, regimes))
        regimes = new
    _, x, free, bound = best
    coef = _from_x(x, free, prior)
    return CostFit(
        coefficients=coef,
        prior=prior,
        fitted=tuple(NAMES[i] for i in sorted(free)),
        not_fitted=tuple(n for i, n in enumerate(NAMES) if i not in free),
        at_bound=tuple(NAMES[i] for i in sorted(bound)),
        before=step_error(test, model, gpu, prior),
        after=step_error(test, model, gpu, coef),
        train_steps=len(train),
        iterations=iterations,
        converged=converged,
    )


def step_error(
    steps: Sequence[Step], model: ModelConfig, gpu: GpuSpec, coef: CostCoefficients
) -> StepError:
    """Mean and median absolute percentage error of :class:`CostModel` on ``steps``."""
    _check(steps, "steps")
    cm = CostModel(model, gpu, coef)
    ape = np.array([abs(cm.step_time(b) - s) / s * 100.0 for b, s in steps])
    return StepError(float(np.mean(ape)), float(np.median(ape)), len(steps))


def split_steps(steps: Sequence[Step], every: int = 5) -> tuple[list[Step], list[Step]]:
    """(train, test): every ``every``-th step (index ``every-1``, ``2*every-1``, ...) is held
    out. Deterministic; prefer a split by request where the steps' requests are known."""
    if every < 2:
        raise InputError("every", f"must be >= 2, got {every}", "hold out every 2nd step or rarer")
    test = [s for i, s in enumerate(steps) if i % every == every - 1]
    return [s for i, s in enumerate(steps) if i % every != every - 1], test


def write_cost_fit(fit: CostFit, path: Path, source: str = "") -> None:
    """Write ``fit.coefficients`` as a ``--cost-model`` TOML (comments say how it was fitted),
    atomically; the temp file must load back through ``load_cost`` to the same values."""
    b, a = fit.before, fit.after
    comment = "\n".join(
        [
            "Fitted by memshare.validate.cost_fit: regime-iterated least squares on relative",
            f"step-time error (docs/cost-fit.md); {fit.train_steps} training steps, "
            f"{fit.iterations} iterations, converged: {fit.converged}.",
            f"fitted: {', '.join(fit.fitted) or 'none'}; "
            f"kept prior: {', '.join(fit.not_fitted) or 'none'}; "
            f"at a bound: {', '.join(fit.at_bound) or 'none'}.",
            f"held-out ({a.steps} steps) MAPE {b.mape_pct:.2f}% -> {a.mape_pct:.2f}%, "
            f"median {b.median_ape_pct:.2f}% -> {a.median_ape_pct:.2f}%.",
            *([f"source: {line}" for line in source.splitlines()]),
        ]
    )

    def loads_back(tmp: Path) -> None:
        if load_cost(str(tmp)) != fit.coefficients:
            raise RuntimeError(f"{path}: the written coefficients do not load back the same")

    write_atomic(path, cost_toml(fit.coefficients, comment), verify=loads_back)


# --------------------------------------------------------------------------- internals
def _check(steps: Sequence[Step], where: str) -> None:
    if not steps:
        raise InputError(where, "holds no steps", "measure at least one step")
    for i, (_, s) in enumerate(steps):
        ok = isinstance(s, int | float) and not isinstance(s, bool)
        if not (ok and math.isfinite(s) and s > 0):
            raise InputError(
                f"{where}[{i}] seconds", f"{s!r} is not a positive finite time", "re-measure it"
            )


def _terms(shapes: Sequence[BatchShape], m: ModelConfig, gpu: GpuSpec) -> Array:
    """Columns Lc, Lb, Pc, Pb, Dc, Db, S per step: :meth:`CostModel._terms` at efficiency 1
    and no overhead, each side of each max apart (tests check the two agree)."""
    f, bw = gpu.peak_flops, gpu.mem_bandwidth
    pair = 4.0 * m.num_layers * m.num_heads * m.head_dim
    kv = float(m.kv_bytes_per_token)
    read = float((m.linear_params + m.lm_head_params) * m.dtype_bytes)
    rows = [
        (
            (2.0 * m.linear_params * b.num_tokens + 2.0 * m.lm_head_params * b.num_sampled) / f,
            read / bw,
            pair * b.prefill_pairs / f if b.prefill_seqs else 0.0,
            kv * b.prefill_kv_tokens / bw if b.prefill_seqs else 0.0,
            pair * b.decode_kv_tokens / f if b.decode_seqs else 0.0,
            kv * b.decode_kv_tokens / bw if b.decode_seqs else 0.0,
            float(b.num_seqs),
        )
        for b in shapes
    ]
    return np.array(rows, dtype=np.float64).reshape(len(rows), 7)


def _regimes(k: Array, x: Array) -> npt.NDArray[np.bool_]:
    """Per step and term (linear, prefill, decode): True where the compute side wins."""
    g, a, w = x[0], x[1], x[2]
    return np.stack(
        [k[:, 0] * g >= k[:, 1] * w, k[:, 2] * a >= k[:, 3] * w, k[:, 4] * a >= k[:, 5] * w], axis=1
    )


def _design(k: Array, r: npt.NDArray[np.bool_]) -> Array:
    """Columns for x = (g, a, w, step, seq) under regimes ``r``: T = design @ x."""
    g = k[:, 0] * r[:, 0]
    a = k[:, 2] * r[:, 1] + k[:, 4] * r[:, 2]
    w = k[:, 1] * ~r[:, 0] + k[:, 3] * ~r[:, 1] + k[:, 5] * ~r[:, 2]
    return np.stack([g, a, w, np.ones(len(k)), k[:, 6]], axis=1)


def _predict(k: Array, x: Array) -> Array:
    g, a, w, step, seq = x
    lin = np.maximum(k[:, 0] * g, k[:, 1] * w)
    out: Array = (
        lin
        + np.maximum(k[:, 2] * a, k[:, 3] * w)
        + np.maximum(k[:, 4] * a, k[:, 5] * w)
        + step
        + seq * k[:, 6]
    )
    return out


def _identifiable(d: Array) -> list[int]:
    """Greedy column selection (w, g, a, step, seq): a column joins if it raises the rank."""
    norms = np.linalg.norm(d, axis=0)
    chosen: list[int] = []
    for j in (2, 0, 1, 3, 4):
        if norms[j] == 0.0:
            continue
        cols = d[:, [*chosen, j]] / norms[[*chosen, j]]
        sv = np.linalg.svd(cols, compute_uv=False)
        if sv[-1] > RANK_TOL * sv[0]:
            chosen.append(j)
    return sorted(chosen)


_LO = np.array([1.0, 1.0, 1.0, 0.0, 0.0])  # x bounds: inverse efficiencies >= 1, overheads >= 0
_HI = np.array([1 / EFFICIENCY_MIN] * 3 + [math.inf] * 2)


def _solve(
    k: Array, r: npt.NDArray[np.bool_], t: Array, x0: Array
) -> tuple[Array, tuple[int, ...], tuple[int, ...]]:
    """Relative least squares under regimes ``r``, bounded (``scipy.optimize.lsq_linear``);
    returns (x, fitted, at a bound) indices."""
    from scipy.optimize import lsq_linear

    d = _design(k, r) / t[:, None]  # rows weighted by 1/T: relative error
    free = _identifiable(d)
    x, fixed = x0.copy(), [i for i in range(5) if i not in free]
    if not free:
        return x, (), ()
    rhs = 1.0 - d[:, fixed] @ x[fixed]
    res = lsq_linear(d[:, free], rhs, bounds=(_LO[free], _HI[free]), method="bvls")
    x[free] = res.x
    bound = tuple(i for i, active in zip(free, res.active_mask, strict=True) if active != 0)
    return x, tuple(free), bound


def _to_x(c: CostCoefficients) -> Array:
    inv = [1 / c.gemm_efficiency, 1 / c.attn_efficiency, 1 / c.bandwidth_efficiency]
    return np.array([*inv, c.step_overhead_s, c.seq_overhead_s], dtype=np.float64)


def _from_x(x: Array, fitted: Sequence[int], prior: CostCoefficients) -> CostCoefficients:
    values = {n: float(getattr(prior, n)) for n in NAMES}
    for i in fitted:
        values[NAMES[i]] = min(1.0, 1.0 / float(x[i])) if i < 3 else float(x[i])
    return CostCoefficients(**values)


def fit_and_write(
    steps: Sequence[Step],
    model: ModelConfig,
    gpu: GpuSpec,
    prior: CostCoefficients,
    path: Path,
    source: str,
) -> dict[str, Any]:
    """Fit on every 5th step held out (:func:`split_steps`), write the TOML at ``path`` and
    return validate's ``cost_model_fit`` entry (error before / after on the held-out steps)."""
    train, test = split_steps(steps)
    fit = fit_cost_model(train, test, model, gpu, prior=prior)
    write_cost_fit(fit, path, source=source)
    return {
        "file": str(path),
        "fitted": list(fit.fitted),
        "not_fitted": list(fit.not_fitted),
        "error_before_pct": fit.before.mape_pct,
        "error_after_pct": fit.after.mape_pct,
        "train_steps": len(train),
        "test_steps": len(test),
    }
