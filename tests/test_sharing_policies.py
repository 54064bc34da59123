"""Sharing policies on hand-built sketches where the right decision is known."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from memshare.block_pool import BlockPool
from memshare.hashing import chain_hashes
from memshare.kv_manager import KVCacheManager
from memshare.policy import FullBlock, RequestInfo
from memshare.registry import make_policy

BS, L, D = 4, 3, 8


@dataclass
class Chain:
    """A hand-built request: per block its tokens, step, K/V sketches and norms."""

    tokens: np.ndarray  # (n_blocks, BS)
    steps: list[int]
    sketch: np.ndarray  # (n_blocks, L, 2, D)
    norm: np.ndarray  # (n_blocks, L, 2)

    def info(self, req_id: str, prompt_len: int = BS) -> RequestInfo:
        flat = self.tokens.ravel()
        return RequestInfo(req_id, prompt_len, BS, chain_hashes(flat, BS))

    def block(self, req_id: str, i: int) -> FullBlock:
        h = chain_hashes(self.tokens.ravel(), BS)[i]
        return FullBlock(req_id, i, h, self.tokens[i], self.steps[i], self.sketch[i], self.norm[i])


def make_chain(noise: float, seed: int = 0) -> Chain:
    """Steps 0..3 of two blocks each; step 2 repeats step 1's tokens, its KV at ``noise``
    relative distance from step 1's; every other block is far from everything."""
    rng = np.random.default_rng(seed)
    n = 8
    tokens = rng.integers(100, 10_000, size=(n, BS))
    tokens[4:6] = tokens[2:4]
    sketch = rng.standard_normal((n, L, 2, D)).astype(np.float32)
    norm = np.linalg.norm(sketch, axis=-1)
    direction = rng.standard_normal((2, L, 2, D)).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    sketch[4:6] = sketch[2:4] + noise * norm[2:4, ..., None] * direction
    norm[4:6] = norm[2:4]
    return Chain(tokens, [0, 0, 1, 1, 2, 2, 3, 3], sketch, norm)


def run(policy_name: str, chain: Chain, **params: object) -> tuple[KVCacheManager, BlockPool]:
    pool = BlockPool(num_blocks=64, num_layers=L)
    mgr = KVCacheManager(pool, make_policy(policy_name, **params), BS)
    assert mgr.admit(chain.info("r"), BS, lambda i: chain.block("r", i)) is not None
    mgr.commit("r")  # after the step that wrote the block: the policy decides now
    for _ in range(len(chain.steps) - 1):
        assert mgr.allocate_slots("r", BS)
        mgr.commit("r")
    pool.check(mgr.table_refs())
    return mgr, pool


def test_cf_topk_shares_the_repeated_step_within_tau() -> None:
    mgr, pool = run("cf-topk", make_chain(noise=0.05), tau=0.1, window=1)
    table = mgr.requests["r"].table
    assert table[4] is table[2] and table[5] is table[3]  # zero copy: same physical blocks
    assert mgr.stats.shared_blocks == 2
    assert mgr.stats.shared_distance_sum / mgr.stats.shared_distance_n == pytest.approx(
        0.05, abs=0.01
    )
    assert pool.used_pages == (8 - 2) * 2 * L


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_cf_topk_compares_with_the_content_a_shared_block_holds(granularity: str) -> None:
    # step 2 (B) is 0.08 from step 1 (A) and shares it; step 3 (C) is 0.08 from B's own
    # KV but 0.16 from A's, which is what B's entries hold now: C must not share (no drift)
    chain = make_chain(noise=0.08)
    chain.tokens[6:8] = chain.tokens[2:4]
    chain.sketch[6:8] = chain.sketch[4:6] + (chain.sketch[4:6] - chain.sketch[2:4])
    chain.norm[6:8] = chain.norm[2:4]
    mgr, pool = run("cf-topk", chain, tau=0.1, window=0, granularity=granularity)
    table = mgr.requests["r"].table
    assert np.array_equal(table[4].pages, table[2].pages)  # B holds A
    assert not np.any(np.isin(table[6].pages, table[2].pages))  # C keeps its own KV
    assert not np.any(np.isin(table[7].pages, table[3].pages))
    assert pool.used_pages == (8 - 2) * 2 * L
    # the same C, 0.08 from A itself, is shared
    chain.sketch[6:8] = chain.sketch[4:6]
    mgr, _ = run("cf-topk", chain, tau=0.1, window=0, granularity=granularity)
    assert np.array_equal(mgr.requests["r"].table[6].pages, mgr.requests["r"].table[2].pages)


def test_cf_topk_never_shares_beyond_tau() -> None:
    mgr, pool = run("cf-topk", make_chain(noise=0.3), tau=0.2, window=1)
    assert mgr.stats.shared_blocks == 0 and mgr.stats.pages_shared == 0
    assert pool.used_pages == 8 * 2 * L


