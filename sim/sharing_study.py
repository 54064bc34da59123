"""``memshare study``: how much KV memory each sharing option saves on one trace.

Runs the simulator (same scheduler, pool and policies as ``simulate``) once per baseline
(``none``, ``prefix``, ``exact-dedup``, ``token-dedup``) and once per ``cf-topk`` option:
``tau`` in the given list x ``granularity`` in {block, layer} x ``share`` in {kv, k}. Each row
reports KV bytes in use (mean over time and peak), the saving against ``none`` at the same
settings, the page share rate (pages shared / pages written) and the mean relative sketch
distance of what was shared (the fidelity-risk signal). ``--plot`` draws saved memory against
tau, a line per option, baselines as horizontal lines.

Invariant: every run uses the same trace, budget, arrivals and seed; only the policy and its
parameters differ, so differences between rows are the policies' alone. Deterministic.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.fanout.options import IN_PROCESS, FanOut
from memshare.fanout.tally import Tally
from memshare.outdir import OutputKind
from memshare.registry import param_defaults
from memshare.sim.jobs import JobsProgress, run_sim_jobs, sim_job
from memshare.sim.options import SimOptions, build_configs
from memshare.sim.run import LoadedTrace
from memshare.sim.study import warn_before_runs

STUDY = OutputKind("study", "study.json")  # what `memshare study -o` holds (one study)
BASELINES = ("none", "prefix", "exact-dedup", "token-dedup")
TAUS = (0.1, 0.2, 0.3, 0.5)
OPTIONS = (("block", "kv"), ("block", "k"), ("layer", "kv"), ("layer", "k"))


@dataclass(frozen=True)
class StudyRow:
    """One simulated policy setting."""

    policy: str
    granularity: str | None  # cf-topk only
    share: str | None  # cf-topk only
    tau: float | None  # cf-topk only
    mean_kv_bytes: float  # time-weighted mean of live KV bytes
    peak_kv_bytes: float
    saved_mean: float  # 1 - mean_kv_bytes / none's
    saved_peak: float  # 1 - peak_kv_bytes / none's
    page_share_rate: float  # pages shared / pages written
    mean_shared_distance: float | None  # relative sketch distance of shares
    prefix_token_hit_rate: float

    @property
    def label(self) -> str:
        """Short name for tables and legends."""
        if self.tau is None:
            return self.policy
        return f"{self.policy} {self.granularity}/{self.share} tau={self.tau:g}"


Setting = tuple[str | None, str | None, float | None]  # cf-topk's granularity, share, tau


def run_study(
    base: SimOptions,
    *,
    taus: Sequence[float] = TAUS,
    options: Sequence[tuple[str, str]] = OPTIONS,
    progress: Callable[[str, int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    fan: FanOut = IN_PROCESS,
    output: Path | None = None,
    jobs_progress: JobsProgress = None,
) -> list[StudyRow]:
    """All baselines and cf-topk options over ``base`` (its policies are replaced), a job
    each (run as ``fan`` says; ``output``: the study's folder, whose job store keeps finished
    runs for ``--resume``). ``progress(label, runs done, runs)`` as runs finish."""
    trace = LoadedTrace.load(Path(base.trace))
    if not trace.has_sketches:
        raise InputError(
            str(base.trace),
            "has no KV sketches (a workload-only trace), so no similarity policy can act",
            "study a trace made by `memshare capture`",
        )
    plan = _plan(taus, options)
    configs = [
        build_configs(
            replace(base, policies=(name,), sets=_applicable(base.sets, name) + sets),
            trace.manifest,
        )[0]
        for name, sets, _ in plan
    ]  # every config checked before the first run
    warn_before_runs(configs, trace, warn)
    jobs = [
        sim_job(cfg, trace, _label(name, setting), metrics_only=True)
        for (name, _, setting), cfg in zip(plan, configs, strict=True)
    ]
    tick = None if progress is None else _job_ticker(progress, len(plan))
    done = run_sim_jobs(jobs, trace, fan, output, jobs_progress=_both(tick, jobs_progress))
    rows: list[StudyRow] = []
    none_mean = none_peak = 0.0
    for (name, _, setting), o in zip(plan, done, strict=True):
        m = o.value
        if name == "none":
            none_mean = float(m["kv"]["mean_bytes_in_use"])
            none_peak = float(m["kv"]["peak_bytes_in_use"])
        rows.append(_row(name, setting, m, none_mean, none_peak))
    return rows


def _label(name: str, setting: Setting) -> str:
    granularity, share, tau = setting
    return name if tau is None else f"cf-topk {granularity}/{share} tau={tau:g}"


def _job_ticker(progress: Callable[[str, int, int], None], total: int) -> Callable[[Tally], None]:
    """``progress("study", finished runs, total)`` from the jobs' tally."""
    progress("study", 0, total)
    return lambda t: progress("study", t.done + t.failed, total)


