"""The parts of ``memshare validate`` that generate (docs/validate.md): answers generated under
each policy, and throughput at a fixed KV budget.

*Generated answers* (traces captured with ``--dataset``): the paged engine generates every
prompt greedily, up to the trace's own cap (``manifest.capture.generation.max_new_tokens``),
stopping on EOS as capture did, under each run's policy and once unshared (``none``, shared by
all runs). Per policy: answer agreement with the unshared run, accuracy against the gold answer
(``meta.answer``) of both, and token agreement up to the first divergence.

*Throughput at a fixed KV budget* (every KV trace): the same requests, all at 0 s, run as
generation with the trace's output tokens forced, so every executor serves the same lengths,
under a budget of ``fraction`` x the blocks every request needs at once (at least the largest
request and its spare block), at which ``none`` must queue or preempt. The engine runs ``none``
and each policy; the simulator predicts each on exactly that workload and budget (the run's
scheduler limits, the ``--gpu`` preset). Measured: output tokens / engine clock, TTFT and TPOT
from the engine's per-request clocks, preemptions; each beside its prediction.

The engines of a part are stepped in turn, one step each (each engine's clock counts its own
steps only), so a machine whose load changes during the runs slows every policy alike.

Invariants: the unshared engine runs once per part and is also the measured run of a ``none``
policy; the engine and the simulator get the same records, block size, budget and limits, so a
lossless policy's steps at the budget are the simulator's (``steps_identical``); no function
here writes anything but the engine folders :func:`write_engine` is given.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from memshare.errors import InputError
from memshare.kv_manager import blocks_for_all, cdiv
from memshare.registry import make_policy
from memshare.scheduler import SchedulerConfig
from memshare.sim.config import ArrivalSpec, SimConfig
from memshare.sim.cost_model import BatchShape, plan_shape
from memshare.sim.run import LoadedTrace, RunOutput, resolve
from memshare.traces.schema import RequestRecord
from memshare.validate.answers import Kind, answers_equal, detect_kind, extract_answer, gold_answer
from memshare.validate.engine.generate import write_run
from memshare.validate.engine.live_blocks import TokenStarts
from memshare.validate.engine.paged_engine import (
    EngineOptions,
    EngineResult,
    EngineSpec,
    PagedEngine,
)
from memshare.validate.measure import first_differing_step, simulate_on
from memshare.validate.runs import RunDir

Progress = Callable[[str, int, int], None]  # what, done, total
Decode = Callable[[Sequence[int]], str]

DEFAULT_KV_FRACTION = 0.5


@dataclass
class GenRun:
    """One engine's run, with what the reports need besides its result."""

    engine: PagedEngine
    first_share_pos: dict[str, int] = field(default_factory=dict)  # request -> position
    shapes: list[BatchShape] = field(default_factory=list)  # per step, for the cost fit
    _shared: set[str] = field(default_factory=set)  # requests with a share applied

    def step(self) -> bool:
        """One engine step; notes each request's first position computed after a share of
        it was applied (shares apply at step ends, so from the next step on). False when
        every request has finished."""
        eng = self.engine
        seen = len(eng.shares)
        if not eng.step():
            return False
        plan = eng.last_plan
        assert plan is not None
        for c in plan.chunks:
            if c.req.rid in self._shared:
                self.first_share_pos.setdefault(c.req.rid, c.start)
        self._shared.update(s.request for s in eng.shares[seen:])
        self.shapes.append(plan_shape(plan))
        return True


def is_generated(trace: LoadedTrace) -> bool:
    """Whether the trace's outputs were generated from prompts (``capture --dataset``)."""
    return trace.manifest.capture.get("mode") == "generate"


def _engine(
    model: Any,
    cfg: SimConfig | None,
    specs: Sequence[EngineSpec],
    trace: LoadedTrace,
    opts: EngineOptions,
    *,
    eos_ids: frozenset[int] = frozenset(),
    token_starts: TokenStarts | None = None,
) -> PagedEngine:
    """A paged engine for ``cfg``'s policy (``None``: the unshared ``none``)."""
    policy = make_policy("none") if cfg is None else make_policy(cfg.policy, **cfg.policy_params)
    sk = trace.manifest.sketch
    if sk is not None:
        opts = replace(opts, sketch_dim=sk.dim, sketch_seed=sk.seed)
    return PagedEngine(
        copy.deepcopy(model), policy, specs, opts, eos_ids=eos_ids, token_starts=token_starts
    )