def test_cf_topk_window_blocks_are_never_shared() -> None:
    # window=3: blocks 5.. are within the last 3 when the chain ends, block 4 leaves it
    mgr, _ = run("cf-topk", make_chain(noise=0.05), tau=0.1, window=3)
    table = mgr.requests["r"].table
    assert table[4] is table[2]
    assert table[5] is not table[3]
    mgr2, _ = run("cf-topk", make_chain(noise=0.05), tau=0.1, window=4)
    assert mgr2.stats.shared_blocks == 0


def test_cf_topk_never_shares_the_sink_block() -> None:
    chain = make_chain(noise=0.0)
    chain.tokens[1] = chain.tokens[0]  # block 1 repeats block 0 exactly, same step
    chain.steps[1] = 1
    chain.steps[2:4] = [2, 2]
    chain.sketch[1] = chain.sketch[0]
    chain.norm[1] = chain.norm[0]
    mgr, _ = run("cf-topk", chain, tau=0.5, window=0)
    assert mgr.requests["r"].table[1] is not mgr.requests["r"].table[0]


def test_cf_topk_keys_only_per_layer() -> None:
    chain = make_chain(noise=0.05)
    chain.sketch[4, :, 1] += 10.0  # values far apart, keys close
    mgr, pool = run("cf-topk", chain, tau=0.1, window=1, share="k", granularity="layer")
    table = mgr.requests["r"].table
    assert np.array_equal(table[4].pages[:, 0], table[2].pages[:, 0])
    assert not np.any(np.isin(table[4].pages[:, 1], table[2].pages[:, 1]))
    assert pool.used_pages == 8 * 2 * L - 2 * L  # blocks 4 and 5 each dropped L key pages


def test_cf_topk_min_layers_fraction() -> None:
    chain = make_chain(noise=0.05)
    chain.sketch[4, 0] += 10.0  # layer 0 of block 4 is far
    mgr, _ = run("cf-topk", chain, tau=0.1, window=1, min_layers=1.0)
    assert mgr.requests["r"].table[4] is not mgr.requests["r"].table[2]
    mgr, _ = run("cf-topk", chain, tau=0.1, window=1, min_layers=0.6)
    assert mgr.requests["r"].table[4] is mgr.requests["r"].table[2]


def test_exact_dedup_shares_only_identical_pages() -> None:
    chain = make_chain(noise=0.0)
    chain.sketch[5, 1:] += 1.0  # block 5: only layer 0 stays identical to block 3
    mgr, pool = run("exact-dedup", chain)
    table = mgr.requests["r"].table
    assert np.array_equal(table[4].pages, table[2].pages)  # every page identical
    assert np.array_equal(table[5].pages[0], table[3].pages[0])
    assert not np.any(np.isin(table[5].pages[1:], table[3].pages))
    assert pool.used_pages == 8 * 2 * L - 2 * L - 2


def test_token_dedup_shares_token_identical_blocks_even_if_kv_differs() -> None:
    mgr, _ = run("token-dedup", make_chain(noise=0.9))
    table = mgr.requests["r"].table
    assert table[4] is table[2] and table[5] is table[3]


def test_shared_block_keeps_its_data_until_the_last_reference() -> None:
    chain = make_chain(noise=0.05)
    pool = BlockPool(num_blocks=64, num_layers=L)
    mgr = KVCacheManager(pool, make_policy("token-dedup"), BS)
    mgr.admit(chain.info("a", BS * 4), BS * 4, lambda i: chain.block("a", i))
    mgr.commit("a")
    mgr.admit(chain.info("b", BS * 4), BS * 4, lambda i: chain.block("b", i))
    assert mgr.requests["b"].table[1] is not mgr.requests["a"].table[1]  # reserved: own pages
    mgr.commit("b")
    a, b = mgr.requests["a"].table, mgr.requests["b"].table
    assert b[1] is a[1] and b[1].ref_cnt == 2  # b's block 1 points at a's
    mgr.free("a")
    assert b[1].ref_cnt == 1 and pool.holders[b[1].distinct].min() == 1
    pool.check(mgr.table_refs())
    mgr.free("b")
    assert pool.used_pages == 0
    pool.check({})


def test_unknown_parameter_is_an_input_error() -> None:
    from memshare.errors import InputError

    with pytest.raises(InputError, match="--set"):
        make_policy("cf-topk", nope=1)
    with pytest.raises(InputError, match="granularity"):
        make_policy("cf-topk", granularity="page")


