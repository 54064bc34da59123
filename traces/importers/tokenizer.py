"""The model tokenizer behind ``memshare import tokens``'s text prompts, loaded on first use.

A file of token ids never loads a model (nor torch): the tokenizer is built the first time a
line gives ``prompt`` text. Text is tokenized as vLLM's ``generate`` does with a text prompt
(the tokenizer's default special tokens), so both engines see the same ids. The model's
context limit and longest token (:func:`~memshare.traces.prompt_line.max_token_chars`) come
with it, to size the text lines.
"""

from __future__ import annotations

from typing import Any


class LazyTokenizer:
    """``text -> token ids`` with the tokenizer of ``model`` (None: the packaged default)."""

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self.name: str | None = None  # the model's name, once loaded
        self._tok: Any = None
        self._limits = (0, 0)  # context limit, longest token in characters (once loaded)

    def _load(self) -> Any:
        if self._tok is None:
            from memshare.traces.model.loader import load_model
            from memshare.traces.prompt_line import max_token_chars

            loaded = load_model(self.model)
            self._tok, self.name = loaded.tokenizer, loaded.model_info().name
            self._limits = (loaded.context_limit, max_token_chars(loaded.tokenizer))
        return self._tok

    @property
    def context_limit(self) -> int:
        """The model's context limit in tokens (loads the model on first use)."""
        self._load()
        return self._limits[0]

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (loads the model on first use)."""
        self._load()
        return self._limits[1]

    def __call__(self, text: str) -> list[int]:
        return [int(t) for t in self._load()(text)["input_ids"]]
