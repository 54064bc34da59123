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
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from memshare.block_pool import PoolStats
from memshare.kv_manager import ManagerStats
from memshare.sim.config import ModelConfig
from memshare.sim.engine import EngineResult
from memshare.sim.workload import SimRequest

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
    """The ``metrics.json`` object of one run (its sections in this fixed order)."""
    done = [r for r in res.requests if not r.rejected]
    arrivals = [r.arrival for r in res.requests if math.isfinite(r.arrival)]
    makespan = res.sim_time_s - (min(arrivals) if arrivals else 0.0)
    out_tokens = sum(r.recorded_output_len for r in done)  # the trace's (0 stays 0)
    prompt_tokens = sum(r.prompt_len for r in done)
    busy = float(np.asarray(res.timeline.dt_s, dtype=np.float64).sum())
    return {
        "policy": policy,
        "requests": _requests(res.requests, done, prompt_tokens, out_tokens),
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
        "latency_s": _latency(done),
        "kv": _kv(
            res, pool, makespan, model.kv_bytes_per_token * block_size, block_size, num_blocks
        ),
        "preemptions": res.preemptions,
        "prefix_cache": _prefix_cache(done, manager, prompt_tokens),
        "sharing": _sharing(manager),
    }


def _requests(
    reqs: Sequence[SimRequest], done: Sequence[SimRequest], prompt_tokens: int, out_tokens: int
) -> dict[str, Any]:
    """Requests in all, finished and rejected, and the finished requests' tokens."""
    served_as_1 = sum(1 for r in done if r.recorded_output_len == 0)
    return {
        "total": len(reqs),
        "finished": len(done),
        "rejected": len(reqs) - len(done),
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        # only when present, so every other run's metrics.json is unchanged
        **({"zero_output_served_as_1": served_as_1} if served_as_1 else {}),
    }


def _latency(done: Sequence[SimRequest]) -> dict[str, Any]:
    """TTFT, TPOT, end-to-end and queueing distributions of the finished requests."""
    return {
        "ttft": dist(r.first_token - r.arrival for r in done),
        "tpot": dist(
            (r.finish - r.first_token) / (r.output_len - 1) for r in done if r.output_len > 1
        ),
        "e2e": dist(r.finish - r.arrival for r in done),
        "queue": dist(r.first_scheduled - r.arrival for r in done),
    }


def _kv(
    res: EngineResult,
    pool: PoolStats,
    makespan: float,
    bytes_per_block: int,
    block_size: int,
    num_blocks: int,
) -> dict[str, Any]:
    """The budget, blocks in use (peak, time-weighted mean; with the cache) and pool counts."""
    tl = res.timeline
    ppb = res.pages_per_block
    live = np.asarray(tl.live_pages, dtype=np.float64) / ppb
    cached = np.asarray(tl.cached_pages, dtype=np.float64) / ppb
    dt = np.asarray(tl.dt_s, dtype=np.float64)
    peak = float(live.max()) if live.size else 0.0
    mean = float((live * dt).sum() / makespan) if makespan > 0 else 0.0
    peak_total = float((live + cached).max()) if live.size else 0.0
    return {
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
    }


def _prefix_cache(
    done: Sequence[SimRequest], manager: ManagerStats, prompt_tokens: int
) -> dict[str, Any]:
    """Hit rates at each request's first admission, and the manager's over all admissions."""
    hit_tokens = sum(r.hit_tokens for r in done)
    hit_blocks = sum(r.hit_blocks for r in done)
    prompt_blocks = sum(r.info.prompt_blocks for r in done)
    return {
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
    }


def _sharing(manager: ManagerStats) -> dict[str, Any]:
    """Share rates (blocks, pages), per-layer shared fraction, mean distance, CoW copies."""
    layers = manager.layer_pages_shared
    per_layer: list[float | None] = []
    if layers is not None and manager.full_blocks:
        per_layer = [rnd(float(v)) for v in layers.sum(axis=1) / (2 * manager.full_blocks)]
    return {
        "share_rate": _rate(manager.shared_blocks, manager.full_blocks),
        "page_share_rate": _rate(manager.pages_shared, manager.pages_written),
        "full_blocks": manager.full_blocks,
        "shared_blocks": manager.shared_blocks,
        "pages_written": manager.pages_written,
        "pages_shared": manager.pages_shared,
        "per_layer_shared_fraction": per_layer,
        "mean_shared_distance": _rate(manager.shared_distance_sum, manager.shared_distance_n),
        "cow_copies": manager.cow_copies,
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
