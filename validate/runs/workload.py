"""A workload-only trace (Mooncake, Azure, BurstGPT, token ids) made runnable for ``validate``.

A token-id workload (``memshare import tokens``) already has its ids: they are used as given,
unscaled (``--length-scale`` does not apply), with seeded outputs only where the file gave a
length; the rest of this docstring is about the traces without ids.

Such a trace has lengths, arrival times and (Mooncake) chained prefix hash ids, but no token
ids and no KV. :func:`tokenized` gives every request seeded token ids by the rule of
docs/workload-tokens.md (the same hash id -> the same tokens; lengths scaled by
``--length-scale``) and seeded output tokens, and returns the trace with those ids in place of
the hash ids. From there validate treats it as it treats a captured trace: the simulator and
the engine hash the same tokens, so prefix hits, pages and steps can be compared one for one,
and the engine forces the same outputs the simulator assumes.

Only policies that decide on tokens can run on it (:data:`WORKLOAD_POLICIES`); a policy that
compares KV (cf-topk, exact-dedup, token-dedup's lossy repointing, kvsharer's calibration) would
decide on KV of random tokens, which says nothing about the workload: :func:`check_policies`
refuses it with one line.

Invariants: the tokenized trace depends only on (records, limit, length scale, block size,
tokenizer vocabulary and special ids, seed); its records carry ``prompt_ids`` and
``output_ids`` and no ``hash_ids``; it has no KV rows; request order is the trace's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

from memshare.errors import InputError
from memshare.limits import check_tokens_per_block
from memshare.sim.config import load_model, match_model_preset, model_presets
from memshare.sim.run import CONFIG, LoadedTrace
from memshare.validate.runs.folders import RunDir
from memshare.validate.runs.tokens import given_tokens, synthesize_tokens

WORKLOAD_POLICIES = ("none", "prefix", "kvshare")  # decide on tokens alone
DEFAULT_LENGTH_SCALE = 0.05
DEFAULT_BLOCK_SIZE = 16  # the engine's block size for a workload trace (vLLM's default)


def is_workload(trace: LoadedTrace) -> bool:
    """Whether the trace is workload-only (imported: no KV; token ids only from the tokens
    format)."""
    return trace.manifest.kind == "workload"


def has_token_ids(trace: LoadedTrace) -> bool:
    """Whether a workload trace gives its token ids (``memshare import tokens``)."""
    return any(r.prompt_ids is not None for r in trace.records)


def check_policies(runs: Sequence[RunDir], trace: LoadedTrace) -> None:
    """Every run's policy must decide on tokens alone (see the module docstring)."""
    for r in runs:
        if r.config.policy not in WORKLOAD_POLICIES:
            raise InputError(
                f"{r.path / CONFIG}: policy",
                f"{r.config.policy} decides on KV, and the workload-only trace {trace.path} "
                "has none (its tokens would be synthesized)",
                f"validate {', '.join(WORKLOAD_POLICIES)} runs of it, or capture a kv trace "
                "with `memshare capture`",
            )


def for_engine(runs: Sequence[RunDir], model_name: str, block_size: int) -> list[RunDir]:
    """The runs as the engine can run them: the engine's model as their model config and
    ``block_size`` tokens per block. A workload run models the trace's serving model (e.g. an
    8B) with blocks of the trace's hash block size (512 for Mooncake); the prediction must be
    of what the engine runs: its model's layers make the pages, its size the times, and the
    scaled prompts need blocks far smaller than 512. The run's recorded budget (blocks of the
    old size) is dropped: the engine's workload sets its own (docs/validate.md)."""
    check_tokens_per_block(block_size)
    preset = match_model_preset(model_name)
    if preset is None:
        raise InputError(
            "--model",
            f"no model preset matches {model_name}, so the simulator cannot model it",
            f"validate a workload trace with a model of a preset: {', '.join(model_presets())}",
        )
    model = load_model(preset)
    return [
        replace(r, config=r.config.with_(model=model, block_size=block_size), recorded={})
        for r in runs
    ]


def tokenized(
    trace: LoadedTrace,
    limit: int | None,
    *,
    length_scale: float,
    block_size: int,
    vocab_size: int,
    excluded_ids: Collection[int],
    seed: int,
) -> LoadedTrace:
    """The first ``limit`` requests (all with ``None``) with synthesized prompt and output
    ids (docs/workload-tokens.md), in trace order, without hash ids or KV. A token-id workload
    (``memshare import tokens``) keeps its ids, unscaled; only missing outputs are drawn."""
    src = trace.records[:limit] if limit else trace.records
    if has_token_ids(trace):
        synth = given_tokens(
            src, block_size=block_size, vocab_size=vocab_size, excluded_ids=excluded_ids, seed=seed
        )
    else:
        synth = synthesize_tokens(
            src,
            length_scale=length_scale,
            block_size=block_size,
            vocab_size=vocab_size,
            excluded_ids=excluded_ids,
            seed=seed,
            hash_block_size=trace.manifest.hash_block_size,
        )
    records = [
        replace(
            rec,
            prompt_len=len(s.prompt_ids),
            output_len=s.max_tokens,
            prompt_ids=s.prompt_ids,
            output_ids=s.output_ids,
            hash_ids=None,
        )
        for rec, s in zip(src, synth, strict=True)
    ]
    return LoadedTrace(trace.path, trace.manifest, records, None)


def on_engine(
    runs: Sequence[RunDir],
    trace: LoadedTrace,
    backend: Any,
    *,
    block_size: int,
    limit: int | None,
    length_scale: float,
) -> tuple[list[RunDir], LoadedTrace]:
    """A workload trace's runs and requests as an engine runs them (``backend``: the loaded
    model's tokenizer facts): :func:`for_engine` runs, :func:`tokenized` requests."""
    engine_runs = for_engine(runs, backend.source.name, block_size)
    tokens = tokenized(
        trace,
        limit or engine_runs[0].config.limit,
        length_scale=length_scale,
        block_size=block_size,
        vocab_size=backend.vocab_size,
        excluded_ids=backend.special_ids,
        seed=engine_runs[0].config.seed,
    )
    return engine_runs, tokens
