"""One step of the paged KV engine, planned: what each sequence computes, writes and reads.

A step packs many sequences' new tokens into one row (varlen, as vLLM does): ``input_ids``
and ``position_ids`` are ``[1, T]``, each sequence's tokens contiguous, its positions the
logical ones (``start .. start + n - 1``). :func:`plan_step` turns the chunks into index
tensors **once per step**; every layer's attention then only slices them (see
``docs/paged-kv.md``).

Invariants of a :class:`BatchPlan`:

* ``write_rows[l, kv, t]`` is the flat store row (``page * block_size + offset``) that token
  ``t`` of the step writes for layer ``l``, K (``kv=0``) or V (``kv=1``): position ``p`` goes
  to block ``p // B``, offset ``p % B``, page id ``pages[p // B, l, kv]`` of its own table.
  Only owner layers (``layer_map[l] == l``) write.
* Reads go through the table column of the owner layer: layer ``l`` reads
  ``pages[:, layer_map[l]]`` (under memshare's ``BlockPool`` both columns hold the same ids).
* Copies (KVShare's reused spans): ``copy_src[l, kv, r]`` -> ``copy_dst[l, kv, r]``, done by
  owner layers right after their writes, so a copy may read KV written in the same step.
* Chunks of contiguous positions and one length ``n`` form a group (:class:`GroupPlan`), read
  with one padded gather ``(L, 2, G, Lmax)`` (padding points at row 0 and is masked off), each
  query attending keys up to its own position. Single-token chunks (decode) always form one
  group, whatever their number; a multi-token chunk alone of its length, or with gaps (reused
  spans), is attended by itself (:class:`ChunkPlan`, a causal mask offset by its start).
  Groups are ordered by ``n``; their tokens are in packed-row order within a group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from memshare.scheduler import Chunk
from memshare.validate.engine.rotated import Fixes, RotatedKeys, fixes_of

IntArray = npt.NDArray[np.int64]


@dataclass
class SeqChunk:
    """One sequence's work in a step.

    ``pages`` ``(n_blocks, L, 2)`` page ids cover every position the chunk reads or writes;
    positions before its first token are already in those pages, the new tokens' K/V are
    written there this step. Tokens sit at ``start, start + 1, ...`` unless ``positions`` says
    otherwise (increasing; gaps are positions whose KV is copied, not computed). ``copy_pos``
    (``R`` positions) receive, in every owner layer, the K/V of the flat store rows
    ``copy_src`` ``(R, L, 2)`` (KVShare's reused spans), before any attention of that layer
    reads. A chunk may have no tokens if it has copies. ``all_logits``: logits for every new
    token (teacher forcing) instead of the last one only.
    """

    token_ids: Sequence[int]
    start: int
    pages: npt.ArrayLike
    all_logits: bool = False
    positions: Sequence[int] | None = None
    copy_pos: Sequence[int] = ()
    copy_src: npt.ArrayLike | None = None

    def token_positions(self) -> IntArray:
        """Positions of ``token_ids`` (checked: increasing, from ``start`` on)."""
        n = len(self.token_ids)
        if self.positions is None:
            return np.arange(self.start, self.start + n, dtype=np.int64)
        pos = np.asarray(self.positions, dtype=np.int64)
        if pos.shape != (n,) or (n and (pos[0] < self.start or np.any(np.diff(pos) <= 0))):
            raise ValueError("positions must be increasing, one per token, from start on")
        return pos


@dataclass
class ChunkPlan:
    """A multi-token chunk: its token slice in the step and its context rows."""

    tok_start: int  # first token of the chunk in the packed row
    tok_end: int  # one past its last token
    ctx: int  # context length read: start + n
    rows: torch.Tensor  # (L, 2, ctx) flat store rows to read, layer map applied
    mask: torch.Tensor | None  # (1, 1, n, ctx) bool, True = attend; None = causal from 0
    fixes: Fixes | None = None  # keys to rotate again (RotatedKeys); None: rotate them all


@dataclass
class GroupPlan:
    """Chunks of one length ``n`` (1: decode), attended together over padded contexts."""

    tok: torch.Tensor  # (G, n) token indices in the packed row
    rows: torch.Tensor  # (L, 2, G, Lmax) flat store rows, layer map applied; padding: row 0
    mask: torch.Tensor | None  # (G, 1, n, Lmax) bool: key <= the query's position; None: all
    lmax: int  # longest context in the group
    # (L, 2, G, nb) the page ids of ``rows`` (nb blocks cover Lmax; padding: page 0): a read
    # gathers whole pages and keeps the first Lmax rows, the same keys as ``rows`` within a
    # context (the rest are masked)
    pages: torch.Tensor | None = None
    # keys to rotate again (RotatedKeys), their index counted in the page gather's
    # (G, nb * block_size) rows; None: rotate them all
    fixes: Fixes | None = None


@dataclass
class BatchPlan:
    """Index tensors of one step (see the module docstring for the invariants)."""

    input_ids: torch.Tensor  # (1, T) long
    position_ids: torch.Tensor  # (1, T) long
    write_rows: torch.Tensor  # (L, 2, T) long
    writes: list[bool]  # per layer: does it own pages (write)?
    max_ctx: int  # longest context of any chunk
    keep: torch.Tensor  # (K,) token indices whose logits are returned
    outputs: list[tuple[int, int, bool]]  # per chunk: slice [a, b) of the kept logits, all?
    chunks: list[ChunkPlan] = field(default_factory=list)
    groups: list[GroupPlan] = field(default_factory=list)
    copy_src: torch.Tensor | None = None  # (L, 2, R) flat rows copied from (KVShare spans)
    copy_dst: torch.Tensor | None = None  # (L, 2, R) flat rows copied into, this step
    cos: Any = None  # (1, max_ctx, head_dim), filled by the engine from the model's rotary
    sin: Any = None


def reusing_chunk(
    token_ids: list[int], c: Chunk, pages: npt.NDArray[np.int64], block_size: int
) -> SeqChunk:
    """The work of a chunk with reused spans: its other tokens computed at their positions,
    the spans' K/V copied from their source blocks' token slots (every layer)."""
    copy_pos = np.concatenate([np.arange(sp.start, sp.start + sp.length) for sp in c.spans])
    computed = np.setdiff1d(np.arange(c.start, c.start + c.num_tokens), copy_pos)
    src = np.concatenate(
        [
            sp.source.pages[None] * block_size + (sp.offset + np.arange(sp.length))[:, None, None]
            for sp in c.spans
        ]
    )
    return SeqChunk(
        [token_ids[p] for p in computed.tolist()],
        c.start,
        pages,
        positions=computed.tolist(),
        copy_pos=copy_pos.tolist(),
        copy_src=src,
    )


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
    rotated: RotatedKeys | None = None,
) -> BatchPlan:
    """Check the chunks and build the step's index tensors (one pass, no per-token loops).

    ``rotated``: the store's rotated-key cache; its positions are updated for the step's
    writes and copies, and every read gets the keys it must rotate again (``fixes``)."""
    if not chunks:
        raise ValueError("a step needs at least one chunk")
    L = num_layers
    pk = _pack(chunks, L, block_size, num_pages)
    lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
    lay = _Layout(pk, lens, L, block_size, layer_map, device)
    grouped, alone = _grouping(chunks, lens)
    groups = [lay.group(n, members) for n, members in grouped]
    lone = [lay.alone(m) for m in alone]
    plan = BatchPlan(
        input_ids=_dev(np.array(pk.ids, dtype=np.int64)[None], device),
        position_ids=_dev(np.concatenate(pk.pos)[None], device),
        write_rows=_dev(lay.write, device),
        writes=[bool(x) for x in layer_map == np.arange(L)],
        max_ctx=max(1, int(lay.ctxs.max())),
        keep=_dev(np.concatenate(pk.keep), device),
        outputs=pk.outputs,
        chunks=lone,
        groups=groups,
    )
    if pk.copy_src:
        plan.copy_src = _dev(np.concatenate(pk.copy_src, axis=2), device)
        plan.copy_dst = _dev(np.concatenate(pk.copy_dst, axis=2), device)
    if rotated is not None:
        _plan_rotated(rotated, pk, lay, plan, layer_map)
    return plan


def _plan_rotated(
    rotated: RotatedKeys, pk: _Packed, lay: _Layout, plan: BatchPlan, layer_map: IntArray
) -> None:
    """Note the step's key writes and copies in ``rotated``, then give every read the keys
    it finds rotated at another position than it reads them (its ``fixes``)."""
    owners = np.flatnonzero(layer_map == np.arange(len(layer_map)))
    if pk.tokens:
        rotated.note_writes(lay.write[owners, 0], np.concatenate(pk.pos))
    if pk.copy_src:
        src = np.concatenate(pk.copy_src, axis=2)[owners, 0]
        rotated.note_copies(src, np.concatenate(pk.copy_dst, axis=2)[owners, 0])
    device = lay.device
    for g, (rows, valid) in zip(plan.groups, lay.group_rows, strict=True):
        want = np.arange(g.lmax, dtype=np.int64)
        k_rows = rows[:, 0]  # (L, G, Lmax)
        width = -(-g.lmax // lay.B) * lay.B  # rows per sequence in the page gather
        g.fixes = fixes_of(rotated.stale(k_rows, want, valid), k_rows, want, device, width)
    for ch, rows in zip(plan.chunks, lay.chunk_rows, strict=True):
        want = np.arange(ch.ctx, dtype=np.int64)
        ch.fixes = fixes_of(rotated.stale(rows[:, 0], want), rows[:, 0], want, device)


def _dev(a: npt.ArrayLike, device: Any) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=device)


@dataclass
class _Packed:
    """The step's chunks, checked, packed into one row: per chunk its page table, positions,
    kept logits and copies; ``tokens`` and ``kept`` count the row's tokens and kept logits."""

    tables: list[IntArray] = field(default_factory=list)  # per chunk (n_blocks, L, 2)
    ids: list[int] = field(default_factory=list)
    pos: list[IntArray] = field(default_factory=list)
    keep: list[IntArray] = field(default_factory=list)
    outputs: list[tuple[int, int, bool]] = field(default_factory=list)
    copy_src: list[IntArray] = field(default_factory=list)
    copy_dst: list[IntArray] = field(default_factory=list)
    tokens: int = 0
    kept: int = 0


def _pack(chunks: Sequence[SeqChunk], L: int, B: int, num_pages: int) -> _Packed:
    """Check each chunk and append it to the packed row (its logits: all, or the last)."""
    pk = _Packed()
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        p_tok, pages, cp, src = _check_chunk(i, c, L, B, num_pages)
        if src is not None:
            pk.copy_src.append(src.transpose(1, 2, 0))
            pk.copy_dst.append(pages[cp // B].transpose(1, 2, 0) * B + cp % B)
        pk.tables.append(pages)
        pk.ids.extend(int(x) for x in c.token_ids)
        pk.pos.append(p_tok)
        t, k0 = pk.tokens, pk.kept
        if c.all_logits or n == 0:
            pk.keep.append(np.arange(t, t + n, dtype=np.int64))
            pk.outputs.append((k0, k0 + n, True))
        else:
            pk.keep.append(np.array([t + n - 1], dtype=np.int64))
            pk.outputs.append((k0, k0 + 1, False))
        pk.kept += len(pk.keep[-1])
        pk.tokens += n
    return pk


def _check_chunk(
    i: int, c: SeqChunk, L: int, B: int, num_pages: int
) -> tuple[IntArray, IntArray, IntArray, IntArray | None]:
    """Chunk ``i``'s token positions, page table, copy positions and copy rows (``None``: no
    copies), each checked against the store's ``num_pages`` pages of ``B`` tokens."""
    n = len(c.token_ids)
    p_tok = c.token_positions()
    cp = np.asarray(c.copy_pos, dtype=np.int64)
    if (n == 0 and not len(cp)) or c.start < 0 or (len(cp) and int(cp.min()) < 0):
        raise ValueError(f"chunk {i}: needs >= 1 token or copy, and start >= 0")
    reach = max(int(p_tok[-1]) + 1 if n else 0, int(cp.max()) + 1 if len(cp) else 0)
    pages = np.asarray(c.pages, dtype=np.int64)
    if pages.ndim != 3 or pages.shape[1:] != (L, 2) or pages.shape[0] * B < reach:
        raise ValueError(
            f"chunk {i}: pages must be (n_blocks >= {-(-reach // B)}, {L}, 2), got {pages.shape}"
        )
    used = pages[: -(-reach // B)]
    if used.size and (int(used.min()) < 0 or int(used.max()) >= num_pages):
        raise ValueError(f"chunk {i}: page ids must lie in [0, {num_pages})")
    if not len(cp):
        return p_tok, pages, cp, None
    src = np.asarray(c.copy_src, dtype=np.int64)
    if src.shape != (len(cp), L, 2):
        raise ValueError(f"chunk {i}: copy_src must be ({len(cp)}, {L}, 2)")
    if int(src.min()) < 0 or int(src.max()) >= num_pages * B:
        raise ValueError(f"chunk {i}: copy rows must lie in [0, {num_pages * B})")
    return p_tok, pages, cp, src


def _grouping(
    chunks: Sequence[SeqChunk], lens: IntArray
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """The groups (length ``n``, member chunks; by ``n``) and the chunks attended alone
    (multi-token ones alone of their length or with gaps; in chunk order)."""
    by_len: dict[int, list[int]] = {}
    alone: list[int] = []
    for m in np.flatnonzero(lens > 0).tolist():
        contiguous = chunks[m].positions is None or lens[m] == 1
        (by_len.setdefault(int(lens[m]), []) if contiguous else alone).append(m)
    groups: list[tuple[int, list[int]]] = []
    for n, members in sorted(by_len.items()):
        if len(members) == 1 and n > 1:
            alone.extend(members)
        else:
            groups.append((n, members))
    return groups, sorted(alone)


class _Layout:
    """The packed row's index arithmetic: each chunk's first token and context, and the
    write rows ``(L, 2, T)`` that :meth:`group` and :meth:`alone` fill in."""

    def __init__(
        self, pk: _Packed, lens: IntArray, L: int, B: int, layer_map: IntArray, device: Any
    ) -> None:
        self.pk, self.lens, self.L, self.B = pk, lens, L, B
        self.layer_map, self.device = layer_map, device
        self.ctxs = np.array([int(p[-1]) + 1 if len(p) else 0 for p in pk.pos], dtype=np.int64)
        self.tok0 = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        self.write = np.empty((L, 2, pk.tokens), dtype=np.int64)
        # the reads' rows as numpy, layer map applied: per group (rows (L, 2, G, Lmax), which
        # entries lie in a context (G, Lmax)), per chunk attended alone (L, 2, ctx)
        self.group_rows: list[tuple[IntArray, npt.NDArray[np.bool_]]] = []
        self.chunk_rows: list[IntArray] = []

    def group(self, n: int, members: list[int]) -> GroupPlan:
        """Chunks of length ``n`` read with one padded gather; their write rows filled."""
        pk, L, device = self.pk, self.L, self.device
        idx = np.asarray(members, dtype=np.int64)
        lmax = int(self.ctxs[idx].max())
        padded = _padded_pages([pk.tables[m] for m in members], lmax, self.B)  # (G, nb, L, 2)
        rows = _page_rows(padded, lmax, self.B)  # (G, L, 2, Lmax)
        qpos = np.stack([pk.pos[m] for m in members])  # (G, n) the queries' positions
        tok = self.tok0[idx][:, None] + np.arange(n, dtype=np.int64)
        self.write[:, :, tok.reshape(-1)] = (
            rows[np.arange(len(members))[:, None], :, :, qpos].transpose(2, 3, 0, 1)
        ).reshape(L, 2, -1)
        # (G, n, Lmax): a key is read by queries at or after its position
        reads = np.asarray(np.arange(lmax)[None, None, :] <= qpos[:, :, None], dtype=np.bool_)
        in_ctx = np.arange(lmax)[None, :] < self.ctxs[idx][:, None]  # (G, Lmax)
        rows = np.where(in_ctx[:, None, None, :], rows, 0)[:, self.layer_map].transpose(1, 2, 0, 3)
        self.group_rows.append((rows, in_ctx))
        return GroupPlan(
            _dev(tok, device),
            _dev(rows, device),
            None if reads.all() else torch.as_tensor(reads[:, None], device=device),
            lmax,
            _dev(padded[:, :, self.layer_map].transpose(2, 3, 0, 1), device),
        )

    def alone(self, m: int) -> ChunkPlan:
        """Chunk ``m`` attended by itself (a causal mask offset by its start); its write rows
        filled."""
        n, ctx, a = int(self.lens[m]), int(self.ctxs[m]), int(self.tok0[m])
        pos, device = self.pk.pos[m], self.device
        rows = _context_rows(self.pk.tables[m], ctx, self.B)
        self.write[:, :, a : a + n] = rows[:, :, pos]
        mask = None
        if n != ctx:  # not the whole context from 0: attend up to each token's own position
            q = torch.as_tensor(pos, device=device)[:, None]
            mask = (torch.arange(ctx, device=device)[None, :] <= q)[None, None]
        self.chunk_rows.append(rows[self.layer_map])
        return ChunkPlan(a, a + n, ctx, _dev(self.chunk_rows[-1], device), mask)


def _padded_pages(tables: Sequence[IntArray], lmax: int, block_size: int) -> IntArray:
    """Page ids ``(G, nb, L, 2)`` of the ``nb`` blocks covering positions ``0..lmax-1`` under
    each table; a table shorter than that is padded with page 0 (the caller masks those)."""
    nbmax = -(-lmax // block_size)
    L = tables[0].shape[1]
    padded = np.zeros((len(tables), nbmax, L, 2), dtype=np.int64)
    for j, t in enumerate(tables):
        nb = min(len(t), nbmax)
        padded[j, :nb] = t[:nb]
    return padded


def _page_rows(padded: IntArray, lmax: int, block_size: int) -> IntArray:
    """Flat rows ``(G, L, 2, lmax)`` of positions ``0..lmax-1`` under padded page ids
    ``(G, nb, L, 2)``."""
    B = block_size
    G, nbmax, L = padded.shape[:3]
    rows = padded.transpose(0, 2, 3, 1)[..., None] * B + np.arange(B, dtype=np.int64)
    out: IntArray = rows.reshape(G, L, 2, nbmax * B)[..., :lmax]
    return out
