"""PackedLinear: the paged engine's linear layers compute F.linear's product (to rounding) on
oneDNN with a packed weight, for every row count, shape, stride and bias; only float32 CPU
layers switch; a changed weight is packed again; a switched model deep-copies and generates
what it did."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers_models import tiny_model
from torch import nn

from memshare.validate.engine.packed_linear import (
    PackedLinear,
    packing_available,
    use_packed_linears,
)


def test_this_torch_has_onednn() -> None:
    assert packing_available()  # CPU wheels of torch ship oneDNN


def _switched(layer: nn.Linear) -> nn.Linear:
    twin = copy.deepcopy(layer)
    assert use_packed_linears(twin) == 1
    assert type(twin) is PackedLinear
    return twin


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 8, 9, 16, 17, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_every_row_count_gives_f_linear_to_rounding(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    layer = nn.Linear(96, 160, bias=bias)
    twin = _switched(layer)
    for x in (
        torch.randn(rows, 96),
        torch.randn(1, rows, 96),  # the engine's packed row
        torch.randn(96, rows).T,  # strided
        torch.randn(rows, 2, 96)[:, 1],  # strided rows
    ):
        want = F.linear(x, layer.weight, layer.bias)
        got = twin(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_changed_weight_is_packed_again_and_copies_pack_their_own() -> None:
    torch.manual_seed(0)
    twin = _switched(nn.Linear(32, 24))
    x = torch.randn(5, 32)
    twin(x)
    copied = copy.deepcopy(twin)  # the oneDNN tensor is not copied: the copy packs its own
    with torch.no_grad():
        twin.weight.mul_(2.0)
    torch.testing.assert_close(twin(x), F.linear(x, twin.weight, twin.bias))
    torch.testing.assert_close(copied(x) * 2 - copied.bias, twin(x))  # the copy kept W


def test_only_plain_float32_cpu_linears_switch() -> None:
    model = tiny_model("llama", layers=2)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert use_packed_linears(model) == len(linears) > 0
    assert all(type(m) is PackedLinear for m in linears)
    assert use_packed_linears(model) == 0  # already switched
    half = tiny_model("llama", layers=2).to(torch.bfloat16)
    assert use_packed_linears(half) == 0


def test_a_switched_model_generates_what_it_did() -> None:
    model = tiny_model("qwen3", layers=2)
    twin = copy.deepcopy(model)
    use_packed_linears(twin)
    prompt = torch.tensor([[5, 17, 200, 3, 9]])
    kw = {"max_new_tokens": 12, "do_sample": False}
    want = model.generate(prompt, **kw)
    assert torch.equal(twin.generate(prompt, **kw), want)
    both = torch.cat([prompt, prompt.flip(1)])  # two rows per decode step
    assert torch.equal(twin.generate(both, **kw), model.generate(both, **kw))
    assert torch.equal(copy.deepcopy(twin).generate(prompt, **kw), want)
