"""``validate``'s engine parts as fan-out jobs (:mod:`memshare.fanout`): the runs under
``RUN`` split into groups, one job per group; each job runs the unshared engine beside its
group's runs through every part (teacher-forced, at the budget, generated answers) and
returns the figures, series, steps and engine results; the driver writes every file.

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

from memshare.fanout.host import Host
from memshare.fanout.jobs import Job, job_key
from memshare.request import detached
from memshare.sim.config import SimConfig
from memshare.sim.cost_model import BatchShape
from memshare.sim.run import LoadedTrace, RunOutput
from memshare.validate.budget import BudgetWorkload, budget_report, run_at_budget
from memshare.validate.engine.records import PagedRunResult, StepRecord
from memshare.validate.generated import AnswerComparer, EngineWriter, GenRun, generate_answers
from memshare.validate.measure import Workload, run_lockstep
from memshare.validate.policy_entry import policy_report
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
