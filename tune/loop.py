"""``memshare tune``: calibrate the fidelity model, search the predicted frontier, validate
frontier points on held-out texts, refit, until the best measured point meets the target
within the budget of validate runs (docs/tune.md).

Invariants: every validate run is a fan-out job kept in the job store as soon as it finished,
so ``--resume`` after an interruption repeats none (and the loop, being deterministic, makes
the same choices again); the output folder is written whole at the end, never half.
"""

from __future__ import annotations

import itertools
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
from memshare.tune.answers import answers_simulator, check_generated, measure_answer_points
from memshare.tune.knob import KNOBS, bisect, knob_of, predicted
from memshare.tune.points import MeasureFn, PointInputs, PointResult, point_job, short
from memshare.tune.report import read_compared, write_outputs
from memshare.tune.result import TuneOptions, TuneResult
from memshare.tune.search import (
    Candidate,
    Simulate,
    base_pages,
    candidates,
    layer_table,
    pareto,
    simulator,
)
from memshare.tune.target import Target, split
from memshare.validate.measure import Progress, Workload, texts_workload

Stage = Callable[[str], None]
TUNE_OUTPUT = OutputKind("tune", "tune.json")
CALIBRATION_TAUS = (0.4, 0.5)  # one tau for every layer: near the frontier's >= 90% end
GROUP_TAU = 0.7  # each third of the layers alone at this tau: tells layers apart


def _check(opts: TuneOptions, trace: LoadedTrace) -> None:
    cfg, target = opts.config, opts.target
    if target.generated:
        check_generated(trace)
    if cfg.policy == "kvshare" and not target.generated:
        raise InputError(
            "--policy kvshare",
            "it copies matched prompt KV instead of computing it, so a teacher-forced text "
            "has no logits at the reused positions to compare",
            "tune it on generated answers: --target answers=0.95 on a capture --dataset trace",
        )
    if cfg.policy in KNOBS or (cfg.policy == "cf-topk" and target.generated):
        knob_of(cfg, target)
    elif cfg.policy != "cf-topk":
        raise InputError(
            "--policy",
            f"tune searches cf-topk's per-layer thresholds and {', '.join(KNOBS)}'s "
            f"{', '.join(k.param for k in KNOBS.values())}; {cfg.policy} is not searched yet",
            "use --policy cf-topk (validate measures other policies' settings)",
        )
    elif cfg.policy_params.get("granularity") != "layer":
        raise InputError(
            "--set granularity", "tune searches thresholds per layer", "add --set granularity=layer"
        )
    if cfg.policy == "cf-topk" and not trace.has_sketches:
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
    compared = [read_compared(p, held, opts.target) for p in opts.compare]
    claim_output(output, "-o", TUNE_OUTPUT, overwrite=overwrite)
    bs = resolve(opts.config, trace).block_size
    inputs = PointInputs(opts.spec, trace, bs, opts.gpu)
    store = fan.store(output)
    executor = fan.executor()
    if isinstance(executor, LocalExecutor):
        executor.host.report = progress

    generated = measure_answer_points if opts.target.generated else None
    measure = _measurer(executor, inputs, store, trace, jobs_progress, generated)
    wl = texts_workload(trace, [r for r in trace.records if r.id in set(held)], bs)
    one_knob = generated is not None or opts.config.policy in KNOBS
    try:
        if generated is not None:
            sim = answers_simulator(trace, held, bs, opts.gpu)
            found = _knob(opts, held, sim, measure, stage)
        elif one_knob:
            found = _knob(opts, held, simulator(wl, opts.gpu, None), measure, stage)
        else:
            settings = calibration_settings(opts.config, _depth(trace))
            names = "; ".join(short(c.policy_params) for c in settings)
            stage(f"calibrating on {len(cal)} texts: {names}")
            found = _rounds(opts, wl, measure(settings, cal, None), measure, stage)
    finally:
        executor.close()
    calibration, validated, single, front, model = found
    split_ = {"calibration": cal, "held_out": held}
    best = _best(validated, opts.target, front if one_knob else None)
    result = TuneResult(calibration, validated, single, front, best, model, split_, compared)
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
    generated: MeasureFn | None,
) -> Measure:
    """Settings measured on texts as one fan-out job (kept in ``store`` once finished):
    teacher-forced, or by ``generated`` (answers)."""

    def measure(
        cfgs: list[SimConfig], texts: list[str], model: FidelityModel | None
    ) -> list[PointResult]:
        job = point_job(cfgs, texts, model, trace.identity(), generated)
        outcomes = fan_out([job], executor, shared=inputs, store=store, progress=jobs_progress)
        raise_failures(outcomes, "--resume")
        return list(outcomes[0].value)

    return measure


