"""``validate``'s engine parts as fan-out jobs (:mod:`memshare.fanout`): the runs under
``RUN`` split into groups, one job per group; each job runs the unshared engine beside its
group's runs through every part (teacher-forced, at the budget, generated answers) and
returns the figures, series, steps and engine results; the driver writes every file. A run's
teacher-forced ``validation.json`` entry (:func:`policy_report`) is built here, at the end.

Invariants: a job's figures depend only on its own runs and the unshared run beside them
(each engine steps on its own; ``one_pass`` is the exception: engines share a forward pass,
so a different grouping may move fidelity figures in their last bits), so tokens, pages and
fidelity are the same in-process (one group) and on Ray (a group per worker); a host loads
the model once (:meth:`~memshare.fanout.host.Host.cached`) and serves every group it gets.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from memshare.fanout.host import Host
from memshare.fanout.jobs import Job, job_key
from memshare.request import detached
from memshare.sim.config import SimConfig
from memshare.sim.cost_model import BatchShape
from memshare.sim.fidelity_model import FitText
from memshare.sim.run import LoadedTrace, RunOutput
from memshare.validate.budget import BudgetWorkload, budget_report, pme, run_at_budget
from memshare.validate.engine.paged_engine import PagedEngine
from memshare.validate.engine.records import PagedRunResult, StepRecord
from memshare.validate.fidelity import FidelityMetrics, binomial_interval, ratio_bootstrap
from memshare.validate.generated import AnswerComparer, EngineWriter, GenRun, generate_answers
from memshare.validate.measure import (
    Measured,
    Workload,
    first_differing_step,
    fit_texts,
    run_lockstep,
    sketch_vs_exact,
)
from memshare.validate.runs.folders import RunDir

Shaped = list[tuple[Sequence[BatchShape], Sequence[StepRecord]]]  # steps for the cost fit
Series = list[tuple[str, Sequence[float], Sequence[float]]]  # run, predicted, measured pages


@dataclass(frozen=True)
class ModelSpec:
    """The model every engine job loads (once per host)."""

    model: str | None
    device: str
    dtype: str
    threads: int | None


@dataclass(frozen=True)
class EngineShared:
    """What every group's job reads: shipped once to each worker."""

    spec: ModelSpec
    runs: list[RunDir]  # every run under RUN, in report order
    predicted: dict[str, RunOutput]  # label -> the simulator's run of the teacher-forced part
    base_pred: RunOutput  # the unshared run's
    wl: Workload  # the teacher-forced workload
    tf_sub: Path  # where a run's teacher-forced engine files go, under its folder
    one_pass: bool
    bw: BudgetWorkload | None  # the budget part's workload (None: fidelity only)
    budget_pred: dict[str, RunOutput]  # label -> the simulator's run at the budget
    budget_base_pred: RunOutput | None
    answers_trace: LoadedTrace | None  # a dataset trace: answers are generated from it


@dataclass(frozen=True)
class EngineWrite:
    """An engine run's files for the driver to write (``EngineWriter.write``'s arguments)."""

    folder: Path
    config: SimConfig
    result: PagedRunResult  # its requests detached (memshare.request.detached)
    rows: dict[str, dict[str, Any]]

    @staticmethod
    def of(folder: Path, config: SimConfig, result: PagedRunResult, rows: Any) -> EngineWrite:
        """The write of ``result``, its requests detached from the engine."""
        requests = [detached(q) for q in result.requests]
        return EngineWrite(folder, config, replace(result, requests=requests), rows)


@dataclass
class GroupResult:
    """What one group's job returns."""

    policies: dict[str, dict[str, Any]]  # label -> its validation.json entry
    series: Series
    shaped: Shaped
    writes: list[EngineWrite] = field(default_factory=list)
    fit: list[FitText] = field(default_factory=list)  # the positions each shared run compared


def group_labels(runs: Sequence[RunDir], groups: int) -> list[tuple[str, ...]]:
    """The runs' labels dealt into at most ``groups`` groups, in run order within each; the
    unshared runs (``none``) join the first group (they are the base every group runs)."""
    plain = [r.label for r in runs if r.config.policy == "none" and not r.config.policy_params]
    rest = [r.label for r in runs if r.label not in plain]
    n = max(1, min(groups, len(rest)))
    dealt = [rest[i::n] for i in range(n)]
    dealt[0] = plain + dealt[0]
    order = {r.label: i for i, r in enumerate(runs)}
    return [tuple(sorted(g, key=order.__getitem__)) for g in dealt if g]


