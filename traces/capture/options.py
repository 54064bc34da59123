"""What ``memshare capture`` takes: :class:`CaptureOptions`, their checks, and the inputs they name.

Every option is checked before a model loads, each bad one a one-line
:class:`~memshare.errors.InputError` naming the flag. :func:`read_inputs` picks the mode from
the inputs: ``--texts`` teacher-forces reasoning texts, otherwise a problem set (the bundled
GSM8K prompts by default) is generated from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from memshare.errors import InputError
from memshare.limits import check_tokens_per_block
from memshare.sketch import DEFAULT_DIM, DEFAULT_SEED
from memshare.traces.capture.base import GenerationSettings, KeyMode
from memshare.traces.inputs import InputSet, bundled_prompts, read_problems, read_texts
from memshare.traces.segment import SegmenterConfig

Mode = Literal["generate", "teacher_forced"]
BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class CaptureOptions:
    """Everything ``memshare capture`` takes (CLI flags map one to one)."""

    output: Path
    dataset: Path | None = None  # generate mode: problem set
    texts: Path | None = None  # teacher-forced mode: reasoning texts
    field_path: str | None = None  # --field: prompt (dataset) or text (texts) field; dotted
    prompt_field: str | None = None  # teacher-forced: the problem field (auto-detected)
    limit: int | None = None
    model: str | None = None
    backend: str = "hf"
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    block_size: int = 16
    sketch_dim: int = DEFAULT_DIM
    sketch_seed: int = DEFAULT_SEED
    keys: KeyMode = "pre_rope"  # vllm: its cached keys, un-rotated (vllm_rope.py)
    full_kv: bool = False
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    chunk_tokens: int = 512
    max_tokens: int | None = None  # teacher-forced: cap on prompt + output tokens
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    resume: bool = False


@dataclass(frozen=True)
class CaptureProgress:
    """What a progress callback receives after each event."""

    phase: str  # "loading", "status", "capturing", "done"
    message: str = ""
    requests_done: int = 0  # committed in the trace, including earlier runs
    requests_total: int = 0
    tokens_done: int = 0  # tokens captured by this run
    elapsed_s: float = 0.0  # since capturing started (model loaded)


ProgressFn = Callable[[CaptureProgress], None]


def check_options(o: CaptureOptions) -> None:
    """Every option in range and the combination allowed; the first problem raises."""
    check_tokens_per_block(o.block_size)
    g = o.generation
    checks: list[tuple[bool, str, str, str]] = [
        (o.sketch_dim >= 1, "--sketch-dim", f"must be >= 1, got {o.sketch_dim}", "e.g. 64"),
        (o.sketch_seed >= 0, "--sketch-seed", f"must be >= 0, got {o.sketch_seed}", "e.g. 0"),
        (o.chunk_tokens >= 1, "--chunk-tokens", f"must be >= 1, got {o.chunk_tokens}", "e.g. 512"),
        (
            g.max_new_tokens >= 1,
            "--max-new-tokens",
            f"must be >= 1, got {g.max_new_tokens}",
            "e.g. 256",
        ),
        (g.batch_size >= 1, "--batch-size", f"must be >= 1, got {g.batch_size}", "e.g. 4"),
        (g.temperature >= 0, "--temperature", f"must be >= 0, got {g.temperature}", "0 is greedy"),
        (0 < g.top_p <= 1, "--top-p", f"must be in (0, 1], got {g.top_p}", "e.g. 0.95"),
        (
            o.keys in ("pre_rope", "post_rope"),
            "--keys",
            f"must be pre_rope or post_rope, got {o.keys!r}",
            "e.g. --keys pre_rope",
        ),
        (
            o.backend in BACKENDS,
            "--backend",
            f"unknown backend {o.backend!r}",
            f"use one of {', '.join(BACKENDS)}",
        ),
        (
            o.backend != "vllm" or o.device == "cpu",
            "--device",
            f"the vllm backend runs vLLM's CPU build, got --device {o.device}",
            "use --device cpu, or --backend hf on CUDA",
        ),
    ]
    if o.max_tokens is not None:
        checks.append(
            (o.max_tokens >= 2, "--max-tokens", f"must be >= 2, got {o.max_tokens}", "e.g. 4096")
        )
    if o.dataset is not None and o.texts is not None:
        checks.append(
            (
                False,
                "--dataset/--texts",
                "both given",
                "pass one: --dataset generates, --texts teacher-forces",
            )
        )
    for ok, where, problem, fix in checks:
        if not ok:
            raise InputError(where, problem, fix)


def read_inputs(o: CaptureOptions) -> tuple[Mode, InputSet]:
    """The input items and the mode they imply (bundled GSM8K prompts by default)."""
    if o.texts is not None:
        return "teacher_forced", read_texts(
            o.texts, field=o.field_path, prompt_field=o.prompt_field, limit=o.limit
        )
    if o.prompt_field is not None:
        raise InputError("--prompt-field", "only applies to --texts", "use --field with --dataset")
    path = o.dataset if o.dataset is not None else bundled_prompts()
    inputs = read_problems(path, field=o.field_path, limit=o.limit)
    if o.dataset is None:
        inputs.source["bundled"] = True
    return "generate", inputs
