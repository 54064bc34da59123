"""``memshare bench capture``: what capturing costs over plain generation, and trace sizes.

Figures (printed, never asserted by a timed test):

- generate mode: wall time of plain generation (HF: ``model.generate``, greedy, the same
  left-padded batches; vLLM: the engine's own generation, pass 1 of its capture), nothing
  captured, against a full capture of the same prompts (hooks, sketches, trace
  writing with fsync per request); overhead in percent (target <= 20%, docs/layout.md). The
  backend's own decode loop without capture is timed too, to separate loop cost from capture
  cost. Runs alternate and the median of ``repeats`` is reported.
- teacher-forced mode (with ``texts``): tokens per second of a capture of the texts.
- size on disk per 1,000 tokens of a sketch-only trace (measured) and of the full-KV family
  (exact: its record size).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memshare.traces.capture.base import KEY_FIELD, CaptureBackend, GenerationSettings
from memshare.traces.capture.run import CaptureOptions, capture, open_backend
from memshare.traces.inputs import bundled_prompts, read_problems
from memshare.traces.reader import TraceReader
from memshare.traces.schema import FULL_KV_FIELDS, full_kv_row_dtype

Say = Callable[[str], None]


@dataclass
class _Repeats:
    """Wall times of each repeat (plain generation, decode loop, capture), and what the last
    capture returned; ``same``: every capture's outputs equal plain generation's."""

    plain_s: list[float] = field(default_factory=list)
    loop_s: list[float] = field(default_factory=list)
    cap_s: list[float] = field(default_factory=list)
    plain_tokens: int = 0
    same: bool = True
    summary: dict[str, Any] = field(default_factory=dict)


def bench_capture(
    *,
    dataset: Path | None = None,
    limit: int = 8,
    max_new_tokens: int = 128,
    batch_size: int = 4,
    texts: Path | None = None,
    texts_limit: int | None = 3,
    max_tokens: int | None = None,
    model: str | None = None,
    backend_name: str = "hf",
    repeats: int = 3,
    status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the capture benchmark; return its figures."""

    def say(msg: str) -> None:
        if status is not None:
            status(msg)

    say("loading model")
    base = CaptureOptions(output=Path("."), model=model, backend=backend_name)
    backend = open_backend(base, say)
    base = replace(base, keys=backend.key_modes[0])
    path = dataset if dataset is not None else bundled_prompts()
    items = read_problems(path, limit=limit).items
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    prompts = [backend.chat_prompt(it.prompt) for it in items]
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    work = Path(tempfile.mkdtemp(prefix="memshare-bench-"))
    try:
        say("warming up")
        warm = replace(settings, max_new_tokens=4)
        backend.plain_generate(batches[0], warm)
        backend.generate(batches[0], warm, frozenset({KEY_FIELD[base.keys], "v"}))
        gen = replace(base, dataset=path, limit=limit, generation=settings)
        runs = _repeat(backend, gen, batches, repeats, work, say)
        result = _generate_figures(backend, runs, len(items), settings, repeats)
        if texts is not None:
            say("teacher-forced capture of the texts")
            opts = replace(
                base, output=work / "texts", texts=texts, limit=texts_limit, max_tokens=max_tokens
            )
            result["teacher_forced"] = _teacher_forced(capture(opts, backend=backend))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _repeat(
    backend: CaptureBackend,
    gen: CaptureOptions,
    batches: list[list[list[int]]],
    repeats: int,
    work: Path,
    say: Say,
) -> _Repeats:
    """Alternate plain generation, the decode loop without capture and a full capture of
    the prompts (``gen``: the capture's options but its output directory)."""
    runs = _Repeats()
    settings = gen.generation
    for r in range(repeats):
        say(f"repeat {r + 1}/{repeats}: plain model.generate")
        t = time.perf_counter()
        outs = [o for b in batches for o in backend.plain_generate(b, settings)]
        runs.plain_s.append(time.perf_counter() - t)
        runs.plain_tokens = sum(len(o) for o in outs)
        say(f"repeat {r + 1}/{repeats}: decode loop without capture")
        t = time.perf_counter()
        for b in batches:
            backend.generate(b, settings, frozenset())
        runs.loop_s.append(time.perf_counter() - t)
        say(f"repeat {r + 1}/{repeats}: capture")
        out_dir = work / f"gen-{r}"
        t = time.perf_counter()
        runs.summary = capture(replace(gen, output=out_dir), backend=backend)
        runs.cap_s.append(time.perf_counter() - t)
        with TraceReader(out_dir) as reader:
            got = [rec.output_ids for rec in reader]
        runs.same = runs.same and got == outs
    return runs


def _generate_figures(
    backend: CaptureBackend,
    runs: _Repeats,
    prompts: int,
    settings: GenerationSettings,
    repeats: int,
) -> dict[str, Any]:
    """The generate-mode figures (medians over the repeats) and the trace sizes."""
    plain, loop, cap = (statistics.median(x) for x in (runs.plain_s, runs.loop_s, runs.cap_s))
    summary = runs.summary
    tokens_total = summary["prompt_tokens"] + summary["output_tokens"]
    m = backend.model_info()
    full = full_kv_row_dtype(m.num_layers, m.num_kv_heads, m.head_dim, FULL_KV_FIELDS)
    return {
        "model": m.name,
        "backend": backend.name,
        "device": getattr(backend, "device", "cpu"),
        "prompts": prompts,
        "batch_size": settings.batch_size,
        "max_new_tokens": settings.max_new_tokens,
        "generated_tokens": runs.plain_tokens,
        "repeats": repeats,
        "plain_generate_s": round(plain, 3),
        "decode_loop_s": round(loop, 3),
        "capture_s": round(cap, 3),
        "plain_tokens_per_s": round(runs.plain_tokens / plain, 2),
        "capture_tokens_per_s": round(summary["output_tokens"] / cap, 2),
        "capture_overhead_pct": round(100 * (cap / plain - 1), 1),
        "capture_overhead_vs_loop_pct": round(100 * (cap / loop - 1), 1),
        "same_outputs_as_generate": runs.same,
        "runs_s": {"plain": runs.plain_s, "loop": runs.loop_s, "capture": runs.cap_s},
        "sketch_trace_bytes_per_1k_tokens": round(
            1000 * summary["bytes_on_disk"] / tokens_total, 1
        ),
        "full_kv_bytes_per_1k_tokens": 1000 * full.itemsize,
    }


def _teacher_forced(tf: dict[str, Any]) -> dict[str, Any]:
    """The teacher-forced figures of a capture's summary."""
    tokens = tf["prompt_tokens"] + tf["output_tokens"]
    return {
        "texts": tf["requests"],
        "tokens": tokens,
        "truncated_at_context_limit": tf["truncated"],
        "capture_s": tf["capture_s"],
        "model_s": tf["model_s"],
        "tokens_per_s": round(tokens / tf["capture_s"], 1),
        "bytes_per_1k_tokens": tf["bytes_per_1k_tokens"],
    }
