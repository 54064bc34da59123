"""The rotated-key cache (memshare.validate.engine.rotated) gives the keys a re-rotating read
gives, bit for bit: unshared reads, blocks shared at another position, copied spans.

No mocks: tiny seeded random-weight models and the default model run twice on the same steps,
once keeping keys rotated at write (the default) and once rotating every key at every read
(``rotated_keys=False``, the engine's earlier path); their logits must be equal. Design:
docs/paged-kv.md ("Rotation once, at write").
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers_models import tiny_model  # noqa: E402
from helpers_policies import FixedShares  # noqa: E402

from memshare.registry import make_policy  # noqa: E402
from memshare.validate.engine.model import PagedModel, SeqChunk  # noqa: E402
from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine  # noqa: E402
from memshare.validate.engine.store import PageStore  # noqa: E402

if TYPE_CHECKING:
    from memshare.traces.capture.hf import HFBackend


def pair(model: Any, block_size: int, num_pages: int) -> tuple[PagedModel, PagedModel]:
    """The same model twice (deep copies): with the rotated-key cache and without."""
    out = []
    for cached in (True, False):
        own = copy.deepcopy(model)
        store = PageStore.for_model(own, num_pages, block_size)
        out.append(PagedModel(own, store, rotated_keys=cached))
    return out[0], out[1]


def both(models: tuple[PagedModel, PagedModel], chunks: Sequence[SeqChunk]) -> list[Any]:
    """One step on both models; their logits must be equal to the bit."""
    cached, rerotated = (m.step(chunks) for m in models)
    for a, b in zip(cached, rerotated, strict=True):
        assert torch.equal(a, b), float((a - b).abs().max())
    return cached


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_cache_equals_rerotation_unshared_and_shared_at_an_offset(kind: str) -> None:
    """Prefill, a block shared at another position (written at 12, read at 4, in the step that
    writes it), chunked prefill beside decodes, then decodes of all three sequences."""
    b = 4
    rng = np.random.default_rng(5)
    models = pair(tiny_model(kind), b, 64 * 3 * 2)
    cached = models[0]
    assert cached.rotated is None  # made at the first step
    x, s, y, tail = (rng.integers(0, 256, n).tolist() for n in (3 * b, b, b, 5))
    layers = cached.num_layers
    ids = iter(range(0, 64 * layers * 2, 2 * layers))

    def fresh(n: int) -> np.ndarray:
        return np.stack([(next(ids) + np.arange(2 * layers)).reshape(layers, 2) for _ in range(n)])

    c_table = fresh(1)
    both(models, [SeqChunk(y, 0, c_table)])
    a_table = fresh(6)
    c_table = np.concatenate([c_table, a_table[3:4], fresh(4)])
    both(models, [SeqChunk(x + s, 0, a_table), SeqChunk(tail, 2 * b, c_table, all_logits=True)])
    assert cached.rotated is not None
    shared_k_rows = a_table[3, :, 0, None] * b + np.arange(b)
    # the shared block's keys are cached at A's positions (12..15): C's read at 4 re-rotated
    assert (cached.rotated.pos[shared_k_rows] == 3 * b + np.arange(b)).all()
    d_table = fresh(5)
    d = rng.integers(0, 256, 11).tolist()
    both(models, [SeqChunk(d[:6], 0, d_table), SeqChunk([7], 4 * b, a_table)])
    tokens = {"a": 4 * b + 1, "c": 2 * b + 5, "d": 6}
    tables = {"a": a_table, "c": c_table, "d": d_table}
    for step in range(6):
        chunks = [SeqChunk([3 + step], tokens[k], tables[k]) for k in ("a", "c", "d")]
        both(models, chunks)
        for k in tokens:
            tokens[k] += 1


def teacher_forced(model: Any, policy: str, texts: list[list[int]], cached: bool) -> Any:
    """A teacher-forced run of ``texts`` under ``policy``: the engine and every logit."""
    got: dict[tuple[str, int], Any] = {}
    specs = [EngineSpec(f"t{i}", t, 1) for i, t in enumerate(texts)]
    opts = EngineOptions(teacher_forced=True, rotated_keys=cached)
    engine = PagedEngine(model, make_policy(policy), specs, opts, logits_sink=collect(got))
    engine.run()
    return engine, got


@pytest.mark.slow
def test_token_dedup_at_an_offset_same_logits(
    hf_backend: HFBackend, gsm8k_prompts: list[list[int]]
) -> None:
    """token-dedup shares a passage's blocks written at position 32 into a text that holds
    them at 48: the reads at the offset are re-rotated, every logit as without the cache."""
    passage = gsm8k_prompts[4][:64]
    texts = [gsm8k_prompts[2][:32] + passage, gsm8k_prompts[3][:48] + passage]
    model = copy.deepcopy(hf_backend.model)
    eng, cached = teacher_forced(model, "token-dedup", texts, True)
    _, rerotated = teacher_forced(model, "token-dedup", texts, False)
    assert any(s.block != s.source_block for s in eng.shares), eng.shares
    assert cached.keys() == rerotated.keys()
    for key, lg in cached.items():
        assert torch.equal(lg, rerotated[key]), key


def collect(got: dict[tuple[str, int], Any]) -> Any:
    """A logits sink keeping a copy of every logit row by (request, position)."""

    def sink(rid: str, pos: int, lg: Any) -> None:
        got[(rid, pos)] = lg.clone()

    return sink


@pytest.mark.slow
def test_keys_shared_at_an_offset_same_tokens_and_logits(
    hf_backend: HFBackend, gsm8k_prompts: list[list[int]]
) -> None:
    """Generating while blocks (whole, and keys of some layers) are shared from other
    positions: the same shares, tokens and last-position logits with and without the cache."""
    model = copy.deepcopy(hf_backend.model)
    runs = []
    for cached in (True, False):
        got: dict[tuple[str, int], Any] = {}
        specs = [EngineSpec("r0", gsm8k_prompts[0], 32), EngineSpec("r1", gsm8k_prompts[1], 24)]
        opts = EngineOptions(rotated_keys=cached)
        eng = PagedEngine(
            model, FixedShares(whole_from=4, keys_from=1), specs, opts, logits_sink=collect(got)
        )
        eng.run()
        runs.append((eng, got))
    (a, a_logits), (b, b_logits) = runs
    assert [(s.block, s.source_block, s.parts) for s in a.shares] == [(2, 4, "kv"), (3, 1, "k")]
    assert [(s.block, s.source_block, s.parts) for s in b.shares] == [(2, 4, "kv"), (3, 1, "k")]
    assert [r.output_ids for r in a.requests] == [r.output_ids for r in b.requests]
    assert a_logits.keys() == b_logits.keys() and len(a_logits) > 20
    for key, lg in a_logits.items():
        assert torch.equal(lg, b_logits[key]), key
