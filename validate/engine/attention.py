"""The attention function of the paged KV engine, registered with transformers by name.

transformers 5.x looks up ``config._attn_implementation`` in ``AttentionInterface`` and calls
the function with ``(module, query, key, value, attention_mask, scaling=..., **kwargs)``,
where ``query`` is ``[1, heads, T, head_dim]`` after the rotary embedding and ``key``/``value``
are this step's post-RoPE keys and values. Ours ignores ``key``/``value``: the step's pre-RoPE
K/V arrive through forward hooks (:mod:`memshare.validate.engine.model`) and the step's plan
arrives through the forward kwargs (``memshare_step``), which the HF modeling code passes
through unchanged down to the attention function. See ``docs/paged-kv.md``.

Per layer, in this order (write-before-read):

1. an owner layer writes every sequence's new pre-RoPE K/V rows into their pages, then copies
   the step's reused rows (KVShare spans) into theirs;
2. every sequence reads its context ``[0, start + n)`` from its pages (a shared layer through
   its owner's table column), its keys rotated by their logical positions ``0..ctx-1`` with
   the model's own cos/sin table, by the modeling module's own ``apply_rotary_pos_emb`` or,
   where that is checked to be the rotate-half form (Llama, Qwen), the same formula in fewer
   kernels (:func:`rotate_half_form`). With a rotated-key cache
   (:class:`~memshare.validate.engine.rotated.RotatedKeys`) a key is rotated once, when it is
   written, and read from the cache wherever it is read at that position; only keys read at
   another position (the plan's ``fixes``) are rotated again from their pages, by the same
   function, so both ways give the same keys bit for bit. Then it
   attends with its queries: chunks of one length (decode sequences: length 1) together in
   one padded ``scaled_dot_product_attention`` with a mask up to each query's position, any
   other chunk by itself with a causal mask offset by ``start``. A step that is one group
   (all decode, or a one-pass teacher-forced step) attends without gathering its queries.

The output has the layout HF's ``eager_attention_forward`` returns: ``[1, T, heads, head_dim]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from memshare.validate.engine.batch import BatchPlan, GroupPlan
from memshare.validate.engine.rotated import Fixes, RotatedKeys
from memshare.validate.engine.store import PageStore

ATTN_NAME = "memshare_paged"
STATE_KWARG = "memshare_step"


@dataclass
class PagedStep:
    """What the attention function needs during one ``PagedModel.step`` forward pass.

    ``new_k[l]`` / ``new_v[l]`` hold layer ``l``'s pre-RoPE K and V of this step's ``T`` tokens
    (set by the forward hooks just before the attention function runs, cleared after it).
    ``rotated``: the store's rotated-key cache, whose positions the plan already updated
    (``None``: every read rotates its keys from the pages). The store's dtype is the model's.
    """

    plan: BatchPlan
    store: PageStore
    new_k: list[Any]
    new_v: list[Any]
    apply_rope: Callable[..., Any]  # the modeling module's apply_rotary_pos_emb
    half_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # see rope_half_tables
    rotated: RotatedKeys | None = None
    _new_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin at the step's tokens

    def rotate(self, k: torch.Tensor, n: int) -> torch.Tensor:
        """Rotate keys ``[B, n, kvh, hd]`` by positions ``0..n-1`` (the model's RoPE)."""
        if self.half_tables is not None:
            cos, sin = self.half_tables
            return rotate_half_form(k, cos[:, :n], sin[:, :n])
        cos, sin = self.plan.cos[:, :n], self.plan.sin[:, :n]
        # apply_rotary_pos_emb rotates q and k together: pass an empty q (0 heads).
        _, out = self.apply_rope(k[:, :, :0], k, cos, sin, unsqueeze_dim=2)
        rotated: torch.Tensor = out
        return rotated

    def rotate_at(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate keys ``[N, kvh, hd]`` at positions ``pos`` ``(N,)``: element for element the
        arithmetic of :meth:`rotate` (the same tables, indexed at ``pos``)."""
        cos, sin = (
            self.half_tables if self.half_tables is not None else (self.plan.cos, self.plan.sin)
        )
        return self._rotate_by(k, cos[:, pos], sin[:, pos])

    def _rotate_by(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``[N, kvh, hd]`` keys by tables already taken at their positions."""
        if self.half_tables is not None:
            return rotate_half_form(k[None], cos, sin)[0]
        _, out = self.apply_rope(k[None, :, :0], k[None], cos, sin, unsqueeze_dim=2)
        rotated: torch.Tensor = out[0]
        return rotated

    def _rotate_new(self, k: torch.Tensor) -> torch.Tensor:
        """This step's new keys ``[T, kvh, hd]`` rotated at their positions (tables taken once
        per step)."""
        if self._new_tables is None:
            pos = self.plan.position_ids[0]
            cos, sin = (
                self.half_tables if self.half_tables is not None else (self.plan.cos, self.plan.sin)
            )
            self._new_tables = (cos[:, pos], sin[:, pos])
        return self._rotate_by(k, *self._new_tables)

    def keys(
        self, layer: int, rows: torch.Tensor, fixes: Fixes | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """The keys of ``rows`` ``(G, n)`` (positions ``0..n-1`` of each row) rotated:
        ``(G, n, kvh, hd)``; from the cache where ``fixes`` is given (rotating only the keys
        it lists), else rotated from the pages."""
        store = self.store
        if self.rotated is None or fixes is None:
            return self.rotate(store.gather_flat(rows).to(dtype), rows.shape[-1])
        k = self.rotated.flat.index_select(0, rows.reshape(-1))
        fix = fixes.get(layer)
        if fix is not None:
            idx, src, pos = fix
            k.index_copy_(0, idx, self.rotate_at(store.flat.index_select(0, src), pos))
        return k.view(*rows.shape, store.num_kv_heads, store.head_dim).to(dtype)

    def attend(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Write, then read and attend, for layer ``layer``; returns ``[1, T, heads, hd]``."""
        plan, store = self.plan, self.store
        _, heads, t, hd = query.shape
        if plan.writes[layer]:
            self._write(layer, t, hd)
        self.new_k[layer] = self.new_v[layer] = None
        gqa = heads != store.num_kv_heads
        if len(plan.groups) == 1 and not plan.chunks and plan.groups[0].tok.numel() == t:
            # one group covers the packed row, in order: no gather of queries, no scatter
            size, n = plan.groups[0].tok.shape
            q = query[0].reshape(heads, size, n, hd).transpose(0, 1)  # (G, heads, n, hd)
            o = self._group(layer, plan.groups[0], q, scaling, gqa)
            return o.transpose(1, 2).reshape(1, t, heads, hd)
        out = query.new_empty((t, heads, hd))
        for g in plan.groups:
            tok = g.tok.reshape(-1)
            size, n = g.tok.shape
            q = query[0, :, tok].view(heads, size, n, hd).transpose(0, 1)  # (G, heads, n, hd)
            o = self._group(layer, g, q, scaling, gqa)
            out[tok] = o.transpose(1, 2).reshape(size * n, heads, hd)
        for ch in plan.chunks:
            k = self.keys(layer, ch.rows[layer, 0][None], ch.fixes, query.dtype)
            v = store.gather_flat(ch.rows[layer, 1])[None].to(query.dtype)
            o = F.scaled_dot_product_attention(
                query[:, :, ch.tok_start : ch.tok_end],
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=ch.mask,
                is_causal=ch.mask is None,
                scale=scaling,
                enable_gqa=gqa,
            )
            out[ch.tok_start : ch.tok_end] = o[0].transpose(0, 1)
        return out[None]

    def _write(self, layer: int, t: int, hd: int) -> None:
        """An owner layer's writes: the step's new K/V rows, then its copies (and the same
        in the rotated-key cache: the new keys rotated at their positions)."""
        plan, store, rotated = self.plan, self.store, self.rotated
        new_k = self.new_k[layer].reshape(t, -1, hd)
        store.write_flat(plan.write_rows[layer, 0], new_k)
        store.write_flat(plan.write_rows[layer, 1], self.new_v[layer].reshape(t, -1, hd))
        if rotated is not None:
            keys = self._rotate_new(new_k.to(store.dtype))
            rotated.flat.index_copy_(0, plan.write_rows[layer, 0], keys)
        if plan.copy_src is not None and plan.copy_dst is not None:
            store.copy_flat(plan.copy_src[layer].reshape(-1), plan.copy_dst[layer].reshape(-1))
            if rotated is not None:
                src, dst = plan.copy_src[layer, 0], plan.copy_dst[layer, 0]
                rotated.flat.index_copy_(0, dst, rotated.flat.index_select(0, src))

    def _whole_pages(self, data: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """Pages ``pages`` ``(G, nb)`` of ``data`` (the store's or the cache's) as
        ``(G, nb * block_size, kvh, hd)``: one index per page, not per row."""
        store = self.store
        out = data.index_select(0, pages.reshape(-1))
        return out.view(pages.shape[0], -1, store.num_kv_heads, store.head_dim)

    def _group_keys(
        self, layer: int, g: GroupPlan, pages: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """A group's keys ``(G, Lmax, kvh, hd)`` rotated, gathered page by page: from the
        cache where the plan has ``fixes`` (rotating again only the keys it lists), else
        rotated from the pages (the same keys)."""
        store, rotated = self.store, self.rotated
        if rotated is None or g.fixes is None:
            k = self._whole_pages(store.data, pages[layer, 0])[:, : g.lmax]
            return self.rotate(k.to(dtype), g.lmax)
        k = self._whole_pages(rotated.data, pages[layer, 0])
        fix = g.fixes.get(layer)
        if fix is not None:
            idx, src, pos = fix
            flat = k.view(-1, store.num_kv_heads, store.head_dim)
            flat.index_copy_(0, idx, self.rotate_at(store.flat.index_select(0, src), pos))
        return k[:, : g.lmax].to(dtype)

    def _group(
        self, layer: int, g: GroupPlan, q: torch.Tensor, scaling: float, gqa: bool
    ) -> torch.Tensor:
        """One group: a padded gather, rotation and attention of its queries ``q``
        ``(G, heads, n, hd)`` -> the same shape."""
        if g.pages is None:
            k = self.keys(layer, g.rows[layer, 0], g.fixes, q.dtype)
            v = self.store.gather_flat(g.rows[layer, 1]).to(q.dtype)
        else:
            k = self._group_keys(layer, g, g.pages, q.dtype)
            v = self._whole_pages(self.store.data, g.pages[layer, 1])[:, : g.lmax].to(q.dtype)
        return F.scaled_dot_product_attention(
            q,
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=g.mask,
            scale=scaling,
            enable_gqa=gqa,
        )


def rope_half_tables(
    cos: torch.Tensor, sin: torch.Tensor, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos/sin ``[1, n, hd]`` laid out for :func:`rotate_half_form`: expanded over
    the KV heads, contiguous (broadcasting a head axis is several times slower on CPU), and the
    sine's first half negated (so the rotate-half needs no negation)."""
    half = cos.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    shape = (cos.shape[0], cos.shape[1], kv_heads, cos.shape[-1])
    return (
        cos[:, :, None].expand(shape).contiguous(),
        signed[:, :, None].expand(shape).contiguous(),
    )


def rotate_half_form(k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``k * cos + rotate_half(k) * sin``, the Llama/Qwen RoPE, in three kernels instead of
    five: ``rotate_half(k) * sin == swap_halves(k) * signed_sin``. Used only where
    :func:`rope_is_half_form` confirmed the modeling module computes exactly this."""
    half = k.shape[-1] // 2
    out = k * cos
    return out.addcmul_(torch.cat([k[..., half:], k[..., :half]], dim=-1), signed_sin)


def rope_is_half_form(apply_rope: Callable[..., Any], head_dim: int) -> bool:
    """Whether ``apply_rope`` (a modeling module's ``apply_rotary_pos_emb``) rotates keys as
    :func:`rotate_half_form` does, checked on seeded random keys and angles (1e-5)."""
    if head_dim % 2:
        return False
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 5, 3, head_dim, generator=g)
    ang = torch.randn(1, 5, head_dim, generator=g)
    cos, sin = ang.cos(), ang.sin()
    want = apply_rope(k[:, :, :0], k, cos, sin, unsqueeze_dim=2)[1]
    c, s = rope_half_tables(cos, sin, 3)
    return bool(torch.allclose(rotate_half_form(k, c, s), want, atol=1e-5, rtol=0))


def paged_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``memshare_paged`` attention function (HF's attention-interface signature)."""
    step = kwargs.get(STATE_KWARG)
    if not isinstance(step, PagedStep):
        raise RuntimeError(
            f"attention {ATTN_NAME!r} runs only inside PagedModel.step (no {STATE_KWARG} given)"
        )
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("sliding-window attention layers are not supported")
    if scaling is None:
        scaling = float(module.scaling)
    return step.attend(int(module.layer_idx), query, scaling), None


def no_mask(*_args: Any, **_kwargs: Any) -> None:
    """Mask function for ``memshare_paged``: HF builds no mask (masks are ours, per sequence)."""
    return None


def register_attention() -> None:
    """Register the attention and mask functions under ``ATTN_NAME`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, no_mask)
