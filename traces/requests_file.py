"""``requests.jsonl`` read and checked: the committed bytes hashed, each line parsed and typed.

Only the first ``manifest.requests_bytes`` bytes are read; their sha256 must be the
manifest's ``requests_sha256`` before any line is parsed. Every problem names
``requests.jsonl:LINE`` and the field.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from memshare.errors import InputError
from memshare.traces.fields import RECREATE, is_hex64, is_int
from memshare.traces.schema import (
    MAX_ARRIVAL_S,
    MAX_REQUEST_TOKENS,
    REQUESTS,
    Manifest,
    RequestRecord,
)


def check_requests_file(trace_dir: Path, manifest: Manifest) -> Path:
    path = trace_dir / REQUESTS
    size = path.stat().st_size if path.is_file() else None
    if size is None and manifest.requests_bytes > 0:
        raise InputError(
            str(path),
            f"missing, but manifest.json field 'requests_bytes' commits "
            f"{manifest.requests_bytes} bytes",
            RECREATE,
        )
    if size is not None and size < manifest.requests_bytes:
        raise InputError(
            str(path),
            f"truncated: {size} bytes on disk, manifest.json field 'requests_bytes' commits "
            f"{manifest.requests_bytes}",
            RECREATE,
        )
    return path


def read_records(
    path: Path, nbytes: int, sha256: str, remake: str = RECREATE
) -> list[RequestRecord]:
    """Parse the committed prefix of ``requests.jsonl`` (whole lines only), after checking
    that its sha256 is ``sha256`` (the manifest's ``requests_sha256``); a mismatch says the
    file changed after it was written and how to write the trace again (``remake``)."""
    data = b""
    if nbytes > 0:
        with path.open("rb") as f:
            data = f.read(nbytes)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise InputError(
            str(path),
            f"checksum mismatch: sha256 of the committed {nbytes} bytes is {digest[:16]}..., "
            f"manifest.json field 'requests_sha256' says {str(sha256)[:16]}...",
            f"the file was changed after it was written; {remake}",
        )
    if nbytes <= 0:
        return []
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise InputError(
            f"{path}:{len(lines)}",
            "the last committed line has no newline (manifest.json field 'requests_bytes' "
            "ends inside a line)",
            RECREATE,
        )
    return [_parse_line(raw, f"{path}:{i}") for i, raw in enumerate(lines[:-1], 1)]


def _parse_line(raw: bytes, where: str) -> RequestRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(where, "not valid UTF-8", RECREATE) from None
    record = RequestRecord.from_json(text, where)
    _check_record_types(record, where)
    return record


def _check_record_types(record: RequestRecord, where: str) -> None:
    """The fields the reader computes with must have the right types."""
    _check_sizes(record, where)
    _check_token_lists(record, where)
    _check_other_fields(record, where)


def _check_sizes(record: RequestRecord, where: str) -> None:
    """A non-empty id, lengths >= 0 that give 1.. tokens, a finite arrival in range."""
    if not isinstance(record.id, str) or not record.id:
        raise InputError(
            where, f"field 'id' must be a non-empty string, got {record.id!r}", RECREATE
        )
    for name in ("prompt_len", "output_len"):
        value = getattr(record, name)
        if not is_int(value) or value < 0:
            raise InputError(
                where, f"field '{name}' must be an integer >= 0, got {value!r}", RECREATE
            )
    total = record.prompt_len + record.output_len
    if not 0 < total <= MAX_REQUEST_TOKENS:
        raise InputError(
            where,
            f"fields 'prompt_len' + 'output_len' must give 1..{MAX_REQUEST_TOKENS} tokens, "
            f"got {total}",
            RECREATE,
        )
    arrival = record.arrival_s
    if (
        isinstance(arrival, bool)
        or not isinstance(arrival, int | float)
        or not math.isfinite(arrival)
    ):
        raise InputError(where, f"field 'arrival_s' must be a number, got {arrival!r}", RECREATE)
    if not 0 <= arrival <= MAX_ARRIVAL_S:
        raise InputError(
            where, f"field 'arrival_s' must lie in 0..{MAX_ARRIVAL_S:g}, got {arrival!r}", RECREATE
        )


def _check_token_lists(record: RequestRecord, where: str) -> None:
    """Id and step lists of integers >= 0; the id lists as long as their lengths say."""
    for name in ("prompt_ids", "output_ids", "hash_ids", "steps"):
        ids = getattr(record, name)
        if ids is not None and (
            not isinstance(ids, list) or not all(is_int(v) and 0 <= v < 1 << 63 for v in ids)
        ):
            raise InputError(where, f"field '{name}' must be a list of integers >= 0", RECREATE)
    for name, length in (("prompt_ids", "prompt_len"), ("output_ids", "output_len")):
        ids = getattr(record, name)
        if ids is not None and len(ids) != getattr(record, length):
            raise InputError(
                where,
                f"field '{name}' holds {len(ids)} ids but field '{length}' is "
                f"{getattr(record, length)}",
                RECREATE,
            )


def _check_other_fields(record: RequestRecord, where: str) -> None:
    """Text fields are strings, timings and meta objects, and the KV pointers well formed."""
    for name in ("text", "finish_reason"):
        if getattr(record, name) is not None and not isinstance(getattr(record, name), str):
            raise InputError(where, f"field '{name}' must be a string", RECREATE)
    for name in ("timings", "meta"):
        if getattr(record, name) is not None and not isinstance(getattr(record, name), dict):
            raise InputError(where, f"field '{name}' must be a JSON object", RECREATE)
    timings = record.timings
    if timings is not None and not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in timings.values()
    ):
        raise InputError(where, "field 'timings' must map names to numbers (seconds)", RECREATE)
    kv = record.kv
    if kv is not None and not all(is_int(v) and v >= 0 for v in (kv.shard, kv.row, kv.rows)):
        raise InputError(where, f"field 'kv' must hold integers >= 0, got {kv!r}", RECREATE)
    full = record.full_kv
    if full is not None and not (
        isinstance(full.file, str)
        and all(is_int(v) and 0 <= v < 1 << 63 for v in (full.row, full.rows))
        and is_hex64(full.sha256)
    ):
        raise InputError(
            where,
            "field 'full_kv' must hold a file name, integers row and rows >= 0 and a sha256 of "
            f"64 hex digits, got {full!r}",
            RECREATE,
        )
