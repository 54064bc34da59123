"""The core JL sketch (memshare/sketch.py): determinism, shapes, padding, distances."""

from __future__ import annotations

import numpy as np
import pytest

from memshare.sketch import (
    block_vectors,
    pairwise_distances,
    projection,
    relative_distance,
    sketch_blocks,
    sketch_vectors,
    to_float32,
)


def test_projection_is_deterministic_cached_and_scaled() -> None:
    p = projection(3072, 64, 0)
    assert p.shape == (3072, 64) and p.dtype == np.float32
    assert projection(3072, 64, 0) is p  # cached
    assert not p.flags.writeable
    expected = np.random.default_rng([0, 3072, 64]).standard_normal((3072, 64)) / np.sqrt(64)
    np.testing.assert_array_equal(p, expected.astype(np.float32))
    assert not np.array_equal(projection(3072, 64, 1), p)
    # entries ~ N(0, 1/d): E ||x P||^2 = ||x||^2
    assert abs(float(p.var()) * 64 - 1.0) < 0.02


def test_projection_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        projection(0, 64)
    with pytest.raises(ValueError):
        projection(16, 64, -1)


def test_block_vectors_flatten_in_token_head_dim_order_and_zero_pad() -> None:
    kv = np.arange(2 * 5 * 3 * 4, dtype=np.float32).reshape(2, 5, 3, 4)  # L, T, H, D
    b = block_vectors(kv, 2)
    assert b.shape == (2, 3, 2 * 3 * 4)
    np.testing.assert_array_equal(b[1, 0], kv[1, 0:2].reshape(-1))
    np.testing.assert_array_equal(b[0, 2, :12], kv[0, 4].reshape(-1))
    np.testing.assert_array_equal(b[0, 2, 12:], 0.0)
    with pytest.raises(ValueError):
        block_vectors(np.zeros((4, 8)), 2)


def test_sketch_blocks_match_projection_and_exact_norms() -> None:
    rng = np.random.default_rng(1)
    kv = rng.standard_normal((3, 37, 3, 64)).astype(np.float32)  # partial last block
    sk, norms = sketch_blocks(kv, 16, 32, 5)
    assert sk.shape == (3, 3, 32) and norms.shape == (3, 3)
    vec = block_vectors(kv, 16)
    np.testing.assert_allclose(sk, vec @ projection(16 * 3 * 64, 32, 5), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(norms, np.linalg.norm(vec, axis=-1), rtol=1e-6)
    # the zero-padded partial block equals projecting only the tokens it has
    tail = kv[:, 32:].reshape(3, -1)
    p = projection(16 * 3 * 64, 32, 5)[: tail.shape[1]]
    np.testing.assert_allclose(sk[:, 2], tail @ p, rtol=1e-5, atol=1e-4)


def test_sketch_distances_follow_jl() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 3072)).astype(np.float32)
    s, _ = sketch_vectors(x, 64, 0)
    iu = np.triu_indices(200, 1)
    ratio = pairwise_distances(s)[iu] / pairwise_distances(x)[iu]
    sigma = 1 / np.sqrt(2 * 64)
    assert abs(float(np.median(ratio)) - 1.0) < 0.03
    assert float(np.mean(np.abs(ratio - 1) < 4 * sigma)) > 0.999


def test_relative_distance_and_pairwise() -> None:
    x = np.array([[3.0, 4.0], [1.0, 0.0]])
    c = np.array([[3.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(relative_distance(x, c), [4 / 5, 0.0])
    np.testing.assert_allclose(relative_distance(x, c, x_norm=[10.0, 1.0]), [0.4, 0.0])
    a = np.random.default_rng(3).standard_normal((5, 7))
    brute = np.linalg.norm(a[:, None] - a[None], axis=-1)
    np.testing.assert_allclose(pairwise_distances(a), brute, atol=1e-9)
    assert np.isinf(relative_distance([0.0, 0.0], [1.0, 0.0]))


def test_to_float32_equals_numpys_cast_bit_for_bit() -> None:
    every = np.arange(65536, dtype=np.uint16).view(np.float16)  # all halves, inf/NaN too
    finite = every[np.isfinite(every)]
    for a in (every, finite, finite[::-1].reshape(-1, 62)[:, 3:40], np.zeros(0, np.float16)):
        got = to_float32(a)
        assert got.dtype == np.float32 and got.shape == a.shape
        assert np.array_equal(got.view(np.uint32), a.astype(np.float32).view(np.uint32))
    x = np.arange(6, dtype=np.float32)
    assert to_float32(x) is x  # float32 stays as it is
    assert to_float32(x.astype(np.float64)).dtype == np.float32
