"""Read a trace directory: check it, memory-map its KV shards, yield its committed requests.

Invariants:

- Only the committed state is read: the first ``manifest.requests_bytes`` bytes of
  ``requests.jsonl`` and the first ``ShardInfo.bytes`` bytes of each shard. Anything past
  that is a crash leftover and is ignored (the writer's ``resume`` truncates it).
- Tamper-evident: the committed bytes of ``requests.jsonl`` must match
  ``manifest.requests_sha256`` before any line is parsed (always: the bytes are in memory
  anyway, about 2 ms for the 1 MB Mooncake trace); shards are hashed once per reader by
  :meth:`TraceReader.verify` (on by default).
- Every problem with the files is an :class:`~memshare.errors.InputError` whose message names
  the file (``requests.jsonl:LINE`` for a request line) and the field or problem, and says how
  to fix it. A directory holding only leftovers of a writer that never committed raises
  :class:`~memshare.errors.TraceEmptyError`.
- ``kv(record)`` returns a read-only view into a memory map; nothing is copied.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from memshare.errors import InputError, TraceEmptyError
from memshare.traces.schema import (
    FULL_KV_FIELDS,
    FULL_KV_GLOB,
    MANIFEST,
    MANIFEST_TMP,
    MAX_ARRIVAL_S,
    MAX_REQUEST_TOKENS,
    REQUESTS,
    SHARD_GLOB,
    Counts,
    Manifest,
    RequestRecord,
    ShardInfo,
    full_kv_row_dtype,
    kv_row_dtype,
)

if TYPE_CHECKING:
    from _hashlib import HASH

KVRows = npt.NDArray[Any]
"""A structured array of :func:`~memshare.traces.schema.kv_row_dtype`, one row per block."""

_CHUNK = 1 << 20
_RECREATE = "re-create the trace (memshare capture or memshare import) into a fresh directory"
_RECAPTURE = "the file was damaged after it was written; re-capture the trace"


def has_leftovers(trace_dir: Path) -> bool:
    """True if ``trace_dir`` holds files a writer creates (other than ``manifest.json``)."""
    return (
        (trace_dir / MANIFEST_TMP).exists()
        or (trace_dir / REQUESTS).exists()
        or any(trace_dir.glob(SHARD_GLOB))
    )


def load_manifest(trace_dir: Path) -> Manifest:
    """Read ``trace_dir/manifest.json``; raise :class:`InputError` if it is not a trace.

    Raises :class:`TraceEmptyError` when the directory has no manifest but holds leftovers of
    a writer interrupted before its first commit.
    """
    if not trace_dir.exists():
        raise InputError(
            str(trace_dir),
            "does not exist",
            "check the path, or create a trace with `memshare import` or `memshare capture`",
        )
    if not trace_dir.is_dir():
        raise InputError(
            str(trace_dir),
            "is not a directory (a trace is a directory holding manifest.json)",
            "pass the trace directory, not a file inside it",
        )
    path = trace_dir / MANIFEST
    if not path.is_file():
        if has_leftovers(trace_dir):
            raise TraceEmptyError(
                str(trace_dir),
                "the trace is empty: its writer was interrupted before its first commit "
                "(no manifest.json, only leftovers)",
                "delete the directory and run the capture or import again",
            )
        raise InputError(
            str(trace_dir),
            "not a memshare trace (no manifest.json)",
            "create one with `memshare import` or `memshare capture`",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(str(path), "not valid UTF-8", _RECREATE) from None
    manifest = Manifest.from_json(text, str(path))
    if manifest.kind not in ("workload", "kv"):
        raise InputError(
            str(path), f"field 'kind' must be 'workload' or 'kv', got {manifest.kind!r}", _RECREATE
        )
    if not _is_int(manifest.requests_bytes) or manifest.requests_bytes < 0:
        raise InputError(str(path), "field 'requests_bytes' must be an integer >= 0", _RECREATE)
    check_manifest_fields(manifest, str(path))
    return manifest


# Ranges of manifest integers: far beyond any real model, small enough that nothing computed
# from them (row sizes, block counts) overflows or allocates absurdly.
_LIMITS: dict[str, tuple[int, int]] = {
    "block_size": (1, 1 << 20),
    "hash_block_size": (1, 1 << 24),
    "model.num_layers": (1, 4096),
    "model.num_kv_heads": (1, 4096),
    "model.head_dim": (1, 1 << 16),
    "sketch.dim": (1, 1 << 16),
    "sketch.seed": (0, (1 << 63) - 1),
}
_HEX = frozenset("0123456789abcdef")


def check_manifest_fields(manifest: Manifest, where: str) -> None:
    """Every manifest field has its type and a value in range (InputError naming the field).

    What the data must agree with (counts, shard lengths, rows per request against
    ``block_size``) is checked by :class:`TraceReader` against the files themselves.
    """

    def check_int(name: str, value: object) -> None:
        lo, hi = _LIMITS[name]
        if not _is_int(value) or not lo <= value <= hi:  # type: ignore[operator]
            raise InputError(
                where, f"field '{name}' must be an integer in {lo}..{hi}, got {value!r}", _RECREATE
            )

    def check_str(name: str, value: object, choices: tuple[str, ...] = ()) -> None:
        if not isinstance(value, str) or (choices and value not in choices):
            want = f"one of {', '.join(choices)}" if choices else "a string"
            raise InputError(where, f"field '{name}' must be {want}, got {value!r}", _RECREATE)

    check_int("block_size", manifest.block_size)
    if manifest.hash_block_size is not None:
        check_int("hash_block_size", manifest.hash_block_size)
    if manifest.model is not None:
        m = manifest.model
        check_str("model.name", m.name)
        check_str("model.architecture", m.architecture)
        check_str("model.dtype", m.dtype)
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            check_int(f"model.{name}", getattr(m, name))
    if manifest.sketch is not None:
        s = manifest.sketch
        check_str("sketch.method", s.method)
        check_str("sketch.keys", s.keys, ("pre_rope", "post_rope"))
        check_str("sketch.dtype", s.dtype)
        check_int("sketch.dim", s.dim)
        check_int("sketch.seed", s.seed)
    if manifest.kind == "kv" and (manifest.model is None or manifest.sketch is None):
        raise InputError(where, "a 'kv' trace needs fields 'model' and 'sketch'", _RECREATE)
    for name in ("requests", "prompt_tokens", "output_tokens", "kv_rows"):
        value = getattr(manifest.counts, name)
        if not _is_int(value) or value < 0:
            raise InputError(
                where, f"field 'counts.{name}' must be an integer >= 0, got {value!r}", _RECREATE
            )
    digest = manifest.requests_sha256
    if not _is_hex64(digest):
        raise InputError(
            where, f"field 'requests_sha256' must be 64 hex digits, got {digest!r}", _RECREATE
        )
    source_sha = manifest.source.get("sha256")  # the imported file's (config.json keeps it)
    if source_sha is not None and not _is_hex64(source_sha):
        raise InputError(
            where, f"field 'source.sha256' must be 64 hex digits, got {source_sha!r}", _RECREATE
        )
    if not isinstance(manifest.complete, bool):
        raise InputError(where, "field 'complete' must be true or false", _RECREATE)


def row_dtype(manifest: Manifest, where: str) -> np.dtype[Any] | None:
    """Record dtype of this trace's KV shards; ``None`` if the trace can hold no KV rows."""
    if manifest.model is None or manifest.sketch is None:
        if manifest.shards:
            raise InputError(
                where,
                "field 'shards' lists KV shards but field 'model' or 'sketch' is missing",
                _RECREATE,
            )
        return None
    return kv_row_dtype(manifest.model.num_layers, manifest.sketch.dim)


