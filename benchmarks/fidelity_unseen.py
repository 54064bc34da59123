"""The fidelity model on texts it never saw: for every (run, text) that ``tune`` measured
(``OUT/fit_positions.npz``), a model fitted on the other texts' positions alone predicts that
text's top-1 agreement; prints predicted, measured, the error in points and whether the
measurement lies inside the model's 95% interval for one text (``FidelityModel.interval``),
then the summary issue 25 asks for: the largest error where measured >= 97%, and coverage.

    .venv/bin/python benchmarks/fidelity_unseen.py OUT/fit_positions.npz [...] [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from memshare.sim.fidelity_model import fit, rates
from memshare.sim.fit_positions import load_positions


@dataclass
class Scored:
    """One run on one text, predicted by a model that never saw the text."""

    run: str
    text: str
    positions: int
    measured: float
    predicted: float
    ci95: tuple[float, float]

    @property
    def error_points(self) -> float:
        return 100 * (self.predicted - self.measured)

    @property
    def inside(self) -> bool:
        return self.ci95[0] <= self.measured <= self.ci95[1]


def score(path: Path) -> list[Scored]:
    """One row per (run, text) of ``path`` (module docstring)."""
    rows = load_positions(path)
    layers = rows[0].x.shape[1] // 2
    out = []
    for text in sorted({r.text for r in rows}):
        model = fit([r for r in rows if r.text != text], layers)
        for r in rows:
            if r.text != text or not len(r.agree):
                continue
            pred, _ = rates(model.top1, model.kl, r)
            lo, hi = model.interval(pred, 1)
            out.append(Scored(r.run, text, len(r.agree), float(r.agree.mean()), pred, (lo, hi)))
    return out


def summary(rows: list[Scored]) -> dict[str, object]:
    """Issue 25's figures: the largest error where measured >= 97%, and the coverage."""
    high = [abs(r.error_points) for r in rows if r.measured >= 0.97]
    return {
        "points": len(rows),
        "inside_ci95": round(sum(r.inside for r in rows) / max(1, len(rows)), 4),
        "measured_ge_97": len(high),
        "max_abs_error_points_ge_97": round(max(high), 3) if high else None,
        "max_abs_error_points_all": round(max(abs(r.error_points) for r in rows), 3)
        if rows
        else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = [row for f in a.files for row in score(f)]
    if a.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "summary": summary(rows)}, indent=2))
        return
    for r in rows:
        print(
            f"{r.text[-12:]:>12} {r.run[:60]:<60} measured {100 * r.measured:6.2f}% "
            f"predicted {100 * r.predicted:6.2f}% [{100 * r.ci95[0]:6.2f}, {100 * r.ci95[1]:6.2f}]"
            f" err {r.error_points:+6.2f} {'in' if r.inside else 'OUT'}"
        )
    print(json.dumps(summary(rows)))


if __name__ == "__main__":
    main()
