"""PNG figures of ``simulate`` runs and sweeps (matplotlib, Agg backend: no display needed).

Per ``simulate`` call, one figure each, every policy in it: KV blocks in use over time,
TTFT CDF, TPOT CDF, throughput per policy. Per sweep: one line plot of the prefix hit rate
and the output throughput against the swept value, a line per policy. Matplotlib is imported
only here, and only when plots are asked for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from memshare.sim.results import LabeledRun, SweepResult
from memshare.sim.workload import SimRequest


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, values: list[float], label: str) -> None:
    a = np.sort(np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64))
    if a.size:
        ax.step(a, np.arange(1, a.size + 1) / a.size, where="post", label=label)


def _legend(ax: Any, loc: str) -> None:
    """A legend at a fixed place, only when something is labelled: matplotlib warns on the
    user's screen otherwise (no labelled artists; a slow ``loc="best"`` on large runs)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=loc)


def _ttft(q: SimRequest) -> float:
    return q.first_token - q.arrival


def _tpot(q: SimRequest) -> float:
    return (q.finish - q.first_token) / (q.output_len - 1) if q.output_len > 1 else math.nan


def plot_runs(runs: list[LabeledRun], out_dir: Path) -> list[Path]:
    """Write kv_blocks.png, ttft_cdf.png, tpot_cdf.png, throughput.png; return their paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    peak = 0.0
    for r in runs:
        tl = r.out.result.timeline
        ppb = r.out.result.pages_per_block
        live = np.asarray(tl.live_pages, dtype=np.float64) / ppb
        peak = max(peak, float(live.max()) if len(live) else 0.0)
        ax.step(tl.time_s, live, where="post", label=r.label, linewidth=0.8)
    budget = runs[0].out.resolved.num_blocks if runs else 0
    title = "KV blocks in use"
    if runs and all(r.out.resolved.num_blocks == budget for r in runs):
        # the scale follows use: a budget far above the peak would flatten the curves to 0
        if budget <= 2 * peak:
            ax.axhline(budget, color="grey", linestyle="--", linewidth=0.8, label="budget")
        else:
            title += f" (budget {budget:,} blocks, off scale)"
    ax.set(xlabel="simulated time (s)", ylabel="KV blocks in use", title=title)
    _legend(ax, "upper left")
    paths.append(_save(plt, fig, out_dir / "kv_blocks.png"))

    for name, title, fn in (("ttft_cdf.png", "TTFT", _ttft), ("tpot_cdf.png", "TPOT", _tpot)):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in runs:
            reqs = [q for q in r.out.result.requests if not q.rejected]
            _cdf(ax, [fn(q) for q in reqs], r.label)
        ax.set(xlabel=f"{title} (s)", ylabel="fraction of requests", title=f"{title} CDF")
        ax.set_ylim(0, 1)
        _legend(ax, "lower right")
        paths.append(_save(plt, fig, out_dir / name))

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(runs) + 2), 4.5))
    labels = [r.label for r in runs]
    tput = [r.out.metrics["throughput"]["output_tokens_per_s"] or 0.0 for r in runs]
    ax.bar(labels, tput, color="tab:blue")
    ax.set(ylabel="output tokens/s", title="Throughput per policy")
    paths.append(_save(plt, fig, out_dir / "throughput.png"))
    return paths


def plot_sweep(result: SweepResult, out_dir: Path) -> list[Path]:
    """Write sweep.png: hit rate and throughput against the swept value, per policy."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    values = [v for v, _ in result.points]
    numeric = all(isinstance(v, int | float) for v in values)
    xs = values if numeric else list(range(len(values)))
    policies = [r.label for r in result.points[0][1]] if result.points else []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for col, (section, key, ylabel) in enumerate(
        (
            ("prefix_cache", "token_hit_rate", "prefix hit rate (tokens)"),
            ("throughput", "output_tokens_per_s", "output tokens/s"),
        )
    ):
        ax = axes[col]
        for i, policy in enumerate(policies):
            ys = [runs[i].out.metrics[section][key] for _, runs in result.points]
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=policy)
        ax.set(xlabel=result.spec.key, ylabel=ylabel)
        if not numeric:
            ax.set_xticks(xs, [str(v) for v in values])
        _legend(ax, "best")
    fig.suptitle(f"sweep over {result.spec.key}")
    return [_save(plt, fig, out_dir / "sweep.png")]


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
