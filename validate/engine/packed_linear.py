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
version counter), never copied or pickled (a deep copy packs its own); results differ from
``F.linear``'s in rounding only (another summation order; ~1e-5 relative). With the reorder
sized for 16 rows, a row's packed result did not depend on how many rows the product had
(checked at 1 to 512 rows on this machine).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PACK_ROWS = 16  # the row count the weight's layout is chosen for (fastest at 1-512 rows here)
WEIGHT_MAJOR_MAX_ROWS = 4  # up to here ``(W @ x.T).T`` beat the packed product (1-2 rows: 1.5x)


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
        """The weight in oneDNN's layout, packed at first use and again after a change."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version)
        packed = self.__dict__.get("_onednn_weight")
        if packed is None or packed[0] != key:
            w = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
            packed = self.__dict__["_onednn_weight"] = (key, w)
        out: torch.Tensor = packed[1]
        return out

    def __getstate__(self) -> dict[str, Any]:
        """The module's state without the packed weight (a oneDNN tensor cannot be copied)."""
        state = dict(self.__dict__)
        state.pop("_onednn_weight", None)
        return state


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
