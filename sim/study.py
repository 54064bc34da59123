"""Several runs at once: one per ``--policy`` (a comparison), or per swept value (a sweep).

Layout of what :func:`simulate` writes under the output directory ``OUT``:

- one policy: ``OUT`` is the run directory (``config.json``, ``metrics.json``, ...);
- several: ``OUT/<policy>/`` per policy and ``OUT/comparison.json``;
- a sweep: ``OUT/<key>=<value>/<policy>/`` per point, ``OUT/sweep.json`` and ``OUT/sweep.csv``;
- ``--plot``: PNGs in ``OUT`` (:mod:`memshare.sim.plots`).

Invariants: every config is built and checked (budget and block size resolved on the trace)
before the first run starts, so a bad value in a sweep fails at once rather than after the
other runs; the trace is read once. ``OUT`` holds one run: it is claimed before the first
run (an earlier ``simulate``/``sweep`` run there only with ``overwrite``) and written in a
hidden sibling that replaces it whole once every run finished (:mod:`memshare.outdir`), so
an interrupted run leaves the earlier one as it was. No file records the staging path.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.fanout.jobs import Outcome
from memshare.fanout.options import IN_PROCESS, FanOut
from memshare.outdir import OutputKind, claim_output, staged_output
from memshare.sim.config import SimConfig
from memshare.sim.fidelity_model import FidelityModel
from memshare.sim.jobs import JobsProgress, run_sim_jobs, sim_job
from memshare.sim.metrics import flatten
from memshare.sim.options import (
    SimOptions,
    SweepSpec,
    build_configs,
    check_sweep,
    sweep_options,
)
from memshare.sim.results import LabeledRun, StudyResult, SweepResult
from memshare.sim.run import (
    LoadedTrace,
    budget_warning,
    keys_warning,
    perf,
    resolve,
    write_run,
)

StudyProgress = Callable[[str, int, int], None]  # (run label, requests done, requests total)
Warn = Callable[[str], None]  # receives one line (the CLI prints it on stderr)

SWEEP_JSON = "sweep.json"
RUN_MARKERS = ("config.json", "comparison.json", SWEEP_JSON)  # one policy, several, a sweep

SWEEP_METRICS = (
    "prefix_cache.token_hit_rate",
    "prefix_cache.block_hit_rate",
    "throughput.output_tokens_per_s",
    "throughput.requests_per_s",
    "latency_s.ttft.p50",
    "latency_s.ttft.p99",
    "latency_s.tpot.p50",
    "latency_s.e2e.p50",
    "kv.peak_blocks_in_use",
    "kv.mean_blocks_in_use",
    "preemptions",
    "sharing.share_rate",
)


def default_output(opts: SimOptions, spec: SweepSpec | None = None) -> Path:
    """``runs/<trace name>`` (``runs/<trace name>-sweep-<key>`` for a sweep)."""
    name = Path(opts.trace).resolve().name or "trace"
    return Path("runs") / (f"{name}-sweep-{spec.key}" if spec else name)


def claim_runs(path: Path, *, overwrite: bool) -> None:
    """Claim ``-o`` for a ``simulate`` or ``sweep`` run (before any work): it must be absent,
    empty, or (with ``overwrite``) hold an earlier run of either, which is then replaced."""
    marker = next((m for m in RUN_MARKERS if (path / m).is_file()), RUN_MARKERS[0])
    command = "sweep" if marker == SWEEP_JSON else "simulate"
    claim_output(path, "-o", OutputKind(command, marker), overwrite=overwrite)


def simulate(
    opts: SimOptions,
    output: Path | None = None,
    *,
    overwrite: bool = False,
    plot: bool = False,
    progress: StudyProgress | None = None,
    warn: Warn | None = None,
    fan: FanOut = IN_PROCESS,
    jobs_progress: JobsProgress = None,
) -> StudyResult:
    """Run every ``--policy`` on the trace, a job each (:mod:`memshare.sim.jobs`, run as
    ``fan`` says); write run directories (and plots). ``warn`` gets each distinct warning
    (:func:`warn_before_runs`) before the first run.

    ``output`` (default :func:`default_output`) is claimed before the first run
    (:func:`claim_runs`) and written only when every run finished, whole
    (:func:`~memshare.outdir.staged_output`)."""
    trace = LoadedTrace.load(Path(opts.trace))
    configs = build_configs(opts, trace.manifest)
    for cfg in configs:
        resolve(cfg, trace)  # a budget or block size the trace cannot take fails here
    model = FidelityModel.load(opts.fidelity_model) if opts.fidelity_model else None
    warn_before_runs(configs, trace, warn)
    out_dir = output or default_output(opts)
    claim_runs(out_dir, overwrite=overwrite)
    multi = len(configs) > 1
    jobs = [sim_job(cfg, trace, cfg.policy, fidelity=model) for cfg in configs]
    done = run_sim_jobs(
        jobs, trace, fan, out_dir, run_progress=progress, jobs_progress=jobs_progress
    )
    runs = [
        LabeledRun(
            o.value.config.policy, o.value, out_dir / o.value.config.policy if multi else out_dir
        )
        for o in done
    ]
    result = StudyResult(runs, out_dir)
    with staged_output(out_dir) as stage:
        for r, o in zip(runs, done, strict=True):
            write_run(r.out, stage / r.directory.relative_to(out_dir), o.ran_on())
        if multi:
            comparison = {r.label: r.out.metrics for r in runs}
            _write_json(stage / "comparison.json", {"policies": comparison})
        if plot:
            from memshare.sim.plots import plot_runs

            result.plots = [out_dir / p.name for p in plot_runs(runs, stage)]
    fan.forget(out_dir)
    return result


def sweep(
    opts: SimOptions,
    spec: SweepSpec,
    output: Path | None = None,
    *,
    overwrite: bool = False,
    plot: bool = False,
    progress: StudyProgress | None = None,
    warn: Warn | None = None,
    fan: FanOut = IN_PROCESS,
    jobs_progress: JobsProgress = None,
) -> SweepResult:
    """Run every policy at every value of ``spec``, a job each (run as ``fan`` says); write
    the points, a table and a plot.

    Every point is checked (:func:`plan_sweep`) and ``output`` claimed before the first run;
    the folder is written whole when the last run finished, replacing an earlier run."""
    trace = LoadedTrace.load(Path(opts.trace))
    planned = plan_sweep(opts, spec, trace)
    model = FidelityModel.load(opts.fidelity_model) if opts.fidelity_model else None
    warn_before_runs([cfg for _, configs in planned for cfg in configs], trace, warn)
    out_dir = output or default_output(opts, spec)
    claim_runs(out_dir, overwrite=overwrite)
    jobs = [
        sim_job(cfg, trace, f"{spec.key}={value} {cfg.policy}", fidelity=model)
        for value, configs in planned
        for cfg in configs
    ]
    done = iter(
        run_sim_jobs(jobs, trace, fan, out_dir, run_progress=progress, jobs_progress=jobs_progress)
    )
    points: list[tuple[Any, list[tuple[LabeledRun, Outcome]]]] = []
    for value, configs in planned:
        runs = []
        for cfg in configs:
            o = next(done)
            where = out_dir / spec.label(value) / cfg.policy
            runs.append((LabeledRun(cfg.policy, o.value, where), o))
        points.append((value, runs))
    result = SweepResult(spec, [(v, [r for r, _ in runs]) for v, runs in points], out_dir)
    rows = sweep_rows(result)
    with staged_output(out_dir) as stage:
        for _, runs in points:
            for r, o in runs:
                write_run(r.out, stage / r.directory.relative_to(out_dir), o.ran_on())
        table = {"key": spec.key, "values": list(spec.values), "rows": rows}
        _write_json(stage / SWEEP_JSON, table)
        (stage / "sweep.csv").write_text(_csv(rows), encoding="utf-8")
        if plot:
            from memshare.sim.plots import plot_sweep

            result.plots = [out_dir / p.name for p in plot_sweep(result, stage)]
    fan.forget(out_dir)
    return result


def plan_sweep(
    opts: SimOptions, spec: SweepSpec, trace: LoadedTrace
) -> list[tuple[Any, list[SimConfig]]]:
    """Every point's configs, each built and resolved on ``trace`` (nothing runs).

    A value its option refuses is an error of the sweep (:meth:`SweepSpec.refused`: it
    names the sweep as the user typed it); other options' errors name those options."""
    check_sweep(opts, spec)
    planned = []
    for value in spec.values:
        try:
            configs = build_configs(sweep_options(opts, spec, value), trace.manifest)
            for cfg in configs:
                resolve(cfg, trace)
        except InputError as e:
            if e.where != spec.flag:
                raise
            raise spec.refused(value, e) from None
        planned.append((value, configs))
    return planned


