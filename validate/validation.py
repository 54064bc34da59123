"""``memshare validate RUN``: the simulator's runs measured on the real model (docs/validate.md).

For every run directory under ``RUN``: the simulator's prediction of the engine's exact
workload (:func:`~memshare.validate.measure.predict`) beside the paged engine's measurement
(:func:`~memshare.validate.measure.run_lockstep`): KV pages in use (step by step, peak, mean;
the saving against the unshared run), fidelity against the unshared engine (top-1 agreement,
KL, perplexity), every share's exact distance on the live KV against ``tau``, and time
(tokens/s, TTFT) predicted on a cost-model preset and measured. Writes ``RUN/validation.json``
and, per run, the engine's ``outputs.jsonl`` / ``shares.jsonl`` / ``reuses.jsonl`` under
``RUN/<run>/engine/``; with ``fit_cost_model``, ``RUN/cost_model.toml`` fitted on the engine's
steps.

Invariants: ``validation.json`` is written whole (temporary file, then renamed) after every
run was measured, so a failed validation leaves no half file; every figure has its predicted
and measured value side by side; a lossless policy's ``steps_identical`` is true or the report
says at which step the executors parted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memshare.sim.run import RunOutput
from memshare.validate.cost_fit import fit_cost_model, split_steps, write_cost_fit
from memshare.validate.engine import PagedEngine
from memshare.validate.generate import run_metrics, write_run
from memshare.validate.measure import (
    Measured,
    Progress,
    Workload,
    predict,
    run_lockstep,
    sketch_vs_exact,
    teacher_forced_workload,
)
from memshare.validate.runs import RunDir, check_model, find_runs, load_checked_trace

VALIDATION = "validation.json"
LOSSLESS = ("none", "prefix", "exact-dedup")


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


def validate(
    o: ValidateOptions,
    status: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure every run under ``o.run``; returns (and writes) the ``validation.json`` object."""
    from memshare.traces.capture.device import check_device
    from memshare.traces.capture.hf import HFBackend

    runs = find_runs(o.run)
    trace = load_checked_trace(runs[0])
    for r in runs[1:]:
        load_checked_trace(r)
    wl = teacher_forced_workload(trace, runs[0], o.limit)
    check_device(o.device)
    if status:
        status("loading the model")
    backend = HFBackend(o.model, device=o.device, dtype=o.dtype, threads=o.threads)
    check_model(trace, backend.model_info().name)
    if status:
        status("simulating")
    predicted = {r.label: predict(r.config, wl, o.gpu) for r in runs}
    base_pred = predict(runs[0].config.with_(policy="none", policy_params={}), wl, o.gpu)
    if status:
        status("running the engines")
    base_m, measured = run_lockstep(backend.model, [r.config for r in runs], wl, progress)
    base_ppl = next((m.fidelity.metrics().ppl_base for m in measured if m is not base_m), None)
    policies: dict[str, Any] = {}
    for r, m in zip(runs, measured, strict=True):
        policies[r.label] = policy_report(r, predicted[r.label], base_pred, m, base_m, wl)
        if m is base_m:  # the unshared run itself: its text's perplexity is the base's
            policies[r.label]["ppl"] = {"base": base_ppl, "shared": base_ppl}
        result = m.engine.result()
        metrics = run_metrics(
            result,
            model=backend.source.name,
            policy=r.config.policy,
            params=dict(r.config.policy_params),
            device=o.device,
            dtype=o.dtype,
            block_size=wl.block_size,
        )
        write_run(r.path / "engine", r.config.policy, result, backend.decode, metrics)
    report: dict[str, Any] = {
        "trace": str(trace.path),
        "model": backend.source.name,
        "device": o.device,
        "requests": len(wl.specs),
        "block_size": wl.block_size,
        "kv_blocks": wl.num_blocks,
        "timing_preset": o.gpu,
        "workload": "teacher-forced texts, chunks of one block (docs/validate.md)",
        "policies": policies,
    }
    if o.plot:
        from memshare.validate.report import plot_kv

        series = [
            (
                r.label,
                predicted[r.label].result.timeline.live_pages,
                [s.live_pages for s in m.engine.steps],
            )
            for r, m in zip(runs, measured, strict=True)
        ]
        plot_kv(o.run / "kv_in_use.png", series)
        report["plots"] = [str(o.run / "kv_in_use.png")]
    if o.fit_cost_model:
        report["cost_model_fit"] = _fit(o, runs[0], wl, measured, predicted[runs[0].label])
    _write_json(o.run / VALIDATION, report)
    return report


