"""``memshare bench engine``: the paged engine against HF ``generate`` on the same prompts.

Figures (printed, never asserted by a timed test; docs/layout.md lists the targets):

- tokens/s at batch 1 (one prompt, greedy) and on a mixed batch (16 prompts whose output
  lengths differ), twice: all 16 at once (HF ``generate`` runs them left-padded until the
  longest is done; the engine retires each at its own length, but still needs as many steps as
  the longest), and at most ``concurrency`` sequences at a time (HF in static batches of that
  size, each until its longest; the engine refills a slot as soon as a request finishes: where
  continuous batching pays). Both count only the tokens each request asked for. Runs
  alternate, HF then the engine; ``engine_over_hf`` is the median over the repeats of each
  pair's ratio (a pair runs back to back, so a slow spell of a shared machine slows both),
  beside the ratio of the two medians. Both run on the same weights (the engine on its own
  copy: it switches its model's attention implementation).
- a decode step at batch 1 (the median of the engine's one-token steps) against the time to
  read the model's weights once at the memory bandwidth measured on the machine (a 256 MiB
  tensor summed, the median of 5): a decode step reads every weight once, so that is its floor.
- KV bytes: the page tensor's size against the pool's page count x page size (must be equal).
- peak process RSS.
- the policy's overhead inside the engine: the share of step time spent committing (sketching
  the blocks that filled, the policy's decisions, the frees), under ``cf-topk``.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from memshare.registry import make_policy
from memshare.scheduler import SchedulerConfig
from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine
from memshare.validate.engine.twin import twin

CF_TOPK: dict[str, Any] = {"granularity": "layer", "share": "k", "tau": 0.5, "window": 1}


def _prompts(backend: Any, n: int) -> list[list[int]]:
    path = files("memshare") / "data" / "gsm8k_prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [backend.chat_prompt(rows[i % len(rows)]["question"]) for i in range(n)]


def _hf(backend: Any, prompts: list[list[int]], lengths: list[int]) -> float:
    """Seconds for HF ``generate`` on ``prompts`` as one left-padded batch."""
    import torch

    width = max(len(p) for p in prompts)
    pad = backend.pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        backend.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(lengths),
            min_new_tokens=max(lengths),
            do_sample=False,
            pad_token_id=pad,
        )
    return time.perf_counter() - t


def _hf_batches(backend: Any, prompts: list[list[int]], lengths: list[int], size: int) -> float:
    """Seconds for HF ``generate`` over static batches of ``size`` prompts, in order: each
    batch runs until its longest request is done (what a static batcher does)."""
    return sum(
        _hf(backend, prompts[a : a + size], lengths[a : a + size])
        for a in range(0, len(prompts), size)
    )


def _engine(
    model: Any,
    prompts: list[list[int]],
    lengths: list[int],
    policy: str,
    max_seqs: int | None = None,
    **params: Any,
) -> tuple[float, PagedEngine]:
    pairs = zip(prompts, lengths, strict=True)
    specs = [EngineSpec(f"r{i}", p, n) for i, (p, n) in enumerate(pairs)]
    opts = EngineOptions(scheduler=SchedulerConfig(max_num_seqs=max_seqs or len(prompts)))
    engine = PagedEngine(model, make_policy(policy, **params), specs, opts)
    t = time.perf_counter()
    engine.run()
    return time.perf_counter() - t, engine


# a third executor on the same prompts: (prompts, lengths, seqs) -> (seconds, output ids)
Versus = Callable[[list[list[int]], list[int], int], tuple[float, list[list[int]]]]


@dataclass
class _Runs:
    """One configuration's seconds per repeat: HF ``generate``, the engine, and (``--vs``)
    the third executor; per request, whether the third's outputs equal the engine's in every
    repeat."""

    hf_s: list[float] = field(default_factory=list)
    engine_s: list[float] = field(default_factory=list)
    vs_s: list[float] = field(default_factory=list)
    vs_same: list[bool] = field(default_factory=list)


def _repeats(
    backend: Any,
    mine: Any,
    label: str,
    prompts: list[list[int]],
    lengths: list[int],
    seqs: int,
    repeats: int,
    status: Callable[[str], None] | None,
    versus: Versus | None,
) -> _Runs:
    """``repeats`` runs of each, back to back: HF ``generate``, the engine (on ``mine``),
    then ``versus``, at most ``seqs`` sequences at a time."""
    runs = _Runs()
    for r in range(repeats):
        if status:
            status(f"{label}: run {r + 1} of {repeats}")
        runs.hf_s.append(_hf_batches(backend, prompts, lengths, seqs))
        eng_s, eng = _engine(mine, prompts, lengths, "none", seqs)
        runs.engine_s.append(eng_s)
        if versus is not None:
            vs_s, outputs = versus(prompts, lengths, seqs)
            runs.vs_s.append(vs_s)
            same = [q.output_ids == o for q, o in zip(eng.requests, outputs, strict=True)]
            runs.vs_same = [a and b for a, b in zip(runs.vs_same or same, same, strict=True)]
    return runs


def _figures(runs: _Runs, tokens: int, seqs: int, vs_name: str) -> dict[str, Any]:
    """One configuration's figures from its runs (ratios: the median of each repeat's)."""
    hf_tps = tokens / statistics.median(runs.hf_s)
    eng_tps = tokens / statistics.median(runs.engine_s)
    pairs = [h / e for h, e in zip(runs.hf_s, runs.engine_s, strict=True)]
    out = {
        "tokens": tokens,
        "hf_tokens_per_s": round(hf_tps, 1),
        "engine_tokens_per_s": round(eng_tps, 1),
        "engine_over_hf": round(statistics.median(pairs), 3),
        "engine_over_hf_pairs": [round(x, 3) for x in pairs],
        "ratio_of_medians": round(eng_tps / hf_tps, 3),
        "concurrent_seqs": seqs,
        "hf_s": [round(x, 3) for x in runs.hf_s],
        "engine_s": [round(x, 3) for x in runs.engine_s],
    }
    if runs.vs_s:
        ratios = [v / e for v, e in zip(runs.vs_s, runs.engine_s, strict=True)]
        out |= {
            f"{vs_name}_tokens_per_s": round(tokens / statistics.median(runs.vs_s), 1),
            f"engine_over_{vs_name}": round(statistics.median(ratios), 3),
            f"engine_over_{vs_name}_pairs": [round(x, 3) for x in ratios],
            f"{vs_name}_s": [round(x, 3) for x in runs.vs_s],
            f"{vs_name}_same_tokens": f"{sum(runs.vs_same)} of {len(runs.vs_same)} requests",
        }
    return out


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second at which this machine sums a ``mib`` MiB float32 tensor (median of
    ``repeats``, after one warm-up): the rate at which a decode step can stream its weights."""
    import torch

    a = torch.ones(mib * (1 << 20) // 4)
    a.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * a.element_size() / statistics.median(times)


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters, a tensor shared by two modules (tied embeddings)
    counted once."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def _decode_floor(model: Any, prompt: list[int], tokens: int) -> dict[str, Any]:
    """``decode_step`` figures: the engine's median one-token step at batch 1 against the
    time to read the weights once at the measured bandwidth (the step's floor)."""
    _, eng = _engine(model, [prompt], [tokens], "none")
    steps = [s.wall_s for s in eng.steps if s.tokens == 1]
    step_ms = 1e3 * statistics.median(steps)
    nbytes = weight_bytes(model)
    bandwidth = read_bandwidth()
    floor_ms = 1e3 * nbytes / bandwidth
    return {
        "batch_1_ms": round(step_ms, 3),
        "steps": len(steps),
        "weight_bytes": nbytes,
        "read_gb_per_s": round(bandwidth / 1e9, 2),
        "weights_once_ms": round(floor_ms, 3),
        "over_weights_once": round(step_ms / floor_ms, 3),
        "target_over_weights_once": 2.0,
    }


def _kv_and_overhead(eng: PagedEngine) -> dict[str, Any]:
    """``kv`` (the page tensor against the pool's pages) and ``cf_topk`` (the policy's share
    of step time) of the ``cf-topk`` engine's run."""
    step_s = sum(s.wall_s for s in eng.steps)
    commit_s = sum(s.commit_s for s in eng.steps)
    return {
        "kv": {
            "store_bytes": eng.store.nbytes,
            "pool_pages_x_page_bytes": eng.pool.num_pages * eng.store.page_bytes,
            "equal": eng.store.nbytes == eng.pool.num_pages * eng.store.page_bytes,
            "peak_pages_in_use": max(s.used_pages for s in eng.steps),
        },
        "cf_topk": {
            "params": CF_TOPK,
            "shares": len(eng.shares),
            "commit_share_of_step_time": round(commit_s / step_s, 4),
            "sketch_s": round(eng.sketch_s, 3),
            "step_s": round(step_s, 3),
        },
    }


def bench_engine(
    *,
    model: str | None = None,
    max_new_tokens: int = 64,
    batch: int = 16,
    concurrency: int = 4,
    repeats: int = 3,
    threads: int | None = None,
    status: Callable[[str], None] | None = None,
    versus: tuple[str, Callable[[Any, int, int], Versus]] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns its figures. ``versus``: a third executor's name and its
    factory, called with the loaded model, the largest batch and the longest request."""
    from memshare.traces.model.loader import load_model

    if status:
        status("loading the model")
    backend = load_model(model, threads=threads)
    mine = twin(backend.model)
    out: dict[str, Any] = {"repeats": repeats, "max_new_tokens": max_new_tokens}
    one = _prompts(backend, 1)
    mixed = _prompts(backend, batch)
    mixed_lengths = [max(8, max_new_tokens * (1 + i % 4) // 4) for i in range(batch)]
    third: Versus | None = None
    vs_name = ""
    if versus is not None:
        vs_name, factory = versus
        if status:
            status(f"starting {vs_name}")
        longest = max(len(p) for p in mixed + one) + max_new_tokens
        third = factory(backend, batch, longest)
    for label, prompts, lengths, seqs in (
        ("batch_1", one, [max_new_tokens], 1),
        (f"mixed_{batch}", mixed, mixed_lengths, batch),
        (f"mixed_{batch}_at_{concurrency}", mixed, mixed_lengths, concurrency),
    ):
        runs = _repeats(backend, mine, label, prompts, lengths, seqs, repeats, status, third)
        out[label] = _figures(runs, sum(lengths), seqs, vs_name)
    if status:
        status("a decode step against reading the weights once")
    out["decode_step"] = _decode_floor(mine, one[0], max_new_tokens)
    if status:
        status("cf-topk overhead")
    _, eng = _engine(mine, mixed, mixed_lengths, "cf-topk", **CF_TOPK)
    out |= _kv_and_overhead(eng)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out