def engine_jobs(shared: EngineShared, groups: list[tuple[str, ...]], spec: Any) -> list[Job]:
    """One job per group; ``spec`` describes every other input of the study (its key)."""
    cpus = float(shared.spec.threads or 1)
    gpus = 1.0 if shared.spec.device == "cuda" else 0.0
    jobs = []
    for labels in groups:
        configs = {r.label: r.config.to_dict() for r in shared.runs if r.label in labels}
        key = job_key("engine", {"study": spec, "runs": configs})
        jobs.append(Job(key, ", ".join(labels), run_group, (labels,), cpus, gpus))
    return jobs


def run_group(host: Host, shared: EngineShared, labels: tuple[str, ...]) -> GroupResult:
    """Every part for the runs named ``labels`` (a job's function)."""
    from memshare.traces.model.loader import load_model
    from memshare.validate.engine.heap import tame_heap

    tame_heap()
    s = shared.spec
    backend = host.cached(
        ("model", s),
        lambda: load_model(s.model, device=s.device, dtype=s.dtype, threads=s.threads),
    )
    runs = [r for r in shared.runs if r.label in labels]
    progress = host.report
    res = _teacher_forced(runs, shared, backend.model, progress)
    gc.collect()
    if shared.bw is not None:
        budget, shaped = _at_budget(runs, shared, backend.model, progress)
        res.shaped += shaped
        for label, entry in budget.items():
            res.policies[label] |= entry
        gc.collect()
        if shared.answers_trace is not None:
            _answers(runs, shared, backend, res, progress)
            gc.collect()
    return res


def _teacher_forced(
    runs: Sequence[RunDir], sh: EngineShared, model: Any, progress: Any
) -> GroupResult:
    """The teacher-forced part: each run's entry, its engine result (for
    ``RUN/<run>/<tf_sub>``), the pages-in-use series and the steps for the fit (none under
    ``one_pass``: a shared pass times no run on its own)."""
    wl = sh.wl
    base_m, measured = run_lockstep(
        model, [r.config for r in runs], wl, progress, one_pass=sh.one_pass
    )
    base_ppl = next((m.fidelity.metrics().ppl_base for m in measured if m is not base_m), None)
    res = GroupResult({}, [], [])
    for r, m in zip(runs, measured, strict=True):
        pred = sh.predicted[r.label]
        entry = policy_report(r, pred, sh.base_pred, m, base_m, wl, timed=not sh.one_pass)
        if m is base_m:  # the unshared run itself: its text's perplexity is the base's
            entry["ppl"] = {"base": base_ppl, "shared": base_ppl}
        rows = {
            q.rid: {"answer": None, "first_share_position": m.first_share_pos.get(q.rid)}
            for q in m.engine.requests
        }
        res.writes.append(EngineWrite.of(r.path / sh.tf_sub, r.config, m.engine.result(), rows))
        if m is not base_m:
            res.fit += fit_texts(r.label, m, wl)
        res.policies[r.label] = entry
        live = [s.live_pages for s in m.engine.steps]
        res.series.append((r.label, pred.result.timeline.live_pages, live))
    if not sh.one_pass:
        res.shaped = [(m.shapes, m.engine.steps) for m in measured]
    return res


def _at_budget(
    runs: Sequence[RunDir], sh: EngineShared, model: Any, progress: Any
) -> tuple[dict[str, dict[str, Any]], Shaped]:
    """Throughput at the KV budget: each run's figures, and the steps for the fit."""
    assert sh.bw is not None and sh.budget_base_pred is not None
    base, gens = run_at_budget(model, [r.config for r in runs], sh.bw, progress)
    entries = {
        r.label: budget_report(sh.budget_pred[r.label], sh.budget_base_pred, g, base)
        for r, g in zip(runs, gens, strict=True)
    }
    shaped: Shaped = [(g.shapes, g.engine.steps) for g in _unique([base, *gens])]
    return entries, shaped


def _answers(
    runs: Sequence[RunDir], sh: EngineShared, backend: Any, res: GroupResult, progress: Any
) -> None:
    """Generated answers: each run's figures into ``res``, its generated run's files to
    write in ``engine/``."""
    assert sh.bw is not None and sh.answers_trace is not None
    bw = sh.bw
    base, gens = generate_answers(
        backend.model,
        [r.config for r in runs],
        sh.answers_trace,
        bw.records,
        bw.block_size,
        context=backend.context_limit,
        eos_ids=backend.eos_ids,
        token_starts=backend.token_starts,
        progress=progress,
    )
    decode = EngineWriter(backend, sh.spec.device, sh.spec.dtype, bw.block_size).decode
    answered = AnswerComparer(base, bw.records, decode)
    for r, g in zip(runs, gens, strict=True):
        entry, rows = answered.of(g)
        res.policies[r.label] |= entry
        res.writes.append(EngineWrite.of(r.path / "engine", r.config, g.engine.result(), rows))


