"""Ctrl-C: exit status 130 and one line saying what stopped and what is on disk, whether it
lands while Python loads the CLI or in the middle of a command's work (issue 27).

Real SIGINTs: ``_thread.interrupt_main`` in process (what the terminal's Ctrl-C raises in the
main thread), and a signal to a real ``memshare`` process.
"""

from __future__ import annotations

import _thread
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
POLICIES = ("none", "prefix", "exact-dedup", "token-dedup")


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("interrupt") / "trace"
    ok(memshare("import", "mooncake", str(MOONCAKE_DEMO), "-o", str(out)))
    return out


def _simulate(trace: Path, out: Path) -> list[str]:
    args = ["simulate", str(trace), "-o", str(out), "--json"]
    for p in POLICIES:
        args += ["--policy", p]
    return args


def test_ctrl_c_mid_simulate_is_130_one_line_and_leaves_no_run(trace: Path, tmp_path: Path) -> None:
    warm = tmp_path / "warm"
    ok(memshare(*_simulate(trace, warm)))  # imports done: the interrupt lands in the work
    started = time.perf_counter()
    out = tmp_path / "run"
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        res = memshare(*_simulate(trace, out))
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - started
    assert elapsed > 0.3, "the run ended before the interrupt: make it longer"
    assert res.returncode == 130, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"memshare: simulate interrupted (Ctrl-C); {out} is as it was")
    assert res.stdout == ""
    assert not out.exists()  # a run's folder appears only when the run finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm"]  # no staging litter


def test_ctrl_c_while_the_cli_loads_is_130_and_one_line(trace: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # the console script's call, after a mark on a pipe: Python itself has started by then
    read, write = os.pipe()
    code = f"import os; os.write({write}, b'.'); os.close({write}); "
    code += "from memshare.launch import main; main()"
    args = [sys.executable, "-c", code, *_simulate(trace, tmp_path / "run")]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, pass_fds=(write,)
    )
    os.close(write)
    assert os.read(read, 1) == b"."
    os.close(read)
    time.sleep(0.2)  # loading the CLI takes longer: the signal lands in the guarded import
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == 130, (proc.returncode, text)
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert lines[0].startswith("memshare: ") and "interrupted (Ctrl-C)" in lines[0]
    assert out == b""
