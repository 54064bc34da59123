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
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from memshare.errors import InputError
from memshare.sketch import DEFAULT_DIM, DEFAULT_SEED, sketch_blocks
from memshare.traces.capture.base import (
    KEY_FIELD,
    CaptureBackend,
    CapturedRequest,
    GenerationSettings,
    KeyMode,
    KVField,
)
from memshare.traces.capture.fullkv import FullKVWriter
from memshare.traces.capture.inputs import (
    InputItem,
    InputSet,
    bundled_prompts,
    read_problems,
    read_texts,
)
from memshare.traces.schema import (
    FULL_KV_FIELDS,
    FULL_KV_GLOB,
    MANIFEST,
    Manifest,
    RequestRecord,
    SketchSpec,
    kv_row_dtype,
)
from memshare.traces.segment import SegmenterConfig, segment_tokens

Mode = Literal["generate", "teacher_forced"]
BACKENDS = ("hf", "vllm")
BLOCKS_NOTE = "ceil(tokens / block_size) rows per request; the last block zero-padded"
ARRIVAL_NOTE = "all requests arrive at 0 s (a capture has no arrival process)"
TRUNCATION_NOTE = (
    "texts over the context limit (or max_tokens) are cut there: finish_reason 'length', "
    "meta.text_tokens = full length"
)


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
    keys: KeyMode = "pre_rope"  # the vllm backend has post-RoPE keys only
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


