"""Trace format v3: the manifest and request records, and their JSON (de)serialisation.

A trace is a directory (docs/traces.md):

- ``manifest.json``: this module's :class:`Manifest`. It is the commit point: only what it
  counts is part of the trace. It is rewritten atomically (temp file, fsync, rename).
- ``requests.jsonl``: one :class:`RequestRecord` per line; only the first
  ``manifest.requests_bytes`` bytes are committed (a line past that is a crash leftover), and
  ``manifest.requests_sha256`` is the sha256 of exactly those bytes.
- ``kv-NNNNN.bin``: KV shards, raw little-endian records of :func:`kv_row_dtype`, one record
  per block of a request (all layers). Append-only; the manifest lists each shard with its
  committed row count, byte length and sha256 of those bytes.

Invariants: a request line is committed only after all its KV rows are on disk (fsynced) and
listed in the manifest; a manifest never counts bytes that are not on disk; every data file's
committed bytes carry a sha256 in the manifest that every reader checks, and the manifest
carries the sha256 of its own content (``manifest_sha256``, :func:`manifest_digest`), so
changing the meaning of any committed file, the manifest included, makes the trace
unreadable, with the file named. Version 2 added ``requests_sha256`` (version 1 covered
``requests.jsonl`` by length only); version 3 added ``manifest_sha256``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memshare import __version__
from memshare.errors import InputError
from memshare.sketch import DEFAULT_DIM, DEFAULT_SEED

SCHEMA_VERSION = 3
MAX_REQUEST_TOKENS = 1 << 24  # prompt + output tokens of one request (past any real context)
MAX_ARRIVAL_S = 1e15  # latest arrival_s (30 million years): later is a unit mistake, not a trace
MANIFEST = "manifest.json"
MANIFEST_TMP = "manifest.json.tmp"  # the writer's temp file; renamed over MANIFEST to commit
MANIFEST_SHA256 = "manifest_sha256"  # the manifest's last field: manifest_digest of the others
REQUESTS = "requests.jsonl"
SHARD_GLOB = "kv-*.bin"  # every KV shard file name matches this
FULL_KV_GLOB = "fullkv-*.bin"  # optional full-KV shards (capture --full-kv); see FullKVRef
TraceKind = Literal["workload", "kv"]
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # of b""


@dataclass(frozen=True)
class ModelInfo:
    """The model whose KV a trace holds (kv traces) or that a workload is meant for."""

    name: str  # e.g. "SmolLM2-135M-Instruct"
    architecture: str  # HF architecture, e.g. "LlamaForCausalLM"
    num_layers: int  # L: decoder layers
    num_kv_heads: int  # KV heads per layer
    head_dim: int  # dimension of one head
    dtype: str  # KV dtype in the engine, e.g. "float16"


@dataclass(frozen=True)
class SketchSpec:
    """How per-block KV sketches were made (seeded Johnson-Lindenstrauss projection)."""

    method: str = "jl"  # projection method
    dim: int = DEFAULT_DIM  # d: sketch dimension
    seed: int = DEFAULT_SEED  # seed of the projection matrix
    keys: Literal["pre_rope", "post_rope"] = "pre_rope"  # where keys were taken
    dtype: str = "float16"  # storage dtype of the sketch


@dataclass(frozen=True)
class ShardInfo:
    """One KV shard as committed: the reader trusts nothing past ``bytes``."""

    file: str  # file name inside the trace directory
    rows: int  # committed records
    bytes: int  # committed length in bytes (rows * record size)
    sha256: str  # hex sha256 of the committed bytes


@dataclass(frozen=True)
class Counts:
    """Totals over committed requests."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    kv_rows: int = 0


