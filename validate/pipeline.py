"""The main job on the embedded default (``memshare demo``): capture -> simulate -> validate.

1. Capture: the default model (SmolLM2-135M-Instruct) answers the bundled GSM8K prompts
   (greedy); the trace holds token ids, reasoning steps and per-block, per-layer K/V sketches.
   A finished capture in the output folder is reused; an interrupted one is resumed.
2. Simulate: that trace under ``none``, ``prefix``, ``exact-dedup`` and ``cf-topk`` on the
   simulator's defaults (H100 preset, the trace's model), one comparison table and its plots.
   ``cf-topk`` runs per layer, keys only, at tau 0.5 (:data:`DEMO_SETS`): the registry
   defaults (whole blocks, tau 0.2) share nothing on these prompts, so the demo would not show
   what the tool is for. On the 8 bundled answers with d = 256 sketches, layer/k at tau 0.5
   shares 9.1% of pages and saves 4.3% of mean KV (``memshare demo``); with d = 64 sketches,
   ``memshare study`` on the first 4 answers gave 4.2% at tau 0.5, 0.1% at tau 0.3 and 0% for
   every block-granularity setting.

3. Validate: every simulated run re-run on the real model's paged engine beside the
   simulator's prediction of the same workload (docs/validate.md): pages, savings, fidelity
   against the unshared engine, time; ``OUT/sim/validation.json`` and ``kv_in_use.png``.

Everything lands under one folder: ``OUT/trace`` and ``OUT/sim`` (a run directory per policy,
``comparison.json``, ``validation.json``, PNGs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memshare.sim.options import SimOptions
from memshare.sim.results import StudyResult
from memshare.sim.study import StudyProgress, simulate
from memshare.traces.capture import CaptureOptions, GenerationSettings, capture
from memshare.traces.capture.run import ProgressFn
from memshare.traces.reader import load_manifest
from memshare.validate.measure import Progress
from memshare.validate.validation import ValidateOptions, validate

DEMO_POLICIES = ("none", "prefix", "exact-dedup", "cf-topk")
DEMO_SETS = ("cf-topk.granularity=layer", "cf-topk.share=k", "cf-topk.tau=0.5")


@dataclass
class DemoSettings:
    """The embedded default's size (small enough for a 2-core CPU in a few minutes)."""

    prompts: int = 8  # bundled GSM8K prompts to answer
    max_new_tokens: int = 256  # tokens per answer
    batch_size: int = 4  # prompts generated together


@dataclass
class DemoResult:
    """What the demo made."""

    trace: Path  # the captured trace
    capture: dict[str, Any] | None  # capture summary (None: an earlier capture was reused)
    study: StudyResult  # the simulated comparison
    validation: dict[str, Any]  # validation.json: the runs measured on the real model
    seconds: dict[str, float]  # wall time per stage


def run_demo(
    out: Path,
    settings: DemoSettings | None = None,
    *,
    capture_progress: ProgressFn | None = None,
    sim_progress: StudyProgress | None = None,
    status: Callable[[str], None] | None = None,
    validate_progress: Progress | None = None,
) -> DemoResult:
    """Capture (or reuse) the embedded default, simulate it under :data:`DEMO_POLICIES` and
    validate the simulated runs on the real model."""
    s = settings or DemoSettings()
    trace = out / "trace"
    seconds: dict[str, float] = {}
    summary: dict[str, Any] | None = None
    t0 = time.perf_counter()
    if (trace / "manifest.json").is_file() and load_manifest(trace).complete:
        if status is not None:
            status(f"reusing the capture in {trace}")
    else:
        summary = capture(
            CaptureOptions(
                output=trace,
                limit=s.prompts,
                generation=GenerationSettings(s.max_new_tokens, 0.0, 1.0, 0, s.batch_size),
                resume=(trace / "manifest.json").is_file(),
            ),
            progress=capture_progress,
        )
    seconds["capture"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    study = simulate(
        SimOptions(trace=trace, policies=DEMO_POLICIES, sets=DEMO_SETS),
        out / "sim",
        plot=True,
        progress=sim_progress,
    )
    seconds["simulate"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    report = validate(
        ValidateOptions(run=out / "sim", plot=True), status=status, progress=validate_progress
    )
    seconds["validate"] = time.perf_counter() - t2
    return DemoResult(trace, summary, study, report, seconds)
