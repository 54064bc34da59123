"""The ``memshare bench`` commands: a policy's decision time, the simulator's speed, the paged
engine against HF ``generate``, and capture's overhead; each prints figures (never a test)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from memshare.commands.options import (
    ArrivalOpt,
    GpuOpt,
    JsonOpt,
    KvBlocksOpt,
    KvBytesOpt,
    ModelConfigOpt,
    ModelOpt,
    PolicyOpt,
    SetOpt,
    ThreadsOpt,
    limit_option,
)
from memshare.commands.progress import Bar, status_lines
from memshare.commands.render import out, print_json, render_figures
from memshare.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from memshare.sim.options import SimOptions

MAX_BENCH_BLOCKS = 1_000_000  # bench policy --resident-blocks (sketches held in memory)
MAX_BENCH_RUNNING = 100_000  # bench sim --sizes (running requests in one step)
MAX_BENCH_STEPS = 1_000_000  # bench sim --steps
R1_HINT = "e.g. --texts ../shared/data/reasoning/deepseek_r1_aime24_math500.jsonl"
RepeatsOpt = Annotated[int, typer.Option(help="Alternating runs; the median counts.")]


def bench_policy_cmd(
    policy: PolicyOpt = "cf-topk",
    settings: SetOpt = None,
    resident_blocks: Annotated[int, typer.Option(help="Blocks resident at the end.")] = 100_000,
    as_json: JsonOpt = False,
) -> None:
    """Decision time per filled block with many resident blocks (target: <= 20 us)."""
    from memshare.policy_bench import bench_policy
    from memshare.registry import coerce_params, parse_settings

    if not 1_000 <= resident_blocks <= MAX_BENCH_BLOCKS:
        raise InputError(
            "--resident-blocks",
            f"{resident_blocks} is out of range (memory grows with it)",
            f"use 1000 .. {MAX_BENCH_BLOCKS}",
        )
    params = coerce_params(policy, parse_settings(settings or []))
    with Bar(as_json, f"bench {policy}") as bar:
        res = bench_policy(policy, params, resident_blocks, progress=lambda n, _: bar.tick(n))
    if as_json:
        print_json(res)
        return
    t = Table(title=f"bench policy {policy}", show_header=False)
    for key, value in res.items():
        t.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    out.print(t)


def bench_sim_cmd(
    trace: Annotated[
        Path | None,
        typer.Argument(metavar="[TRACE]", help="Trace to run (default: the bundled demo)."),
    ] = None,
    policy: PolicyOpt = "prefix",
    kv_blocks: KvBlocksOpt = None,
    kv_bytes: KvBytesOpt = None,
    gpu: GpuOpt = "h100",
    model_config: ModelConfigOpt = None,
    arrival: ArrivalOpt = "trace",
    sizes: Annotated[str, typer.Option(help="Running-request counts for per-step cost.")] = (
        "10,100,1000"
    ),
    steps: Annotated[int, typer.Option(help="Decode steps per per-step-cost run.")] = 400,
    as_json: JsonOpt = False,
) -> None:
    """Simulator speed: simulated/wall time on a trace, per-step cost vs running requests."""
    from memshare.sim.bench import step_costs
    from memshare.sim.options import SimOptions

    counts = _running_counts(sizes)
    if not 1 <= steps <= MAX_BENCH_STEPS:
        raise InputError("--steps", f"must be 1 .. {MAX_BENCH_STEPS}, got {steps}", "e.g. 400")
    options = functools.partial(
        SimOptions,
        policies=(policy,),
        kv_blocks=kv_blocks,
        kv_bytes=kv_bytes,
        gpu=gpu,
        model_config=model_config,
        arrival=arrival,
    )
    run = _trace_run(trace, options, as_json)
    with Bar(as_json, "bench sim: per-step cost"):
        costs = step_costs(counts, steps=steps)
    if as_json:
        print_json({"trace_run": run, "per_step": [c.__dict__ for c in costs]})
    else:
        _render_bench_sim(run, costs)


def _running_counts(sizes: str) -> list[int]:
    """``--sizes``: comma-separated running-request counts, each in 1 .. MAX_BENCH_RUNNING."""
    try:
        counts = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) <= 0 or max(counts) > MAX_BENCH_RUNNING:
        raise InputError(
            "--sizes",
            f"{sizes!r} is not a list of integers in 1 .. {MAX_BENCH_RUNNING}",
            "e.g. 10,100,1000",
        )
    return counts


def _trace_run(
    trace: Path | None, options: Callable[..., SimOptions], quiet: bool
) -> dict[str, Any]:
    """``trace_bench`` on ``options(trace=...)``: ``trace``, or without one the bundled demo
    workload imported into a temporary folder."""
    from memshare.sim.bench import trace_bench

    with tempfile.TemporaryDirectory() as tmp:
        if trace is None:
            from memshare.demo import demo_workload
            from memshare.traces.importers import import_workload

            fmt, src = demo_workload()
            trace = Path(tmp) / "demo"
            import_workload(fmt, src, trace)
        opts = options(trace=trace)
        with Bar(quiet, "bench sim: trace run"):
            return trace_bench(opts)


def _render_bench_sim(run: dict[str, Any], costs: list[Any]) -> None:
    """The trace run's figures, then the per-step cost at each running-request count."""
    t = Table(title="bench sim: trace run", show_header=False)
    for key, value in run.items():
        t.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    out.print(t)
    t = Table(title="bench sim: per-step cost vs running requests")
    for col in ("running", "steps", "wall s", "us/step", "us/step/request"):
        t.add_column(col, justify="right")
    for c in costs:
        t.add_row(
            str(c.running),
            str(c.steps),
            f"{c.wall_s:.3f}",
            f"{c.us_per_step:,.1f}",
            f"{c.us_per_request_step:.2f}",
        )
    out.print(t)


