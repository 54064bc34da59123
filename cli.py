"""The ``memshare`` command line: parse options, call one function, render its result.

Installed as ``memshare.cli`` (``memshare/cli.py`` links here). Logic lives in the packages;
this file only parses, calls and prints. Bad input anywhere ends as one line on stderr and
exit status 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from memshare.errors import InputError
from memshare.sketch import DEFAULT_DIM, DEFAULT_SEED

if TYPE_CHECKING:
    from collections.abc import Callable

    from memshare.sim.options import SimOptions

app = typer.Typer(
    name="memshare",
    help="KV-cache block sharing: capture traces, simulate policies, validate on a real model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Benchmarks that print figures (never timed tests).", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
out = Console()
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _check_out(path: Path, option: str, *, folder: bool) -> None:
    """An output path the command can create: refused before any work, in one line."""
    where = f"{option} {path}"
    if path.exists():
        if folder and not path.is_dir():
            raise InputError(where, "exists and is not a folder", f"give {option} a folder path")
        if not folder and path.is_dir():
            raise InputError(where, "is a folder", f"give {option} a file path, e.g. DIR/map.json")
        return
    for above in path.absolute().parents:
        if above.exists():
            if not above.is_dir():
                raise InputError(
                    where,
                    f"{above} is a file, not a folder",
                    f"give {option} a path under a folder",
                )
            return


def _out_dir(param: typer.CallbackParam, path: Path | None) -> Path | None:
    """Callback of options that name a folder to write (``-o``)."""
    if path is not None:
        _check_out(path, min(param.opts, key=len), folder=True)
    return path


def _out_file(param: typer.CallbackParam, path: Path | None) -> Path | None:
    """Callback of options that name one file to write (``calibrate -o``, ``--plot``)."""
    if path is not None:
        _check_out(path, min(param.opts, key=len), folder=False)
    return path


def _live(quiet: bool) -> bool:
    """Draw progress bars only on a terminal (piped stderr stays clean) and not for --json."""
    return not quiet and Console(stderr=True).is_terminal


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """memshare: how much KV memory a sharing policy saves, and what it costs."""


@app.command("import")
def import_cmd(
    fmt: Annotated[
        str, typer.Argument(metavar="FORMAT", help="mooncake | azure | burstgpt | tokens")
    ],
    src: Annotated[Path, typer.Argument(metavar="FILE", help="The workload file to import.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Trace directory to create.", callback=_out_dir)
    ],
    limit: Annotated[int | None, typer.Option(help="Import only the first N rows.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="tokens: the tokenizer of text prompts (default: SmolLM2-135M)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a serving workload (Mooncake, Azure LLM 2023, BurstGPT, or token ids) as a trace."""
    from memshare.traces.importers import import_workload
    from memshare.traces.importers.tokenizer import LazyTokenizer

    if model is not None and fmt != "tokens":
        raise InputError("--model", f"applies to the tokens format, not {fmt}", "leave it out")
    tokenize = LazyTokenizer(model) if fmt == "tokens" else None
    with _progress(f"importing {src.name}", as_json) as tick:
        manifest = import_workload(fmt, src, output, limit=limit, progress=tick, tokenize=tokenize)
    _inspect(output, as_json=as_json, reuse=True, block_size=None, title=f"imported {output}")
    zero = manifest.source.get("zero_output_rows")
    if zero:
        print(
            f"memshare: note: {zero:,} rows have 0 output tokens; simulate serves each as its "
            "prefill plus 1 sampled token and counts 0 output tokens",
            file=sys.stderr,
        )


