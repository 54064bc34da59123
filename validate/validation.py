"""``memshare validate RUN``: the simulator's runs measured on the real model (docs/validate.md).

For every run directory under ``RUN``: the simulator's prediction of the engine's exact
workload (:func:`~memshare.validate.measure.predict`) beside the paged engine's measurement
(:func:`~memshare.validate.measure.run_lockstep`): KV pages in use (step by step, peak, mean;
the saving against the unshared run), fidelity against the unshared engine (top-1 agreement,
KL, perplexity), every share's exact distance on the live KV against ``tau``, and the
teacher-forced run's time (:mod:`~memshare.validate.jobs`). Then
(:mod:`~memshare.validate.budget`) throughput, TTFT and TPOT at a KV budget where ``none``
must queue or preempt, predicted and measured; and for a trace captured from a dataset,
answers generated under each policy (:mod:`~memshare.validate.generated`: agreement with the
unshared run, accuracy against the gold answer). Writes ``RUN/validation.json`` and, per run,
the engine's ``outputs.jsonl`` / ``shares.jsonl`` / ``reuses.jsonl`` under
``RUN/<run>/engine/`` (a dataset trace: the generated run there, the teacher-forced one in
``engine/teacher_forced/``); with ``fit_cost_model``, ``RUN/cost_model.toml`` fitted on the
engines' steps.

Invariants: ``validation.json`` is written whole (temporary file, then renamed) after every
run was measured, so a failed validation leaves no half file; every figure has its predicted
and measured value side by side; a lossless policy's ``steps_identical`` is true or the report
says at which step the executors parted.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memshare.atomic import write_atomic
from memshare.errors import InputError
from memshare.fanout.jobs import Outcome
from memshare.fanout.local import LocalExecutor
from memshare.fanout.options import IN_PROCESS, FanOut
from memshare.fanout.run import Executor, fan_out, raise_failures
from memshare.fanout.tally import Tally
from memshare.limits import check_tokens_per_block
from memshare.sim.fidelity_model import FidelityModel, fit
from memshare.sim.run import LoadedTrace, RunOutput
from memshare.validate.budget import (
    BudgetWorkload,
    budget_workload,
    predict_at_budget,
)
from memshare.validate.cost_fit import COST_TOML, fit_and_write
from memshare.validate.engine.heap import tame_heap
from memshare.validate.generated import (
    EngineWriter,
    generation_cap,
    is_generated,
)
from memshare.validate.jobs import (
    EngineShared,
    GroupResult,
    ModelSpec,
    Series,
    Shaped,
    engine_jobs,
    group_labels,
)
from memshare.validate.measure import (
    Progress,
    Workload,
    predict,
    teacher_forced_workload,
)
from memshare.validate.options import (
    VALIDATION,
    ValidateOptions,
    check_options,
    check_outputs,
    forget_earlier_validation,
)
from memshare.validate.runs.folders import RunDir, check_model, find_runs, load_checked_trace
from memshare.validate.runs.tokens import check_scale
from memshare.validate.runs.workload import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LENGTH_SCALE,
    check_policies,
    has_token_ids,
    is_workload,
    on_engine,
)

LOSSLESS = ("none", "prefix", "exact-dedup")
# the budget part's keys, null under ``fidelity_only`` (the throughput runs were not made)
NOT_MEASURED = (
    "throughput_tok_s",
    "ttft_p50_s",
    "ttft_p90_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "throughput_gain",
    "at_budget",
)


def validate(
    o: ValidateOptions,
    status: Callable[[str], None] | None = None,
    progress: Progress | None = None,
    fan: FanOut = IN_PROCESS,
    jobs_progress: Callable[[Tally], None] | None = None,
) -> dict[str, Any]:
    """Measure every run under ``o.run`` on the torch engine, its engine parts fanned out as
    ``fan`` says (:mod:`memshare.validate.jobs`); returns (and writes) the
    ``validation.json`` object (``--engine vllm``:
    :func:`~memshare.validate.vllm.validate.validate_vllm`)."""
    from memshare.traces.model.device import check_device

    check_options(o)
    if o.engine != "torch":  # vLLM sits above the study: the command picks the executor
        raise ValueError("--engine vllm runs memshare.validate.vllm.validate.validate_vllm")
    tame_heap()  # long engine runs: see validate/engine/heap.py
    st = _study(o)  # bad input fails before the model loads
    check_outputs(o, len(st.runs))
    check_device(o.device)
    executor = fan.executor()
    try:
        ran = _run_engines(o, st, executor, fan, status, progress, jobs_progress)
    finally:
        executor.close()
    raise_failures(ran.done, "--resume")
    results = [d.value for d in ran.done]
    policies, series, shaped = _merge(o, ran.runs, ran.backend, ran.wl.block_size, results)
    if o.fit_fidelity_model is not None:
        layers = ran.shared.base_pred.resolved.pool_layers
        fit([r for res in results for r in res.fit], layers).save(o.fit_fidelity_model)
    if ran.shared.bw is None:
        for entry in policies.values():
            entry |= dict.fromkeys(NOT_MEASURED)
    report = _report(o, st, ran.runs, ran.trace, ran.wl, ran.shared.bw, ran.backend.source.name)
    report["policies"] = policies
    report["jobs"] = [
        {"runs": list(g), "ran_on": d.ran_on()} for g, d in zip(ran.groups, ran.done, strict=True)
    ]
    if o.plot:
        _plot(o, len(ran.runs), series, report)
    if o.fit_cost_model:
        # the teacher-forced runs (prefill) and the runs at the budget (decode, preemption)
        report["cost_model_fit"] = _fit(o, shaped, ran.shared.predicted[ran.runs[0].label])
    write_atomic(o.run / VALIDATION, json.dumps(report, indent=2, allow_nan=False) + "\n")
    fan.forget(o.run / VALIDATION)
    return report


@dataclasses.dataclass
class _Ran:
    """The engine jobs' outcomes and what they ran on."""

    backend: Any  # the driver's model: the tokenizer for workload traces and engine files
    runs: list[RunDir]
    trace: LoadedTrace
    wl: Workload
    shared: EngineShared
    groups: list[tuple[str, ...]]  # each job's runs
    done: list[Outcome]  # each job's outcome, in group order


