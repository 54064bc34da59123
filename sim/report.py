"""Rich tables for ``simulate`` and ``sweep`` (rendering only; numbers come from metrics).

One run: a two-column table. Several policies: one comparison table, a column per policy.
A sweep: one table, a row per (value, policy). Wall-clock figures (from ``perf.json``) are
shown under the tables, never mixed into the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from memshare.sim.metrics import flatten
from memshare.sim.results import StudyResult, SweepResult
from memshare.sim.run import perf
from memshare.sim.study import SWEEP_METRICS, presets_used, sweep_rows

Fmt = Callable[[Any], str]


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _gib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**30:,.2f}"


ROWS: list[tuple[str, str, Fmt]] = [
    ("requests.finished", "requests finished", _num),
    ("requests.rejected", "requests rejected (too large)", _num),
    ("time.makespan_s", "makespan (s)", _num),
    ("time.steps", "engine steps", _num),
    ("throughput.output_tokens_per_s", "output tokens/s", _num),
    ("throughput.total_tokens_per_s", "prompt+output tokens/s", _num),
    ("throughput.requests_per_s", "requests/s", _num),
    ("latency_s.ttft.p50", "TTFT p50 (s)", _num),
    ("latency_s.ttft.p90", "TTFT p90 (s)", _num),
    ("latency_s.ttft.p99", "TTFT p99 (s)", _num),
    ("latency_s.tpot.p50", "TPOT p50 (s)", _num),
    ("latency_s.tpot.p90", "TPOT p90 (s)", _num),
    ("latency_s.tpot.p99", "TPOT p99 (s)", _num),
    ("latency_s.e2e.p50", "end-to-end p50 (s)", _num),
    ("latency_s.e2e.p90", "end-to-end p90 (s)", _num),
    ("latency_s.e2e.p99", "end-to-end p99 (s)", _num),
    ("kv.budget_blocks", "KV budget (blocks)", _num),
    ("kv.budget_bytes", "KV budget (GiB)", _gib),
    ("kv.peak_blocks_in_use", "KV blocks in use, peak", _num),
    ("kv.mean_blocks_in_use", "KV blocks in use, mean", _num),
    ("kv.peak_bytes_in_use", "KV in use, peak (GiB)", _gib),
    ("preemptions", "preemptions", _num),
    ("prefix_cache.token_hit_rate", "prefix hit rate (tokens)", _pct),
    ("prefix_cache.block_hit_rate", "prefix hit rate (blocks)", _pct),
    ("sharing.share_rate", "share rate (blocks)", _pct),
    ("sharing.page_share_rate", "share rate (pages)", _pct),
    ("sharing.mean_shared_distance", "mean rel. distance of shares", _num),
]
# shown when a run has them (simulate --fidelity-model)
FIDELITY_ROWS: list[tuple[str, str, Fmt]] = [
    ("fidelity_predicted.top1_agreement", "top-1 agreement, predicted", _pct),
    ("fidelity_predicted.kl_mean", "mean KL, predicted (nats)", _num),
]


def study_table(result: StudyResult) -> Table:
    """One table: a row per metric, a column per policy."""
    title = f"memshare simulate: {presets_used(result.runs)} -> {result.output}"
    t = Table(title=title)
    t.add_column("metric")
    flats = [flatten(r.out.metrics) for r in result.runs]
    for r in result.runs:
        t.add_column(r.label, justify="right")
    extra = [row for row in FIDELITY_ROWS if any(row[0] in f for f in flats)]
    for key, name, fmt in ROWS + extra:
        t.add_row(name, *(fmt(f.get(key)) for f in flats))
    return t


def render_study(result: StudyResult, console: Console) -> None:
    """Print the comparison table, the wall-clock line and the files written."""
    console.print(study_table(result))
    for r in result.runs:
        p = perf(r.out)
        console.print(
            f"[dim]{r.label}: {p['steps']:,} steps in {p['wall_s']:.2f} s wall "
            f"({p['sim_per_wall']:,.0f}x real time) -> {r.directory}[/dim]"
        )
    for path in result.plots:
        console.print(f"[dim]plot: {path}[/dim]")


_SWEEP_FMT: dict[str, Fmt] = {key: fmt for key, _, fmt in ROWS}
_SWEEP_NAME: dict[str, str] = {key: name for key, name, _ in ROWS}


def render_sweep(result: SweepResult, console: Console) -> None:
    """Print the sweep table (a row per value and policy) and the files written."""
    runs = [r for _, point in result.points for r in point]
    t = Table(title=f"memshare sweep {result.spec.key}: {presets_used(runs)} -> {result.output}")
    t.add_column(result.spec.key)
    t.add_column("policy")
    for key in SWEEP_METRICS:
        t.add_column(_SWEEP_NAME.get(key, key), justify="right")
    for row in sweep_rows(result):
        t.add_row(
            str(row[result.spec.key]),
            row["policy"],
            *(_SWEEP_FMT.get(k, _num)(row[k]) for k in SWEEP_METRICS),
        )
    console.print(t)
    console.print(f"[dim]table: {result.output / 'sweep.csv'}[/dim]")
    for path in result.plots:
        console.print(f"[dim]plot: {path}[/dim]")
