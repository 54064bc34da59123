"""Linear layers that read their weights near the memory's speed when a step has few rows.

A decode step of the paged engine packs one row per running sequence, so its linear layers
multiply a ``[rows, in]`` input by every weight with ``rows`` of 1 to a handful. On CPU,
float32 ``F.linear`` (``x @ W.T``) takes a slow path there: for SmolLM2-135M's 211 linear
layers, measured on a 2-core AMD EPYC (torch 2.13, MKL), 50 ms at 1 row, 81 ms at 2 and 104 ms
at 3, where reading the 538 MB of weights once takes 10-21 ms (a 256 MiB sum reads at 25-53 GB/s
on this machine; ``memshare bench engine`` prints it).
The same product as ``(W @ x.T).T`` runs 19-31 ms for 1-5 rows and 52-72 ms for 6-8 rows, where
``F.linear`` takes 65-91 ms (one row is padded to two: a matrix-vector product is the slow path
again, and so are a broadcast or strided input).
Figures: docs/paged-kv.md ("Linear layers at a few rows").

Invariants: only float32 CPU weights change path, and only for 1..``SKINNY_MAX_ROWS`` rows; the
choice depends on the row count alone (never on a timing), so the same inputs give the same
numbers run after run. Results differ from ``F.linear``'s in rounding only (a different
summation order; ~1e-6 relative).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SKINNY_MAX_ROWS = 8  # up to here (W @ x.T) beat F.linear in every scan; at 10-14 rows not always


class SkinnyLinear(nn.Linear):
    """An ``nn.Linear`` whose few-row products take the weight-major path (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight, bias)``; for 1..``SKINNY_MAX_ROWS`` rows, ``(W @ x.T).T``."""
        features = x.shape[-1]
        rows = x.numel() // features if features else 0
        if not 0 < rows <= SKINNY_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, features)
        if rows == 1:  # W @ (one column) would be a matrix-vector product: pad to two
            flat = flat.repeat(2, 1)
        elif not flat.is_contiguous():  # a strided input takes a slow path again
            flat = flat.contiguous()
        out = torch.mm(self.weight, flat.T).T[:rows]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def use_skinny_linears(model: Any) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` whose weight is float32 on CPU to
    :class:`SkinnyLinear` (same parameters, same module object); returns how many switched.
    A model on another device or dtype is left as it is (its kernels have no such slow path
    measured)."""
    switched = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            continue
        module.__class__ = SkinnyLinear
        switched += 1
    return switched
