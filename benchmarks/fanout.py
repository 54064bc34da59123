"""In-process against Ray with 2 workers, whole commands, wall seconds (docs/fanout.md).

Printed (one JSON object): Ray's start-up (``ray.init`` of a local instance on 127.0.0.1 and
the first actor's reply; then the shutdown), and two pairs timed alternately, in-process then
Ray, ``--repeats`` times (median and each run; the ratio Ray / in-process pair by pair):

- a 16-point simulator sweep: ``TRACE`` (e.g. the imported Mooncake trace) at 8 KV budgets
  under ``none`` and ``prefix``, ``--limit`` requests;
- a validate of the runs under ``RUN`` (e.g. ``memshare demo``'s ``OUT/sim``: 4 policies),
  ``--fidelity-only``, a fresh copy each time; in-process on every core, on Ray one thread
  per worker.

Run: ``.venv/bin/python benchmarks/fanout.py TRACE RUN``. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RAY = ["--ray", "auto", "--workers", "2"]


def timed(args: list[str]) -> float:
    """Wall seconds of ``memshare ARGS`` as a process (exits on failure)."""
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "memshare.cli", *args], capture_output=True,
                         text=True, check=False)  # fmt: skip
    if res.returncode != 0:
        sys.exit(f"memshare {' '.join(args)}: {res.stderr.strip()[-2000:]}")
    return time.perf_counter() - t


def startup() -> dict[str, float]:
    """Seconds to start a local instance and get a first actor's reply, and to stop it."""
    from memshare.fanout.loopback import loopback_first

    loopback_first()
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()

    @ray.remote
    class Probe:
        def ping(self) -> int:
            return 1

    ray.get(Probe.remote().ping.remote())  # type: ignore[attr-defined]
    t2 = time.perf_counter()
    ray.shutdown()
    t3 = time.perf_counter()
    return {"init_s": t1 - t0, "first_actor_s": t2 - t1, "shutdown_s": t3 - t2}


def pair(make: Any, repeats: int) -> dict[str, Any]:
    """``make(ray: bool) -> args``, timed in-process then on Ray, ``repeats`` times."""
    local, on_ray = [], []
    for _ in range(repeats):
        local.append(timed(make(False)))
        on_ray.append(timed(make(True)))
    ratios = [r / p for r, p in zip(on_ray, local, strict=True)]
    return {
        "in_process_s": statistics.median(local),
        "ray_s": statistics.median(on_ray),
        "ray_over_in_process": statistics.median(ratios),
        "runs": {"in_process_s": local, "ray_s": on_ray},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path, help="a trace to sweep (e.g. the imported Mooncake)")
    ap.add_argument("run", type=Path, help="simulate runs to validate (e.g. demo's OUT/sim)")
    ap.add_argument("--limit", type=int, default=4000, help="requests per sweep point")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    budgets = "kv_blocks=500,600,700,800,900,1000,1200,1500"
    sweep = ["sweep", str(a.trace), budgets, "--policy", "none", "--policy", "prefix",
             "--limit", str(a.limit), "-o", str(tmp / "sweep"), "--overwrite"]  # fmt: skip

    def validate(ray: bool) -> list[str]:
        runs = tmp / "runs"
        shutil.rmtree(runs, ignore_errors=True)
        shutil.copytree(a.run, runs)
        (runs / "validation.json").unlink(missing_ok=True)
        return ["validate", str(runs), "--fidelity-only", *(RAY if ray else [])]

    out = {
        "ray_startup": startup(),
        "sweep_16_points": pair(lambda ray: sweep + (RAY if ray else []), a.repeats),
        "validate": pair(validate, a.repeats),
    }
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
