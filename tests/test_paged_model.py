"""The paged KV engine's model side (memshare.validate.engine.model) against plain HF runs.

No mocks: the default model (SmolLM2-135M-Instruct, loaded once per session by the
``hf_backend`` fixture) and tiny seeded random-weight Qwen2 / Qwen3 / Llama models, compared
token for token with ``generate(do_sample=False)`` and logit by logit with a plain HF forward
pass. The engine always runs on a deep copy, because it switches its model's attention
implementation for good. Page ids come from a test-local contiguous allocator; the scheduler
side is tested elsewhere. Design: docs/paged-kv.md.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers_models import tiny_model  # noqa: E402

from memshare.validate.engine.model import PagedModel, SeqChunk  # noqa: E402
from memshare.validate.engine.store import PageStore  # noqa: E402

if TYPE_CHECKING:
    from memshare.traces.capture.hf import HFBackend

# fp32 tolerances on logits (measured figures are printed and listed in docs/paged-kv.md)
TOL_DEFAULT = 2e-3  # SmolLM2-135M, logits of magnitude ~20
TOL_TINY = 1e-5  # tiny random models, logits of magnitude ~1


class Pages:
    """Contiguous page ids: each new block takes the next ``2 * L`` ids as ``(L, 2)``."""

    def __init__(self, num_layers: int, num_pages: int) -> None:
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.next = 0

    def blocks(self, n: int) -> np.ndarray:
        """``n`` fresh blocks: ``(n, L, 2)`` page ids."""
        need = n * self.num_layers * 2
        assert self.next + need <= self.num_pages, "test store too small"
        ids = np.arange(self.next, self.next + need, dtype=np.int64)
        self.next += need
        return ids.reshape(n, self.num_layers, 2)


def grow(table: np.ndarray, tokens: int, block_size: int, pages: Pages) -> np.ndarray:
    """``table`` extended with fresh blocks until it covers ``tokens`` positions."""
    need = -(-tokens // block_size) - len(table)
    return np.concatenate([table, pages.blocks(need)]) if need > 0 else table


def engine(model: Any, block_size: int, num_pages: int, **kw: Any) -> tuple[PagedModel, Pages]:
    """A PagedModel on a deep copy of ``model`` and a page allocator for it."""
    own = copy.deepcopy(model)
    store = PageStore.for_model(own, num_pages, block_size)
    pm = PagedModel(own, store, **kw)
    return pm, Pages(pm.num_layers, num_pages)


def paged_greedy(
    pm: PagedModel,
    pages: Pages,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    eos: frozenset[int] = frozenset(),
) -> tuple[list[list[int]], list[Any]]:
    """Greedy decoding of every prompt through ``pm``, in batched steps.

    All prompts but the last are prefilled in the first step (all logits kept). The last one
    joins later in two chunks (the second at ``start > 0``), each in a step with decodes.
    Returns the generated tokens per prompt and the first step's prefill logits.
    """
    b = pm.block_size
    n = len(prompts)
    tables = [pages.blocks(0).reshape(0, pm.num_layers, 2) for _ in prompts]
    done = [False] * n
    out: list[list[int]] = [[] for _ in prompts]
    seqs = [list(p) for p in prompts]
    computed = [0] * n  # tokens whose KV is in the pages
    late = n - 1 if n > 1 else -1  # a single prompt is prefilled at once
    half = len(prompts[late]) // 2
    first: list[Any] = []
    step = 0
    while not all(done):
        chunks: list[SeqChunk] = []
        who: list[int] = []
        for i in range(n):
            if done[i]:
                continue
            if i == late and step < 2 and len(prompts[late]) > 1:
                continue  # joins at step 2
            if i == late and computed[i] == 0 and len(prompts[late]) > 1:
                toks = seqs[i][:half]
            else:
                toks = seqs[i][computed[i] :]
            tables[i] = grow(tables[i], computed[i] + len(toks), b, pages)
            prefill = computed[i] == 0 and step == 0
            chunks.append(SeqChunk(toks, computed[i], tables[i], all_logits=prefill))
            who.append(i)
        logits = pm.step(chunks)
        if step == 0:
            first = logits
        for i, c, lg in zip(who, chunks, logits, strict=True):
            computed[i] += len(c.token_ids)
            if computed[i] < len(prompts[i]):
                continue  # chunked prefill not finished: its logits are not a next token
            tok = int((lg[-1] if lg.dim() == 2 else lg).argmax())
            out[i].append(tok)
            seqs[i].append(tok)
            if tok in eos or len(out[i]) >= new_tokens:
                done[i] = True
        step += 1
    return out, first


def hf_greedy(model: Any, prompt: Sequence[int], new_tokens: int, pad: int = 0) -> list[int]:
    """``generate(do_sample=False)`` on the plain HF model: the new tokens."""
    with torch.inference_mode():
        ids = torch.tensor([list(prompt)])
        gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return [int(t) for t in gen[0, len(prompt) :]]


def hf_logits(model: Any, prompt: Sequence[int]) -> Any:
    """A plain HF forward pass: float32 logits ``[n, vocab]``."""
    with torch.inference_mode():
        return model(torch.tensor([list(prompt)])).logits[0].float()


def max_diff(paged: Sequence[Any], ref: Sequence[Any]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(paged, ref, strict=True))


# -- the default model -----------------------------------------------------------------------


@pytest.mark.slow  # the real model, six prompts, 64 tokens each
def test_default_model_matches_hf_generate(
    hf_backend: HFBackend, gsm8k_prompts: list[list[int]], gsm8k_hf_greedy: list[list[int]]
) -> None:
    prompts = gsm8k_prompts
    assert len({len(p) for p in prompts}) > 1  # different lengths
    model = hf_backend.model
    pm, pages = engine(model, block_size=16, num_pages=6 * 20 * 2 * 30)
    eos_id = model.generation_config.eos_token_id
    eos = frozenset() if eos_id is None else frozenset(int(x) for x in np.atleast_1d(eos_id))
    got, first = paged_greedy(pm, pages, prompts, 64, eos)
    diff = max_diff(first, [hf_logits(model, p) for p in prompts[:-1]])
    print(f"SmolLM2-135M prefill: max abs logit diff vs HF forward {diff:.3g}")
    assert diff < TOL_DEFAULT
    assert got == gsm8k_hf_greedy
    assert model.config._attn_implementation != "memshare_paged"  # the engine used a copy


# -- tiny Qwen2 / Qwen3 / Llama ------------------------------------------------------------


def random_prompts(lengths: Sequence[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_tiny_models_match_hf(kind: str) -> None:
    model = tiny_model(kind)
    pm, pages = engine(model, block_size=4, num_pages=5 * 16 * 3 * 2)
    assert pm.store.flat.shape[0] == 5 * 16 * 3 * 2 * 4
    if kind == "qwen3":
        assert pm.keys_from == "k_norm"
    prompts = random_prompts([5, 9, 1, 13, 22])
    got, first = paged_greedy(pm, pages, prompts, 24)
    diff = max_diff(first, [hf_logits(model, p) for p in prompts[:-1]])
    print(f"tiny {kind}: max abs logit diff vs HF forward {diff:.3g}")
    assert diff < TOL_TINY
    for p, g in zip(prompts, got, strict=True):
        assert g == hf_greedy(model, p, 24)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_chunks_of_one_length_attend_as_a_group(kind: str) -> None:
    """Chunks of one length form a padded group (paged_batch.GroupPlan), even at different
    starts and context lengths; each position's logits equal a plain HF forward's."""
    b = 4
    model = tiny_model(kind)
    pm, pages = engine(model, block_size=b, num_pages=12 * 3 * 2 * 3)
    prompts = random_prompts([24, 16, 21], seed=11)
    ref = [hf_logits(model, p) for p in prompts]
    tables = [grow(pages.blocks(0).reshape(0, 3, 2), len(p), b, pages) for p in prompts]
    # step 1: 8 tokens of prompt 0 at 0, 8 of prompt 1 at 0; step 2: prompt 0 and 1 at 8
    # (equal contexts) and prompt 2's first 8 at 0 (a shorter context in the same group);
    # step 3: prompt 0 at 16 and prompt 2 at 8 (one group, starts 16 and 8), prompt 2's rest
    plan = [
        [(0, 0, 8), (1, 0, 8)],
        [(0, 8, 8), (1, 8, 8), (2, 0, 8)],
        [(0, 16, 8), (2, 8, 8)],
        [(2, 16, 5)],
    ]
    got: dict[int, list[Any]] = {0: [], 1: [], 2: []}
    for step in plan:
        chunks = [SeqChunk(prompts[i][s : s + n], s, tables[i], all_logits=True)
                  for i, s, n in step]  # fmt: skip
        for (i, _, _), lg in zip(step, pm.step(chunks), strict=True):
            got[i].append(lg)
    for i in range(len(prompts)):
        diff = float((torch.cat(got[i]) - ref[i]).abs().max())
        assert diff < TOL_TINY, (i, diff)


# -- re-rotation and write-before-read -------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_shared_block_is_rerotated_at_its_new_position(kind: str) -> None:
    """A block computed at position p, placed by the table at q != p, is attended as if there.

    With one layer, a token's pre-RoPE K/V depend on the token alone, so the shared block's
    pages equal what a sequence computing the same tokens at q would store; its logits must
    then equal that sequence's. The block is written in the same step that reads it.
    """
    b = 4
    model = tiny_model(kind, layers=1)
    pm, pages = engine(model, block_size=b, num_pages=64)
    x, s, y, tail = random_prompts([3 * b, b, b, 5], seed=7)  # p = 3b, q = b
    ref = y + s + tail
    # sequence C: its prefix y first, in its own step
    c_table = pages.blocks(1)
    pm.step([SeqChunk(y, 0, c_table)])
    # one step: A writes x + s (block s at p = 3b); C reads s through its table at q = b
    a_table = pages.blocks(4)
    c_table = np.concatenate([c_table, a_table[3:4], pages.blocks(2)])
    _, c_out = pm.step(
        [SeqChunk(x + s, 0, a_table), SeqChunk(tail, 2 * b, c_table, all_logits=True)]
    )
    want = hf_logits(model, ref)[2 * b :]
    diff = float((c_out - want).abs().max())
    print(f"tiny {kind}: re-rotated block (p={3 * b}, q={b}) max abs logit diff {diff:.3g}")
    assert diff < TOL_TINY
    # the shared pages hold exactly what C would have computed for s at q
    r_table = pages.blocks(4)
    pm.step([SeqChunk(ref, 0, r_table)])
    assert np.all(pm.store.exact_distance(r_table[1], a_table[3]) < 1e-6)


def test_write_before_read_in_one_step() -> None:
    """A fork reads, in the same step, the prefix pages its parent writes in that step."""
    b = 4
    model = tiny_model("qwen2")
    pm, pages = engine(model, block_size=b, num_pages=96)
    (prompt,) = random_prompts([11], seed=3)
    s = 2 * b
    a_table = pages.blocks(3)
    fork = np.concatenate([a_table[:2], pages.blocks(1)])  # shares the first 2 blocks
    a_out, f_out = pm.step(
        [
            SeqChunk(prompt, 0, a_table, all_logits=True),
            SeqChunk(prompt[s:], s, fork, all_logits=True),
        ]
    )
    want = hf_logits(model, prompt)
    assert float((a_out - want).abs().max()) < TOL_TINY
    assert float((f_out - want[s:]).abs().max()) < TOL_TINY
    # the fork wrote only its own block, the same K/V as the parent's block there
    kv_a, kv_f = pm.store.block_kv_numpy(a_table[2]), pm.store.block_kv_numpy(fork[2])
    np.testing.assert_allclose(kv_f[:, :, :3], kv_a[:, :, :3], atol=1e-6)
    assert np.all(pm.store.exact_distance(a_table[2], fork[2]) < 1e-5)


# -- the KVSharer layer map --------------------------------------------------------------------


def kvsharer_reference(model: Any, layer_map: np.ndarray, prompt: Sequence[int]) -> Any:
    """HF forward of a copy whose layer ``l`` attends with layer ``layer_map[l]``'s keys and
    values (a test-local attention function over HF's own post-RoPE K/V)."""
    saved: dict[int, tuple[Any, Any]] = {}

    def attn(module: Any, q: Any, k: Any, v: Any, _mask: Any, scaling: float, **_: Any) -> Any:
        layer = int(module.layer_idx)
        if layer_map[layer] == layer:
            saved[layer] = (k, v)
        else:
            k, v = saved[int(layer_map[layer])]
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, enable_gqa=True
        )
        return o.transpose(1, 2), None

    transformers.AttentionInterface.register("memshare_test_kvsharer", attn)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("memshare_test_kvsharer")
    return hf_logits(ref, prompt)


