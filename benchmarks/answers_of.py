"""Generated answers of ``cf-topk`` settings against the unshared run, on every problem of a
trace captured with ``--dataset`` (``tune --target answers=``'s measurement, on all of them):
answer agreement and accuracy with exact binomial 95% intervals, token agreement, KV saved
(measured and simulated). Issue 25's check of the tuned setting on 64 GSM8K problems.

    .venv/bin/python benchmarks/answers_of.py TRACE --taus 0.3,0.35 [--set KEY=VALUE ...]

Each tau is ``cf-topk`` at layer granularity, keys only (tune's defaults), with the ``--set``
parameters; every setting and the unshared run step in one forward pass. Figures, never
assertions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memshare.fanout.host import Host
from memshare.sim.options import SimOptions, build_configs
from memshare.sim.run import LoadedTrace, resolve
from memshare.tune.answers import check_generated, measure_answer_points
from memshare.tune.points import PointInputs
from memshare.validate.jobs import ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--taus", default="0.35")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    a = ap.parse_args()
    sets = ("granularity=layer", "share=k", *a.sets)
    (cfg,) = build_configs(SimOptions(a.trace, policies=("cf-topk",), sets=sets, gpu="cpu"))
    trace = LoadedTrace.load(a.trace)
    check_generated(trace)
    bs = resolve(cfg, trace).block_size
    cfgs = [
        cfg.with_(policy_params={**cfg.policy_params, "tau": float(t)}) for t in a.taus.split(",")
    ]
    inputs = PointInputs(ModelSpec(None, "cpu", "float32", None), trace, bs, "cpu")
    t0 = time.perf_counter()
    points = measure_answer_points(Host(), inputs, cfgs, [r.id for r in trace.records], None)
    rows = [
        {
            "params": p.params,
            "problems": len(p.texts),
            "kv_saved": p.kv_saved,
            **{k: p.measured[k] for k in ("answer_agreement", "answer_agreement_ci95")},
            **{k: p.measured[k] for k in ("accuracy", "accuracy_ci95", "token_agreement")},
        }
        for p in points
    ]
    print(json.dumps({"runs": rows, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