def _unique(runs: Sequence[GenRun]) -> list[GenRun]:
    return list({id(g): g for g in runs}.values())


# ------------------------------------------------------------ a run's teacher-forced entry
# A policy's teacher-forced entry in ``validation.json`` (docs/validate.md): KV pages (peak,
# mean, saving against the unshared run), sharing, fidelity against the unshared engine, every
# share's exact distance against ``tau``, and the teacher-forced time, predicted beside measured.
#
# Invariants: every figure is ``{"predicted", "measured"}`` (times also ``error_pct``,
# :func:`~memshare.validate.budget.pme`); the unshared run's own fidelity is exact (agreement 1,
# KL 0); the generated-answer keys are null here (the answers part fills them); nothing here runs
# an engine or writes a file.


def policy_report(
    run: RunDir,
    pred: RunOutput,
    base_pred: RunOutput,
    m: Measured,
    base: Measured,
    wl: Workload,
    *,
    timed: bool = True,
) -> dict[str, Any]:
    """One run's ``validation.json`` entry (see docs/validate.md for every field);
    ``timed=False``: the engine shared its passes with other runs, its times are null."""
    eng = m.engine
    tl = pred.result.timeline
    first_diff = first_differing_step(pred, eng)
    tau = run.config.policy_params.get("tau")
    if tau is None and run.config.policy in ("cf-topk",):
        tau = 0.2
    fid = m.fidelity.metrics() if m is not base else None
    texts = list(m.fidelity.per_request().values()) if m is not base else []
    return {
        "policy": run.config.policy,
        "policy_params": dict(run.config.policy_params),
        "steps_identical": first_diff is None,
        "first_differing_step": first_diff,
        "steps": {"predicted": len(tl.scheduled_seqs), "measured": len(eng.steps)},
        **pages_report(pred, base_pred, eng, base.engine),
        **fidelity_report(fid, texts),
        "answer_agreement": None,  # generated answers (generated.answer_report): dataset
        "answer_agreement_ci95": None,  # traces only
        "accuracy": None,
        "accuracy_ci95": None,
        "token_agreement": None,
        "first_share_position": dict(sorted(m.first_share_pos.items())),
        "per_request": _per_request(pred, eng),
        # the texts' tokens through the model, chunks of one block (the issue's time keys
        # are the generation-at-budget figures: budget.budget_report)
        "teacher_forced_time": _time(pred, eng, wl, timed),
        "shares": len(eng.shares),
        **_sketch(eng, tau),
        "fidelity_predicted": predicted_fidelity(pred, fid),
    }


def predicted_fidelity(pred: RunOutput, fid: FidelityMetrics | None) -> dict[str, Any] | None:
    """The fidelity model's prediction beside the measurement (``--fidelity-model``; None
    without one): top-1 agreement (error in points, whether the measurement lies inside the
    predicted interval) and mean KL."""
    got = pred.metrics.get("fidelity_predicted")
    if got is None:
        return None
    top1 = 1.0 if fid is None else fid.top1_agreement
    kl = 0.0 if fid is None else fid.kl_mean
    lo, hi = got["top1_agreement_ci95"]
    return {
        "top1_agreement": {
            "predicted": got["top1_agreement"],
            "predicted_ci95": got["top1_agreement_ci95"],
            "measured": top1,
            "error_points": None if top1 is None else 100 * (got["top1_agreement"] - top1),
            "inside_ci95": None if top1 is None else lo <= top1 <= hi,
        },
        "kl_mean": pme(got["kl_mean"], kl),
        "outside_fit": got["outside_fit"],
    }


