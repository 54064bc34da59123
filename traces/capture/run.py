"""The capture loop: inputs -> backend -> steps, sketches (and full KV) -> trace directory.

One call, :func:`capture`, does a whole capture (or resumes one). The trace it writes:

- one request per input item, id ``<input file stem>-<line index>``, ``arrival_s`` 0 (a
  capture has no arrival process; the simulator supplies one), prompt and output token ids,
  the output text, reasoning-step starts (token offsets from the first prompt token: 0 for
  the prompt, then the output's steps from :mod:`~memshare.traces.segment`), finish
  reason, timings and ``meta`` (input line index, gold answer, truncation);
- ``ceil(tokens / block_size)`` KV rows per request (prompt and output tokens, the last
  block zero-padded): per layer the JL sketch (:func:`memshare.sketch.sketch_blocks`) of K
  and of V and their norms. Keys are pre-RoPE (``k_proj`` output) unless ``--keys
  post_rope``; the manifest's ``sketch.keys`` says which;
- with ``full_kv``, every token's pre-RoPE K, post-RoPE K and V in float32
  (:mod:`~memshare.traces.capture.fullkv`).

Teacher-forced texts longer than the context limit (prompt plus text over the model's
``max_position_embeddings``, or over ``max_tokens``) are truncated at the limit: the trace
keeps the first tokens, ``finish_reason`` is ``"length"`` and ``meta.text_tokens`` holds
the full length.

Crash safety is the trace writer's (docs/traces.md) plus the full-KV family's; every request is
committed as soon as it is complete. Resume (``resume=True``) re-opens the trace, drops
leftovers, checks that the settings and inputs are the ones it was started with, and
captures only the missing ids. Generate mode runs fixed batches (``items[j*B:(j+1)*B]``
over the whole input list) with a per-batch seed, and re-runs a partly committed batch in
full, so a resumed capture holds exactly what an uninterrupted one would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memshare.errors import InputError
from memshare.traces.capture.base import KEY_FIELD, CaptureBackend, CapturedRequest, KVField
from memshare.traces.capture.fullkv import FullKVWriter, full_kv_dtype
from memshare.traces.capture.options import (
    CaptureOptions,
    CaptureProgress,
    Mode,
    ProgressFn,
    check_options,
    read_inputs,
)
from memshare.traces.capture.resume import check_output, check_resume_matches
from memshare.traces.capture.rows import full_kv_rows, kv_rows, step_starts
from memshare.traces.capture.template import make_template
from memshare.traces.inputs import InputItem
from memshare.traces.schema import MANIFEST, Counts, RequestRecord

__all__ = ["CaptureOptions", "CaptureProgress", "ProgressFn", "capture", "open_backend"]


@dataclass
class _Run:
    """State of one capture run."""

    o: CaptureOptions
    backend: CaptureBackend
    writer: Any
    full: FullKVWriter | None
    full_dtype: np.dtype[Any] | None
    progress: ProgressFn | None
    total: int
    done_ids: set[str]
    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    captured: int = 0
    truncated: int = 0
    sketch_s: float = 0.0
    model_s: float = 0.0
    in_flight: int = 0  # tokens of the batch (or text) the model is running now
    _last_tell: float = 0.0

    def tokens_running(self, n: int) -> None:
        """The backend's per-step report: progress during a batch, at most 4 times a second."""
        self.in_flight = n
        now = time.perf_counter()
        if now - self._last_tell >= 0.25:
            self._last_tell = now
            self.tell()

    @property
    def want(self) -> frozenset[KVField]:
        names: set[KVField] = {KEY_FIELD[self.o.keys], "v"}
        if self.full_dtype is not None:
            names |= set(self.full_dtype.names or ())  # type: ignore[arg-type]
        return frozenset(names)

    def tell(self, phase: str = "capturing", message: str = "") -> None:
        if self.progress is not None:
            self.progress(
                CaptureProgress(
                    phase,
                    message,
                    len(self.done_ids),
                    self.total,
                    self.tokens + self.in_flight,
                    time.perf_counter() - self.t0,
                )
            )

    def add(
        self,
        item: InputItem,
        captured: CapturedRequest,
        text: str | None = None,
        starts: list[int] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        t = time.perf_counter()
        o = self.o
        out_text, steps = step_starts(self.backend, captured, o.segmenter, text, starts)
        rows = kv_rows(captured, o.keys, o.block_size, o.sketch_dim, o.sketch_seed)
        full_ref = None
        if self.full is not None and self.full_dtype is not None:
            full_ref = self.full.append(full_kv_rows(captured, self.full_dtype))
        timings = dict(captured.timings)
        timings["sketch_s"] = time.perf_counter() - t
        record = RequestRecord(
            id=item.id,
            arrival_s=0.0,
            prompt_len=len(captured.prompt_ids),
            output_len=len(captured.output_ids),
            prompt_ids=captured.prompt_ids,
            output_ids=captured.output_ids,
            text=out_text,
            steps=steps,
            finish_reason=captured.finish_reason,
            timings={k: round(v, 6) for k, v in timings.items()},
            meta={"index": item.index, **item.meta, **(meta or {})},
            full_kv=full_ref,
        )
        self.writer.add(record, rows)
        self.sketch_s += time.perf_counter() - t
        self.done_ids.add(item.id)
        self.captured += 1
        self.tokens += captured.tokens
        self.in_flight = 0
        self.tell()


def _batch_seed(seed: int, first_index: int) -> int:
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1)[0])


