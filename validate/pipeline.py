"""The main job on the embedded default (``memshare demo``): capture -> simulate -> validate,
quick (the default) or full (``--full``).

1. Capture: the default model (SmolLM2-135M-Instruct) answers the bundled GSM8K prompts
   (greedy); the trace holds token ids, reasoning steps and per-block, per-layer K/V sketches.
   A finished capture in the output folder that holds enough prompts is reused (its first
   ``prompts`` answers); one that holds fewer, or an interrupted one, is resumed, which
   captures exactly what an uninterrupted run would: the two modes answer with the same
   generation settings, so ``--full`` after the quick demo only adds the remaining prompts.
2. Simulate: those answers under ``none``, ``prefix``, ``exact-dedup`` and ``cf-topk`` on the
   simulator's defaults (H100 preset, the trace's model), one comparison table and its plots.
   ``cf-topk`` runs per layer, keys only, at tau 0.5 (:data:`DEMO_SETS`): the registry
   defaults (whole blocks, tau 0.2) share nothing on these prompts, so the demo would not show
   what the tool is for (measured figures: docs/results.md, "The demo").
3. Validate: every simulated run re-run on the real model's paged engine beside the
   simulator's prediction of the same workload (docs/validate.md): pages, savings, fidelity
   against the unshared engine; ``OUT/sim/validation.json`` and ``kv_in_use.png``.

The modes (:data:`QUICK_DEMO`, :data:`FULL_DEMO`) differ in how many prompts they answer and
which validate passes run. Quick: 4 prompts, validate teacher-forced only, all runs' steps in
one forward pass (``fidelity_only``, ``one_pass``): it still shows ``cf-topk``'s saving beside
its measured fidelity and the lossless policies taking exactly the simulator's steps, in about
3 minutes on a 2-core CPU. Full: 8 prompts and every pass (teacher-forced and timed, a run at a
tight KV budget, free generation with answers), about 9 minutes.

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
from memshare.validate.options import ValidateOptions
from memshare.validate.validation import validate

DEMO_POLICIES = ("none", "prefix", "exact-dedup", "cf-topk")
DEMO_SETS = ("cf-topk.granularity=layer", "cf-topk.share=k", "cf-topk.tau=0.5")


@dataclass(frozen=True)
class DemoSettings:
    """One demo's size and validate passes. The defaults are the quick demo's
    (:data:`QUICK_DEMO`); a capture is reused or resumed only under the same
    ``max_new_tokens`` and ``batch_size``."""

    prompts: int = 4  # bundled GSM8K prompts to answer (the first N)
    max_new_tokens: int = 256  # tokens per answer, at most
    batch_size: int = 4  # prompts generated together
    fidelity_only: bool = True  # validate teacher-forced only: no budget run, no answers
    one_pass: bool = True  # validate every run's steps in one forward pass (no times)


QUICK_DEMO = DemoSettings()
FULL_DEMO = DemoSettings(prompts=8, fidelity_only=False, one_pass=False)


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
    full: bool = False,
    capture_progress: ProgressFn | None = None,
    sim_progress: StudyProgress | None = None,
    status: Callable[[str], None] | None = None,
    validate_progress: Progress | None = None,
) -> DemoResult:
    """Capture (or reuse) the embedded default, simulate it under :data:`DEMO_POLICIES` and
    validate the simulated runs on the real model: :data:`FULL_DEMO` if ``full``, else
    :data:`QUICK_DEMO`; ``settings``, when given, replaces either (tests use small ones)."""
    s = settings or (FULL_DEMO if full else QUICK_DEMO)
    trace = out / "trace"
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    summary = _capture(trace, s, capture_progress, status)
    seconds["capture"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    study = simulate(
        SimOptions(trace=trace, policies=DEMO_POLICIES, sets=DEMO_SETS, limit=s.prompts),
        out / "sim",
        overwrite=True,  # the demo's own folder: each demo replaces its last simulation whole
        plot=True,
        progress=sim_progress,
    )
    seconds["simulate"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    report = validate(
        ValidateOptions(
            run=out / "sim",
            limit=s.prompts,
            plot=True,
            fidelity_only=s.fidelity_only,
            one_pass=s.one_pass,
        ),
        status=status,
        progress=validate_progress,
    )
    seconds["validate"] = time.perf_counter() - t2
    return DemoResult(trace, summary, study, report, seconds)


def _capture(
    trace: Path,
    s: DemoSettings,
    progress: ProgressFn | None,
    status: Callable[[str], None] | None,
) -> dict[str, Any] | None:
    """The capture's summary, or None when a finished capture of at least ``s.prompts``
    answers is reused; otherwise a fresh capture, or a resumed one (an interrupted capture,
    or a finished one of fewer prompts: resume checks that the settings match)."""
    started = (trace / "manifest.json").is_file()
    if started:
        manifest = load_manifest(trace)
        if manifest.complete and manifest.counts.requests >= s.prompts:
            if status is not None:
                status(f"reusing the capture in {trace}")
            return None
    return capture(
        CaptureOptions(
            output=trace,
            limit=s.prompts,
            generation=GenerationSettings(s.max_new_tokens, 0.0, 1.0, 0, s.batch_size),
            resume=started,
        ),
        progress=progress,
    )
