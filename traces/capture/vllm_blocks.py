"""How vLLM's CPU cache blocks hold K and V, and copying a request's blocks out of them.

A block of ``[kv_heads, block, 2 * head_dim]`` holds K then V; the fp32 CPU kernel stores K
transposed inside it, other kernels pack it otherwise (:data:`LAYOUTS`). Which one a running
engine uses is probed at start-up (:meth:`~memshare.traces.capture.vllm.VllmBackend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class BlockLayout:
    """How one cache block of ``[kv_heads, block, 2 * head_dim]`` holds K and V: viewed as
    ``[kv_heads, 2 * block, head_dim]``, the first ``block`` rows are K (``k_transposed``: K is
    stored as ``[head_dim, block]`` in them) and the rest V as ``[block, head_dim]``."""

    name: str
    k_transposed: bool


LAYOUTS = (BlockLayout("k-transposed", True), BlockLayout("k-rows", False))


def copy_blocks(caches: Sequence[Any], block_ids: Sequence[int]) -> Any:
    """A copy of blocks ``block_ids`` of every layer's cache: ``(L, n, kv_heads, block,
    2 * head_dim)``, as stored."""
    import torch

    ids = torch.tensor(list(block_ids), dtype=torch.long)
    return torch.stack([c.index_select(0, ids) for c in caches])


def unpack(
    raw: Any, tokens: int, layout: BlockLayout
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """K and V of the first ``tokens`` tokens of :func:`copy_blocks`' blocks under ``layout``:
    ``(layers, tokens, kv_heads, head_dim)`` float32 each."""
    L, n, H, B, D2 = raw.shape
    D = D2 // 2
    halves = raw.reshape(L, n, H, 2 * B, D)
    k_raw, v = halves[:, :, :, :B], halves[:, :, :, B:]
    if layout.k_transposed:
        k = k_raw.reshape(L, n, H, D, B).permute(0, 1, 4, 2, 3)  # (L, n, B, H, D)
    else:
        k = k_raw.permute(0, 1, 3, 2, 4)
    v = v.permute(0, 1, 3, 2, 4)

    def flat(t: Any) -> npt.NDArray[np.float32]:
        arr: npt.NDArray[np.float32] = (
            t.reshape(L, n * B, H, D)[:, :tokens].float().contiguous().numpy()
        )
        return arr

    return flat(k), flat(v)
