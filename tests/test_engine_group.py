"""Engines in one forward pass (memshare.validate.engine.group) decide and compute what each
engine decides and computes alone: same steps, pages and shares, the same logits up to the
floating-point order of a larger matrix product.

A tiny seeded random-weight Llama (helpers_models), real registry policies, teacher-forced
texts with repeated blocks (so ``exact-dedup`` shares) and a loose ``cf-topk`` (so a lossy
policy shares too).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from helpers_models import tiny_model

torch = pytest.importorskip("torch")

from memshare.block_pool import BlockPool  # noqa: E402
from memshare.registry import make_policy  # noqa: E402
from memshare.validate.engine.group import EngineGroup  # noqa: E402
from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine  # noqa: E402

BS = 8
POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("exact-dedup", {}),
    ("cf-topk", {"granularity": "layer", "share": "k", "tau": 1.5, "window": 1}),
]


def specs() -> list[EngineSpec]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i, n in enumerate((72, 57, 80)):
        block = torch.randint(3, 256, (BS,), generator=g).tolist()
        rest = torch.randint(3, 256, (n - 3 * BS,), generator=g).tolist()
        ids = block * 3 + rest  # three equal blocks, then fresh tokens
        steps = list(range(0, n, 2 * BS))  # reasoning steps of two blocks
        out.append(EngineSpec(f"t{i}", ids, 1, steps=steps, forced=[ids[-1]]))
    return out


def opts() -> EngineOptions:
    return EngineOptions(block_size=BS, kv_blocks=40, teacher_forced=True)


def build(model: Any, name: str, params: dict[str, Any], store: Any = None) -> PagedEngine:
    return PagedEngine(
        model, make_policy(name, **params), specs(), opts(), eos_ids=frozenset(), store=store
    )


def sink(into: dict[tuple[str, int], Any]) -> Any:
    def keep(rid: str, pos: int, logits: Any) -> None:
        into[(rid, pos)] = logits.clone()

    return keep


def facts(e: PagedEngine) -> tuple[Any, ...]:
    steps = [(s.seqs, s.tokens, s.computed, s.live_pages, s.used_pages) for s in e.steps]
    shares = [(s.request, s.block, s.source_request, s.source_block, s.layers) for s in e.shares]
    return steps, shares, dict(e.manager.stats.request_pages_shared)


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model("llama")


def test_one_pass_equals_each_engine_alone(model: Any) -> None:
    alone, alone_logits = [], []
    for name, params in POLICIES:
        eng = build(copy.deepcopy(model), name, params)
        got: dict[tuple[str, int], Any] = {}
        eng.logits_sink = sink(got)
        eng.run()
        alone.append(eng)
        alone_logits.append(got)
    shared_model = copy.deepcopy(model)
    pages = BlockPool(num_blocks=40, num_layers=3).num_pages
    group = EngineGroup(shared_model, [pages] * len(POLICIES), BS)
    together = [
        build(shared_model, name, params, store)
        for (name, params), store in zip(POLICIES, group.stores, strict=True)
    ]
    together_logits: list[dict[tuple[str, int], Any]] = [{} for _ in POLICIES]
    for eng, got in zip(together, together_logits, strict=True):
        eng.logits_sink = sink(got)
    group.attach(together)
    while any(group.step()):
        pass
    assert group.passes == max(len(e.steps) for e in alone)
    for a, b, la, lb in zip(alone, together, alone_logits, together_logits, strict=True):
        assert facts(a) == facts(b)
        assert la.keys() == lb.keys()
        for key in la:
            torch.testing.assert_close(la[key], lb[key], rtol=1e-4, atol=1e-4)
    assert len(alone[1].shares) > 0 and len(alone[2].shares) > 0  # both policies shared
    assert facts(alone[1])[1] != facts(alone[2])[1]  # and decided differently
    # the parts hold what each engine wrote: the arena is their pages side by side
    for eng, store in zip(together, group.stores, strict=True):
        assert eng.store is store
        assert (
            store.data.data_ptr() == group.arena.data[group.offsets[together.index(eng)]].data_ptr()
        )


def test_attach_checks_the_stores(model: Any) -> None:
    shared_model = copy.deepcopy(model)
    pages = BlockPool(num_blocks=40, num_layers=3).num_pages
    group = EngineGroup(shared_model, [pages, pages], BS)
    own = build(shared_model, "none", {})  # its own store, not the group's
    on_part = build(shared_model, "none", {}, group.stores[0])
    with pytest.raises(ValueError, match="store 1"):
        group.attach([on_part, own])
    with pytest.raises(ValueError, match="2 stores"):
        group.attach([on_part])
    with pytest.raises(ValueError, match="needs"):  # a part of the wrong size
        build(shared_model, "none", {}, group.arena.part(0, pages - 1))