_FULL_KV_DTYPES = ("<f4", "<f2")


def full_kv_spec_dtype(manifest: Manifest, where: str) -> np.dtype[Any] | None:
    """Record dtype of the trace's full-KV shards (manifest ``capture.full_kv``), checked;
    ``None`` if the trace has none."""
    spec = manifest.capture.get("full_kv")  # 'capture' is a JSON object (Manifest.from_json)
    if spec is None:
        return None
    fields = spec.get("fields") if isinstance(spec, dict) else None
    dtype = spec.get("dtype") if isinstance(spec, dict) else None
    if (
        not isinstance(fields, list)
        or not fields
        or len(set(map(str, fields))) != len(fields)
        or not all(isinstance(f, str) and f in FULL_KV_FIELDS for f in fields)
        or dtype not in _FULL_KV_DTYPES
        or manifest.model is None
    ):
        raise InputError(
            where,
            f"field 'capture.full_kv' must name 'fields' (some of {', '.join(FULL_KV_FIELDS)}) "
            f"and a 'dtype' ({' or '.join(_FULL_KV_DTYPES)}) of a trace with a 'model', got "
            f"{spec!r}",
            _RECREATE,
        )
    m = manifest.model
    return full_kv_row_dtype(m.num_layers, m.num_kv_heads, m.head_dim, tuple(fields), dtype)


