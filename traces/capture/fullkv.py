"""The optional full-KV shard family (``capture --full-kv``): every token's K and V.

Files ``fullkv-NNNNN.bin`` in the trace directory hold raw records of
:func:`~memshare.traces.schema.full_kv_row_dtype`, one per token. A request's records are
appended and fsynced *before* its request line is added (and committed) by the trace writer;
its :class:`~memshare.traces.schema.FullKVRef` names the file, first record, count and the
sha256 of exactly those bytes. So a committed request always has its full KV, and bytes that
no committed request points at are leftovers of an interrupted capture:
:class:`FullKVWriter` truncates (or deletes) them when a capture resumes.

The main trace reader ignores this family (older readers too: it is backwards compatible);
:func:`read_full_kv` and :func:`verify_full_kv` read and check it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.errors import InputError
from memshare.traces.files import fsync_dir
from memshare.traces.schema import (
    FULL_KV_GLOB,
    FullKVRef,
    Manifest,
    RequestRecord,
    full_kv_name,
    full_kv_row_dtype,
)

FULL_KV_SHARD_MAX_BYTES = 1 << 30
_RECAPTURE = "re-capture the trace with --full-kv"


def full_kv_dtype(manifest: Manifest) -> np.dtype[Any] | None:
    """Record dtype of the trace's full-KV shards, or ``None`` if it has none."""
    spec = manifest.capture.get("full_kv") if manifest.capture else None
    if not spec or manifest.model is None:
        return None
    m = manifest.model
    return full_kv_row_dtype(
        m.num_layers, m.num_kv_heads, m.head_dim, tuple(spec["fields"]), str(spec["dtype"])
    )


def _file_index(name: str) -> int:
    return int(name.removeprefix("fullkv-").removesuffix(".bin"))


class FullKVWriter:
    """Appends per-request full-KV records; on open, trims what no committed record uses."""

    def __init__(
        self,
        trace_dir: Path,
        dtype: np.dtype[Any],
        committed: Iterable[RequestRecord] = (),
        *,
        shard_max_bytes: int = FULL_KV_SHARD_MAX_BYTES,
    ) -> None:
        self._dir = Path(trace_dir)
        self._dtype = dtype
        self._max = shard_max_bytes
        used: dict[str, int] = {}
        for r in committed:
            if r.full_kv is not None:
                end = r.full_kv.row + r.full_kv.rows
                used[r.full_kv.file] = max(used.get(r.full_kv.file, 0), end)
        for path in self._dir.glob(FULL_KV_GLOB):
            if path.name not in used:
                path.unlink()
        for name, rows in used.items():
            path = self._dir / name
            need = rows * dtype.itemsize
            if not path.is_file() or path.stat().st_size < need:
                raise InputError(
                    str(path), "full-KV shard is missing or shorter than its records", _RECAPTURE
                )
            os.truncate(path, need)
        self._index = max((_file_index(n) for n in used), default=-1)
        self._rows = used.get(full_kv_name(self._index), 0) if self._index >= 0 else 0
        self._file: Any = None
        if self._index >= 0:
            self._file = (self._dir / full_kv_name(self._index)).open("ab")

    def append(self, rows: npt.NDArray[Any]) -> FullKVRef:
        """Write one request's records durably; return the reference for its record."""
        if rows.dtype != self._dtype or rows.ndim != 1:
            raise ValueError(f"full-KV rows must be 1-d of dtype {self._dtype}")
        data = rows.tobytes()
        if self._file is None or (
            self._rows > 0 and (self._rows * self._dtype.itemsize + len(data)) > self._max
        ):
            if self._file is not None:
                self._file.close()
            self._index += 1
            self._rows = 0
            self._file = (self._dir / full_kv_name(self._index)).open("wb")
            fsync_dir(self._dir)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        ref = FullKVRef(
            full_kv_name(self._index), self._rows, len(rows), hashlib.sha256(data).hexdigest()
        )
        self._rows += len(rows)
        return ref

    def close(self) -> None:
        """Close the open shard."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_full_kv(
    trace_dir: Path, manifest: Manifest, record: RequestRecord, *, verify: bool = True
) -> npt.NDArray[Any]:
    """The full-KV records of ``record`` (one per token), checked against its sha256."""
    dtype = full_kv_dtype(manifest)
    ref = record.full_kv
    where = f"{Path(trace_dir) / 'requests.jsonl'} (request {record.id})"
    if dtype is None or ref is None:
        raise InputError(where, "has no full KV", "capture with --full-kv to store it")
    path = Path(trace_dir) / ref.file
    if Path(ref.file).name != ref.file or not path.match(FULL_KV_GLOB):
        raise InputError(
            where, f"field 'full_kv.file' {ref.file!r} is not a full-KV shard", _RECAPTURE
        )
    start, nbytes = ref.row * dtype.itemsize, ref.rows * dtype.itemsize
    if not path.is_file() or path.stat().st_size < start + nbytes:
        raise InputError(
            str(path), "missing or shorter than the records pointing into it", _RECAPTURE
        )
    if ref.rows != record.total_len:
        raise InputError(
            where,
            f"field 'full_kv.rows' is {ref.rows}, the request has {record.total_len} tokens",
            _RECAPTURE,
        )
    arr: npt.NDArray[Any] = np.memmap(path, dtype=dtype, mode="r", offset=start, shape=(ref.rows,))
    if verify:
        digest = hashlib.sha256(arr.tobytes()).hexdigest()
        if digest != ref.sha256:
            raise InputError(
                str(path),
                f"checksum mismatch for request {record.id} (sha256 {digest[:16]}..., record says "
                f"{ref.sha256[:16]}...)",
                _RECAPTURE,
            )
    return arr


def verify_full_kv(
    trace_dir: Path, manifest: Manifest, records: Sequence[RequestRecord]
) -> dict[str, Any]:
    """Check every committed request's full KV (presence, length, sha256)."""
    dtype = full_kv_dtype(manifest)
    if dtype is None:
        return {"full_kv": False}
    nbytes = 0
    for r in records:
        nbytes += read_full_kv(trace_dir, manifest, r).nbytes
    return {"full_kv": True, "requests": len(records), "bytes": nbytes}
