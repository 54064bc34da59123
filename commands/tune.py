"""``memshare tune``: search a policy's settings in the simulator with a fitted fidelity model,
validate the frontier on the real model, and print the winning setting."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated

import typer

from memshare.commands.fanout_args import FanOutArgs
from memshare.commands.options import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    OverwriteOpt,
    SimSetOpt,
    ThreadsOpt,
    TraceArg,
    output_option,
    spread,
)
from memshare.commands.progress import Bar, status_lines
from memshare.commands.render import out, print_json

if typing.TYPE_CHECKING:
    from memshare.tune.result import TuneOptions, TuneResult


@dataclasses.dataclass(frozen=True)
class TuneArgs:
    """``tune``'s options in ``--help`` order."""

    trace: TraceArg
    target: Annotated[
        str,
        typer.Option(
            help="top1=A (measured top-1 agreement >= A), kl=K (mean KL <= K) or answers=A "
            "(generated answers agreeing with the unshared run's >= A; a capture --dataset trace)."
        ),
    ] = "top1=0.99"
    policy: Annotated[
        str,
        typer.Option(
            help="The policy to tune: cf-topk (a tau per layer; one tau for answers=), "
            "kvsharer (layers) or kvshare (recompute; answers= only)."
        ),
    ] = "cf-topk"
    sets: SimSetOpt = None
    budget: Annotated[
        int, typer.Option(help="Validate runs of frontier points, at most (calibration aside).")
    ] = 4
    holdout: Annotated[
        str | None,
        typer.Option(
            help="Request ids held out for validation, comma-separated "
            "(default: every second text)."
        ),
    ] = None
    limit: Annotated[int | None, typer.Option(help="Use the trace's first N texts.", min=2)] = None
    max_num_seqs: Annotated[
        int,
        typer.Option(
            help="Running requests at most, in the simulator and the engine (below the texts' "
            "count, later requests find earlier ones' KV cached: what kvshare reuses)."
        ),
    ] = 256
    model: ModelOpt = None
    device: DeviceOpt = "cpu"
    dtype: DtypeOpt = "float32"
    threads: ThreadsOpt = None
    compare: Annotated[
        list[Path] | None,
        typer.Option(
            help="An earlier tune's -o folder on the same held-out texts, drawn on "
            "frontier.png too (repeat)."
        ),
    ] = None


@spread
def tune_cmd(
    args: TuneArgs,
    fan: FanOutArgs,
    output: Annotated[
        Path | None, output_option("Output folder (default: runs/tune-TRACE).")
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Find the setting that saves the most KV at the target fidelity: calibrate a fidelity
    model on some texts, search the predicted frontier in the simulator, validate its points
    on held-out texts and refit (tune.json, frontier.png, fidelity_model.json)."""
    from memshare.sim.options import SimOptions, build_configs
    from memshare.tune.loop import tune
    from memshare.tune.result import TuneOptions
    from memshare.tune.target import Target
    from memshare.validate.jobs import ModelSpec

    target = Target.parse(args.target)
    defaults = ("granularity=layer", "share=k") if args.policy == "cf-topk" else ()
    sets = (*defaults, *(args.sets or ()))
    sim = SimOptions(
        args.trace,
        policies=(args.policy,),
        sets=sets,
        gpu="cpu",
        max_num_seqs=args.max_num_seqs,
    )
    (cfg,) = build_configs(sim)
    holdout = [h.strip() for h in args.holdout.split(",") if h.strip()] if args.holdout else None
    spec = ModelSpec(args.model, args.device, args.dtype, args.threads)
    opts = TuneOptions(
        cfg, target, args.budget, holdout, args.limit, spec, compare=list(args.compare or ())
    )
    dest = output or Path("runs") / f"tune-{args.trace.resolve().name}"
    fan_out = fan.fan_out()
    with Bar(as_json) as bar:
        piped = status_lines(as_json or bar.live)  # a line per stage when not drawn

        def stage(message: str) -> None:
            bar.status(message)
            if piped is not None:
                piped(message)

        result = tune(
            opts,
            dest,
            fan_out,
            stage,
            overwrite=overwrite,
            progress=bar.progress,
            jobs_progress=bar.jobs,
        )
        bar.summary(fan_out.ray and "ray")
    if as_json:
        best = result.best
        print_json({"output": str(dest), "best": None if best is None else best[1].params})
    else:
        _render(result, opts, dest)


def _top1(predicted: float | None, m: dict[str, typing.Any]) -> str:
    lo, hi = m["top1_agreement_ci95"]
    guess = "" if predicted is None else f" (predicted {100 * predicted:.2f}%)"
    return f"top-1 {100 * m['top1_agreement']:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}]{guess}"


def _answers(m: dict[str, typing.Any]) -> str:
    lo, hi = m["answer_agreement_ci95"]
    return (
        f"answers agreeing {100 * m['answer_agreement']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}], "
        f"prompt tokens reused {100 * m['reused_share']:.1f}%"
    )


def _render(result: TuneResult, opts: TuneOptions, dest: Path) -> None:
    """Each validated point, predicted beside measured, and the winning line."""
    from memshare.tune.points import short
    from memshare.tune.report import winning_line

    best, target = result.best, opts.target
    for c, p in result.validated:
        out.print(
            f"{short(c.params)}: KV saved "
            f"{100 * (p.kv_saved['measured'] or 0):.2f}% (predicted {100 * c.kv_saved:.2f}%), "
            + (_answers(p.measured) if target.generated else _top1(c.top1, p.measured))
        )
    if best is None:
        out.print(f"no validated setting met {target.text()} -> {dest}")
    else:
        out.print(f"best at {target.text()}: {winning_line(opts, best[1].params)}")
        out.print(f"[dim]-> {dest}/tune.json, frontier.png[/dim]")