def check_full_kv_refs(
    trace_dir: Path, records: list[RequestRecord], dtype: np.dtype[Any] | None
) -> None:
    """Every request of a full-KV trace points at records that lie in an existing full-KV
    shard (name, length, one record per token); a trace without full KV has no pointers."""
    requests = trace_dir / REQUESTS
    sizes: dict[str, int | None] = {}
    for i, r in enumerate(records, 1):
        where = f"{requests}:{i}"
        ref = r.full_kv
        if dtype is None or ref is None:
            if ref is not None or dtype is not None:
                has = "has" if ref is not None else "lacks"
                raise InputError(
                    where,
                    f"field 'full_kv': the request {has} it but manifest.json field "
                    f"'capture.full_kv' says the trace {'lacks' if dtype is None else 'has'} "
                    "full KV",
                    _RECREATE,
                )
            continue
        if Path(ref.file).name != ref.file or not Path(ref.file).match(FULL_KV_GLOB):
            raise InputError(
                where, f"field 'full_kv.file' {ref.file!r} is not a full-KV shard", _RECREATE
            )
        if ref.rows != r.prompt_len + r.output_len:
            raise InputError(
                where,
                f"field 'full_kv.rows' is {ref.rows}, the request has "
                f"{r.prompt_len + r.output_len} tokens",
                _RECREATE,
            )
        if ref.file not in sizes:
            path = trace_dir / ref.file
            sizes[ref.file] = path.stat().st_size if path.is_file() else None
        size, end = sizes[ref.file], (ref.row + ref.rows) * dtype.itemsize
        if size is None or size < end:
            raise InputError(
                str(trace_dir / ref.file),
                f"full-KV shard {'missing' if size is None else f'truncated ({size} bytes)'}: "
                f"request {r.id} (line {i}) points at bytes up to {end}",
                _RECAPTURE,
            )


def check_full_kv_hashes(
    trace_dir: Path, records: list[RequestRecord], dtype: np.dtype[Any]
) -> None:
    """The sha256 of every request's full-KV records equals its ``full_kv.sha256``."""
    for r in records:
        ref = r.full_kv
        if ref is None:
            continue
        path = trace_dir / ref.file
        with path.open("rb") as f:
            f.seek(ref.row * dtype.itemsize)
            data = f.read(ref.rows * dtype.itemsize)
        digest = hashlib.sha256(data).hexdigest()
        if digest != ref.sha256:
            raise InputError(
                str(path),
                f"checksum mismatch for request {r.id}: sha256 of its full-KV records is "
                f"{digest[:16]}..., its field 'full_kv.sha256' says {ref.sha256[:16]}...",
                _RECAPTURE,
            )


def hash_prefix(path: Path, nbytes: int) -> HASH:
    """A running sha256 over the first ``nbytes`` bytes of ``path`` (read in chunks)."""
    hasher = hashlib.sha256()
    left = nbytes
    with path.open("rb") as f:
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            hasher.update(chunk)
            left -= len(chunk)
    return hasher


def check_shard_file(trace_dir: Path, info: ShardInfo, row_size: int) -> Path:
    """Check a listed shard's name and length against the manifest; return its path."""
    where = str(trace_dir / MANIFEST)
    if Path(info.file).name != info.file or not Path(info.file).match(SHARD_GLOB):
        raise InputError(
            where, f"field 'shards' names {info.file!r}, not a shard file name", _RECREATE
        )
    if not (_is_int(info.rows) and _is_int(info.bytes) and isinstance(info.sha256, str)):
        raise InputError(
            where,
            f"field 'shards' entry {info.file}: rows and bytes must be integers and sha256 a "
            "string",
            _RECREATE,
        )
    if info.rows < 0 or info.bytes != info.rows * row_size:
        raise InputError(
            where,
            f"field 'shards' entry {info.file}: bytes {info.bytes} != rows {info.rows} x "
            f"row size {row_size}",
            _RECREATE,
        )
    path = trace_dir / info.file
    if not path.is_file():
        raise InputError(str(path), "shard listed in manifest.json is missing", _RECAPTURE)
    size = path.stat().st_size
    if size < info.bytes:
        raise InputError(
            str(path),
            f"truncated shard: {size} bytes on disk, manifest.json field 'shards' commits "
            f"{info.bytes}",
            _RECAPTURE,
        )
    return path


