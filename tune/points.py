"""``tune``'s measured points: a setting run on the real model beside the unshared run, on
chosen texts, teacher-forced (``validate``'s lockstep engines), as fan-out jobs.

Invariants: a point's figures depend on its setting, its texts and the trace alone (each job
runs its own unshared engine), so a point measured in-process, on Ray or taken from the job
store (``--resume``) is the same; every figure carries the simulator's prediction of the very
same workload beside the measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memshare.fanout.host import Host
from memshare.fanout.jobs import Job, job_key
from memshare.sim.config import SimConfig
from memshare.sim.fidelity_model import FidelityModel, FitText
from memshare.sim.run import LoadedTrace
from memshare.validate.jobs import ModelSpec, fidelity_report, pages_report
from memshare.validate.measure import fit_texts, predict, run_lockstep, texts_workload


@dataclass(frozen=True)
class PointInputs:
    """What every point job reads (shipped once to each worker)."""

    spec: ModelSpec
    trace: LoadedTrace
    block_size: int
    gpu: str  # cost-model preset of the predicted times (not used by tune's figures)


@dataclass
class PointResult:
    """One measured setting."""

    label: str
    params: dict[str, Any]
    texts: list[str]
    kv_saved: dict[str, float | None]  # predicted, measured (vs the unshared run)
    page_share_rate: dict[str, Any]  # predicted, measured, and its 95% interval over texts
    measured: dict[str, Any]  # validate's fidelity figures (top-1 with its intervals, KL)
    predicted: dict[str, Any] | None  # the fidelity model's, when one was given
    fit: list[FitText] = field(default_factory=list)  # the positions, for refitting


MeasureFn = Callable[
    [Host, PointInputs, list[SimConfig], list[str], FidelityModel | None], list[PointResult]
]


def point_job(
    cfgs: list[SimConfig],
    texts: list[str],
    model: FidelityModel | None,
    trace_id: dict[str, Any],
    generated: MeasureFn | None = None,
) -> Job:
    """The job that measures ``cfgs`` on ``texts`` beside one unshared run (its key: the
    settings, texts, trace and model): teacher-forced (:func:`measure_points`), or by
    ``generated`` (answers: tune/answers.py)."""
    spec: dict[str, Any] = {
        "configs": [c.to_dict() for c in cfgs],
        "texts": texts,
        "trace": trace_id,
        "fidelity_model": None if model is None else model.to_json(),
    }
    if generated is not None:
        spec["generated"] = generated.__name__
    label = "; ".join(short(c.policy_params) for c in cfgs)
    fn = generated or measure_points
    return Job(job_key("tune-point", spec), label, fn, (cfgs, texts, model))


def short(params: dict[str, Any]) -> str:
    """A setting in a few words: its tau_layers, else its tau, else kvsharer's layers."""
    if "tau_layers" in params or "tau" in params:
        return str(params.get("tau_layers") or f"tau={params.get('tau')}")
    return ", ".join(f"{k}={v}" for k, v in params.items() if k in ("layers", "recompute"))


def loaded_model(host: Host, spec: ModelSpec) -> Any:
    """The job's model backend, loaded once per worker (kept in the host's cache)."""
    from memshare.traces.model.loader import load_model

    return host.cached(
        ("model", spec),
        lambda: load_model(spec.model, device=spec.device, dtype=spec.dtype, threads=spec.threads),
    )


def point_of(
    cfg: SimConfig,
    texts: list[str],
    pages: dict[str, Any],
    measured: dict[str, Any],
    predicted: dict[str, Any] | None = None,
    fit: list[FitText] | None = None,
) -> PointResult:
    """A measured setting from validate's pages report (``pages_report``) and its figures."""
    rate = {**pages["page_share_rate"], "ci95_texts": pages["page_share_rate_ci95_texts"]}
    return PointResult(
        label=cfg.policy,
        params=dict(cfg.policy_params),
        texts=list(texts),
        kv_saved=pages["kv_saved"],
        page_share_rate=rate,
        measured=measured,
        predicted=predicted,
        fit=fit or [],
    )


def measure_points(
    host: Host,
    inputs: PointInputs,
    cfgs: list[SimConfig],
    texts: list[str],
    model: FidelityModel | None,
) -> list[PointResult]:
    """Measure ``cfgs`` on ``texts``, stepped in lockstep beside one unshared run (a job's
    function)."""
    backend = loaded_model(host, inputs.spec)
    wanted = set(texts)
    src = [r for r in inputs.trace.records if r.id in wanted]
    wl = texts_workload(inputs.trace, src, inputs.block_size)
    base_pred = predict(cfgs[0].with_(policy="none", policy_params={}), wl, inputs.gpu)
    base, measured = run_lockstep(backend.model, cfgs, wl, host.report)
    out = []
    for cfg, m in zip(cfgs, measured, strict=True):
        pred = predict(cfg, wl, inputs.gpu, model)
        pages = pages_report(pred, base_pred, m.engine, base.engine)
        fid = fidelity_report(m.fidelity.metrics(), list(m.fidelity.per_request().values()))
        fit = fit_texts(f"{cfg.policy} {short(cfg.policy_params)}", m, wl)
        out.append(point_of(cfg, texts, pages, fid, pred.metrics.get("fidelity_predicted"), fit))
    return out
