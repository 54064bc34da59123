"""cf-topk's predicted and measured savings and fidelity over its four modes and a tau sweep.

For each corpus (DeepSeek-R1 and Sky-T1 reasoning texts from ../shared/data/reasoning): capture
``--texts`` teacher-forced traces of the first N texts (cut at T tokens), then for each mode
(block/kv, block/k, layer/kv, layer/k) ``memshare sweep tau=...`` and ``memshare validate`` of
the sweep (the configurations of a text run side by side, each beside the unshared engine).
Prints one row per (corpus, mode, tau) and, per mode, the largest measured saving at >= 99%
top-1 agreement; writes everything as JSON. Figures, never assertions. The configurations of
a mode run in one forward pass a step (``validate --one-pass``): 6 engines over 8 texts of
2,048 tokens.

    python benchmarks/validate_cf_topk.py OUT [--texts 8] [--tokens 2048] [--taus 0.1,...]

Texts are the first N of the corpus that reach T tokens (the model's tokenizer, as capture
tokenizes them), so every text runs the full T tokens: 8 Sky-T1 answers of 2,048 tokens are
not the first 8 records (most are shorter). The chosen records go to ``OUT/CORPUS/texts.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _memshare import memshare  # benchmarks/_memshare.py

from memshare.sketch import DEFAULT_DIM

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "reasoning"
CORPORA = {
    "r1": (DATA / "deepseek_r1_aime24_math500.jsonl", "reasoning"),
    "skyt1": (DATA / "skyt1_27b_math500.jsonl", "code[0]"),
}
MODES = {"block/kv": ("block", "kv"), "block/k": ("block", "k"), "layer/kv": ("layer", "kv"),
         "layer/k": ("layer", "k")}  # fmt: skip


def long_texts(path: Path, field: str, n: int, tokens: int, out: Path) -> Path:
    """Write the first ``n`` records of ``path`` whose ``field`` has >= ``tokens`` tokens."""
    from memshare.traces.inputs import get_path, parse_path
    from memshare.traces.model.loader import load_model

    backend = load_model()
    where = parse_path(field)
    keep = []
    for line in path.read_text().splitlines():
        if line.strip() and len(backend.encode(get_path(json.loads(line), where))[0]) >= tokens:
            keep.append(line)
            if len(keep) == n:
                break
    if len(keep) < n:
        sys.exit(f"{path}: only {len(keep)} records of >= {tokens} tokens in {field!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(keep) + "\n")
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--taus", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--corpora", default="r1,skyt1")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--sketch-dim", type=int, default=None, help="capture's JL dimension d")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args()
    threads = [] if a.threads is None else ["--threads", str(a.threads)]
    rows = []
    for corpus in a.corpora.split(","):
        path, field = CORPORA[corpus]
        trace = a.out / corpus / "trace"
        dim = [] if a.sketch_dim is None else ["--sketch-dim", str(a.sketch_dim)]
        if not (trace / "manifest.json").is_file():
            texts = long_texts(path, field, a.texts, a.tokens, a.out / corpus / "texts.jsonl")
            memshare("capture", "-o", str(trace), "--texts", str(texts), "--field", field,
                     "--max-tokens", str(a.tokens), *dim, *threads, "--json")  # fmt: skip
        for mode in a.modes.split(","):
            gran, share = MODES[mode]
            runs = a.out / corpus / mode.replace("/", "-")
            t0 = time.perf_counter()
            done = runs / "validation.json"  # a finished mode is read back (resumable)
            if not done.is_file():  # --overwrite: a sweep whose validate was cut off
                memshare("sweep", str(trace), f"tau={a.taus}", "--policy", "cf-topk",
                         "--set", f"granularity={gran}", "--set", f"share={share}",
                         "--model-config", "smollm2-135m", "-o", str(runs), "--overwrite",
                         "--json")  # fmt: skip
                # fidelity and memory only (the throughput figures come from the GSM8K run);
                # a text's configurations in one forward pass a step (--one-pass)
                memshare("validate", str(runs), "--fidelity-only", "--one-pass", *threads,
                         "--json")  # fmt: skip
            rep = json.loads(done.read_text())
            secs = time.perf_counter() - t0
            for label, p in rep["policies"].items():
                rows.append(
                    {
                        "corpus": corpus,
                        "mode": mode,
                        "tau": p["policy_params"].get("tau"),
                        "run": label,
                        "kv_saved_predicted": p["kv_saved"]["predicted"],
                        "kv_saved_measured": p["kv_saved"]["measured"],
                        "top1": p["top1_agreement"],
                        "top1_after_share": p["top1_agreement_after_first_share"],
                        "kl_mean": p["kl_mean"],
                        "ppl_base": p["ppl"]["base"],
                        "ppl_shared": p["ppl"]["shared"],
                        "shares": p["shares"],
                        "shares_exceeding_tau": p["shares_exceeding_tau"],
                        "shares_exceeding_tau_by_10pct": p["shares_exceeding_tau_by_10pct"],
                        "exact_distance": p["exact_distance"],
                        "sketch_dim": a.sketch_dim or DEFAULT_DIM,
                        "requests": rep["requests"],
                        "seconds": round(secs, 1),
                    }
                )
                r = rows[-1]
                print(
                    f"{corpus:6} {mode:8} tau {r['tau']:<4} saved pred "
                    f"{r['kv_saved_predicted']:7.2%} meas {r['kv_saved_measured']:7.2%}  "
                    f"top1 {r['top1']:7.2%}  KL "
                    f"{r['kl_mean']:.4f}  PPL {r['ppl_base']:.2f}->{r['ppl_shared']:.2f}  "
                    f"shares {r['shares']} (>tau {_pct(r['shares_exceeding_tau'])}, >1.1 tau "
                    f"{_pct(r['shares_exceeding_tau_by_10pct'])})  {r['seconds']} s",
                    flush=True,
                )
    best = {}
    for r in rows:
        key = f"{r['corpus']} {r['mode']}"
        if r["top1"] >= 0.99 and r["kv_saved_measured"] > best.get(key, {}).get("saved", -1):
            best[key] = {"saved": r["kv_saved_measured"], "tau": r["tau"]}
    print("largest measured saving at >= 99% top-1:", json.dumps(best, indent=1))
    _write(a.out, rows, best)


def _write(out: Path, rows: list[dict[str, object]], best: dict[str, object]) -> None:
    (out / "validate_cf_topk.json").write_text(json.dumps({"rows": rows, "best": best}, indent=1))


if __name__ == "__main__":
    main()
