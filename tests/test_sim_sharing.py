"""Traces with KV sketches feed sharing policies: the simulator reports what the policy shares.

The policy object comes from the registry and decides every share through the manager; the
simulator only counts. A chain whose later reasoning steps repeat an earlier step (same tokens,
same sketches) gives cf-topk something to share; the sink block and the recent window never
are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memshare.sim.config import KVBudget, SimConfig, load_model
from memshare.sim.run import LoadedTrace, run_config
from memshare.traces.schema import Manifest, ModelInfo, RequestRecord, SketchSpec, kv_row_dtype
from memshare.traces.writer import TraceWriter

LAYERS, DIM, BS = 30, 8, 4


def repeating_chain(path: Path) -> LoadedTrace:
    """One request: a 4-token prompt, then 4 reasoning steps of 8 identical tokens each.

    Blocks 1-2, 3-4, 5-6 and 7-8 (step 0..3) have the same tokens and the same sketches.
    """
    model = ModelInfo("SmolLM2-135M-Instruct", "LlamaForCausalLM", LAYERS, 3, 64, "bfloat16")
    template = Manifest(kind="kv", block_size=BS, model=model, sketch=SketchSpec(dim=DIM))
    rng = np.random.default_rng(0)
    step_sketch = rng.standard_normal((2, LAYERS, 2, DIM))
    rows = np.zeros(10, dtype=kv_row_dtype(LAYERS, DIM))  # ceil(37 tokens / 4)
    rows["sketch"][0] = rng.standard_normal((LAYERS, 2, DIM))
    for b in range(1, 9):
        rows["sketch"][b] = step_sketch[(b - 1) % 2]
    rows["sketch"][9] = rng.standard_normal((LAYERS, 2, DIM))  # the partial last block
    rows["norm"] = np.linalg.norm(rows["sketch"].astype(np.float32), axis=-1)
    step_tokens = [11, 12, 13, 14, 15, 16, 17, 18]
    output = step_tokens * 4 + [0]
    rec = RequestRecord("chain", 0.0, 4, len(output), [1, 2, 3, 4], output, steps=[4, 12, 20, 28])
    with TraceWriter(path, template) as w:
        w.add(rec, rows)
    return LoadedTrace.load(path)


def test_cf_topk_shares_repeated_steps(tmp_path: Path) -> None:
    trace = repeating_chain(tmp_path / "kv")
    base = SimConfig(
        trace=str(trace.path), model=load_model("smollm2-135m"), kv=KVBudget(unlimited=True)
    )
    none = run_config(base.with_(policy="none"), trace).metrics
    shared = run_config(base.with_(policy="cf-topk", policy_params={"window": 1}), trace).metrics
    sh = shared["sharing"]
    assert none["sharing"]["shared_blocks"] == 0
    assert sh["shared_blocks"] > 0 and sh["share_rate"] > 0
    assert sh["mean_shared_distance"] is not None and sh["mean_shared_distance"] < 0.01
    per_layer = sh["per_layer_shared_fraction"]
    assert len(per_layer) == LAYERS and all(f == per_layer[0] > 0 for f in per_layer)
    assert shared["kv"]["peak_blocks_in_use"] < none["kv"]["peak_blocks_in_use"]


def test_study_rows_cover_every_option_and_save_what_cf_topk_shares(tmp_path: Path) -> None:
    from memshare.sim.options import SimOptions
    from memshare.sim.sharing_study import BASELINES, OPTIONS, run_study, write_study

    trace = repeating_chain(tmp_path / "kv")
    rows = run_study(
        SimOptions(trace=trace.path, kv_blocks="unlimited", sets=("window=1",)), taus=(0.0, 0.5)
    )
    assert [r.policy for r in rows[: len(BASELINES)]] == list(BASELINES)
    cf = rows[len(BASELINES) :]
    assert {(r.granularity, r.share) for r in cf} == set(OPTIONS) and len(cf) == 2 * len(OPTIONS)
    none = rows[0]
    assert none.saved_mean == 0.0 and none.page_share_rate == 0.0
    block_kv = [r for r in cf if (r.granularity, r.share) == ("block", "kv")]
    # repeated steps have identical sketches: shared at any tau, with distance 0
    assert all(r.saved_mean > 0 and r.mean_shared_distance == 0.0 for r in block_kv)
    for r in cf:
        assert r.mean_kv_bytes < none.mean_kv_bytes
        expected = 1 - r.mean_kv_bytes / none.mean_kv_bytes
        assert abs(r.saved_mean - expected) < 1e-12
    keys_only = next(r for r in cf if (r.granularity, r.share, r.tau) == ("block", "k", 0.5))
    assert keys_only.saved_mean < block_kv[0].saved_mean  # keys only frees half the pages
    paths = write_study(rows, tmp_path / "study", plot=True)
    assert [p.name for p in paths] == ["study.json", "study.csv", "saved_vs_tau.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_study_refuses_a_workload_trace(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "workloads"
    src = tmp_path / "mc.jsonl"
    src.write_text("".join((data / "mooncake_synthetic_trace.jsonl").open().readlines()[:5]))
    run = [sys.executable, "-m", "memshare.cli"]
    subprocess.run(
        [*run, "import", "mooncake", str(src), "-o", str(tmp_path / "t")],
        check=True,
        capture_output=True,
    )
    res = subprocess.run([*run, "study", str(tmp_path / "t")], capture_output=True, text=True)
    assert res.returncode == 2 and "no KV sketches" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