def checked_shard_hash(trace_dir: Path, info: ShardInfo) -> HASH:
    """Hash the committed bytes of a shard and compare with the manifest; return the hasher."""
    path = trace_dir / info.file
    hasher = hash_prefix(path, info.bytes)
    if hasher.hexdigest() != info.sha256:
        raise InputError(
            str(path),
            f"checksum mismatch: sha256 of the committed {info.bytes} bytes is "
            f"{hasher.hexdigest()[:16]}..., manifest.json field 'shards' says "
            f"{info.sha256[:16]}...",
            _RECAPTURE,
        )
    return hasher


def _check_requests_file(trace_dir: Path, manifest: Manifest) -> Path:
    path = trace_dir / REQUESTS
    size = path.stat().st_size if path.is_file() else None
    if size is None and manifest.requests_bytes > 0:
        raise InputError(
            str(path),
            f"missing, but manifest.json field 'requests_bytes' commits "
            f"{manifest.requests_bytes} bytes",
            _RECREATE,
        )
    if size is not None and size < manifest.requests_bytes:
        raise InputError(
            str(path),
            f"truncated: {size} bytes on disk, manifest.json field 'requests_bytes' commits "
            f"{manifest.requests_bytes}",
            _RECREATE,
        )
    return path


def _read_records(path: Path, nbytes: int, sha256: str) -> list[RequestRecord]:
    """Parse the committed prefix of ``requests.jsonl`` (whole lines only), after checking
    that its sha256 is ``sha256`` (the manifest's ``requests_sha256``)."""
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
            _RECAPTURE,
        )
    if nbytes <= 0:
        return []
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise InputError(
            f"{path}:{len(lines)}",
            "the last committed line has no newline (manifest.json field 'requests_bytes' "
            "ends inside a line)",
            _RECREATE,
        )
    return [_parse_line(raw, f"{path}:{i}") for i, raw in enumerate(lines[:-1], 1)]


