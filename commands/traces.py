"""The trace commands: ``import`` (a serving workload as a trace) and ``inspect`` (summary,
verification, prefix reuse potential, K/V similarity), with their tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from memshare.commands.options import (
    JsonOpt,
    TraceBlockSizeOpt,
    limit_option,
    out_file,
    output_option,
)
from memshare.commands.progress import Bar
from memshare.commands.render import out
from memshare.errors import InputError
from memshare.limits import check_tokens_per_block


def import_cmd(
    fmt: Annotated[
        str, typer.Argument(metavar="FORMAT", help="mooncake | azure | burstgpt | tokens")
    ],
    src: Annotated[Path, typer.Argument(metavar="FILE", help="The workload file to import.")],
    output: Annotated[Path, output_option("Trace directory to create.")],
    limit: Annotated[int | None, limit_option("Import only the first N rows.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="tokens: the model whose tokenizer reads 'prompt' texts and whose context "
            "sizes them (default: SmolLM2-135M); not for a file of token ids."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a serving workload (Mooncake, Azure LLM 2023, BurstGPT, or token ids) as a trace."""
    from memshare.traces.importers import import_workload
    from memshare.traces.importers.tokenizer import LazyTokenizer

    if model is not None and fmt != "tokens":
        raise InputError("--model", f"applies to the tokens format, not {fmt}", "leave it out")
    tokenize = LazyTokenizer(model) if fmt == "tokens" else None
    with Bar(as_json, f"importing {src.name}") as bar:
        manifest = import_workload(
            fmt, src, output, limit=limit, progress=bar.tick, tokenize=tokenize
        )
    show_trace(output, as_json=as_json, reuse=True, block_size=None, title=f"imported {output}")
    zero = manifest.source.get("zero_output_rows")
    if zero:
        print(
            f"memshare: note: {zero:,} rows have 0 output tokens; simulate serves each as its "
            "prefill plus 1 sampled token and counts 0 output tokens",
            file=sys.stderr,
        )


def inspect_cmd(
    trace: Annotated[Path, typer.Argument(metavar="DIR", help="A trace directory.")],
    block_size: TraceBlockSizeOpt = None,
    reuse: Annotated[bool, typer.Option(help="Compute prefix reuse potential.")] = True,
    similarity: Annotated[
        bool,
        typer.Option(
            "--similarity", help="Per layer: each block's distance to its nearest earlier block."
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="--similarity PNG (default: DIR/similarity.png).", callback=out_file),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Summarise and verify a trace, and compute its prefix reuse potential."""
    show_trace(
        trace,
        as_json=as_json,
        reuse=reuse,
        block_size=block_size,
        title=str(trace),
        similarity=similarity,
        plot=plot,
    )


def show_trace(
    trace: Path,
    *,
    as_json: bool,
    reuse: bool,
    block_size: int | None,
    title: str,
    similarity: bool = False,
    plot: Path | None = None,
) -> None:
    """Print :func:`inspect_report`: one JSON object, or its tables."""
    report = inspect_report(
        trace, reuse=reuse, block_size=block_size, similarity=similarity, plot=plot
    )
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _render_inspect(report, title)
    if similarity:
        _render_similarity(report["similarity"])


def inspect_report(
    trace: Path, *, reuse: bool, block_size: int | None, similarity: bool, plot: Path | None
) -> dict[str, Any]:
    """A trace's summary and verification, its prefix reuse potential when ``reuse`` (at
    ``block_size``, default the trace's) and, when ``similarity``, the per-layer K/V
    similarity with its histogram PNG (at ``plot``, default TRACE/similarity.png)."""
    from memshare.traces.reader import TraceReader
    from memshare.traces.summary import prefix_reuse, summarize

    if block_size is not None:
        check_tokens_per_block(block_size)
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
    return report


def _similarity(trace: Path, plot: Path | None) -> dict[str, Any]:
    from memshare.traces.capture.similarity import similarity

    target = plot if plot is not None else trace / "similarity.png"
    try:
        return similarity(trace, target)
    except PermissionError:
        raise InputError(
            str(target), "cannot write the histogram PNG here", "pass --plot PATH"
        ) from None


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
    elif reuse != "skipped" and reuse["prompt_blocks"] == 0:
        longest = int(s["prompt_len"]["max"])
        t.add_row(
            "prefix reuse",
            f"n/a: no prompt fills a block of {reuse['block_size']} tokens (the longest has "
            f"{longest}); pass --block-size {longest} or less",
        )
    elif reuse != "skipped":
        t.add_row(
            f"prefix reuse (unlimited cache, block {reuse['block_size']})",
            f"{reuse['token_hit_rate']:.2%} of prompt tokens, "
            f"{reuse['block_hit_rate']:.2%} of blocks",
        )
    out.print(t)


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
