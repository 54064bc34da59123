"""KVShare's reuse executed for real: matched prompt spans are copied, not computed.

Request A runs first; request B holds a passage of A's tokens at other positions after a
different context. ``kvshare`` matches the passage's windows in A's cached blocks, and the
engine copies those tokens' K/V (every layer, pre-RoPE, so they are attended at B's positions)
and computes only the rest. Checked against an independent replay on plain transformers: B's
prompt run with a ``DynamicCache`` where each reused run of positions gets A's keys rotated
from A's position to B's (post-RoPE keys compose: R(q) k = R(q - p) R(p) k) and A's values,
and every other position is computed. Nothing of the engine is used by the replay.
"""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # engine runs and HF replays on the real model

from memshare.registry import make_policy  # noqa: E402
from memshare.scheduler import SchedulerConfig  # noqa: E402
from memshare.validate.engine.paged_engine import (  # noqa: E402
    EngineOptions,
    EngineSpec,
    PagedEngine,
)
from memshare.validate.engine.records import ReuseRecord  # noqa: E402

if TYPE_CHECKING:
    from memshare.traces.capture.hf import HFBackend

TOL = 2e-3  # the fp32 tolerance of the engine-vs-HF checks (test_paged_model.py)
BS = 16


def prompts(gsm8k_prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """A: a GSM8K prompt. B: another prompt with 48 of A's question tokens spliced in at a
    position that is not A's (shifted by 5 against the block grid)."""
    a, other = gsm8k_prompts[0], gsm8k_prompts[1]
    passage = a[40:88]
    b = other[:45] + passage + other[45:]
    return a, b


def run(
    model: Any, policy: Any, a: list[int], b: list[int]
) -> tuple[PagedEngine, Any, dict[tuple[str, int], Any]]:
    """A then B (one sequence at a time, so A's blocks are cached when B arrives)."""
    got: dict[tuple[str, int], Any] = {}
    engine = PagedEngine(
        copy.deepcopy(model),
        policy,
        [EngineSpec("a", a, 12), EngineSpec("b", b, 6)],
        EngineOptions(scheduler=SchedulerConfig(max_num_seqs=1)),
        eos_ids=frozenset(),
        logits_sink=lambda rid, pos, lg: got.__setitem__((rid, pos), lg[0].clone()),
    )
    tables: dict[str, Any] = {}
    while engine.step():
        for rid in ("a", "b"):
            if rid in engine.manager.requests:
                tables[rid] = engine.manager.page_table(rid).copy()
    return engine, tables, got


def post_rope_kv(model: Any, tokens: list[int]) -> Any:
    """Plain HF: the DynamicCache of ``tokens`` (post-RoPE keys, values), one pass."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True)
    return cache


def replay(model: Any, a_tokens: list[int], b: list[int], reuses: list[ReuseRecord]) -> Any:
    """B's last-position logits with the reused runs' KV taken from A (see module doc)."""
    from transformers import DynamicCache

    attn = model.model.layers[0].self_attn
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    src = post_rope_kv(model, a_tokens)
    cache = DynamicCache(config=model.config)
    spans = {r.position: r for r in reuses}
    logits = None
    p = 0
    with torch.inference_mode():
        while p < len(b):
            r = spans.get(p)
            if r is not None:
                delta = torch.full((1, r.length), r.position - r.source_position)
                cos, sin = model.model.rotary_emb(src.layers[0].keys, position_ids=delta)
                s = slice(r.source_position, r.source_position + r.length)
                for layer, lay in enumerate(src.layers):
                    k = lay.keys[:, :, s].clone()
                    cache.update(rope(k, k, cos, sin)[1], lay.values[:, :, s].clone(), layer)
                p += r.length
                continue
            end = min([q for q in spans if q > p] + [len(b)])
            out = model(
                input_ids=torch.tensor([b[p:end]]),
                position_ids=torch.arange(p, end)[None],
                cache=cache,
                use_cache=True,
            )
            logits = out.logits[0, -1].float()
            p = end
    return logits


def test_kvshare_copies_matched_spans_and_computes_the_rest(
    hf_backend: HFBackend, gsm8k_prompts: list[list[int]]
) -> None:
    model = hf_backend.model
    a, b = prompts(gsm8k_prompts)
    engine, tables, got = run(model, make_policy("kvshare", window=8, recompute=0.15), a, b)
    reuses = engine.reuses
    assert reuses and all(r.request == "b" and r.source_request == "a" for r in reuses)
    reused = sum(r.length for r in reuses)
    assert 30 <= reused <= 48  # most of the 48-token passage (15% of matches recomputed)
    assert engine.manager.stats.reused_tokens == reused
    steps = engine.steps
    assert sum(s.tokens - s.computed for s in steps) == reused  # copied, not computed
    store = engine.store
    for r in reuses:  # the copies: A's rows of the same tokens, bit for bit, every layer
        assert (
            b[r.position : r.position + r.length]
            == (engine.requests[0].token_ids or [])[
                r.source_position : r.source_position + r.length
            ]
        )
        for j in range(r.length):
            pa, pb = r.source_position + j, r.position + j
            rows_a = tables["a"][pa // BS] * BS + pa % BS  # (L, 2) flat rows
            rows_b = tables["b"][pb // BS] * BS + pb % BS
            assert torch.equal(store.flat[rows_a.reshape(-1)], store.flat[rows_b.reshape(-1)])
    assert engine.pool.pinned_pages == 0  # sources released once copied, requests done
    # B's first sampled token's logits equal the independent replay's ...
    a_tokens = engine.requests[0].token_ids or []
    last = (("b", len(b) - 1),)
    mine = got[last[0]]
    ref = replay(model, a_tokens, b, reuses)
    diff = float((mine - ref).abs().max())
    # ... and differ from B computed in full: the reuse is lossy, and the loss is real
    plain = replay(model, a_tokens, b, [])
    effect = float((mine - plain).abs().max())
    print(f"reused {reused} of {len(b)}; engine vs replay {diff:.3g}, vs computed {effect:.3g}")
    assert diff < TOL
    assert effect > 10 * TOL


def test_kvshare_recomputing_every_match_is_exactly_none(
    hf_backend: HFBackend, gsm8k_prompts: list[list[int]]
) -> None:
    """recompute=1: nothing is copied, so outputs, logits and pages are `none`'s (plus
    prefix hits, which are exact)."""
    model = hf_backend.model
    a, b = prompts(gsm8k_prompts)
    full, _, got_full = run(model, make_policy("kvshare", window=8, recompute=1.0), a, b)
    base, _, got_base = run(model, make_policy("prefix"), a, b)
    assert not full.reuses and full.manager.stats.matched_tokens > 40
    assert [r.output_ids for r in full.requests] == [r.output_ids for r in base.requests]
    assert got_full.keys() == got_base.keys()
    assert max(float((got_full[k] - got_base[k]).abs().max()) for k in got_full) == 0.0
    assert [s.used_pages for s in full.steps] == [s.used_pages for s in base.steps]
