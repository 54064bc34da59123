"""The ``memshare`` CLI as the benchmark scripts run it (a subprocess; exits on failure)."""

from __future__ import annotations

import subprocess
import sys


def memshare(*args: str) -> str:
    """``python -m memshare.cli ARGS``'s stdout; the script exits with its stderr on failure."""
    res = subprocess.run(
        [sys.executable, "-m", "memshare.cli", *args], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        sys.exit(f"memshare {' '.join(args)}: {res.stderr.strip()[-2000:]}")
    return res.stdout
