"""cf-topk on generated GSM8K answers: answers, throughput at a KV budget, and the cost fit.

Set A (the first N problems of ../shared/data/problems/gsm8k_test.jsonl): capture the
default model's greedy answers, ``memshare sweep tau=...`` of cf-topk (per layer, keys only
unless told) on the ``cpu`` preset, then ``memshare validate --fit-cost-model``: answer
agreement and accuracy against the unshared engine, throughput/TTFT/TPOT at the budget
predicted vs measured (error before any fit), and a cost model fitted on A's measured steps.

Set B (the next M problems, never used for the fit): ``none`` simulated twice, on the preset
and on A's fitted cost model, and validated together (one engine): the simulator's error for
throughput, TTFT p50 and TPOT p50 before and after the fit, on requests the fit never saw.
Figures, never assertions.

    python benchmarks/validate_gsm8k.py OUT [--problems 64] [--held-out 16] [--taus 0.3,0.5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _memshare import memshare  # benchmarks/_memshare.py

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "problems" / "gsm8k_test.jsonl"
TIMES = ("throughput_tok_s", "ttft_p50_s", "tpot_p50_s")


def problems(first: int, count: int, out: Path) -> Path:
    """Rows ``first .. first+count-1`` of GSM8K's test set, as their own JSONL."""
    rows = GSM8K.read_text().splitlines()[first : first + count]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    return out


def capture(src: Path, trace: Path, a: argparse.Namespace) -> None:
    if not (trace / "manifest.json").is_file():
        memshare("capture", "-o", str(trace), "--dataset", str(src), "--max-new-tokens",
                 str(a.max_new_tokens), "--batch-size", str(a.batch_size), "--json")  # fmt: skip


def validated(run: Path, *extra: str) -> dict[str, Any]:
    done = run / "validation.json"  # a finished step is read back (resumable)
    if not done.is_file():
        memshare("validate", str(run), *extra, "--json")
    return dict(json.loads(done.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--taus", default="0.3,0.5")
    ap.add_argument("--granularity", default="layer")
    ap.add_argument("--share", default="k")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    t0 = time.perf_counter()
    secs: dict[str, float] = {}

    trace_a = a.out / "a" / "trace"
    capture(problems(0, a.problems, a.out / "a" / "problems.jsonl"), trace_a, a)
    secs["capture A"] = time.perf_counter() - t0
    runs_a = a.out / "a" / "runs"
    if not (runs_a / "sweep.json").is_file() and not runs_a.is_dir():
        memshare("sweep", str(trace_a), f"tau={a.taus}", "--policy", "cf-topk",
                 "--set", f"granularity={a.granularity}", "--set", f"share={a.share}",
                 "--gpu", "cpu", "-o", str(runs_a), "--json")  # fmt: skip
    rep_a = validated(runs_a, "--fit-cost-model", "--one-pass")
    secs["validate A"] = time.perf_counter() - t0 - sum(secs.values())
    fitted = Path(rep_a["cost_model_fit"]["file"])

    trace_b = a.out / "b" / "trace"
    capture(problems(a.problems, a.held_out, a.out / "b" / "problems.jsonl"), trace_b, a)
    secs["capture B"] = time.perf_counter() - t0 - sum(secs.values())
    runs_b = a.out / "b" / "runs"
    for name, cost in (("preset", []), ("fitted", ["--cost-model", str(fitted)])):
        if not (runs_b / name).is_dir():
            memshare("simulate", str(trace_b), "--policy", "none", "--gpu", "cpu", *cost,
                     "-o", str(runs_b / name), "--json")  # fmt: skip
    rep_b = validated(runs_b)
    secs["validate B"] = time.perf_counter() - t0 - sum(secs.values())

    out = {"set_a": _set_a(rep_a), "set_b": _set_b(rep_b), "seconds": secs}
    (a.out / "validate_gsm8k.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def _set_a(rep: dict[str, Any]) -> dict[str, Any]:
    """Per run: answers, savings and time at the budget (preset: before the fit)."""
    rows = {}
    for label, p in rep["policies"].items():
        rows[label] = {
            "tau": p["policy_params"].get("tau"),
            "kv_saved": p["kv_saved"],
            "top1_agreement": p["top1_agreement"],
            "kl_mean": p["kl_mean"],
            "answer_agreement": p["answer_agreement"],
            "accuracy": p["accuracy"],
            "throughput_gain": p.get("throughput_gain"),
            **{k: p.get(k) for k in TIMES},
        }
    return {"runs": rows, "cost_model_fit": rep.get("cost_model_fit"), "requests": rep["requests"]}


def _set_b(rep: dict[str, Any]) -> dict[str, Any]:
    """The held-out set's time errors, predicted on the preset and on the fitted model."""
    return {
        label.split("/")[0]: {k: p.get(k) for k in TIMES} for label, p in rep["policies"].items()
    }


if __name__ == "__main__":
    main()
