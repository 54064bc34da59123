"""Simulator runs as fan-out jobs (:mod:`memshare.fanout`): one job per run of ``simulate``,
``sweep`` and ``study``, the trace shipped once to every worker.

Invariants: a job's key names its config and the trace's committed manifest, so ``--resume``
reuses a result only for the same run of the same trace; the simulator is deterministic, so a
job's result is byte-identical whichever executor ran it; the driver writes every file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memshare.fanout.host import Host
from memshare.fanout.jobs import Job, Outcome, job_key
from memshare.fanout.local import LocalExecutor
from memshare.fanout.options import FanOut
from memshare.fanout.run import fan_out, raise_failures
from memshare.fanout.tally import Tally
from memshare.request import detach
from memshare.sim.config import SimConfig
from memshare.sim.fidelity_model import FidelityModel
from memshare.sim.run import LoadedTrace, RunOutput, run_config

JobsProgress = Callable[[Tally], None] | None  # the CLI's bar over the jobs
RunProgress = Callable[[str, int, int], None] | None  # (run label, requests done, total)


def sim_job(
    cfg: SimConfig,
    trace: LoadedTrace,
    label: str,
    *,
    metrics_only: bool = False,
    fidelity: FidelityModel | None = None,
) -> Job:
    """The job that simulates ``cfg`` on ``trace`` (``metrics_only``: it returns the metrics
    dict alone, all a study reads; ``fidelity``: it predicts the run's fidelity too)."""
    spec = {"config": cfg.to_dict(), "trace": trace.identity(), "metrics_only": metrics_only}
    if fidelity is not None:
        spec["fidelity_model"] = fidelity.to_json()
    args = (cfg, label, metrics_only, fidelity)
    return Job(job_key("sim", spec), label, run_sim_job, args)


def run_sim_job(
    host: Host,
    trace: LoadedTrace | None,
    cfg: SimConfig,
    label: str,
    metrics_only: bool,
    fidelity: FidelityModel | None = None,
) -> RunOutput | dict[str, Any]:
    """Simulate ``cfg`` (a job's function: runs on any host) on ``trace``, or, when the
    fan-out shipped none, on its own ``cfg.trace`` read from disk (once per host)."""
    if trace is None:
        path = Path(cfg.trace)
        trace = host.cached(("trace", str(path.resolve())), lambda: LoadedTrace.load(path))
    ticker = host.ticker(label, _requests(trace, cfg.limit))
    out = run_config(cfg, trace, progress=ticker, fidelity=fidelity)
    if metrics_only:
        return out.metrics
    for q in out.result.requests:  # the run built them and holds them alone: no copies
        detach(q)
        q.done = None  # the run's SimPy event
    return out


def run_sim_jobs(
    jobs: Sequence[Job],
    trace: LoadedTrace,
    fan: FanOut,
    output: Path | None,
    *,
    run_progress: RunProgress = None,
    jobs_progress: JobsProgress = None,
) -> list[Outcome]:
    """Run ``jobs`` as ``fan`` says, results kept in ``output``'s job store (none without an
    ``output``) until the caller wrote ``output`` (then
    :meth:`~memshare.fanout.options.FanOut.forget`). In-process,
    ``run_progress(label, done, total)`` gets each run's requests; every executor reports
    the jobs' tally to ``jobs_progress``. A job that refused its input fails the command with
    one line naming it, after the others finished (their results stay in the store)."""
    executor = fan.executor()
    if isinstance(executor, LocalExecutor):
        executor.host.report = run_progress
    store = None if output is None else fan.store(output)
    try:
        outcomes = fan_out(jobs, executor, shared=trace, store=store, progress=jobs_progress)
    finally:
        executor.close()
    raise_failures(outcomes, "--resume")
    return outcomes


def _requests(trace: LoadedTrace, limit: int | None) -> int:
    return min(len(trace.records), limit or len(trace.records))
