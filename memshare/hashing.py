"""Chained block hashes over token ids (vLLM v1 prefix-caching identity).

Invariant: ``hash_i = H(hash_{i-1}, tokens of block i)``, so two blocks share a hash only if
their whole prefixes are equal (up to a 64-bit collision). Only full blocks are hashed. The
hash is blake2b, stable across processes and Python versions (no ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_ROOT = b"memshare-v1"


def block_hash(parent: int | None, token_ids: Sequence[int] | np.ndarray) -> int:
    """Hash of one full block given its parent block's hash (``None`` for the first block)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(_ROOT if parent is None else parent.to_bytes(8, "little", signed=False))
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return int.from_bytes(h.digest(), "little", signed=False)


def chain_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids`` (a partial tail is not hashed)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tokens = np.asarray(token_ids, dtype="<i8")
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes
