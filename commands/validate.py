"""``memshare validate``: its options (:class:`ValidateArgs`) and the command, which measures
simulated runs on a real executor and prints measured beside predicted."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from memshare.commands.fanout_args import FanOutArgs
from memshare.commands.options import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PlotOpt,
    RequestsLimitOpt,
    ThreadsOpt,
    block_size_option,
    fields_of,
    spread,
)
from memshare.commands.progress import Bar
from memshare.commands.render import out, print_json


@dataclasses.dataclass(frozen=True)
class ValidateArgs:
    """``validate``'s options in ``--help`` order; the field names are
    :class:`~memshare.validate.validation.ValidateOptions`'."""

    run: Annotated[
        Path,
        typer.Argument(help="A simulate run directory, or a folder of them (sweep, study)."),
    ]
    limit: RequestsLimitOpt = None
    model: ModelOpt = None
    device: DeviceOpt = "cpu"
    dtype: DtypeOpt = "float32"
    gpu: Annotated[
        str, typer.Option(help="Cost-model preset for the predicted times (cpu here).")
    ] = "cpu"
    fit_cost_model: Annotated[
        bool,
        typer.Option(
            "--fit-cost-model",
            help="Fit the cost model on the measured steps: RUN/cost_model.toml.",
        ),
    ] = False
    threads: ThreadsOpt = None
    kv_fraction: Annotated[
        float,
        typer.Option(
            "--kv-fraction",
            help="KV budget of the throughput runs, as a fraction of the blocks every "
            "request needs at once (at least the largest request).",
        ),
    ] = 0.5
    fidelity_only: Annotated[
        bool,
        typer.Option(
            "--fidelity-only",
            help="Only the teacher-forced part (memory, fidelity, sketch vs exact): no "
            "throughput runs at the budget, no generated answers.",
        ),
    ] = False
    one_pass: Annotated[
        bool,
        typer.Option(
            "--one-pass",
            help="Teacher-forced part: every run's step in one forward pass over one page "
            "arena (faster, one model in memory); the runs' own times are then not measured.",
        ),
    ] = False
    length_scale: Annotated[
        float,
        typer.Option(
            "--length-scale",
            help="Workload-only traces (Mooncake, Azure, BurstGPT): scale of the synthesized "
            "prompt and output lengths, in (0, 1].",
        ),
    ] = 0.05
    block_size: Annotated[
        int | None,
        block_size_option(
            "Workload-only traces: the engine's tokens per block (default 16; a captured "
            "trace's block size is its own)."
        ),
    ] = None
    engine: Annotated[
        str,
        typer.Option(
            help="torch (memshare's paged engine: every policy) or vllm (real vLLM, CPU "
            "build: none and prefix; time, prefix hits and blocks).",
        ),
    ] = "torch"
    replay_arrivals: Annotated[
        bool,
        typer.Option(
            "--replay-arrivals",
            help="--engine vllm: requests arrive as the run's --arrival says (trace times, "
            "poisson, closed:N) on vLLM's engine clock, and in the prediction; default: all "
            "at 0 s.",
        ),
    ] = False
    plot: PlotOpt = False
    fidelity_model: Annotated[
        Path | None,
        typer.Option(
            help="Fidelity model file: each run's predicted top-1 agreement and KL beside "
            "the measured (error, inside the interval or not).",
        ),
    ] = None
    fit_fidelity_model: Annotated[
        Path | None,
        typer.Option(
            help="Fit a fidelity model on the measured positions of every shared run and "
            "write it here (docs/fidelity-model.md).",
        ),
    ] = None


@spread
def validate_cmd(args: ValidateArgs, fan: FanOutArgs, as_json: JsonOpt = False) -> None:
    """Run the real model on the paged engine for every simulated run under RUN and report
    measured memory, fidelity and time beside the simulator's prediction (validation.json):
    teacher-forced texts for fidelity, throughput at a KV budget where none must queue, and
    answers generated under each policy for a trace captured from a dataset. With
    --engine vllm, real vLLM serves the budget run of each none/prefix run instead."""
    from memshare.errors import InputError
    from memshare.fanout.options import IN_PROCESS
    from memshare.validate.options import ValidateOptions
    from memshare.validate.report import render_validation
    from memshare.validate.validation import validate
    from memshare.validate.vllm.validate import validate_vllm

    fan_out = fan.fan_out()
    with Bar(as_json) as bar:
        opts = ValidateOptions(**fields_of(args))
        if opts.engine == "vllm":
            if fan_out != IN_PROCESS:
                raise InputError(
                    f"--ray {fan.ray}" if fan.ray else "--resume",
                    "applies to --engine torch (vLLM serves its runs itself)",
                    "leave --ray, --workers and --resume out",
                )
            report = validate_vllm(opts, status=bar.status)
        else:
            report = validate(opts, bar.status, bar.progress, fan=fan_out, jobs_progress=bar.jobs)
        bar.summary(fan_out.ray and "ray")
    if as_json:
        print_json(report)
        return
    render_validation(report, out)
