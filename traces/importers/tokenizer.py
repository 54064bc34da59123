"""The model tokenizer behind ``memshare import tokens``'s text prompts, loaded on first use.

A file of token ids never loads a model (nor torch): the tokenizer is built the first time a
line gives ``prompt`` text. Text is tokenized as vLLM's ``generate`` does with a text prompt
(the tokenizer's default special tokens), so both engines see the same ids.
"""

from __future__ import annotations

from typing import Any


class LazyTokenizer:
    """``text -> token ids`` with the tokenizer of ``model`` (None: the packaged default)."""

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self.name: str | None = None  # the model's name, once loaded
        self._tok: Any = None

    def __call__(self, text: str) -> list[int]:
        if self._tok is None:
            from memshare.traces.model.loader import load_model

            loaded = load_model(self.model)
            self._tok, self.name = loaded.tokenizer, loaded.model_info().name
        return [int(t) for t in self._tok(text)["input_ids"]]