@dataclass(frozen=True)
class Manifest:
    """The committed state of a trace. Field order is the JSON order."""

    kind: TraceKind  # "workload": lengths/hash ids only; "kv": token ids + KV sketches
    block_size: int  # tokens per KV block for this trace's KV rows / simulation default
    hash_block_size: int | None = None  # tokens per entry of RequestRecord.hash_ids, if any
    model: ModelInfo | None = None
    sketch: SketchSpec | None = None
    source: dict[str, Any] = field(default_factory=dict)  # where the data came from
    capture: dict[str, Any] = field(default_factory=dict)  # capture settings (kv traces)
    counts: Counts = field(default_factory=Counts)
    requests_bytes: int = 0  # committed length of requests.jsonl
    requests_sha256: str = EMPTY_SHA256  # hex sha256 of those committed bytes
    shards: tuple[ShardInfo, ...] = ()
    complete: bool = False  # True once the writer closed normally
    tool_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        """JSON text: the fields in order, then ``manifest_sha256``, the
        :func:`manifest_digest` of them as a reader parses them back (so the digest a reader
        computes from this text is the one written, whatever the free-form dicts hold)."""
        fields = json.loads(json.dumps(asdict(self)))
        fields[MANIFEST_SHA256] = manifest_digest(fields)
        return json.dumps(fields, indent=2, sort_keys=False) + "\n"

    @staticmethod
    def from_fields(raw: dict[str, Any], where: str) -> Manifest:
        """The manifest of parsed JSON fields ``raw`` (:func:`manifest_fields` of its text),
        typed; every problem is an :class:`InputError` naming ``where``. ``manifest_sha256`` is
        not read here: ``load_manifest``, the one way a trace's manifest is read, checks it."""
        for name, kind in (("complete", bool), ("tool_version", str)):
            if name in raw and not isinstance(raw[name], kind):
                raise InputError(
                    where,
                    f"field '{name}' must be {'true or false' if kind is bool else 'a string'}, "
                    f"got {raw[name]!r}",
                    _REWRITE_HINT,
                )
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(
                where,
                f"field 'schema_version' is {version!r}, this memshare reads version "
                f"{SCHEMA_VERSION}",
                "re-create the trace with this memshare (capture or import), or install the "
                "memshare version that wrote it",
            )
        try:
            model = raw.get("model")
            sketch = raw.get("sketch")
            return Manifest(
                kind=_field(raw, "kind", str, where),
                block_size=_field(raw, "block_size", int, where),
                hash_block_size=raw.get("hash_block_size"),
                model=ModelInfo(**model) if model is not None else None,
                sketch=SketchSpec(**sketch) if sketch is not None else None,
                source=_object(raw, "source", where),
                capture=_object(raw, "capture", where),
                counts=Counts(**_field(raw, "counts", dict, where)),
                requests_bytes=_field(raw, "requests_bytes", int, where),
                requests_sha256=_field(raw, "requests_sha256", str, where),
                shards=tuple(ShardInfo(**s) for s in _field(raw, "shards", list, where)),
                complete=bool(raw.get("complete", False)),
                tool_version=str(raw.get("tool_version", "?")),
                schema_version=version,
            )
        except TypeError as e:
            raise InputError(where, f"malformed field ({e})", _REWRITE_HINT) from None


_REWRITE_HINT = "the manifest is damaged: re-create the trace (capture or import)"


def manifest_fields(text: str, where: str) -> dict[str, Any]:
    """The JSON object of a manifest's text (strict JSON: no NaN, no 1e400); InputError if not."""
    try:
        raw = loads_strict(text)
    except json.JSONDecodeError as e:
        raise InputError(
            where, f"not valid JSON ({e.msg} at line {e.lineno})", _REWRITE_HINT
        ) from None
    except ValueError as e:  # NaN, Infinity, 1e400, an int of over 4300 digits
        raise InputError(where, f"not valid JSON ({e})", _REWRITE_HINT) from None
    if not isinstance(raw, dict):
        raise InputError(where, "is not a JSON object", _REWRITE_HINT)
    return raw


