"""``memshare capture``: its options (:class:`CaptureArgs`, each declared once) and the
command, which captures a real model's KV trace and prints its summary."""

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
    ModelOpt,
    ThreadsOpt,
    limit_option,
    output_option,
    spread,
)
from memshare.commands.progress import Bar
from memshare.commands.render import out, print_json
from memshare.errors import InputError
from memshare.sketch import DEFAULT_DIM, DEFAULT_SEED

if TYPE_CHECKING:
    from memshare.traces.capture import CaptureOptions


@dataclasses.dataclass(frozen=True)
class CaptureArgs:
    """``capture``'s options in ``--help`` order; :meth:`options` turns them into the
    library's :class:`~memshare.traces.capture.CaptureOptions`."""

    output: Annotated[Path, output_option("Trace directory to create.")]
    dataset: Annotated[
        Path | None,
        typer.Option(help="Generate mode: a problem set JSONL (GSM8K, MATH-500, AIME)."),
    ] = None
    texts: Annotated[
        Path | None,
        typer.Option(help="Teacher-forced mode: reasoning texts JSONL (R1, Sky-T1) or a .txt."),
    ] = None
    field: Annotated[
        str | None,
        typer.Option(
            "--field", help="Prompt (--dataset) or text (--texts) field; dotted path, code[0]."
        ),
    ] = None
    prompt_field: Annotated[
        str | None, typer.Option(help="--texts: the problem field (default: auto-detected).")
    ] = None
    limit: Annotated[int | None, limit_option("Capture only the first N records.")] = None
    model: ModelOpt = None
    max_new_tokens: Annotated[int, typer.Option(help="Generate: tokens per answer.")] = 256
    batch_size: Annotated[int, typer.Option(help="Generate: prompts per batch.")] = 4
    temperature: Annotated[float, typer.Option(help="Generate: 0 is greedy.")] = 0.0
    top_p: Annotated[float, typer.Option(help="Generate: nucleus sampling.")] = 1.0
    seed: Annotated[int, typer.Option(help="Generate: sampling seed.")] = 0
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help="Texts: cap on prompt+text tokens; longer texts are cut there (also at the "
            "model's context limit)."
        ),
    ] = None
    chunk_tokens: Annotated[int, typer.Option(help="Texts: tokens per forward chunk.")] = 512
    block_size: BlockSizeOpt = 16
    sketch_dim: Annotated[int, typer.Option(help="JL sketch dimension d.")] = DEFAULT_DIM
    sketch_seed: Annotated[int, typer.Option(help="JL projection seed.")] = DEFAULT_SEED
    keys: Annotated[
        str,
        typer.Option(
            help="Sketch keys pre_rope (before rotary embedding: what cf-topk and exact-dedup "
            "judge) or post_rope (as cached). vllm: its cached keys, un-rotated for pre_rope."
        ),
    ] = "pre_rope"
    backend: Annotated[
        str, typer.Option(help="hf (transformers) or vllm (vLLM's CPU build, in-process).")
    ] = "hf"
    full_kv: Annotated[
        bool, typer.Option("--full-kv", help="Also store every token's full K/V (float32).")
    ] = False
    step_cues: Annotated[
        str | None,
        typer.Option(help="Comma-separated cue phrases that start a reasoning step."),
    ] = None
    min_step_tokens: Annotated[int, typer.Option(help="Minimum reasoning step length.")] = 32
    dtype: DtypeOpt = "float32"
    device: DeviceOpt = "cpu"
    threads: ThreadsOpt = None
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted capture in -o.")
    ] = False

    def options(self) -> CaptureOptions:
        """The library's options: cue phrases split, sampling grouped; checked by ``capture``."""
        from memshare.traces.capture import CaptureOptions, GenerationSettings
        from memshare.traces.segment import DEFAULT_CUES, SegmenterConfig

        if self.min_step_tokens < 1:
            raise InputError(
                "--min-step-tokens", f"must be >= 1, got {self.min_step_tokens}", "e.g. 32"
            )
        cues = self.step_cues
        return CaptureOptions(
            output=self.output,
            dataset=self.dataset,
            texts=self.texts,
            field_path=self.field,
            prompt_field=self.prompt_field,
            limit=self.limit,
            model=self.model,
            backend=self.backend,
            dtype=self.dtype,
            device=self.device,
            threads=self.threads,
            block_size=self.block_size,
            sketch_dim=self.sketch_dim,
            sketch_seed=self.sketch_seed,
            keys=self.keys,  # type: ignore[arg-type]  # checked by capture()
            full_kv=self.full_kv,
            generation=GenerationSettings(
                self.max_new_tokens, self.temperature, self.top_p, self.seed, self.batch_size
            ),
            chunk_tokens=self.chunk_tokens,
            max_tokens=self.max_tokens,
            segmenter=SegmenterConfig(
                cues=DEFAULT_CUES if cues is None else tuple(c for c in cues.split(",") if c),
                min_tokens=self.min_step_tokens,
            ),
            resume=self.resume,
        )


@spread
def capture_cmd(args: CaptureArgs, as_json: JsonOpt = False) -> None:
    """Capture real KV traces from a real model.

    --dataset generates answers; --texts teacher-forces reasoning texts; neither: bundled GSM8K.
    Per block and layer: JL sketches of K (pre-RoPE by default) and of V, with their norms.
    Texts over the context limit (or --max-tokens) are cut there: finish_reason "length".
    """
    from memshare.traces.capture import capture

    opts = args.options()
    with Bar(as_json, rate=True) as bar:
        summary = capture(opts, progress=bar.capture)
    if as_json:
        print_json(summary)
        return
    t = Table(title=f"captured {args.output}", show_header=False)
    for key, value in summary.items():
        t.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    out.print(t)
