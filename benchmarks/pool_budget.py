"""Benchmark (issue 11, defect 4): does simulate's cost follow the blocks in use, not the budget?

Runs ``memshare simulate`` on the same 50 Mooncake requests (the bundled
``memshare/data/mooncake_demo.jsonl``, imported into a temporary folder) with a KV budget of
10^4 and of 10^9 blocks, each run in a fresh subprocess, and prints for both the peak RSS of
that process (``os.wait4``'s rusage of exactly that child) and its wall time, and the ratio of
the large budget to the small one (target: both within 20%, i.e. a ratio of 0.8 .. 1.2).

Usage: ``python benchmarks/pool_budget.py [--repeat N] [--requests N] [--policy P]``.
Each budget runs ``--repeat`` times (interleaved); the median wall time and the largest peak
RSS are reported. A figure, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memshare.traces.importers import import_workload

BUDGETS = (10**4, 10**9)
MOONCAKE_DEMO = Path(__file__).resolve().parents[1] / "memshare" / "data" / "mooncake_demo.jsonl"


def run_once(trace: Path, blocks: int, policy: str, out: Path) -> tuple[float, int, str]:
    """One ``simulate`` in a fresh process: (wall s, peak RSS bytes, its metrics digest)."""
    cmd = [
        sys.executable, "-m", "memshare.cli", "simulate", str(trace), "--policy", policy,
        "--kv-blocks", str(blocks), "--json", "-o", str(out),
    ]  # fmt: skip
    with (out.parent / f"{out.name}.stdout").open("w+") as stdout:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"pool_budget: {' '.join(cmd)} exited {proc.returncode}")
        stdout.seek(0)
        metrics = json.loads(stdout.read())["runs"][0]["metrics"]
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    finished, peak = metrics["requests"]["finished"], metrics["kv"]["peak_blocks_in_use"]
    digest = f"finished={finished} peak_blocks={peak}"
    return wall, rss, digest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per budget (default 3)")
    ap.add_argument("--requests", type=int, default=50, help="Mooncake requests (default 50)")
    ap.add_argument("--policy", default="prefix", help="policy (default prefix)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "mooncake"
        import_workload("mooncake", MOONCAKE_DEMO, trace, limit=args.requests)
        walls: dict[int, list[float]] = {b: [] for b in BUDGETS}
        rss: dict[int, list[int]] = {b: [] for b in BUDGETS}
        digests: dict[int, set[str]] = {b: set() for b in BUDGETS}
        for i in range(args.repeat):
            for b in BUDGETS:
                w, r, d = run_once(trace, b, args.policy, Path(tmp) / f"run-{b}-{i}")
                walls[b].append(w)
                rss[b].append(r)
                digests[b].add(d)
    print(
        f"simulate --policy {args.policy} on {args.requests} Mooncake requests "
        f"({MOONCAKE_DEMO.name}); fresh process per run, {args.repeat} runs per budget"
    )
    print(f"{'--kv-blocks':>14} {'wall s (median)':>16} {'peak RSS MiB (max)':>19}  result")
    for b in BUDGETS:
        print(
            f"{b:>14,} {statistics.median(walls[b]):>16.3f} {max(rss[b]) / 2**20:>19.1f}  "
            f"{', '.join(sorted(digests[b]))}"
        )
    small, large = BUDGETS
    wall_ratio = statistics.median(walls[large]) / statistics.median(walls[small])
    rss_ratio = max(rss[large]) / max(rss[small])
    verdict = "within" if max(abs(wall_ratio - 1), abs(rss_ratio - 1)) <= 0.2 else "NOT within"
    print(
        f"ratio 10^9 / 10^4: wall {wall_ratio:.3f}, peak RSS {rss_ratio:.3f} "
        f"({verdict} the 20% target)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