@app.command("inspect")
def inspect_cmd(
    trace: Annotated[Path, typer.Argument(metavar="DIR", help="A trace directory.")],
    block_size: Annotated[
        int | None, typer.Option(help="Block size for the reuse potential (default: trace's).")
    ] = None,
    reuse: Annotated[bool, typer.Option(help="Compute prefix reuse potential.")] = True,
    similarity: Annotated[
        bool,
        typer.Option(
            "--similarity", help="Per layer: each block's distance to its nearest earlier block."
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="--similarity PNG (default: DIR/similarity.png).", callback=_out_file),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Summarise and verify a trace, and compute its prefix reuse potential."""
    _inspect(
        trace,
        as_json=as_json,
        reuse=reuse,
        block_size=block_size,
        title=str(trace),
        similarity=similarity,
        plot=plot,
    )


@app.command("demo")
def demo_cmd(
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", help="Folder for the demo's trace and runs.", callback=_out_dir
        ),
    ] = Path("memshare-demo"),
    workload: Annotated[
        bool,
        typer.Option(
            "--workload", help="Only import the bundled Mooncake slice and show its reuse."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The main job on the embedded default: capture -> simulate -> validate, tables + plots.

    The default model answers 8 bundled GSM8K prompts (the trace: token ids, reasoning steps,
    K/V sketches); the simulator replays it under none, prefix, exact-dedup and cf-topk; then
    validate runs each on the real model and reports measured beside predicted.
    """
    if workload:
        from memshare.demo import demo_workload

        fmt, src = demo_workload()
        target = output / "workload"
        if (target / "manifest.json").exists():
            _inspect(target, as_json=as_json, reuse=True, block_size=None, title=str(target))
        else:
            import_cmd(fmt, src, target, limit=None, as_json=as_json)
        return
    from memshare.sim.report import render_study
    from memshare.sim.study import study_json
    from memshare.validate.pipeline import run_demo
    from memshare.validate.report import render_validation

    with (
        _CaptureBar(as_json) as bar,
        _runs_progress(as_json) as sim_progress,
        _StatusBar(as_json) as vbar,
    ):
        result = run_demo(
            output,
            capture_progress=bar.update,
            sim_progress=sim_progress.update,
            status=vbar.status,
            validate_progress=vbar.progress,
        )
    if as_json:
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
        return
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


@app.command("policies")
def policies_cmd(as_json: JsonOpt = False) -> None:
    """List the registered policies (the --policy choices) and their --set parameters."""
    from memshare.registry import param_defaults, policy_names

    table = {name: param_defaults(name) for name in policy_names()}
    if as_json:
        print(json.dumps({"policies": list(table), "parameters": table}, default=str))
        return
    t = Table(title="policies (--policy NAME --set key=value)")
    t.add_column("policy")
    t.add_column("parameters (defaults)")
    for name, params in table.items():
        t.add_row(name, ", ".join(f"{k}={v}" for k, v in params.items()) or "-")
    out.print(t)


def _inspect(
    trace: Path,
    *,
    as_json: bool,
    reuse: bool,
    block_size: int | None,
    title: str,
    similarity: bool = False,
    plot: Path | None = None,
) -> None:
    from memshare.traces.reader import TraceReader
    from memshare.traces.summary import prefix_reuse, summarize

    if block_size is not None and block_size <= 0:
        raise InputError("--block-size", f"must be a positive integer, got {block_size}", "e.g. 16")
    reader = TraceReader(trace)
    records = reader.records()
    report: dict[str, Any] = {
        "trace": str(trace),
        "summary": summarize(records, reader.manifest),
        "verify": reader.verify(),
    }
    if reuse:
        rep = prefix_reuse(records, reader.manifest, block_size)
        report["prefix_reuse"] = rep.to_dict() if rep is not None else None
    if similarity:
        report["similarity"] = _similarity(trace, plot)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _render_inspect(report, title)
    if similarity:
        _render_similarity(report["similarity"])


def _render_inspect(report: dict[str, Any], title: str) -> None:
    s = report["summary"]
    t = Table(title=title, show_header=False)
    t.add_row("kind", s["kind"])
    t.add_row("requests", f"{s['requests']:,}")
    t.add_row("prompt / output tokens", f"{s['prompt_tokens']:,} / {s['output_tokens']:,}")
    t.add_row("arrival span", f"{s['arrival_span_s']:.1f} s")
    for key in ("prompt_len", "output_len"):
        d = s[key]
        if d:
            t.add_row(
                key.replace("_", " "),
                f"p50 {d['p50']:.0f}  p90 {d['p90']:.0f}  p99 {d['p99']:.0f}  max {d['max']:.0f}",
            )
    v = report["verify"]
    state = (
        "complete" if v["complete"] else "incomplete (writer did not close; committed part shown)"
    )
    t.add_row(
        "verified", f"schema v{v['schema_version']}, {len(v['checks'])} checks passed, {state}"
    )
    reuse = report.get("prefix_reuse", "skipped")
    if reuse is None:
        t.add_row("prefix reuse", "n/a: the trace has no block identity (token or hash ids)")
    elif reuse != "skipped":
        t.add_row(
            f"prefix reuse (unlimited cache, block {reuse['block_size']})",
            f"{reuse['token_hit_rate']:.2%} of prompt tokens, "
            f"{reuse['block_hit_rate']:.2%} of blocks",
        )
    out.print(t)


def _bar(*tail: Any, disable: bool = False) -> Progress:
    """The one progress bar style (stderr, transient): stage, bar, done/total, then ``tail``
    (elapsed time when none is given)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(tail or (TimeElapsedColumn(),)),
        console=Console(stderr=True),
        transient=True,
        disable=disable,
    )


class _progress:
    """A rich progress bar fed with counts; silent under ``--json``."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label, self.quiet = label, quiet
        self.bar = _bar()
        self.task = self.bar.add_task(label, total=None)
        self.live = _live(quiet)

    def __enter__(self) -> Any:
        if self.live:
            self.bar.start()
        return lambda n: self.bar.update(self.task, completed=n)

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bar.stop()


@bench_app.command("policy")
def bench_policy_cmd(
    policy: Annotated[str, typer.Option(help="A registered policy name.")] = "cf-topk",
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="Policy parameter key=value (repeat).")
    ] = None,
    resident_blocks: Annotated[int, typer.Option(help="Blocks resident at the end.")] = 100_000,
    as_json: JsonOpt = False,
) -> None:
    """Decision time per filled block with many resident blocks (target: <= 20 us)."""
    from memshare.policy_bench import bench_policy
    from memshare.registry import coerce_params, parse_settings

    if not 1_000 <= resident_blocks <= MAX_BENCH_BLOCKS:
        raise InputError(
            "--resident-blocks",
            f"{resident_blocks} is out of range (memory grows with it)",
            f"use 1000 .. {MAX_BENCH_BLOCKS}",
        )
    params = coerce_params(policy, parse_settings(settings or []))
    with _progress(f"bench {policy}", as_json) as tick:
        res = bench_policy(policy, params, resident_blocks, progress=lambda n, _: tick(n))
    if as_json:
        print(json.dumps(res, indent=2))
        return
    t = Table(title=f"bench policy {policy}", show_header=False)
    for key, value in res.items():
        t.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    out.print(t)


MAX_BENCH_BLOCKS = 1_000_000  # bench policy --resident-blocks (sketches held in memory)
MAX_BENCH_RUNNING = 100_000  # bench sim --sizes (running requests in one step)
MAX_BENCH_STEPS = 1_000_000  # bench sim --steps


