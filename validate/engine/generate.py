"""``memshare generate``: run prompts (or teacher-forced texts) on the paged engine under a
policy and write ``outputs.jsonl``, ``shares.jsonl``, ``reuses.jsonl`` (KVShare's copied spans)
and ``metrics.json`` (docs/scheduler.md).

Everything the user gave is checked before the output folder is touched (``-o`` holds one
run: new, empty, or an earlier generate run replaced whole under ``--overwrite``); the files
are written in a hidden staging folder that replaces ``-o`` when the run finished
(:mod:`memshare.outdir`), so ``-o`` only ever holds a whole run, and a failed or interrupted
run leaves it as it was.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memshare.atomic import write_atomic
from memshare.errors import InputError
from memshare.limits import check_limit, check_tokens_per_block
from memshare.outdir import OutputKind, claim_output, staged_output
from memshare.registry import check_block_size, coerce_params, make_policy, parse_settings
from memshare.scheduler import SchedulerConfig
from memshare.traces.inputs import InputItem, read_texts
from memshare.traces.model.device import check_device
from memshare.traces.prompt_line import (
    check_fits,
    check_max_tokens,
    check_text_size,
    check_unique,
    json_object,
    max_token_chars,
    prompt_of,
    request_id,
)
from memshare.traces.segment import SegmenterConfig, segment_tokens
from memshare.validate.engine.heap import tame_heap
from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine
from memshare.validate.engine.records import PagedRunResult

RUN = OutputKind("generate", "metrics.json")  # what -o holds: one generate run


@dataclass
class GenerateOptions:
    """What ``memshare generate`` was asked (see its ``--help``)."""

    output: Path
    prompts: Path | None = None  # JSONL: "prompt" (chat template applied) or "prompt_token_ids"
    texts: Path | None = None  # teacher-forced reasoning texts (JSONL or .txt)
    field: str | None = None  # --texts: the text field
    policy: str = "none"
    sets: list[str] = dataclasses.field(default_factory=list)
    max_tokens: int = 256
    kv_blocks: int | None = None
    block_size: int = 16
    limit: int | None = None
    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    threads: int | None = None
    overwrite: bool = False  # replace an earlier generate run in ``output`` whole


@dataclass
class Prompt:
    """One request's input: token ids (a text prompt gets them from :func:`tokenize`)."""

    rid: str
    ids: list[int]
    max_tokens: int
    steps: list[int] | None = None  # teacher-forced: step starts of the text
    text: str | None = None  # a prompt given as text, before tokenizing
    where: str = ""  # FILE:LINE it came from
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_field: str = ""  # the line's prompt field (prompt_token_ids or the text's)
    max_tokens_from: str = "--max-tokens"  # or "field 'max_tokens'": the line's own


PROMPT_FIELDS = ("prompt", "question", "problem")  # text fields tried in order (GSM8K, MATH)


