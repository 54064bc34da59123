"""Synthesized token ids for workload traces (validate/runs/tokens.py): the scaling rule,
the invariants of its docstring, and the prefix hit rate surviving the scaling on the real
Mooncake trace, measured with the project's own prefix policy over chained token hashes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from memshare.block_pool import BlockPool
from memshare.errors import InputError
from memshare.hashing import chain_hashes
from memshare.kv_manager import KVCacheManager, blocks_for_all
from memshare.policies.prefix import PrefixCaching
from memshare.policy import RequestInfo
from memshare.traces.importers import import_workload
from memshare.traces.reader import TraceReader
from memshare.traces.schema import Manifest, RequestRecord
from memshare.validate.runs.tokens import (
    SynthRequest,
    hash_block_tokens,
    synthesize_tokens,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORKLOADS = DATA / "workloads"
MOONCAKE = WORKLOADS / "mooncake_synthetic_trace.jsonl"
AZURE = WORKLOADS / "azure_llm_2023_conv.csv"
needs_data = pytest.mark.skipif(not WORKLOADS.is_dir(), reason=f"no shared data at {WORKLOADS}")

H = 512  # Mooncake's hash block size
VOCAB = 49152  # SmolLM2's
SPECIAL = frozenset(range(17)) | {VOCAB - 1}  # stand-ins for a tokenizer's special ids


def rec(rid: str, prompt: int, output: int = 8, ids: list[int] | None = None) -> RequestRecord:
    return RequestRecord(
        id=rid, arrival_s=float(len(rid)), prompt_len=prompt, output_len=output, hash_ids=ids
    )


def synth(records: Sequence[RequestRecord], **kw: object) -> list[SynthRequest]:
    opts: dict[str, object] = {
        "length_scale": 0.05,
        "block_size": 16,
        "vocab_size": VOCAB,
        "excluded_ids": SPECIAL,
        "seed": 0,
        "hash_block_size": H,
    }
    opts.update(kw)
    return synthesize_tokens(records, **opts)  # type: ignore[arg-type]


def rnd(num: int, den: int) -> int:
    """floor(num / den + 1/2), the documented rounding, in integers."""
    return (2 * num + den) // (2 * den)


def expected_prompt_len(prompt_len: int, t: int) -> int:
    """The documented rule for a hashed request: L' = f * T + t'."""
    full, tail = divmod(prompt_len, H)
    return full * t + (max(1, rnd(tail * t, H)) if tail else 0)


# --- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "block", "tokens"),
    [
        (0.05, 16, 32),  # 1.6 engine blocks -> 2
        (1.0, 16, 512),
        (0.5, 16, 256),
        (0.001, 16, 16),  # never below one engine block
        (0.046875, 16, 32),  # 1.5 -> 2: halves round up
        (0.078125, 16, 48),  # 2.5 -> 3 (Python's round would give 2)
        (0.05, 7, 28),  # 3.66 -> 4 blocks of 7: need not divide 512
        (1.0, 1, 512),
    ],
)
def test_hash_block_is_whole_engine_blocks(scale: float, block: int, tokens: int) -> None:
    assert hash_block_tokens(scale, block, H) == tokens
    assert tokens % block == 0 and tokens >= block


def test_hashed_prompt_follows_the_rule_and_shares_tokens_by_hash_id() -> None:
    t = 32
    records = [
        rec("a", 3 * H + 224, 6, [1, 2, 3, 4]),  # 3 full + a partial of 224 -> 14 tokens
        rec("b", 2 * H, 100, [1, 2]),  # exactly 2 hash blocks: no partial
        rec("c", H + 5, 0, [1, 9]),  # partial of 5 tokens -> 0.3125 -> kept at 1
        rec("d", 2 * H + 500, 40, [1, 2, 7]),  # partial of 500 -> 31.25 -> 31
        rec("e", 20, 3, [11]),  # only a partial block: 1.25 -> 1 token
    ]
    out = synth(records)
    assert [o.rid for o in out] == [r.id for r in records]
    lens = [len(o.prompt_ids) for o in out]
    assert lens == [3 * t + 14, 2 * t, t + 1, 2 * t + 31, 1]
    assert lens == [expected_prompt_len(r.prompt_len, t) for r in records]
    # output scaled by the effective scale T / H = 1/16, at least 1
    assert [o.max_tokens for o in out] == [1, 6, 1, 3, 1]
    assert [o.arrival_s for o in out] == [r.arrival_s for r in records]  # not scaled
    assert [(o.source_prompt_len, o.source_output_len) for o in out] == [
        (r.prompt_len, r.output_len) for r in records
    ]

    def block(o: SynthRequest, i: int) -> list[int]:
        return o.prompt_ids[i * t : (i + 1) * t]

    a, b, c, d, _ = out
    # same hash id -> same tokens at every occurrence, whatever its position in the call
    assert block(a, 0) == block(b, 0) == block(c, 0) == block(d, 0)
    assert block(a, 1) == block(b, 1) == block(d, 1)
    # a partial occurrence is a prefix of the hash id's block
    assert c.prompt_ids[t:] == synth([rec("x", 2 * H, 1, [5, 9])])[0].prompt_ids[t : t + 1]
    # different hash ids -> different blocks
    assert block(a, 2) != block(d, 2)[: len(block(a, 2))]
    blocks = {tuple(block(o, i)[:16]) for o in (a, d) for i in range(3)}
    assert len(blocks) == 4  # ids 1, 2, 3, 7


def test_hash_ids_of_the_wrong_count() -> None:
    # too many ids: those past the prompt's hash blocks are ignored
    many = synth([rec("m", H + 100, 8, [1, 2, 3, 4])])[0]
    assert len(many.prompt_ids) == expected_prompt_len(H + 100, 32)
    assert many.prompt_ids == synth([rec("m2", H + 100, 8, [1, 2])])[0].prompt_ids
    # too few: the hash blocks past the last id are the request's own tokens
    few, other = synth([rec("f", 3 * H, 8, [1]), rec("g", 3 * H, 8, [1])])
    assert len(few.prompt_ids) == 96
    assert few.prompt_ids[:32] == other.prompt_ids[:32]
    assert few.prompt_ids[32:48] != other.prompt_ids[32:48]


def test_requests_without_hash_ids_are_unique_and_scaled() -> None:
    records = [rec(f"r{k}", 1000 + k, 200, None) for k in range(50)]
    records += [rec("tiny", 3, 0, None), rec("empty-ids", 400, 5, [])]
    out = synth(records, length_scale=0.1)
    assert [len(o.prompt_ids) for o in out[:50]] == [rnd(1000 + k, 10) for k in range(50)]
    assert [o.max_tokens for o in out[:50]] == [20] * 50
    assert (len(out[50].prompt_ids), out[50].max_tokens) == (1, 1)  # 0.3 -> at least 1
    assert (len(out[51].prompt_ids), out[51].max_tokens) == (40, 1)  # 0.5 -> 1 (half up)
    firsts = {tuple(o.prompt_ids[:16]) for o in out if len(o.prompt_ids) >= 16}
    assert len(firsts) == 51  # no accidental sharing: every first block differs
    assert _token_hits(out, 16) == (0, sum(len(o.prompt_ids) // 16 for o in out))


def test_deterministic_and_independent_of_the_other_requests() -> None:
    records = [rec(f"q{k}", 700 + 300 * k, 9, [0, k + 1, k + 100]) for k in range(6)]
    records.append(rec("plain", 900, 9))
    once, twice = synth(records), synth(records)
    assert once == twice
    # a request's tokens derive from (seed, hash ids) and (seed, request id) only
    alone = synth([records[3], records[6]])
    assert alone == [once[3], once[6]]
    other_seed = synth(records, seed=1)
    assert all(o.prompt_ids != p.prompt_ids for o, p in zip(once, other_seed, strict=True))


def test_token_ids_are_in_the_vocabulary_and_never_special() -> None:
    records = [rec(f"v{k}", 5000, 9, list(range(k, k + 10))) for k in range(20)]
    records += [rec(f"w{k}", 5000, 9) for k in range(20)]
    vocab, special = 300, set(range(0, 300, 3))
    out = synth(records, vocab_size=vocab, excluded_ids=special | {5000, -1})
    ids = np.concatenate([np.asarray(o.prompt_ids) for o in out])
    assert ids.min() >= 0 and ids.max() < vocab
    assert not set(ids.tolist()) & special
    assert set(ids.tolist()) == set(range(vocab)) - special  # drawn from all usable ids


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "option"),
    [
        ({"length_scale": 0.0}, "--length-scale"),
        ({"length_scale": -0.5}, "--length-scale"),
        ({"length_scale": 1.01}, "--length-scale"),
        ({"length_scale": math.nan}, "--length-scale"),
        ({"length_scale": math.inf}, "--length-scale"),
        ({"length_scale": True}, "--length-scale"),
        ({"block_size": 0}, "--block-size"),
        ({"block_size": -16}, "--block-size"),
        ({"vocab_size": 0}, "--model"),
        ({"vocab_size": 1}, "--model"),
        ({"vocab_size": 18, "excluded_ids": range(17)}, "--model"),  # 1 usable id
        ({"hash_block_size": None}, "manifest.json"),
        ({"hash_block_size": 0}, "manifest.json"),
    ],
)
def test_bad_options_name_the_option(kw: dict[str, object], option: str) -> None:
    records = [rec(f"b{k}", 4000, 9, [k, 100 + k]) for k in range(40)]
    with pytest.raises(InputError) as err:
        synth(records, **kw)
    assert err.value.where == option
    assert str(err.value).startswith(option)


def test_a_vocabulary_too_small_for_distinct_blocks_is_refused() -> None:
    # 2 usable ids and blocks of 4 tokens: 16 possible first blocks for 40 hash ids
    records = [rec(f"s{k}", 2 * H, 9, [k, 1000 + k]) for k in range(20)]
    with pytest.raises(InputError, match="the same first 4 tokens") as err:
        synth(records, vocab_size=4, excluded_ids={0, 3}, block_size=4)
    assert err.value.where == "--model"


def test_other_bad_records() -> None:
    with pytest.raises(InputError, match="occurs twice"):
        synth([rec("a", 10), rec("a", 20)])
    kv = RequestRecord(id="k", arrival_s=0.0, prompt_len=2, output_len=1, prompt_ids=[1, 2])
    with pytest.raises(InputError, match="already has token ids"):
        synth([kv])


# --- the property that matters: the prefix hit rate survives the scaling ----------------------


def _token_hits(reqs: Sequence[SynthRequest], block: int) -> tuple[int, int]:
    """(cached, prompt) engine blocks with the project's prefix policy and an unlimited pool,
    each request seeing every earlier one (one client in arrival order, as the simulator's
    closed:1), over chained token-block hashes; cross-checked against a plain set of seen
    hashes. ``cached`` counts the longest run of a prompt's blocks found in the pool when it
    arrives: what is cached, before the lookup leaves out a block-aligned prompt's last block
    to recompute its last token (vLLM's rule, tested in test_block_pool.py)."""
    pool = BlockPool(num_blocks=blocks_for_all((len(r.prompt_ids) for r in reqs), block))
    mgr = KVCacheManager(pool, PrefixCaching(), block)
    seen: set[int] = set()
    plain = cached = 0
    for r in reqs:
        hashes = chain_hashes(r.prompt_ids, block)
        info = RequestInfo(
            req_id=r.rid,
            prompt_len=len(r.prompt_ids),
            block_size=block,
            block_hashes=hashes,
            prompt_ids=np.asarray(r.prompt_ids, dtype=np.int64),
        )
        run = next((i for i, h in enumerate(hashes) if pool.cached_block(h) is None), len(hashes))
        cached += run
        hit = mgr.admit(info, len(r.prompt_ids))
        assert hit is not None and len(hit.blocks) == min(run, (len(r.prompt_ids) - 1) // block)
        mgr.free(r.rid)
        plain += sum(h in seen for h in hashes)
        seen.update(hashes)
    assert pool.stats.evicted_blocks == 0
    assert plain == cached  # chained: any seen block = the cached prefix
    return cached, mgr.stats.prompt_blocks


def _hash_hits(records: Sequence[RequestRecord], t: int, block: int) -> tuple[int, int, int]:
    """From the hash ids alone, in scaled engine blocks: (hits, exact, blocks).

    A request's i-th hash block counts ``T / B`` engine blocks, its partial last one
    ``t' // B``. ``hits``: those of every hash id seen before (any earlier request). ``exact``:
    what chained token blocks can hit: of a hash id seen before only as many engine blocks as
    an earlier occurrence held in full, and nothing past the first hash block held short.
    ``hits - exact`` is the partial-last-block shortfall (see docs/workload-tokens.md)."""
    cover: dict[int, int] = {}  # hash id -> most full engine blocks any occurrence held
    hits = exact = blocks = 0
    for r in records:
        assert r.hash_ids
        full, tail = divmod(r.prompt_len, H)
        sizes = [t // block] * full + ([max(1, rnd(tail * t, H)) // block] if tail else [])
        ids = r.hash_ids[: len(sizes)]
        assert len(ids) == len(sizes)  # the Mooncake file has ceil(L / 512) ids per row
        blocks += sum(sizes)
        hits += sum(k for h, k in zip(ids, sizes, strict=True) if h in cover)
        for h, k in zip(ids, sizes, strict=True):
            got = min(k, cover.get(h, 0))
            exact += got
            if got < k:
                break
        for h, k in zip(ids, sizes, strict=True):
            cover[h] = max(cover.get(h, 0), k)
    return hits, exact, blocks


def test_partial_last_blocks_are_the_only_gap() -> None:
    # Hash id 2 first occurs as a partial last block of 20 tokens (1 engine block of 16 at
    # T = 32), then in full (2 engine blocks): the second request can hit only the one engine
    # block the first held, and nothing after it. From the hash ids alone both would count.
    records = [
        rec("p1", H + 320, 1, [1, 2]),  # 320 -> 20 tokens: 1 full engine block of id 2
        rec("p2", 3 * H, 1, [1, 2, 3]),
        rec("p3", 3 * H + 100, 1, [1, 2, 3, 4]),
    ]
    out = synth(records)
    hits, exact, blocks = _hash_hits(records, 32, 16)
    assert (hits, exact, blocks) == (0 + 4 + 6, 0 + 3 + 6, 3 + 6 + 6)
    assert _token_hits(out, 16) == (exact, blocks)
    assert hits - exact == 1  # p2's second engine block of id 2


# Measured on the first 200 Mooncake requests at --length-scale 0.05, block size 16 (T = 32):
# 643 of 10,326 prompt engine blocks hit (6.23%), from the tokens and from the hash ids alike.
# (Unscaled, counting each hash id as one block, partial or not: 323 of 5,330, 6.06%.)
FIRST_200_HITS, FIRST_200_BLOCKS, FIRST_200_RATE = 643, 10326, 6.23


@pytest.fixture(scope="module")
def mooncake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, list[RequestRecord]]:
    path = tmp_path_factory.mktemp("wl") / "mooncake"
    import_workload("mooncake", MOONCAKE, path)
    with TraceReader(path) as reader:
        return reader.manifest, reader.records()


@needs_data
def test_mooncake_prefix_hit_rate_survives_the_scaling(
    mooncake: tuple[Manifest, list[RequestRecord]],
) -> None:
    manifest, records = mooncake
    first = records[:200]
    out = synthesize_tokens(
        first,
        length_scale=0.05,
        block_size=16,
        vocab_size=VOCAB,
        excluded_ids=SPECIAL,
        seed=0,
        hash_block_size=manifest.hash_block_size,
    )
    t = hash_block_tokens(0.05, 16, H)
    assert t == 32
    assert [len(o.prompt_ids) for o in out] == [expected_prompt_len(r.prompt_len, t) for r in first]
    token_hits, token_blocks = _token_hits(out, 16)
    hits, exact, blocks = _hash_hits(first, t, 16)
    # Same denominator: a request's full engine blocks are its scaled hash blocks' ones.
    assert token_blocks == blocks
    # In these 200 requests every hash id holds the same number of tokens at each occurrence
    # (no partial last block recurs as a full or longer one), so the partial-block shortfall
    # is 0 and the rates agree exactly.
    assert exact == hits
    assert token_hits == hits
    assert (token_hits, token_blocks) == (FIRST_200_HITS, FIRST_200_BLOCKS)
    assert round(100 * token_hits / token_blocks, 2) == FIRST_200_RATE


@needs_data
def test_mooncake_whole_trace_no_collision_and_the_same_hit_rate(
    mooncake: tuple[Manifest, list[RequestRecord]],
) -> None:
    manifest, records = mooncake
    out = synth(records, hash_block_size=manifest.hash_block_size)
    # All 3,993 requests: 155,578 of 237,444 engine blocks hit (65.52%), both ways.
    hits, exact, blocks = _hash_hits(records, 32, 16)
    assert _token_hits(out, 16) == (hits, blocks) == (155578, 237444)
    assert exact == hits
    t = 32
    tokens: dict[int, list[int]] = {}
    for r, o in zip(records, out, strict=True):
        assert r.hash_ids is not None
        for i, h in enumerate(r.hash_ids):
            got = o.prompt_ids[i * t : (i + 1) * t]
            known = tokens.setdefault(h, got)
            n = min(len(got), len(known))
            assert got[:n] == known[:n]  # the same tokens at every occurrence
            if len(got) > len(known):
                tokens[h] = got
    # distinct hash ids -> distinct first engine blocks (of those holding one in full)
    whole = [b for b in tokens.values() if len(b) >= 16]
    assert len({tuple(b[:16]) for b in whole}) == len(whole) > 0.9 * len(tokens)
    ids = np.concatenate([np.asarray(o.prompt_ids) for o in out])
    assert ids.min() >= 0 and ids.max() < VOCAB and not set(np.unique(ids).tolist()) & SPECIAL


@needs_data
def test_azure_requests_share_nothing(tmp_path: Path) -> None:
    import_workload("azure", AZURE, tmp_path / "az", limit=200)
    with TraceReader(tmp_path / "az") as reader:
        manifest, records = reader.manifest, reader.records()
    assert manifest.hash_block_size is None
    out = synth(records, hash_block_size=None)
    assert [len(o.prompt_ids) for o in out] == [max(1, rnd(r.prompt_len, 20)) for r in records]
    hits, blocks = _token_hits(out, 16)
    assert hits == 0 and blocks > 0
