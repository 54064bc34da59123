"""PageStore and step planning of the paged KV engine (no model; design: docs/paged-kv.md)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from memshare.validate.engine.batch import SeqChunk, check_layer_map, plan_step  # noqa: E402
from memshare.validate.engine.store import PageStore  # noqa: E402


def test_rows_roundtrip_and_sizes() -> None:
    store = PageStore(6, 4, 2, 3, dtype=torch.float32)
    assert store.page_bytes == 4 * 2 * 3 * 4
    assert store.nbytes == 6 * store.page_bytes == store.data.numel() * 4
    vals = torch.arange(3 * 2 * 3, dtype=torch.float32).view(3, 2, 3) + 1
    store.write_rows([5, 0, 5], [3, 0, 1], vals)
    assert torch.equal(store.gather_rows([0, 5, 5], [0, 1, 3]), vals[[1, 2, 0]])
    assert torch.equal(store.data[5, 3], vals[0])
    assert torch.count_nonzero(store.data[1:5]) == 0  # nothing else touched
    with pytest.raises(ValueError):
        store.rows([0], [4])  # offset past the block


def test_a_part_is_a_view_of_its_arena_pages() -> None:
    arena = PageStore(10, 4, 2, 3, dtype=torch.float32)
    part = arena.part(6, 3)
    assert (part.num_pages, part.block_size, part.num_kv_heads, part.head_dim) == (3, 4, 2, 3)
    vals = torch.ones(1, 2, 3)
    part.write_rows([2], [1], vals * 7)  # page 2 of the part is page 8 of the arena
    assert torch.equal(arena.data[8, 1], vals[0] * 7)
    assert torch.count_nonzero(arena.data) == 6
    arena.write_rows([6], [0], vals * 5)  # and back: arena page 6 is the part's page 0
    assert torch.equal(part.gather_rows([0], [0]), vals * 5)
    assert part.nbytes == 3 * arena.page_bytes
    for first, n in ((-1, 2), (8, 3), (0, 0)):
        with pytest.raises(ValueError, match="not within"):
            arena.part(first, n)


def test_block_kv_and_exact_distance() -> None:
    store = PageStore(8, 2, 1, 2, dtype=torch.float32)
    store.data[0] = 1.0
    store.data[1] = 2.0
    store.data[2] = 1.0
    store.data[3] = 3.0
    a = np.array([[0, 1]])  # one layer: K page 0, V page 1
    b = np.array([[2, 1]])
    c = np.array([[3, 0]])
    kv = store.block_kv_numpy(a)
    assert kv.shape == (1, 2, 2, 1, 2) and kv.dtype == np.float32
    assert np.all(kv[0, 0] == 1.0) and np.all(kv[0, 1] == 2.0)
    np.testing.assert_allclose(store.exact_distance(a, b), [[0.0, 0.0]])
    np.testing.assert_allclose(store.exact_distance(a, c), [[2.0, 0.5]])  # |1-3|/1, |2-1|/2
    assert np.isinf(store.exact_distance(np.array([[4, 4]]), a)).all()  # zero a


def test_plan_rows_masks_and_layer_map() -> None:
    b, layers = 4, 2
    table = np.arange(3 * layers * 2).reshape(3, layers, 2)  # page ids 0..11
    lm = check_layer_map([0, 0], layers)
    chunks = [
        SeqChunk([1, 2, 3], 5, table, all_logits=True),  # positions 5..7
        SeqChunk([9], 2, table[:1]),  # a decode at position 2
        SeqChunk([8], 6, table[:2]),  # a decode at position 6
    ]
    plan = plan_step(
        chunks, num_layers=layers, block_size=b, num_pages=12, layer_map=lm, device="cpu"
    )
    assert plan.position_ids.tolist() == [[5, 6, 7, 2, 6]]
    assert plan.writes == [True, False]
    # position 5 -> block 1, offset 1; page table[1, l, kv]
    assert plan.write_rows[0, 0, 0] == table[1, 0, 0] * b + 1
    assert plan.write_rows[0, 1, 3] == table[0, 0, 1] * b + 2
    assert plan.keep.tolist() == [0, 1, 2, 3, 4]
    assert plan.outputs == [(0, 3, True), (3, 4, False), (4, 5, False)]
    # layer 1 reads layer 0's column
    (dec,) = plan.groups  # the two one-token chunks: one decode group
    assert dec.tok.tolist() == [[3], [4]] and dec.mask is not None
    assert torch.equal(dec.rows[1], dec.rows[0])
    assert dec.mask[:, 0, 0].tolist() == [[True] * 3 + [False] * 4, [True] * 7]
    (ch,) = plan.chunks
    assert ch.ctx == 8 and ch.mask is not None
    assert ch.mask[0, 0].sum(dim=1).tolist() == [6, 7, 8]  # causal, offset by start
    with pytest.raises(ValueError):
        plan_step(
            [SeqChunk([1], 4, table[:1])],
            num_layers=layers,
            block_size=b,
            num_pages=12,
            layer_map=lm,
            device="cpu",
        )  # table too short
    with pytest.raises(ValueError):
        check_layer_map([1, 1], layers)  # maps to a later layer
