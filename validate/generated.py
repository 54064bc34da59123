"""Engines stepped in turn (:func:`run_each`), and the answers ``memshare validate`` generates
under each policy (docs/validate.md).

*Generated answers* (traces captured with ``--dataset``): the paged engine generates every
prompt greedily, up to the trace's own cap (``manifest.capture.generation.max_new_tokens``),
stopping on EOS as capture did, under each run's policy and once unshared (``none``, shared by
all runs). Per policy: answer agreement with the unshared run, accuracy against the gold answer
(``meta.answer``) of both, and token agreement up to the first divergence. The throughput runs
at a KV budget (:mod:`~memshare.validate.budget`) step their engines the same way.

The engines of a part are stepped in turn, one step each (each engine's clock counts its own
steps only), so a machine whose load changes during the runs slows every policy alike.

Invariants: the unshared engine runs once per part and is also the measured run of a ``none``
policy; no function here writes anything but the engine folders :func:`write_engine` is given.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from memshare.errors import InputError
from memshare.registry import make_policy
from memshare.sim.config import SimConfig
from memshare.sim.cost_model import BatchShape, plan_shape
from memshare.sim.run import LoadedTrace
from memshare.traces.schema import RequestRecord
from memshare.validate.answers import Kind, answers_equal, detect_kind, extract_answer, gold_answer
from memshare.validate.engine.generate import run_metrics, write_run
from memshare.validate.engine.live_blocks import TokenStarts
from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine
from memshare.validate.engine.records import PagedRunResult
from memshare.validate.measure import Progress

Decode = Callable[[Sequence[int]], str]


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


def make_engine(
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
        return make_engine(
            model, cfg, specs, trace, opts, eos_ids=eos_ids, token_starts=token_starts
        )

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
    run: PagedRunResult, base: PagedRunResult, golds: dict[str, Gold], decode: Decode
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


class AnswerComparer:
    """The unshared run's generated answers, against which each policy's are compared."""

    def __init__(self, base: GenRun, records: Sequence[RequestRecord], decode: Decode) -> None:
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


class EngineWriter:
    """Writes an engine run's files under a run directory (answers in ``outputs.jsonl``)."""

    def __init__(self, backend: Any, device: str, dtype: str, block_size: int) -> None:
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.block_size = block_size

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.backend.decode(ids, skip_special=True))

    def write(
        self,
        folder: Path,
        cfg: SimConfig,
        result: PagedRunResult,
        extra: dict[str, dict[str, Any]],
    ) -> None:
        """``folder``'s engine files and ``metrics.json`` for a run of ``cfg``'s policy."""
        metrics = run_metrics(
            result,
            model=self.backend.source.name,
            policy=cfg.policy,
            params=dict(cfg.policy_params),
            device=self.device,
            dtype=self.dtype,
            block_size=self.block_size,
        )
        write_engine(folder, cfg.policy, result, self.backend.decode, metrics, extra)


def write_engine(
    folder: Path,
    policy: str,
    result: PagedRunResult,
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
