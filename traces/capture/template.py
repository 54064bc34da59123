"""The manifest template of a capture: its settings (``capture``) and provenance (``source``).

The template is what a capture's trace records before any request: the backend, mode, keys,
dtype, segmenter and generation (or teacher-forcing) settings, the notes on blocks, arrivals
and truncation, and the inputs' and model's provenance. A resumed capture's template must
equal the interrupted one's (:mod:`~memshare.traces.capture.resume`).
"""

from __future__ import annotations

from typing import Any

from memshare.traces.capture.base import CaptureBackend
from memshare.traces.capture.options import CaptureOptions, Mode
from memshare.traces.inputs import InputSet
from memshare.traces.schema import FULL_KV_FIELDS, FULL_KV_GLOB, Manifest, SketchSpec

BLOCKS_NOTE = "ceil(tokens / block_size) rows per request; the last block zero-padded"
ARRIVAL_NOTE = "all requests arrive at 0 s (a capture has no arrival process)"
TRUNCATION_NOTE = (
    "texts over the context limit (or max_tokens) are cut there: finish_reason 'length', "
    "meta.text_tokens = full length"
)


def make_template(
    o: CaptureOptions, mode: Mode, inputs: InputSet, backend: CaptureBackend
) -> Manifest:
    """The manifest template of this capture (settings and provenance)."""
    capture: dict[str, Any] = {
        "tool": "memshare capture",
        "backend": backend.name,
        "mode": mode,
        "keys": o.keys,
        "dtype": o.dtype,
        "limit": o.limit,
        "steps": o.segmenter.to_dict(),
        "blocks": BLOCKS_NOTE,
        "arrival": ARRIVAL_NOTE,
        "full_kv": None,
    }
    if mode == "generate":
        capture["generation"] = o.generation.to_dict()
    else:
        capture["chunk_tokens"] = o.chunk_tokens
        capture["max_tokens"] = o.max_tokens
        capture["truncation"] = TRUNCATION_NOTE
    if o.full_kv:
        fields = [f for f in FULL_KV_FIELDS if f != "k" or "pre_rope" in backend.key_modes]
        capture["full_kv"] = {"fields": fields, "dtype": "<f4", "files": FULL_KV_GLOB}
    versions = getattr(backend, "versions", None)
    source: dict[str, Any] = {
        "inputs": inputs.source,
        "model": backend.describe(),
        "versions": versions() if callable(versions) else {},
    }
    return Manifest(
        kind="kv",
        block_size=o.block_size,
        model=backend.model_info(),
        sketch=SketchSpec(method="jl", dim=o.sketch_dim, seed=o.sketch_seed, keys=o.keys),
        source=source,
        capture=capture,
    )
