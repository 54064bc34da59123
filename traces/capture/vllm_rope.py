"""Pre-RoPE keys from vLLM's cache: each layer's cached keys un-rotated by its own rotary module.

vLLM caches keys after its rotary embedding. Each attention module holds the rotary module it
applied (``self_attn.rotary_emb``): a table ``cos_sin_cache[pos] = [cos | sin]`` (half the
rotary dimension each; any scaling the model's RoPE variant applies, YaRN's
``attention_scaling`` included, is already in the table) and one rotation, the same for every
variant whose class keeps vLLM's ``RotaryEmbedding.forward_static``: each pair ``(x1, x2)``
(halves, or even and odd lanes when not neox-style) of the first ``rotary_dim`` lanes becomes
``(x1 c - x2 s, x2 c + x1 s)``. Its inverse is the same rotation with ``(c, -s) / (c^2 + s^2)``,
so keys are un-rotated by that very function with that table (:func:`inverse_table`),
in float64: exact up to float32 rounding whatever the variant, with no second implementation
of RoPE. Keys are un-rotated at the positions they were written at: every request of the KV
pass starts at position 0, so token ``t`` sits at position ``t``.

Rotary modules of another form (multimodal M-RoPE, per-request offsets, ...) are refused in one
line (:func:`rotary_modules`); and at start-up :func:`check_round_trip` rotates the un-rotated
keys of a probe prompt back with each layer's own module and requires the cached keys again.

For a model that normalises keys before rotation (Qwen3's ``k_norm``), the un-rotated key is
the normalised one, as the HF backend records it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.errors import InputError

ROUND_TRIP_TOLERANCE = 1e-5  # relative error of rotate(unrotate(k)) against k, fp32 keys


def _refuse(problem: str) -> InputError:
    return InputError(
        "--backend vllm",
        problem,
        "capture with --keys post_rope, or use --backend hf for pre-RoPE keys",
    )


def rotary_modules(model: Any, attention_names: Sequence[str]) -> list[Any]:
    """Each attention layer's rotary module (the ``rotary_emb`` beside the layer named
    ``...self_attn.attn``), in layer order; a one-line error if one has none or one whose
    rotation is not vLLM's plain ``RotaryEmbedding.forward_static``."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    found = []
    for name in attention_names:
        parent = name.rsplit(".", 1)[0]
        rot = getattr(model.get_submodule(parent), "rotary_emb", None)
        if rot is None:
            raise _refuse(f"{parent} has no rotary embedding to un-rotate its cached keys with")
        if not isinstance(rot, RotaryEmbedding) or (
            type(rot).forward_static is not RotaryEmbedding.forward_static
        ):
            raise _refuse(
                f"{parent}'s rotary embedding ({type(rot).__name__}) is not one memshare can "
                "invert (only vLLM's RotaryEmbedding and its table-only variants)"
            )
        found.append(rot)
    return found


def inverse_table(rot: Any) -> Any:
    """``rot``'s ``cos_sin_cache`` for the inverse rotation, float64: ``[c | -s] / (c^2 + s^2)``."""
    import torch

    cos, sin = rot.cos_sin_cache.to(torch.float64).chunk(2, dim=-1)
    norm = cos * cos + sin * sin
    return torch.cat((cos / norm, -sin / norm), dim=-1)


def _rotate(rot: Any, table: Any, k: Any) -> Any:
    """``k`` (tokens, kv_heads, head_dim) rotated by ``rot``'s function with ``table``, token
    ``t`` at position ``t``."""
    import torch
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    pos = torch.arange(k.shape[0], dtype=torch.long)
    out, _ = RotaryEmbedding.forward_static(
        pos, k, None, rot.head_size, rot.rotary_dim, table, rot.is_neox_style
    )
    return out


class Unroper:
    """Un-rotates cached keys layer by layer (see the module docstring); tables made once."""

    def __init__(self, model: Any, attention_names: Sequence[str]) -> None:
        self.rotary = rotary_modules(model, attention_names)
        self.tables = [inverse_table(r) for r in self.rotary]

    def __call__(self, k_rope: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Pre-RoPE keys of ``k_rope`` ``(layers, tokens, kv_heads, head_dim)``, same shape,
        float32."""
        import torch

        limit = min(int(t.shape[0]) for t in self.tables)
        if k_rope.shape[1] > limit:
            raise _refuse(f"{k_rope.shape[1]} tokens exceed the rotary table's {limit} positions")
        out = np.empty_like(k_rope)
        for layer, (rot, table) in enumerate(zip(self.rotary, self.tables, strict=True)):
            k = torch.from_numpy(k_rope[layer]).to(torch.float64)
            out[layer] = _rotate(rot, table, k).to(torch.float32).numpy()
        return out

    def check_round_trip(self, k_rope: npt.NDArray[np.float32]) -> float:
        """Rotate :meth:`__call__`'s keys back with each layer's own table and compare with
        ``k_rope``: the largest relative error over layers; a one-line error above
        :data:`ROUND_TRIP_TOLERANCE`."""
        import torch

        pre = self(k_rope)
        worst = 0.0
        for layer, rot in enumerate(self.rotary):
            table = rot.cos_sin_cache.to(torch.float64)
            back = _rotate(rot, table, torch.from_numpy(pre[layer]).to(torch.float64)).numpy()
            ref = k_rope[layer].astype(np.float64)
            err = float(np.abs(back - ref).max() / max(float(np.abs(ref).max()), 1e-30))
            worst = max(worst, err)
        if worst > ROUND_TRIP_TOLERANCE:
            raise _refuse(
                f"un-rotating the cached keys and rotating them back is off by {worst:.2g} "
                f"(relative; allowed {ROUND_TRIP_TOLERANCE:g})"
            )
        return worst
