"""``tune``'s cheap half: the predicted frontier of ``cf-topk``'s per-layer thresholds, found in
the simulator with the fidelity model (docs/tune.md).

At layer granularity a layer's shares depend, to first order, on its own threshold only, and
the model's predicted disagreement is a sum over layers. So one simulator run per grid
threshold (every layer at that threshold) gives, per layer, the pages it shares and the
disagreement it adds at each threshold (:func:`layer_table`); choosing a threshold per layer
is then a knapsack, solved by a Lagrangian sweep: for each price of disagreement every layer
picks its best threshold on its own (:func:`settings`). Each distinct setting is simulated in
full (the interactions the decomposition ignores included) and the Pareto frontier of
simulated KV saved against predicted top-1 agreement is kept (:func:`pareto` of
:func:`candidates`).

Invariants: deterministic; every point on the frontier is a real simulator run of the setting
it names, on the texts it will be validated on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memshare.sim.config import SimConfig
from memshare.sim.fidelity_model import FidelityModel, features
from memshare.sim.run import RunOutput
from memshare.validate.measure import Workload, predict

# thresholds searched per layer; finer where one tau's KV saved rises steeply (R1: 0.2% at
# 0.3, 3.5% at 0.4, 16% at 0.5), which is where a >= 99% target lies
GRID = (0.1, 0.2, 0.25, 0.3, 0.325, 0.35, 0.375, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
Simulate = Callable[[SimConfig], RunOutput]


@dataclass
class Candidate:
    """A setting simulated on the held-out texts."""

    params: dict[str, Any]  # the policy's parameters (tau_layers or tau)
    kv_saved: float  # simulated, against the unshared run
    top1: float | None  # predicted (None: the fidelity model does not cover the policy)
    top1_ci95: list[float] | None
    kl_mean: float | None  # predicted
    outside_fit: bool


@dataclass
class LayerTable:
    """Per grid threshold and layer: pages shared and predicted disagreement."""

    taus: tuple[float, ...]
    pages: np.ndarray  # (G, L) pages shared per layer
    loss: np.ndarray  # (G, L) predicted disagreeing positions per layer (sum over positions)
    uniform: list[Candidate]  # the grid runs themselves (one tau for all layers)


def simulator(wl: Workload, gpu: str, model: FidelityModel | None) -> Simulate:
    """The simulator on ``wl`` with ``model`` (the teacher-forced workload validate runs)."""
    return lambda cfg: predict(cfg, wl, gpu, model)


def kv_saved(out: RunOutput, base_pages: float) -> float:
    """A run's KV saved: 1 - its mean pages in use over the unshared run's (:func:`base_pages`)."""
    return 1.0 - float(np.mean(out.result.timeline.live_pages)) / base_pages


def _candidate(out: RunOutput, base_pages: float, params: dict[str, Any]) -> Candidate:
    f = out.metrics["fidelity_predicted"]
    return Candidate(
        params,
        kv_saved(out, base_pages),
        f["top1_agreement"],
        f["top1_agreement_ci95"],
        f["kl_mean"],
        f["outside_fit"],
    )


def base_pages(sim: Simulate, cfg: SimConfig) -> float:
    """Mean pages in use of the unshared run of ``cfg``'s workload."""
    out = sim(cfg.with_(policy="none", policy_params={}))
    return float(np.mean(out.result.timeline.live_pages))


def layer_table(
    sim: Simulate, cfg: SimConfig, model: FidelityModel, wl: Workload, base: float
) -> LayerTable:
    """One simulator run per grid threshold (module docstring)."""
    pages, loss, uniform = [], [], []
    for tau in GRID:
        params = {**cfg.policy_params, "tau": tau}
        params.pop("tau_layers", None)
        out = sim(cfg.with_(policy_params=params))
        shared = out.metrics["sharing"]["per_layer_shared_fraction"]
        pages.append(np.asarray(shared or [0.0] * model.layers, np.float64))
        loss.append(_layer_loss(out, model, wl))
        uniform.append(_candidate(out, base, params))
    return LayerTable(GRID, np.stack(pages), np.stack(loss), uniform)


def _layer_loss(out: RunOutput, model: FidelityModel, wl: Workload) -> np.ndarray:
    """Predicted disagreeing positions per layer (the linear model, before its cap at 1)."""
    log = out.shares
    assert log is not None
    total = np.zeros(model.layers)
    for rid, text in wl.texts.items():
        ft, w = log.of(rid).arrays(model.layers)
        if len(ft):
            x = features(ft, w, len(text), wl.block_size)
            total += (x.sum(axis=0) * model.top1).reshape(-1, 2).sum(axis=1)
    return total


def settings(table: LayerTable, prices: int = 40) -> list[list[float | None]]:
    """Distinct per-layer threshold choices (``None``: off) of a Lagrangian sweep over
    ``prices`` prices of disagreement, from free to prohibitive."""
    layers = table.pages.shape[1]
    gain = np.vstack([np.zeros(layers), table.pages])  # row 0: off
    cost = np.vstack([np.zeros(layers), table.loss])
    scale = float(gain.max()) / max(float(cost[cost > 0].min(initial=1.0)), 1e-12)
    seen: list[list[float | None]] = []
    for lam in np.concatenate([[0.0], np.geomspace(1e-6, 1e3, prices) * scale]):
        pick = np.argmax(gain - lam * cost, axis=0)  # first best: the smaller threshold
        choice = [None if i == 0 else table.taus[i - 1] for i in pick.tolist()]
        if choice not in seen:
            seen.append(choice)
    return seen


def spec_of(choice: Sequence[float | None]) -> str:
    """``tau_layers`` text of a per-layer choice, runs of equal thresholds as ranges."""
    parts, start = [], 0
    for i in range(1, len(choice) + 1):
        if i == len(choice) or choice[i] != choice[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            value = "off" if choice[start] is None else f"{choice[start]:g}"
            parts.append(f"{span}:{value}")
            start = i
    return ",".join(parts)


def candidates(sim: Simulate, cfg: SimConfig, table: LayerTable, base: float) -> list[Candidate]:
    """The grid's one-tau runs and every distinct setting of :func:`settings`, each simulated
    in full."""
    found = list(table.uniform)
    for choice in settings(table):
        if all(c is None for c in choice):
            continue
        params = {**cfg.policy_params, "tau_layers": spec_of(choice)}
        found.append(_candidate(sim(cfg.with_(policy_params=params)), base, params))
    return found


def pareto(found: Sequence[Candidate]) -> list[Candidate]:
    """The Pareto-optimal candidates (KV saved up, predicted top-1 up), by KV saved."""
    ranked = sorted(found, key=lambda c: (-c.kv_saved, -(c.top1 or 0.0)))
    kept: list[Candidate] = []
    for c in ranked:  # by KV saved, descending: keep those beating every larger saving's top-1
        if not kept or (c.top1 or 0.0) > (kept[-1].top1 or 0.0):
            kept.append(c)
    return sorted(kept, key=lambda c: c.kv_saved)
