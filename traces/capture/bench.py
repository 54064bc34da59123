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
from dataclasses import replace
from pathlib import Path
from typing import Any

from memshare.traces.capture.base import KEY_FIELD, GenerationSettings
from memshare.traces.capture.inputs import bundled_prompts, read_problems
from memshare.traces.capture.run import CaptureOptions, capture, open_backend
from memshare.traces.schema import FULL_KV_FIELDS, full_kv_row_dtype


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
    want = frozenset({KEY_FIELD[base.keys], "v"})
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
        backend.generate(batches[0], warm, want)

        plain_s: list[float] = []
        loop_s: list[float] = []
        cap_s: list[float] = []
        plain_tokens = 0
        same = True
        summary: dict[str, Any] = {}
        for r in range(repeats):
            say(f"repeat {r + 1}/{repeats}: plain model.generate")
            t = time.perf_counter()
            outs = [o for b in batches for o in backend.plain_generate(b, settings)]
            plain_s.append(time.perf_counter() - t)
            plain_tokens = sum(len(o) for o in outs)
            say(f"repeat {r + 1}/{repeats}: decode loop without capture")
            t = time.perf_counter()
            for b in batches:
                backend.generate(b, settings, frozenset())
            loop_s.append(time.perf_counter() - t)
            say(f"repeat {r + 1}/{repeats}: capture")
            out_dir = work / f"gen-{r}"
            opts = replace(base, output=out_dir, dataset=path, limit=limit, generation=settings)
            t = time.perf_counter()
            summary = capture(opts, backend=backend)
            cap_s.append(time.perf_counter() - t)
            from memshare.traces.reader import TraceReader

            with TraceReader(out_dir) as reader:
                got = [rec.output_ids for rec in reader]
            same = same and got == outs
        plain, loop, cap = (statistics.median(x) for x in (plain_s, loop_s, cap_s))
        tokens_total = summary["prompt_tokens"] + summary["output_tokens"]
        result: dict[str, Any] = {
            "model": backend.model_info().name,
            "backend": backend.name,
            "device": getattr(backend, "device", "cpu"),
            "prompts": len(items),
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "generated_tokens": plain_tokens,
            "repeats": repeats,
            "plain_generate_s": round(plain, 3),
            "decode_loop_s": round(loop, 3),
            "capture_s": round(cap, 3),
            "plain_tokens_per_s": round(plain_tokens / plain, 2),
            "capture_tokens_per_s": round(summary["output_tokens"] / cap, 2),
            "capture_overhead_pct": round(100 * (cap / plain - 1), 1),
            "capture_overhead_vs_loop_pct": round(100 * (cap / loop - 1), 1),
            "same_outputs_as_generate": same,
            "runs_s": {"plain": plain_s, "loop": loop_s, "capture": cap_s},
            "sketch_trace_bytes_per_1k_tokens": round(
                1000 * summary["bytes_on_disk"] / tokens_total, 1
            ),
        }
        m = backend.model_info()
        full = full_kv_row_dtype(m.num_layers, m.num_kv_heads, m.head_dim, FULL_KV_FIELDS)
        result["full_kv_bytes_per_1k_tokens"] = 1000 * full.itemsize
        if texts is not None:
            say("teacher-forced capture of the texts")
            out_dir = work / "texts"
            opts = replace(
                base, output=out_dir, texts=texts, limit=texts_limit, max_tokens=max_tokens
            )
            tf = capture(opts, backend=backend)
            tokens = tf["prompt_tokens"] + tf["output_tokens"]
            result["teacher_forced"] = {
                "texts": tf["requests"],
                "tokens": tokens,
                "truncated_at_context_limit": tf["truncated"],
                "capture_s": tf["capture_s"],
                "model_s": tf["model_s"],
                "tokens_per_s": round(tokens / tf["capture_s"], 1),
                "bytes_per_1k_tokens": tf["bytes_per_1k_tokens"],
            }
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