def read_prompts(
    path: Path,
    max_tokens: int,
    limit: int | None,
    text_field: str | None = None,
    context_limit: int | None = None,
) -> list[Prompt]:
    """Prompts from JSONL, checked before any model loads: per line ``prompt_token_ids``, or
    a text (chat template applied later) from ``text_field`` (default: the first of
    :data:`PROMPT_FIELDS` present), never both; optional ``id`` (kept as the request's name;
    ``p<k>`` without one) and ``max_tokens`` (:func:`check_max_tokens` against
    ``context_limit``, when known; else :func:`tokenize` sizes each prompt once the model
    is loaded). The rules of a line are :mod:`memshare.traces.prompt_line`'s, shared with
    ``import tokens``. A bad line is an InputError that names ``FILE:LINE``; an id two lines
    share names both lines; ``--field`` is refused where no prompt read is text."""
    fields = (text_field,) if text_field else PROMPT_FIELDS
    if not path.is_file():
        raise InputError(str(path), "does not exist or is not a file", "pass a JSONL file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 is text
    except UnicodeDecodeError:
        raise InputError(str(path), "is not UTF-8 text", "pass a JSONL file") from None
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}:{n}"
        obj = json_object(where, line)
        given = obj.get("id")
        rid = request_id(where, given) if given is not None else f"p{len(out)}"
        check_unique(where, rid, n, seen)
        own = obj.get("max_tokens") is not None
        mt = (
            check_max_tokens(f"{where} field 'max_tokens'", obj["max_tokens"], context_limit)
            if own
            else max_tokens
        )
        name, prompt = prompt_of(where, obj, fields)
        p = Prompt(rid, [], mt, where=where, prompt_field=name)
        p.max_tokens_from = "field 'max_tokens'" if own else "--max-tokens"
        if isinstance(prompt, str):
            p.text = prompt
        else:
            p.ids = prompt
        out.append(p)
    if not out:
        raise InputError(str(path), "holds no prompt (only blank lines)", "one JSON object a line")
    if text_field and all(p.text is None for p in out):
        raise InputError(
            f"--field {text_field}",
            f"names a text field, and the prompts read from {path} are all token ids",
            "leave --field out",
        )
    return out


def tokenize(
    prompts: list[Prompt],
    chat: Callable[[str], list[int]],
    vocab: int,
    context_limit: int | None = None,
    token_chars: int | None = None,
) -> None:
    """Give text prompts their token ids (chat template) and check every id is in the
    vocabulary; with the model's ``context_limit``, a text whose length alone rules it out
    (``token_chars``: the longest token, :func:`~memshare.traces.prompt_line.max_token_chars`)
    is refused before it is tokenized, and every prompt plus its ``max_tokens`` must fit
    (the fix names ``--max-tokens`` with a value that fits every prompt using it)."""
    for p in prompts:
        if p.text is not None:
            if context_limit is not None and token_chars is not None:
                check_text_size(p.where, p.prompt_field, p.text, context_limit, token_chars)
            p.ids = chat(p.text)
        bad = [t for t in p.ids if not 0 <= t < vocab]
        if bad:
            raise InputError(
                p.where, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "fix it"
            )
    if context_limit is None:
        return
    for p in prompts:  # each prompt alone, in file order
        check_fits(p.where, len(p.ids), 0, p.max_tokens_from, context_limit)
    # then with max_tokens: the longest prompt under --max-tokens first, so the value the
    # fix suggests fits them all
    for p in sorted(prompts, key=lambda q: (q.max_tokens_from != "--max-tokens", -len(q.ids))):
        check_fits(p.where, len(p.ids), p.max_tokens, p.max_tokens_from, context_limit)


def teacher_forced_inputs(items: Sequence[InputItem], backend: Any) -> list[Prompt]:
    """Texts as prompts (chat-templated problem + the text's tokens), with their step starts,
    cut at the model's context limit, exactly as ``capture --texts`` tokenizes them."""
    limit = backend.context_limit
    out: list[Prompt] = []
    for it in items:
        prompt_ids = backend.chat_prompt(it.prompt) if it.prompt else []
        text_ids, starts = backend.encode(it.text or "")
        room = limit - len(prompt_ids) - 1  # one sampled token after the text
        text = it.text or ""
        if len(text_ids) > room:
            text = text[: starts[room]]
            text_ids, starts = text_ids[:room], starts[:room]
        if not prompt_ids and not text_ids:
            raise InputError("--texts", f"text {it.id!r} is empty", "remove it")
        p = len(prompt_ids)
        steps = [0, *(p + s for s in segment_tokens(text, starts, SegmenterConfig()) if p + s > 0)]
        out.append(
            Prompt(it.id, prompt_ids + text_ids, 1, steps, meta={"text_tokens": len(text_ids)})
        )
    return out


