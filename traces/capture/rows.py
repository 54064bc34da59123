"""What one captured request becomes in a trace: its KV rows, full-KV records and step starts.

KV rows: ``ceil(tokens / block_size)`` per request (prompt and output tokens, the last block
zero-padded), per layer the JL sketch (:func:`memshare.sketch.sketch_blocks`) of K and of V
and their norms. Full-KV records: every token's K/V fields in the full-KV dtype. Step
starts: token offsets from the first prompt token, 0 for the prompt, then the output's
reasoning steps (:mod:`~memshare.traces.segment`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.sketch import sketch_blocks
from memshare.traces.capture.base import KEY_FIELD, CaptureBackend, CapturedRequest, KeyMode
from memshare.traces.schema import kv_row_dtype
from memshare.traces.segment import SegmenterConfig, segment_tokens


def kv_rows(
    captured: CapturedRequest, keys: KeyMode, block_size: int, dim: int, seed: int
) -> npt.NDArray[Any]:
    """The trace's KV rows of one request: per block and layer, sketches and norms."""
    k = captured.get(KEY_FIELD[keys])
    v = captured.get("v")
    sk, nk = sketch_blocks(k, block_size, dim, seed)  # (L, blocks, d), (L, blocks)
    sv, nv = sketch_blocks(v, block_size, dim, seed)
    layers, blocks = nk.shape
    rows = np.zeros(blocks, dtype=kv_row_dtype(layers, dim))
    rows["sketch"][:, :, 0, :] = sk.transpose(1, 0, 2)
    rows["sketch"][:, :, 1, :] = sv.transpose(1, 0, 2)
    rows["norm"][:, :, 0] = nk.T
    rows["norm"][:, :, 1] = nv.T
    return rows


def full_kv_rows(captured: CapturedRequest, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """Every token's K/V as full-KV records (``(tokens,)`` of ``dtype``)."""
    rows = np.zeros(captured.tokens, dtype=dtype)
    for name in dtype.names or ():
        rows[name] = captured.get(name).transpose(1, 0, 2, 3)  # type: ignore[arg-type]
    return rows


def step_starts(
    backend: CaptureBackend,
    captured: CapturedRequest,
    seg: SegmenterConfig,
    text: str | None,
    starts: list[int] | None,
) -> tuple[str, list[int]]:
    """Output text and step starts (token offsets from the first prompt token)."""
    if text is None or starts is None:
        text, starts = backend.token_starts(captured.output_ids)
    out_steps = segment_tokens(text, starts, seg)
    p = len(captured.prompt_ids)
    return text, [0, *(p + s for s in out_steps if p + s > 0)]
