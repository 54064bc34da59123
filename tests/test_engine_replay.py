"""Check 9 of the paged engine: ``shares`` replayed on a plain HF run give the engine's logits.

The engine runs a real reasoning text teacher-forced under ``cf-topk`` (block by block, so
later blocks attend to the already-shared cache) and records every share it applied. An
independent replay then runs the same tokens through plain transformers, one block per
forward pass with a ``DynamicCache``, and after each block applies the shares the engine
applied at the end of that step, directly on HF's cache: a shared layer's keys are the source
block's keys rotated from the source's position to the block's (post-RoPE keys compose:
R(q) k = R(q - p) R(p) k), values are copied. Nothing of the engine is used by the replay, so
equal logits mean the engine executed exactly the shares it reports.

Three runs: keys-only shares per layer (``share=k``), and two that copy values (``parts: kv``):
per-layer K and V shares, and whole-block shares (the policy's defaults, ``granularity=block``,
``share=kv``: every layer's K and V of a block from one source block).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # engine run and HF replays on the real model

from memshare.registry import make_policy  # noqa: E402
from memshare.traces.inputs import InputItem  # noqa: E402
from memshare.validate.engine.generate import teacher_forced_inputs  # noqa: E402
from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine  # noqa: E402

if TYPE_CHECKING:
    from memshare.traces.capture.hf import HFBackend

R1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "reasoning"
TEXT_TOKENS = 384  # 24 blocks of 16
TOL = 2e-3  # the fp32 tolerance of the engine-vs-HF checks (test_paged_model.py)


def text_item() -> InputItem:
    path = R1 / "deepseek_r1_aime24_math500.jsonl"
    if not path.is_file():
        pytest.skip(f"public data not found: {path}")
    row = json.loads(path.read_text().splitlines()[0])
    return InputItem("r1-0", 0, "", row["reasoning"][:4000])


def replay(model: Any, tokens: list[int], shares: list[Any], block: int) -> Any:
    """Plain HF, one block per forward pass, shares applied to the DynamicCache."""
    from transformers import DynamicCache

    attn = model.model.layers[0].self_attn
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([tokens])
    out = []
    by_step: dict[int, list[Any]] = {}
    for s in shares:
        by_step.setdefault(s.step, []).append(s)
    with torch.inference_mode():
        for step, a in enumerate(range(0, len(tokens), block)):
            res = model(input_ids=ids[:, a : a + block], cache=cache, use_cache=True)
            out.append(res.logits[0].float())
            for s in by_step.get(step, []):
                dst = slice(s.block * block, (s.block + 1) * block)
                src = slice(s.source_block * block, (s.source_block + 1) * block)
                delta = torch.full((1, block), (s.block - s.source_block) * block)
                cos, sin = model.model.rotary_emb(out[-1], position_ids=delta)
                for layer in s.layers:
                    lay = cache.layers[layer]
                    k = lay.keys[:, :, src].clone()
                    lay.keys[:, :, dst] = rope(k, k, cos, sin)[1]
                    if s.parts == "kv":
                        lay.values[:, :, dst] = lay.values[:, :, src].clone()
    return torch.cat(out)


def run_engine(backend: HFBackend, policy: Any, n: int) -> tuple[list[int], list[Any], Any]:
    """The first ``n`` tokens of the text teacher-forced through the engine under ``policy``:
    the tokens, the shares the engine applied and the logits of every position."""
    (prompt,) = teacher_forced_inputs([text_item()], backend)
    tokens = prompt.ids[:n]
    steps = [s for s in prompt.steps or [0] if s < n]
    got: dict[int, Any] = {}
    engine = PagedEngine(
        copy.deepcopy(backend.model),
        policy,
        [EngineSpec("r1-0", tokens, 1, steps)],
        EngineOptions(teacher_forced=True),
        logits_sink=lambda rid, start, lg: got.__setitem__(start, lg.clone()),
    )
    engine.run()
    return tokens, engine.shares, torch.cat([got[k] for k in sorted(got)])


def test_shares_replayed_on_plain_hf_give_the_engine_logits(hf_backend: HFBackend) -> None:
    policy = make_policy("cf-topk", granularity="layer", share="k", tau=0.8, window=1)
    tokens, shares, mine = run_engine(hf_backend, policy, TEXT_TOKENS)
    assert len(shares) >= 3 and all(s.source_request == "r1-0" for s in shares)
    assert {s.source_block for s in shares} != {s.block for s in shares}
    ref = replay(hf_backend.model, tokens, shares, 16)
    diff = float((mine - ref).abs().max())
    plain = replay(hf_backend.model, tokens, [], 16)
    effect = float((mine - plain).abs().max())
    print(f"{len(shares)} shares; engine vs replay {diff:.3g}, vs unshared {effect:.3g}")
    assert diff < TOL
    assert effect > 100 * TOL  # the shares changed the logits: the replay is not vacuous


KV_TOKENS = 224  # 14 blocks: shares land from block 10 on, in time to change later logits
# tau near the relative distance of unrelated blocks (about sqrt 2), so that a short text gets
# shares: what is checked is that the engine executes the shares it reports, not their quality
KV_POLICIES: dict[str, dict[str, Any]] = {
    "layer-kv": {"granularity": "layer", "share": "kv", "tau": 1.2, "window": 1},
    "whole-block": {"tau": 1.5, "window": 1},  # the defaults: granularity block, share kv
}


@pytest.fixture(scope="module")
def kv_plain(hf_backend: HFBackend) -> Any:
    """The unshared replay of the first ``KV_TOKENS`` tokens (the logits without any share)."""
    (prompt,) = teacher_forced_inputs([text_item()], hf_backend)
    return replay(hf_backend.model, prompt.ids[:KV_TOKENS], [], 16)


@pytest.mark.parametrize("case", KV_POLICIES)
def test_value_copying_shares_replayed_give_the_engine_logits(
    case: str, hf_backend: HFBackend, kv_plain: Any
) -> None:
    """Shares of keys and values (``parts: kv``): the replay rotates the keys and copies the
    values. Three checks: the replay equals the engine; the shares changed the logits; and a
    replay that drops the value copy departs from the engine, so an engine that skipped or
    misplaced its value copy could not equal the replay."""
    policy = make_policy("cf-topk", **KV_POLICIES[case])
    tokens, shares, mine = run_engine(hf_backend, policy, KV_TOKENS)
    layers = int(hf_backend.model.config.num_hidden_layers)
    assert shares and all(s.parts == "kv" and s.source_request == "r1-0" for s in shares)
    if case == "whole-block":  # every layer's K and V of the block from one source block
        assert all(s.layers == list(range(layers)) for s in shares)
    else:
        assert any(len(s.layers) < layers for s in shares)
    ref = replay(hf_backend.model, tokens, shares, 16)
    keys_only = replay(hf_backend.model, tokens, [replace(s, parts="k") for s in shares], 16)
    diff = float((mine - ref).abs().max())
    effect = float((mine - kv_plain).abs().max())
    values = float((mine - keys_only).abs().max())
    print(
        f"{case}: {len(shares)} shares; engine vs replay {diff:.3g}, vs unshared {effect:.3g}, "
        f"vs the replay without value copies {values:.3g}"
    )
    assert diff < TOL
    assert effect > 100 * TOL  # the shares changed the logits
    assert values > 100 * TOL  # and the value copies did: the value path is replayed
