"""The fan-out seam without Ray: the job store behind ``--resume`` (a driver killed with
SIGKILL mid-sweep, then resumed, leaves the same folder as an uninterrupted sweep), the
options' one-line errors, and outcomes in job order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_cli import assert_one_line_error, memshare, ok

from memshare.fanout.host import Host
from memshare.fanout.jobs import Job
from memshare.fanout.local import LocalExecutor
from memshare.fanout.run import fan_out
from memshare.fanout.store import JobStore, store_path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOONCAKE = DATA / "workloads" / "mooncake_synthetic_trace.jsonl"


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path (perf.json, the wall times, left out)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "perf.json"
    }


def square(host: Host, shared: int, x: int) -> int:
    """A job: ``shared + x * x``; refuses a negative ``x`` as bad input."""
    from memshare.errors import InputError

    if x < 0:
        raise InputError(f"x={x}", "is negative", "give x >= 0")
    return shared + x * x


def test_outcomes_come_back_in_job_order_and_a_refused_job_fails_alone(tmp_path: Path) -> None:
    jobs = [Job(f"sq-{x}", f"x={x}", square, (x,)) for x in (3, -1, 2)]
    store = JobStore(tmp_path / ".out.jobs", resume=False)
    got = fan_out(jobs, LocalExecutor(), shared=10, store=store)
    assert [o.value for o in got] == [19, None, 14]
    assert got[1].error == "x=-1: is negative; give x >= 0" and got[0].ok and got[2].ok
    # only whole successes are stored; a resumed run takes them and runs the rest
    assert sorted(p.name for p in store.folder.iterdir()) == ["sq-2.pkl", "sq-3.pkl"]
    again = fan_out(jobs, LocalExecutor(), shared=10, store=JobStore(store.folder, resume=True))
    assert [o.resumed for o in again] == [True, False, True]
    assert [o.value for o in again] == [19, None, 14]
    JobStore(store.folder, resume=False)  # a run without --resume starts empty
    assert not store.folder.exists()


def test_fan_out_options_refuse_in_one_line(tmp_path: Path) -> None:
    trace = tmp_path / "kv"
    from test_hardening import smol_kv_trace

    smol_kv_trace(trace)
    for extra, needles in (
        (["--workers", "2"], ["--workers 2", "--ray auto"]),
        (["--ray", "auto", "--workers", "0"], ["--workers 0", "at least 1"]),
        (["--ray", " "], ["--ray", "auto or a cluster"]),
        (["--ray", "nonsense"], ["--ray nonsense", "HOST:PORT"]),
        (["--ray", "127.0.0.1:1"], ["--ray 127.0.0.1:1", "no Ray cluster answers there"]),
    ):
        res = memshare("sweep", str(trace), "kv_blocks=10,20", "-o", str(tmp_path / "o"), *extra)
        assert_one_line_error(res, *needles)
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_sweep_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    assert MOONCAKE.is_file(), f"public data not found: {MOONCAKE}"
    trace = tmp_path / "mc"
    ok(memshare("import", "mooncake", str(MOONCAKE), "-o", str(trace)))
    args = ["sweep", str(trace), "kv_blocks=600,800,1000,1200", "--policy", "none",
            "--policy", "prefix", "--limit", "2000"]  # fmt: skip
    whole = tmp_path / "whole"
    ok(memshare(*args, "-o", str(whole)))
    out = tmp_path / "out"
    store = store_path(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "memshare.cli", *args, "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if store.is_dir() and len(list(store.glob("*.pkl"))) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(store.glob("*.pkl")))
    assert 2 <= kept < 8 and not out.exists()
    ok(memshare(*args, "-o", str(out), "--resume"))
    assert tree(out) == tree(whole)
    perfs = [p.read_text() for p in out.rglob("perf.json")]
    assert sum('"resumed": true' in p for p in perfs) == kept  # taken from the store, not rerun
    assert not store.exists()  # the store goes once the output is whole


@pytest.mark.vllm
def test_ray_without_its_extra_says_how_to_install_it(tmp_path: Path) -> None:
    """Runs in .venv-vllm, which holds the vllm extra and not the ray one: ``--ray`` refuses
    in one line, before any work, naming the install."""
    import importlib.util

    from test_hardening import smol_kv_trace

    assert importlib.util.find_spec("ray") is None, "this environment has Ray"
    trace = smol_kv_trace(tmp_path / "kv")
    res = memshare(
        "sweep", str(trace), "kv_blocks=10,20", "--ray", "auto", "-o", str(tmp_path / "o")
    )
    assert_one_line_error(res, "--ray auto", "Ray is not installed", "memshare[ray]")
    assert not (tmp_path / "o").exists()
