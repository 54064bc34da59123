"""What the policy sees of a block that filled in the real engine: a
:class:`~memshare.policy.FullBlock` made from live KV (docs/scheduler.md, "one function").

The sketch comes from :func:`memshare.sketch.sketch_blocks` (the function capture uses) on
the block's pre-RoPE K and V read from its pages, and is rounded exactly as a trace stores it
(a :func:`~memshare.traces.schema.kv_row_dtype` record: float16 sketches, float32 norms), so a
policy sees the same numbers from a live block as the simulator reads from a trace of the
same KV. Token ids and the chained hash come from the request's tokens; the reasoning step is
that of the block's first token, from :func:`~memshare.traces.segment.segment_tokens`
over the text known when the block fills (a teacher-forced text is known whole, as capture
knows it; a generated answer only up to the block, since the engine cannot see the future).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.policy import FullBlock
from memshare.request import Request
from memshare.sketch import sketch_blocks
from memshare.traces.schema import kv_row_dtype
from memshare.traces.segment import SegmenterConfig, segment_tokens

TokenStarts = Callable[[Sequence[int]], tuple[str, list[int]]]  # ids -> (text, char starts)
BlockKV = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.float32]]  # (L, 2) pages -> KV


def stored_sketch(
    kv: npt.NDArray[np.float32], dim: int, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(sketch (L, 2, d), norm (L, 2))`` of one block's KV ``(L, 2, B, H, D)``, rounded as
    a trace record stores them."""
    sk, norm = sketch_blocks(kv, kv.shape[2], dim, seed)  # (L, 2, 1, d), (L, 2, 1)
    layers = kv.shape[0]
    row = np.zeros((), dtype=kv_row_dtype(layers, dim))
    row["sketch"] = sk[:, :, 0]
    row["norm"] = norm[:, :, 0]
    return (
        np.asarray(row["sketch"], dtype=np.float32),
        np.asarray(row["norm"], dtype=np.float32),
    )


class StepBoundaries:
    """Reasoning-step starts of one request (token offsets from its first prompt token)."""

    def __init__(
        self,
        prompt_len: int,
        token_starts: TokenStarts | None,
        segmenter: SegmenterConfig,
        fixed: Sequence[int] | None = None,
    ) -> None:
        self.prompt_len = prompt_len
        self.token_starts = token_starts
        self.segmenter = segmenter
        self.fixed = list(fixed) if fixed is not None else None  # known whole (teacher-forced)

    def step_of(self, req: Request, position: int) -> int | None:
        """The step that token ``position`` of ``req`` belongs to (None if unknown)."""
        if self.fixed is not None:
            starts = self.fixed
        elif self.token_starts is None or req.token_ids is None:
            return None
        else:
            out = req.token_ids[self.prompt_len :]
            if not out:
                starts = [0]
            else:
                text, char_starts = self.token_starts(out)
                steps = segment_tokens(text, char_starts, self.segmenter)
                p = self.prompt_len
                starts = [0, *(p + s for s in steps if p + s > 0)]
        return bisect.bisect_right(starts, position) - 1


def live_block_source(
    req: Request,
    pages_of: Callable[[int], npt.NDArray[np.int64]],
    block_kv: BlockKV,
    steps: StepBoundaries,
    *,
    sketch_dim: int,
    sketch_seed: int,
    on_block: Callable[[str, int, npt.NDArray[np.int64]], Any] | None = None,
    with_kv: bool = True,
) -> Callable[[int], FullBlock]:
    """The ``block_info`` function of an engine request: logical index -> FullBlock from the
    live KV in the block's pages (``pages_of(i)``, ``(L, 2)``). ``on_block`` hears of every
    block reported (the engine records which request wrote which pages). ``with_kv=False``
    (a policy asked at reservation, before the pass writes the block: it decides on hashes
    and tokens only) leaves the sketch out."""

    def full_block(i: int) -> FullBlock:
        pages = pages_of(i)
        if on_block is not None:
            on_block(req.rid, i, pages)
        sketch = norm = None
        if with_kv:
            sketch, norm = stored_sketch(block_kv(pages), sketch_dim, sketch_seed)
        bs = req.info.block_size
        tokens = None
        if req.token_ids is not None:
            tokens = np.asarray(req.token_ids[i * bs : (i + 1) * bs], dtype=np.int64)
        return FullBlock(
            req_id=req.rid,
            index=i,
            block_hash=req.hashes[i] if i < len(req.hashes) else None,
            token_ids=tokens,
            step=steps.step_of(req, i * bs),
            sketch=sketch,
            norm=norm,
        )

    return full_block