def _parse_line(raw: bytes, where: str) -> RequestRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(where, "not valid UTF-8", _RECREATE) from None
    record = RequestRecord.from_json(text, where)
    _check_record_types(record, where)
    return record


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _check_record_types(record: RequestRecord, where: str) -> None:
    """The fields the reader computes with must have the right types."""
    if not isinstance(record.id, str) or not record.id:
        raise InputError(
            where, f"field 'id' must be a non-empty string, got {record.id!r}", _RECREATE
        )
    for name in ("prompt_len", "output_len"):
        value = getattr(record, name)
        if not _is_int(value) or value < 0:
            raise InputError(
                where, f"field '{name}' must be an integer >= 0, got {value!r}", _RECREATE
            )
    total = record.prompt_len + record.output_len
    if not 0 < total <= MAX_REQUEST_TOKENS:
        raise InputError(
            where,
            f"fields 'prompt_len' + 'output_len' must give 1..{MAX_REQUEST_TOKENS} tokens, "
            f"got {total}",
            _RECREATE,
        )
    arrival = record.arrival_s
    if (
        isinstance(arrival, bool)
        or not isinstance(arrival, int | float)
        or not math.isfinite(arrival)
    ):
        raise InputError(where, f"field 'arrival_s' must be a number, got {arrival!r}", _RECREATE)
    if not 0 <= arrival <= MAX_ARRIVAL_S:
        raise InputError(
            where, f"field 'arrival_s' must lie in 0..{MAX_ARRIVAL_S:g}, got {arrival!r}", _RECREATE
        )
    for name in ("prompt_ids", "output_ids", "hash_ids", "steps"):
        ids = getattr(record, name)
        if ids is not None and (
            not isinstance(ids, list) or not all(_is_int(v) and 0 <= v < 1 << 63 for v in ids)
        ):
            raise InputError(where, f"field '{name}' must be a list of integers >= 0", _RECREATE)
    for name, length in (("prompt_ids", "prompt_len"), ("output_ids", "output_len")):
        ids = getattr(record, name)
        if ids is not None and len(ids) != getattr(record, length):
            raise InputError(
                where,
                f"field '{name}' holds {len(ids)} ids but field '{length}' is "
                f"{getattr(record, length)}",
                _RECREATE,
            )
    for name in ("text", "finish_reason"):
        if getattr(record, name) is not None and not isinstance(getattr(record, name), str):
            raise InputError(where, f"field '{name}' must be a string", _RECREATE)
    for name in ("timings", "meta"):
        if getattr(record, name) is not None and not isinstance(getattr(record, name), dict):
            raise InputError(where, f"field '{name}' must be a JSON object", _RECREATE)
    timings = record.timings
    if timings is not None and not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in timings.values()
    ):
        raise InputError(where, "field 'timings' must map names to numbers (seconds)", _RECREATE)
    kv = record.kv
    if kv is not None and not all(_is_int(v) and v >= 0 for v in (kv.shard, kv.row, kv.rows)):
        raise InputError(where, f"field 'kv' must hold integers >= 0, got {kv!r}", _RECREATE)
    full = record.full_kv
    if full is not None and not (
        isinstance(full.file, str)
        and all(_is_int(v) and 0 <= v < 1 << 63 for v in (full.row, full.rows))
        and _is_hex64(full.sha256)
    ):
        raise InputError(
            where,
            "field 'full_kv' must hold a file name, integers row and rows >= 0 and a sha256 of "
            f"64 hex digits, got {full!r}",
            _RECREATE,
        )


def _map_shard(path: Path, dtype: np.dtype[Any], rows: int) -> KVRows:
    if rows == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(rows,))


def recount(records: list[RequestRecord]) -> Counts:
    """The counts a manifest must hold for these records."""
    return Counts(
        requests=len(records),
        prompt_tokens=sum(r.prompt_len for r in records),
        output_tokens=sum(r.output_len for r in records),
        kv_rows=sum(r.kv.rows for r in records if r.kv is not None),
    )


