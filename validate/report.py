"""How ``memshare validate`` shows its figures: one rich table (predicted beside measured) and
PNGs (docs/validate.md). Reads only the ``validation.json`` object and the engines' steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pct_ci(x: Any, p: dict[str, Any], key: str) -> str:
    """``98.6% [97.9-99.1]``: the figure and its 95% interval (over texts where there are
    several, else over positions: docs/fidelity.md)."""
    ci = p.get(f"{key}_ci95_texts") or p.get(f"{key}_ci95")
    if x is None or not ci:
        return _pct(x)
    return f"{100 * x:.1f}% [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]"


def _num(x: Any, fmt: str = ",.1f") -> str:
    return "-" if x is None else format(x, fmt)


def _pair(d: dict[str, Any], fmt: str = ",.1f") -> str:
    return f"{_num(d.get('predicted'), fmt)} / {_num(d.get('measured'), fmt)}"


def render_validation(report: dict[str, Any], console: Console) -> None:
    """The comparison table: one row per policy, predicted / measured side by side."""
    if report.get("engine") == "vllm":
        render_vllm(report, console)
        return
    t = Table(
        title=(
            f"validate: {report['requests']} requests of {report['trace']} on "
            f"{report['model']} ({report['device']}); predicted / measured"
        )
    )
    for col in (
        "policy",
        "steps same",
        "KV saved",
        "pages mean",
        "top-1 agree [95%]",
        "after 1st share",
        "KL mean",
        "PPL base -> shared",
        "shares > tau",
        f"tok/s ({report['timing_preset']} preset)",
    ):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for label, p in report["policies"].items():
        saved = p["kv_saved"]
        ppl = p["ppl"]
        tps = p["throughput_tok_s"]
        t.add_row(
            label,
            "yes" if p["steps_identical"] else f"no (step {p['first_differing_step']})",
            f"{_pct(saved['predicted'])} / {_pct(saved['measured'])}",
            _pair(p["pages_mean"]),
            _pct_ci(p["top1_agreement"], p, "top1_agreement"),
            _pct(p["top1_agreement_after_first_share"]),
            _num(p["kl_mean"], ".4f"),
            f"{_num(ppl['base'], '.2f')} -> {_num(ppl['shared'], '.2f')}",
            _pct(p["shares_exceeding_tau"]),
            "not measured" if tps is None else f"{_pair(tps)} ({_num(tps['error_pct'], '+.0f')}%)",
        )
    console.print(t)
    for label, p in report["policies"].items():
        fp = p.get("fidelity_predicted")
        if fp is not None:
            top = fp["top1_agreement"]
            console.print(
                f"{label}: top-1 predicted {_pct(top['predicted'])} "
                f"[{_pct(top['predicted_ci95'][0])}, {_pct(top['predicted_ci95'][1])}], "
                f"measured {_pct(top['measured'])} ({_num(top['error_points'], '+.2f')} points); "
                f"KL predicted {_num(fp['kl_mean']['predicted'], '.4f')}"
                + (" (outside the fitted range)" if fp["outside_fit"] else "")
            )
    _print_fit(report, console, "steps")


def plot_kv(path: Path, series: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> None:
    """KV pages in use per step, predicted (dashed) and measured (solid), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (label, pred, meas) in enumerate(series):
        colour = f"C{i % 10}"
        ax.plot(pred, linestyle="--", color=colour, label=f"{label} predicted")
        ax.plot(meas, color=colour, label=f"{label} measured", alpha=0.8)
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV pages in use (running requests)")
    ax.set_title("KV in use: simulator vs real engine")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_frontier(path: Path, report: dict[str, Any]) -> None:
    """KV saved (measured; predicted hollow) against top-1 agreement and, where answers were
    generated, answer agreement: one point per run, the unshared point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = report["policies"]
    panels = [("top1_agreement", "top-1 agreement with the unshared run")]
    if any(p.get("answer_agreement") is not None for p in pol.values()):
        panels.append(("answer_agreement", "answer agreement with the unshared run"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels, strict=True):
        ax.scatter([0.0], [1.0], marker="*", s=160, color="black", label="unshared", zorder=3)
        for i, (label, p) in enumerate(pol.items()):
            y = p.get(key)
            if y is None:
                continue
            saved = p["kv_saved"]
            colour = f"C{i % 10}"
            ax.scatter([saved["measured"]], [y], color=colour, label=label, zorder=2)
            ax.scatter([saved["predicted"]], [y], facecolors="none", edgecolors=colour)
        ax.set_xlabel("KV saved vs unshared (measured; hollow: predicted)")
        ax.set_ylabel(name)
        ax.axhline(0.99, color="grey", linewidth=0.8, linestyle=":")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("sharing frontier: memory saved against fidelity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_vllm(report: dict[str, Any], console: Console) -> None:
    """``validate --engine vllm``: one row per run, the simulator's figure / vLLM's."""
    t = Table(
        title=(
            f"validate on vLLM: {report['requests']} requests of {report['trace']}, "
            f"{report['kv_blocks']} blocks of {report['block_size']}; predicted / measured"
        )
    )
    for col in ("run", "prefix hits", "requests differing", "blocks peak", "steps", "tok/s",
                "TTFT p50 s", "TPOT p50 s"):  # fmt: skip
        t.add_column(col, justify="left" if col == "run" else "right")
    arrivals = report["budget"].get("arrivals", {})
    for label, p in report["policies"].items():
        hits = p["prefix_hit_rate"]
        how = arrivals.get(label, "all at 0 s")
        run = label if how == "all at 0 s" else f"{label} ({how})"
        row = [run, f"{_pct(hits['predicted'])} / {_pct(hits['measured'])}"]
        row += [str(len(p["requests_hit_differing"])), _pair(p["blocks_peak"]), _pair(p["steps"])]
        for key in ("throughput_tok_s", "ttft_p50_s", "tpot_p50_s"):
            v = p[key]
            row.append(f"{_pair(v)} ({_num(v['error_pct'], '+.0f')}%)")
        t.add_row(*row)
    console.print(t)
    _print_fit(report, console, "vLLM steps")


def _print_fit(report: dict[str, Any], console: Console, what: str) -> None:
    """The cost-fit line, where ``--fit-cost-model`` ran."""
    fit = report.get("cost_model_fit")
    if fit:
        console.print(
            f"cost model fitted on {fit['train_steps']} {what} -> {fit['file']}: held-out error "
            f"{fit['error_before_pct']:.1f}% -> {fit['error_after_pct']:.1f}% "
            f"({fit['test_steps']} steps)"
        )
