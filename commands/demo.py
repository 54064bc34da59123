"""``memshare demo``: the main job on the embedded default (capture -> simulate -> validate)
and its tables, or with ``--workload`` the bundled Mooncake slice imported and inspected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from memshare.commands.options import JsonOpt, output_option
from memshare.commands.progress import Bar
from memshare.commands.render import out
from memshare.commands.traces import import_cmd, show_trace

if TYPE_CHECKING:
    from memshare.validate.pipeline import DemoResult


def demo_cmd(
    output: Annotated[Path, output_option("Folder for the demo's trace and runs.")] = Path(
        "memshare-demo"
    ),
    workload: Annotated[
        bool,
        typer.Option(
            "--workload", help="Only import the bundled Mooncake slice and show its reuse."
        ),
    ] = False,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Run today's full demo (all prompts, every validate pass); the default is "
            "the quick demo.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The main job on the embedded default: capture -> simulate -> validate, tables + plots.

    The default model answers 4 bundled GSM8K prompts (8 with ``--full``; the trace: token ids,
    reasoning steps, K/V sketches); the simulator replays it under none, prefix, exact-dedup
    and cf-topk; then validate runs each on the real model and reports measured beside
    predicted (teacher-forced in one pass; ``--full`` adds the budget and free-generation runs).
    """
    if workload:
        _workload(output / "workload", as_json)
        return
    from memshare.validate.pipeline import run_demo

    with Bar(as_json, rate=True) as bar, Bar(as_json, None) as runs, Bar(as_json) as vbar:
        result = run_demo(
            output,
            full=full,
            capture_progress=bar.capture,
            sim_progress=runs.run,
            status=vbar.status,
            validate_progress=vbar.progress,
        )
    if as_json:
        _print_demo_json(result)
    else:
        _render_demo(result)


def _workload(target: Path, as_json: bool) -> None:
    """Import the bundled Mooncake slice into ``target`` (once) and show it."""
    if (target / "manifest.json").exists():
        show_trace(target, as_json=as_json, reuse=True, block_size=None, title=str(target))
        return
    from memshare.demo import demo_workload

    fmt, src = demo_workload()
    import_cmd(fmt, src, target, limit=None, as_json=as_json)


def _print_demo_json(result: DemoResult) -> None:
    from memshare.sim.study import study_json

    print(
        json.dumps(
            {
                "trace": str(result.trace),
                "capture": result.capture,
                "simulate": study_json(result.study),
                "validate": result.validation,
                "seconds": result.seconds,
            },
            indent=2,
        )
    )


def _render_demo(result: DemoResult) -> None:
    from memshare.sim.report import render_study
    from memshare.validate.report import render_validation

    cap = result.capture
    if cap is not None:
        out.print(
            f"captured {result.trace}: {cap['requests']} requests, {cap['prompt_tokens']:,} "
            f"prompt + {cap['output_tokens']:,} generated tokens in "
            f"{result.seconds['capture']:.0f} s"
        )
    else:
        out.print(f"reused the capture in {result.trace}")
    render_study(result.study, out)
    out.print(f"simulated in {result.seconds['simulate']:.1f} s")
    render_validation(result.validation, out)
    out.print(
        f"validated on the real model in {result.seconds['validate']:.0f} s "
        f"({result.trace.parent / 'sim' / 'validation.json'}); next: memshare study {result.trace}"
    )
