"""The paged KV engine's model side: batched varlen forward passes of an HF causal LM whose KV
lives in a :class:`~memshare.validate.engine.store.PageStore` (design: ``docs/paged-kv.md``).

Only attention's KV storage and lookup are ours. Embeddings, norms, projections, the rotary
tables (the model's ``rotary_emb`` and its modeling module's ``apply_rotary_pos_emb``), MLPs and
the LM head are the HF model's own modules, run by the HF model's own ``forward``. The engine
hooks in through supported interfaces only:

* forward hooks on each layer's ``self_attn.k_norm`` (architectures that normalise keys, e.g.
  Qwen3) or ``self_attn.k_proj``, and on ``self_attn.v_proj``, capture the step's pre-RoPE K/V
  (registered at the first step);
* the attention function ``memshare_paged`` (``transformers.AttentionInterface``) and a mask
  function that returns ``None`` (``AttentionMaskInterface``), selected with
  ``set_attn_implementation``; the forward runs with ``use_cache=False`` so HF keeps no cache.

The engine owns its model object: the constructor switches its attention implementation and
its float32 CPU linear layers to :class:`~memshare.validate.engine.packed_linear.PackedLinear`
(the same product on oneDNN with the weight packed once, faster at every row count), the first
step registers hooks,
and nothing is restored (``close()`` removes the hooks only). Pass a copy when the same model
must also run plain HF code.

Supported: Llama-family (Llama, SmolLM2), Qwen2 and Qwen3 layouts in transformers 5.x, full
attention only (no sliding-window layers). Everything runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from memshare.validate.engine.attention import (
    ATTN_NAME,
    STATE_KWARG,
    PagedStep,
    register_attention,
    rope_half_tables,
    rope_is_half_form,
)
from memshare.validate.engine.batch import BatchPlan, SeqChunk, check_layer_map, plan_step
from memshare.validate.engine.malloc import fix_mmap_threshold
from memshare.validate.engine.packed_linear import use_packed_linears
from memshare.validate.engine.rotated import RotatedKeys, rotated_cache
from memshare.validate.engine.store import PageStore

__all__ = ["PagedModel", "SeqChunk"]


class PagedModel:
    """One HF causal LM driven step by step over paged KV.

    ``layer_map[l]`` (KVSharer cross-layer sharing): the owner layer whose pages layer ``l``
    reads; ``layer_map[l] != l`` layers write nothing. ``None`` = every layer owns its pages.
    ``rotated_keys``: keep a rotated-key cache beside the store
    (:class:`~memshare.validate.engine.rotated.RotatedKeys`, as large as the pages, made at
    the first step where the device holds it), so keys read where they were written are not
    rotated again; False: every read rotates its keys from the pages (the same keys, bit for
    bit). Only this model's steps may write the store's pages while the cache is kept.
    """

    def __init__(
        self,
        hf_model: Any,
        store: PageStore,
        *,
        layer_map: npt.ArrayLike | None = None,
        rotated_keys: bool = True,
    ) -> None:
        base = getattr(hf_model, "model", None)
        layers = getattr(base, "layers", None)
        rotary = getattr(base, "rotary_emb", None)
        if layers is None or rotary is None:
            raise ValueError(
                f"unsupported model {type(hf_model).__name__}: needs model.layers and "
                "model.rotary_emb (Llama / Qwen2 / Qwen3 layout)"
            )
        attns = [layer.self_attn for layer in layers]
        if not all(hasattr(a, "k_proj") and hasattr(a, "v_proj") for a in attns):
            raise ValueError("every attention module needs k_proj and v_proj")
        if any(getattr(a, "sliding_window", None) for a in attns):
            raise ValueError("sliding-window attention layers are not supported")
        cfg = hf_model.config
        self._num_layers = len(attns)
        self._num_heads = int(cfg.num_attention_heads)
        self._num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self._num_heads)
        self._head_dim = int(attns[0].head_dim)
        if (store.num_kv_heads, store.head_dim) != (self._num_kv_heads, self._head_dim):
            raise ValueError(
                f"store pages hold ({store.num_kv_heads}, {store.head_dim}) heads x dim, "
                f"the model needs ({self._num_kv_heads}, {self._head_dim})"
            )
        param = next(hf_model.parameters())
        if torch.device(store.device) != param.device:
            raise ValueError(f"store on {store.device}, model on {param.device}")
        self.model = hf_model.eval()
        fix_mmap_threshold()  # freed step buffers go back to the system (malloc.py)
        use_packed_linears(hf_model)  # oneDNN on packed weights (CPU, float32)
        self.store = store
        self.layer_map = check_layer_map(layer_map, self._num_layers)
        self._rotary = rotary
        self._apply_rope = sys.modules[type(attns[0]).__module__].apply_rotary_pos_emb
        self._half_form = rope_is_half_form(self._apply_rope, self._head_dim)
        self._dummy = torch.empty(0, dtype=param.dtype, device=param.device)
        self.keys_from = "k_norm" if all(hasattr(a, "k_norm") for a in attns) else "k_proj"
        self._new_k: list[Any] = [None] * self._num_layers
        self._new_v: list[Any] = [None] * self._num_layers
        self._attns = attns
        self._handles: list[Any] = []  # the forward hooks, registered by the first step
        self._want_rotated = rotated_keys
        self.rotated: RotatedKeys | None = None  # the cache, made by the first step
        register_attention()
        hf_model.set_attn_implementation(ATTN_NAME)
        if hf_model.config._attn_implementation != ATTN_NAME:
            raise RuntimeError(f"{type(hf_model).__name__} refused attention {ATTN_NAME!r}")

    @staticmethod
    def _capture(slot: list[Any], layer: int) -> Any:
        def hook(_module: Any, _inp: Any, out: Any) -> None:
            slot[layer] = out

        return hook

    def _hook(self) -> None:
        """Capture each layer's pre-RoPE K and V (registered once, at the first step, so a
        model that only reads its store, as an engine in a shared pass does, adds none)."""
        for i, a in enumerate(self._attns):
            k_mod = a.k_norm if self.keys_from == "k_norm" else a.k_proj
            self._handles.append(k_mod.register_forward_hook(self._capture(self._new_k, i)))
            self._handles.append(a.v_proj.register_forward_hook(self._capture(self._new_v, i)))

    def close(self) -> None:
        """Remove the forward hooks (the attention implementation stays switched)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- facts ---------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Decoder layers (``L`` of a block table entry)."""
        return self._num_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer."""
        return self._num_kv_heads

    @property
    def head_dim(self) -> int:
        """Size of one head."""
        return self._head_dim

    @property
    def block_size(self) -> int:
        """Tokens per page (the store's)."""
        return int(self.store.block_size)

    # -- running -------------------------------------------------------------------------

    def step(self, chunks: Sequence[SeqChunk]) -> list[torch.Tensor]:
        """One forward pass over all ``chunks`` packed in one row.

        Writes each chunk's new K/V into its pages and returns, per chunk, float32 logits:
        ``[n, vocab]`` when ``all_logits`` else ``[vocab]`` (the last position). Within a step
        a sequence may read pages another sequence writes (write-before-read per layer); two
        chunks must not write the same token slot in one step.
        """
        if not self._handles:
            self._hook()
        with torch.inference_mode():
            if self._want_rotated and self.rotated is None:
                self.rotated = rotated_cache(self.store)
            try:
                return self._step(chunks)
            except BaseException:
                self.rotated = None  # its positions may promise keys never written
                raise

    def _step(self, chunks: Sequence[SeqChunk]) -> list[torch.Tensor]:
        """:meth:`step`'s plan and forward pass (inference mode, hooks registered)."""
        plan = plan_step(
            chunks,
            num_layers=self._num_layers,
            block_size=self.store.block_size,
            num_pages=self.store.num_pages,
            layer_map=self.layer_map,
            device=self.store.device,
            rotated=self.rotated,
        )
        if plan.input_ids.shape[1] == 0:  # only copies (every chunk fully reused)
            return self._copies_only(plan)
        positions = torch.arange(plan.max_ctx, device=self.store.device)[None]
        plan.cos, plan.sin = self._rotary(self._dummy, position_ids=positions)
        half = rope_half_tables(plan.cos, plan.sin, self._num_kv_heads) if self._half_form else None
        state = PagedStep(
            plan, self.store, self._new_k, self._new_v, self._apply_rope, half, self.rotated
        )
        try:
            out = self.model(
                input_ids=plan.input_ids,
                position_ids=plan.position_ids,
                use_cache=False,
                logits_to_keep=plan.keep,
                **{STATE_KWARG: state},
            )
        finally:
            self._new_k[:] = [None] * self._num_layers
            self._new_v[:] = [None] * self._num_layers
        logits = out.logits[0].float()
        return [logits[a:b] if full else logits[a] for a, b, full in plan.outputs]

    def _copies_only(self, plan: BatchPlan) -> list[torch.Tensor]:
        """A step with no token to compute: do its copies, return empty logits."""
        if plan.copy_src is not None and plan.copy_dst is not None:
            for layer in np.flatnonzero(plan.writes).tolist():
                self.store.copy_flat(
                    plan.copy_src[layer].reshape(-1), plan.copy_dst[layer].reshape(-1)
                )
                if self.rotated is not None:
                    src, dst = plan.copy_src[layer, 0], plan.copy_dst[layer, 0]
                    self.rotated.flat.index_copy_(0, dst, self.rotated.flat.index_select(0, src))
        vocab = int(self.model.get_output_embeddings().out_features)
        empty = torch.empty((0, vocab), device=self.store.device)
        return [empty for _ in plan.outputs]

    # -- reading the live KV ---------------------------------------------------------------
