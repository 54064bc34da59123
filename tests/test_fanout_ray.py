"""Fan-out on a real local Ray (the ``ray`` extra): a 16-point sweep and a 3-policy validate
give the same results as in-process; on a two-node ``ray.cluster_utils.Cluster`` jobs run on
both nodes, and removing one mid-sweep still completes every job exactly once; a job with a
missing trace fails alone. Every node listens on 127.0.0.1 (memshare.fanout.loopback)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import memshare, ok

from memshare.fanout.loopback import loopback_first
from memshare.fanout.options import FanOut
from memshare.fanout.run import fan_out
from memshare.fanout.tally import Tally
from memshare.sim.jobs import sim_job
from memshare.sim.options import SimOptions, build_configs, parse_sweep
from memshare.sim.run import LoadedTrace
from memshare.sim.study import sweep

# ray is imported inside the tests, after this (collected in .venv-vllm too, which has no ray)
loopback_first()

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
R1 = DATA / "reasoning"
MOONCAKE = DATA / "workloads" / "mooncake_synthetic_trace.jsonl"
POLICIES = ("none", "prefix", "exact-dedup", "cf-topk")


def tree(folder: Path) -> dict[str, bytes]:
    """Every result file under ``folder`` (perf.json, wall times and where a job ran, left
    out)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "perf.json"
    }


def loopback_nodes() -> set[str]:
    """The addresses of the nodes of the Ray instance this process joined."""
    import ray

    return {n["NodeManagerAddress"] for n in ray.nodes()}


def ran_on(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text())["ran_on"] for p in sorted(folder.rglob("perf.json"))]


@pytest.fixture
def local_ray() -> Iterator[str]:
    """A local Ray instance of 2 CPUs (the machine's), shut down after the test."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield "auto"
    finally:
        ray.shutdown()


def sixteen_points(smol: Path, out: Path, *extra: str) -> None:
    policies = [a for p in POLICIES for a in ("--policy", p)]
    ok(memshare("sweep", str(smol), "kv_blocks=10,20,40,80", *policies, "-o", str(out),
                "--set", "cf-topk.tau=0.5", *extra))  # fmt: skip


@pytest.mark.slow
def test_a_sweep_on_ray_equals_in_process(smol: Path, tmp_path: Path, local_ray: str) -> None:
    sixteen_points(smol, tmp_path / "local")
    sixteen_points(smol, tmp_path / "ray", "--ray", local_ray, "--workers", "2")
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")
    where = ran_on(tmp_path / "ray")
    assert len(where) == 16 and {w["address"] for w in where} == {"127.0.0.1"}
    assert len({w["pid"] for w in where}) == 2  # two worker actors served the 16 jobs
    assert {w["node"] for w in ran_on(tmp_path / "local")} == {"local"}
    assert loopback_nodes() == {"127.0.0.1"}


def test_a_job_with_a_missing_trace_fails_alone(smol: Path, tmp_path: Path, local_ray: str) -> None:
    from memshare.fanout.ray_executor import RayExecutor

    trace = LoadedTrace.load(smol)
    good = build_configs(SimOptions(trace=smol, policies=("none", "prefix")), trace.manifest)
    bad = good[0].with_(trace=str(tmp_path / "gone"))
    jobs = [sim_job(c, trace, c.policy) for c in good]
    jobs.insert(1, sim_job(bad, trace, "missing"))
    got = fan_out(jobs, RayExecutor(local_ray, workers=2), shared=None)
    assert [o.ok for o in got] == [True, False, True]
    assert got[1].error is not None and str(tmp_path / "gone") in got[1].error
    assert "\n" not in got[1].error
    assert [o.value.config.policy for o in (got[0], got[2])] == ["none", "prefix"]


@pytest.fixture(scope="module")
def mooncake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The public Mooncake trace, imported: runs long enough to lose a node during one."""
    assert MOONCAKE.is_file(), f"public data not found: {MOONCAKE}"
    out = tmp_path_factory.mktemp("mc") / "mc"
    ok(memshare("import", "mooncake", str(MOONCAKE), "-o", str(out)))
    return out


