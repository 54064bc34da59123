"""``memshare tune``: calibrate the fidelity model, search the predicted frontier, validate
frontier points on held-out texts, refit, until the best measured point meets the target
within the budget of validate runs (docs/tune.md).

Invariants: every validate run is a fan-out job kept in the job store as soon as it finished,
so ``--resume`` after an interruption repeats none (and the loop, being deterministic, makes
the same choices again); the output folder is written whole at the end, never half.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from memshare.errors import InputError
from memshare.fanout.local import LocalExecutor
from memshare.fanout.options import FanOut
from memshare.fanout.run import Executor, fan_out, raise_failures
from memshare.fanout.store import JobStore
from memshare.fanout.tally import Tally
from memshare.outdir import OutputKind, claim_output, staged_output
from memshare.sim.config import SimConfig
from memshare.sim.fidelity_model import FidelityModel, fit
from memshare.sim.run import LoadedTrace, resolve
from memshare.tune.points import PointInputs, PointResult, point_job, short
from memshare.tune.report import write_outputs
from memshare.tune.result import TuneOptions, TuneResult
from memshare.tune.search import Candidate, base_pages, frontier, layer_table, simulator
from memshare.tune.target import Target, split
from memshare.validate.measure import Progress, Workload, texts_workload

Stage = Callable[[str], None]
TUNE_OUTPUT = OutputKind("tune", "tune.json")
CALIBRATION_TAUS = (0.3, 0.6, 1.0)  # one tau for every layer: the calibration runs


def _check(opts: TuneOptions, trace: LoadedTrace) -> None:
    cfg = opts.config
    if cfg.policy != "cf-topk":
        raise InputError(
            "--policy",
            f"tune searches cf-topk's per-layer thresholds; {cfg.policy} is not searched yet",
            "use --policy cf-topk (validate measures other policies' settings)",
        )
    if cfg.policy_params.get("granularity") != "layer":
        raise InputError(
            "--set granularity", "tune searches thresholds per layer", "add --set granularity=layer"
        )
    if not trace.has_sketches:
        raise InputError(str(trace.path), "has no KV sketches", "capture a kv trace (--texts)")
    if opts.budget < 1:
        raise InputError("--budget", f"{opts.budget} validate runs", "give 1 or more, e.g. 4")


def tune(
    opts: TuneOptions,
    output: Path,
    fan: FanOut,
    stage: Stage,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    jobs_progress: Callable[[Tally], None] | None = None,
) -> TuneResult:
    """The whole loop (module docstring); writes ``output`` at the end. ``progress`` gets
    the engines' positions in-process, ``jobs_progress`` the jobs' tally on every executor."""
    trace = LoadedTrace.load(Path(opts.config.trace))
    _check(opts, trace)
    resolve(opts.config, trace)
    ids = [r.id for r in trace.records[: opts.limit] if r.prompt_ids or r.output_ids]
    cal, held = split(ids, opts.holdout)
    claim_output(output, "-o", TUNE_OUTPUT, overwrite=overwrite)
    bs = resolve(opts.config, trace).block_size
    inputs = PointInputs(opts.spec, trace, bs, opts.gpu)
    store = fan.store(output)
    executor = fan.executor()
    if isinstance(executor, LocalExecutor):
        executor.host.report = progress

    measure = _measurer(executor, inputs, store, trace, jobs_progress)
    try:
        stage(f"calibrating on {len(cal)} texts: tau {', '.join(map(str, CALIBRATION_TAUS))}")
        calibration = measure([_uniform(opts.config, t) for t in CALIBRATION_TAUS], cal, None)
        wl = texts_workload(trace, [r for r in trace.records if r.id in set(held)], bs)
        found = _rounds(opts, wl, calibration, measure, stage)
    finally:
        executor.close()
    validated, single, front, model = found
    split_ = {"calibration": cal, "held_out": held}
    best = _best(validated, opts.target)
    result = TuneResult(calibration, validated, single, front, best, model, split_)
    with staged_output(output) as staging:
        write_outputs(result, opts, staging)
    fan.forget(output)
    return result


Measure = Callable[[list[SimConfig], list[str], FidelityModel | None], list[PointResult]]


def _measurer(
    executor: Executor,
    inputs: PointInputs,
    store: JobStore,
    trace: LoadedTrace,
    jobs_progress: Callable[[Tally], None] | None,
) -> Measure:
    """Settings measured on texts as one fan-out job (kept in ``store`` once finished)."""

    def measure(
        cfgs: list[SimConfig], texts: list[str], model: FidelityModel | None
    ) -> list[PointResult]:
        job = point_job(cfgs, texts, model, trace.identity())
        outcomes = fan_out([job], executor, shared=inputs, store=store, progress=jobs_progress)
        raise_failures(outcomes, "--resume")
        return list(outcomes[0].value)

    return measure


def _rounds(
    opts: TuneOptions,
    wl: Workload,
    calibration: list[PointResult],
    measure: Measure,
    stage: Stage,
) -> tuple[list[tuple[Candidate, PointResult]], list[Candidate], list[Candidate], FidelityModel]:
    """Fit, search, validate, refit, at most ``opts.budget`` times: ``(validated points, the
    single-tau and per-layer frontiers of the last search, the last model)``."""
    rows = [r for p in calibration for r in p.fit]
    layers = wl.trace.manifest.model.num_layers if wl.trace.manifest.model else 0
    model = fit(rows, layers)
    validated: list[tuple[Candidate, PointResult]] = []
    tried: set[str] = set()
    single: list[Candidate] = []
    front: list[Candidate] = []
    for n in range(1, opts.budget + 1):
        sim = simulator(wl, opts.gpu, model)
        base = base_pages(sim, opts.config)
        stage(f"round {n}: searching the predicted frontier on {len(wl.texts)} texts")
        table = layer_table(sim, opts.config, model, wl, base)
        single, front = table.uniform, frontier(sim, opts.config, table, base)
        pick = _choose(front, validated, opts.target, tried)
        if pick is None:
            break
        tried.add(repr(sorted(pick.params.items())))
        stage(f"round {n}: validating {short(pick.params)} on {len(wl.texts)} texts")
        (point,) = measure([opts.config.with_(policy_params=pick.params)], list(wl.texts), model)
        validated.append((pick, point))
        model = fit(rows + [r for _, p in validated for r in p.fit], layers)
    return validated, single, front, model


def _uniform(cfg: SimConfig, tau: float) -> SimConfig:
    params = {k: v for k, v in cfg.policy_params.items() if k != "tau_layers"}
    return cfg.with_(policy_params={**params, "tau": tau})


def _measured(p: PointResult) -> tuple[float | None, float | None]:
    return p.measured.get("top1_agreement"), p.measured.get("kl_mean")


def _choose(
    front: list[Candidate],
    validated: list[tuple[Candidate, PointResult]],
    target: Target,
    tried: set[str],
) -> Candidate | None:
    """The next point to validate: between the largest measured saving that met the target
    and the smallest that missed it, the largest predicted to meet it (else the most
    faithful one there)."""
    lo = max((c.kv_saved for c, p in validated if target.met(*_measured(p))), default=-1.0)
    hi = min((c.kv_saved for c, p in validated if not target.met(*_measured(p))), default=2.0)
    open_ = [
        c for c in front if lo < c.kv_saved < hi and repr(sorted(c.params.items())) not in tried
    ]
    if not open_:
        return None
    meeting = [c for c in open_ if target.predicted_met(c)]
    if meeting:
        return max(meeting, key=lambda c: c.kv_saved)
    return min(open_, key=lambda c: c.kv_saved)


def _best(
    validated: list[tuple[Candidate, PointResult]], target: Target
) -> tuple[Candidate, PointResult] | None:
    """The validated point with the largest measured saving that met the target."""
    ok = [(c, p) for c, p in validated if target.met(*_measured(p))]
    return max(ok, key=lambda cp: cp[1].kv_saved["measured"] or 0.0, default=None)
