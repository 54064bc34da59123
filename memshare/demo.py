"""The embedded default input of ``memshare demo`` (package data, no network)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def demo_workload() -> tuple[str, Path]:
    """(format, path) of the bundled demo workload: 400 rows of the Mooncake trace."""
    path = Path(str(resources.files("memshare") / "data" / "mooncake_demo.jsonl"))
    return "mooncake", path