def _run_engines(
    o: ValidateOptions,
    st: _Study,
    executor: Executor,
    fan: FanOut,
    status: Callable[[str], None] | None,
    progress: Progress | None,
    jobs_progress: Callable[[Tally], None] | None,
) -> _Ran:
    """Load the model, simulate the predictions, and run the engine groups as jobs."""
    from memshare.traces.model.loader import load_model

    say = status or (lambda _: None)
    say("loading the model")
    threads = o.threads or executor.threads_per_job(len(st.runs))
    spec = ModelSpec(o.model, o.device, o.dtype, threads)
    backend = load_model(o.model, device=o.device, dtype=o.dtype, threads=o.threads)
    if isinstance(executor, LocalExecutor):  # in-process: the jobs use this model
        executor.host.cached(("model", spec), lambda: backend)
        executor.host.report = progress
    check_model(st.trace, backend.model_info().name)
    runs, trace, wl = _on_engine(o, st, backend)
    say("simulating")
    shared = _shared(o, st, spec, runs, trace, wl)
    say("running the engines")
    forget_earlier_validation(o)
    groups = group_labels(runs, executor.workers_for(spec.threads or 1))
    jobs = engine_jobs(shared, groups, _key_spec(o, trace))
    store = fan.store(o.run / VALIDATION)
    done = fan_out(jobs, executor, shared=shared, store=store, progress=jobs_progress)
    return _Ran(backend, runs, trace, wl, shared, groups, done)


def _shared(
    o: ValidateOptions,
    st: _Study,
    spec: ModelSpec,
    runs: list[RunDir],
    trace: LoadedTrace,
    wl: Workload,
) -> EngineShared:
    """What every engine job reads: the workloads and the simulator's predictions."""
    bw = None if o.fidelity_only else budget_workload(trace, runs[0], o.limit, o.kv_fraction)
    base_cfg = runs[0].config.with_(policy="none", policy_params={})
    budget_pred = {r.label: predict_at_budget(r.config, bw, o.gpu) for r in runs if bw}
    model = FidelityModel.load(o.fidelity_model) if o.fidelity_model else None
    return EngineShared(
        spec=spec,
        runs=runs,
        predicted={r.label: predict(r.config, wl, o.gpu, model) for r in runs},
        base_pred=predict(base_cfg, wl, o.gpu),
        wl=wl,
        tf_sub=Path("engine", "teacher_forced") if st.generated else Path("engine"),
        one_pass=o.one_pass,
        bw=bw,
        budget_pred=budget_pred,
        budget_base_pred=None if bw is None else predict_at_budget(base_cfg, bw, o.gpu),
        answers_trace=trace if st.generated and bw is not None else None,
    )


def _merge(
    o: ValidateOptions,
    runs: Sequence[RunDir],
    backend: Any,
    block_size: int,
    results: Sequence[GroupResult],
) -> tuple[dict[str, Any], Series, Shaped]:
    """The groups' results in run order; their engine files written (by the driver alone)."""
    out = EngineWriter(backend, o.device, o.dtype, block_size)
    entries: dict[str, Any] = {}
    series: dict[str, Any] = {}
    shaped: Shaped = []
    for res in results:
        entries |= res.policies
        series |= {s[0]: s for s in res.series}
        shaped += res.shaped
        for w in res.writes:
            out.write(w.folder, w.config, w.result, w.rows)
    order = [r.label for r in runs]
    return {k: entries[k] for k in order}, [series[k] for k in order], shaped


def _key_spec(o: ValidateOptions, trace: LoadedTrace) -> dict[str, Any]:
    """Every option and input that shapes an engine job's result (its store key)."""
    opts = {
        k: str(v)
        for k, v in dataclasses.asdict(o).items()
        if k not in ("plot", "fit_cost_model", "fit_fidelity_model")
    }
    return {"options": opts, "trace": trace.identity()}