Found = tuple[
    list[PointResult],  # calibration runs
    list[tuple[Candidate, PointResult]],  # validated points
    list[Candidate],  # one-tau settings predicted (cf-topk)
    list[Candidate],  # the predicted frontier of the last search
    FidelityModel | None,  # the last fit (None: a knob policy's search fits none)
]


def _knob(
    opts: TuneOptions, texts: list[str], sim: Simulate, measure: Measure, stage: Stage
) -> Found:
    """A one-knob search (tune/knob.py): every value simulated, a bisection measured."""
    cfg = opts.config
    knob = knob_of(cfg, opts.target)
    stage(f"simulating every {knob.param} of {cfg.policy} on {len(texts)} texts")
    cands = predicted(sim, cfg, knob)
    validated = bisect(
        cands, cfg, opts.target, opts.budget, lambda c: measure([c], texts, None)[0], stage
    )
    return [], validated, [], cands, None


def _rounds(
    opts: TuneOptions,
    wl: Workload,
    calibration: list[PointResult],
    measure: Measure,
    stage: Stage,
) -> Found:
    """Fit, search, validate, refit, at most ``opts.budget`` times."""
    rows = [r for p in calibration for r in p.fit]
    layers = _depth(wl.trace)
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
        found = candidates(sim, opts.config, table, base)
        single, front = table.uniform, pareto(found)
        pick = _choose(found, validated, opts.target, tried)
        if pick is None:
            break
        tried.add(repr(sorted(pick.params.items())))
        stage(f"round {n}: validating {short(pick.params)} on {len(wl.texts)} texts")
        (point,) = measure([opts.config.with_(policy_params=pick.params)], list(wl.texts), model)
        validated.append((pick, point))
        model = fit(rows + [r for _, p in validated for r in p.fit], layers)
    return calibration, validated, single, front, model


def _depth(trace: LoadedTrace) -> int:
    model = trace.manifest.model
    return model.num_layers if model else 0


def calibration_settings(cfg: SimConfig, layers: int) -> list[SimConfig]:
    """The calibration runs: every layer at each of :data:`CALIBRATION_TAUS`, then each third
    of the layers alone at :data:`GROUP_TAU` (the others unshared). Uniform runs alone leave
    the layers' features collinear (they share at the same positions); a run that shares
    one group only shows that group's cost by itself."""
    params = {k: v for k, v in cfg.policy_params.items() if k not in ("tau", "tau_layers")}
    out = [cfg.with_(policy_params={**params, "tau": t}) for t in CALIBRATION_TAUS]
    bounds = sorted({round(layers * i / 3) for i in range(4)})
    for lo, hi in itertools.pairwise(bounds):
        table = f"*:off,{lo}-{hi - 1}:{GROUP_TAU}"
        out.append(cfg.with_(policy_params={**params, "tau": GROUP_TAU, "tau_layers": table}))
    return out


def _choose(
    found: list[Candidate],
    validated: list[tuple[Candidate, PointResult]],
    target: Target,
    tried: set[str],
) -> Candidate | None:
    """The next point to validate: on the Pareto frontier of the settings strictly between
    the largest measured saving that met the target and the smallest that missed it (a
    frontier of its own: a point beyond the bounds, predicted better, must not hide them),
    the largest predicted to meet it, else the most faithful one there."""
    lo = max((c.kv_saved for c, p in validated if target.met(p.measured)), default=-1.0)
    hi = min((c.kv_saved for c, p in validated if not target.met(p.measured)), default=2.0)
    open_ = pareto(
        [c for c in found if lo < c.kv_saved < hi and repr(sorted(c.params.items())) not in tried]
    )
    if not open_:
        return None
    meeting = [c for c in open_ if target.predicted_met(c)]
    if meeting:
        return max(meeting, key=lambda c: c.kv_saved)
    return min(open_, key=lambda c: c.kv_saved)


def _best(
    validated: list[tuple[Candidate, PointResult]],
    target: Target,
    knob: list[Candidate] | None,
) -> tuple[Candidate, PointResult] | None:
    """The validated point that met the target with the largest measured saving, or, for a
    one-knob search (``knob``: its values in order), the one furthest along the knob (e.g.
    kvshare's least recompute: its settings all save about the same memory)."""
    ok = [(c, p) for c, p in validated if target.met(p.measured)]
    if knob is None:
        return max(ok, key=lambda cp: cp[1].kv_saved["measured"] or 0.0, default=None)
    order = {repr(sorted(c.params.items())): i for i, c in enumerate(knob)}
    return max(ok, key=lambda cp: order[repr(sorted(cp[0].params.items()))], default=None)
