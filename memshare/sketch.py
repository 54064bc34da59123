"""KV block sketches: a seeded Johnson-Lindenstrauss projection, and distances between blocks.

One function, :func:`sketch_blocks`, turns blocks of K (or V) into sketches. ``capture``
calls it on a model's KV while it writes a trace; the simulator reads the stored sketches;
``validate`` calls it on live KV. Because all three use this function with the trace's
:class:`~memshare.traces.schema.SketchSpec` (dimension, seed), a sketch computed in one place
equals the sketch computed in another for the same KV.

Definitions (docs/traces.md, "Sketches"):

- A *block* of one layer's K (or V) is ``block_size`` consecutive tokens, each ``kv_heads x
  head_dim`` numbers, flattened in (token, head, dim) order to a vector ``x`` of ``D =
  block_size * kv_heads * head_dim`` numbers. A partial last block is padded with zero
  tokens, which is the same as projecting only the tokens it has.
- The sketch is ``x @ P`` with ``P`` a ``D x d`` matrix of independent standard Gaussians
  scaled by ``1/sqrt(d)``, so ``E ||x @ P||^2 = ||x||^2`` and distances between sketches
  approximate distances between blocks (relative error about ``sqrt(2/d)``).
- ``P`` depends only on ``(seed, D, d)``: :func:`projection` draws it from
  ``numpy.random.default_rng([seed, D, d])`` (PCG64, float64 normals rounded to float32),
  which is stable across platforms and numpy versions that keep ``default_rng``'s stream.
- Every sketch comes with the Frobenius norm of the unprojected block, so relative distances
  ``||x - c|| / ||x||`` can be formed from sketches (:func:`relative_distance`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

# d = 256: with d = 64 (the first default) 32-55% of the shares cf-topk confirmed were farther
# than 1.1 tau on the live KV, with d = 256 under 4% (docs/validate.md, "Sketch vs exact")
DEFAULT_DIM = 256
DEFAULT_SEED = 0


@lru_cache(maxsize=16)
def _projection(input_dim: int, dim: int, seed: int) -> FloatArray:
    rng = np.random.default_rng([seed, input_dim, dim])
    p = rng.standard_normal((input_dim, dim)) / np.sqrt(dim)
    out: FloatArray = p.astype(np.float32)
    out.flags.writeable = False
    return out


def projection(input_dim: int, dim: int = DEFAULT_DIM, seed: int = DEFAULT_SEED) -> FloatArray:
    """The ``input_dim x dim`` JL matrix for ``seed`` (cached, read-only, float32)."""
    if input_dim < 1 or dim < 1:
        raise ValueError(f"input_dim and dim must be >= 1, got {input_dim} and {dim}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return _projection(int(input_dim), int(dim), int(seed))


def block_vectors(kv: npt.ArrayLike, block_size: int) -> FloatArray:
    """Cut token-level KV into flattened blocks.

    ``kv`` has shape ``(..., tokens, kv_heads, head_dim)``; the result has shape
    ``(..., blocks, block_size * kv_heads * head_dim)`` with ``blocks = ceil(tokens /
    block_size)``, each block flattened in (token, head, dim) order; the last block is
    zero-padded.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    a = np.asarray(kv, dtype=np.float32)
    if a.ndim < 3:
        raise ValueError(f"kv must be (..., tokens, kv_heads, head_dim), got shape {a.shape}")
    a = a.reshape(*a.shape[:-2], a.shape[-2] * a.shape[-1])
    tokens, width = a.shape[-2], a.shape[-1]
    blocks = -(-tokens // block_size)
    pad = blocks * block_size - tokens
    if pad:
        widths = [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, 0)]
        a = np.pad(a, widths)
    return np.ascontiguousarray(a.reshape(*a.shape[:-2], blocks, block_size * width))


