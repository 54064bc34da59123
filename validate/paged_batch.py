"""One step of the paged KV engine, planned: what each sequence computes, writes and reads.

A step packs many sequences' new tokens into one row (varlen, as vLLM does): ``input_ids``
and ``position_ids`` are ``[1, T]``, each sequence's tokens contiguous, its positions the
logical ones (``start .. start + n - 1``). :func:`plan_step` turns the chunks into index
tensors **once per step**; every layer's attention then only slices them (see
``docs/paged-kv.md``).

Invariants of a :class:`StepPlan`:

* ``write_rows[l, kv, t]`` is the flat store row (``page * block_size + offset``) that token
  ``t`` of the step writes for layer ``l``, K (``kv=0``) or V (``kv=1``): position ``p`` goes
  to block ``p // B``, offset ``p % B``, page id ``pages[p // B, l, kv]`` of its own table.
  Only owner layers (``layer_map[l] == l``) write.
* Reads go through the table column of the owner layer: layer ``l`` reads
  ``pages[:, layer_map[l]]`` (under memshare's ``BlockPool`` both columns hold the same ids).
* Single-token chunks form one decode group, read with one padded gather: ``dec_rows``
  ``(L, 2, Bd, Lmax)`` (padding points at row 0 and is masked off by ``dec_mask``).
  Multi-token chunks are attended one by one (:class:`ChunkPlan`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

IntArray = npt.NDArray[np.int64]


@dataclass
class SeqChunk:
    """One sequence's work in a step.

    ``pages`` ``(n_blocks, L, 2)`` page ids cover positions ``[0, start + len(token_ids))``;
    positions ``< start`` are already in those pages, the new tokens' K/V are written there
    this step. ``all_logits``: logits for every new position (teacher forcing) instead of the
    last one only.
    """

    token_ids: Sequence[int]
    start: int
    pages: npt.ArrayLike
    all_logits: bool = False


@dataclass
class ChunkPlan:
    """A multi-token chunk: its token slice in the step and its context rows."""

    tok_start: int  # first token of the chunk in the packed row
    tok_end: int  # one past its last token
    ctx: int  # context length read: start + n
    rows: torch.Tensor  # (L, 2, ctx) flat store rows to read, layer map applied
    mask: torch.Tensor | None  # (1, 1, n, ctx) bool, True = attend; None = causal from 0


@dataclass
class StepPlan:
    """Index tensors of one step (see the module docstring for the invariants)."""

    input_ids: torch.Tensor  # (1, T) long
    position_ids: torch.Tensor  # (1, T) long
    write_rows: torch.Tensor  # (L, 2, T) long
    writes: list[bool]  # per layer: does it own pages (write)?
    max_ctx: int  # longest context of any chunk
    keep: torch.Tensor  # (K,) token indices whose logits are returned
    outputs: list[tuple[int, int, bool]]  # per chunk: slice [a, b) of the kept logits, all?
    dec_tok: torch.Tensor | None = None  # (Bd,) token index of each decode sequence
    dec_rows: torch.Tensor | None = None  # (L, 2, Bd, Lmax)
    dec_mask: torch.Tensor | None = None  # (Bd, 1, 1, Lmax) bool or None when all full
    dec_lmax: int = 0
    chunks: list[ChunkPlan] = field(default_factory=list)
    cos: Any = None  # (1, max_ctx, head_dim), filled by the engine from the model's rotary
    sin: Any = None


def check_layer_map(layer_map: npt.ArrayLike | None, num_layers: int) -> IntArray:
    """The layer map as int64 ``(L,)``: each layer maps to itself or an earlier owner layer
    that maps to itself (the rule ``memshare.block_pool.BlockPool`` enforces)."""
    lm = (
        np.arange(num_layers, dtype=np.int64)
        if layer_map is None
        else np.asarray(layer_map, dtype=np.int64)
    )
    if lm.shape != (num_layers,) or np.any(lm < 0) or np.any(lm > np.arange(num_layers)):
        raise ValueError("layer_map must map each layer to itself or an earlier layer")
    if np.any(lm[lm] != lm):
        raise ValueError(
            "layer_map must map each layer to an owner layer (one that maps to itself)"
        )
    return lm


def _context_rows(pages: IntArray, ctx: int, block_size: int) -> IntArray:
    """Flat rows ``(L, 2, ctx)`` of positions ``0..ctx-1`` under the table ``pages``."""
    nb = -(-ctx // block_size)
    p = pages[:nb].transpose(1, 2, 0)  # (L, 2, nb)
    rows = p[..., None] * block_size + np.arange(block_size, dtype=np.int64)
    return rows.reshape(*p.shape[:2], nb * block_size)[..., :ctx]


def plan_step(
    chunks: Sequence[SeqChunk],
    *,
    num_layers: int,
    block_size: int,
    num_pages: int,
    layer_map: IntArray,
    device: Any,
) -> StepPlan:
    """Check the chunks and build the step's index tensors (one pass, no per-token loops)."""
    if not chunks:
        raise ValueError("a step needs at least one chunk")
    L, B = num_layers, block_size
    tables: list[IntArray] = []
    ids: list[int] = []
    pos: list[IntArray] = []
    keep: list[IntArray] = []
    outputs: list[tuple[int, int, bool]] = []
    t = kept = 0
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        if n == 0 or c.start < 0:
            raise ValueError(f"chunk {i}: needs >= 1 token and start >= 0")
        pages = np.asarray(c.pages, dtype=np.int64)
        ctx = c.start + n
        if pages.ndim != 3 or pages.shape[1:] != (L, 2) or pages.shape[0] * B < ctx:
            raise ValueError(
                f"chunk {i}: pages must be (n_blocks >= {-(-ctx // B)}, {L}, 2), got {pages.shape}"
            )
        used = pages[: -(-ctx // B)]
        if used.size and (int(used.min()) < 0 or int(used.max()) >= num_pages):
            raise ValueError(f"chunk {i}: page ids must lie in [0, {num_pages})")
        tables.append(pages)
        ids.extend(int(x) for x in c.token_ids)
        pos.append(np.arange(c.start, ctx, dtype=np.int64))
        k0 = kept
        if c.all_logits:
            keep.append(np.arange(t, t + n, dtype=np.int64))
            outputs.append((k0, k0 + n, True))
        else:
            keep.append(np.array([t + n - 1], dtype=np.int64))
            outputs.append((k0, k0 + 1, False))
        kept += len(keep[-1])
        t += n

    def dev(a: npt.ArrayLike) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=device)

    starts = np.array([c.start for c in chunks], dtype=np.int64)
    lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
    ctxs = starts + lens
    tok0 = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    write = np.empty((L, 2, t), dtype=np.int64)
    dec = np.flatnonzero(lens == 1)
    plan = StepPlan(
        input_ids=dev(np.array(ids, dtype=np.int64)[None]),
        position_ids=dev(np.concatenate(pos)[None]),
        write_rows=dev(write),  # replaced below
        writes=[bool(x) for x in layer_map == np.arange(L)],
        max_ctx=int(ctxs.max()),
        keep=dev(np.concatenate(keep)),
        outputs=outputs,
    )
    if len(dec):
        lmax = int(ctxs[dec].max())
        nbmax = -(-lmax // B)
        padded = np.zeros((len(dec), nbmax, L, 2), dtype=np.int64)
        for j, d in enumerate(dec.tolist()):
            nb = min(len(tables[d]), nbmax)
            padded[j, :nb] = tables[d][:nb]
        rows = padded.transpose(0, 2, 3, 1)[..., None] * B + np.arange(B, dtype=np.int64)
        rows = rows.reshape(len(dec), L, 2, nbmax * B)[..., :lmax]  # (Bd, L, 2, Lmax)
        last = ctxs[dec] - 1
        write[:, :, tok0[dec]] = rows[np.arange(len(dec)), :, :, last].transpose(1, 2, 0)
        valid = np.arange(lmax)[None, :] < ctxs[dec][:, None]
        rows = np.where(valid[:, None, None, :], rows, 0)
        plan.dec_tok = dev(tok0[dec])
        plan.dec_rows = dev(rows[:, layer_map].transpose(1, 2, 0, 3))
        plan.dec_lmax = lmax
        if not valid.all():
            plan.dec_mask = torch.as_tensor(valid[:, None, None, :], device=device)
    for m in np.flatnonzero(lens > 1).tolist():
        s, n, ctx, a = int(starts[m]), int(lens[m]), int(ctxs[m]), int(tok0[m])
        rows = _context_rows(tables[m], ctx, B)
        write[:, :, a : a + n] = rows[:, :, s:ctx]
        mask = None
        if s > 0:
            q = torch.arange(s, ctx, device=device)[:, None]
            mask = (torch.arange(ctx, device=device)[None, :] <= q)[None, None]
        plan.chunks.append(ChunkPlan(a, a + n, ctx, dev(rows[layer_map]), mask))
    plan.write_rows = dev(write)
    return plan