def _is_base(cfg: SimConfig) -> bool:
    return cfg.policy == "none" and not cfg.policy_params


def run_each(
    make: Callable[[SimConfig | None], PagedEngine],
    configs: Sequence[SimConfig],
    what: str,
    progress: Progress | None,
) -> tuple[GenRun, list[GenRun]]:
    """The unshared engine and one per config (a ``none`` config's run is the base run),
    stepped in turn, one step each, so a machine whose load changes over time slows them
    alike; each engine's clock counts its own steps only."""
    base = GenRun(make(None))
    runs = [base if _is_base(c) else GenRun(make(c)) for c in configs]
    engines = [base, *(g for g in runs if g is not base)]
    total = sum(r.max_tokens for g in engines for r in g.engine.requests)
    active = list(engines)
    while active:
        active = [g for g in active if g.step()]
        if progress is not None:
            done = sum(r.num_output for g in engines for r in g.engine.requests)
            progress(what, min(done, total), total)
    return base, runs


# --------------------------------------------------------------------- generated answers
@dataclass(frozen=True)
class Gold:
    """A request's answer kind and gold answer (``None`` when its row gave none)."""

    kind: Kind
    answer: str | None


def gold_of(rec: RequestRecord) -> Gold:
    """The gold answer of a captured dataset row (``meta.answer``), and its kind."""
    ans = (rec.meta or {}).get("answer")
    if ans is None or isinstance(ans, bool):
        return Gold("math500", None)
    row = {"problem": "", "answer": str(ans)}
    try:
        kind = detect_kind(row)
        return Gold(kind, gold_answer(row, kind))
    except ValueError:
        return Gold("math500", None)


def answer_specs(records: Sequence[RequestRecord], max_new: int, context: int) -> list[EngineSpec]:
    """Each record's prompt, to generate up to ``max_new`` tokens (within the context)."""
    specs = []
    for rec in records:
        prompt = list(rec.prompt_ids or [])
        if not prompt:
            raise InputError(rec.id, "has no prompt tokens to generate from", "capture again")
        specs.append(EngineSpec(rec.id, prompt, max(1, min(max_new, context - len(prompt)))))
    return specs


def generation_cap(trace: LoadedTrace) -> int:
    """The trace's output cap: ``manifest.capture.generation.max_new_tokens``."""
    gen = trace.manifest.capture.get("generation") or {}
    cap = gen.get("max_new_tokens") if isinstance(gen, dict) else None
    if isinstance(cap, int) and cap >= 1:
        return cap
    return max(max((r.output_len for r in trace.records), default=1), 1)


def generate_answers(
    model: Any,
    configs: Sequence[SimConfig],
    trace: LoadedTrace,
    records: Sequence[RequestRecord],
    block_size: int,
    *,
    context: int,
    eos_ids: frozenset[int],
    token_starts: TokenStarts | None,
    progress: Progress | None = None,
) -> tuple[GenRun, list[GenRun]]:
    """Greedy generation of every prompt, unshared and under each config (every request fits
    at once: the budget does not touch the answers)."""
    max_new = generation_cap(trace)
    specs = answer_specs(records, max_new, context)

    def make(cfg: SimConfig | None) -> PagedEngine:
        sched = (cfg or configs[0]).scheduler
        opts = EngineOptions(block_size=block_size, scheduler=sched, stop_on_eos=True)
        return _engine(model, cfg, specs, trace, opts, eos_ids=eos_ids, token_starts=token_starts)

    return run_each(make, configs, "generating answers", progress)


@dataclass(frozen=True)
class RequestAnswer:
    """One request's generated answer, against the gold one and the unshared run's."""

    answer: str | None
    correct: bool | None  # None: no gold answer
    agrees: bool  # same extracted answer as the unshared run (both none counts)
    first_divergence: int | None  # first output token that differs from the unshared run's
    token_fraction: float  # tokens equal before the first divergence / the longer output


