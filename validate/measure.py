"""Run a simulator run's workload on the real model, beside the simulator's prediction of the
very same steps (docs/validate.md).

For a KV trace (``capture --texts`` or ``--dataset``), each request's text (prompt and
output) runs teacher-forced, block by block, as one prefill of the whole text whose chunks are
one block long (``long_prefill_token_threshold = block size``), then one forced sampled
token. Both executors get exactly that workload: the simulator (:func:`~memshare.sim.run.
run_config`, the run's own config with that workload, all requests at 0 s, the budget capped at
what every request needs at once) and the paged engine. So for a lossless policy the steps,
pages and shares must be identical; for a lossy one the engine decides on sketches of its live
KV, which drifts from the captured KV after the first share: the gap is the prediction error.

The unshared engine (``none``) runs in lockstep with every policy's engine: one step of each in
turn, or (``one_pass``) every engine's step in one forward pass
(:mod:`~memshare.validate.engine.group`); logits of the same (request, first position) chunk
are compared as soon as all have produced them, so at most a few steps' logits are held,
never written.

Invariants: every engine and the simulator get the same request order, block size, budget and
scheduler limits; the ``none`` engine is run once and is also the measured run of a ``none``
policy; fidelity counts only positions whose logits both runs produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from memshare.errors import InputError
from memshare.kv_manager import blocks_for_all
from memshare.policy import Policy
from memshare.registry import make_policy
from memshare.request import Request
from memshare.scheduler import SchedulerConfig
from memshare.sim.config import ArrivalSpec, KVBudget, SimConfig, load_gpu
from memshare.sim.cost_model import BatchShape, plan_shape
from memshare.sim.fidelity_model import KL_CAP, FidelityModel, FitText, features
from memshare.sim.run import LoadedTrace, RunOutput, resolve, run_config
from memshare.traces.schema import RequestRecord
from memshare.validate.engine.group import Groups, grouped_engines, step_groups
from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine
from memshare.validate.engine.store import PageStore
from memshare.validate.engine.twin import twin
from memshare.validate.fidelity import FidelityAccumulator, add_pairs, next_token_targets
from memshare.validate.runs.folders import RunDir

Progress = Callable[[str, int, int], None]  # what, done, total


@dataclass
class Workload:
    """The requests both executors run (see the module docstring)."""

    records: list[RequestRecord]  # simulator form: text as prompt, one forced output token
    specs: list[EngineSpec]  # engine form of the same
    texts: dict[str, list[int]]  # request -> its text's tokens (fidelity targets)
    trace: LoadedTrace  # the trace re-keyed to ``records`` (same KV rows)
    block_size: int
    num_blocks: int  # KV budget both run under


@dataclass
class Measured:
    """One policy's engine run, with its fidelity against ``none``."""

    engine: PagedEngine
    fidelity: FidelityAccumulator = field(default_factory=FidelityAccumulator)
    first_share_pos: dict[str, int] = field(default_factory=dict)  # request -> position
    shapes: list[BatchShape] = field(default_factory=list)  # per step, for the cost fit
    _by_rid: dict[str, Request] = field(default_factory=dict, repr=False)

    def computed_past(self, rid: str, end: int) -> bool:
        """Whether this run's request ``rid`` has computed (or finished) up to ``end``."""
        if not self._by_rid:
            self._by_rid = {q.rid: q for q in self.engine.requests}
        q = self._by_rid[rid]
        return q.finished or q.num_computed >= end


def teacher_forced_workload(trace: LoadedTrace, run: RunDir, limit: int | None) -> Workload:
    """The run's requests as teacher-forced texts (a workload-only trace: tokenized first,
    :func:`~memshare.validate.runs.workload.tokenized`)."""
    cfg = run.config
    cap = limit or cfg.limit
    src = trace.records[:cap] if cap else trace.records
    recorded = run.recorded.get("num_blocks")
    budget = recorded if isinstance(recorded, int) else None
    return texts_workload(trace, src, resolve(cfg, trace).block_size, budget)


def texts_workload(
    trace: LoadedTrace, src: Sequence[RequestRecord], bs: int, budget: int | None = None
) -> Workload:
    """``src``'s texts (prompt and output tokens) teacher-forced, one forced token each, under
    the budget every text needs at once (or ``budget``, where that is positive and smaller)."""
    records: list[RequestRecord] = []
    specs: list[EngineSpec] = []
    texts: dict[str, list[int]] = {}
    for rec in src:
        ids = list(rec.prompt_ids or []) + list(rec.output_ids or [])
        if not ids:
            raise InputError(str(trace.path), f"request {rec.id!r} has no token ids", "capture")
        tok = ids[-1]
        records.append(
            replace(
                rec,
                arrival_s=0.0,
                prompt_len=len(ids),
                output_len=1,
                prompt_ids=ids,
                output_ids=[tok],
                finish_reason="length",
            )
        )
        specs.append(EngineSpec(rec.id, ids, 1, rec.steps, forced=[tok]))
        texts[rec.id] = ids
    need = blocks_for_all((len(t) + 1 for t in texts.values()), bs)
    if budget is not None and 0 < budget < need:
        need = budget
    tr = LoadedTrace(trace.path, trace.manifest, records, trace.kv_rows)
    return Workload(records, specs, texts, tr, bs, need)


