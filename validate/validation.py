"""``memshare validate RUN``: the simulator's runs measured on the real model (docs/validate.md).

For every run directory under ``RUN``: the simulator's prediction of the engine's exact
workload (:func:`~memshare.validate.measure.predict`) beside the paged engine's measurement
(:func:`~memshare.validate.measure.run_lockstep`): KV pages in use (step by step, peak, mean;
the saving against the unshared run), fidelity against the unshared engine (top-1 agreement,
KL, perplexity), every share's exact distance on the live KV against ``tau``, and the
teacher-forced run's time. Then (:mod:`~memshare.validate.generated`) throughput, TTFT and
TPOT at a KV budget where ``none`` must queue or preempt, predicted and measured; and for a
trace captured from a dataset, answers generated under each policy (agreement with the
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

import gc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memshare.atomic import write_atomic
from memshare.errors import InputError
from memshare.sim.config import SimConfig
from memshare.sim.cost_model import BatchShape
from memshare.sim.run import LoadedTrace, RunOutput
from memshare.traces.schema import RequestRecord
from memshare.validate.cost_fit import COST_TOML, fit_and_write
from memshare.validate.engine.generate import run_metrics
from memshare.validate.engine.heap import tame_heap
from memshare.validate.engine.paged_engine import EngineResult, PagedEngine, StepRecord
from memshare.validate.generated import (
    DEFAULT_KV_FRACTION,
    BudgetWorkload,
    GenRun,
    answer_report,
    answer_rows,
    budget_report,
    budget_workload,
    check_fraction,
    compare_answers,
    generate_answers,
    generation_cap,
    gold_of,
    is_generated,
    pme,
    predict_at_budget,
    run_at_budget,
    write_engine,
)
from memshare.validate.measure import (
    Measured,
    Progress,
    Workload,
    first_differing_step,
    predict,
    run_lockstep,
    sketch_vs_exact,
    teacher_forced_workload,
)
from memshare.validate.runs import RunDir, check_model, find_runs, load_checked_trace
from memshare.validate.workload.tokens import check_block_size, check_scale
from memshare.validate.workload.trace import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LENGTH_SCALE,
    check_policies,
    has_token_ids,
    is_workload,
    on_engine,
)

VALIDATION = "validation.json"
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


@dataclass(frozen=True)
class ValidateOptions:
    """What ``memshare validate`` was asked."""

    run: Path  # a run directory, or a folder of them
    model: str | None = None  # local HF folder or .gguf (default: the packaged SmolLM2)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    limit: int | None = None  # first N requests of the trace
    gpu: str = "cpu"  # cost-model preset the predicted times use
    fit_cost_model: bool = False
    plot: bool = False  # RUN/kv_in_use.png
    kv_fraction: float = DEFAULT_KV_FRACTION  # throughput budget: F x all requests at once
    fidelity_only: bool = False  # only the teacher-forced part: no budget runs, no answers
    one_pass: bool = False  # teacher-forced part: all runs' steps in one forward pass
    length_scale: float = DEFAULT_LENGTH_SCALE  # workload-only traces: synthesized lengths
    block_size: int | None = None  # workload-only traces: the engine's (default 16)
    engine: str = "torch"  # torch (the paged engine) or vllm (validate/vllm/validate.py)
    replay_arrivals: bool = False  # vllm: requests arrive as the run's --arrival (else at 0 s)


ENGINES = ("torch", "vllm")


def validate(
    o: ValidateOptions,
    status: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure every run under ``o.run``; returns (and writes) the ``validation.json`` object."""
    from memshare.traces.model.device import check_device
    from memshare.traces.model.loader import load_model

    check_fraction(o.kv_fraction)
    if o.engine not in ENGINES:
        raise InputError("--engine", f"must be one of {', '.join(ENGINES)}, got {o.engine!r}",
                         "e.g. --engine vllm")  # fmt: skip
    if o.replay_arrivals and o.engine != "vllm":
        raise InputError(
            "--replay-arrivals",
            "the torch engine runs every request at 0 s",
            "add --engine vllm, or leave out --replay-arrivals",
        )
    if o.engine == "vllm":
        from memshare.validate.vllm.validate import validate_vllm

        return validate_vllm(o, status)
    if o.fit_cost_model and o.one_pass and o.fidelity_only:
        raise InputError(
            "--fit-cost-model",
            "needs timed steps: under --one-pass and --fidelity-only no run is timed on its own",
            "leave out --one-pass or --fidelity-only",
        )
    tame_heap()  # long engine runs: see validate/engine/heap.py
    runs = find_runs(o.run)
    trace = load_checked_trace(runs[0])
    for r in runs[1:]:
        load_checked_trace(r)
    workload = is_workload(trace)
    block_size = o.block_size or DEFAULT_BLOCK_SIZE
    given = workload and has_token_ids(trace)  # memshare import tokens: ids as given
    if workload:
        check_policies(runs, trace)
        check_scale(o.length_scale)
        check_block_size(block_size)
    elif o.block_size is not None:
        raise InputError(
            "--block-size",
            f"applies to workload-only traces; {trace.path} is captured, its sketches are per "
            "block of the size it was captured with",
            "leave --block-size out",
        )
    else:  # bad input fails before the model loads
        wl_captured = teacher_forced_workload(trace, runs[0], o.limit)
    generated = is_generated(trace)
    check_device(o.device)
    if status:
        status("loading the model")
    backend = load_model(o.model, device=o.device, dtype=o.dtype, threads=o.threads)
    check_model(trace, backend.model_info().name)
    if workload:
        runs, trace = on_engine(
            runs,
            trace,
            backend,
            block_size=block_size,
            limit=o.limit,
            length_scale=o.length_scale,
        )
    wl = teacher_forced_workload(trace, runs[0], o.limit) if workload else wl_captured
    bw = None if o.fidelity_only else budget_workload(trace, runs[0], o.limit, o.kv_fraction)
    if status:
        status("simulating")
    predicted = {r.label: predict(r.config, wl, o.gpu) for r in runs}
    base_cfg = runs[0].config.with_(policy="none", policy_params={})
    base_pred = predict(base_cfg, wl, o.gpu)
    if status:
        status("running the engines")
    # one part at a time: a part's engines (a model copy each) are dropped before the next
    out = _Writer(backend, o, wl.block_size)
    tf_sub = Path("engine", "teacher_forced") if generated else Path("engine")
    policies, series, shaped = _teacher_forced(
        runs, predicted, base_pred, wl, backend.model, out, tf_sub, progress, o.one_pass
    )
    gc.collect()
    if bw is not None:
        budget_pred = {r.label: predict_at_budget(r.config, bw, o.gpu) for r in runs}
        budget_base_pred = predict_at_budget(base_cfg, bw, o.gpu)
        budget, budget_shaped = _at_budget(
            runs, budget_pred, budget_base_pred, bw, backend.model, progress
        )
        shaped += budget_shaped
        for label, entry in budget.items():
            policies[label] |= entry
        gc.collect()
        if generated:
            answers = _answers(runs, trace, bw, backend, out, progress)
            for label, entry in answers.items():
                policies[label] |= entry
            gc.collect()
    else:
        for entry in policies.values():
            entry |= dict.fromkeys(NOT_MEASURED)
    report: dict[str, Any] = {
        "trace": str(trace.path),
        "model": backend.source.name,
        "device": o.device,
        "requests": len(wl.specs),
        "block_size": wl.block_size,
        "kv_blocks": wl.num_blocks,
        "timing_preset": o.gpu,
        "workload_tokens": None
        if not workload
        else {
            "length_scale": None if given else o.length_scale,
            "block_size": block_size,
            "seed": runs[0].config.seed,
            "rule": "the trace's token ids, unscaled; seeded outputs where it gave a length"
            if given
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
        if not generated or bw is None
        else {
            "max_new_tokens": generation_cap(trace),
            "sampling": "greedy, stop on EOS; every request fits at once",
        },
        "policies": policies,
    }
    if o.plot:
        from memshare.validate.report import plot_kv

        plot_kv(o.run / "kv_in_use.png", series)
        report["plots"] = [str(o.run / "kv_in_use.png")]
        if len(runs) > 1:  # several runs: the measured frontier, one point per run
            from memshare.validate.report import plot_frontier

            plot_frontier(o.run / "frontier.png", report)
            report["plots"].append(str(o.run / "frontier.png"))
    if o.fit_cost_model:
        # the teacher-forced runs (prefill) and the runs at the budget (decode, preemption)
        report["cost_model_fit"] = _fit(o, shaped, predicted[runs[0].label])
    write_atomic(o.run / VALIDATION, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


Shaped = list[tuple[Sequence[BatchShape], Sequence[StepRecord]]]  # steps for the cost fit
Series = list[tuple[str, Sequence[float], Sequence[float]]]  # run, predicted, measured pages


def _teacher_forced(
    runs: Sequence[RunDir],
    predicted: dict[str, RunOutput],
    base_pred: RunOutput,
    wl: Workload,
    model: Any,
    out: _Writer,
    sub: Path,
    progress: Progress | None,
    one_pass: bool,
) -> tuple[dict[str, Any], Series, Shaped]:
    """The teacher-forced part: each run's ``validation.json`` entry, its engine files under
    ``RUN/<run>/<sub>``, the pages-in-use series for the plot and the steps for the fit (none
    under ``one_pass``: a shared pass times no run on its own)."""
    base_m, measured = run_lockstep(
        model, [r.config for r in runs], wl, progress, one_pass=one_pass
    )
    base_ppl = next((m.fidelity.metrics().ppl_base for m in measured if m is not base_m), None)
    policies: dict[str, Any] = {}
    for r, m in zip(runs, measured, strict=True):
        entry = policy_report(r, predicted[r.label], base_pred, m, base_m, wl, timed=not one_pass)
        if m is base_m:  # the unshared run itself: its text's perplexity is the base's
            entry["ppl"] = {"base": base_ppl, "shared": base_ppl}
        rows = {
            q.rid: {"answer": None, "first_share_position": m.first_share_pos.get(q.rid)}
            for q in m.engine.requests
        }
        out.write(r.path / sub, r.config, m.engine.result(), rows)
        policies[r.label] = entry
    series: Series = [
        (
            r.label,
            predicted[r.label].result.timeline.live_pages,
            [s.live_pages for s in m.engine.steps],
        )
        for r, m in zip(runs, measured, strict=True)
    ]
    shaped: Shaped = [] if one_pass else [(m.shapes, m.engine.steps) for m in measured]
    return policies, series, shaped


def _at_budget(
    runs: Sequence[RunDir],
    pred: dict[str, RunOutput],
    base_pred: RunOutput,
    bw: BudgetWorkload,
    model: Any,
    progress: Progress | None,
) -> tuple[dict[str, dict[str, Any]], Shaped]:
    """Throughput at the KV budget: each run's figures, and the steps for the fit."""
    base, gens = run_at_budget(model, [r.config for r in runs], bw, progress)
    entries = {
        r.label: budget_report(pred[r.label], base_pred, g, base)
        for r, g in zip(runs, gens, strict=True)
    }
    shaped: Shaped = [(g.shapes, g.engine.steps) for g in _unique([base, *gens])]
    return entries, shaped


def _answers(
    runs: Sequence[RunDir],
    trace: LoadedTrace,
    bw: BudgetWorkload,
    backend: Any,
    out: _Writer,
    progress: Progress | None,
) -> dict[str, dict[str, Any]]:
    """Generated answers: each run's figures; its generated run's files in ``engine/``."""
    base, gens = generate_answers(
        backend.model,
        [r.config for r in runs],
        trace,
        bw.records,
        bw.block_size,
        context=backend.context_limit,
        eos_ids=backend.eos_ids,
        token_starts=backend.token_starts,
        progress=progress,
    )
    answered = _Answers(base, bw.records, out.decode)
    entries: dict[str, dict[str, Any]] = {}
    for r, g in zip(runs, gens, strict=True):
        entries[r.label], rows = answered.of(g)
        out.write(r.path / "engine", r.config, g.engine.result(), rows)
    return entries


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
    live_pred = np.asarray(tl.live_pages, dtype=np.float64)
    live_meas = np.array([s.live_pages for s in eng.steps], dtype=np.float64)
    base_pred_mean = float(np.mean(base_pred.result.timeline.live_pages))
    base_meas_mean = float(np.mean([s.live_pages for s in base.engine.steps]))
    tau = run.config.policy_params.get("tau")
    if tau is None and run.config.policy in ("cf-topk",):
        tau = 0.2
    fid = m.fidelity.metrics() if m is not base else None
    sharing_pred = pred.metrics["sharing"]
    stats = eng.manager.stats
    lat = pred.metrics["latency_s"]
    total_tokens = sum(len(t) for t in wl.texts.values())
    ttft = list(eng.first_token_s.values()) if timed else []
    clock = eng.clock if timed else 0.0
    return {
        "policy": run.config.policy,
        "policy_params": dict(run.config.policy_params),
        "steps_identical": first_diff is None,
        "first_differing_step": first_diff,
        "steps": {"predicted": len(tl.scheduled_seqs), "measured": len(eng.steps)},
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
        "top1_agreement": 1.0 if fid is None else fid.top1_agreement,
        "top1_agreement_after_first_share": None
        if fid is None
        else fid.top1_agreement_after_first_share,
        "kl_mean": 0.0 if fid is None else fid.kl_mean,
        "kl_p99": 0.0 if fid is None else fid.kl_p99,
        "ppl": {
            "base": None if fid is None else fid.ppl_base,
            "shared": None if fid is None else fid.ppl_shared,
        },
        "answer_agreement": None,  # generated answers (generated.answer_report): dataset
        "accuracy": None,  # traces only
        "token_agreement": None,
        "first_share_position": dict(sorted(m.first_share_pos.items())),
        "per_request": _per_request(pred, eng),
        # the texts' tokens through the model, chunks of one block (the issue's time keys
        # are the generation-at-budget figures: generated.budget_report)
        "teacher_forced_time": {
            "prefill_tok_s": pme(
                pred.metrics["throughput"]["total_tokens_per_s"],
                total_tokens / clock if clock > 0 else None,
            ),
            "ttft_p50_s": pme(lat["ttft"]["p50"], float(np.median(ttft)) if ttft else None),
            "one_pass": not timed,
        },
        "shares": len(eng.shares),
        **_sketch(eng, tau),
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


class _Answers:
    """The unshared run's generated answers, against which each policy's are compared."""

    def __init__(
        self, base: GenRun, records: Sequence[RequestRecord], decode: Callable[[Any], str]
    ) -> None:
        self.base = base.engine.result()
        self.golds = {rec.id: gold_of(rec) for rec in records}
        self.decode = decode
        self.base_answers = compare_answers(self.base, self.base, self.golds, decode)

    def of(self, run: GenRun) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """A policy's answer figures (``validation.json``) and ``outputs.jsonl`` fields."""
        per = compare_answers(run.engine.result(), self.base, self.golds, self.decode)
        rows = answer_rows(per, self.golds)
        for rid, row in rows.items():
            row["first_share_position"] = run.first_share_pos.get(rid)
        return answer_report(per, self.base_answers), rows


class _Writer:
    """Writes an engine run's files under a run directory (answers in ``outputs.jsonl``)."""

    def __init__(self, backend: Any, o: ValidateOptions, block_size: int) -> None:
        self.backend = backend
        self.o = o
        self.block_size = block_size

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.backend.decode(ids, skip_special=True))

    def write(
        self,
        folder: Path,
        cfg: SimConfig,
        result: EngineResult,
        extra: dict[str, dict[str, Any]],
    ) -> None:
        metrics = run_metrics(
            result,
            model=self.backend.source.name,
            policy=cfg.policy,
            params=dict(cfg.policy_params),
            device=self.o.device,
            dtype=self.o.dtype,
            block_size=self.block_size,
        )
        write_engine(folder, cfg.policy, result, self.backend.decode, metrics, extra)


def _unique(runs: Sequence[GenRun]) -> list[GenRun]:
    return list({id(g): g for g in runs}.values())


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


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _pm(pred: Any, meas: Any) -> dict[str, Any]:
    return {"predicted": pred, "measured": meas}
