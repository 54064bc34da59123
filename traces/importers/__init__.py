"""Workload importers (Mooncake, Azure LLM 2023, BurstGPT, token ids) into workload traces.

:func:`import_workload` turns a public serving-workload file into a trace directory whose
manifest has ``kind="workload"`` and whose requests carry lengths, arrival times and, for
Mooncake, prefix-block hash ids, or (the ``tokens`` format) the token ids themselves
(docs/traces.md).

Invariants of an imported trace:

- The whole requested part of the source is parsed and validated before the trace is
  opened, so bad data raises :class:`~memshare.errors.InputError` (naming file, line, row and
  column or field) and leaves no trace behind.
- Requests are in arrival order (stable sort if the source is not; then
  ``source['in_arrival_order']`` is False and ``source['out_of_order_rows']`` counts the rows
  that arrived before their predecessor). ``arrival_s`` is the exact offset from the earliest
  imported row, rounded once to float, so the first request arrives at 0.0.
- Request ids are ``"<format>-<row>"`` with the 0-based data row index of the source file,
  zero-padded to six digits, so an id leads back to its source row; a ``tokens`` line that
  gives its own ``id`` keeps it (unique within the trace).
- ``manifest.source`` records ``format``, ``file`` (name), ``sha256`` (of the whole source
  file), ``rows`` (requests imported), ``limit`` and format-specific notes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.traces.files import file_sha256

from ..manifest_file import load_manifest
from ..schema import MAX_ARRIVAL_S, MAX_REQUEST_TOKENS, Manifest, RequestRecord
from ..writer import TraceWriter
from . import azure, burstgpt, mooncake, tokens
from ._source import SourceData, SourceRow, check_source, row_id

DEFAULT_BLOCK_SIZE = 16  # KV block size written to the manifest; a simulator may override it
COMMIT_EVERY = 1000  # requests per writer commit (and per progress call)


@dataclass(frozen=True)
class WorkloadFormat:
    """One importable source format."""

    name: str  # registry key, also the request id prefix
    description: str
    hash_block_size: int | None  # tokens per hash id, None if the source has no hash ids
    read: Callable[[Path, int | None], SourceData]  # parse + validate the first `limit` rows


IMPORTERS: dict[str, WorkloadFormat] = {
    "mooncake": WorkloadFormat(
        "mooncake",
        "Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids (512 tokens)",
        mooncake.HASH_BLOCK_SIZE,
        mooncake.read,
    ),
    "azure": WorkloadFormat(
        "azure",
        "Azure LLM inference trace 2023 CSV: TIMESTAMP, ContextTokens, GeneratedTokens",
        azure.HASH_BLOCK_SIZE,
        azure.read,
    ),
    "burstgpt": WorkloadFormat(
        "burstgpt",
        "BurstGPT CSV: Timestamp (s), Model, Request tokens, Response tokens, Total tokens, "
        "Log Type",
        burstgpt.HASH_BLOCK_SIZE,
        burstgpt.read,
    ),
    "tokens": WorkloadFormat(
        "tokens",
        "token ids JSONL: prompt_token_ids (or prompt text), output_token_ids or output_len, "
        "arrival_s (optional)",
        tokens.HASH_BLOCK_SIZE,
        tokens.read,
    ),
}


def import_workload(
    fmt: str,
    src: Path,
    out: Path,
    *,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    tokenize: tokens.Tokenize | None = None,
) -> Manifest:
    """Import the first ``limit`` rows (all if None) of ``src`` in format ``fmt`` into ``out``.

    ``progress`` is called with the number of requests written so far after every commit
    and once at the end. ``tokenize``: prompt text -> token ids, for the ``tokens`` format's
    text prompts (called only for those). Returns the final (complete) manifest of the
    written trace.
    """
    spec = _format(fmt)
    if limit is not None and limit < 1:
        raise InputError("limit", f"{limit} is not a positive number of requests", "give 1 or more")
    check_source(src, fmt)
    data = tokens.read(src, limit, tokenize) if spec.name == "tokens" else spec.read(src, limit)
    check_lengths(spec.name, src, data.rows)
    rows, backwards = arrival_order(data.rows)
    check_span(spec.name, src, rows)
    template = Manifest(
        kind="workload",
        block_size=DEFAULT_BLOCK_SIZE,
        hash_block_size=spec.hash_block_size,
        source=_source_info(spec, src, data, limit, backwards),
    )
    with TraceWriter(out, template, commit_every=COMMIT_EVERY) as writer:
        for n, record in enumerate(to_records(spec.name, rows), start=1):
            writer.add(record)
            if progress is not None and n % COMMIT_EVERY == 0:
                progress(n)
    if progress is not None:
        progress(len(rows))
    return load_manifest(out)


def _format(fmt: str) -> WorkloadFormat:
    """The registered format called ``fmt``, or an InputError listing the known ones."""
    spec = IMPORTERS.get(fmt)
    if spec is None:
        raise InputError(
            f"format {fmt!r}",
            "is not a known workload format",
            f"use one of {', '.join(IMPORTERS)}",
        )
    return spec


# The token-count columns of each format (for messages), and the most tokens one request may
# have: far past any model's context, small enough that simulating it is bounded work.
_LENGTH_FIELDS = {
    "mooncake": ("input_length", "output_length"),
    "azure": ("ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Request tokens", "Response tokens"),
    "tokens": ("prompt_token_ids", "output_len"),
}


def check_lengths(fmt: str, src: Path, rows: Sequence[SourceRow]) -> None:
    """Every row has a prompt of 1..MAX_REQUEST_TOKENS tokens and at most that many in all
    (InputError naming the file, line and column). A request without a prompt cannot be
    served; the output may be 0 (e.g. BurstGPT's failed requests)."""
    prompt_field, output_field = _LENGTH_FIELDS.get(fmt, ("prompt length", "output length"))
    for row in rows:
        where = f"{src}:{row.line}"
        if row.prompt_len == 0:
            raise InputError(
                where,
                f"field '{prompt_field}' is 0: a request needs at least 1 prompt token",
                "delete the row or give its prompt length",
            )
        if row.prompt_len + row.output_len > MAX_REQUEST_TOKENS:
            raise InputError(
                where,
                f"fields '{prompt_field}' + '{output_field}' give "
                f"{row.prompt_len + row.output_len:,} tokens, over the limit of "
                f"{MAX_REQUEST_TOKENS:,} per request",
                "check the row (token counts, not bytes)",
            )


def check_span(fmt: str, src: Path, rows: Sequence[SourceRow]) -> None:
    """Arrivals (rows in arrival order) span at most MAX_ARRIVAL_S seconds: a later one is a
    unit mistake and would overflow the simulator's clock (InputError at the last row's line)."""
    if rows and rows[-1].time - rows[0].time > MAX_ARRIVAL_S:
        span = float(rows[-1].time - rows[0].time)
        raise InputError(
            f"{src}:{rows[-1].line}",
            f"timestamps span {span:g} s from the first arrival, past {MAX_ARRIVAL_S:g} s",
            f"check the {fmt} timestamps and their unit",
        )


def arrival_order(rows: Sequence[SourceRow]) -> tuple[list[SourceRow], int]:
    """``rows`` stably sorted by time, and how many arrived before their predecessor (0: sorted)."""
    backwards = sum(1 for a, b in pairwise(rows) if b.time < a.time)
    ordered = sorted(rows, key=lambda r: r.time) if backwards else list(rows)
    return ordered, backwards


def to_records(fmt: str, rows: Sequence[SourceRow]) -> Iterator[RequestRecord]:
    """RequestRecords for rows already in arrival order; arrival 0.0 is ``rows[0]``."""
    origin = rows[0].time
    for row in rows:
        yield RequestRecord(
            id=row.rid if row.rid is not None else row_id(fmt, row.index),
            arrival_s=float(row.time - origin),
            prompt_len=row.prompt_len,
            output_len=row.output_len,
            hash_ids=row.hash_ids,
            meta=row.meta,
            prompt_ids=row.prompt_ids,
            output_ids=row.output_ids,
        )


def _source_info(
    spec: WorkloadFormat, src: Path, data: SourceData, limit: int | None, backwards: int
) -> dict[str, Any]:
    """What ``manifest.source`` records about the import."""
    return {
        "format": spec.name,
        "file": src.name,
        "sha256": file_sha256(src),
        "rows": len(data.rows),
        "limit": limit,
        "in_arrival_order": backwards == 0,
        "out_of_order_rows": backwards,
        **data.notes,
        **_zero_output_note(data.rows),
    }


ZERO_OUTPUT_NOTE = (
    "rows with 0 output tokens (failed or prompt-only requests) are kept: the simulator serves "
    "each as its prefill plus the 1 token that step samples, and counts 0 output tokens"
)


def _zero_output_note(rows: Sequence[SourceRow]) -> dict[str, Any]:
    """``zero_output_rows`` and a note, only when the source has such rows (flagged, not
    dropped: their prefill is real work)."""
    n = sum(1 for r in rows if r.output_len == 0)
    return {"zero_output_rows": n, "zero_output_note": ZERO_OUTPUT_NOTE} if n else {}


__all__ = ["COMMIT_EVERY", "DEFAULT_BLOCK_SIZE", "IMPORTERS", "WorkloadFormat", "import_workload"]