def _run_generate(run: _Run, items: list[InputItem]) -> None:
    b = run.backend
    g = run.o.generation
    prompts = {it.id: b.chat_prompt(it.prompt) for it in items}
    for it in items:
        if len(prompts[it.id]) >= b.context_limit:
            raise InputError(
                f"{it.id} (input line index {it.index})",
                f"prompt of {len(prompts[it.id])} tokens reaches the context limit "
                f"{b.context_limit}",
                "drop the record or use a model with a longer context",
            )
    for j in range(0, len(items), g.batch_size):
        batch = items[j : j + g.batch_size]
        if all(it.id in run.done_ids for it in batch):
            continue
        t = time.perf_counter()
        results = b.generate(
            [prompts[it.id] for it in batch],
            g,
            run.want,
            batch_seed=_batch_seed(g.seed, batch[0].index),
        )
        run.model_s += time.perf_counter() - t
        for it, res in zip(batch, results, strict=True):
            if it.id not in run.done_ids:
                run.add(it, res)


def _run_teacher_forced(run: _Run, items: list[InputItem]) -> None:
    b = run.backend
    o = run.o
    limit = min(b.context_limit, o.max_tokens or b.context_limit)
    for it in items:
        if it.id in run.done_ids:
            continue
        assert it.text is not None
        prompt_ids = b.chat_prompt(it.prompt)
        if len(prompt_ids) >= limit:
            raise InputError(
                f"{it.id} (input line index {it.index})",
                f"prompt of {len(prompt_ids)} tokens leaves no room for the text under the "
                f"limit of {limit} tokens",
                "raise --max-tokens or use a model with a longer context",
            )
        out_ids, starts = b.encode(it.text)
        text = it.text
        meta: dict[str, Any] = {"text_tokens": len(out_ids)}
        room = limit - len(prompt_ids)
        finish = "text"
        if len(out_ids) > room:
            text = it.text[: starts[room]]
            out_ids, starts = out_ids[:room], starts[:room]
            finish = "length"
            run.truncated += 1
        t = time.perf_counter()
        res = b.teacher_force(prompt_ids, out_ids, run.want, chunk_tokens=o.chunk_tokens)
        run.model_s += time.perf_counter() - t
        res.finish_reason = finish
        run.add(it, res, text, starts, meta)