def generate(
    o: GenerateOptions,
    *,
    status: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    logits_sink: Callable[[str, int, Any], None] | None = None,
) -> dict[str, Any]:
    """Run ``o`` and write its folder; returns the metrics written to ``metrics.json``."""
    check_options(o)
    params = coerce_params(o.policy, parse_settings(o.sets))
    check_block_size(o.policy, params, o.block_size)
    policy = make_policy(o.policy, **params)
    tame_heap()  # long engine runs: see validate/engine/heap.py
    check_device(o.device)
    prompts = None
    texts: list[InputItem] = []
    if o.prompts is not None:
        prompts = read_prompts(o.prompts, o.max_tokens, o.limit, o.field)
    else:
        assert o.texts is not None
        texts = read_texts(o.texts, field=o.field, limit=o.limit).items
    from memshare.traces.model.loader import load_model

    if status is not None:
        status("loading the model")
    backend = load_model(o.model, dtype=o.dtype, device=o.device, threads=o.threads)
    inputs = _engine_inputs(prompts, texts, backend)
    specs = [EngineSpec(p.rid, p.ids, p.max_tokens, p.steps) for p in inputs]
    engine = PagedEngine(
        backend.model,
        policy,
        specs,
        engine_options(o),
        eos_ids=backend.eos_ids,
        token_starts=backend.token_starts,
        logits_sink=logits_sink,
    )
    if status is not None:
        status("generating")
    result = engine.run(progress)
    metrics = run_metrics(
        result,
        model=backend.source.name,
        policy=o.policy,
        params=params,
        device=o.device,
        dtype=o.dtype,
        block_size=o.block_size,
    )
    with staged_output(o.output) as folder:
        write_run(folder, o.policy, result, backend.decode, metrics)
    return metrics


def _engine_inputs(
    prompts: list[Prompt] | None, texts: Sequence[InputItem], backend: Any
) -> list[Prompt]:
    """The prompts with their token ids (chat template; every id in the model's vocabulary,
    every request within its context), or, without prompts, the teacher-forced texts."""
    if prompts is None:
        return teacher_forced_inputs(texts, backend)
    tokenize(
        prompts,
        backend.chat_prompt,
        int(backend.model.config.vocab_size),
        backend.context_limit,
        max_token_chars(backend.tokenizer),
    )
    return prompts


def check_options(o: GenerateOptions) -> None:
    """Every option of ``o`` checked, and its output folder free, before anything loads."""
    if (o.prompts is None) == (o.texts is None):
        raise InputError("--prompts/--texts", "give exactly one", "e.g. --prompts prompts.jsonl")
    for name, value, low in (
        ("--max-num-seqs", o.max_num_seqs, 1),
        ("--max-num-batched-tokens", o.max_num_batched_tokens, 1),
    ):
        if value < low:
            raise InputError(name, f"must be >= {low}, got {value}", f"e.g. {low}")
    check_max_tokens("--max-tokens", o.max_tokens, None)  # the model's context: per prompt
    check_tokens_per_block(o.block_size)
    check_limit(o.limit)
    if o.kv_blocks is not None and o.kv_blocks < 1:
        raise InputError("--kv-blocks", f"must be >= 1, got {o.kv_blocks}", "or leave it out")
    if not np.isfinite(o.temperature) or o.temperature < 0:
        raise InputError("--temperature", f"must be finite and >= 0, got {o.temperature}", "0")
    if not np.isfinite(o.top_p) or not 0 < o.top_p <= 1:
        raise InputError("--top-p", f"must be in (0, 1], got {o.top_p}", "e.g. 0.95")
    claim_output(o.output, "-o", RUN, overwrite=o.overwrite)
    if "kvshare" in o.policy.split("+") and o.texts is not None:
        raise InputError(
            "--policy kvshare",
            "it copies matched prompt KV instead of computing it, so a teacher-forced text "
            "has no logits at the reused positions",
            "generate from --prompts with kvshare, or take another policy for --texts",
        )


