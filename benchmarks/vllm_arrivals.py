"""Real vLLM (CPU build) replaying a run's arrival times: wall clock and time to first token.

Workload: 12 GSM8K questions behind one 4-shot preamble (``memshare import tokens``), arriving
``--gap`` seconds apart (4 s: on a 2-core CPU each request is done before the next arrives).
``none`` and ``prefix`` at block size 32 are simulated with ``--arrival trace`` and validated
with ``validate --engine vllm --replay-arrivals``. Printed per policy, measured and predicted:

- ``wall_s`` against the last arrival (``11 * gap``, 44 s): a replay that honours the arrival
  times cannot finish before the last request arrives;
- TTFT p50 and p90 against ``5.5 * gap`` (22 s), the median arrival: counted from each
  request's arrival a TTFT stays below it (on a busy 2-core CPU: p50 4 s under ``prefix``,
  12 s under ``none``); counted from 0 its median would pass it.

These were wall-clock assertions in ``tests/test_vllm.py`` (``wall_s >= 44``, TTFT p50 < 20 s);
they are figures here. Run it in the vLLM environment
(``.venv-vllm/bin/python benchmarks/vllm_arrivals.py OUT``). Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _memshare import memshare  # benchmarks/_memshare.py
from vllm_sim_error import GSM8K, SHOTS  # the same few-shot workload

QUESTIONS = 12


def spaced_trace(out: Path, gap: float) -> Path:
    """The 12 questions behind the preamble, ``gap`` seconds apart, as a tokens trace."""
    rows = [json.loads(x) for x in GSM8K.read_text().splitlines()[: SHOTS + QUESTIONS]]
    pre = "".join(f"Question: {p['question']}\nAnswer: {p['answer']}\n\n" for p in rows[:SHOTS])
    lines = [
        {"prompt": f"{pre}Question: {p['question']}\nAnswer:", "output_len": 12 + i % 7,
         "arrival_s": gap * i}
        for i, p in enumerate(rows[SHOTS:])
    ]  # fmt: skip
    src = out / "w.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    trace = out / "trace"
    if not (trace / "manifest.json").is_file():
        memshare("import", "tokens", str(src), "-o", str(trace))
    return trace


def replayed(trace: Path, runs: Path) -> dict[str, Any]:
    """``validate --engine vllm --replay-arrivals`` of ``none`` and ``prefix`` (cached)."""
    done = runs / "validation.json"
    if not done.is_file():
        memshare("simulate", str(trace), "--policy", "none", "--policy", "prefix",
                 "--block-size", "32", "--model-config", "smollm2-135m", "--gpu", "cpu",
                 "--arrival", "trace", "-o", str(runs))  # fmt: skip
        memshare("validate", str(runs), "--engine", "vllm", "--replay-arrivals", "--json")
    return dict(json.loads(done.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--gap", type=float, default=4.0, help="seconds between arrivals")
    a = ap.parse_args()
    rep = replayed(spaced_trace(a.out, a.gap), a.out / "runs")
    last, median = a.gap * (QUESTIONS - 1), a.gap * (QUESTIONS - 1) / 2
    rows: dict[str, Any] = {}
    for label, p in rep["policies"].items():
        rows[label] = {
            "wall_s": p["wall_s"],
            "wall_s_over_last_arrival": p["wall_s"] - last,
            "ttft_p50_s": p["ttft_p50_s"],
            "ttft_p90_s": p["ttft_p90_s"],
            "requests_hit_differing": len(p["requests_hit_differing"]),
        }
    out = {"gap_s": a.gap, "last_arrival_s": last, "median_arrival_s": median, "policies": rows}
    (a.out / "vllm_arrivals.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    for label, r in rows.items():
        t = r["ttft_p50_s"]
        print(
            f"{label}: wall {_s(r['wall_s'])} (last arrival {last:.0f} s), TTFT p50 "
            f"{_s(t['measured'])} measured, {_s(t['predicted'])} predicted "
            f"(median arrival {median:.0f} s)"
        )


def _s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


if __name__ == "__main__":
    main()