def bench_engine_cmd(
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest output per prompt.")] = 64,
    batch: Annotated[int, typer.Option(help="Prompts in the mixed batch.")] = 16,
    concurrency: Annotated[
        int, typer.Option(help="Concurrent sequences in the bounded mixed run.")
    ] = 4,
    repeats: RepeatsOpt = 3,
    threads: ThreadsOpt = None,
    vs: Annotated[
        str | None,
        typer.Option(
            help="Also time real vLLM's CPU build on the same prompts and lengths ('vllm'; "
            "run from .venv-vllm)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Paged engine vs HF generate (and, with --vs vllm, real vLLM) tokens/s at batch 1 and
    on a mixed batch, a decode step against its floor, KV bytes, peak RSS, cf-topk overhead
    in the engine."""
    from memshare.validate.engine.bench import bench_engine

    if min(repeats, batch, max_new_tokens, concurrency) < 1:
        raise InputError(
            "--repeats/--batch/--max-new-tokens/--concurrency", "must be >= 1", "e.g. 3/16/64/4"
        )
    versus = None
    if vs is not None:
        if vs != "vllm":
            raise InputError(f"--vs {vs}", "is not an executor memshare can time", "use --vs vllm")
        from memshare.traces.capture.vllm import check_vllm
        from memshare.validate.vllm.bench import vllm_runs

        check_vllm("--vs vllm")  # before the model loads
        versus = ("vllm", vllm_runs)
    res = bench_engine(
        model=model,
        max_new_tokens=max_new_tokens,
        batch=batch,
        concurrency=concurrency,
        repeats=repeats,
        threads=threads,
        status=status_lines(as_json),
        versus=versus,
    )
    render_figures("bench engine", res, as_json)


def bench_capture_cmd(
    dataset: Annotated[
        Path | None, typer.Option(help="Problem set for generate mode (default: bundled).")
    ] = None,
    limit: Annotated[int, limit_option("Prompts to generate for.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 4,
    texts: Annotated[
        Path | None, typer.Option(help=f"Also time teacher-forced capture ({R1_HINT}).")
    ] = None,
    texts_limit: Annotated[
        int | None, typer.Option(help="Texts to capture (default 3; 0 for all).")
    ] = 3,
    max_tokens: Annotated[int | None, typer.Option(help="Cap on tokens per text.")] = None,
    model: ModelOpt = None,
    backend: Annotated[str, typer.Option(help="hf or vllm (vLLM's CPU build).")] = "hf",
    repeats: RepeatsOpt = 3,
    as_json: JsonOpt = False,
) -> None:
    """Capture overhead over plain generation (target <= 20%), teacher-forced tokens/s, and
    bytes on disk per 1k tokens."""
    from memshare.traces.capture.bench import bench_capture

    if repeats < 1 or limit < 1:
        raise InputError("--repeats/--limit", "must be >= 1", "e.g. --repeats 3 --limit 8")
    res = bench_capture(
        dataset=dataset,
        limit=limit,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        texts=texts,
        texts_limit=texts_limit or None,
        max_tokens=max_tokens,
        model=model,
        backend_name=backend,
        repeats=repeats,
        status=status_lines(as_json),
    )
    render_figures("bench capture", res, as_json)