def test_layer_map_reads_owner_pages_and_writes_nothing() -> None:
    b = 4
    model = tiny_model("llama", layers=3)
    lm = np.array([0, 0, 2])
    pm, pages = engine(model, block_size=b, num_pages=96, layer_map=lm)
    (prompt,) = random_prompts([10], seed=5)
    table = pages.blocks(3)  # every layer gets its own pages, layer 1's must stay untouched
    out = pm.step([SeqChunk(prompt[:-1], 0, table, all_logits=True)])[0]
    last = pm.step([SeqChunk(prompt[-1:], len(prompt) - 1, table)])[0]
    want = kvsharer_reference(model, lm, prompt)
    diff = max(float((out - want[:-1]).abs().max()), float((last - want[-1]).abs().max()))
    print(f"tiny llama, layer map {lm.tolist()}: max abs logit diff {diff:.3g}")
    assert diff < TOL_TINY
    data = pm.store.data
    assert torch.count_nonzero(data[torch.as_tensor(table[:, 1].ravel())]) == 0
    assert torch.count_nonzero(data[torch.as_tensor(table[:, 0].ravel())]) > 0
    assert torch.count_nonzero(data[torch.as_tensor(table[:, 2].ravel())]) > 0
    # the pool's convention (layer 1's column holds layer 0's ids) gives the same logits
    pm2, pages2 = engine(model, block_size=b, num_pages=96, layer_map=lm)
    t2 = pages2.blocks(3)
    t2[:, 1] = t2[:, 0]
    out2 = pm2.step([SeqChunk(prompt[:-1], 0, t2, all_logits=True)])[0]
    assert torch.equal(out, out2)
    # and the map matters: the plain model gives other logits
    assert float((want - hf_logits(model, prompt)).abs().max()) > 100 * TOL_TINY


# -- CUDA --------------------------------------------------------------------------------------


def test_cuda_matches_hf() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = tiny_model("qwen3").to("cuda")
    own = copy.deepcopy(model)
    pm = PagedModel(own, PageStore.for_model(own, 480, 4))
    pages = Pages(pm.num_layers, 480)
    prompts = random_prompts([5, 9, 1, 13, 22])
    got, first = paged_greedy(pm, pages, prompts, 24)
    with torch.inference_mode():
        ref = [model(torch.tensor([p], device="cuda")).logits[0].float() for p in prompts[:-1]]
        diff = max_diff(first, ref)
        print(f"tiny qwen3 on CUDA: max abs logit diff {diff:.3g}")
        assert diff < 1e-4
        for p, g in zip(prompts, got, strict=True):
            gen = model.generate(
                torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False
            )
            assert g == gen[0, len(p) :].tolist()
