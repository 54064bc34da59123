"""``tune --target answers=A``: points measured on generated answers (a trace captured with
``--dataset``), for policies whose fidelity the model does not predict and for ``kvshare``,
whose reused prompt positions have no logits to compare in a teacher-forced text.

A point generates every held-out prompt greedily under the setting and once unshared, all in
one forward pass a step (validate's :func:`~memshare.validate.generated.generate_answers`),
and reports answer agreement and accuracy with their exact binomial intervals, the KV saved
(mean pages in use against the unshared run's, measured and simulated on the same requests)
and the prompt tokens served from cache: prefix hits, KVShare's matched tokens and the ones
actually copied (prefill compute saved).

Invariants: a point's figures depend on its setting, its prompts and the trace alone (its
own unshared run), so one measured in-process, on Ray or read back by ``--resume`` is the
same; the simulated KV saved is on exactly the requests generated (captured outputs, all at
0 s, every request fitting at once).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memshare.errors import InputError
from memshare.fanout.host import Host
from memshare.kv_manager import ManagerStats, blocks_for_all
from memshare.sim.config import SimConfig
from memshare.sim.fidelity_model import FidelityModel
from memshare.sim.run import LoadedTrace
from memshare.tune.points import PointInputs, PointResult, loaded_model, point_of
from memshare.tune.search import Simulate
from memshare.validate.generated import (
    AnswerComparer,
    generate_answers,
    generation_cap,
    is_generated,
)
from memshare.validate.jobs import pages_report
from memshare.validate.measure import simulate_on


def check_generated(trace: LoadedTrace) -> None:
    """``--target answers=`` needs a trace of generated answers (InputError otherwise)."""
    if not is_generated(trace):
        raise InputError(
            "--target answers=",
            f"{trace.path} holds teacher-forced texts, not answers generated from prompts",
            "capture one with --dataset (e.g. GSM8K), or use --target top1=0.99",
        )


def generation_trace(trace: LoadedTrace, texts: list[str]) -> LoadedTrace:
    """``texts``' records as generated (captured outputs), every one arriving at 0 s."""
    wanted = set(texts)
    records = [replace(r, arrival_s=0.0) for r in trace.records if r.id in wanted]
    return LoadedTrace(trace.path, trace.manifest, records, trace.kv_rows)


def _num_blocks(trace: LoadedTrace, block_size: int) -> int:
    """Every request at once, at the trace's generation cap (as the engines run)."""
    cap = generation_cap(trace)
    return blocks_for_all((len(r.prompt_ids or []) + cap for r in trace.records), block_size)


def answers_simulator(trace: LoadedTrace, texts: list[str], block_size: int, gpu: str) -> Simulate:
    """The simulator on the generated requests of ``texts`` (module docstring)."""
    tr = generation_trace(trace, texts)
    blocks = _num_blocks(tr, block_size)
    return lambda cfg: simulate_on(cfg, tr, blocks, block_size, gpu)


CACHE_KEYS = ("prompt_tokens", "prefix_hit_rate", "kv_hit_rate", "reused_share")


def cache_figures(stats: ManagerStats) -> dict[str, Any]:
    """Prompt tokens served from cache, as shares of the prompt tokens admitted."""
    n = max(1, stats.prompt_tokens)
    return {
        "prompt_tokens": stats.prompt_tokens,
        "prefix_hit_rate": stats.hit_tokens / n,
        "kv_hit_rate": stats.matched_tokens / n,  # KVShare's hit: matched anywhere
        "reused_share": (stats.hit_tokens + stats.reused_tokens) / n,  # not computed
    }


def measure_answer_points(
    host: Host,
    inputs: PointInputs,
    cfgs: list[SimConfig],
    texts: list[str],
    model: FidelityModel | None,
) -> list[PointResult]:
    """Generate ``texts``' answers under each of ``cfgs`` beside one unshared run (a job's
    function; ``model`` is unused: answers are not predicted)."""
    backend = loaded_model(host, inputs.spec)
    tr = generation_trace(inputs.trace, texts)
    bs = inputs.block_size
    base, gens = generate_answers(
        backend.model,
        cfgs,
        tr,
        tr.records,
        bs,
        context=backend.context_limit,
        eos_ids=backend.eos_ids,
        token_starts=backend.token_starts,
        progress=host.report,
    )
    answered = AnswerComparer(base, tr.records, lambda ids: backend.decode(ids, skip_special=True))
    sim = answers_simulator(inputs.trace, texts, bs, inputs.gpu)
    base_pred = sim(cfgs[0].with_(policy="none", policy_params={}))
    out = []
    for cfg, g in zip(cfgs, gens, strict=True):
        pages = pages_report(sim(cfg), base_pred, g.engine, base.engine)
        report, _ = answered.of(g)
        out.append(point_of(cfg, texts, pages, report | cache_figures(g.engine.manager.stats)))
    return out
