"""A trace's data files checked against the manifest: KV shards and full-KV shards.

A shard's committed bytes (the manifest's ``ShardInfo.bytes``) must be on disk and hash to
its sha256; bytes past them are a crash leftover and ignored. Every request of a full-KV trace
points inside an existing full-KV shard, and its records hash to its ``full_kv.sha256``.
:func:`map_shard` maps the committed rows read-only (nothing is copied).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from memshare.errors import InputError
from memshare.traces.fields import RECAPTURE, RECREATE, is_int
from memshare.traces.schema import (
    FULL_KV_GLOB,
    MANIFEST,
    REQUESTS,
    SHARD_GLOB,
    RequestRecord,
    ShardInfo,
)

if TYPE_CHECKING:
    from _hashlib import HASH

_CHUNK = 1 << 20

KVRows = npt.NDArray[Any]
"""A structured array of :func:`~memshare.traces.schema.kv_row_dtype`, one row per block."""


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
                    RECREATE,
                )
            continue
        if Path(ref.file).name != ref.file or not Path(ref.file).match(FULL_KV_GLOB):
            raise InputError(
                where, f"field 'full_kv.file' {ref.file!r} is not a full-KV shard", RECREATE
            )
        if ref.rows != r.prompt_len + r.output_len:
            raise InputError(
                where,
                f"field 'full_kv.rows' is {ref.rows}, the request has "
                f"{r.prompt_len + r.output_len} tokens",
                RECREATE,
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
                RECAPTURE,
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
                RECAPTURE,
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
            where, f"field 'shards' names {info.file!r}, not a shard file name", RECREATE
        )
    if not (is_int(info.rows) and is_int(info.bytes) and isinstance(info.sha256, str)):
        raise InputError(
            where,
            f"field 'shards' entry {info.file}: rows and bytes must be integers and sha256 a "
            "string",
            RECREATE,
        )
    if info.rows < 0 or info.bytes != info.rows * row_size:
        raise InputError(
            where,
            f"field 'shards' entry {info.file}: bytes {info.bytes} != rows {info.rows} x "
            f"row size {row_size}",
            RECREATE,
        )
    path = trace_dir / info.file
    if not path.is_file():
        raise InputError(str(path), "shard listed in manifest.json is missing", RECAPTURE)
    size = path.stat().st_size
    if size < info.bytes:
        raise InputError(
            str(path),
            f"truncated shard: {size} bytes on disk, manifest.json field 'shards' commits "
            f"{info.bytes}",
            RECAPTURE,
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
            RECAPTURE,
        )
    return hasher


def map_shard(path: Path, dtype: np.dtype[Any], rows: int) -> KVRows:
    """The first ``rows`` records of a shard, memory-mapped read-only."""
    if rows == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(rows,))