def _check_options(o: CaptureOptions) -> None:
    g = o.generation
    checks: list[tuple[bool, str, str, str]] = [
        (o.block_size >= 1, "--block-size", f"must be >= 1, got {o.block_size}", "e.g. 16"),
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
            o.backend != "vllm" or o.keys == "post_rope",
            f"--keys {o.keys}",
            "the vllm backend reads vLLM's KV cache, which holds post-RoPE keys only",
            "use --keys post_rope (the default with --backend vllm)",
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


def _has_trace_files(path: Path) -> bool:
    names = ("manifest.json", "manifest.json.tmp", "requests.jsonl")
    return (
        any((path / n).exists() for n in names)
        or any(path.glob("kv-*.bin"))
        or any(path.glob(FULL_KV_GLOB))
    )


def _check_output(o: CaptureOptions) -> Manifest | None:
    """Fail early on a bad output directory; the existing manifest when resuming one."""
    from memshare.traces.reader import load_manifest

    out = o.output
    if out.exists() and not out.is_dir():
        raise InputError(str(out), "exists and is not a directory", "choose another -o")
    if not o.resume:
        if out.is_dir() and _has_trace_files(out):
            raise InputError(
                str(out),
                "already holds a trace (or leftovers of one)",
                "pass --resume to continue that capture, or choose another -o, or delete it",
            )
        return None
    if not out.is_dir():
        return None  # nothing to resume yet: a fresh capture
    if not (out / MANIFEST).is_file():
        if any(out.iterdir()) and not _has_trace_files(out):
            raise InputError(
                str(out),
                "--resume: not a capture (no manifest.json, and files that are not a trace's)",
                "pass the directory of an interrupted capture, or drop --resume",
            )
        return None  # killed before its first commit: start over
    manifest = load_manifest(out)
    if manifest.kind != "kv" or manifest.capture.get("tool") != "memshare capture":
        raise InputError(
            str(out / MANIFEST),
            f"--resume: not a capture (a {manifest.kind!r} trace written by "
            f"{manifest.capture.get('tool') or manifest.source.get('format') or 'an importer'})",
            "resume only directories written by `memshare capture`",
        )
    return manifest


_IGNORED_ON_RESUME = ("limit",)


def _check_resume_matches(old: Manifest, new: Manifest, where: str) -> None:
    fix = "resume with the options of the interrupted capture, or capture into a new -o"
    pairs: list[tuple[str, Any, Any]] = [
        ("block_size", old.block_size, new.block_size),
        ("model", old.model, new.model),
        ("sketch", old.sketch, new.sketch),
    ]
    for key in sorted(set(old.capture) | set(new.capture)):
        if key not in _IGNORED_ON_RESUME:
            pairs.append((f"capture.{key}", old.capture.get(key), new.capture.get(key)))
    oi, ni = old.source.get("inputs", {}), new.source.get("inputs", {})
    for key in ("mode", "sha256", "prompt_field", "text_field"):
        pairs.append((f"inputs.{key}", oi.get(key), ni.get(key)))
    om, nm = old.source.get("model", {}), new.source.get("model", {})
    for key in ("model", "model_format", "model_sha256"):
        pairs.append((f"model.{key}", om.get(key), nm.get(key)))
    for name, a, b in pairs:
        if a != b:
            raise InputError(
                where,
                f"--resume: setting {name} was {_short(a)} in the interrupted capture, now "
                f"{_short(b)}",
                fix,
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def make_template(
    o: CaptureOptions, mode: Mode, inputs: InputSet, backend: CaptureBackend
) -> Manifest:
    """The manifest template of this capture (settings and provenance)."""
    capture: dict[str, Any] = {
        "tool": "memshare capture",
        "backend": backend.name,
        "mode": mode,
        "keys": o.keys,
        "dtype": o.dtype,
        "limit": o.limit,
        "steps": o.segmenter.to_dict(),
        "blocks": BLOCKS_NOTE,
        "arrival": ARRIVAL_NOTE,
        "full_kv": None,
    }
    if mode == "generate":
        capture["generation"] = o.generation.to_dict()
    else:
        capture["chunk_tokens"] = o.chunk_tokens
        capture["max_tokens"] = o.max_tokens
        capture["truncation"] = TRUNCATION_NOTE
    if o.full_kv:
        fields = [f for f in FULL_KV_FIELDS if f != "k" or "pre_rope" in backend.key_modes]
        capture["full_kv"] = {"fields": fields, "dtype": "<f4", "files": FULL_KV_GLOB}
    versions = getattr(backend, "versions", None)
    source: dict[str, Any] = {
        "inputs": inputs.source,
        "model": backend.describe(),
        "versions": versions() if callable(versions) else {},
    }
    return Manifest(
        kind="kv",
        block_size=o.block_size,
        model=backend.model_info(),
        sketch=SketchSpec(method="jl", dim=o.sketch_dim, seed=o.sketch_seed, keys=o.keys),
        source=source,
        capture=capture,
    )


def kv_rows(
    captured: CapturedRequest, keys: KeyMode, block_size: int, dim: int, seed: int
) -> npt.NDArray[Any]:
    """The trace's KV rows of one request: per block and layer, sketches and norms."""
    k = captured.get(KEY_FIELD[keys])
    v = captured.get("v")
    sk, nk = sketch_blocks(k, block_size, dim, seed)  # (L, blocks, d), (L, blocks)
    sv, nv = sketch_blocks(v, block_size, dim, seed)
    layers, blocks = nk.shape
    rows = np.zeros(blocks, dtype=kv_row_dtype(layers, dim))
    rows["sketch"][:, :, 0, :] = sk.transpose(1, 0, 2)
    rows["sketch"][:, :, 1, :] = sv.transpose(1, 0, 2)
    rows["norm"][:, :, 0] = nk.T
    rows["norm"][:, :, 1] = nv.T
    return rows


def full_kv_rows(captured: CapturedRequest, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """Every token's K/V as full-KV records (``(tokens,)`` of ``dtype``)."""
    rows = np.zeros(captured.tokens, dtype=dtype)
    for name in dtype.names or ():
        rows[name] = captured.get(name).transpose(1, 0, 2, 3)  # type: ignore[arg-type]
    return rows


def _steps(
    backend: CaptureBackend,
    captured: CapturedRequest,
    seg: SegmenterConfig,
    text: str | None,
    starts: list[int] | None,
) -> tuple[str, list[int]]:
    """Output text and step starts (token offsets from the first prompt token)."""
    if text is None or starts is None:
        text, starts = backend.token_starts(captured.output_ids)
    out_steps = segment_tokens(text, starts, seg)
    p = len(captured.prompt_ids)
    return text, [0, *(p + s for s in out_steps if p + s > 0)]


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
        out_text, steps = _steps(self.backend, captured, o.segmenter, text, starts)
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
    from memshare.traces.reader import TraceReader
    from memshare.traces.writer import TraceWriter

    _check_options(o)
    mode, inputs = read_inputs(o)
    old = _check_output(o)

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
        _check_resume_matches(old, template, str(o.output / MANIFEST))
    writer = (
        TraceWriter.resume(o.output, template=template)
        if o.resume
        else TraceWriter(o.output, template)
    )
    with writer:
        with TraceReader(o.output, verify=False) as reader:
            committed = list(reader.records())
            manifest = reader.manifest
        from memshare.traces.capture.fullkv import full_kv_dtype

        full_dtype = full_kv_dtype(manifest)
        full = FullKVWriter(o.output, full_dtype, committed) if full_dtype is not None else None
        done = {r.id for r in committed}
        run = _Run(o, backend, writer, full, full_dtype, progress, len(inputs.items), done)
        if hasattr(backend, "token_progress"):
            backend.token_progress = run.tokens_running
        skipped = len(done & {it.id for it in inputs.items})
        run.tell("capturing", f"{skipped} requests already captured" if skipped else "")
        try:
            if mode == "generate":
                _run_generate(run, inputs.items)
            else:
                _run_teacher_forced(run, inputs.items)
        finally:
            if full is not None:
                full.close()
        counts = writer.counts
    elapsed = time.perf_counter() - run.t0
    total_tokens = counts.prompt_tokens + counts.output_tokens
    size = dir_bytes(o.output)
    run.tell("done")
    return {
        "trace": str(o.output),
        "mode": mode,
        "model": backend.model_info().name,
        "keys": o.keys,
        "full_kv": full_dtype is not None,
        "requests": counts.requests,
        "captured_now": run.captured,
        "resumed_skipped": skipped,
        "truncated": run.truncated,
        "prompt_tokens": counts.prompt_tokens,
        "output_tokens": counts.output_tokens,
        "kv_rows": counts.kv_rows,
        "tokens_now": run.tokens,
        "threads": getattr(backend, "threads", None),
        "load_s": round(load_s, 3),
        "capture_s": round(elapsed, 3),
        "model_s": round(run.model_s, 3),
        "sketch_write_s": round(run.sketch_s, 3),
        "tokens_per_s": round(run.tokens / elapsed, 2) if elapsed > 0 else None,
        "bytes_on_disk": size,
        "bytes_per_1k_tokens": round(1000 * size / total_tokens, 1) if total_tokens else None,
    }
