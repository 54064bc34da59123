"""``manifest.json`` read and checked: its own checksum, every field typed and in range, the
row dtypes it implies.

:func:`load_manifest` says what is wrong with a directory that is not a trace (missing, a
file, no manifest, only a crashed writer's leftovers: :class:`~memshare.errors.TraceEmptyError`),
checks every manifest field (:func:`check_manifest_fields`) and then the manifest's own
checksum (:func:`check_manifest_digest`): a manifest whose content is not what its writer
wrote is refused, with the command that writes the trace again (:func:`remake_hint`). What the
data must agree with (counts, shard lengths, rows per request) is checked by the reader
against the files.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from memshare.errors import InputError, TraceEmptyError
from memshare.traces.fields import RECREATE, is_hex64, is_int
from memshare.traces.schema import (
    FULL_KV_FIELDS,
    MANIFEST,
    MANIFEST_SHA256,
    MANIFEST_TMP,
    REQUESTS,
    SHARD_GLOB,
    Manifest,
    full_kv_row_dtype,
    kv_row_dtype,
    manifest_digest,
    manifest_fields,
)


def has_leftovers(trace_dir: Path) -> bool:
    """True if ``trace_dir`` holds files a writer creates (other than ``manifest.json``)."""
    return (
        (trace_dir / MANIFEST_TMP).exists()
        or (trace_dir / REQUESTS).exists()
        or any(trace_dir.glob(SHARD_GLOB))
    )


_BEFORE_CHECKSUM = 2  # the schema version before manifest_sha256 (version 3)


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
        raise InputError(str(path), "not valid UTF-8", RECREATE) from None
    raw = manifest_fields(text, str(path))
    if raw.get("schema_version") == _BEFORE_CHECKSUM:
        raise InputError(
            str(path),
            f"schema version {_BEFORE_CHECKSUM}: written by a memshare from before manifests "
            f"carried their own checksum (field '{MANIFEST_SHA256}', version 3)",
            remake_hint(raw.get("source"), raw.get("capture"), trace_dir),
        )
    manifest = Manifest.from_fields(raw, str(path))
    if manifest.kind not in ("workload", "kv"):
        raise InputError(
            str(path), f"field 'kind' must be 'workload' or 'kv', got {manifest.kind!r}", RECREATE
        )
    if not is_int(manifest.requests_bytes) or manifest.requests_bytes < 0:
        raise InputError(str(path), "field 'requests_bytes' must be an integer >= 0", RECREATE)
    check_manifest_fields(manifest, str(path))
    check_manifest_digest(raw, manifest, trace_dir)
    return manifest


def check_manifest_digest(raw: dict[str, Any], manifest: Manifest, trace_dir: Path) -> None:
    """The manifest's field ``manifest_sha256`` is the :func:`manifest_digest` of its parsed
    fields ``raw``, else InputError naming the manifest and how to write the trace again.

    Cost: one canonical ``json.dumps`` and sha256 of a few KiB (tens of microseconds).
    """
    where = str(trace_dir / MANIFEST)
    fix = remake_hint(manifest.source, manifest.capture, trace_dir)
    stored = raw.get(MANIFEST_SHA256)
    if stored is None:
        raise InputError(
            where, f"field '{MANIFEST_SHA256}' (the manifest's own checksum) is missing", fix
        )
    if not is_hex64(stored):
        raise InputError(
            where, f"field '{MANIFEST_SHA256}' must be 64 hex digits, got {stored!r:.80}", fix
        )
    digest = manifest_digest(raw)
    if digest != stored:
        raise InputError(
            where,
            f"checksum mismatch: the manifest was changed after it was written (sha256 of its "
            f"canonical JSON is {digest[:16]}..., its field '{MANIFEST_SHA256}' says "
            f"{stored[:16]}...)",
            fix,
        )


def remake_hint(source: object, capture: object, trace_dir: Path) -> str:
    """How to write the trace in ``trace_dir`` again, from what its manifest says made it:
    ``memshare capture`` (``capture.tool``), or ``memshare import FORMAT FILE`` (``source``
    ``format``, ``file`` and ``limit``, shown only when printable), else :data:`RECREATE`.
    One line, whatever the (possibly damaged) manifest holds."""
    src = source if isinstance(source, Mapping) else {}
    cap = capture if isinstance(capture, Mapping) else {}
    if cap.get("tool") == "memshare capture":
        return (
            f"delete {trace_dir} and re-capture it (`memshare capture` with the options its "
            "manifest's 'capture' and 'source' record)"
        )
    fmt, file, limit = src.get("format"), src.get("file"), src.get("limit")
    if not (_printable(fmt) and fmt.isidentifier() and _printable(file)):
        return RECREATE
    args = f"{fmt} {shlex.quote(str(file))}"
    if is_int(limit):
        args += f" --limit {limit}"
    if src.get("text_prompts"):
        args += " --model MODEL (the tokenizer it used)"
    return f"delete {trace_dir} and re-import it: memshare import {args} -o {trace_dir}"


def _printable(value: object) -> TypeGuard[str]:
    """A short one-line string (safe to show in a one-line message)."""
    return isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable()


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


def check_manifest_fields(manifest: Manifest, where: str) -> None:
    """Every manifest field has its type and a value in range (InputError naming the field).

    What the data must agree with (counts, shard lengths, rows per request against
    ``block_size``) is checked by :class:`TraceReader` against the files themselves.
    """

    def check_int(name: str, value: object) -> None:
        lo, hi = _LIMITS[name]
        if not is_int(value) or not lo <= value <= hi:  # type: ignore[operator]
            raise InputError(
                where, f"field '{name}' must be an integer in {lo}..{hi}, got {value!r}", RECREATE
            )

    def check_str(name: str, value: object, choices: tuple[str, ...] = ()) -> None:
        if not isinstance(value, str) or (choices and value not in choices):
            want = f"one of {', '.join(choices)}" if choices else "a string"
            raise InputError(where, f"field '{name}' must be {want}, got {value!r}", RECREATE)

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
        raise InputError(where, "a 'kv' trace needs fields 'model' and 'sketch'", RECREATE)
    for name in ("requests", "prompt_tokens", "output_tokens", "kv_rows"):
        value = getattr(manifest.counts, name)
        if not is_int(value) or value < 0:
            raise InputError(
                where, f"field 'counts.{name}' must be an integer >= 0, got {value!r}", RECREATE
            )
    digest = manifest.requests_sha256
    if not is_hex64(digest):
        raise InputError(
            where, f"field 'requests_sha256' must be 64 hex digits, got {digest!r}", RECREATE
        )
    source_sha = manifest.source.get("sha256")  # the imported file's (config.json keeps it)
    if source_sha is not None and not is_hex64(source_sha):
        raise InputError(
            where, f"field 'source.sha256' must be 64 hex digits, got {source_sha!r}", RECREATE
        )
    if not isinstance(manifest.complete, bool):
        raise InputError(where, "field 'complete' must be true or false", RECREATE)


def row_dtype(manifest: Manifest, where: str) -> np.dtype[Any] | None:
    """Record dtype of this trace's KV shards; ``None`` if the trace can hold no KV rows."""
    if manifest.model is None or manifest.sketch is None:
        if manifest.shards:
            raise InputError(
                where,
                "field 'shards' lists KV shards but field 'model' or 'sketch' is missing",
                RECREATE,
            )
        return None
    return kv_row_dtype(manifest.model.num_layers, manifest.sketch.dim)


_FULL_KV_DTYPES = ("<f4", "<f2")


def full_kv_spec_dtype(manifest: Manifest, where: str) -> np.dtype[Any] | None:
    """Record dtype of the trace's full-KV shards (manifest ``capture.full_kv``), checked;
    ``None`` if the trace has none."""
    spec = manifest.capture.get("full_kv")  # 'capture' is a JSON object (Manifest.from_fields)
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
            RECREATE,
        )
    m = manifest.model
    return full_kv_row_dtype(m.num_layers, m.num_kv_heads, m.head_dim, tuple(fields), dtype)
