"""Write a trace directory crash-safely: append-only data files, atomic manifest commits.

Invariants (docs/traces.md):

- ``manifest.json`` is the commit point and is only ever replaced atomically (temp file in
  the same directory, fsync, ``os.replace``, fsync of the directory).
- A manifest never counts a byte that is not on disk: before each manifest write,
  ``requests.jsonl`` and the open shard are flushed and fsynced (a shard is also fsynced when
  it is rotated out).
- A request line is appended only after all its KV rows were written, and both are counted
  only once both writes succeeded, so a committed request always has all its KV rows.
- The writer's counters (requests bytes and their running sha256, shard rows/bytes, running
  sha256 per shard) describe
  exactly the bytes of fully added requests; a failed ``add`` leaves them untouched and makes
  the writer refuse further ``add`` calls (resume it instead).
- Record ids are unique within a trace.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from memshare import __version__
from memshare.errors import InputError
from memshare.traces.files import fsync_dir
from memshare.traces.manifest_file import has_leftovers, load_manifest, row_dtype
from memshare.traces.reader import TraceReader
from memshare.traces.schema import (
    MANIFEST,
    MANIFEST_TMP,
    REQUESTS,
    SCHEMA_VERSION,
    SHARD_GLOB,
    Counts,
    KVRef,
    Manifest,
    RequestRecord,
    ShardInfo,
    shard_name,
)
from memshare.traces.shards import KVRows, checked_shard_hash, hash_prefix

if TYPE_CHECKING:
    from _hashlib import HASH

SHARD_MAX_BYTES = 256 * 2**20
"""A shard is rotated when appending a request would take it past this size."""


def atomic_write_manifest(trace_dir: Path, manifest: Manifest) -> None:
    """Replace ``trace_dir/manifest.json`` atomically (temp file, fsync, rename, dir fsync)."""
    tmp = trace_dir / MANIFEST_TMP
    with tmp.open("wb") as f:
        f.write(manifest.to_json().encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, trace_dir / MANIFEST)
    fsync_dir(trace_dir)


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


@dataclass
class _Shard:
    """The shard being appended to. ``rows``/``bytes``/``hasher`` cover fully added rows only."""

    index: int
    name: str
    file: BinaryIO
    rows: int
    bytes: int
    hasher: HASH

    def info(self) -> ShardInfo:
        """The shard as the manifest lists it."""
        return ShardInfo(self.name, self.rows, self.bytes, self.hasher.hexdigest())


class TraceWriter:
    """Appends requests (and their KV rows) to a new trace directory; a context manager.

    ``TraceWriter(path, template)`` creates the trace; ``TraceWriter.resume(path)`` continues
    one. Every ``commit_every`` added requests, and at :meth:`close`, the manifest is
    rewritten; :meth:`close` marks the trace ``complete``. If an exception leaves the
    ``with`` block, the fully added requests are committed and ``complete`` stays ``False``.

    Only ``kind``, ``block_size``, ``hash_block_size``, ``model``, ``sketch``, ``source`` and
    ``capture`` of ``template`` are used; counts, shards and lengths are the writer's.
    """

    def __init__(
        self,
        path: Path,
        template: Manifest,
        *,
        commit_every: int = 1,
        shard_max_bytes: int = SHARD_MAX_BYTES,
    ) -> None:
        self._configure(Path(path), template, commit_every, shard_max_bytes)
        self._start_fresh()

    @classmethod
    def resume(
        cls,
        path: Path,
        *,
        template: Manifest | None = None,
        commit_every: int = 1,
        shard_max_bytes: int = SHARD_MAX_BYTES,
    ) -> TraceWriter:
        """Open an existing trace to append after its committed state.

        Crash leftovers are removed first: ``requests.jsonl`` and the listed shards are
        truncated to their committed lengths, unlisted shard files and the manifest temp file
        are deleted. The committed state is verified (checksums, counts, ids) on the way.
        With ``template`` given, a path holding no manifest (missing, empty, or leftovers of a
        writer killed before its first commit) starts a fresh trace instead of raising; a
        committed trace keeps its own manifest settings and ``template`` is not used.
        """
        path = Path(path)
        if template is not None and not (path / MANIFEST).is_file():
            if path.is_dir():
                _remove_leftovers(path, keep_shards=(), keep_requests=False)
            return cls(path, template, commit_every=commit_every, shard_max_bytes=shard_max_bytes)
        manifest = load_manifest(path)
        self = cls.__new__(cls)
        self._configure(path, manifest, commit_every, shard_max_bytes)
        self._restore(manifest)
        return self

    @property
    def path(self) -> Path:
        """The trace directory."""
        return self._path

    @property
    def committed_ids(self) -> set[str]:
        """Ids of all requests added so far (committed or pending the next commit)."""
        return self._ids

    @property
    def counts(self) -> Counts:
        """Totals over all requests added so far."""
        return self._counts

    def add(self, record: RequestRecord, kv_rows: KVRows | None = None) -> RequestRecord:
        """Append one finished request and its KV rows (one row per block); return it as stored.

        With ``kv_rows``, the rows go to the current shard (rotated past ``shard_max_bytes``)
        and the returned record's ``kv`` points at them. Without, ``record.kv`` must be None.
        """
        self._check_usable()
        self._check_new_id(record.id)
        data = b""
        shard: _Shard | None = None
        if kv_rows is not None:
            data = self._row_bytes(kv_rows)
            shard = self._shard_for(len(data))
            record = replace(record, kv=KVRef(shard.index, shard.rows, len(kv_rows)))
        elif record.kv is not None:
            raise ValueError(f"request {record.id!r}: field 'kv' is set but no kv_rows given")
        line = (record.to_json() + "\n").encode("utf-8")
        self._broken = True
        if shard is not None:
            shard.file.write(data)
        self._requests.write(line)
        self._broken = False
        self._account(record, line, shard, data)
        if self._pending >= self._commit_every:
            self.commit()
        return record

    def commit(self) -> None:
        """Make every fully added request durable and visible (rewrite the manifest)."""
        self._check_open()
        self._write_manifest(complete=False)

    def close(self) -> None:
        """Commit and mark the trace complete (incomplete if an ``add`` failed midway)."""
        if self._closed:
            return
        try:
            self._write_manifest(complete=not self._broken)
        finally:
            self._close_files()

    def abort(self) -> None:
        """Commit what is fully added, leave ``complete`` False, close. Never raises OSError."""
        if self._closed:
            return
        try:
            self._write_manifest(complete=False)
        except OSError:
            pass  # the trace keeps its last successful commit
        finally:
            self._close_files()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- setup -------------------------------------------------------------------------------

    def _configure(
        self, path: Path, template: Manifest, commit_every: int, shard_max_bytes: int
    ) -> None:
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        if shard_max_bytes < 1:
            raise ValueError(f"shard_max_bytes must be >= 1, got {shard_max_bytes}")
        if template.kind == "kv" and (template.model is None or template.sketch is None):
            raise ValueError("a 'kv' trace template needs 'model' and 'sketch'")
        self._path = path
        self._template = replace(
            template,
            counts=Counts(),
            requests_bytes=0,
            shards=(),
            complete=False,
            tool_version=__version__,
            schema_version=SCHEMA_VERSION,
        )
        self._dtype = row_dtype(self._template, str(path / MANIFEST))
        self._commit_every = commit_every
        self._shard_max_bytes = shard_max_bytes
        self._counts = Counts()
        self._ids: set[str] = set()
        self._requests_bytes = 0
        self._requests_hasher = hashlib.sha256()
        self._done_shards: list[ShardInfo] = []
        self._shard: _Shard | None = None
        self._pending = 0
        self._broken = False
        self._closed = False

    def _start_fresh(self) -> None:
        _refuse_existing(self._path)
        self._path.mkdir(parents=True, exist_ok=True)
        fsync_dir(self._path.parent)
        self._requests: BinaryIO = (self._path / REQUESTS).open("ab")
        self._write_manifest(complete=False)

    def _restore(self, manifest: Manifest) -> None:
        """Truncate crash leftovers, verify the committed state and continue after it."""
        with TraceReader(self._path, verify=False) as reader:
            reader.verify(checksums=False)
            self._ids = {r.id for r in reader}
        self._requests_hasher = hash_prefix(self._path / REQUESTS, manifest.requests_bytes)
        hashers = [checked_shard_hash(self._path, info) for info in manifest.shards]
        _remove_leftovers(
            self._path, keep_shards=tuple(s.file for s in manifest.shards), keep_requests=True
        )
        (self._path / REQUESTS).touch(exist_ok=True)
        os.truncate(self._path / REQUESTS, manifest.requests_bytes)
        for info in manifest.shards:
            os.truncate(self._path / info.file, info.bytes)
        self._counts = manifest.counts
        self._requests_bytes = manifest.requests_bytes
        self._requests = (self._path / REQUESTS).open("ab")
        if manifest.shards:
            last = manifest.shards[-1]
            self._done_shards = list(manifest.shards[:-1])
            self._shard = _Shard(
                len(manifest.shards) - 1,
                last.file,
                (self._path / last.file).open("ab"),
                last.rows,
                last.bytes,
                hashers[-1],
            )
        self._write_manifest(complete=False)

    # -- adding ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"trace writer for {self._path} is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._broken:
            raise RuntimeError(
                f"trace writer for {self._path}: an earlier add failed midway; close it and "
                "use TraceWriter.resume"
            )

    def _check_new_id(self, record_id: str) -> None:
        if record_id in self._ids:
            raise InputError(
                str(self._path / REQUESTS),
                f"field 'id' {record_id!r} is already in the trace",
                "give every request a unique id",
            )

    def _row_bytes(self, kv_rows: KVRows) -> bytes:
        if self._dtype is None:
            raise ValueError(
                "kv_rows given, but the trace template has no 'model' and 'sketch' to size them"
            )
        if kv_rows.ndim != 1 or kv_rows.dtype != self._dtype:
            raise ValueError(
                f"kv_rows must be a 1-d array of dtype {self._dtype}, got shape "
                f"{kv_rows.shape} dtype {kv_rows.dtype}"
            )
        return kv_rows.tobytes()

    def _shard_for(self, nbytes: int) -> _Shard:
        """The shard to append ``nbytes`` to, rotating if it would grow past the limit."""
        shard = self._shard
        if shard is not None and (
            shard.bytes == 0 or shard.bytes + nbytes <= self._shard_max_bytes
        ):
            return shard
        if shard is not None:
            _sync(shard.file)
            shard.file.close()
            self._done_shards.append(shard.info())
        index = len(self._done_shards)
        name = shard_name(index)
        new = _Shard(index, name, (self._path / name).open("wb"), 0, 0, hashlib.sha256())
        fsync_dir(self._path)
        self._shard = new
        return new

    def _account(
        self, record: RequestRecord, line: bytes, shard: _Shard | None, data: bytes
    ) -> None:
        """Count a fully written request (called only after both writes succeeded)."""
        rows = record.kv.rows if record.kv is not None else 0
        if shard is not None:
            shard.hasher.update(data)
            shard.rows += rows
            shard.bytes += len(data)
        self._requests_bytes += len(line)
        self._requests_hasher.update(line)
        c = self._counts
        self._counts = Counts(
            requests=c.requests + 1,
            prompt_tokens=c.prompt_tokens + record.prompt_len,
            output_tokens=c.output_tokens + record.output_len,
            kv_rows=c.kv_rows + rows,
        )
        self._ids.add(record.id)
        self._pending += 1

    # -- committing --------------------------------------------------------------------------

    def _write_manifest(self, *, complete: bool) -> None:
        _sync(self._requests)
        shards = list(self._done_shards)
        if self._shard is not None:
            _sync(self._shard.file)
            shards.append(self._shard.info())
        manifest = replace(
            self._template,
            counts=self._counts,
            requests_bytes=self._requests_bytes,
            requests_sha256=self._requests_hasher.hexdigest(),
            shards=tuple(shards),
            complete=complete,
        )
        atomic_write_manifest(self._path, manifest)
        self._pending = 0

    def _close_files(self) -> None:
        self._closed = True
        self._requests.close()
        if self._shard is not None:
            self._shard.file.close()


def _refuse_existing(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise InputError(
            str(path), "exists and is not a directory", "choose another output directory (-o)"
        )
    if path.is_dir() and ((path / MANIFEST).exists() or has_leftovers(path)):
        raise InputError(
            str(path),
            "already holds a trace (or leftovers of one)",
            "choose another output directory (-o) or delete this one",
        )
    first = next(path.iterdir(), None) if path.is_dir() else None
    if first is not None:  # a trace folder holds one trace and nothing else
        raise InputError(
            str(path),
            f"is not empty ({first.name}): a trace is written into a new or empty folder",
            "choose another output directory (-o)",
        )


def _remove_leftovers(path: Path, *, keep_shards: tuple[str, ...], keep_requests: bool) -> None:
    """Delete the manifest temp file, every shard file not in ``keep_shards`` and, unless
    ``keep_requests``, ``requests.jsonl``."""
    (path / MANIFEST_TMP).unlink(missing_ok=True)
    for shard in path.glob(SHARD_GLOB):
        if shard.name not in keep_shards:
            shard.unlink()
    if not keep_requests:
        (path / REQUESTS).unlink(missing_ok=True)
