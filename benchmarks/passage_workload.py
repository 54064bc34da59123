"""A workload whose requests share passages: GSM8K questions, each behind a few solved GSM8K
examples drawn from one small pool in a seeded order, so the same examples recur in many
prompts at different positions (what KVShare reuses; only a shared first example is a
prefix hit). Writes a problem-set JSONL (``question``, ``answer``: the GSM8K row's, so
answers are graded) for ``memshare capture --dataset``, and prints how much of the prompt
text the examples are.

    python benchmarks/passage_workload.py OUT.jsonl [--requests 32] [--pool 6] [--shots 3]
        [--first 0] [--seed 0]

The questions are GSM8K test rows ``first ..``; the pool is the rows after the last question
(never a question itself). Deterministic for the same arguments.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "problems" / "gsm8k_test.jsonl"


def example(row: dict[str, str]) -> str:
    """A solved example: the question and its worked answer (GSM8K's ``<<...>>`` notes
    dropped)."""
    worked = row["answer"]
    while "<<" in worked and ">>" in worked:
        a = worked.index("<<")
        worked = worked[:a] + worked[worked.index(">>", a) + 2 :]
    return f"Question: {row['question']}\nAnswer: {worked}"


def build(rows: list[dict[str, str]], a: argparse.Namespace) -> list[dict[str, str]]:
    """One prompt per question (module docstring)."""
    questions = rows[a.first : a.first + a.requests]
    pool = rows[a.first + a.requests : a.first + a.requests + a.pool]
    rng = random.Random(a.seed)
    out = []
    for q in questions:
        shots = rng.sample(pool, a.shots)
        context = "\n\n".join(example(s) for s in shots)
        prompt = (
            f"Solved examples:\n\n{context}\n\nSolve the next problem the same way.\n\n"
            f"Question: {q['question']}"
        )
        out.append({"question": prompt, "answer": q["answer"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--pool", type=int, default=6)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()]
    built = build(rows, a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(json.dumps(r) + "\n" for r in built), encoding="utf-8")
    chars = sum(len(r["question"]) for r in built)
    shared = sum(len(r["question"]) - len(r["question"].rsplit("Question: ", 1)[1]) for r in built)
    share = round(shared / max(1, chars), 4)
    print(json.dumps({"file": str(a.out), "requests": len(built), "example_chars_share": share}))


if __name__ == "__main__":
    main()