def warn_before_runs(configs: list[SimConfig], trace: LoadedTrace, warn: Warn | None) -> None:
    """Pass each distinct warning of ``configs`` to ``warn``, in config order: a budget
    beyond the GPU preset (:func:`~memshare.sim.run.budget_warning`), a policy that compares
    keys on a trace of post-RoPE keys (:func:`~memshare.sim.run.keys_warning`)."""
    if warn is None:
        return
    said: set[str] = set()
    for cfg in configs:
        for line in (budget_warning(cfg, resolve(cfg, trace)), keys_warning(cfg, trace)):
            if line is not None and line not in said:
                said.add(line)
                warn(line)


def presets_used(runs: list[LabeledRun]) -> str:
    """The model and GPU presets of ``runs``: ``MODEL on GPU`` (several joined by ', ')."""
    seen: dict[str, None] = {}
    for r in runs:
        seen[f"{r.out.config.model.name} on {r.out.config.gpu.name}"] = None
    return ", ".join(seen)


def sweep_rows(result: SweepResult) -> list[dict[str, Any]]:
    """One row per (value, policy) with the sweep metrics."""
    rows = []
    for value, runs in result.points:
        for r in runs:
            flat = flatten(r.out.metrics)
            row: dict[str, Any] = {result.spec.key: value, "policy": r.label}
            row.update({k: flat.get(k) for k in SWEEP_METRICS})
            rows.append(row)
    return rows


def study_json(result: StudyResult) -> dict[str, Any]:
    """``--json`` output of ``simulate``."""
    return {
        "output": str(result.output),
        "runs": [
            {
                "policy": r.label,
                "directory": str(r.directory),
                "metrics": r.out.metrics,
                "perf": perf(r.out),
            }
            for r in result.runs
        ],
        "plots": [str(p) for p in result.plots],
    }


def sweep_json(result: SweepResult) -> dict[str, Any]:
    """``--json`` output of a sweep."""
    return {
        "output": str(result.output),
        "key": result.spec.key,
        "values": list(result.spec.values),
        "rows": sweep_rows(result),
        "plots": [str(p) for p in result.plots],
    }


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()