def compare_answers(
    run: EngineResult, base: EngineResult, golds: dict[str, Gold], decode: Decode
) -> dict[str, RequestAnswer]:
    """Per request: its answer and how it compares (see :class:`RequestAnswer`)."""
    base_ids = {q.rid: q.output_ids for q in base.requests}
    out: dict[str, RequestAnswer] = {}
    for q in run.requests:
        g = golds[q.rid]
        mine, theirs = q.output_ids, base_ids[q.rid]
        ans = extract_answer(decode(mine), g.kind)
        base_ans = extract_answer(decode(theirs), g.kind)
        same = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
        if same is None and len(mine) != len(theirs):
            same = min(len(mine), len(theirs))
        longest = max(len(mine), len(theirs), 1)
        out[q.rid] = RequestAnswer(
            ans,
            None if g.answer is None else answers_equal(ans, g.answer, g.kind),
            (ans is None and base_ans is None) or answers_equal(ans, base_ans, g.kind),
            same,
            1.0 if same is None else same / longest,
        )
    return out


def answer_report(per: dict[str, RequestAnswer], base: dict[str, RequestAnswer]) -> dict[str, Any]:
    """A policy's ``answer_agreement``, ``accuracy`` {"base", "shared"} and
    ``token_agreement`` (``validation.json``)."""
    diverged = [a.first_divergence for a in per.values() if a.first_divergence is not None]
    return {
        "answer_agreement": _mean(a.agrees for a in per.values()),
        "accuracy": {"base": _accuracy(base), "shared": _accuracy(per)},
        "token_agreement": {
            "mean_fraction": _mean(a.token_fraction for a in per.values()),
            "first_divergence_mean": float(np.mean(diverged)) if diverged else None,
            "requests_diverged": len(diverged),
            "requests": len(per),
        },
    }


def _accuracy(per: dict[str, RequestAnswer]) -> float | None:
    graded = [a.correct for a in per.values() if a.correct is not None]
    return _mean(graded) if graded else None


def _mean(values: Any) -> float | None:
    a = [float(v) for v in values]
    return float(np.mean(a)) if a else None


def answer_rows(per: dict[str, RequestAnswer], golds: dict[str, Gold]) -> dict[str, dict[str, Any]]:
    """``outputs.jsonl`` fields of each request's answer."""
    return {
        rid: {
            "answer": a.answer,
            "gold_answer": golds[rid].answer,
            "correct": a.correct,
            "agrees_with_none": a.agrees,
            "first_divergence": a.first_divergence,
        }
        for rid, a in per.items()
    }


# --------------------------------------------------------------------- throughput at a budget
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
        return _engine(model, cfg, bw.specs, bw.trace, opts)

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
        "ttft_p50": _pct(ttft, 50),
        "ttft_p90": _pct(ttft, 90),
        "tpot_p50": _pct(tpot, 50),
        "tpot_p90": _pct(tpot, 90),
    }


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def pme(pred: float | None, meas: float | None) -> dict[str, Any]:
    """``{"predicted", "measured", "error_pct"}``: the prediction's error relative to the
    measurement, in percent (``None`` where either is missing)."""
    err = None
    if pred is not None and meas:
        err = 100.0 * (pred - meas) / meas
    return {"predicted": pred, "measured": meas, "error_pct": err}


# --------------------------------------------------------------------- files
def write_engine(
    folder: Path,
    policy: str,
    result: EngineResult,
    decode: Decode,
    metrics: dict[str, Any],
    extra: dict[str, dict[str, Any]],
) -> None:
    """The engine's files (:func:`~memshare.validate.engine.generate.write_run`), with each
    ``outputs.jsonl`` line extended by ``extra[request]`` (answer, first-share position)."""
    write_run(folder, policy, result, decode, metrics)
    path = folder / "outputs.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    text = "".join(json.dumps(row | extra.get(row["request"], {})) + "\n" for row in lines)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
