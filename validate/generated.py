"""Engines stepped in turn (:func:`run_each`) or in one pass (:func:`run_in_one_pass`), and
the answers ``memshare validate`` generates under each policy (docs/validate.md).

*Generated answers* (traces captured with ``--dataset``): the paged engine generates every
prompt greedily, up to the trace's own cap (``manifest.capture.generation.max_new_tokens``),
stopping on EOS as capture did, under each run's policy and once unshared (``none``, shared by
all runs). Per policy: answer agreement with the unshared run, accuracy against the gold answer
(``meta.answer``) of both, and token agreement up to the first divergence. Answers are not
timed, so every run's step goes in one forward pass (:func:`run_in_one_pass`).

The throughput runs at a KV budget (:mod:`~memshare.validate.budget`) are timed: their engines
are stepped in turn, one step each (each engine's clock counts its own steps only), so a
machine whose load changes during the runs slows every policy alike.

Invariants: the unshared engine runs once per part and is also the measured run of a ``none``
policy; no function here writes anything but the engine folders :func:`write_engine` is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from memshare.errors import InputError
from memshare.kv_manager import blocks_for_all
from memshare.sim.config import SimConfig
from memshare.sim.cost_model import BatchShape, plan_shape
from memshare.sim.run import LoadedTrace
from memshare.traces.schema import RequestRecord
from memshare.validate.answers import Kind, answers_equal, detect_kind, extract_answer, gold_answer
from memshare.validate.engine.generate import run_metrics, write_run
from memshare.validate.engine.group import grouped_engines, step_groups
from memshare.validate.engine.live_blocks import TokenStarts
from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine
from memshare.validate.engine.records import PagedRunResult
from memshare.validate.engine.store import PageStore
from memshare.validate.engine.twin import twin
from memshare.validate.fidelity import binomial_interval
from memshare.validate.measure import Progress, policy_of

Decode = Callable[[Sequence[int]], str]


@dataclass
class GenRun:
    """One engine's run, with what the reports need besides its result."""

    engine: PagedEngine
    first_share_pos: dict[str, int] = field(default_factory=dict)  # request -> position
    shapes: list[BatchShape] = field(default_factory=list)  # per step, for the cost fit
    _shared: set[str] = field(default_factory=set)  # requests with a share applied

    def step(self) -> bool:
        """One engine step (:meth:`stepped` notes it). False when every request has
        finished."""
        seen = len(self.engine.shares)
        if not self.engine.step():
            return False
        self.stepped(seen)
        return True

    def stepped(self, seen: int) -> None:
        """After a step of the engine (``seen``: its shares before the step): notes each
        request's first position computed after a share of it was applied (shares apply at
        step ends, so from the next step on) and the step's batch shape."""
        eng = self.engine
        plan = eng.last_plan
        assert plan is not None
        for c in plan.chunks:
            if c.req.rid in self._shared:
                self.first_share_pos.setdefault(c.req.rid, c.start)
        self._shared.update(s.request for s in eng.shares[seen:])
        self.shapes.append(plan_shape(plan))


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
    store: PageStore | None = None,
) -> PagedEngine:
    """A paged engine for ``cfg``'s policy (``None``: the unshared ``none``): on a copy of
    ``model`` with its own pages, or on ``model`` itself over ``store`` (a part of an
    :class:`~memshare.validate.engine.group.EngineGroup`'s arena)."""
    sk = trace.manifest.sketch
    if sk is not None:
        opts = replace(opts, sketch_dim=sk.dim, sketch_seed=sk.seed)
    own = twin(model) if store is None else model
    return PagedEngine(
        own, policy_of(cfg), specs, opts, eos_ids=eos_ids, token_starts=token_starts, store=store
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
    _drive(engines, lambda active: [g for g in active if g.step()], what, progress)
    return base, runs


def run_in_one_pass(
    model: Any,
    make: Callable[[SimConfig | None, PageStore], PagedEngine],
    configs: Sequence[SimConfig],
    num_blocks: int,
    block_size: int,
    what: str,
    progress: Progress | None,
) -> tuple[GenRun, list[GenRun]]:
    """As :func:`run_each`, but every engine's step in one forward pass over one arena per
    KV layer map (:func:`~memshare.validate.engine.group.grouped_engines`): one model, no
    copy per run, and the weights read once a step for all runs; no run is timed alone."""
    cfgs: list[SimConfig | None] = [None, *(c for c in configs if not _is_base(c))]
    built, groups = grouped_engines(
        model,
        [policy_of(c) for c in cfgs],
        num_blocks,
        block_size,
        lambda j, store: make(cfgs[j], store),
    )
    engines = [GenRun(e) for e in built]
    own = iter(engines[1:])
    runs = [engines[0] if _is_base(c) else next(own) for c in configs]

    def step(active: list[GenRun]) -> list[GenRun]:
        seen = [len(g.engine.shares) for g in engines]
        flags = step_groups(groups, len(engines))
        for g, n, flag in zip(engines, seen, flags, strict=True):
            if flag:
                g.stepped(n)
        return [g for g, flag in zip(engines, flags, strict=True) if flag]

    _drive(engines, step, what, progress)
    for group, _ in groups:
        group.close()
    return engines[0], runs


def _drive(
    engines: Sequence[GenRun],
    step: Callable[[list[GenRun]], list[GenRun]],
    what: str,
    progress: Progress | None,
) -> None:
    """Step until no engine is active (``step`` takes the active runs and returns those
    that stepped), reporting generated tokens."""
    total = sum(r.max_tokens for g in engines for r in g.engine.requests)
    active = list(engines)
    while active:
        active = step(active)
        if progress is not None:
            done = sum(r.num_output for g in engines for r in g.engine.requests)
            progress(what, min(done, total), total)


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
    at once: the budget does not touch the answers), every run's step in one forward pass
    (:func:`run_in_one_pass`: answers are not timed)."""
    max_new = generation_cap(trace)
    specs = answer_specs(records, max_new, context)
    num_blocks = blocks_for_all((len(s.prompt_ids) + s.max_tokens for s in specs), block_size)

    def make(cfg: SimConfig | None, store: PageStore) -> PagedEngine:
        sched = (cfg or configs[0]).scheduler
        opts = EngineOptions(
            block_size=block_size, kv_blocks=num_blocks, scheduler=sched, stop_on_eos=True
        )
        return make_engine(
            model, cfg, specs, trace, opts, eos_ids=eos_ids, token_starts=token_starts, store=store
        )

    return run_in_one_pass(
        model, make, configs, num_blocks, block_size, "generating answers", progress
    )


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
    agrees = [a.agrees for a in per.values()]
    return {
        "answer_agreement": _mean(agrees),
        "answer_agreement_ci95": binomial_interval(sum(agrees), len(agrees)),
        "accuracy": {"base": _accuracy(base), "shared": _accuracy(per)},
        "accuracy_ci95": {"base": _accuracy_ci(base), "shared": _accuracy_ci(per)},
        "token_agreement": {
            "mean_fraction": _mean(a.token_fraction for a in per.values()),
            "first_divergence_mean": float(np.mean(diverged)) if diverged else None,
            "requests_diverged": len(diverged),
            "requests": len(per),
        },
    }


def _accuracy_ci(per: dict[str, RequestAnswer]) -> list[float] | None:
    """The exact binomial 95% interval of the accuracy over the graded problems."""
    graded = [a.correct for a in per.values() if a.correct is not None]
    return binomial_interval(sum(graded), len(graded))


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
