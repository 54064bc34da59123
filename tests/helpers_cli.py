"""The ``memshare`` CLI as the tests run it: a real subprocess, offline, and its checks."""

from __future__ import annotations

import os
import subprocess
import sys


def memshare(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m memshare.cli ARGS`` with ``HF_HUB_OFFLINE=1``; never raises on exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "memshare.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=timeout,
    )


def ok(res: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a run that must have succeeded (its stderr's tail otherwise)."""
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, one line on stderr holding every needle, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def simulate_default_model(trace: object, out: object, *args: str) -> str:
    """``memshare simulate TRACE ARGS`` of the default model (a token workload names none),
    into ``out``; its stdout, after checking it succeeded."""
    cmd = ("simulate", str(trace), *args, "--model-config", "smollm2-135m", "-o", str(out))
    return ok(memshare(*cmd))