@pytest.mark.slow
def test_two_nodes_share_a_sweep_and_losing_one_loses_no_job(
    mooncake: Path, tmp_path: Path
) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        assert loopback_nodes() == {"127.0.0.1"}
        assert len(ray.nodes()) == 2
        opts = SimOptions(trace=mooncake, policies=("none", "prefix"), limit=1500)
        spec = parse_sweep("kv_blocks=300,400,500,600,700,800,900,1000")
        fan = FanOut(cluster.address, workers=2)
        sweep(opts, spec, tmp_path / "both", fan=fan)
        assert len({w["node"] for w in ran_on(tmp_path / "both")}) == 2  # jobs on both nodes
        removed: list[bool] = []
        tallies: list[Tally] = []

        def remove_once(t: Tally) -> None:
            tallies.append(t)
            if t.done >= 3 and not removed:
                removed.append(True)
                cluster.remove_node(worker, allow_graceful=False)

        sweep(opts, spec, tmp_path / "lost", fan=fan, jobs_progress=remove_once)
        last = tallies[-1]
        assert removed and last.done == 16 and last.failed == 0 and last.retried >= 1
        assert tree(tmp_path / "lost") == tree(tmp_path / "both")  # each job once, same results
        assert len(ran_on(tmp_path / "lost")) == 16
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def short_runs(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short R1 text captured on the default model, simulated under 3 policies."""
    path = R1 / "deepseek_r1_aime24_math500.jsonl"
    assert path.is_file(), f"public data not found: {path}"
    folder = tmp_path_factory.mktemp("rayval")
    trace = folder / "trace"
    ok(memshare("capture", "-o", str(trace), "--texts", str(path), "--field", "reasoning",
                "--limit", "1", "--max-tokens", "400"))  # fmt: skip
    runs = folder / "runs"
    ok(memshare("simulate", str(trace), "--policy", "none", "--policy", "prefix",
                "--policy", "cf-topk", "--set", "cf-topk.granularity=layer",
                "--set", "cf-topk.share=k", "--set", "cf-topk.tau=0.5",
                "--model-config", "smollm2-135m", "-o", str(runs)))  # fmt: skip
    return runs


@pytest.mark.slow
def test_validate_on_ray_equals_in_process(
    short_runs: Path, tmp_path: Path, local_ray: str
) -> None:
    import shutil

    reports = {}
    for name, extra in (("local", []), ("ray", ["--ray", local_ray, "--workers", "2"])):
        runs = tmp_path / name
        shutil.copytree(short_runs, runs)
        report = ok(memshare("validate", str(runs), "--fidelity-only", "--threads", "1",
                             "--json", *extra))  # fmt: skip
        reports[name] = json.loads(report)
    local, on_ray = reports["local"], reports["ray"]
    assert [len(j["runs"]) for j in on_ray["jobs"]] == [2, 1]  # none with the first group
    assert {j["ran_on"]["address"] for j in on_ray["jobs"]} == {"127.0.0.1"}
    assert local["jobs"][0]["ran_on"]["node"] == "local"
    for label in ("none", "prefix", "cf-topk"):
        a, b = local["policies"][label], on_ray["policies"][label]
        for key in ("pages_peak", "pages_mean", "kv_saved", "pages_shared", "steps_identical",
                    "top1_agreement", "kl_mean", "kl_p99", "ppl", "shares"):  # fmt: skip
            assert a[key] == b[key], (label, key)
        outputs = Path("engine") / "outputs.jsonl"
        assert (tmp_path / "local" / label / outputs).read_bytes() == (
            tmp_path / "ray" / label / outputs
        ).read_bytes()
    assert on_ray["policies"]["cf-topk"]["pages_shared"]["measured"] > 0  # a run that shares


@pytest.mark.slow
def test_ctrl_c_on_ray_cancels_the_jobs_and_keeps_only_whole_results(
    mooncake: Path, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from memshare.fanout.store import store_path

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "memshare.cli", "sweep", str(mooncake),
           "kv_blocks=300,400,500,600,700,800,900,1000", "--policy", "none", "--policy",
           "prefix", "--limit", "1500", "--ray", "auto", "--workers", "2",
           "-o", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = store_path(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if store.is_dir() and list(store.glob("*.pkl")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before Ctrl-C"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "sweep interrupted (Ctrl-C)" in err and "--resume" in err
    assert not out.exists()
    kept = sorted(p.suffix for p in store.iterdir())
    assert kept and set(kept) == {".pkl"}  # whole results only, no temporary file
