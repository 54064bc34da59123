"""``tune``'s output folder: ``tune.json`` (every point: parameters, predicted and measured KV
saved and fidelity with 95% intervals), ``fidelity_model.json`` (the last refit),
``frontier.png`` (predicted and measured points on one pair of axes) and the winning setting
as a command line.

Invariants: files are written into the staging folder the caller replaces ``-o`` with whole;
numbers are plain JSON (``None`` for what was not measured).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memshare.tune.points import PointResult
from memshare.tune.result import TuneOptions, TuneResult
from memshare.tune.search import Candidate


def _point(p: PointResult) -> dict[str, Any]:
    m = p.measured
    return {
        "params": p.params,
        "texts": p.texts,
        "kv_saved": p.kv_saved,
        "page_share_rate": p.page_share_rate,
        "top1": {
            "predicted": None if p.predicted is None else p.predicted["top1_agreement"],
            "predicted_ci95": None if p.predicted is None else p.predicted["top1_agreement_ci95"],
            "measured": m["top1_agreement"],
            "measured_ci95": m["top1_agreement_ci95"],
            "measured_ci95_texts": m["top1_agreement_ci95_texts"],
        },
        "kl_mean": {
            "predicted": None if p.predicted is None else p.predicted["kl_mean"],
            "measured": m["kl_mean"],
        },
    }


def winning_line(opts: TuneOptions, params: dict[str, Any]) -> str:
    """The ``memshare simulate`` command of the winning setting."""
    sets = [a for k, v in sorted(params.items()) for a in ("--set", f"{k}={v}")]
    cmd = ["memshare", "simulate", opts.config.trace, "--policy", opts.config.policy, *sets]
    return shlex.join(cmd)


def tune_json(result: TuneResult, opts: TuneOptions) -> dict[str, Any]:
    """The ``tune.json`` object."""
    best = result.best
    return {
        "policy": opts.config.policy,
        "fixed_params": {k: v for k, v in opts.config.policy_params.items() if k != "tau"},
        "target": opts.target.text(),
        "budget": opts.budget,
        "texts": result.texts,
        "calibration": [_point(p) for p in result.calibration],
        "validated": [_point(p) | {"candidate": asdict(c)} for c, p in result.validated],
        "single_tau_predicted": [asdict(c) for c in result.single_tau],
        "frontier_predicted": [asdict(c) for c in result.frontier],
        "best": None if best is None else _point(best[1]),
        "command": None if best is None else winning_line(opts, best[1].params),
        "fidelity_model": result.model.to_json(),
    }


def write_outputs(result: TuneResult, opts: TuneOptions, folder: Path) -> None:
    """Every file of the output folder."""
    obj = tune_json(result, opts)
    (folder / "tune.json").write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    result.model.save(folder / "fidelity_model.json")
    _plot(result, opts, folder / "frontier.png")


def _plot(result: TuneResult, opts: TuneOptions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))

    def pct(cands: list[Candidate]) -> tuple[list[float], list[float]]:
        return [100 * c.kv_saved for c in cands], [100 * c.top1 for c in cands]

    x, y = pct(result.frontier)
    ax.plot(x, y, "-o", ms=3, label="per-layer tau, predicted (held-out texts)")
    x, y = pct(result.single_tau)
    ax.plot(x, y, "--s", ms=3, label="one tau, predicted")
    for points, marker, name in (
        (result.calibration, "^", "one tau, measured (calibration texts)"),
        ([p for _, p in result.validated], "D", "validated, measured (held-out texts)"),
    ):
        xs = [100 * (p.kv_saved["measured"] or 0.0) for p in points]
        ys = [100 * p.measured["top1_agreement"] for p in points]
        lo = [
            100 * (p.measured["top1_agreement"] - p.measured["top1_agreement_ci95"][0])
            for p in points
        ]
        hi = [
            100 * (p.measured["top1_agreement_ci95"][1] - p.measured["top1_agreement"])
            for p in points
        ]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, capsize=2, label=name)
    if opts.target.metric == "top1":
        ax.axhline(100 * opts.target.value, color="grey", lw=0.8, ls=":", label=opts.target.text())
    ax.set_xlabel("KV saved (%)")
    ax.set_ylabel("top-1 agreement with no sharing (%)")
    ax.set_title(f"memshare tune {opts.config.policy}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
