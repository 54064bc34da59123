"""``memshare validate RUN --engine vllm``: the simulator's ``none`` and ``prefix`` runs beside
real vLLM serving the same requests under the same budget (docs/vllm.md).

The workload is validate's run at a KV budget (``--kv-fraction`` of what every request needs at
once, all requests at 0 s, each generating exactly its trace's output length; with
``--replay-arrivals`` requests arrive as the run's ``--arrival`` says, on vLLM's engine clock
and in the simulator alike), so the
simulator's prediction is :func:`~memshare.validate.budget.predict_at_budget`, the same as
for the torch engine; vLLM runs it through :mod:`memshare.validate.vllm.engine`. Per policy:
throughput, TTFT and TPOT percentiles, prefix hit rate (tokens), per-request hits, KV blocks
in use, steps and preemptions, predicted vs measured; ``--fit-cost-model`` fits the cost model
to vLLM's measured steps (every 5th step held out).

Invariants: only ``none`` and ``prefix`` run (vLLM has no memshare sharing policy); every run
uses the budget and block size of the first, and its own scheduler limits; a request's
predicted hit is the simulator's ``hit_tokens`` at first admission, its measured one vLLM's
``num_cached_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from memshare.atomic import write_atomic
from memshare.errors import InputError
from memshare.sim.run import RunOutput
from memshare.traces.capture.vllm import check_vllm, kv_bytes_per_token
from memshare.validate.budget import (
    BudgetWorkload,
    budget_workload,
    percentile,
    pme,
    predict_at_budget,
)
from memshare.validate.cost_fit import COST_TOML, fit_and_write
from memshare.validate.options import VALIDATION, ValidateOptions, check_options
from memshare.validate.runs.folders import RunDir, check_model, find_runs, load_checked_trace
from memshare.validate.runs.workload import is_workload, on_engine
from memshare.validate.vllm.engine import VllmRun, VllmSettings, VllmSpec, open_engine, run_engine

VLLM_POLICIES = ("none", "prefix")
DEFAULT_VLLM_BLOCK_SIZE = 32  # the smallest block vLLM's CPU attention takes
STEPS = "vllm_steps.jsonl"  # per run directory: vLLM's steps as measured (the fit's data)


def validate_vllm(
    o: ValidateOptions, status: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure every ``none``/``prefix`` run under ``o.run`` (``o.engine``: vllm) on vLLM;
    returns (and writes) ``validation.json``."""
    from memshare.traces.model.loader import load_model

    check_options(o)
    if o.one_pass or o.fidelity_only:
        raise InputError(
            "--engine vllm",
            "measures serving (time, hits, blocks); fidelity needs the torch engine's logits",
            "leave out --one-pass and --fidelity-only",
        )
    runs = find_runs(o.run)
    trace = load_checked_trace(runs[0])
    _check_policies(runs)
    check_vllm()  # before the model loads: not installed or another version
    if status:
        status("loading the tokenizer")
    backend = load_model(o.model, threads=o.threads)
    check_model(trace, backend.model_info().name)
    if is_workload(trace):
        runs, trace = on_engine(
            runs,
            trace,
            backend,
            block_size=o.block_size or DEFAULT_VLLM_BLOCK_SIZE,
            limit=o.limit,
            length_scale=o.length_scale,
        )
    elif o.block_size is not None:
        raise InputError(
            "--block-size", "applies to workload traces", "simulate at the block size to run"
        )
    replay = bool(o.replay_arrivals)
    bw = budget_workload(trace, runs[0], o.limit, o.kv_fraction, keep_arrivals=replay)
    folder, token_bytes = backend.folder, kv_bytes_per_token(backend.model_info())
    del backend
    policies, preds, steps = _measure_runs(o, runs, bw, folder, token_bytes, status)
    report = _report(o, str(trace.path), str(folder), bw, runs, policies)
    if o.fit_cost_model:
        report["cost_model_fit"] = _fit(o, preds[0], steps)
    write_atomic(o.run / VALIDATION, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def _check_policies(runs: Sequence[RunDir]) -> None:
    """Every run's policy is one vLLM has (:data:`VLLM_POLICIES`)."""
    for r in runs:
        if r.config.policy not in VLLM_POLICIES:
            raise InputError(
                f"{r.path / 'config.json'}: policy",
                f"{r.config.policy} is memshare's own; vLLM runs {' and '.join(VLLM_POLICIES)}",
                "validate it with the torch engine (leave out --engine vllm)",
            )


def _measure_runs(
    o: ValidateOptions,
    runs: Sequence[RunDir],
    bw: BudgetWorkload,
    folder: Any,
    token_bytes: int,
    status: Callable[[str], None] | None,
) -> tuple[dict[str, dict[str, Any]], list[RunOutput], list[tuple[Any, float]]]:
    """Each run simulated, then served by a fresh vLLM engine (its steps written to
    ``STEPS``): the runs' entries, predictions, and the measured steps for the fit."""
    replay = bool(o.replay_arrivals)
    policies: dict[str, dict[str, Any]] = {}
    steps: list[tuple[Any, float]] = []
    preds: list[RunOutput] = []
    for r in runs:
        if status:
            status(f"{r.label}: simulating, then vLLM")
        pred = predict_at_budget(r.config, bw, o.gpu, arrival=r.config.arrival if replay else None)
        preds.append(pred)
        run = _measure(r, bw, folder, token_bytes, replay)
        write_steps(r.path / STEPS, run)
        policies[r.label] = compare(pred, run)
        steps += [(s.shape, s.wall_s) for s in run.steps if s.shape is not None]
    return policies, preds, steps


def _report(
    o: ValidateOptions,
    trace: str,
    model: str,
    bw: BudgetWorkload,
    runs: Sequence[RunDir],
    policies: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The ``validation.json`` object (without the cost fit)."""
    return {
        "trace": trace,
        "engine": "vllm",
        "model": model,
        "requests": len(bw.specs),
        "block_size": bw.block_size,
        "kv_blocks": bw.num_blocks,
        "timing_preset": o.gpu,
        "budget": {
            "kv_fraction": bw.fraction,
            "kv_blocks": bw.num_blocks,
            "all_at_once_blocks": bw.all_at_once,
            "workload": "each request its trace's output length (greedy, no EOS)",
            "arrivals": _arrivals(runs, bool(o.replay_arrivals)),
        },
        "policies": policies,
    }


def write_steps(path: Path, run: VllmRun) -> None:
    """One JSON line per vLLM step: its wall time, KV blocks in use and batch shape (every
    :class:`~memshare.sim.cost_model.BatchShape` field; null for a step that ran nothing)."""
    lines = [
        json.dumps(
            {
                "step": i,
                "wall_s": st.wall_s,
                "blocks_in_use": st.blocks_in_use,
                "shape": None if st.shape is None else asdict(st.shape),
            }
        )
        for i, st in enumerate(run.steps)
    ]
    write_atomic(path, "".join(line + "\n" for line in lines))


def _arrivals(runs: Sequence[RunDir], replay: bool) -> dict[str, str]:
    """How requests arrived on each run (its simulate ``--arrival`` when replayed)."""
    return {r.label: str(r.config.arrival) if replay else "all at 0 s" for r in runs}


def _specs(r: RunDir, bw: BudgetWorkload, replay: bool) -> tuple[list[VllmSpec], int | None]:
    """vLLM's requests for run ``r`` and, for a closed loop, its clients. Replayed open-loop
    times are the simulator's own (:func:`~memshare.sim.arrivals.arrival_times` of the run's
    ``--arrival``, ``--time-scale`` and seed)."""
    from memshare.sim.arrivals import arrival_times

    cfg = r.config
    times = [0.0] * len(bw.specs)
    clients = None
    if replay and cfg.arrival.mode == "closed":
        clients = cfg.arrival.clients
    elif replay:
        trace_times = [rec.arrival_s for rec in bw.records]
        times = arrival_times(cfg.arrival, trace_times, cfg.time_scale, cfg.seed).tolist()
    specs = [
        VllmSpec(s.rid, s.prompt_ids, s.max_tokens, t) for s, t in zip(bw.specs, times, strict=True)
    ]
    return specs, clients


def _measure(r: RunDir, bw: BudgetWorkload, folder: Any, token_bytes: int, replay: bool) -> VllmRun:
    """One fresh vLLM engine for run ``r``, serving the budget workload."""
    longest = max(len(s.prompt_ids) + s.max_tokens for s in bw.specs)
    settings = VllmSettings(
        folder=folder,
        block_size=bw.block_size,
        num_blocks=bw.num_blocks,
        scheduler=r.config.scheduler,
        prefix_caching=r.config.policy == "prefix",
        max_model_len=longest,
        kv_bytes_per_token=token_bytes,
        seed=r.config.seed,
    )
    llm = open_engine(settings)
    try:
        specs, clients = _specs(r, bw, replay)
        return run_engine(llm, specs, clients)
    finally:
        del llm


def compare(pred: RunOutput, run: VllmRun) -> dict[str, Any]:
    """One policy's ``validation.json`` entry: the simulator's figures beside vLLM's."""
    lat = pred.metrics["latency_s"]
    reqs = pred.result.requests
    hits_pred = {q.rid: max(q.hit_tokens, 0) for q in reqs}
    hits_meas = {r.rid: max(r.cached_tokens, 0) for r in run.requests}
    prompt = sum(q.prompt_len for q in reqs)
    differ = sorted(rid for rid in hits_pred if hits_pred[rid] != hits_meas.get(rid))
    ttft = [r.first_token_s - r.arrival_s for r in run.requests]
    tpot = [
        (r.finish_s - r.first_token_s) / (len(r.output_ids) - 1)
        for r in run.requests
        if len(r.output_ids) > 1
    ]
    tl = pred.result.timeline
    per_block = pred.result.pages_per_block
    used_pred = [(a + b) / per_block for a, b in zip(tl.live_pages, tl.cached_pages, strict=True)]
    used_meas = [s.blocks_in_use for s in run.steps]
    return {
        "policy": pred.config.policy,
        "throughput_tok_s": pme(
            pred.metrics["throughput"]["output_tokens_per_s"],
            run.output_tokens / run.clock if run.clock > 0 else None,
        ),
        "ttft_p50_s": pme(lat["ttft"]["p50"], percentile(ttft, 50)),
        "ttft_p90_s": pme(lat["ttft"]["p90"], percentile(ttft, 90)),
        "tpot_p50_s": pme(lat["tpot"]["p50"], percentile(tpot, 50)),
        "tpot_p90_s": pme(lat["tpot"]["p90"], percentile(tpot, 90)),
        "prefix_hit_rate": {
            "predicted": sum(hits_pred.values()) / prompt if prompt else 0.0,
            "measured": sum(hits_meas.values()) / prompt if prompt else 0.0,
        },
        "prefix_hit_tokens": {
            "predicted": sum(hits_pred.values()),
            "measured": sum(hits_meas.values()),
        },
        "requests_hit_differing": differ,
        "request_hits": {rid: [hits_pred[rid], hits_meas.get(rid)] for rid in hits_pred},
        "blocks_peak": {"predicted": max(used_pred, default=0), "measured": max(used_meas)},
        "blocks_mean": {
            "predicted": float(np.mean(used_pred)) if used_pred else 0.0,
            "measured": float(np.mean(used_meas)),
        },
        "steps": {"predicted": len(tl.scheduled_seqs), "measured": len(run.steps)},
        "preemptions": {"predicted": pred.metrics["preemptions"], "measured": run.preemptions},
        "evicted_blocks": {
            "predicted": pred.metrics["kv"]["evicted_blocks"],
            "measured": run.evicted_blocks,
        },
        "output_tokens": run.output_tokens,
        "wall_s": run.clock,
    }


def _fit(o: ValidateOptions, pred: RunOutput, steps: list[tuple[Any, float]]) -> dict[str, Any]:
    """The cost model fitted on vLLM's measured steps (on the timing preset the predictions
    used); held-out steps give the error."""
    cfg = pred.config
    source = f"memshare validate {o.run} --engine vllm"
    return fit_and_write(steps, cfg.model, cfg.gpu, cfg.cost, o.run / COST_TOML, source)
