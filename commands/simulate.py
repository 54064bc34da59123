"""The simulator's commands: ``simulate``, ``sweep``, ``study`` (KV memory saved per policy)
and ``policies`` (the registry), with their tables."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from memshare.commands.fanout_args import FanOutArgs
from memshare.commands.options import (
    JsonOpt,
    KvBlocksOpt,
    OverwriteOpt,
    PlotOpt,
    RequestsLimitOpt,
    SetOpt,
    SimArgs,
    output_option,
    spread,
)
from memshare.commands.progress import Bar, warn
from memshare.commands.render import out, print_json
from memshare.errors import InputError

if typing.TYPE_CHECKING:
    from collections.abc import Callable

    from memshare.sim.options import SweepSpec

SimOutputOpt = Annotated[Path | None, output_option("Output directory (default: runs/TRACE).")]
SweepOpt = Annotated[
    list[str] | None,
    typer.Option(help="Sweep one option: key=a,b,c (e.g. kv_blocks=500,1000); once."),
]
SWEEP_ARG = "KEY=A,B,C"  # the metavar of sweep's positional argument, named by its messages
SweepArg = Annotated[str, typer.Argument(metavar=SWEEP_ARG, help="Option and its values.")]


@spread
def simulate_cmd(
    args: SimArgs,
    fan: FanOutArgs,
    sweep: SweepOpt = None,
    plot: PlotOpt = False,
    output: SimOutputOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Simulate serving a trace: vLLM-v1 scheduler, block identity, roofline step times."""
    if sweep:
        if len(sweep) > 1:
            raise InputError(
                "--sweep",
                f"given {len(sweep)} times ({', '.join(sweep)}); a sweep varies one option",
                "give --sweep once (sweep a second option in a run of its own)",
            )
        _sweep(args, sweep[0], "--sweep", _Out(output, overwrite, plot, as_json), fan)
        return
    from memshare.sim.report import render_study
    from memshare.sim.study import simulate, study_json

    fan_out = fan.fan_out()
    with Bar(as_json, None) as bar:
        bar.notice = args.notice
        result = simulate(
            args.options(),
            output,
            overwrite=overwrite,
            plot=plot,
            progress=bar.run,
            warn=warn,
            fan=fan_out,
            jobs_progress=bar.jobs,
        )
        bar.summary(fan_out.ray and "ray")
    if as_json:
        print_json(study_json(result))
    else:
        render_study(result, out)