def _both(
    a: Callable[[Tally], None] | None, b: Callable[[Tally], None] | None
) -> Callable[[Tally], None] | None:
    if a is None or b is None:
        return a or b
    return lambda t: (a(t), b(t))[-1]


def _plan(
    taus: Sequence[float], options: Sequence[tuple[str, str]]
) -> list[tuple[str, tuple[str, ...], Setting]]:
    """The runs in order: each baseline, then cf-topk per option and tau, with their
    ``--set`` items."""
    plan: list[tuple[str, tuple[str, ...], Setting]] = [
        (name, (), (None, None, None)) for name in BASELINES
    ]
    for g, sh in options:
        for t in taus:
            plan.append(("cf-topk", (f"granularity={g}", f"share={sh}", f"tau={t}"), (g, sh, t)))
    return plan


def _row(
    name: str, setting: Setting, m: dict[str, Any], none_mean: float, none_peak: float
) -> StudyRow:
    """One run's row from its metrics; savings against ``none``'s mean and peak (0 if unset)."""
    granularity, share, tau = setting
    mean, peak = float(m["kv"]["mean_bytes_in_use"]), float(m["kv"]["peak_bytes_in_use"])
    return StudyRow(
        policy=name,
        granularity=granularity,
        share=share,
        tau=tau,
        mean_kv_bytes=mean,
        peak_kv_bytes=peak,
        saved_mean=1.0 - mean / none_mean if none_mean else 0.0,
        saved_peak=1.0 - peak / none_peak if none_peak else 0.0,
        page_share_rate=float(m["sharing"]["page_share_rate"] or 0.0),
        mean_shared_distance=m["sharing"]["mean_shared_distance"],
        prefix_token_hit_rate=float(m["prefix_cache"]["token_hit_rate"] or 0.0),
    )


def _applicable(sets: Sequence[str], policy: str) -> tuple[str, ...]:
    """The extra ``--set`` items a policy takes (``key=v`` or ``policy.key=v``); a key that
    no studied policy takes is an error raised by :func:`build_configs` for ``cf-topk``."""
    names = set(param_defaults(policy))
    out = []
    for item in sets:
        key = item.partition("=")[0].strip()
        scope, dot, bare = key.rpartition(".")
        if (dot and scope == policy) or (not dot and bare in names) or policy == "cf-topk":
            out.append(item)
    return tuple(out)


def write_study(rows: Sequence[StudyRow], out: Path, *, plot: bool) -> list[Path]:
    """``study.json``, ``study.csv`` and (``plot``) ``saved_vs_tau.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    dicts = [asdict(r) | {"label": r.label} for r in rows]
    (out / "study.json").write_text(json.dumps({"rows": dicts}, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dicts[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(dicts)
    (out / "study.csv").write_text(buf.getvalue())
    paths = [out / "study.json", out / "study.csv"]
    if plot:
        paths.append(_plot(rows, out / "saved_vs_tau.png"))
    return paths


def _plot(rows: Sequence[StudyRow], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for granularity, share in sorted({(r.granularity, r.share) for r in rows if r.tau is not None}):
        pts = sorted(
            (r.tau, 100 * r.saved_mean)
            for r in rows
            if (r.granularity, r.share) == (granularity, share) and r.tau is not None
        )
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            label=f"cf-topk {granularity}/{share}",
        )
    styles = iter(["--", ":", "-."])
    for r in rows:
        if r.tau is None and r.policy != "none":
            ax.axhline(
                100 * r.saved_mean,
                linestyle=next(styles, "--"),
                color="grey",
                linewidth=0.9,
                label=r.policy,
            )
    ax.set(
        xlabel="tau (relative sketch distance)",
        ylabel="KV memory saved vs none (%, mean)",
        title="KV memory saved against tau",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def rows_json(rows: Sequence[StudyRow]) -> dict[str, Any]:
    """The ``--json`` object."""
    return {"rows": [asdict(r) | {"label": r.label} for r in rows]}