# ----------------------------------------------------------------------------- simulate (sim/)
TraceArg = Annotated[Path, typer.Argument(metavar="TRACE", help="A trace directory.")]
PolicyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--policy",
        help="Policy to run (default: prefix; repeat to compare; see `memshare policies`).",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Policy parameter key=value, or POLICY.key=value (repeat)."),
]
KvBlocksOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-blocks", help="KV budget in blocks, or 'unlimited' (also 'inf': never evicts)."
    ),
]
KvBytesOpt = Annotated[
    str | None, typer.Option("--kv-bytes", help="KV budget in bytes, e.g. 40GiB (model's blocks).")
]
GpuUtilOpt = Annotated[
    float,
    typer.Option(help="Without --kv-blocks/--kv-bytes: GPU memory share for weights + KV."),
]
BlockSizeOpt = Annotated[
    int | None, typer.Option("--block-size", help="Tokens per block (default: the trace's).")
]
GpuOpt = Annotated[str, typer.Option(help="GPU preset (h100, h200, a100-80g, l4, cpu) or TOML.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(help="Model preset or TOML (default: the trace's model, else llama-3.1-8b)."),
]
CostOpt = Annotated[
    str | None, typer.Option("--cost-model", help="TOML of cost coefficients (from validate).")
]
ArrivalOpt = Annotated[
    str, typer.Option(help="trace (timestamps) | poisson:RATE | closed:CLIENTS.")
]
LimitOpt = Annotated[int | None, typer.Option(help="Simulate only the first N requests.")]
TimeScaleOpt = Annotated[
    float, typer.Option(help="Multiply trace inter-arrival times by this (trace arrivals).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the arrival generator.")]
MaxTokensOpt = Annotated[int, typer.Option(help="Token budget per step.")]
MaxSeqsOpt = Annotated[int, typer.Option(help="Running requests at most.")]
ChunkedOpt = Annotated[bool, typer.Option(help="Split long prompts over steps.")]
ReserveOpt = Annotated[
    bool,
    typer.Option(help="Admit a request only if its whole prompt fits (vLLM 0.32's default)."),
]
LongPrefillOpt = Annotated[int, typer.Option(help="Cap one request's prefill chunk (0: no cap).")]
PlotOpt = Annotated[bool, typer.Option("--plot", help="Write PNG figures beside the runs.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "-o", "--output", help="Output directory (default: runs/TRACE).", callback=_out_dir
    ),
]
SweepOpt = Annotated[
    str | None, typer.Option(help="Sweep one option: key=a,b,c (e.g. kv_blocks=500,1000).")
]
SweepArg = Annotated[str, typer.Argument(metavar="KEY=A,B,C", help="Option and its values.")]
NO_POLICY_NOTICE = "memshare: no --policy given: ran prefix, the default"


@dataclasses.dataclass(frozen=True)
class SimArgs:
    """``simulate``'s options, each defined here once (type, flag, help, default); a command
    given ``args: SimArgs`` under :func:`_sim_command` takes every field as a parameter.

    Field names are :class:`~memshare.sim.options.SimOptions`' (``--policy`` fills
    ``policies``, ``--set`` fills ``sets``), so :meth:`options` passes each one by name."""

    trace: TraceArg
    policies: PolicyOpt = None
    sets: SetOpt = None
    kv_blocks: KvBlocksOpt = None
    kv_bytes: KvBytesOpt = None
    gpu_memory_utilization: GpuUtilOpt = 0.9
    block_size: BlockSizeOpt = None
    gpu: GpuOpt = "h100"
    model_config: ModelOpt = None
    cost_model: CostOpt = None
    arrival: ArrivalOpt = "trace"
    limit: LimitOpt = None
    time_scale: TimeScaleOpt = 1.0
    seed: SeedOpt = 0
    max_num_batched_tokens: MaxTokensOpt = 8192
    max_num_seqs: MaxSeqsOpt = 256
    chunked_prefill: ChunkedOpt = True
    long_prefill_threshold: LongPrefillOpt = 0
    reserve_full_prompt: ReserveOpt = True

    def options(self) -> SimOptions:
        """The raw :class:`SimOptions` (checked by ``build_configs``); the CLI's one builder."""
        from memshare.sim.options import SimOptions

        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        raw["policies"] = tuple(self.policies or ("prefix",))
        raw["sets"] = tuple(self.sets or ())
        return SimOptions(**raw)

    @property
    def notice(self) -> str | None:
        """What to tell a user who named no policy."""
        return None if self.policies else NO_POLICY_NOTICE


def _sim_command(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with its ``SimArgs`` parameter spread into one parameter per field.

    Typer reads a command's parameters from ``inspect.signature``, which honours
    ``__signature__``: the fields go there, in that parameter's place (so ``--help`` keeps
    their order), and each call packs them back into one :class:`SimArgs`."""
    import inspect
    import typing

    hints = typing.get_type_hints(command, include_extras=True)
    shared = typing.get_type_hints(SimArgs, include_extras=True)
    (packed,) = [name for name, hint in hints.items() if hint is SimArgs]
    params: list[inspect.Parameter] = []
    for p in inspect.signature(command).parameters.values():
        if p.name in shared:
            raise TypeError(f"{command.__name__}: parameter {p.name!r} is also a SimArgs field")
        if p.name != packed:
            params.append(p.replace(kind=p.KEYWORD_ONLY, annotation=hints[p.name]))
            continue
        for f in dataclasses.fields(SimArgs):
            default = p.empty if f.default is dataclasses.MISSING else f.default
            kind, hint = p.KEYWORD_ONLY, shared[f.name]
            params.append(inspect.Parameter(f.name, kind, annotation=hint, default=default))

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        args = SimArgs(**{name: kwargs.pop(name) for name in shared})
        command(**kwargs, **{packed: args})

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return run


@app.command("simulate")
@_sim_command
def simulate_cmd(
    args: SimArgs,
    sweep: SweepOpt = None,
    plot: PlotOpt = False,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Simulate serving a trace: vLLM-v1 scheduler, block identity, roofline step times."""
    if sweep is not None:
        _sweep(args, sweep, output, plot, as_json)
        return
    from memshare.sim.report import render_study
    from memshare.sim.study import simulate, study_json

    with _runs_progress(as_json) as progress:
        progress.notice = args.notice
        result = simulate(args.options(), output, plot=plot, progress=progress.update, warn=_warn)
    if as_json:
        print(json.dumps(study_json(result), indent=2))
    else:
        render_study(result, out)


@app.command("sweep")
@_sim_command
def sweep_cmd(
    args: SimArgs,
    param: SweepArg,
    plot: PlotOpt = False,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Simulate over one option's values: one table and one line plot (e.g. hit rate vs KV)."""
    _sweep(args, param, output, plot, as_json)


def _sweep(args: SimArgs, sweep: str, output: Path | None, plot: bool, as_json: bool) -> None:
    from memshare.sim.options import parse_sweep
    from memshare.sim.report import render_sweep
    from memshare.sim.study import sweep as run_sweep
    from memshare.sim.study import sweep_json

    spec = parse_sweep(sweep)
    with _runs_progress(as_json) as progress:
        progress.notice = args.notice
        result = run_sweep(
            args.options(), spec, output, plot=plot, progress=progress.update, warn=_warn
        )
    if as_json:
        print(json.dumps(sweep_json(result), indent=2))
    else:
        render_sweep(result, out)


@bench_app.command("sim")
def bench_sim_cmd(
    trace: Annotated[
        Path | None,
        typer.Argument(metavar="[TRACE]", help="Trace to run (default: the bundled demo)."),
    ] = None,
    policy: Annotated[str, typer.Option(help="Policy for the trace run.")] = "prefix",
    kv_blocks: KvBlocksOpt = None,
    kv_bytes: KvBytesOpt = None,
    gpu: GpuOpt = "h100",
    model_config: ModelOpt = None,
    arrival: ArrivalOpt = "trace",
    sizes: Annotated[str, typer.Option(help="Running-request counts for per-step cost.")] = (
        "10,100,1000"
    ),
    steps: Annotated[int, typer.Option(help="Decode steps per per-step-cost run.")] = 400,
    as_json: JsonOpt = False,
) -> None:
    """Simulator speed: simulated/wall time on a trace, per-step cost vs running requests."""
    import tempfile

    from memshare.sim.bench import step_costs, trace_bench
    from memshare.sim.options import SimOptions

    try:
        counts = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) <= 0 or max(counts) > MAX_BENCH_RUNNING:
        raise InputError(
            "--sizes",
            f"{sizes!r} is not a list of integers in 1 .. {MAX_BENCH_RUNNING}",
            "e.g. 10,100,1000",
        )
    if not 1 <= steps <= MAX_BENCH_STEPS:
        raise InputError("--steps", f"must be 1 .. {MAX_BENCH_STEPS}, got {steps}", "e.g. 400")
    with tempfile.TemporaryDirectory() as tmp:
        if trace is None:
            from memshare.demo import demo_workload
            from memshare.traces.importers import import_workload

            fmt, src = demo_workload()
            trace = Path(tmp) / "demo"
            import_workload(fmt, src, trace)
        opts = SimOptions(
            trace=trace,
            policies=(policy,),
            kv_blocks=kv_blocks,
            kv_bytes=kv_bytes,
            gpu=gpu,
            model_config=model_config,
            arrival=arrival,
        )
        with _progress("bench sim: trace run", as_json):
            run = trace_bench(opts)
    with _progress("bench sim: per-step cost", as_json):
        costs = step_costs(counts, steps=steps)
    per_step = [c.__dict__ for c in costs]
    if as_json:
        print(json.dumps({"trace_run": run, "per_step": per_step}, indent=2))
        return
    t = Table(title="bench sim: trace run", show_header=False)
    for key, value in run.items():
        t.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    out.print(t)
    t = Table(title="bench sim: per-step cost vs running requests")
    for col in ("running", "steps", "wall s", "us/step", "us/step/request"):
        t.add_column(col, justify="right")
    for c in costs:
        t.add_row(
            str(c.running),
            str(c.steps),
            f"{c.wall_s:.3f}",
            f"{c.us_per_step:,.1f}",
            f"{c.us_per_request_step:.2f}",
        )
    out.print(t)


def _warn(line: str) -> None:
    """A warning: one line on stderr (stdout stays the result, one JSON object with --json)."""
    print(line, file=sys.stderr)


class _runs_progress:
    """One rich progress bar per simulated run (requests done of total); silent for --json."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = _bar()
        self.tasks: dict[str, Any] = {}
        self.live = _live(quiet)
        self.notice: str | None = None  # said after the runs (an error stays the only line)

    def update(self, label: str, done: int, total: int) -> None:
        if not self.live:
            return
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(f"simulating {label}", total=total)
        self.bar.update(self.tasks[label], completed=done)

    def __enter__(self) -> _runs_progress:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if self.live:
            self.bar.stop()
        if self.notice is not None and kind is None:
            print(self.notice, file=sys.stderr)


# ------------------------------------------------------------------ capture (traces/capture)
_R1_HINT = "e.g. --texts ../shared/data/reasoning/deepseek_r1_aime24_math500.jsonl"


@app.command("capture")
def capture_cmd(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Trace directory to create.", callback=_out_dir)
    ],
    dataset: Annotated[
        Path | None,
        typer.Option(help="Generate mode: a problem set JSONL (GSM8K, MATH-500, AIME)."),
    ] = None,
    texts: Annotated[
        Path | None,
        typer.Option(help="Teacher-forced mode: reasoning texts JSONL (R1, Sky-T1) or a .txt."),
    ] = None,
    field: Annotated[
        str | None,
        typer.Option(
            "--field", help="Prompt (--dataset) or text (--texts) field; dotted path, code[0]."
        ),
    ] = None,
    prompt_field: Annotated[
        str | None, typer.Option(help="--texts: the problem field (default: auto-detected).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Capture only the first N records.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Local HF model folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generate: tokens per answer.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Generate: prompts per batch.")] = 4,
    temperature: Annotated[float, typer.Option(help="Generate: 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Generate: nucleus sampling.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Generate: sampling seed.")] = 0,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help="Texts: cap on prompt+text tokens; longer texts are cut there (also at the "
            "model's context limit)."
        ),
    ] = None,
    chunk_tokens: Annotated[int, typer.Option(help="Texts: tokens per forward chunk.")] = 512,
    block_size: Annotated[int, typer.Option(help="Tokens per KV block.")] = 16,
    sketch_dim: Annotated[int, typer.Option(help="JL sketch dimension d.")] = DEFAULT_DIM,
    sketch_seed: Annotated[int, typer.Option(help="JL projection seed.")] = DEFAULT_SEED,
    keys: Annotated[
        str | None,
        typer.Option(
            help="Sketch keys pre_rope (k_proj output) or post_rope (as cached); default "
            "pre_rope on hf, post_rope on vllm (its cache holds rotated keys)."
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="hf (transformers) or vllm (vLLM's CPU build, in-process).")
    ] = "hf",
    full_kv: Annotated[
        bool, typer.Option("--full-kv", help="Also store every token's full K/V (float32).")
    ] = False,
    step_cues: Annotated[
        str | None,
        typer.Option(help="Comma-separated cue phrases that start a reasoning step."),
    ] = None,
    min_step_tokens: Annotated[int, typer.Option(help="Minimum reasoning step length.")] = 32,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[
        int | None,
        typer.Option(help="Torch CPU threads (default: $OMP_NUM_THREADS, else one per core)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted capture in -o.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Capture real KV traces from a real model.

    --dataset generates answers; --texts teacher-forces reasoning texts; neither: bundled GSM8K.
    Per block and layer: JL sketches of K (pre-RoPE by default) and of V, with their norms.
    Texts over the context limit (or --max-tokens) are cut there: finish_reason "length".
    """
    from memshare.traces.capture import CaptureOptions, GenerationSettings, capture
    from memshare.traces.segment import DEFAULT_CUES, SegmenterConfig

    if min_step_tokens < 1:
        raise InputError("--min-step-tokens", f"must be >= 1, got {min_step_tokens}", "e.g. 32")
    cues = DEFAULT_CUES if step_cues is None else tuple(c for c in step_cues.split(",") if c)
    default_keys = "post_rope" if backend == "vllm" else "pre_rope"
    opts = CaptureOptions(
        output=output,
        dataset=dataset,
        texts=texts,
        field_path=field,
        prompt_field=prompt_field,
        limit=limit,
        model=model,
        backend=backend,
        dtype=dtype,
        device=device,
        threads=threads,
        block_size=block_size,
        sketch_dim=sketch_dim,
        sketch_seed=sketch_seed,
        keys=keys or default_keys,  # type: ignore[arg-type]  # checked by capture()
        full_kv=full_kv,
        generation=GenerationSettings(max_new_tokens, temperature, top_p, seed, batch_size),
        chunk_tokens=chunk_tokens,
        max_tokens=max_tokens,
        segmenter=SegmenterConfig(cues=cues, min_tokens=min_step_tokens),
        resume=resume,
    )
    with _CaptureBar(as_json) as bar:
        summary = capture(opts, progress=bar.update)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    t = Table(title=f"captured {output}", show_header=False)
    for key, value in summary.items():
        t.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    out.print(t)


class _CaptureBar:
    """Rich progress for capture: requests, tokens/s, ETA; status lines while loading."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import TimeRemainingColumn

        self.quiet = quiet
        self.bar = _bar(
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("starting", total=None, rate="")
        self.live = _live(quiet)

    def update(self, p: Any) -> None:
        """Take a :class:`~memshare.traces.capture.run.CaptureProgress`."""
        if not self.live:
            return
        if p.phase == "status":
            self.bar.update(self.task, description=p.message)
            return
        rate = f"{p.tokens_done / p.elapsed_s:,.0f} tok/s" if p.elapsed_s > 0 else ""
        self.bar.update(
            self.task,
            description="capturing" if p.requests_done or p.tokens_done else "first batch",
            total=p.requests_total,
            completed=p.requests_done,
            rate=rate,
        )

    def __enter__(self) -> _CaptureBar:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bar.stop()


class _StatusBar:
    """A transient bar on stderr for a long command: a status line and a count (rich)."""

    def __init__(self, as_json: bool) -> None:
        self.bar = _bar(disable=not _live(as_json))
        self.task = self.bar.add_task("starting", total=None)

    def status(self, message: str) -> None:
        """Show ``message`` as the stage."""
        self.bar.update(self.task, description=message)

    def progress(self, what: str, done: int, total: int) -> None:
        """``done`` of ``total`` (``what``: a new stage name, or "" to keep the current one)."""
        if what:
            self.bar.update(self.task, description=what)
        self.bar.update(self.task, completed=done, total=total)

    def __enter__(self) -> _StatusBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


@app.command("generate")
def generate_cmd(
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", help="Folder for outputs/shares/metrics.", callback=_out_dir
        ),
    ],
    prompts: Annotated[
        Path | None,
        typer.Argument(
            help="Prompts JSONL: 'prompt' (chat template applied) or 'prompt_token_ids'."
        ),
    ] = None,
    texts: Annotated[
        Path | None,
        typer.Option(help="Teacher-forced instead: reasoning texts JSONL, run block by block."),
    ] = None,
    field: Annotated[
        str | None,
        typer.Option(
            "--field",
            help="Prompt field (default: prompt, question, problem) or --texts text field.",
        ),
    ] = None,
    policy: Annotated[str, typer.Option(help="Policy (see `memshare policies`).")] = "none",
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Policy parameter key=value (repeat).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 256,
    kv_blocks: Annotated[
        int | None, typer.Option(help="KV budget in blocks (default: every request at once).")
    ] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per KV block.")] = 16,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts or texts.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Local HF model folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    max_num_seqs: Annotated[int, typer.Option(help="Running requests at most.")] = 256,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget per step.")] = 8192,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the real model on the paged KV engine under a policy (the simulator's scheduler).

    Writes outputs.jsonl (tokens and text per request), shares.jsonl (every confirmed share,
    with its exact distance on the live KV) and metrics.json (pages, KV bytes, tokens/s).
    """
    from memshare.validate.engine.generate import GenerateOptions, generate

    opts = GenerateOptions(
        output=output,
        prompts=prompts,
        texts=texts,
        field=field,
        policy=policy,
        sets=sets or [],
        max_tokens=max_tokens,
        kv_blocks=kv_blocks,
        block_size=block_size,
        limit=limit,
        model=model,
        device=device,
        dtype=dtype,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        threads=threads,
    )
    with _StatusBar(as_json) as bar:
        metrics = generate(
            opts, status=bar.status, progress=lambda done, total: bar.progress("", done, total)
        )
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    t = Table(title=f"generate {policy} -> {output}", show_header=False)
    for key in ("requests", "steps", "tokens_generated", "tokens_per_s", "preemptions", "shares"):
        value = metrics[key]
        t.add_row(
            key.replace("_", " "), f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
        )
    pages = metrics["pages_in_use"]
    t.add_row("KV pages in use (peak / mean)", f"{pages['peak']:,} / {pages['mean']:,.1f}")
    t.add_row("KV bytes in use (peak)", f"{metrics['kv_bytes_in_use']['peak']:,}")
    out.print(t)


@app.command("validate")
def validate_cmd(
    run: Annotated[
        Path,
        typer.Argument(help="A simulate run directory, or a folder of them (sweep, study)."),
    ],
    limit: Annotated[int | None, typer.Option(help="Only the first N requests.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Local HF model folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    gpu: Annotated[
        str, typer.Option(help="Cost-model preset for the predicted times (cpu here).")
    ] = "cpu",
    fit_cost_model: Annotated[
        bool,
        typer.Option(
            "--fit-cost-model",
            help="Fit the cost model on the measured steps: RUN/cost_model.toml.",
        ),
    ] = False,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
    kv_fraction: Annotated[
        float,
        typer.Option(
            "--kv-fraction",
            help="KV budget of the throughput runs, as a fraction of the blocks every "
            "request needs at once (at least the largest request).",
        ),
    ] = 0.5,
    fidelity_only: Annotated[
        bool,
        typer.Option(
            "--fidelity-only",
            help="Only the teacher-forced part (memory, fidelity, sketch vs exact): no "
            "throughput runs at the budget, no generated answers.",
        ),
    ] = False,
    one_pass: Annotated[
        bool,
        typer.Option(
            "--one-pass",
            help="Teacher-forced part: every run's step in one forward pass over one page "
            "arena (faster, one model in memory); the runs' own times are then not measured.",
        ),
    ] = False,
    length_scale: Annotated[
        float,
        typer.Option(
            "--length-scale",
            help="Workload-only traces (Mooncake, Azure, BurstGPT): scale of the synthesized "
            "prompt and output lengths, in (0, 1].",
        ),
    ] = 0.05,
    block_size: Annotated[
        int | None,
        typer.Option(
            "--block-size",
            help="Workload-only traces: the engine's tokens per block (default 16; a captured "
            "trace's block size is its own).",
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="torch (memshare's paged engine: every policy) or vllm (real vLLM, CPU "
            "build: none and prefix; time, prefix hits and blocks).",
        ),
    ] = "torch",
    replay_arrivals: Annotated[
        bool,
        typer.Option(
            "--replay-arrivals",
            help="--engine vllm: requests arrive as the run's --arrival says (trace times, "
            "poisson, closed:N) on vLLM's engine clock, and in the prediction; default: all "
            "at 0 s.",
        ),
    ] = False,
    plot: PlotOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the real model on the paged engine for every simulated run under RUN and report
    measured memory, fidelity and time beside the simulator's prediction (validation.json):
    teacher-forced texts for fidelity, throughput at a KV budget where none must queue, and
    answers generated under each policy for a trace captured from a dataset. With
    --engine vllm, real vLLM serves the budget run of each none/prefix run instead."""
    from memshare.validate.report import render_validation
    from memshare.validate.validation import ValidateOptions, validate

    opts = ValidateOptions(
        run=run,
        model=model,
        device=device,
        dtype=dtype,
        threads=threads,
        limit=limit,
        gpu=gpu,
        fit_cost_model=fit_cost_model,
        plot=plot,
        kv_fraction=kv_fraction,
        fidelity_only=fidelity_only,
        one_pass=one_pass,
        length_scale=length_scale,
        block_size=block_size,
        engine=engine,
        replay_arrivals=replay_arrivals,
    )
    with _StatusBar(as_json) as bar:
        report = validate(opts, status=bar.status, progress=bar.progress)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    render_validation(report, out)


@bench_app.command("engine")
def bench_engine_cmd(
    model: Annotated[str | None, typer.Option(help="Local HF folder or .gguf file.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest output per prompt.")] = 64,
    batch: Annotated[int, typer.Option(help="Prompts in the mixed batch.")] = 16,
    concurrency: Annotated[
        int, typer.Option(help="Concurrent sequences in the bounded mixed run.")
    ] = 4,
    repeats: Annotated[int, typer.Option(help="Alternating runs; the median counts.")] = 3,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Paged engine vs HF generate tokens/s (batch 1; a mixed batch), KV bytes, peak RSS,
    cf-topk overhead in the engine."""
    from memshare.validate.engine.bench import bench_engine

    if min(repeats, batch, max_new_tokens, concurrency) < 1:
        raise InputError(
            "--repeats/--batch/--max-new-tokens/--concurrency", "must be >= 1", "e.g. 3/16/64/4"
        )
    console = Console(stderr=True)
    res = bench_engine(
        model=model,
        max_new_tokens=max_new_tokens,
        batch=batch,
        concurrency=concurrency,
        repeats=repeats,
        threads=threads,
        status=None if as_json else lambda m: console.print(f"[dim]{m}[/dim]"),
    )
    _render_figures("bench engine", res, as_json)


@bench_app.command("capture")
def bench_capture_cmd(
    dataset: Annotated[
        Path | None, typer.Option(help="Problem set for generate mode (default: bundled).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Prompts to generate for.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 4,
    texts: Annotated[
        Path | None, typer.Option(help=f"Also time teacher-forced capture ({_R1_HINT}).")
    ] = None,
    texts_limit: Annotated[
        int | None, typer.Option(help="Texts to capture (default 3; 0 for all).")
    ] = 3,
    max_tokens: Annotated[int | None, typer.Option(help="Cap on tokens per text.")] = None,
    model: Annotated[str | None, typer.Option(help="Local HF folder or .gguf file.")] = None,
    backend: Annotated[str, typer.Option(help="hf or vllm (vLLM's CPU build).")] = "hf",
    repeats: Annotated[int, typer.Option(help="Alternating runs; the median counts.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Capture overhead over plain generation (target <= 20%), teacher-forced tokens/s, and
    bytes on disk per 1k tokens."""
    from memshare.traces.capture.bench import bench_capture

    if repeats < 1 or limit < 1:
        raise InputError("--repeats/--limit", "must be >= 1", "e.g. --repeats 3 --limit 8")
    console = Console(stderr=True)
    res = bench_capture(
        dataset=dataset,
        limit=limit,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        texts=texts,
        texts_limit=texts_limit or None,
        max_tokens=max_tokens,
        model=model,
        backend_name=backend,
        repeats=repeats,
        status=None if as_json else lambda m: console.print(f"[dim]{m}[/dim]"),
    )
    _render_figures("bench capture", res, as_json)


def _render_figures(title: str, res: dict[str, Any], as_json: bool) -> None:
    """A benchmark's figures: one JSON object, or a two-column table (nested ones as JSON)."""
    if as_json:
        print(json.dumps(res, indent=2))
        return
    t = Table(title=title, show_header=False)
    for key, value in res.items():
        shown = json.dumps(value) if isinstance(value, dict) else str(value)
        t.add_row(key.replace("_", " "), shown)
    out.print(t)


def _similarity(trace: Path, plot: Path | None) -> dict[str, Any]:
    from memshare.traces.capture.similarity import similarity

    target = plot if plot is not None else trace / "similarity.png"
    try:
        return similarity(trace, target)
    except PermissionError:
        raise InputError(
            str(target), "cannot write the histogram PNG here", "pass --plot PATH"
        ) from None


def _render_similarity(rep: dict[str, Any]) -> None:
    keys = rep["keys"].replace("_", "-")
    th = [f"{t:g}" for t in rep["thresholds"]]
    t = Table(
        title=f"nearest earlier block, relative distance ({rep['requests']} requests, "
        f"block {rep['block_size']}, K {keys})"
    )
    t.add_column("layer", justify="right")
    for kind in ("K", "V"):
        for x in th:
            t.add_column(f"{kind} <{x}", justify="right")
        t.add_column(f"{kind} p50", justify="right")
    rows = [*rep["layers"], {"layer": "all", **rep["overall"]}]
    for row in rows:
        cells = [str(row["layer"])]
        for kind in ("k", "v"):
            s = row[kind]
            shares = s.get("share_under", {})
            cells += [f"{shares.get(x, 0.0):.1%}" for x in th]
            cells.append(f"{s['p50']:.3f}" if "p50" in s else "-")
        t.add_row(*cells)
    out.print(t)
    if "plot" in rep:
        out.print(f"histogram: {rep['plot']}")


@app.command("calibrate")
def calibrate_cmd(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Layer map JSON to write.", callback=_out_file)
    ],
    model: Annotated[
        str | None, typer.Option(help="Local HF model folder or .gguf (default: SmolLM2).")
    ] = None,
    texts: Annotated[
        Path | None, typer.Option(help="Calibration texts JSONL (default: bundled prompts).")
    ] = None,
    field: Annotated[str | None, typer.Option(help="Text field (dotted path).")] = None,
    limit: Annotated[int, typer.Option(help="Calibration texts to use.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Tokens per text.")] = 256,
    target: Annotated[float, typer.Option(help="Fraction of layers to share.")] = 0.25,
    threshold: Annotated[float, typer.Option(help="Minimum final-hidden cosine.")] = 0.5,
    max_trials: Annotated[int, typer.Option(help="Most layer pairs to try.")] = 64,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[
        int | None,
        typer.Option(help="Torch CPU threads (default: $OMP_NUM_THREADS, else one per core)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """KVSharer calibration on the real model: the layer map the kvsharer policy uses."""
    from memshare.traces.capture.inputs import bundled_prompts, read_problems, read_texts
    from memshare.traces.model.loader import load_model
    from memshare.validate.engine.calibrate import calibrate, write_calibration

    if not 0.0 < target < 1.0:
        raise InputError("--target", f"must lie in (0, 1), got {target}", "e.g. 0.125, 0.25")
    if not -1.0 <= threshold <= 1.0:
        raise InputError("--threshold", f"a cosine lies in [-1, 1], got {threshold}", "e.g. 0.5")
    if limit < 1 or max_tokens < 2 or max_trials < 1:
        raise InputError("--limit/--max-tokens/--max-trials", "must be positive", "e.g. 4")
    if texts is None:
        items = [i.prompt for i in read_problems(bundled_prompts(), limit=limit).items]
    else:
        items = [i.text or "" for i in read_texts(texts, field=field, limit=limit).items]
    backend = load_model(model, device=device, threads=threads)
    with _progress("calibrating (layers shared)", as_json) as tick:
        cal = calibrate(
            backend,
            items,
            max_tokens=max_tokens,
            target=target,
            threshold=threshold,
            max_trials=max_trials,
            progress=lambda n, _: tick(n),
        )
    write_calibration(cal, output)
    if as_json:
        print(cal.to_json())
        return
    out.print(
        f"{cal.shared_layers}/{cal.num_layers} layers share KV "
        f"(final-hidden cosine {cal.final_cosine:.3f} >= {threshold}; "
        f"{len(cal.trials)} pairs tried) -> {output}"
    )
    for t in cal.trials:
        if t.accepted:
            out.print(f"  layer {t.layer} uses layer {t.uses}'s KV (cosine {t.cosine:.3f})")


@app.command("study")
def study_cmd(
    trace: Annotated[Path, typer.Argument(metavar="TRACE", help="A trace with KV sketches.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output directory.", callback=_out_dir)
    ] = Path("runs/study"),
    tau: Annotated[list[float] | None, typer.Option(help="cf-topk tau values (repeat).")] = None,
    kv_blocks: Annotated[
        str, typer.Option(help="KV budget in blocks, or 'unlimited' (also 'inf': never evicts).")
    ] = "unlimited",
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="Extra policy parameter key=value.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N requests.")] = None,
    plot: Annotated[bool, typer.Option(help="Write saved_vs_tau.png.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """KV memory saved by none/prefix/exact-dedup/token-dedup and cf-topk over tau, per option."""
    from memshare.sim.options import SimOptions
    from memshare.sim.sharing_study import TAUS, rows_json, run_study, write_study

    taus = tuple(tau) if tau else TAUS
    if any(t < 0 for t in taus):
        raise InputError("--tau", f"must be >= 0, got {taus}", "e.g. --tau 0.2")
    base = SimOptions(trace=trace, kv_blocks=kv_blocks, sets=tuple(settings or ()), limit=limit)
    with _progress("study", as_json) as tick:
        rows = run_study(base, taus=taus, progress=lambda _l, n, _t: tick(n), warn=_warn)
    write_study(rows, output, plot=plot)
    if as_json:
        print(json.dumps(rows_json(rows), indent=2))
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


# ----------------------------------------------------------------------------- entry point
def _tidy_help() -> None:
    """Help that shows what a user types: flags without a ``<bool>`` value (typer 0.29 shows
    one), and at least 120 columns so long option names are never cut (piped help is 80)."""
    import shutil

    import typer.core
    import typer.rich_utils

    if not getattr(typer.core.TyperOption, "_memshare_tidy", False):
        shown = typer.core.TyperOption.display_type_rich

        def display_type_rich(self: Any, ctx: Any) -> str | None:
            return None if getattr(self, "is_flag", False) else shown(self, ctx)

        typer.core.TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
        typer.core.TyperOption._memshare_tidy = True  # type: ignore[attr-defined]
    if typer.rich_utils.MAX_WIDTH is None:
        typer.rich_utils.MAX_WIDTH = max(120, shutil.get_terminal_size((120, 24)).columns)


@functools.cache
def _click_command() -> Any:
    """The app as a click command, built once per process (typer takes ~40 ms to build it;
    in-process callers such as the tests call ``main`` hundreds of times)."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; turn bad input into one line and exit status 2."""
    _tidy_help()
    args = sys.argv[1:] if argv is None else argv
    args = args or ["--help"]
    debug = "--debug" in args
    command = _click_command()
    try:
        command.main(args=args, prog_name="memshare", standalone_mode=False)
    except InputError as e:
        if debug:
            raise
        print(f"memshare: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # a path the OS refused (permissions, a file where a folder must be, a full disk):
        # the user's to fix; anything without a path is a bug and keeps its traceback
        if debug or e.filename is None:
            raise
        reason = (e.strerror or type(e).__name__).lower()
        print(
            f"memshare: error: {e.filename}: {reason}; check the path and its permissions",
            file=sys.stderr,
        )
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("memshare: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # typer >= 0.29 vendors click under a private name: match its UsageError by class name
        if debug or not any(c.__name__ == "UsageError" for c in type(e).__mro__):
            raise
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "memshare"
        message = str(e.format_message()).rstrip(".")  # type: ignore[attr-defined]
        print(f"memshare: error: {message}; see `{where} --help`", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
