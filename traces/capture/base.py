"""The capture backend interface: what ``run`` needs from a model runtime.

A backend loads a model, turns text into token ids (with the model's chat template for
prompts), and runs requests, returning per request the token ids and the token-level K/V of
every layer as numpy float32 arrays. Everything else (step segmentation, sketches, the trace
format, resume) lives in :mod:`memshare.traces.capture.run` and the modules beside it, and
is shared by all backends.

The HF backend (:mod:`~memshare.traces.capture.hf`) is the reference; the vLLM backend
(:mod:`~memshare.traces.capture.vllm`) implements the same protocol with post-RoPE keys only
(``key_modes``).

Shapes: ``k``, ``k_rope`` and ``v`` are ``(layers, tokens, kv_heads, head_dim)`` float32 over
prompt then output tokens; a field the caller did not ask for is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from memshare.traces.schema import ModelInfo

KVField = Literal["k", "k_rope", "v"]
KeyMode = Literal["pre_rope", "post_rope"]
KEY_FIELD: dict[str, KVField] = {"pre_rope": "k", "post_rope": "k_rope"}


@dataclass(frozen=True)
class GenerationSettings:
    """How generate mode samples. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 4

    def to_dict(self) -> dict[str, Any]:
        """As recorded in the manifest."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "sampling": "greedy" if self.temperature == 0 else "seeded",
        }


@dataclass
class CapturedRequest:
    """One request as a backend ran it."""

    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token), "length", "text" (teacher-forced)
    timings: dict[str, float] = field(default_factory=dict)
    k: npt.NDArray[np.float32] | None = None  # keys before rotary embedding
    k_rope: npt.NDArray[np.float32] | None = None  # keys after rotary embedding (as cached)
    v: npt.NDArray[np.float32] | None = None

    @property
    def tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    def get(self, name: KVField) -> npt.NDArray[np.float32]:
        """One of the K/V arrays; ``ValueError`` if the backend did not return it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"the backend returned no {name!r} array for this request")
        arr: npt.NDArray[np.float32] = value
        return arr


class CaptureBackend(Protocol):
    """What a capture backend provides (HF transformers; vLLM's CPU build)."""

    name: str  # "hf", "vllm"
    key_modes: tuple[KeyMode, ...]  # which keys it can return, preferred first

    def model_info(self) -> ModelInfo:
        """The model, as a trace records it."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance for the manifest: model path and hash, library versions, options."""
        ...

    @property
    def context_limit(self) -> int:
        """Most tokens (prompt plus output) one request may hold."""
        ...

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end generation."""
        ...

    def chat_prompt(self, text: str) -> list[int]:
        """Token ids of ``text`` as a user turn, with the generation prompt appended."""
        ...

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of plain ``text`` (no special tokens) and each token's start offset in
        ``text`` (characters)."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of token ids."""
        ...

    def token_starts(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """``decode(ids)`` and the character offset where each token starts in it."""
        ...

    def generate(
        self,
        prompts: Sequence[list[int]],
        settings: GenerationSettings,
        want: frozenset[KVField],
        *,
        batch_seed: int = 0,
    ) -> list[CapturedRequest]:
        """Generate for one batch of prompts; K/V for every prompt and output token.

        ``batch_seed`` seeds sampling for this batch (so a resumed capture repeats it).
        """
        ...

    def teacher_force(
        self,
        prompt_ids: list[int],
        output_ids: list[int],
        want: frozenset[KVField],
        *,
        chunk_tokens: int = 512,
    ) -> CapturedRequest:
        """Run prompt plus output through the model in chunks, KV carried over."""
        ...

    def plain_generate(
        self, prompts: Sequence[list[int]], settings: GenerationSettings
    ) -> list[list[int]]:
        """The runtime's own generation, nothing captured: output ids (the benchmark's
        baseline)."""
        ...