def engine_options(o: GenerateOptions) -> EngineOptions:
    """The paged engine's options for ``o`` (teacher-forced when it gave ``--texts``)."""
    return EngineOptions(
        block_size=o.block_size,
        kv_blocks=o.kv_blocks,
        scheduler=SchedulerConfig(
            max_num_batched_tokens=o.max_num_batched_tokens, max_num_seqs=o.max_num_seqs
        ),
        temperature=o.temperature,
        top_p=o.top_p,
        seed=o.seed,
        teacher_forced=o.texts is not None,
    )


def run_metrics(
    r: PagedRunResult,
    *,
    model: str,
    policy: str,
    params: dict[str, Any],
    device: str,
    dtype: str,
    block_size: int,
) -> dict[str, Any]:
    """``metrics.json``: pages in use, KV bytes, throughput, steps, shares, policy time."""
    live = np.array([s.live_pages for s in r.steps], dtype=np.float64)
    used = np.array([s.used_pages for s in r.steps], dtype=np.float64)
    wall = np.array([s.wall_s for s in r.steps], dtype=np.float64)
    generated = sum(q.num_output for q in r.requests)
    computed = sum(s.computed for s in r.steps)
    commit_s = float(sum(s.commit_s for s in r.steps))
    return {
        "model": model,
        "policy": policy,
        "policy_params": params,
        "device": device,
        "dtype": dtype,
        "requests": len(r.requests),
        "block_size": block_size,
        "kv_pages_total": r.num_pages,
        "page_bytes": r.page_bytes,
        "kv_store_bytes": r.store_bytes,
        "kv_pool_bytes": r.pool_pages * r.page_bytes,
        "pages_in_use": {
            "peak": int(used.max(initial=0)),
            "mean": float(used.mean()) if used.size else 0.0,
            "live_peak": int(live.max(initial=0)),
            "live_mean": float(live.mean()) if live.size else 0.0,
        },
        "kv_bytes_in_use": {
            "peak": int(used.max(initial=0)) * r.page_bytes,
            "mean": (float(used.mean()) if used.size else 0.0) * r.page_bytes,
        },
        "steps": len(r.steps),
        "preemptions": r.preemptions,
        "tokens_generated": generated,
        "tokens_computed": computed,
        "wall_s": r.wall_s,
        "tokens_per_s": generated / r.wall_s if r.wall_s > 0 else 0.0,
        "step_s": {
            "mean": float(wall.mean()) if wall.size else 0.0,
            "p50": float(np.percentile(wall, 50)) if wall.size else 0.0,
            "p90": float(np.percentile(wall, 90)) if wall.size else 0.0,
        },
        "commit_share_of_step_time": commit_s / float(wall.sum()) if wall.size else 0.0,
        "sketch_s": r.sketch_s,
        "shares": len(r.shares),
        "reused_tokens": sum(x.length for x in r.reuses),
        "shared_pages": int(sum(len(s.layers) * (2 if s.parts == "kv" else 1) for s in r.shares)),
    }


def write_run(
    folder: Path,
    policy: str,
    r: PagedRunResult,
    decode: Callable[[Sequence[int]], str],
    metrics: dict[str, Any],
) -> None:
    """The output files, each renamed into place when whole, ``metrics.json`` last."""
    folder.mkdir(parents=True, exist_ok=True)
    outputs = [
        {
            "request": q.rid,
            "policy": policy,
            "prompt_token_ids": q.token_ids[: q.prompt_len] if q.token_ids else [],
            "output_token_ids": q.output_ids,
            "text": decode(q.output_ids),
            "finish_reason": q.finish_reason,
        }
        for q in r.requests
    ]
    shares = [dataclasses.asdict(s) for s in r.shares]
    write_atomic(folder / "outputs.jsonl", "".join(json.dumps(x) + "\n" for x in outputs))
    write_atomic(folder / "shares.jsonl", "".join(json.dumps(x) + "\n" for x in shares))
    reuses = [dataclasses.asdict(x) for x in r.reuses]
    write_atomic(folder / "reuses.jsonl", "".join(json.dumps(x) + "\n" for x in reuses))
    write_atomic(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
