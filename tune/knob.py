"""``tune`` for a policy with one knob: ``kvsharer``'s shared layers, ``kvshare``'s recompute
share, and ``cf-topk``'s one tau where the target is generated answers (the fidelity model
predicts top-1 and KL, not answers). The simulator predicts each value's KV saved exactly;
the measured search is a bisection on the held-out texts.

Assumes fidelity falls as the knob shares more (more shared layers: more of the model reads
another layer's KV; less recomputed: more prompt KV computed in another context; a larger
tau: farther blocks shared); under it, ``b`` validate runs find the value furthest along
that meets the target among ``2**b`` values. The first value shares nothing (no shared layer,
everything recomputed, tau 0) and meets any target unmeasured.

Invariants: deterministic (same trace, options and measurements: same runs, same answer);
every validated point is a measured run of the value it names, on the held-out texts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memshare.errors import InputError
from memshare.policies.kvsharer import KVSharer
from memshare.registry import make_policy
from memshare.sim.config import SimConfig
from memshare.tune.points import PointResult, short
from memshare.tune.search import GRID, Candidate, Simulate, base_pages, kv_saved
from memshare.tune.target import Target

Measure = Callable[[SimConfig], PointResult]


@dataclass(frozen=True)
class Knob:
    """A policy's one searched parameter."""

    param: str
    values: Callable[[SimConfig], Sequence[float]]  # from least to most sharing, [0] none
    overrides: tuple[str, ...] = ()  # other parameters that would take the knob's place


def _kvsharer_layers(cfg: SimConfig) -> list[int]:
    policy = make_policy(cfg.policy, **{**cfg.policy_params, "layers": -1})
    assert isinstance(policy, KVSharer)
    return list(range(policy.shared_layers + 1))


# kvshare's recompute shares, from everything recomputed (prefix hits only) to nothing
RECOMPUTE = (1.0, 0.75, 0.5, 0.3, 0.2, 0.15, 0.1, 0.05, 0.0)

KNOBS: dict[str, Knob] = {
    "kvsharer": Knob("layers", _kvsharer_layers),
    "kvshare": Knob("recompute", lambda cfg: RECOMPUTE),
}
TAU = Knob("tau", lambda cfg: (0.0, *GRID), ("tau_layers",))  # cf-topk on generated answers


def knob_of(cfg: SimConfig, target: Target) -> Knob:
    """``cfg``'s policy's knob under ``target`` (InputError naming ``--set`` if it is given:
    tune sets it)."""
    knob = TAU if cfg.policy == "cf-topk" and target.generated else KNOBS[cfg.policy]
    for name in (knob.param, *knob.overrides):
        if name in cfg.policy_params:
            raise InputError(
                f"--set {name}",
                f"tune searches {cfg.policy}'s {knob.param}",
                f"leave {name} out",
            )
    return knob


def predicted(sim: Simulate, cfg: SimConfig, knob: Knob) -> list[Candidate]:
    """Every value of the knob simulated on the held-out texts (KV saved; no fidelity)."""
    base = base_pages(sim, cfg)
    out = []
    for v in knob.values(cfg):
        params = {**cfg.policy_params, knob.param: v}
        saved = kv_saved(sim(cfg.with_(policy_params=params)), base)
        out.append(Candidate(params, saved, None, None, None, False))
    return out


def bisect(
    cands: list[Candidate],
    cfg: SimConfig,
    target: Target,
    budget: int,
    measure: Measure,
    stage: Callable[[str], None],
) -> list[tuple[Candidate, PointResult]]:
    """At most ``budget`` validate runs of the knob's values (module docstring)."""
    lo, hi = 0, len(cands)  # cands[lo] meets the target; cands[hi] (if any) misses it
    validated: list[tuple[Candidate, PointResult]] = []
    for n in range(1, budget + 1):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        c = cands[mid]
        stage(f"round {n}: validating {short(c.params)} on the held-out texts")
        point = measure(cfg.with_(policy_params=c.params))
        validated.append((c, point))
        met = target.met(point.measured)
        lo, hi = (mid, hi) if met else (lo, mid)
    return validated
