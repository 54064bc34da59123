"""Throughput at a fixed KV budget, the part of ``memshare validate`` every KV trace gets
(docs/validate.md): the workload both executors run, the engines' runs at the budget, the
simulator's prediction and the figures side by side.

The same requests, all at 0 s, run as generation with the trace's output tokens forced, so every
executor serves the same lengths, under a budget of ``fraction`` x the blocks every request
needs at once (at least the largest request and its spare block), at which ``none`` must queue
or preempt. The engine runs ``none`` and each policy, stepped in turn
(:func:`~memshare.validate.generated.run_each`); the simulator predicts each on exactly that
workload and budget (the run's scheduler limits, the ``--gpu`` preset). Measured: output
tokens / engine clock, TTFT and TPOT from the engine's per-request clocks, preemptions; each
beside its prediction (:func:`pme`).

Invariants: the engine and the simulator get the same records, block size, budget and limits,
so a lossless policy's steps at the budget are the simulator's (``steps_identical``); nothing
here writes a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from memshare.errors import InputError
from memshare.kv_manager import blocks_for_all, cdiv
from memshare.scheduler import SchedulerConfig
from memshare.sim.config import ArrivalSpec, SimConfig
from memshare.sim.run import LoadedTrace, RunOutput, resolve
from memshare.traces.schema import RequestRecord
from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine
from memshare.validate.generated import GenRun, make_engine, run_each
from memshare.validate.measure import Progress, first_differing_step, simulate_on
from memshare.validate.runs.folders import RunDir

DEFAULT_KV_FRACTION = 0.5


@dataclass
class BudgetWorkload:
    """The requests of the throughput run and the budget both executors run them under."""

    records: list[RequestRecord]  # simulator form: the trace's output forced, arrival 0 (or kept)
    specs: list[EngineSpec]  # engine form of the same
    trace: LoadedTrace  # the trace re-keyed to ``records`` (same KV rows)
    block_size: int
    num_blocks: int  # the budget
    all_at_once: int  # blocks every request needs at once (the unlimited budget)
    fraction: float


def check_fraction(fraction: float) -> None:
    """``--kv-fraction`` is in (0, 1]."""
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise InputError(
            "--kv-fraction",
            f"must be in (0, 1], got {fraction}",
            f"e.g. {DEFAULT_KV_FRACTION} (the budget as a fraction of all requests at once)",
        )


def budget_workload(
    trace: LoadedTrace,
    run: RunDir,
    limit: int | None,
    fraction: float,
    *,
    keep_arrivals: bool = False,
) -> BudgetWorkload:
    """The run's requests as forced generation under ``fraction`` x the all-at-once budget
    (a record without prompt tokens is served with its first output token as its prompt);
    every request at 0 s unless ``keep_arrivals`` (then the trace's ``arrival_s``)."""
    check_fraction(fraction)
    cap = limit or run.config.limit
    src = trace.records[:cap] if cap else trace.records
    bs = resolve(run.config, trace).block_size
    records: list[RequestRecord] = []
    specs: list[EngineSpec] = []
    for rec in src:
        prompt, out = list(rec.prompt_ids or []), list(rec.output_ids or [])
        if not prompt:
            prompt, out = out[:1], out[1:]
        if not out:
            prompt, out = prompt[:-1], prompt[-1:]
        if not prompt:
            raise InputError(str(trace.path), f"request {rec.id!r} has under 2 tokens", "capture")
        records.append(
            replace(
                rec,
                arrival_s=rec.arrival_s if keep_arrivals else 0.0,
                prompt_len=len(prompt),
                output_len=len(out),
                prompt_ids=prompt,
                output_ids=out,
                finish_reason="length",
            )
        )
        specs.append(EngineSpec(rec.id, prompt, len(out), rec.steps, forced=out))
    lengths = [r.prompt_len + r.output_len for r in records]
    full = blocks_for_all(lengths, bs)
    blocks = max(math.ceil(fraction * full), max(cdiv(n, bs) for n in lengths) + 1)
    tr = LoadedTrace(trace.path, trace.manifest, records, trace.kv_rows)
    return BudgetWorkload(records, specs, tr, bs, blocks, full, fraction)


def predict_at_budget(
    cfg: SimConfig, bw: BudgetWorkload, gpu: str, *, arrival: ArrivalSpec | None = None
) -> RunOutput:
    """The simulator's run of ``cfg`` on exactly the budget workload (timing on ``gpu``;
    requests as they are in ``bw``, under ``arrival``: all at once by default)."""
    return simulate_on(cfg, bw.trace, bw.num_blocks, bw.block_size, gpu, arrival=arrival)


def run_at_budget(
    model: Any,
    configs: Sequence[SimConfig],
    bw: BudgetWorkload,
    progress: Progress | None = None,
) -> tuple[GenRun, list[GenRun]]:
    """The unshared engine and one per config at the budget (stepped in turn)."""

    def make(cfg: SimConfig | None) -> PagedEngine:
        sched: SchedulerConfig = (cfg or configs[0]).scheduler
        opts = EngineOptions(block_size=bw.block_size, kv_blocks=bw.num_blocks, scheduler=sched)
        return make_engine(model, cfg, bw.specs, bw.trace, opts)

    return run_each(make, configs, "at the KV budget", progress)


def budget_report(
    pred: RunOutput, base_pred: RunOutput, run: GenRun, base: GenRun
) -> dict[str, Any]:
    """A policy's throughput figures at the budget (``validation.json``): the issue's
    ``throughput_tok_s``, ``ttft_p50_s``, ``tpot_p50_s`` (and p90s), ``throughput_gain``, and
    ``at_budget`` (steps against the simulator's, preemptions, largest batch)."""
    eng = run.engine
    tl = pred.result.timeline
    first_diff = first_differing_step(pred, eng)
    meas = measured_times(eng)
    lat = pred.metrics["latency_s"]
    tps_pred = pred.metrics["throughput"]["output_tokens_per_s"]
    base_tps_pred = base_pred.metrics["throughput"]["output_tokens_per_s"]
    base_tps = measured_times(base.engine)["tok_s"]
    return {
        "throughput_tok_s": pme(tps_pred, meas["tok_s"]),
        "ttft_p50_s": pme(lat["ttft"]["p50"], meas["ttft_p50"]),
        "ttft_p90_s": pme(lat["ttft"]["p90"], meas["ttft_p90"]),
        "tpot_p50_s": pme(lat["tpot"]["p50"], meas["tpot_p50"]),
        "tpot_p90_s": pme(lat["tpot"]["p90"], meas["tpot_p90"]),
        "throughput_gain": {
            "predicted": tps_pred / base_tps_pred if tps_pred and base_tps_pred else None,
            "measured": meas["tok_s"] / base_tps if meas["tok_s"] and base_tps else None,
        },
        "at_budget": {
            "steps_identical": first_diff is None,
            "first_differing_step": first_diff,
            "steps": {"predicted": len(tl.scheduled_seqs), "measured": len(eng.steps)},
            "preemptions": {
                "predicted": pred.metrics["preemptions"],
                "measured": eng.scheduler.num_preemptions,
            },
            "max_batch": {
                "predicted": max(tl.scheduled_seqs, default=0),
                "measured": max((s.seqs for s in eng.steps), default=0),
            },
            "pages_peak": {
                "predicted": max(tl.live_pages, default=0),
                "measured": max((s.live_pages for s in eng.steps), default=0),
            },
            "pages_shared": {
                "predicted": pred.metrics["sharing"]["pages_shared"],
                "measured": eng.manager.stats.pages_shared,
            },
            "prefix_hit_tokens": {
                "predicted": pred.metrics["prefix_cache"]["all_admissions"]["hit_tokens"],
                "measured": eng.manager.stats.hit_tokens,
            },
            "reused_tokens": {
                "predicted": pred.metrics["prefix_cache"]["reused_tokens"],
                "measured": eng.manager.stats.reused_tokens,
            },
            "output_tokens": meas["output_tokens"],
            "wall_s": eng.clock,
        },
    }


def measured_times(eng: PagedEngine) -> dict[str, Any]:
    """Output tokens / engine clock, and TTFT / TPOT percentiles from its per-request clocks
    (every request arrives at 0 on the engine's clock)."""
    out = sum(r.num_output for r in eng.requests)
    ttft = [eng.first_token_s[r.rid] for r in eng.requests if r.rid in eng.first_token_s]
    tpot = [
        (eng.finish_s[r.rid] - eng.first_token_s[r.rid]) / (r.num_output - 1)
        for r in eng.requests
        if r.num_output > 1 and r.rid in eng.finish_s and r.rid in eng.first_token_s
    ]
    return {
        "output_tokens": out,
        "tok_s": out / eng.clock if eng.clock > 0 else None,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "tpot_p50": percentile(tpot, 50),
        "tpot_p90": percentile(tpot, 90),
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` (``None`` when there are none)."""
    return float(np.percentile(values, q)) if len(values) else None


def pme(pred: float | None, meas: float | None) -> dict[str, Any]:
    """``{"predicted", "measured", "error_pct"}``: the prediction's error relative to the
    measurement, in percent (``None`` where either is missing)."""
    err = None
    if pred is not None and meas:
        err = 100.0 * (pred - meas) / meas
    return {"predicted": pred, "measured": meas, "error_pct": err}