@dataclasses.dataclass
class _Study:
    """The runs to validate and their trace, checked before the model loads."""

    runs: list[RunDir]
    trace: LoadedTrace
    workload: bool  # a workload-only trace: its tokens are made on the engine's tokenizer
    given: bool  # a workload trace with token ids (``memshare import tokens``): ids as given
    generated: bool  # a trace captured with ``--dataset``: answers are generated
    block_size: int
    captured: Workload | None  # a captured trace's teacher-forced workload


def _study(o: ValidateOptions) -> _Study:
    """Every run under ``o.run`` and its trace, checked (a workload trace's options too)."""
    runs = find_runs(o.run)
    trace = load_checked_trace(runs[0])
    for r in runs[1:]:
        load_checked_trace(r)
    workload = is_workload(trace)
    block_size = o.block_size or DEFAULT_BLOCK_SIZE
    captured = None
    if workload:
        check_policies(runs, trace)
        check_scale(o.length_scale)
        check_tokens_per_block(block_size)
    elif o.block_size is not None:
        raise InputError(
            "--block-size",
            f"applies to workload-only traces; {trace.path} is captured, its sketches are per "
            "block of the size it was captured with",
            "leave --block-size out",
        )
    elif o.length_scale != DEFAULT_LENGTH_SCALE:
        raise InputError(
            "--length-scale",
            f"applies to workload-only traces; {trace.path} is captured: its texts and their "
            "lengths are the trace's own",
            "leave --length-scale out",
        )
    else:
        captured = teacher_forced_workload(trace, runs[0], o.limit)
    given = workload and has_token_ids(trace)
    return _Study(runs, trace, workload, given, is_generated(trace), block_size, captured)


def _on_engine(
    o: ValidateOptions, st: _Study, backend: Any
) -> tuple[list[RunDir], LoadedTrace, Workload]:
    """The runs, trace and teacher-forced workload the engine runs (a workload trace's tokens
    made on the model's tokenizer)."""
    if not st.workload:
        assert st.captured is not None
        return st.runs, st.trace, st.captured
    runs, trace = on_engine(
        st.runs,
        st.trace,
        backend,
        block_size=st.block_size,
        limit=o.limit,
        length_scale=o.length_scale,
    )
    return runs, trace, teacher_forced_workload(trace, runs[0], o.limit)


def _report(
    o: ValidateOptions,
    st: _Study,
    runs: Sequence[RunDir],
    trace: LoadedTrace,
    wl: Workload,
    bw: BudgetWorkload | None,
    model: str,
) -> dict[str, Any]:
    """``validation.json``'s keys before ``policies``: what was validated, and how."""
    return {
        "trace": str(trace.path),
        "model": model,
        "device": o.device,
        "requests": len(wl.specs),
        "block_size": wl.block_size,
        "kv_blocks": wl.num_blocks,
        "timing_preset": o.gpu,
        "workload_tokens": None
        if not st.workload
        else {
            "length_scale": None if st.given else o.length_scale,
            "block_size": st.block_size,
            "seed": runs[0].config.seed,
            "rule": "the trace's token ids, unscaled; seeded outputs where it gave a length"
            if st.given
            else "synthesized from the trace's lengths and hash ids (docs/workload-tokens.md)",
        },
        "workload": "teacher-forced texts, chunks of one block (docs/validate.md)",
        "budget": None
        if bw is None
        else {
            "kv_fraction": bw.fraction,
            "kv_blocks": bw.num_blocks,
            "all_at_once_blocks": bw.all_at_once,
            "workload": "generation with the trace's output tokens forced, all at 0 s",
        },
        "generated": None
        if not st.generated or bw is None
        else {
            "max_new_tokens": generation_cap(trace),
            "sampling": "greedy, stop on EOS; every request fits at once",
        },
    }


def _plot(o: ValidateOptions, num_runs: int, series: Series, report: dict[str, Any]) -> None:
    """``RUN/kv_in_use.png`` and, for several runs, the measured frontier (one point per
    run); their paths under ``report["plots"]``."""
    from memshare.validate.report import plot_kv

    plot_kv(o.run / "kv_in_use.png", series)
    report["plots"] = [str(o.run / "kv_in_use.png")]
    if num_runs > 1:  # several runs: the measured frontier, one point per run
        from memshare.validate.report import plot_frontier

        plot_frontier(o.run / "frontier.png", report)
        report["plots"].append(str(o.run / "frontier.png"))


def _fit(o: ValidateOptions, shaped: Shaped, pred: RunOutput) -> dict[str, Any]:
    """Fit the cost model on the engines' measured steps; held-out steps give the error."""
    steps = [
        (shape, s.wall_s)
        for shapes, records in shaped
        for shape, s in zip(shapes, records, strict=True)
        if s.wall_s > 0
    ]
    cfg = pred.config
    source = f"memshare validate {o.run} on {o.device}"
    return fit_and_write(steps, cfg.model, cfg.gpu, cfg.cost, o.run / COST_TOML, source)
