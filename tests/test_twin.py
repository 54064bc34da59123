"""twin: a model's copy for another lockstep engine has its own modules over the same weight
tensors, packs each weight once between them, and generates what a deep copy does."""

from __future__ import annotations

import copy

import torch
from helpers_models import tiny_model
from torch import nn

from memshare.validate.engine.packed_linear import PackedLinear, use_packed_linears
from memshare.validate.engine.twin import twin


def test_a_twin_shares_weights_and_their_packed_form_not_its_modules() -> None:
    model = tiny_model("llama", layers=2)
    use_packed_linears(model)
    other = twin(model)
    assert other is not model
    mods = dict(model.named_modules())
    for name, mod in other.named_modules():
        assert mod is not mods[name]
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        assert n1 == n2 and p1 is p2
    for b1, b2 in zip(model.buffers(), other.buffers(), strict=True):
        assert b1 is b2
    pairs = [
        (m, o)
        for m, o in zip(model.modules(), other.modules(), strict=True)
        if isinstance(m, PackedLinear)
    ]
    assert pairs and all(m.packed_weight() is o.packed_weight() for m, o in pairs)
    copied = copy.deepcopy(model)  # its own weights: its own packed form
    first = next(m for m in copied.modules() if isinstance(m, PackedLinear))
    assert first.packed_weight() is not pairs[0][0].packed_weight()


def test_a_twins_hooks_are_its_own_and_it_generates_what_a_copy_does() -> None:
    model = tiny_model("qwen3", layers=2)
    other = twin(model)
    seen: list[str] = []
    linear = next(m for m in other.modules() if type(m) is nn.Linear)
    linear.register_forward_hook(lambda *_: seen.append("twin"))
    prompt = torch.tensor([[5, 17, 200, 3, 9]])
    kw = {"max_new_tokens": 8, "do_sample": False}
    want = copy.deepcopy(model).generate(prompt, **kw)
    assert torch.equal(model.generate(prompt, **kw), want) and not seen
    use_packed_linears(other)
    assert torch.equal(other.generate(prompt, **kw), want) and seen
