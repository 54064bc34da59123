"""The ``memshare`` command line: parse options, call one function, render its result.

Installed as ``memshare.cli`` (``memshare/cli.py`` links here). Logic lives in the packages;
this file only parses, calls and prints. Bad input anywhere ends as one line on stderr and
exit status 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from memshare.errors import InputError

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


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """memshare: how much KV memory a sharing policy saves, and what it costs."""


@app.command("import")
def import_cmd(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="mooncake | azure | burstgpt")],
    src: Annotated[Path, typer.Argument(metavar="FILE", help="The workload file to import.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Trace directory to create.")],
    limit: Annotated[int | None, typer.Option(help="Import only the first N rows.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a public serving workload (Mooncake, Azure LLM 2023, BurstGPT) as a trace."""
    from memshare.traces.importers import import_workload

    with _progress(f"importing {src.name}", as_json) as tick:
        manifest = import_workload(fmt, src, output, limit=limit, progress=tick)
    _inspect(output, as_json=as_json, reuse=True, block_size=None, title=f"imported {output}")
    del manifest


@app.command("inspect")
def inspect_cmd(
    trace: Annotated[Path, typer.Argument(metavar="DIR", help="A trace directory.")],
    block_size: Annotated[
        int | None, typer.Option(help="Block size for the reuse potential (default: trace's).")
    ] = None,
    reuse: Annotated[bool, typer.Option(help="Compute prefix reuse potential.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Summarise and verify a trace, and compute its prefix reuse potential."""
    _inspect(trace, as_json=as_json, reuse=reuse, block_size=block_size, title=str(trace))


@app.command("demo")
def demo_cmd(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Where to write the demo trace.")
    ] = Path("memshare-demo"),
    as_json: JsonOpt = False,
) -> None:
    """Import the bundled demo workload and show its summary and reuse potential."""
    from memshare.demo import demo_workload

    fmt, src = demo_workload()
    if (output / "manifest.json").exists():
        _inspect(output, as_json=as_json, reuse=True, block_size=None, title=f"demo {output}")
        return
    import_cmd(fmt, src, output, None, as_json)


@app.command("policies")
def policies_cmd(as_json: JsonOpt = False) -> None:
    """List the registered policies (the --policy choices)."""
    from memshare.registry import policy_names

    names = policy_names()
    if as_json:
        print(json.dumps({"policies": names}))
    else:
        out.print("\n".join(names))


def _inspect(
    trace: Path, *, as_json: bool, reuse: bool, block_size: int | None, title: str
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
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _render_inspect(report, title)


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


class _progress:
    """A rich progress bar fed with counts; silent under ``--json``."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label, self.quiet = label, quiet
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.bar.add_task(label, total=None)

    def __enter__(self) -> Any:
        if not self.quiet:
            self.bar.start()
        return lambda n: self.bar.update(self.task, completed=n)

    def __exit__(self, *exc: object) -> None:
        if not self.quiet:
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

    if resident_blocks < 1_000:
        raise InputError("--resident-blocks", f"{resident_blocks} is too small", "use >= 1000")
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


# ----------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; turn bad input into one line and exit status 2."""
    args = sys.argv[1:] if argv is None else argv
    args = args or ["--help"]
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="memshare", standalone_mode=False)
    except InputError as e:
        if debug:
            raise
        print(f"memshare: error: {e}", file=sys.stderr)
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
