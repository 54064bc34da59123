"""``tune``'s output folder: ``tune.json`` (every point: parameters, predicted and measured KV
saved and fidelity with 95% intervals), ``fidelity_model.json`` (the last refit),
``frontier.png`` (predicted and measured points on one pair of axes), ``fit_positions.npz``
(every measured position the model was fitted on) and the winning setting as a command line.

Invariants: files are written into the staging folder the caller replaces ``-o`` with whole;
numbers are plain JSON (``None`` for what was not measured).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.scheduler import SchedulerConfig
from memshare.sim.fit_positions import save_positions
from memshare.tune.answers import CACHE_KEYS
from memshare.tune.points import PointResult
from memshare.tune.result import TuneOptions, TuneResult
from memshare.tune.target import Target


def _point(p: PointResult) -> dict[str, Any]:
    m = p.measured
    out = {
        "params": p.params,
        "texts": p.texts,
        "kv_saved": p.kv_saved,
        "page_share_rate": p.page_share_rate,
        "top1": {
            "predicted": None if p.predicted is None else p.predicted["top1_agreement"],
            "predicted_ci95": None if p.predicted is None else p.predicted["top1_agreement_ci95"],
            "measured": m.get("top1_agreement"),
            "measured_ci95": m.get("top1_agreement_ci95"),
            "measured_ci95_texts": m.get("top1_agreement_ci95_texts"),
        },
        "kl_mean": {
            "predicted": None if p.predicted is None else p.predicted["kl_mean"],
            "measured": m.get("kl_mean"),
        },
    }
    if "answer_agreement" in m:  # generated answers (tune/answers.py)
        out["answers"] = {
            "measured": m["answer_agreement"],
            "measured_ci95": m["answer_agreement_ci95"],
            "accuracy": m["accuracy"],
            "accuracy_ci95": m["accuracy_ci95"],
            "token_agreement": m["token_agreement"],
        }
        out["prompt_cache"] = {k: m[k] for k in CACHE_KEYS}
    return out


def winning_line(opts: TuneOptions, params: dict[str, Any]) -> str:
    """The ``memshare simulate`` command of the winning setting (with the scheduler's
    ``--max-num-seqs`` where tune was given one)."""
    sets = [a for k, v in sorted(params.items()) for a in ("--set", f"{k}={v}")]
    cmd = ["memshare", "simulate", opts.config.trace, "--policy", opts.config.policy, *sets]
    seqs = opts.config.scheduler.max_num_seqs
    if seqs != SchedulerConfig().max_num_seqs:
        cmd += ["--max-num-seqs", str(seqs)]
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
        "fidelity_model": None if result.model is None else result.model.to_json(),
    }


def write_outputs(result: TuneResult, opts: TuneOptions, folder: Path) -> None:
    """Every file of the output folder."""
    obj = tune_json(result, opts)
    (folder / "tune.json").write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    if result.model is not None:
        result.model.save(folder / "fidelity_model.json")
        points = result.calibration + [p for _, p in result.validated]
        save_positions([r for p in points for r in p.fit], folder / "fit_positions.npz")
    _plot([obj, *result.compared], opts, folder / "frontier.png")


def read_compared(path: Path, held_out: list[str], target: Target) -> dict[str, Any]:
    """``--compare DIR``: an earlier tune's ``tune.json``, measured on these held-out texts and
    on the same kind of fidelity (generated answers or not) as ``target`` (InputError
    otherwise: points on other texts, or of another figure, are not comparable)."""
    file = path / "tune.json" if path.is_dir() else path
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
        theirs = obj["texts"]["held_out"]
        if not isinstance(obj["validated"], list) or not isinstance(obj["policy"], str):
            raise TypeError("its validated points or policy are not a list and a name")
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"{file} is not a tune.json ({e})"
        raise InputError("--compare", why, "give a tune -o folder") from e
    if theirs != held_out:
        raise InputError(
            "--compare",
            f"{file} was measured on held-out texts {theirs}, this run on {held_out}",
            "tune both on the same trace, --limit and --holdout",
        )
    theirs_generated = str(obj.get("target", "")).startswith("answers=")
    if theirs_generated != target.generated:
        raise InputError(
            "--compare",
            f"{file} was tuned for {obj.get('target')}, this run for {target.text()}: "
            "answers and teacher-forced figures do not share an axis",
            "compare tunes of the same --target kind",
        )
    return dict(obj)


_YLABEL = {"top1": "top-1 agreement", "answers": "generated answers agreeing"}


def _pct(points: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(KV saved %, top-1 %) of tune.json candidates with a predicted top-1."""
    kept = [p for p in points if p.get(key) is not None]
    return [100 * p["kv_saved"] for p in kept], [100 * p[key] for p in kept]


def _measured(
    ax: Any, points: list[dict[str, Any]], fmt: str, color: str, name: str, figure: str
) -> None:
    """tune.json measured points (``figure``: "top1" or "answers") with their 95% binomial
    intervals."""
    points = [p for p in points if (p.get(figure) or {}).get("measured") is not None]
    if not points:
        return
    xs = [100 * (p["kv_saved"]["measured"] or 0.0) for p in points]
    ys = [100 * p[figure]["measured"] for p in points]
    lo = [y - 100 * p[figure]["measured_ci95"][0] for y, p in zip(ys, points, strict=True)]
    hi = [100 * p[figure]["measured_ci95"][1] - y for y, p in zip(ys, points, strict=True)]
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt=fmt, color=color, capsize=2, label=name)


def _plot(runs: list[dict[str, Any]], opts: TuneOptions, path: Path) -> None:
    """Tune runs' points (``tune.json`` objects: this run's, then ``--compare``'s) on one
    pair of axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = "answers" if opts.target.generated else "top1"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        color, name = f"C{i}", run["policy"]
        x, y = _pct(run.get("frontier_predicted") or [], "top1")
        if x:
            ax.plot(x, y, "-o", ms=3, color=color, label=f"{name}: predicted frontier")
        x, y = _pct(run.get("single_tau_predicted") or [], "top1")
        if x:
            ax.plot(x, y, "--", color=color, alpha=0.5, label=f"{name}: one tau, predicted")
        cal = run.get("calibration") or []
        _measured(ax, cal, "^", color, f"{name}: calibration runs", figure)
        validated = sorted(run["validated"], key=lambda p: p["kv_saved"]["measured"] or 0.0)
        _measured(ax, validated, "D-", color, f"{name}: validated (held-out texts)", figure)
    if opts.target.metric != "kl":
        ax.axhline(100 * opts.target.value, color="grey", lw=0.8, ls=":", label=opts.target.text())
    ax.set_xlabel("KV saved (%)")
    ax.set_ylabel(f"{_YLABEL[figure]} with no sharing (%)")
    ax.set_title("memshare tune: " + ", ".join(r["policy"] for r in runs))
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
