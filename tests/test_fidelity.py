"""Fidelity metrics: exact cases, torch's KL, numpy's percentile, the pairing buffer, and one
end-to-end check on the real default model and a real GSM8K text."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from memshare.validate.fidelity import (
    FidelityAccumulator,
    LogitsBuffer,
    add_pairs,
    after_share_mask,
    next_token_targets,
)

if TYPE_CHECKING:
    from memshare.traces.capture.hf import HFBackend

torch = pytest.importorskip("torch")
F = torch.nn.functional
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "problems" / "gsm8k_test.jsonl"


def logits(n: int, vocab: int, seed: int, scale: float = 3.0) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale


def known(x: float | None) -> float:
    assert x is not None
    return x


def reference_kl(base: Any, shared: Any) -> Any:
    """KL(base || shared) per position, as torch computes it."""
    log_p = torch.log_softmax(base.double(), -1)
    log_q = torch.log_softmax(shared.double(), -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).numpy()


def test_identical_logits_agree_fully_with_zero_kl() -> None:
    base = logits(40, 500, 0)
    targets = torch.randint(0, 500, (40,), generator=torch.Generator().manual_seed(1))
    acc = FidelityAccumulator()
    acc.add("r", 0, base, base.clone(), targets.numpy())
    m = acc.metrics()
    assert m.positions == 40 and m.top1_agree == 40 and m.top1_agreement == 1.0
    assert m.kl_mean == 0.0 and m.kl_p99 == 0.0
    assert m.ppl_base == m.ppl_shared
    assert m.top1_agreement_after_first_share is None  # no share: no such positions
    assert m.positions_after_first_share == 0


def test_kl_matches_torch_kl_div_per_position() -> None:
    base, shared = logits(30, 1000, 2), logits(30, 1000, 3)
    acc = FidelityAccumulator()
    for i in range(30):  # one request a position: metrics(rid).kl_mean is that position's KL
        acc.add(f"p{i}", i, base[i : i + 1], shared[i : i + 1])
    ref = reference_kl(base, shared)
    got = np.array([acc.metrics(f"p{i}").kl_mean for i in range(30)])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    pooled = acc.metrics()
    np.testing.assert_allclose(known(pooled.kl_mean), ref.mean(), rtol=1e-6)
    # kl_p99 is numpy's default (linear) percentile of the per-position values
    np.testing.assert_allclose(known(pooled.kl_p99), np.percentile(ref, 99), rtol=1e-6)
    assert pooled.kl_p99 != pytest.approx(ref.max())  # not the max under another name


def test_several_runs_against_one_base_equal_one_pair_at_a_time() -> None:
    base = logits(150, 700, 20)  # more rows than one reduction slice
    shared = [base + logits(150, 700, 21 + i, scale=0.5 * i) for i in range(3)]
    targets = torch.randint(0, 700, (150,), generator=torch.Generator().manual_seed(5)).numpy()
    targets[-1] = -1
    mask = np.arange(150) >= 40
    alone = [FidelityAccumulator() for _ in shared]
    for acc, s in zip(alone, shared, strict=True):
        acc.add("r", 16, base, s, targets, mask)
    together = [FidelityAccumulator() for _ in shared]
    add_pairs("r", 16, base, [(a, s, mask) for a, s in zip(together, shared, strict=True)],
              targets)  # fmt: skip
    for a, b in zip(alone, together, strict=True):
        assert a.metrics() == b.metrics()
    assert together[0].metrics().kl_mean == 0.0
    assert known(together[2].metrics().kl_mean) > known(together[1].metrics().kl_mean) > 0
    with pytest.raises(ValueError, match="overlap"):  # a position counts once per request
        add_pairs("r", 100, base[:4], [(together[1], shared[1][:4], None)])


def test_more_noise_means_less_agreement_and_more_kl() -> None:
    base = logits(300, 2000, 4, scale=2.0)
    seen: list[tuple[float, float]] = []
    for i, noise in enumerate((0.1, 1.0, 4.0)):
        acc = FidelityAccumulator()
        acc.add("r", 0, base, base + logits(300, 2000, 10 + i, scale=noise))
        m = acc.metrics()
        seen.append((known(m.top1_agreement), known(m.kl_mean)))
    agreement = [a for a, _ in seen]
    kl = [k for _, k in seen]
    assert agreement[0] > agreement[1] > agreement[2], seen
    assert kl[0] < kl[1] < kl[2], seen
    assert agreement[0] > 0.8 and agreement[2] < 0.1, seen


def test_after_first_share_counts_only_the_marked_positions() -> None:
    base = logits(32, 300, 5)
    shared = base.clone()
    shared[20:] = -base[20:]  # a different argmax from position 20 on
    mask = after_share_mask(0, 32, 16)
    assert mask.sum() == 16 and not mask[:16].any()
    acc = FidelityAccumulator()
    acc.add("r", 0, base[:16], shared[:16], None, after_share_mask(0, 16, 16))
    acc.add("r", 16, base[16:], shared[16:], None, after_share_mask(16, 16, 16))
    m = acc.metrics("r")
    assert m.positions == 32 and m.top1_agree == 20
    assert m.positions_after_first_share == 16 and m.top1_agree_after_first_share == 4
    assert m.top1_agreement_after_first_share == pytest.approx(4 / 16)
    assert m.scored_positions == 0 and m.ppl_base is None  # no targets given
    assert after_share_mask(0, 8, None).sum() == 0


def test_perplexity_of_uniform_logits_is_the_vocabulary_size() -> None:
    tokens = list(range(50))
    acc = FidelityAccumulator()
    acc.add("r", 0, torch.zeros(50, 64), torch.zeros(50, 64), next_token_targets(tokens, 0, 50))
    m = acc.metrics()
    assert m.scored_positions == 49  # the last position has no next token
    assert m.ppl_base == pytest.approx(64.0, rel=1e-12) and m.ppl_shared == m.ppl_base
    assert list(next_token_targets([5, 6, 7], 1, 3)) == [7, -1, -1]


def test_pooled_metrics_weigh_every_position_the_same() -> None:
    acc = FidelityAccumulator()
    a, b = logits(10, 100, 6), logits(30, 100, 7)
    acc.add("a", 0, a, a + 1.0, np.arange(10))  # a constant shift: same distribution
    acc.add("b", 0, b, logits(30, 100, 8), np.arange(30) % 100)
    ma, mb, pooled = acc.metrics("a"), acc.metrics("b"), acc.metrics()
    assert acc.requests() == ["a", "b"] and set(acc.per_request()) == {"a", "b"}
    assert ma.kl_mean is not None and ma.kl_mean < 1e-12
    assert pooled.positions == 40
    assert ma.kl_mean is not None and mb.kl_mean is not None
    assert pooled.kl_mean == pytest.approx((10 * ma.kl_mean + 30 * mb.kl_mean) / 40)
    assert ma.ppl_base is not None and mb.ppl_base is not None and pooled.ppl_base is not None
    pooled_nll = (10 * math.log(ma.ppl_base) + 30 * math.log(mb.ppl_base)) / 40
    assert pooled.ppl_base == pytest.approx(math.exp(pooled_nll))


def test_bad_inputs_are_refused() -> None:
    acc = FidelityAccumulator()
    x = logits(8, 50, 9)
    acc.add("r", 16, x, x)
    with pytest.raises(ValueError, match="overlap"):
        acc.add("r", 20, x, x)
    with pytest.raises(ValueError, match="overlap"):
        acc.add("r", 10, x, x)
    acc.add("r", 8, x, x)  # adjacent ranges are fine
    with pytest.raises(ValueError, match="two"):
        acc.add("s", 0, x, x[:4])
    with pytest.raises(ValueError, match="vocabulary"):
        acc.add("s", 0, x, x, [50] * 8)
    bad = x.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        acc.add("s", 0, x, bad)
    with pytest.raises(KeyError):
        acc.metrics("nobody")


def test_json_has_no_nan_or_infinity() -> None:
    acc = FidelityAccumulator()
    base = torch.zeros(4, 10)
    shared = torch.zeros(4, 10)
    shared[:, 3] = float("-inf")  # shared gives no mass where base gives some: KL is inf
    acc.add("r", 0, base, shared)
    m = acc.metrics()
    assert m.kl_mean == math.inf and m.kl_p99 == math.inf
    out = m.to_json()
    json.dumps(out, allow_nan=False)
    assert out["kl_mean"] is None and out["ppl_base"] is None and out["positions"] == 4
    empty = FidelityAccumulator().metrics().to_json()
    assert empty["top1_agreement"] is None and empty["positions"] == 0


@pytest.mark.parametrize("first", ["base", "shared"])
def test_buffer_pairs_in_either_order_and_keeps_nothing(first: str) -> None:
    pairs: list[tuple[str, int, Any, Any]] = []
    buf = LogitsBuffer(lambda rid, pos, b, s: pairs.append((rid, pos, b, s)))
    second = "shared" if first == "base" else "base"
    base, shared = logits(16, 80, 11), logits(16, 80, 12)
    chunks = {"base": base, "shared": shared}
    buf.sink(first)("r", 0, chunks[first])  # type: ignore[arg-type]
    buf.sink(first)("q", 16, chunks[first])  # type: ignore[arg-type]
    assert buf.held == 2 and not pairs
    assert sorted(buf.pending()) == sorted([(first, "r", 0), (first, "q", 16)])
    buf.sink(second)("r", 0, chunks[second])  # type: ignore[arg-type]
    buf.sink(second)("q", 16, chunks[second])  # type: ignore[arg-type]
    assert buf.held == 0 and buf.pending() == []
    assert [(r, p) for r, p, _, _ in pairs] == [("r", 0), ("q", 16)]
    for _, _, b, s in pairs:
        assert torch.equal(b, base) and torch.equal(s, shared)  # roles kept, whatever came first
    buf.offer("base", "r", 32, base)
    with pytest.raises(ValueError, match="twice"):
        buf.offer("base", "r", 32, base)
    with pytest.raises(ValueError, match="differ"):
        buf.offer("shared", "r", 32, shared[:8])
    with pytest.raises(ValueError, match="run must be"):
        buf.sink("other")  # type: ignore[arg-type]


def test_buffer_copies_what_it_holds() -> None:
    got: list[Any] = []
    buf = LogitsBuffer(lambda rid, pos, b, s: got.append(b))
    x = logits(4, 10, 13)
    buf.offer("base", "r", 0, x)
    want = x.clone()
    x.zero_()  # the engine may reuse its tensor after the sink returns
    buf.offer("shared", "r", 0, torch.zeros(4, 10))
    assert torch.equal(got[0], want)


@pytest.mark.slow  # loads the real model
def test_real_model_on_a_real_gsm8k_text(hf_backend: HFBackend) -> None:
    """Base: the whole text; "shared": the text without its first token (a real, large
    perturbation). Perplexities are sane and match the model's own loss; chunked pairing
    through the buffer gives the whole-text numbers."""
    row = json.loads(GSM8K.read_text(encoding="utf-8").splitlines()[0])
    prompt = hf_backend.chat_prompt(row["question"])
    answer, _ = hf_backend.encode(row["answer"])
    tokens = prompt + answer
    ids = torch.tensor([tokens])
    with torch.inference_mode():
        out = hf_backend.model(input_ids=ids, labels=ids)
        dropped = hf_backend.model(input_ids=ids[:, 1:]).logits[0]
    full = out.logits[0]
    n = len(tokens)
    base, shared = full[1:], dropped  # positions 1 .. n-1 in both
    share_from = len(prompt)  # call the answer "after the first share"
    whole = FidelityAccumulator()
    whole.add(
        "q0",
        1,
        base,
        shared,
        next_token_targets(tokens, 1, n - 1),
        after_share_mask(1, n - 1, share_from),
    )
    m = whole.metrics()
    print(f"real model, first token dropped: {m.to_json()}")
    assert m.positions == n - 1 and m.scored_positions == n - 2
    assert m.positions_after_first_share == n - share_from
    assert m.ppl_base is not None and m.ppl_shared is not None
    assert 1 < m.ppl_base < 1000 and 1 < m.ppl_shared < 1000, m
    # the model's loss covers position 0 too; ours starts at 1: recompute it over ours
    nll = F.cross_entropy(full[1:-1].double(), ids[0, 2:], reduction="mean").item()
    assert m.ppl_base == pytest.approx(math.exp(nll), rel=1e-9)
    assert math.exp(out.loss.item()) == pytest.approx(m.ppl_base, rel=0.2)
    assert m.kl_mean is not None and m.kl_p99 is not None and 0 < m.kl_mean <= m.kl_p99
    assert m.top1_agreement is not None and 0 < m.top1_agreement < 1
    # the same numbers when both runs arrive in one-block chunks, in turns, through the buffer
    chunked = FidelityAccumulator()
    buf = LogitsBuffer(
        lambda rid, pos, b, s: chunked.add(
            rid,
            pos,
            b,
            s,
            next_token_targets(tokens, pos, len(b)),
            after_share_mask(pos, len(b), share_from),
        )
    )
    for s in range(0, n - 1, 16):
        buf.offer("shared", "q0", 1 + s, shared[s : s + 16])
        buf.offer("base", "q0", 1 + s, base[s : s + 16])
        assert buf.held == 0
    c = chunked.metrics()
    assert (c.positions, c.top1_agree, c.top1_agree_after_first_share) == (
        m.positions,
        m.top1_agree,
        m.top1_agree_after_first_share,
    )
    for k in ("kl_mean", "kl_p99", "ppl_base", "ppl_shared"):
        assert getattr(c, k) == pytest.approx(getattr(m, k), rel=1e-9)