def open_backend(o: CaptureOptions, status: Callable[[str], None]) -> CaptureBackend:
    """The backend ``o.backend`` names, loaded."""
    if o.backend == "vllm":
        from memshare.traces.capture.vllm import VllmBackend

        return VllmBackend(o.model, dtype=o.dtype, threads=o.threads, status=status)
    from memshare.traces.capture.hf import HFBackend

    return HFBackend(o.model, dtype=o.dtype, device=o.device, threads=o.threads, status=status)


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files directly in ``path``."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def capture(
    o: CaptureOptions,
    progress: ProgressFn | None = None,
    backend: CaptureBackend | None = None,
) -> dict[str, Any]:
    """Capture (or resume) a trace; return a summary. Bad input raises :class:`InputError`."""
    from memshare.traces.writer import TraceWriter

    check_options(o)
    mode, inputs = read_inputs(o)
    old = check_output(o)

    def status(message: str) -> None:
        if progress is not None:
            progress(CaptureProgress("status", message, 0, len(inputs.items)))

    t_load = time.perf_counter()
    if backend is None:
        status("loading model")
        backend = open_backend(o, status)
    load_s = time.perf_counter() - t_load
    if o.keys not in backend.key_modes:
        raise InputError(
            f"--keys {o.keys}",
            f"backend {backend.name} cannot expose these keys for this model",
            f"use --keys {backend.key_modes[0]}",
        )
    template = make_template(o, mode, inputs, backend)
    if old is not None:
        check_resume_matches(old, template, str(o.output / MANIFEST))
    writer = (
        TraceWriter.resume(o.output, template=template)
        if o.resume
        else TraceWriter(o.output, template)
    )
    with writer:
        run = _start(o, backend, writer, progress, len(inputs.items))
        skipped = len(run.done_ids & {it.id for it in inputs.items})
        run.tell("capturing", f"{skipped} requests already captured" if skipped else "")
        try:
            if mode == "generate":
                _run_generate(run, inputs.items)
            else:
                _run_teacher_forced(run, inputs.items)
        finally:
            if run.full is not None:
                run.full.close()
        counts = writer.counts
    summary = _summary(o, mode, run, counts, skipped, load_s)
    run.tell("done")
    return summary


def _start(
    o: CaptureOptions,
    backend: CaptureBackend,
    writer: Any,
    progress: ProgressFn | None,
    total: int,
) -> _Run:
    """The run state on an open writer: the committed ids, and the full-KV writer if the
    trace has full KV; the backend reports its tokens to the run."""
    from memshare.traces.reader import TraceReader

    with TraceReader(o.output, verify=False) as reader:
        committed = list(reader.records())
        manifest = reader.manifest
    full_dtype = full_kv_dtype(manifest)
    full = FullKVWriter(o.output, full_dtype, committed) if full_dtype is not None else None
    done = {r.id for r in committed}
    run = _Run(o, backend, writer, full, full_dtype, progress, total, done)
    if hasattr(backend, "token_progress"):
        backend.token_progress = run.tokens_running
    return run


def _summary(
    o: CaptureOptions, mode: Mode, run: _Run, counts: Counts, skipped: int, load_s: float
) -> dict[str, Any]:
    """What :func:`capture` returns: the trace's counts and this run's figures."""
    elapsed = time.perf_counter() - run.t0
    total_tokens = counts.prompt_tokens + counts.output_tokens
    size = dir_bytes(o.output)
    return {
        "trace": str(o.output),
        "mode": mode,
        "model": run.backend.model_info().name,
        "keys": o.keys,
        "full_kv": run.full_dtype is not None,
        "requests": counts.requests,
        "captured_now": run.captured,
        "resumed_skipped": skipped,
        "truncated": run.truncated,
        "prompt_tokens": counts.prompt_tokens,
        "output_tokens": counts.output_tokens,
        "kv_rows": counts.kv_rows,
        "tokens_now": run.tokens,
        "threads": getattr(run.backend, "threads", None),
        "load_s": round(load_s, 3),
        "capture_s": round(elapsed, 3),
        "model_s": round(run.model_s, 3),
        "sketch_write_s": round(run.sketch_s, 3),
        "tokens_per_s": round(run.tokens / elapsed, 2) if elapsed > 0 else None,
        "bytes_on_disk": size,
        "bytes_per_1k_tokens": round(1000 * size / total_tokens, 1) if total_tokens else None,
    }
