"""Tiny seeded random-weight models for the engine tests (no download, no hub)."""

from __future__ import annotations

from typing import Any


def tiny_model(kind: str, layers: int = 3) -> Any:
    """A seeded random-weight model: hidden 64, 4 heads, 2 KV heads, vocab 256, no EOS."""
    import torch
    import transformers

    torch.manual_seed(0)
    kw: dict[str, Any] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    cfg_cls = {
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "llama": transformers.LlamaConfig,
    }[kind]
    if kind == "qwen3":
        kw["head_dim"] = 16
    cfg = cfg_cls(**kw)
    cfg.eos_token_id = None
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    return model
