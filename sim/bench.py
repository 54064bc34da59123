"""``memshare bench sim``: how fast the simulator runs (figures, never timed tests).

1. **Trace run**: a whole trace with ``prefix`` at a KV budget where preemption happens (by
   default the budget the GPU preset leaves after the weights): wall time, simulated time and
   their ratio (target: >= 1000x real time).
2. **Per-step cost against running requests**: ``n`` requests (10, 100, 1000 by default) that
   all arrive at once and decode side by side for ``steps`` tokens, their block boundaries
   staggered (so some request allocates a block in most steps, as in real traffic); wall time
   per engine step and per running request per step (target: grows at most linearly in ``n``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memshare.sim.config import KVBudget, SchedulerConfig, SimConfig
from memshare.sim.options import SimOptions, build_configs
from memshare.sim.run import LoadedTrace, perf, run_config
from memshare.traces.schema import Manifest, RequestRecord


@dataclass(frozen=True)
class StepWallCost:
    """Wall cost of engine steps with ``running`` requests decoding."""

    running: int  # requests decoding side by side
    steps: int  # engine steps of the run
    wall_s: float  # wall time of the run
    us_per_step: float  # wall microseconds per step
    us_per_request_step: float  # the same per running request


def trace_bench(opts: SimOptions) -> dict[str, Any]:
    """Run the trace with the options' first policy; wall, simulated time and ratio."""
    trace = LoadedTrace.load(Path(opts.trace))
    (cfg,) = build_configs(opts, trace.manifest)[:1]
    out = run_config(cfg, trace)
    p = perf(out)
    return {
        "trace": str(trace.path),
        "requests": out.resolved.requests,
        "policy": cfg.policy,
        "kv_blocks": out.resolved.num_blocks,
        "block_size": out.resolved.block_size,
        "preemptions": out.metrics["preemptions"],
        **p,
    }


def step_cost(running: int, steps: int = 400, prompt_len: int = 32) -> StepWallCost:
    """Wall cost per step with ``running`` requests decoding ``steps`` tokens each."""
    # prompt lengths 32..47: block boundaries (where the manager allocates) are staggered
    records = [
        RequestRecord(
            f"r{i}", 0.0, prompt_len + i % 16, steps, prompt_ids=[i] * (prompt_len + i % 16)
        )
        for i in range(running)
    ]
    trace = LoadedTrace.of(records, Manifest(kind="workload", block_size=16))
    cfg = SimConfig(
        trace="<memory>",
        kv=KVBudget(unlimited=True),
        scheduler=SchedulerConfig(max_num_batched_tokens=max(8192, running), max_num_seqs=running),
    )
    out = run_config(cfg, trace)
    r = out.result
    return StepWallCost(
        running,
        r.steps,
        r.wall_s,
        1e6 * r.wall_s / r.steps,
        1e6 * r.wall_s / r.steps / running,
    )


def step_costs(sizes: Sequence[int] = (10, 100, 1000), steps: int = 400) -> list[StepWallCost]:
    """:func:`step_cost` for each size (a small warm-up run first)."""
    step_cost(4, steps=20)
    return [step_cost(n, steps=steps) for n in sizes]