def sketch_vectors(
    x: npt.ArrayLike, dim: int = DEFAULT_DIM, seed: int = DEFAULT_SEED
) -> tuple[FloatArray, FloatArray]:
    """Sketch and norm of each row of ``x`` (shape ``(..., D)``): ``(x @ P, ||x||)``.

    Returns float32 arrays of shapes ``(..., dim)`` and ``(...)``. Rows are projected in one
    matrix product, so a batch of blocks costs one BLAS call.
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim < 1 or a.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last axis, got shape {a.shape}")
    p = projection(a.shape[-1], dim, seed)
    flat = a.reshape(-1, a.shape[-1])
    sketches = (flat @ p).reshape(*a.shape[:-1], dim)
    norms = np.sqrt(np.einsum("ij,ij->i", flat, flat, dtype=np.float64)).astype(np.float32)
    return sketches.astype(np.float32, copy=False), norms.reshape(a.shape[:-1])


def sketch_blocks(
    kv: npt.ArrayLike,
    block_size: int,
    dim: int = DEFAULT_DIM,
    seed: int = DEFAULT_SEED,
) -> tuple[FloatArray, FloatArray]:
    """Sketch every block of token-level KV: the one function capture and validate share.

    ``kv``: ``(..., tokens, kv_heads, head_dim)``, e.g. ``(layers, tokens, heads, dim)`` for
    one request's keys. Returns ``(sketches, norms)`` of shapes ``(..., blocks, dim)`` and
    ``(..., blocks)``, float32 (a trace stores sketches as float16).
    """
    return sketch_vectors(block_vectors(kv, block_size), dim, seed)


def relative_distance(
    x: npt.ArrayLike, c: npt.ArrayLike, x_norm: npt.ArrayLike | None = None
) -> npt.NDArray[np.float64]:
    """``||x - c|| / ||x||`` over the last axis (broadcasting).

    With sketches, pass the stored block norm as ``x_norm``: the numerator is then estimated
    from the sketches and the denominator is exact. Without ``x_norm`` the norm of ``x``
    itself is used. A zero norm gives ``inf`` (or ``nan`` for ``x == c == 0``).
    """
    xa = np.asarray(x, dtype=np.float64)
    ca = np.asarray(c, dtype=np.float64)
    diff = np.linalg.norm(xa - ca, axis=-1)
    norm = np.linalg.norm(xa, axis=-1) if x_norm is None else np.asarray(x_norm, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out: npt.NDArray[np.float64] = diff / norm
    return out


# float16 -> float32 by integer operations: the half's sign and its exponent and mantissa
# bits shifted into place give a float32 of value half * 2**-112 (normal and subnormal halves
# alike), and scaling by 2**112 is exact
_HALF_BITS = np.array([0x8FFFE000], dtype=np.uint32).view(np.int32)[0]  # sign, exp, mantissa
_HALF_SCALE = np.float32(2.0**112)
_HALF_EXP = 0x7C00  # an all-ones half exponent: inf or NaN


def to_float32(a: np.ndarray) -> FloatArray:
    """``a`` as float32, exactly; may share memory with ``a`` if it is float32 already.

    numpy widens float16 one value at a time (about 2 ns each); for float16 input with no
    inf or NaN this does it in four vectorised integer passes and an exact scaling (2-3x
    faster), bit for bit the same values as ``a.astype(np.float32)``.
    """
    if a.dtype != np.float16:
        return np.asarray(a, dtype=np.float32)
    half = a.view(np.int16)
    if int(np.max(half & 0x7FFF, initial=0)) >= _HALF_EXP:
        return a.astype(np.float32)  # inf or NaN: numpy's cast keeps their bits
    bits = half.astype(np.int32)  # sign-extended: bits 16-31 copy the sign
    bits <<= 13  # exponent and mantissa into float32's places, the sign into bits 28-31
    bits &= _HALF_BITS  # keep the sign bit, clear bits 28-30
    out: FloatArray = bits.view(np.float32)
    out *= _HALF_SCALE
    return out


def pairwise_distances(a: npt.ArrayLike, b: npt.ArrayLike | None = None) -> npt.NDArray[Any]:
    """Euclidean distances between the rows of ``a`` (``n x k``) and of ``b`` (``m x k``).

    ``b`` defaults to ``a``. Computed in float64 from the Gram matrix, clipped at zero.
    """
    x = np.asarray(a, dtype=np.float64)
    y = x if b is None else np.asarray(b, dtype=np.float64)
    sq = (x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :] - 2.0 * (x @ y.T)
    dist: npt.NDArray[Any] = np.sqrt(np.maximum(sq, 0.0))
    return dist