def simulate_on(
    cfg: SimConfig,
    trace: LoadedTrace,
    num_blocks: int,
    block_size: int,
    gpu: str,
    scheduler: SchedulerConfig | None = None,
    *,
    arrival: ArrivalSpec | None = None,
    fidelity: FidelityModel | None = None,
) -> RunOutput:
    """The simulator's run of ``cfg`` on exactly an engine's workload (``trace``: its records,
    at their ``arrival_s``, all 0 s unless kept; or under ``arrival``), budget and block size,
    timed on the ``gpu`` preset."""
    sim_cfg = cfg.with_(
        limit=None,
        kv=KVBudget(blocks=num_blocks),
        block_size=block_size,
        arrival=arrival or ArrivalSpec(),
        scheduler=scheduler or cfg.scheduler,
        gpu=load_gpu(gpu),
    )
    return run_config(sim_cfg, trace, fidelity=fidelity)


def predict(
    cfg: SimConfig, wl: Workload, gpu: str, fidelity: FidelityModel | None = None
) -> RunOutput:
    """The simulator's run of ``cfg`` on the teacher-forced workload (chunks of one block;
    ``fidelity``: with the model's prediction of its fidelity)."""
    sched = replace(cfg.scheduler, long_prefill_token_threshold=wl.block_size)
    return simulate_on(cfg, wl.trace, wl.num_blocks, wl.block_size, gpu, sched, fidelity=fidelity)


def first_differing_step(pred: RunOutput, engine: PagedEngine) -> int | None:
    """The first step whose batch (sequences, computed tokens) or live pages differ between
    the simulator's run and the engine's (one past the shorter if one ran longer); ``None``
    when every step is identical."""
    tl = pred.result.timeline
    want = list(zip(tl.scheduled_seqs, tl.scheduled_tokens, tl.live_pages, strict=True))
    got = [(s.seqs, s.computed, s.live_pages) for s in engine.steps]
    first = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)
    if first is None and len(want) != len(got):
        first = min(len(want), len(got))
    return first


def engine_for(
    model: Any,
    cfg: SimConfig | None,
    wl: Workload,
    sched: Any,
    store: PageStore | None = None,
) -> PagedEngine:
    """A paged engine for ``cfg``'s policy (``None``: the unshared ``none``) on ``wl``: on a
    copy of ``model`` with its own pages, or on ``model`` itself over ``store`` (a part of an
    :class:`EngineGroup`'s arena, whose pass runs the model)."""
    sk = wl.trace.manifest.sketch
    opts = EngineOptions(
        block_size=wl.block_size,
        kv_blocks=wl.num_blocks,
        scheduler=sched,
        teacher_forced=True,
        sketch_dim=sk.dim if sk is not None else EngineOptions.sketch_dim,
        sketch_seed=sk.seed if sk is not None else EngineOptions.sketch_seed,
    )
    own = twin(model) if store is None else model
    return PagedEngine(own, policy_of(cfg), wl.specs, opts, eos_ids=frozenset(), store=store)


def _plain_none(cfg: SimConfig) -> bool:
    """A ``none`` run without parameters: its measurement is the base engine's."""
    return cfg.policy == "none" and not cfg.policy_params


def policy_of(cfg: SimConfig | None) -> Policy:
    """``cfg``'s policy, fresh (``None``: the unshared ``none``)."""
    return make_policy("none") if cfg is None else make_policy(cfg.policy, **cfg.policy_params)


def run_lockstep(
    model: Any,
    configs: Sequence[SimConfig],
    wl: Workload,
    progress: Progress | None = None,
    *,
    one_pass: bool = False,
) -> tuple[Measured, list[Measured]]:
    """The ``none`` engine and one engine per config (``none`` configs share the base), stepped
    in turn (``one_pass``: every engine's step in one forward pass, engines of one layer map
    per :class:`EngineGroup`); returns the base run and each config's measurement (in
    ``configs`` order; a ``none`` config's is the base run itself)."""
    sched = replace(configs[0].scheduler, long_prefill_token_threshold=wl.block_size)
    own_cfgs = [c for c in configs if not _plain_none(c)]
    cfgs: list[SimConfig | None] = [None, *own_cfgs]
    groups: Groups = []
    if one_pass:
        engines = _grouped(model, cfgs, wl, sched, groups)
    else:
        engines = [engine_for(model, c, wl, sched) for c in cfgs]
    measured = [Measured(e) for e in engines]
    base_m, own = measured[0], measured[1:]
    runs: list[Measured] = []
    k = 0
    for cfg in configs:
        if _plain_none(cfg):
            runs.append(base_m)
        else:
            k += 1
            runs.append(measured[k])
    held: list[dict[tuple[str, int], tuple[Any, bool]]] = [{} for _ in engines]
    share_seen = [0] * len(engines)
    shared_reqs: list[set[str]] = [set() for _ in engines]
    for j, eng in enumerate(engines):
        eng.logits_sink = _sink(held[j], shared_reqs[j])
    total = sum(len(t) for t in wl.texts.values())
    alive = [True] * len(engines)
    owed: dict[tuple[str, int], set[int]] = {}
    while any(alive):
        if groups:
            stepped = step_groups(groups, len(engines))
        else:
            stepped = [alive[j] and eng.step() for j, eng in enumerate(engines)]
        for j, eng in enumerate(engines):
            alive[j] = stepped[j]
            if not stepped[j]:
                continue
            for s in eng.shares[share_seen[j] :]:
                shared_reqs[j].add(s.request)
            share_seen[j] = len(eng.shares)
            if eng.last_plan is not None:
                measured[j].shapes.append(plan_shape(eng.last_plan))
        _pair(held, own, wl, owed)
        if progress is not None:
            progress("engines", min(total, _positions(base_m)), total)
    for group, _ in groups:
        group.close()
    return base_m, runs


