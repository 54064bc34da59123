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

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from memshare.errors import InputError
from memshare.traces.fields import RECREATE
from memshare.traces.manifest_file import (
    full_kv_spec_dtype,
    load_manifest,
    remake_hint,
    row_dtype,
)
from memshare.traces.requests_file import check_requests_file, read_records
from memshare.traces.schema import MANIFEST, REQUESTS, Counts, Manifest, RequestRecord
from memshare.traces.shards import (
    KVRows,
    check_full_kv_hashes,
    check_full_kv_refs,
    check_shard_file,
    checked_shard_hash,
    map_shard,
)

__all__ = ["KVRows", "TraceReader", "load_manifest", "recount"]


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
        self._requests_path = check_requests_file(self.path, self._manifest)
        row_size = self._dtype.itemsize if self._dtype is not None else 0
        shard_paths = [check_shard_file(self.path, s, row_size) for s in self._manifest.shards]
        m = self._manifest
        remake = remake_hint(m.source, m.capture, self.path)
        self._records = read_records(
            self._requests_path, m.requests_bytes, m.requests_sha256, remake
        )
        self._full_dtype = full_kv_spec_dtype(self._manifest, str(self.path / MANIFEST))
        check_full_kv_refs(self.path, self._records, self._full_dtype)
        self._shards: list[KVRows] = []
        if self._dtype is not None:
            dtype = self._dtype
            self._shards = [
                map_shard(p, dtype, s.rows)
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
                    RECREATE,
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
                    RECREATE,
                )
        shard_rows = sum(s.rows for s in self._manifest.shards)
        if shard_rows != want.kv_rows:
            raise InputError(
                where,
                f"field 'shards' holds {shard_rows} rows but the requests reference {want.kv_rows}",
                RECREATE,
            )

    def _check_ids(self) -> None:
        first: dict[str, int] = {}
        for i, record in enumerate(self._records, 1):
            if record.id in first:
                raise InputError(
                    f"{self._requests_path}:{i}",
                    f"field 'id' {record.id!r} repeats line {first[record.id]}",
                    RECREATE,
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
                RECREATE,
            )