def policy_report(
    run: RunDir,
    pred: RunOutput,
    base_pred: RunOutput,
    m: Measured,
    base: Measured,
    wl: Workload,
) -> dict[str, Any]:
    """One run's ``validation.json`` entry (see docs/validate.md for every field)."""
    eng = m.engine
    tl = pred.result.timeline
    want = list(zip(tl.scheduled_seqs, tl.scheduled_tokens, tl.live_pages, strict=True))
    got = [(s.seqs, s.computed, s.live_pages) for s in eng.steps]
    first_diff = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)
    if first_diff is None and len(want) != len(got):
        first_diff = min(len(want), len(got))
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
    ttft = list(eng.first_token_s.values())
    return {
        "policy": run.config.policy,
        "policy_params": dict(run.config.policy_params),
        "steps_identical": first_diff is None,
        "first_differing_step": first_diff,
        "steps": {"predicted": len(want), "measured": len(got)},
        "pages_peak": _pm(float(live_pred.max(initial=0)), float(live_meas.max(initial=0))),
        "pages_mean": _pm(float(live_pred.mean()), float(live_meas.mean())),
        "kv_saved": _pm(
            1.0 - float(live_pred.mean()) / base_pred_mean,
            1.0 - float(live_meas.mean()) / base_meas_mean,
        ),
        "pages_shared": _pm(sharing_pred["pages_shared"], stats.pages_shared),
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
        "answer_agreement": None,  # generated answers: not run on teacher-forced texts
        "accuracy": None,
        "first_share_position": dict(sorted(m.first_share_pos.items())),
        "throughput_tok_s": _pme(
            pred.metrics["throughput"]["total_tokens_per_s"],
            total_tokens / eng.clock if eng.clock > 0 else None,
        ),
        "ttft_p50_s": _pme(lat["ttft"]["p50"], float(np.median(ttft)) if ttft else None),
        "tpot_p50_s": _pme(None, None),  # one sampled token per text: no TPOT
        "shares": len(eng.shares),
        **_sketch(eng, tau),
    }


def _sketch(eng: PagedEngine, tau: Any) -> dict[str, Any]:
    rep = sketch_vs_exact(eng, float(tau) if isinstance(tau, int | float) else None)
    return {
        "shares_exceeding_tau": rep["exceeding_tau"],
        "shares_exceeding_tau_by_10pct": rep["exceeding_tau_by_10pct"],
        "exact_distance": rep["exact_distance"],
        "tau": rep["tau"],
    }


def _fit(
    o: ValidateOptions, run: RunDir, wl: Workload, measured: list[Measured], pred: RunOutput
) -> dict[str, Any]:
    """Fit the cost model on the engines' measured steps; held-out steps give the error."""
    steps = [
        (shape, s.wall_s)
        for m in measured
        for shape, s in zip(m.shapes, m.engine.steps, strict=True)
        if s.wall_s > 0
    ]
    train, test = split_steps(steps)
    cfg = pred.config
    fit = fit_cost_model(train, test, cfg.model, cfg.gpu, prior=cfg.cost)
    path = o.run / "cost_model.toml"
    write_cost_fit(fit, path, source=f"memshare validate {o.run} on {o.device}")
    return {
        "file": str(path),
        "fitted": list(fit.fitted),
        "not_fitted": list(fit.not_fitted),
        "error_before_pct": fit.before.mape_pct,
        "error_after_pct": fit.after.mape_pct,
        "train_steps": len(train),
        "test_steps": len(test),
    }


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _pm(pred: Any, meas: Any) -> dict[str, Any]:
    return {"predicted": pred, "measured": meas}


def _pme(pred: float | None, meas: float | None) -> dict[str, Any]:
    err = None
    if pred is not None and meas:
        err = 100.0 * (pred - meas) / meas
    return {"predicted": pred, "measured": meas, "error_pct": err}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