def _grouped(
    model: Any,
    cfgs: Sequence[SimConfig | None],
    wl: Workload,
    sched: Any,
    groups: Groups,
) -> list[PagedEngine]:
    """One engine per config, on parts of one arena per layer map; fills ``groups``."""
    engines, built = grouped_engines(
        model,
        [policy_of(c) for c in cfgs],
        wl.num_blocks,
        wl.block_size,
        lambda j, store: engine_for(model, cfgs[j], wl, sched, store),
    )
    groups.extend(built)
    return engines


def _positions(m: Measured) -> int:
    return sum(s.computed for s in m.engine.steps)


def _sink(
    held: dict[tuple[str, int], tuple[Any, bool]], shared: set[str]
) -> Callable[[str, int, Any], None]:
    """Keep a chunk's logits until the other runs produced theirs; note whether the request
    had a share applied before this step (shares apply at step ends)."""

    def sink(rid: str, pos: int, logits: Any) -> None:
        held[(rid, pos)] = (logits, rid in shared)

    return sink


def _pair(
    held: list[dict[tuple[str, int], tuple[Any, bool]]],
    own: list[Measured],
    wl: Workload,
    owed: dict[tuple[str, int], set[int]],
) -> None:
    """Compare each base chunk with every run that produced it, and drop what is compared.

    A run's figures depend on it and the base alone, whichever runs step beside them: a base
    chunk waits (``owed``: the runs yet to compare it) until each run produced it or went
    past it without computing it (a prefix-cache hit: that run has no logits there)."""
    base = held[0]
    for key in list(base):
        rid, pos = key
        logits, _ = base[key]
        n = int(logits.shape[0])
        waiting = owed.setdefault(key, set(range(len(own))))
        pairs = []
        for j in sorted(waiting):
            m = own[j]
            if key in held[j + 1]:
                shared_logits, after = held[j + 1].pop(key)
                if after:
                    m.first_share_pos.setdefault(rid, pos)
                pairs.append((m.fidelity, shared_logits, np.full(n, after, dtype=bool)))
                waiting.discard(j)
            elif m.computed_past(rid, pos + n):
                waiting.discard(j)
        if pairs:
            add_pairs(rid, pos, logits, pairs, next_token_targets(wl.texts[rid], pos, n))
        if not waiting:
            del base[key], owed[key]


def sketch_vs_exact(engine: PagedEngine, tau: float | None) -> dict[str, Any]:
    """Every confirmed share's exact distance on the live KV against ``tau`` (per share: the
    largest over its layers, the distance the sketch stood for)."""
    exact = np.array([max(s.exact_distance) for s in engine.shares if s.exact_distance])
    out: dict[str, Any] = {"shares": len(engine.shares), "tau": tau}
    if exact.size == 0:
        return out | {"exact_distance": None, "exceeding_tau": None, "exceeding_tau_by_10pct": None}
    q = np.percentile(exact, [50, 90, 99])
    out["exact_distance"] = {
        "mean": float(exact.mean()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": float(exact.max()),
    }
    if tau is None or not math.isfinite(tau):
        return out | {"exceeding_tau": None, "exceeding_tau_by_10pct": None}
    out["exceeding_tau"] = float(np.mean(exact > tau))
    out["exceeding_tau_by_10pct"] = float(np.mean(exact > 1.1 * tau))
    return out


def fit_texts(label: str, m: Measured, wl: Workload) -> list[FitText]:
    """The positions ``m`` compared, one :class:`FitText` per request, with the features of
    the shares its engine applied."""
    log = m.engine.manager.share_log
    layers = m.engine.pool.num_layers
    out = []
    for rid in m.fidelity.requests():
        pos, agree, kl = m.fidelity.positions(rid)
        if log is None:
            x = np.zeros((len(pos), 2 * layers))
        else:
            ft, w = log.of(rid).arrays(layers)
            x = features(ft, w, len(wl.texts[rid]), wl.block_size)[pos]
        out.append(
            FitText(label, rid, x, agree, np.minimum(np.nan_to_num(kl, posinf=KL_CAP), KL_CAP))
        )
    return out
