"""A policy's teacher-forced entry in ``validation.json`` (docs/validate.md): KV pages (peak,
mean, saving against the unshared run), sharing, fidelity against the unshared engine, every
share's exact distance against ``tau``, and the teacher-forced time, predicted beside measured.

Invariants: every figure is ``{"predicted", "measured"}`` (times also ``error_pct``,
:func:`~memshare.validate.budget.pme`); the unshared run's own fidelity is exact (agreement 1,
KL 0); the generated-answer keys are null here (the answers part fills them); nothing here runs
an engine or writes a file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memshare.sim.run import RunOutput
from memshare.validate.budget import pme
from memshare.validate.engine.paged_engine import PagedEngine
from memshare.validate.fidelity import FidelityMetrics
from memshare.validate.intervals import binomial_interval, ratio_bootstrap
from memshare.validate.measure import Measured, Workload, first_differing_step, sketch_vs_exact
from memshare.validate.runs.folders import RunDir


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
        **_pages(pred, base_pred, eng, base.engine),
        **_fidelity(fid, texts),
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
    }


def _pages(
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
    }


def _fidelity(fid: FidelityMetrics | None, texts: list[FidelityMetrics]) -> dict[str, Any]:
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