def pages_report(
    pred: RunOutput, base_pred: RunOutput, eng: PagedEngine, base: PagedEngine
) -> dict[str, Any]:
    """Pages in use (peak, mean), the KV saved against the unshared run, and sharing."""
    live_pred = np.asarray(pred.result.timeline.live_pages, dtype=np.float64)
    live_meas = np.array([s.live_pages for s in eng.steps], dtype=np.float64)
    base_pred_mean = float(np.mean(base_pred.result.timeline.live_pages))
    base_meas_mean = float(np.mean([s.live_pages for s in base.steps]))
    sharing_pred = pred.metrics["sharing"]
    stats = eng.manager.stats
    return {
        "pages_peak": _pm(float(live_pred.max(initial=0)), float(live_meas.max(initial=0))),
        "pages_mean": _pm(float(live_pred.mean()), float(live_meas.mean())),
        "kv_saved": _pm(
            1.0 - float(live_pred.mean()) / base_pred_mean,
            1.0 - float(live_meas.mean()) / base_meas_mean,
        ),
        "pages_shared": _pm(sharing_pred["pages_shared"], stats.pages_shared),
        "prefix_hit_tokens": _pm(
            pred.metrics["prefix_cache"]["all_admissions"]["hit_tokens"], stats.hit_tokens
        ),
        "reused_tokens": _pm(pred.metrics["prefix_cache"]["reused_tokens"], stats.reused_tokens),
        "page_share_rate": _pm(
            _ratio(sharing_pred["pages_shared"], sharing_pred["pages_written"]),
            _ratio(stats.pages_shared, stats.pages_written),
        ),
        "page_share_rate_ci95_texts": _share_rate_ci(eng),
    }


def _share_rate_ci(eng: PagedEngine) -> list[float] | None:
    """95% bootstrap interval over texts of the measured page share rate (pages shared over
    pages written, pooled): the spread of the KV a setting saves from text to text."""
    stats = eng.manager.stats
    pages = 2 * eng.pool.num_layers
    bs = eng.opts.block_size
    written = [pages * (q.num_tokens // bs) for q in eng.requests]
    shared = [stats.request_pages_shared.get(q.rid, 0) for q in eng.requests]
    return ratio_bootstrap(shared, written)


def fidelity_report(fid: FidelityMetrics | None, texts: list[FidelityMetrics]) -> dict[str, Any]:
    """Top-1 agreement (with its 95% intervals: binomial over positions, bootstrap over the
    ``texts``' own figures), KL and perplexity against the unshared run (``None``: it is that
    run, exact)."""
    exact = [1.0, 1.0]
    return {
        "top1_agreement": 1.0 if fid is None else fid.top1_agreement,
        "top1_agreement_ci95": exact
        if fid is None
        else binomial_interval(fid.top1_agree, fid.positions),
        "top1_agreement_ci95_texts": exact
        if fid is None
        else ratio_bootstrap([t.top1_agree for t in texts], [t.positions for t in texts]),
        "top1_agreement_after_first_share": None
        if fid is None
        else fid.top1_agreement_after_first_share,
        "kl_mean": 0.0 if fid is None else fid.kl_mean,
        "kl_p99": 0.0 if fid is None else fid.kl_p99,
        "ppl": {
            "base": None if fid is None else fid.ppl_base,
            "shared": None if fid is None else fid.ppl_shared,
        },
    }


def _time(pred: RunOutput, eng: PagedEngine, wl: Workload, timed: bool) -> dict[str, Any]:
    """Prefill tokens/s and TTFT of the teacher-forced run (measured: null unless ``timed``)."""
    lat = pred.metrics["latency_s"]
    total_tokens = sum(len(t) for t in wl.texts.values())
    ttft = list(eng.first_token_s.values()) if timed else []
    clock = eng.clock if timed else 0.0
    return {
        "prefill_tok_s": pme(
            pred.metrics["throughput"]["total_tokens_per_s"],
            total_tokens / clock if clock > 0 else None,
        ),
        "ttft_p50_s": pme(lat["ttft"]["p50"], float(np.median(ttft)) if ttft else None),
        "one_pass": not timed,
    }


def _per_request(pred: RunOutput, eng: PagedEngine) -> dict[str, Any]:
    """Pages each request's shares repointed, predicted beside measured, and the requests
    where the two part (a lossless policy: none; a lossy one: the prediction's error)."""
    want = pred.result.request_pages_shared
    got = eng.manager.stats.request_pages_shared
    rows = {
        q.rid: _pm(want.get(q.rid, 0), got.get(q.rid, 0))
        for q in sorted(eng.requests, key=lambda q: q.rid)
    }
    return {
        "pages_shared": rows,
        "requests_differing": sorted(
            r for r, pm in rows.items() if pm["predicted"] != pm["measured"]
        ),
    }


def _sketch(eng: PagedEngine, tau: Any) -> dict[str, Any]:
    rep = sketch_vs_exact(eng, float(tau) if isinstance(tau, int | float) else None)
    return {
        "shares_exceeding_tau": rep["exceeding_tau"],
        "shares_exceeding_tau_by_10pct": rep["exceeding_tau_by_10pct"],
        "exact_distance": rep["exact_distance"],
        "tau": rep["tau"],
    }


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _pm(pred: Any, meas: Any) -> dict[str, Any]:
    return {"predicted": pred, "measured": meas}
