"""The simulator's metrics from one engine run (docs/simulator.md).

Latencies per request (simulated seconds): TTFT = first token - arrival; TPOT = (finish -
first token) / (output tokens - 1), for requests with more than one output token; end-to-end =
finish - arrival; queueing = first scheduled - arrival. Throughput divides by the makespan:
first arrival to the end of the last step. KV blocks in use are blocks held by running
requests (pages / pages per block, so a partly shared block counts partly); their mean is
time-weighted over the makespan (idle time counts as 0). Hit and share rates come from the
manager's counters, which count every admission (a preempted request's re-admission too, as
vLLM's prefix-cache metrics do) under ``prefix_cache.all_admissions``; the headline hit
rates count each request once, at its first admission (a recompute after preemption hitting
its own earlier blocks is no reuse of the workload's, and would make the rate rise as the
budget shrinks).

Invariant: the result is a pure function of the run (no wall-clock value), with floats rounded
to 9 significant digits, so equal runs give byte-identical ``metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from memshare.block_pool import PoolStats
from memshare.kv_manager import ManagerStats
from memshare.sim.config import ModelConfig
from memshare.sim.engine import EngineResult

PERCENTILES = (50, 90, 99)


def rnd(x: float | None) -> float | None:
    """``x`` to 9 significant digits (``None`` for NaN/None): stable JSON text."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.9g}")


def dist(values: Iterable[float]) -> dict[str, float | None]:
    """Mean and percentiles (``None`` where there is no value)."""
    a = np.fromiter(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"n": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}}
    pct = np.percentile(a, PERCENTILES)
    return {
        "n": int(a.size),
        "mean": rnd(float(a.mean())),
        **{f"p{p}": rnd(float(v)) for p, v in zip(PERCENTILES, pct, strict=True)},
    }


def _rate(num: float, den: float) -> float | None:
    return rnd(num / den) if den else None


def compute_metrics(
    res: EngineResult,
    manager: ManagerStats,
    pool: PoolStats,
    *,
    policy: str,
    model: ModelConfig,
    block_size: int,
    num_blocks: int,
) -> dict[str, Any]:
    """The ``metrics.json`` object of one run."""
    reqs = res.requests
    done = [r for r in reqs if not r.rejected]
    arrivals = [r.arrival for r in reqs if math.isfinite(r.arrival)]
    start = min(arrivals) if arrivals else 0.0
    makespan = res.sim_time_s - start
    out_tokens = sum(r.recorded_output_len for r in done)  # the trace's (0 stays 0)
    served_as_1 = sum(1 for r in done if r.recorded_output_len == 0)
    prompt_tokens = sum(r.prompt_len for r in done)
    tl = res.timeline
    ppb = res.pages_per_block
    live = np.asarray(tl.live_pages, dtype=np.float64) / ppb
    cached = np.asarray(tl.cached_pages, dtype=np.float64) / ppb
    dt = np.asarray(tl.dt_s, dtype=np.float64)
    bytes_per_block = model.kv_bytes_per_token * block_size
    busy = float(dt.sum())
    peak = float(live.max()) if live.size else 0.0
    mean = float((live * dt).sum() / makespan) if makespan > 0 else 0.0
    peak_total = float((live + cached).max()) if live.size else 0.0

    layers = manager.layer_pages_shared
    per_layer: list[float | None] = []
    if layers is not None and manager.full_blocks:
        per_layer = [rnd(float(v)) for v in layers.sum(axis=1) / (2 * manager.full_blocks)]
    hit_tokens = sum(r.hit_tokens for r in done)
    hit_blocks = sum(r.hit_blocks for r in done)
    prompt_blocks = sum(r.info.prompt_blocks for r in done)

    return {
        "policy": policy,
        "requests": {
            "total": len(reqs),
            "finished": len(done),
            "rejected": len(reqs) - len(done),
            "prompt_tokens": prompt_tokens,
            "output_tokens": out_tokens,
            # only when present, so every other run's metrics.json is unchanged
            **({"zero_output_served_as_1": served_as_1} if served_as_1 else {}),
        },
        "time": {
            "makespan_s": rnd(makespan),
            "busy_s": rnd(busy),
            "steps": res.steps,
            "mean_step_s": _rate(busy, res.steps),
        },
        "throughput": {
            "output_tokens_per_s": _rate(out_tokens, makespan),
            "total_tokens_per_s": _rate(out_tokens + prompt_tokens, makespan),
            "requests_per_s": _rate(len(done), makespan),
        },
        "latency_s": {
            "ttft": dist(r.first_token - r.arrival for r in done),
            "tpot": dist(
                (r.finish - r.first_token) / (r.output_len - 1) for r in done if r.output_len > 1
            ),
            "e2e": dist(r.finish - r.arrival for r in done),
            "queue": dist(r.first_scheduled - r.arrival for r in done),
        },
        "kv": {
            "block_size": block_size,
            "budget_blocks": num_blocks,
            "bytes_per_block": bytes_per_block,
            "budget_bytes": num_blocks * bytes_per_block,
            "peak_blocks_in_use": rnd(peak),
            "mean_blocks_in_use": rnd(mean),
            "peak_bytes_in_use": rnd(peak * bytes_per_block),
            "mean_bytes_in_use": rnd(mean * bytes_per_block),
            "peak_blocks_with_cache": rnd(peak_total),
            "allocated_blocks": pool.allocated_blocks,
            "evicted_blocks": pool.evicted_blocks,
        },
        "preemptions": res.preemptions,
        "prefix_cache": {
            "token_hit_rate": _rate(hit_tokens, prompt_tokens),
            "block_hit_rate": _rate(hit_blocks, prompt_blocks),
            "prompt_tokens": prompt_tokens,
            "hit_tokens": hit_tokens,
            "prompt_blocks": prompt_blocks,
            "hit_blocks": hit_blocks,
            "kv_match_rate": _rate(manager.matched_tokens, manager.prompt_tokens),
            "reused_tokens": manager.reused_tokens,
            "all_admissions": {
                "token_hit_rate": _rate(manager.hit_tokens, manager.prompt_tokens),
                "block_hit_rate": _rate(manager.hit_blocks, manager.prompt_blocks),
                "prompt_tokens": manager.prompt_tokens,
                "hit_tokens": manager.hit_tokens,
                "prompt_blocks": manager.prompt_blocks,
                "hit_blocks": manager.hit_blocks,
            },
        },
        "sharing": {
            "share_rate": _rate(manager.shared_blocks, manager.full_blocks),
            "page_share_rate": _rate(manager.pages_shared, manager.pages_written),
            "full_blocks": manager.full_blocks,
            "shared_blocks": manager.shared_blocks,
            "pages_written": manager.pages_written,
            "pages_shared": manager.pages_shared,
            "per_layer_shared_fraction": per_layer,
            "mean_shared_distance": _rate(manager.shared_distance_sum, manager.shared_distance_n),
            "cow_copies": manager.cow_copies,
        },
    }


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for scalar leaves (``latency_s.ttft.p50``); lists are left out."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif not isinstance(value, list):
            flat[name] = value
    return flat