def test_settings_are_typed_by_the_policy_fields() -> None:
    from memshare.errors import InputError
    from memshare.registry import coerce_params, parse_settings

    raw = parse_settings(["tau=0.3", "k=2", "granularity=layer"])
    params = coerce_params("cf-topk", raw)
    assert params == {"tau": 0.3, "k": 2, "granularity": "layer"}
    assert make_policy("cf-topk", **params).tau == 0.3  # type: ignore[attr-defined]
    with pytest.raises(InputError, match="no parameter 'x'"):
        coerce_params("cf-topk", {"x": "1"})
    with pytest.raises(InputError, match="cf-topk k=a is not an integer; give 1 <= k <= "):
        coerce_params("cf-topk", {"k": "a"})
    with pytest.raises(InputError, match="key=value"):
        parse_settings(["tau"])
    with pytest.raises(InputError, match="unknown policy"):
        coerce_params("nope", {})


def test_kvshare_matches_spans_at_other_positions_and_recomputes_a_share() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(100, 10_000, size=4 * BS)
    b = np.concatenate([rng.integers(100, 10_000, size=BS), a[BS : 3 * BS], [7, 7, 7, 7]])
    pool = BlockPool(num_blocks=32, num_layers=L)
    policy = make_policy("kvshare", window=4, recompute=0.25)
    mgr = KVCacheManager(pool, policy, BS)

    def info(rid: str, toks: np.ndarray) -> RequestInfo:
        return RequestInfo(rid, len(toks), BS, chain_hashes(toks, BS), prompt_ids=toks)

    mgr.admit(
        info("a", a),
        len(a),
        lambda i: FullBlock("a", i, chain_hashes(a, BS)[i], a[i * 4 : i * 4 + 4]),
    )
    mgr.free("a")  # a's blocks stay cached (published), so their spans stay reusable
    hit = mgr.admit(info("b", b), len(b))
    assert hit is not None
    assert hit.num_tokens == 0 and not hit.blocks  # b's first block is new: no prefix
    assert hit.matched_tokens == 2 * BS  # a's blocks 1 and 2, now at positions 4..11
    assert hit.reused_tokens == 2 * BS - 2  # 25% of 8 matched tokens recomputed
    # two runs (a's block 1 at 4..7, block 2 at 8..11); each run's first token is recomputed
    a1, a2 = (pool.cached_block(chain_hashes(a, BS)[i]) for i in (1, 2))
    assert [(sp.start, sp.length, sp.source, sp.offset) for sp in hit.spans] == [
        (5, 3, a1, 1),
        (9, 3, a2, 1),
    ]
    assert a1 is not None and a2 is not None and a1.ref_cnt == a2.ref_cnt == 1  # held
    pool.check(mgr.table_refs())
    pool.evict_all_cached()
    mgr.free("b")
    pool.evict_all_cached()
    again = make_policy("kvshare", window=4).lookup_prefix(info("c", b), pool)
    assert again.matched_tokens == 0  # evicted blocks' spans are gone


def test_prefix_plus_cf_topk_hits_prompts_and_shares_reasoning() -> None:
    chain = make_chain(noise=0.05)
    pool = BlockPool(num_blocks=64, num_layers=L)
    mgr = KVCacheManager(pool, make_policy("prefix+cf-topk", tau=0.1, window=1), BS)
    prompt = 2 * BS  # blocks 0-1 are the prompt, 2-7 are "generated"
    mgr.admit(chain.info("a", prompt), prompt, lambda i: chain.block("a", i))
    mgr.commit("a")
    for _ in range(6):
        assert mgr.allocate_slots("a", BS)
        mgr.commit("a")
    table = mgr.requests["a"].table
    assert table[4] is table[2] and table[5] is table[3]  # the sharer acted on output blocks
    assert table[0].block_hash is not None and table[2].block_hash is None
    hit = mgr.admit(chain.info("b", prompt), prompt, lambda i: chain.block("b", i))
    # block-aligned prompt: the hit stops one block short (vLLM recomputes the last block)
    assert hit is not None and hit.num_tokens == prompt - BS and len(hit.blocks) == 1
    pool.check(mgr.table_refs())


def test_kvsharer_layer_map_charges_l_minus_s_over_l(tmp_path: Path) -> None:
    from memshare.errors import InputError
    from memshare.policy import policy_layer_map

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"layer_map": [0, 1, 1, 3]}))  # layer 2 reuses layer 1
    policy = make_policy("prefix+kvsharer", layer_map_file=str(path))
    lm = policy_layer_map(policy, 4)
    assert lm is not None and lm.tolist() == [0, 1, 1, 3]
    pool = BlockPool(num_blocks=8, num_layers=4, layer_map=lm)
    mgr = KVCacheManager(pool, policy, BS)
    mgr.admit(RequestInfo("a", 3 * BS, BS, ()), 3 * BS)
    assert pool.used_pages == 3 * 2 * (4 - 1)  # each block costs (L - S) / L of 2L pages
    with pytest.raises(ValueError, match="has 4 layers"):
        policy_layer_map(policy, 30)
    path.write_text(json.dumps({"layer_map": [0, 2, 1]}))
    with pytest.raises(InputError, match=r"map\.json"):
        make_policy("kvsharer", layer_map_file=str(path))