def manifest_digest(fields: dict[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of every field but ``manifest_sha256``.

    Canonical: keys sorted at every level, no whitespace (separators ``,`` and ``:``), ASCII
    only (``\\uXXXX`` escapes), numbers as Python writes the parsed value (``1.0`` stays a
    float, ``1`` an int). So key order, white space, escapes and number spellings of the same
    value (``1e2`` and ``100.0``) do not change the digest; any change of a key or value does.
    """
    body = {k: v for k, v in fields.items() if k != MANIFEST_SHA256}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of a float's range")
    return value


def loads_strict(text: str) -> Any:
    """``json.loads`` of standard JSON only: ``NaN`` and ``Infinity`` (Python extensions) and
    numbers beyond a float's range (``1e400``, which Python reads as infinity) raise
    ``ValueError``, so no non-finite number enters from a trace file."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)


def _object(raw: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """An optional free-form JSON object field (absent or null: empty)."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(
            where, f"field '{name}' must be a JSON object, got {value!r:.40}", _REWRITE_HINT
        )
    return dict(value)


def _field(raw: dict[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in raw:
        raise InputError(where, f"missing field '{name}'", _REWRITE_HINT)
    value = raw[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(where, f"field '{name}' must be an integer, got {value!r}", _REWRITE_HINT)
    if not isinstance(value, kind):
        raise InputError(
            where, f"field '{name}' must be a {kind.__name__}, got {value!r}", _REWRITE_HINT
        )
    return value


@dataclass(frozen=True)
class KVRef:
    """Where a request's KV rows lie: ``rows`` consecutive records of shard ``shard``."""

    shard: int  # index into Manifest.shards
    row: int  # first record
    rows: int  # number of records = number of blocks of the request


@dataclass(frozen=True)
class FullKVRef:
    """Where a request's full KV lies (optional, ``capture --full-kv``).

    ``rows`` consecutive records of :func:`full_kv_row_dtype` (one per token, prompt then
    output) starting at record ``row`` of the full-KV shard ``file`` (``fullkv-NNNNN.bin``);
    ``sha256`` is the hex digest of exactly those bytes. The shard family is append-only and
    written (and fsynced) before the request line that points into it, so a committed request
    always has its full KV; bytes no committed request points at are crash leftovers.
    """

    file: str
    row: int
    rows: int
    sha256: str


@dataclass(frozen=True)
class RequestRecord:
    """One finished request. Token offsets count from the first prompt token."""

    id: str  # unique within the trace
    arrival_s: float  # arrival time in seconds from the trace's first arrival
    prompt_len: int  # prompt tokens
    output_len: int  # generated (or teacher-forced output) tokens
    prompt_ids: list[int] | None = None  # token ids (kv traces)
    output_ids: list[int] | None = None
    hash_ids: list[int] | None = None  # chained prefix block hashes (workload traces)
    text: str | None = None
    steps: list[int] | None = None  # token offsets where reasoning steps start
    finish_reason: str | None = None
    timings: dict[str, float] | None = None
    kv: KVRef | None = None
    meta: dict[str, Any] | None = None  # source-specific extras (e.g. BurstGPT model name)
    full_kv: FullKVRef | None = None  # full K/V per token (capture --full-kv), else absent

    def to_json(self) -> str:
        """One JSON line without the trailing newline; ``None`` fields are left out."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False)

    @staticmethod
    def from_json(line: str, where: str) -> RequestRecord:
        """Parse one line; problems are :class:`InputError` naming ``where`` (file:line)."""
        try:
            raw = loads_strict(line)
        except json.JSONDecodeError as e:
            raise InputError(where, f"not valid JSON ({e.msg})", _REWRITE_HINT) from None
        except ValueError as e:  # NaN, Infinity, 1e400, an int of over 4300 digits
            raise InputError(where, f"not valid JSON ({e})", _REWRITE_HINT) from None
        if not isinstance(raw, dict):
            raise InputError(where, "is not a JSON object", _REWRITE_HINT)
        for name in ("id", "arrival_s", "prompt_len", "output_len"):
            if name not in raw:
                raise InputError(where, f"missing field '{name}'", _REWRITE_HINT)
        kv = raw.pop("kv", None)
        full_kv = raw.pop("full_kv", None)
        try:
            return RequestRecord(
                **raw,
                kv=KVRef(**kv) if kv is not None else None,
                full_kv=FullKVRef(**full_kv) if full_kv is not None else None,
            )
        except TypeError as e:
            raise InputError(where, f"malformed record ({e})", _REWRITE_HINT) from None

    @property
    def total_len(self) -> int:
        """Prompt plus output tokens."""
        return self.prompt_len + self.output_len


def kv_row_dtype(num_layers: int, sketch_dim: int) -> np.dtype[Any]:
    """Record of one block in a KV shard: per layer, sketches of K and V and their norms.

    ``sketch[l, 0]`` is K, ``sketch[l, 1]`` is V; ``norm[l, j]`` is the Frobenius norm of the
    unprojected block (so relative distances can be formed from sketches).
    """
    return np.dtype(
        [
            ("sketch", "<f2", (num_layers, 2, sketch_dim)),
            ("norm", "<f4", (num_layers, 2)),
        ]
    )


def manifest_path(trace_dir: Path) -> Path:
    """Path of the manifest inside a trace directory."""
    return trace_dir / MANIFEST


def shard_name(index: int) -> str:
    """File name of KV shard ``index`` (``kv-00000.bin``, ``kv-00001.bin``, ...)."""
    return f"kv-{index:05d}.bin"


FULL_KV_FIELDS = ("k", "k_rope", "v")
"""Fields of a full-KV record: ``k`` keys before rotary embedding (k_proj output), ``k_rope``
keys after it (what the engine's cache holds), ``v`` values. A backend that cannot expose one
of them leaves it out; the manifest's ``capture.full_kv.fields`` lists what a trace has."""


def full_kv_row_dtype(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    fields: tuple[str, ...] = FULL_KV_FIELDS,
    dtype: str = "<f4",
) -> np.dtype[Any]:
    """Record of one token in a full-KV shard: per field, ``(layers, kv_heads, head_dim)``."""
    return np.dtype([(name, dtype, (num_layers, num_kv_heads, head_dim)) for name in fields])


def full_kv_name(index: int) -> str:
    """File name of full-KV shard ``index`` (``fullkv-00000.bin``, ...)."""
    return f"fullkv-{index:05d}.bin"