@spread
def sweep_cmd(
    args: SimArgs,
    fan: FanOutArgs,
    param: SweepArg,
    plot: PlotOpt = False,
    output: SimOutputOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Simulate over one option's values: one table and one line plot (e.g. hit rate vs KV)."""
    _sweep(args, param, SWEEP_ARG, _Out(output, overwrite, plot, as_json), fan)


@dataclass(frozen=True)
class _Out:
    """What a sweep writes and prints: ``-o``, ``--overwrite``, ``--plot``, ``--json``."""

    output: Path | None
    overwrite: bool
    plot: bool
    as_json: bool


def _sweep(args: SimArgs, sweep: str, arg: str, o: _Out, fan: FanOutArgs) -> None:
    """Run the sweep ``sweep``, typed as ``arg`` (``--sweep`` or ``KEY=A,B,C``); each swept
    value of an option passes that option's own command-line check first."""
    from memshare.sim.options import parse_sweep
    from memshare.sim.report import render_sweep
    from memshare.sim.study import sweep as run_sweep
    from memshare.sim.study import sweep_json

    spec = parse_sweep(sweep, arg)
    check_as_typed(spec)
    fan_out = fan.fan_out()
    with Bar(o.as_json, None) as bar:
        bar.notice = args.notice
        result = run_sweep(
            args.options(),
            spec,
            o.output,
            overwrite=o.overwrite,
            plot=o.plot,
            progress=bar.run,
            warn=warn,
            fan=fan_out,
            jobs_progress=bar.jobs,
        )
        bar.summary(fan_out.ray and "ray")
    if o.as_json:
        print_json(sweep_json(result))
    else:
        render_sweep(result, out)


def check_as_typed(spec: SweepSpec) -> None:
    """Each value of a swept option through that option's own command-line check (its
    callback: the ``--limit`` and ``--block-size`` rules), refused as an error of the sweep;
    the simulator's checks follow in :func:`memshare.sim.study.plan_sweep`."""
    if spec.policy_param:
        return
    hint = typing.get_type_hints(SimArgs, include_extras=True)[spec.key]
    callback: Callable[[None, Any], Any] | None = hint.__metadata__[0].callback
    if callback is None:
        return
    for value in spec.values:
        try:
            callback(None, value)
        except InputError as e:
            raise spec.refused(value, e) from None


@spread
def study_cmd(
    trace: Annotated[Path, typer.Argument(metavar="TRACE", help="A trace with KV sketches.")],
    fan: FanOutArgs,
    output: Annotated[Path, output_option("Output directory.")] = Path("runs/study"),
    tau: Annotated[list[float] | None, typer.Option(help="cf-topk tau values (repeat).")] = None,
    kv_blocks: KvBlocksOpt = "unlimited",
    settings: SetOpt = None,
    limit: RequestsLimitOpt = None,
    plot: Annotated[bool, typer.Option(help="Write saved_vs_tau.png.")] = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """KV memory saved by none/prefix/exact-dedup/token-dedup and cf-topk over tau, per option."""
    from memshare.outdir import claim_output, staged_output
    from memshare.registry import coerce_params
    from memshare.sim.options import SimOptions
    from memshare.sim.sharing_study import STUDY, TAUS, rows_json, run_study, write_study

    taus = tuple(tau) if tau else TAUS
    for value in taus:  # cf-topk's own check of its tau, named as the user typed it
        coerce_params("cf-topk", {"tau": value}, where="--tau")
    base = SimOptions(trace=trace, kv_blocks=kv_blocks, sets=tuple(settings or ()), limit=limit)
    fan_out = fan.fan_out()
    claim_output(output, "-o", STUDY, overwrite=overwrite)
    with Bar(as_json, "study") as bar:
        rows = run_study(
            base,
            taus=taus,
            progress=lambda _l, n, _t: bar.tick(n),
            warn=warn,
            fan=fan_out,
            output=output,
            jobs_progress=bar.jobs,
        )
        bar.summary(fan_out.ray and "ray")
    with staged_output(output) as stage:
        write_study(rows, stage, plot=plot)
    fan_out.forget(output)
    if as_json:
        print_json(rows_json(rows))
        return
    t = Table(title=f"KV memory saved on {trace} (vs none, same budget and arrivals)")
    t.add_column("policy", no_wrap=True)
    for col in ("mean KV", "saved (mean)", "saved (peak)", "share rate", "distance"):
        t.add_column(col, justify="right")
    for r in rows:
        dist = "-" if r.mean_shared_distance is None else f"{r.mean_shared_distance:.3f}"
        t.add_row(
            r.label,
            f"{r.mean_kv_bytes / 2**20:,.1f} MiB",
            f"{r.saved_mean:.2%}",
            f"{r.saved_peak:.2%}",
            f"{r.page_share_rate:.2%}",
            dist,
        )
    out.print(t)
    out.print(f"-> {output}")


def policies_cmd(as_json: JsonOpt = False) -> None:
    """List the registered policies (the --policy choices), their --set parameters, and each
    parameter's allowed values and meaning (a composition takes its members' parameters)."""
    from memshare.policies.params import allowed_text
    from memshare.registry import param_defaults, param_specs, policy_names

    table = {name: param_defaults(name) for name in policy_names()}
    specs = {
        name: {
            key: {
                "default": table[name][key],
                "allowed": allowed_text(key, spec),
                "meaning": spec.meaning,
            }
            for key, (_, spec) in param_specs(name).items()
        }
        for name in table
        if "+" not in name
    }
    if as_json:
        print(
            json.dumps(
                {"policies": list(table), "parameters": table, "allowed": specs}, default=str
            )
        )
        return
    t = Table(title="policies (--policy NAME --set key=value)")
    t.add_column("policy")
    t.add_column("parameters (defaults)")
    for name, params in table.items():
        t.add_row(name, ", ".join(f"{k}={v}" for k, v in params.items()) or "-")
    out.print(t)
    t = Table(title="parameters (a policy NAME+NAME takes its members')")
    for col in ("policy", "parameter", "allowed", "meaning"):
        t.add_column(col)
    for name, keys in specs.items():
        for key, row in keys.items():
            t.add_row(name, f"{key}={row['default']}", str(row["allowed"]), str(row["meaning"]))
    out.print(t)
