"""What ``memshare validate RUN`` validates: the simulator's run directories under ``RUN``, their
configs, and the trace they ran on, checked unchanged (docs/validate.md).

``RUN`` is a run directory (``config.json``), or a folder of them (``simulate`` with several
policies: ``RUN/<policy>``; ``sweep``: ``RUN/<key=value>/<policy>``). Every run must name the
same trace, and the trace must be the one the run read: its ``requests.jsonl`` length and
checksum are compared with what the trace's manifest says now and with what ``config.json``
recorded.

Invariants: runs are returned in sorted folder order, each with a unique label (its path
under ``RUN``, or the policy name for a single run); a trace whose bytes changed, or a run directory
without a config, is an :class:`~memshare.errors.InputError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.sim.config import SimConfig
from memshare.sim.config_file import read_config
from memshare.sim.run import CONFIG, LoadedTrace


@dataclass(frozen=True)
class RunDir:
    """One simulation run to validate."""

    label: str  # how reports name it (the folder name; the policy for a single run)
    path: Path  # its folder
    config: SimConfig  # what it simulated
    recorded: dict[str, Any]  # config.json's "resolved" block (trace bytes, budget, ...)


def find_runs(root: Path) -> list[RunDir]:
    """The run directories under ``root`` (itself, or its sub-folders holding a config)."""
    if not root.is_dir():
        raise InputError(str(root), "is not a folder", "pass a simulate/sweep/study output folder")
    if (root / CONFIG).is_file():
        dirs = [root]
    else:  # simulate/study: OUT/<policy>; sweep: OUT/<key=value>/<policy>
        dirs = sorted({p.parent for p in (*root.glob(f"*/{CONFIG}"), *root.glob(f"*/*/{CONFIG}"))})
    if not dirs:
        raise InputError(
            str(root),
            f"holds no {CONFIG} (nor does any sub-folder)",
            "pass the folder memshare simulate -o wrote",
        )
    runs = []
    for d in dirs:
        cfg = read_config(d)
        raw = json.loads((d / CONFIG).read_text(encoding="utf-8"))
        label = cfg.policy if d == root else d.relative_to(root).as_posix()
        runs.append(RunDir(label, d, cfg, dict(raw.get("resolved") or {})))
    traces = {r.config.trace for r in runs}
    if len(traces) > 1:
        raise InputError(
            str(root), f"its runs name {len(traces)} different traces", "validate one at a time"
        )
    return runs


def load_checked_trace(run: RunDir) -> LoadedTrace:
    """The run's trace, verified (checksums) and checked unchanged since the run."""
    path = Path(run.config.trace)
    if not path.is_dir():
        raise InputError(
            f"{run.path / CONFIG}: trace",
            f"{path} no longer exists",
            "restore the trace or simulate again",
        )
    trace = LoadedTrace.load(path)
    m = trace.manifest
    want = (run.recorded.get("trace_bytes"), run.recorded.get("trace_sha256"))
    if want != (m.requests_bytes, m.requests_sha256):
        raise InputError(
            str(path / "requests.jsonl"),
            f"is not what the run read (sha256 {m.requests_sha256[:12]}..., {m.requests_bytes} "
            f"bytes; the run recorded {str(want[1])[:12]}..., {want[0]} bytes): the trace "
            "changed since the run",
            "simulate the trace again, then validate",
        )
    return trace


def check_model(trace: LoadedTrace, model_name: str) -> None:
    """The trace must come from the model validate runs (sketches and tokens are its)."""
    m = trace.manifest.model
    if m is not None and m.name != model_name:
        raise InputError(
            "--model",
            f"the trace was captured with {m.name}, validate loaded {model_name}",
            "pass the model the trace was captured with",
        )
