"""The ``memshare`` CLI as the tests run it: in this process (``memshare`` below) or as a real
subprocess (``memshare_process``), offline, and the checks on what a run returns.

Both return what a user's shell would see: the exit status, stdout and stderr. In process, an
uncaught exception becomes its traceback on stderr and status 1 (what ``python`` does), and
warnings are shown on stderr under Python's default filters, so a "one line on stderr" check
fails on a stray warning as it would in a subprocess. In process is the default: it spares each
run the interpreter start, the torch import and, for the model commands, a model load from the
session's cache. ``memshare_process`` stays for what only a process shows (the entry point,
process-wide state such as ``OMP_NUM_THREADS``, signals, vLLM's engine processes).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Literal, TextIO

# Python's filters when no -W option or PYTHONWARNINGS is given (the ``warnings`` docs)
_DEFAULT_FILTERS: list[tuple[Literal["default", "ignore"], type[Warning], str]] = [
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
]


@contextlib.contextmanager
def _as_a_process(err: TextIO) -> Iterator[None]:
    """Warnings as a fresh ``python`` shows them (on ``err``), and ``HF_HUB_OFFLINE=1``; the
    test process's filters and environment variable are restored afterwards."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(_DEFAULT_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = show
            yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def memshare(*args: str) -> subprocess.CompletedProcess[str]:
    """``memshare ARGS`` in this process (``memshare.cli.main``), offline; never raises on
    its exit status. Returns what a subprocess would: status, stdout, stderr."""
    from memshare.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _as_a_process(err):
        try:
            main(list(args))
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:  # sys.exit("message"): the message on stderr, status 1
                print(e.code, file=sys.stderr)
                code = 1
        except Exception:
            traceback.print_exc(file=sys.stderr)
            code = 1
    cmd = ["memshare", *args]
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


def memshare_process(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
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
