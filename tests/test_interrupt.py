"""Ctrl-C: exit status 130 and one line saying what stopped and what is on disk, whether it
lands while Python loads the CLI or in the middle of a command's work (issue 27).

Real SIGINTs: ``_thread.interrupt_main`` in process (what the terminal's Ctrl-C raises in the
main thread), and a signal to a real ``memshare`` process.
"""

from __future__ import annotations

import _thread
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers_cli import memshare, ok

MOONCAKE_DEMO = Path(__file__).resolve().parents[1] / "memshare" / "data" / "mooncake_demo.jsonl"
MOONCAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "workloads"
MOONCAKE_FULL = MOONCAKE / "mooncake_synthetic_trace.jsonl"
POLICIES = ("none", "prefix", "exact-dedup", "token-dedup")


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("interrupt") / "trace"
    ok(memshare("import", "mooncake", str(MOONCAKE_DEMO), "-o", str(out)))
    return out


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full public Mooncake trace: 4 policies take seconds to simulate on it (the demo
    slice, well under a second since the simulator's decode bursts)."""
    assert MOONCAKE_FULL.is_file(), f"public data not found: {MOONCAKE_FULL}"
    out = tmp_path_factory.mktemp("interrupt") / "long"
    ok(memshare("import", "mooncake", str(MOONCAKE_FULL), "-o", str(out)))
    return out


def _simulate(trace: Path, out: Path) -> list[str]:
    args = ["simulate", str(trace), "-o", str(out), "--json"]
    for p in POLICIES:
        args += ["--policy", p]
    return args


def test_ctrl_c_mid_simulate_is_130_one_line_and_leaves_no_run(
    trace: Path, long_trace: Path, tmp_path: Path
) -> None:
    warm = tmp_path / "warm"
    ok(memshare(*_simulate(trace, warm)))  # imports done: the interrupt lands in the work
    started = time.perf_counter()
    out = tmp_path / "run"
    timer = threading.Timer(0.3, _thread.interrupt_main)
    # no garbage collection meanwhile: an interrupt that lands in a gc callback (hypothesis
    # installs one in this process) is "unraisable" and lost, which no user's Ctrl-C meets
    gc.disable()
    timer.start()
    try:
        res = memshare(*_simulate(long_trace, out))
    finally:
        timer.cancel()
        gc.enable()
    elapsed = time.perf_counter() - started
    assert elapsed > 0.3, "the run ended before the interrupt: make it longer"
    assert res.returncode == 130, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"memshare: simulate interrupted (Ctrl-C); {out} is as it was")
    assert res.stdout == ""
    assert not out.exists()  # a run's folder appears only when the run finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm"]  # no staging litter


# moments after the console script's call: in the imports (~0.3 s on a 2-core CPU), in typer's
# set-up and rich's lazy imports, and early in the command's work
MOMENTS_S = (0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.24, 0.28, 0.34, 0.42, 0.5)


@pytest.mark.parametrize("delay", MOMENTS_S)
def test_ctrl_c_while_the_cli_starts_is_130_and_one_line(
    trace: Path, tmp_path: Path, delay: float
) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # what the console script runs, with a mark on a pipe once its own import is done
    read, write = os.pipe()
    code = f"from memshare.launch import main; import os; os.write({write}, b'.'); "
    code += f"os.close({write}); main()"
    run = tmp_path / "run"
    args = [sys.executable, "-c", code, *_simulate(trace, run)]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, pass_fds=(write,)
    )
    os.close(write)
    assert os.read(read, 1) == b"."
    os.close(read)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == 130, (delay, proc.returncode, text)
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert lines[0].startswith("memshare: ") and "interrupted (Ctrl-C)" in lines[0]
    assert out == b""
    assert not run.exists()