class TraceReader:
    """A committed trace, opened read-only.

    The constructor checks the manifest, the committed length of ``requests.jsonl`` and of
    every shard, and parses every committed request line. With ``verify=True`` it also runs
    :meth:`verify` (checksums, counts, unique ids, KV references).
    """

    def __init__(self, path: Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        self._manifest = load_manifest(self.path)
        self._dtype = row_dtype(self._manifest, str(self.path / MANIFEST))
        self._requests_path = _check_requests_file(self.path, self._manifest)
        row_size = self._dtype.itemsize if self._dtype is not None else 0
        shard_paths = [check_shard_file(self.path, s, row_size) for s in self._manifest.shards]
        self._records = _read_records(
            self._requests_path, self._manifest.requests_bytes, self._manifest.requests_sha256
        )
        self._full_dtype = full_kv_spec_dtype(self._manifest, str(self.path / MANIFEST))
        check_full_kv_refs(self.path, self._records, self._full_dtype)
        self._shards: list[KVRows] = []
        if self._dtype is not None:
            dtype = self._dtype
            self._shards = [
                _map_shard(p, dtype, s.rows)
                for p, s in zip(shard_paths, self._manifest.shards, strict=True)
            ]
        self._checksums_ok = False
        self._closed = False
        if verify:
            self.verify()

    @property
    def manifest(self) -> Manifest:
        """The committed manifest."""
        return self._manifest

    @property
    def is_empty(self) -> bool:
        """True if no request is committed."""
        return not self._records

    @property
    def row_dtype(self) -> np.dtype[Any] | None:
        """Dtype of one KV row, or ``None`` for a trace without model/sketch (workload)."""
        return self._dtype

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self._records)

    def records(self) -> list[RequestRecord]:
        """All committed requests in file order (the cached list: do not mutate it)."""
        return self._records

    def kv(self, record: RequestRecord) -> KVRows:
        """The KV rows of ``record``: a read-only view of its shard's memory map."""
        ref = record.kv
        if ref is None:
            raise ValueError(f"request {record.id!r} has no KV rows (field 'kv' is absent)")
        if self._closed:
            raise ValueError(f"reader of {self.path} is closed")
        self._check_ref(record, str(self._requests_path))
        return self._shards[ref.shard][ref.row : ref.row + ref.rows]

    def verify(self, *, checksums: bool = True) -> dict[str, Any]:
        """Check the whole trace; return a report. Raises :class:`InputError` on a problem.

        Checks: shard sha256 of committed bytes (``checksums``; done once per reader), counts
        recomputed from the records equal ``manifest.counts``, shard rows sum to
        ``counts.kv_rows``, ids are unique, every KV reference lies inside its shard.
        """
        done = [
            "schema_version",
            "requests_bytes",
            "requests_checksum",
            "shard_lengths",
            "request_lines",
        ]
        if checksums:
            if not self._checksums_ok:
                for info in self._manifest.shards:
                    checked_shard_hash(self.path, info)
                if self._full_dtype is not None:
                    check_full_kv_hashes(self.path, self._records, self._full_dtype)
                self._checksums_ok = True
            done.append("shard_checksums")
        self._check_counts()
        self._check_ids()
        block = self._manifest.block_size
        for i, record in enumerate(self._records, 1):
            where = f"{self._requests_path}:{i}"
            self._check_ref(record, where)
            want = -(-(record.prompt_len + record.output_len) // block)
            if record.kv is not None and record.kv.rows != want:
                raise InputError(
                    where,
                    f"field 'kv' has {record.kv.rows} rows but {record.prompt_len} + "
                    f"{record.output_len} tokens in blocks of {block} (manifest.json field "
                    f"'block_size') need {want}",
                    _RECREATE,
                )
        done += ["counts", "unique_ids", "kv_refs", "rows_per_block"]
        return self._report(done)

    def close(self) -> None:
        """Drop the memory maps (the reader then yields records but no KV)."""
        self._shards = []
        self._closed = True

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _report(self, checks: list[str]) -> dict[str, Any]:
        m = self._manifest
        return {
            "path": str(self.path),
            "kind": m.kind,
            "complete": m.complete,
            "schema_version": m.schema_version,
            "requests": m.counts.requests,
            "prompt_tokens": m.counts.prompt_tokens,
            "output_tokens": m.counts.output_tokens,
            "kv_rows": m.counts.kv_rows,
            "shards": len(m.shards),
            "requests_bytes": m.requests_bytes,
            "shard_bytes": sum(s.bytes for s in m.shards),
            "checks": checks,
        }

    def _check_counts(self) -> None:
        where = str(self.path / MANIFEST)
        have = self._manifest.counts
        want = recount(self._records)
        for name in ("requests", "prompt_tokens", "output_tokens", "kv_rows"):
            if getattr(have, name) != getattr(want, name):
                raise InputError(
                    where,
                    f"field 'counts.{name}' is {getattr(have, name)} but the committed "
                    f"requests in {REQUESTS} give {getattr(want, name)}",
                    _RECREATE,
                )
        shard_rows = sum(s.rows for s in self._manifest.shards)
        if shard_rows != want.kv_rows:
            raise InputError(
                where,
                f"field 'shards' holds {shard_rows} rows but the requests reference {want.kv_rows}",
                _RECREATE,
            )

    def _check_ids(self) -> None:
        first: dict[str, int] = {}
        for i, record in enumerate(self._records, 1):
            if record.id in first:
                raise InputError(
                    f"{self._requests_path}:{i}",
                    f"field 'id' {record.id!r} repeats line {first[record.id]}",
                    _RECREATE,
                )
            first[record.id] = i

    def _check_ref(self, record: RequestRecord, where: str) -> None:
        ref = record.kv
        if ref is None:
            return
        shards = self._manifest.shards
        if ref.shard >= len(shards) or ref.row + ref.rows > shards[ref.shard].rows:
            limit = (
                f"shard {shards[ref.shard].file} has {shards[ref.shard].rows} committed rows"
                if ref.shard < len(shards)
                else f"the trace has {len(shards)} shards"
            )
            raise InputError(
                where,
                f"field 'kv' (shard {ref.shard}, rows {ref.row}..{ref.row + ref.rows}) lies "
                f"outside the committed shards ({limit})",
                _RECREATE,
            )
