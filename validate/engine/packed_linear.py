"""Linear layers on oneDNN with the weight packed once: the paged engine's float32 CPU matmuls.

A decode step of the paged engine packs one row per running sequence, so its linear layers
multiply a ``[rows, in]`` input by every weight with ``rows`` of 1 to a few dozen. On CPU,
float32 ``F.linear`` (MKL ``sgemm`` on the plain ``[out, in]`` weight) is far from the memory's
speed there. oneDNN's matmul on a weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, then ``_linear_pointwise``: what PyTorch's own
CPU inference freezing uses, and vLLM's CPU build's approach) is faster at every row count
measured (2-core AMD EPYC, torch 2.13): all 211 layers of SmolLM2-135M at 1 / 8 / 16 / 512 rows
29 / 32 / 39 / 705 ms against 50 / 62 / 74 / 879 ms (``benchmarks/linear_rows.py``). At 1-4
rows the weight-major product ``(W @ x.T).T`` is faster still (18-27 ms), so it takes those.

Invariants: only plain float32 CPU ``nn.Linear`` modules switch, and only where PyTorch has
oneDNN; the path depends on the row count alone (never on a timing); the packed weight is made
from the module's own weight at its first use and again whenever the weight changes (its
version counter), never copied or pickled; one packed copy per weight tensor, kept in a table
keyed by the tensor's identity (copies of a model that share their weights, such as
:func:`~memshare.validate.engine.twin.twin`'s, share it too; an entry whose tensor is gone or
changed is replaced); results differ from
``F.linear``'s in rounding only (another summation order; ~1e-5 relative). With the reorder
sized for 16 rows, a row's packed result did not depend on how many rows the product had
(checked at 1 to 512 rows on this machine).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

PACK_ROWS = 16  # the row count the weight's layout is chosen for (fastest at 1-512 rows here)
WEIGHT_MAJOR_MAX_ROWS = 4  # up to here ``(W @ x.T).T`` beat the packed product (1-2 rows: 1.5x)
# id(weight) -> (the weight, weakly; its version when packed; the packed weight)
_PACKED: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}


def packing_available() -> bool:
    """Whether this PyTorch has oneDNN's packed linear."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(
        torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` computed by oneDNN on a packed copy of its weight (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` to rounding: for 1..:data:`WEIGHT_MAJOR_MAX_ROWS`
        rows as ``(W @ x.T).T`` (one row padded to two: a matrix-vector product is slower),
        else on the packed weight."""
        features = x.shape[-1]
        flat = x.reshape(-1, features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        rows = flat.shape[0]
        if 0 < rows <= WEIGHT_MAJOR_MAX_ROWS:
            out = torch.mm(self.weight, (flat.repeat(2, 1) if rows == 1 else flat).T).T[:rows]
            if self.bias is not None:
                out = out + self.bias
        else:
            out = torch.ops.mkldnn._linear_pointwise(
                flat, self.packed_weight(), self.bias, "none", [], ""
            )
        return out.reshape(*x.shape[:-1], self.out_features)

    def packed_weight(self) -> torch.Tensor:
        """The weight in oneDNN's layout, packed at its first use by any module and again
        after a change (module docstring)."""
        weight = self.weight
        got = _PACKED.get(id(weight))
        if got is None or got[0]() is not weight or got[1] != weight._version:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
            key = id(weight)
            ref = weakref.ref(weight, lambda _r: _PACKED.pop(key, None))
            got = _PACKED[key] = (ref, weight._version, packed)
        return got[2]


def use_packed_linears(model: Any) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` whose weight is float32 on CPU to
    :class:`PackedLinear` (same parameters, same module object); returns how many switched.
    A model on another device or dtype, or a PyTorch without oneDNN, is left as it is."""
    if not packing_available():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            continue
        module.__class__ = PackedLinear
        switched += 1
    return switched
