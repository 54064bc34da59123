"""The simulator against real vLLM (CPU build): error for throughput, TTFT, TPOT and prefix hit
rate, before and after fitting the cost model to vLLM's steps, on requests the fit never saw.

Workload (the shape of few-shot serving): GSM8K questions behind one 4-shot preamble, text
prompts tokenized by the default model's tokenizer (``memshare import tokens``). Set F (the fit
set) and set T (the test set) are disjoint questions. ``none`` and ``prefix`` at block size 32:

1. F simulated on the ``cpu`` preset, ``validate --engine vllm --fit-cost-model``: the fitted
   TOML and the held-out step error;
2. T simulated twice, on the preset and on F's fitted model, and validated on vLLM (each run
   directory gets its own engine): every figure predicted / measured, error in percent.

Run it in the vLLM environment (``.venv-vllm/bin/python benchmarks/vllm_sim_error.py OUT``).
Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _memshare import memshare  # benchmarks/_memshare.py

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "problems" / "gsm8k_test.jsonl"
SHOTS = 4
FIELDS = ("throughput_tok_s", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s")


def workload(out: Path, first: int, count: int, output_len: int) -> Path:
    """A tokens trace of ``count`` questions from ``first`` behind the 4-shot preamble."""
    rows = [json.loads(x) for x in GSM8K.read_text().splitlines()]
    pre = "".join(f"Question: {p['question']}\nAnswer: {p['answer']}\n\n" for p in rows[:SHOTS])
    src = out.with_suffix(".jsonl")
    src.parent.mkdir(parents=True, exist_ok=True)
    qs = rows[SHOTS + first : SHOTS + first + count]
    lines = [
        {"prompt": f"{pre}Question: {p['question']}\nAnswer:", "output_len": output_len} for p in qs
    ]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    if not (out / "manifest.json").is_file():
        memshare("import", "tokens", str(src), "-o", str(out))
    return out


def simulate(trace: Path, out: Path, *extra: str) -> None:
    if not out.is_dir():
        memshare("simulate", str(trace), "--policy", "none", "--policy", "prefix",
                 "--block-size", "32", "--model-config", "smollm2-135m", "--gpu", "cpu",
                 *extra, "-o", str(out))  # fmt: skip


def validated(run: Path, fraction: str, *extra: str) -> dict[str, Any]:
    done = run / "validation.json"
    if not done.is_file():
        memshare("validate", str(run), "--engine", "vllm", "--kv-fraction", fraction, *extra,
                 "--json")  # fmt: skip
    return dict(json.loads(done.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--questions", type=int, default=40, help="per set")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--kv-fraction", default="0.25")
    a = ap.parse_args()
    fit_trace = workload(a.out / "F" / "trace", 0, a.questions, a.output_len)
    test_trace = workload(a.out / "T" / "trace", a.questions, a.questions, a.output_len)
    simulate(fit_trace, a.out / "F" / "runs")
    fit = validated(a.out / "F" / "runs", a.kv_fraction, "--fit-cost-model")
    toml = fit["cost_model_fit"]["file"]
    simulate(test_trace, a.out / "T" / "runs" / "preset")
    simulate(test_trace, a.out / "T" / "runs" / "fitted", "--cost-model", toml)
    test = validated(a.out / "T" / "runs", a.kv_fraction)
    rows = {}
    for label, p in test["policies"].items():
        rows[label] = {k: p[k] for k in FIELDS}
        rows[label]["prefix_hit_rate"] = p["prefix_hit_rate"]
        rows[label]["requests_hit_differing"] = len(p["requests_hit_differing"])
        rows[label]["steps"] = p["steps"]
        rows[label]["evicted_blocks"] = p["evicted_blocks"]
        rows[label]["preemptions"] = p["preemptions"]
    out = {
        "fit": fit["cost_model_fit"],
        "fit_set": {k: {f: v[f] for f in FIELDS} for k, v in fit["policies"].items()},
        "test_set": rows,
        "kv_blocks": test["kv_blocks"],
        "requests": test["requests"],
    }
    (a.out / "vllm_sim_error.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
