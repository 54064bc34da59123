"""Synthetic kv trace for the trace I/O tests; also a script the crash test SIGKILLs.

Usage: ``python helpers_trace_writer.py OUT_DIR N SHARD_MAX_BYTES``. Prints ``ready`` (flushed)
just before opening the writer and ``opened`` once it is open (its empty manifest committed),
then writes requests 0..N-1 with ``commit_every=1``, printing ``added I`` once request ``I`` is
committed, and prints ``done`` after closing (each line flushed: the crash test reads them to
place its kills and to prove a kill landed before ``done``).

Invariant: request ``i`` (its record and its KV rows) is a function of ``i`` only, so a test
can recompute what any prefix of the trace must hold.

:func:`sign_manifest` re-signs an edited manifest (its field ``manifest_sha256``) the way
docs/traces.md defines it, written out here rather than taken from memshare, so a test that
edits a manifest reaches the reader's own field checks, and the format is pinned.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.traces.schema import (
    Manifest,
    ModelInfo,
    RequestRecord,
    SketchSpec,
    kv_row_dtype,
)
from memshare.traces.writer import TraceWriter

LAYERS = 3
DIM = 8


def kv_template() -> Manifest:
    """Manifest template of the synthetic kv trace."""
    return Manifest(
        kind="kv",
        block_size=16,
        model=ModelInfo("synthetic", "SyntheticForCausalLM", LAYERS, 2, 16, "float16"),
        sketch=SketchSpec(dim=DIM, seed=7),
        source={"generator": "helpers_trace_writer"},
        capture={"backend": "synthetic"},
    )


def manifest_sha256(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of all fields but
    ``manifest_sha256``: the manifest's own checksum as docs/traces.md defines it."""
    body = {k: v for k, v in fields.items() if k != "manifest_sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def sign_manifest(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with ``manifest_sha256`` set to :func:`manifest_sha256` of the others."""
    return {**fields, "manifest_sha256": manifest_sha256(fields)}


def num_rows(i: int) -> int:
    """Blocks of request ``i`` (pseudo-random, 1..12)."""
    return random.Random(i).randint(1, 12)


def expected_rows(i: int) -> npt.NDArray[Any]:
    """The KV rows of request ``i``."""
    n = num_rows(i)
    rows = np.zeros(n, dtype=kv_row_dtype(LAYERS, DIM))
    base = np.arange(n * LAYERS * 2 * DIM).reshape(n, LAYERS, 2, DIM)
    rows["sketch"] = ((base * 13 + i * 31) % 2003 / 7.0 - 100.0).astype(np.float16)
    rows["norm"] = (np.arange(n * LAYERS * 2).reshape(n, LAYERS, 2) + i * 0.5).astype(np.float32)
    return rows


def expected_record(i: int) -> RequestRecord:
    """The record of request ``i`` as passed to ``TraceWriter.add`` (no ``kv`` yet)."""
    n = num_rows(i)
    prompt_len = 16 * n - 8 - (i % 8)  # with output_len, ceil(tokens / 16) == n (the rows)
    return RequestRecord(
        id=f"req-{i:05d}",
        arrival_s=i * 0.25,
        prompt_len=prompt_len,
        output_len=i % 9,
        prompt_ids=[(i * 7 + t) % 50_000 for t in range(prompt_len)],
        output_ids=[t % 50_000 for t in range(i % 9)],
        text=f"step {i}: wait, let me check — étape ✓",
        steps=[0, prompt_len // 2],
        finish_reason="stop",
        timings={"ttft_s": i / 1000},
    )


def write_requests(writer: TraceWriter, indices: range) -> None:
    """Add requests ``indices`` in order."""
    for i in indices:
        writer.add(expected_record(i), expected_rows(i))


def main(argv: list[str]) -> int:
    """Write the synthetic trace; see the module docstring."""
    out, n, shard_max = Path(argv[0]), int(argv[1]), int(argv[2])
    print("ready", flush=True)
    with TraceWriter(out, kv_template(), commit_every=1, shard_max_bytes=shard_max) as w:
        print("opened", flush=True)
        for i in range(n):
            write_requests(w, range(i, i + 1))
            print(f"added {i}", flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
