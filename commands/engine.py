"""The paged engine's commands: ``generate`` (the real model under a policy) and ``calibrate``
(KVSharer's layer map), their options (:class:`GenerateArgs`, :class:`CalibrateArgs`) and
tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from memshare.commands.options import (
    BlockSizeOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxSeqsOpt,
    ModelOpt,
    OverwriteOpt,
    PolicyOpt,
    SetOpt,
    StepTokensOpt,
    ThreadsOpt,
    fields_of,
    limit_option,
    output_option,
    spread,
)
from memshare.commands.progress import Bar
from memshare.commands.render import out, print_json
from memshare.errors import InputError

if TYPE_CHECKING:
    from memshare.validate.engine.calibrate import Calibration


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """``generate``'s options in ``--help`` order; the field names are
    :class:`~memshare.validate.engine.generate.GenerateOptions`'."""

    output: Annotated[Path, output_option("Folder for outputs/shares/metrics.")]
    prompts: Annotated[
        Path | None,
        typer.Argument(
            help="Prompts JSONL: 'prompt' (chat template applied) or 'prompt_token_ids'."
        ),
    ] = None
    texts: Annotated[
        Path | None,
        typer.Option(help="Teacher-forced instead: reasoning texts JSONL, run block by block."),
    ] = None
    field: Annotated[
        str | None,
        typer.Option(
            "--field",
            help="Prompt field (default: prompt, question, problem) or --texts text field.",
        ),
    ] = None
    policy: PolicyOpt = "none"
    sets: SetOpt = None
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 256
    kv_blocks: Annotated[
        int | None, typer.Option(help="KV budget in blocks (default: every request at once).")
    ] = None
    block_size: BlockSizeOpt = 16
    limit: Annotated[int | None, limit_option("Only the first N prompts or texts.")] = None
    model: ModelOpt = None
    device: DeviceOpt = "cpu"
    dtype: DtypeOpt = "float32"
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 1.0
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0
    max_num_seqs: MaxSeqsOpt = 256
    max_num_batched_tokens: StepTokensOpt = 8192
    threads: ThreadsOpt = None
    overwrite: OverwriteOpt = False


@spread
def generate_cmd(args: GenerateArgs, as_json: JsonOpt = False) -> None:
    """Run the real model on the paged KV engine under a policy (the simulator's scheduler).

    Writes outputs.jsonl (tokens and text per request), shares.jsonl (every confirmed share,
    with its exact distance on the live KV) and metrics.json (pages, KV bytes, tokens/s).
    """
    from memshare.validate.engine.generate import GenerateOptions, generate

    opts = GenerateOptions(**{**fields_of(args), "sets": args.sets or []})
    with Bar(as_json) as bar:
        metrics = generate(
            opts, status=bar.status, progress=lambda done, total: bar.progress("", done, total)
        )
    if as_json:
        print_json(metrics)
        return
    t = Table(title=f"generate {args.policy} -> {args.output}", show_header=False)
    for key in ("requests", "steps", "tokens_generated", "tokens_per_s", "preemptions", "shares"):
        value = metrics[key]
        t.add_row(
            key.replace("_", " "), f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
        )
    pages = metrics["pages_in_use"]
    t.add_row("KV pages in use (peak / mean)", f"{pages['peak']:,} / {pages['mean']:,.1f}")
    t.add_row("KV bytes in use (peak)", f"{metrics['kv_bytes_in_use']['peak']:,}")
    out.print(t)


@dataclasses.dataclass(frozen=True)
class CalibrateArgs:
    """``calibrate``'s options in ``--help`` order, checked by :meth:`check`."""

    output: Annotated[Path, output_option("Layer map JSON to write.", file=True)]
    model: ModelOpt = None
    texts: Annotated[
        Path | None, typer.Option(help="Calibration texts JSONL (default: bundled prompts).")
    ] = None
    field: Annotated[str | None, typer.Option(help="Text field (dotted path).")] = None
    limit: Annotated[int, limit_option("Calibration texts to use.")] = 4
    max_tokens: Annotated[int, typer.Option(help="Tokens per text.")] = 256
    target: Annotated[float, typer.Option(help="Fraction of layers to share.")] = 0.25
    threshold: Annotated[float, typer.Option(help="Minimum final-hidden cosine.")] = 0.5
    max_trials: Annotated[int, typer.Option(help="Most layer pairs to try.")] = 64
    device: DeviceOpt = "cpu"
    threads: ThreadsOpt = None

    def check(self) -> None:
        """Refuse a target outside (0, 1), a threshold outside [-1, 1], or no work to do."""
        if not 0.0 < self.target < 1.0:
            raise InputError(
                "--target", f"must lie in (0, 1), got {self.target}", "e.g. 0.125, 0.25"
            )
        if not -1.0 <= self.threshold <= 1.0:
            raise InputError(
                "--threshold", f"a cosine lies in [-1, 1], got {self.threshold}", "e.g. 0.5"
            )
        if self.limit < 1 or self.max_tokens < 2 or self.max_trials < 1:
            raise InputError("--limit/--max-tokens/--max-trials", "must be positive", "e.g. 4")


@spread
def calibrate_cmd(args: CalibrateArgs, as_json: JsonOpt = False) -> None:
    """KVSharer calibration on the real model: the layer map the kvsharer policy uses."""
    args.check()
    cal = _calibrate(args, as_json)
    if as_json:
        print(cal.to_json())
        return
    out.print(
        f"{cal.shared_layers}/{cal.num_layers} layers share KV "
        f"(final-hidden cosine {cal.final_cosine:.3f} >= {args.threshold}; "
        f"{len(cal.trials)} pairs tried) -> {args.output}"
    )
    for t in cal.trials:
        if t.accepted:
            out.print(f"  layer {t.layer} uses layer {t.uses}'s KV (cosine {t.cosine:.3f})")


def _calibrate(args: CalibrateArgs, quiet: bool) -> Calibration:
    """Read the calibration texts (the bundled prompts without ``--texts``), load the model,
    calibrate under a progress bar and write the layer map to ``-o``."""
    from memshare.traces.inputs import bundled_prompts, read_problems, read_texts
    from memshare.traces.model.loader import load_model
    from memshare.validate.engine.calibrate import calibrate, write_calibration

    if args.texts is None:
        items = [i.prompt for i in read_problems(bundled_prompts(), limit=args.limit).items]
    else:
        texts = read_texts(args.texts, field=args.field, limit=args.limit)
        items = [i.text or "" for i in texts.items]
    backend = load_model(args.model, device=args.device, threads=args.threads)
    with Bar(quiet, "calibrating (layers shared)") as bar:
        cal = calibrate(
            backend,
            items,
            max_tokens=args.max_tokens,
            target=args.target,
            threshold=args.threshold,
            max_trials=args.max_trials,
            progress=lambda n, _: bar.tick(n),
        )
    write_calibration(cal, args.output)
    return cal
