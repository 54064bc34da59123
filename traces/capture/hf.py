"""The Hugging Face transformers capture backend: real KV from a loaded model, CPU or CUDA.

The model is loaded by :func:`~memshare.traces.model.loader.load_model` (GGUF conversion
cache, HF folders, tokenizer, device, dtype, threads); :class:`HFBackend` wraps the
:class:`~memshare.traces.model.loader.LoadedModel` and adds what capture needs: hooks that
record K/V, the decode loop and teacher forcing. torch and transformers are imported by the
loader, so importing this module (and ``memshare.traces.capture``) stays light.

What is captured (``want``): ``k`` = keys before rotary embedding, taken by forward hooks on
each attention module's ``k_proj`` (``k_norm`` where the architecture normalises keys, as
Qwen3 does), reshaped to ``(kv_heads, head_dim)``; ``v`` = the ``v_proj`` outputs (values get
no rotary embedding, so they equal the cached values); ``k_rope`` = keys after rotary
embedding, read from the returned ``DynamicCache``. A model whose attention has no
``k_proj``/``v_proj`` only offers post-RoPE keys and values from the cache.

Generation is a plain decode loop over a left-padded batch (prefill, then one token per step,
``logits_to_keep=1``), greedy or seeded sampling with temperature and top-p. After the last
step the final tokens are fed once more so that every token of the trace has its KV, as a
serving engine would have computed it before the next step. Teacher forcing runs prompt plus
output in chunks of ``chunk_tokens`` with the cache carried over.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.errors import InputError
from memshare.traces.capture.base import (
    CapturedRequest,
    GenerationSettings,
    KeyMode,
    KVField,
)
from memshare.traces.model.loader import LoadedModel, load_model
from memshare.traces.schema import ModelInfo

KVArrays = dict[str, npt.NDArray[np.float32] | None]


def _to_numpy(t: Any) -> npt.NDArray[np.float32]:
    arr: npt.NDArray[np.float32] = t.detach().to("cpu").float().contiguous().numpy()
    return arr


@dataclass
class _Decoded:
    """What one decode loop produced, per batch row (see :meth:`HFBackend.generate`).

    Invariant: a row gets tokens until its first end-of-sequence token (``"stop"``) or
    ``max_new`` tokens (``"length"``); after that it is fed the pad id and gets nothing.
    """

    max_new: int
    eos: frozenset[int]
    pad_id: int
    outputs: list[list[int]]
    finish: list[str | None]
    done_at: list[float]
    prefill_s: float = 0.0
    total_s: float = 0.0

    @classmethod
    def empty(cls, rows: int, max_new: int, eos: frozenset[int], pad_id: int) -> _Decoded:
        """No row has a token yet."""
        return cls(max_new, eos, pad_id, [[] for _ in range(rows)], [None] * rows, [0.0] * rows)

    @property
    def done(self) -> bool:
        """Every row has finished."""
        return all(f is not None for f in self.finish)

    def take(self, picked: list[int], now: float) -> list[int]:
        """Append each running row's picked token (at ``now`` seconds); return the tokens to
        feed next (the pad id for rows that had already finished)."""
        for i in range(len(picked)):
            if self.finish[i] is not None:
                picked[i] = self.pad_id
                continue
            self.outputs[i].append(int(picked[i]))
            if picked[i] in self.eos:
                self.finish[i], self.done_at[i] = "stop", now
            elif len(self.outputs[i]) >= self.max_new:
                self.finish[i], self.done_at[i] = "length", now
        return picked


@dataclass
class _Inputs:
    """A left-padded batch on the device: ids, attention mask and positions."""

    ids: Any
    mask: Any
    pos: Any = None  # positions, set for generation (teacher forcing runs without a mask)


class HFBackend:
    """Capture backend on HF transformers (see the module docstring).

    ``model`` is a path (or ``None``: the default model), loaded with ``dtype``, ``device``
    and ``threads``; or an already :class:`LoadedModel`, used as it is.
    """

    name = "hf"

    def __init__(
        self,
        model: str | Path | LoadedModel | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        threads: int | None = None,
        status: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(model, LoadedModel):
            model = load_model(model, dtype=dtype, device=device, threads=threads, status=status)
        self.loaded = model
        self.model = model.model
        self.tok = model.tokenizer
        self.source = model.source
        self.folder = model.folder
        self.device = model.device
        self.dtype = model.dtype
        self.threads = model.threads
        self.pad_id = model.pad_id
        self.num_layers = model.num_layers
        self.num_kv_heads = model.num_kv_heads
        self.head_dim = model.head_dim
        self.key_modes: tuple[KeyMode, ...] = (
            ("pre_rope", "post_rope") if model.k_modules else ("post_rope",)
        )
        # called with the tokens done so far in the current generate/teacher_force call
        self.token_progress: Callable[[int], None] | None = None
        self._torch = model.torch

    # -- the loaded model's facts and text ------------------------------------------------

    def model_info(self) -> ModelInfo:
        """The model as the trace records it."""
        return self.loaded.model_info()

    def describe(self) -> dict[str, Any]:
        """Provenance for the manifest's ``source``."""
        return {"backend": "hf", **self.loaded.describe()}

    def versions(self) -> dict[str, str]:
        """Library versions (recorded, never compared on resume)."""
        return self.loaded.versions()

    @property
    def context_limit(self) -> int:
        """``max_position_embeddings`` of the model config."""
        return self.loaded.context_limit

    @property
    def eos_ids(self) -> frozenset[int]:
        """End-of-sequence token ids (generation config, model config, tokenizer)."""
        return self.loaded.eos_ids

    def chat_prompt(self, text: str) -> list[int]:
        """``text`` as a user turn with the generation prompt (plain text without a template)."""
        return self.loaded.chat_prompt(text)

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and each token's start offset in it."""
        return self.loaded.encode(text)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``."""
        return self.loaded.decode(ids, skip_special=skip_special)

    def token_starts(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """``decode(ids)`` and where each token starts in it."""
        return self.loaded.token_starts(ids)

    # -- recording K/V ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _hooks(self, want: frozenset[KVField]) -> Iterator[dict[str, list[list[Any]]]]:
        rec: dict[str, list[list[Any]]] = {
            "k": [[] for _ in range(self.num_layers)],
            "v": [[] for _ in range(self.num_layers)],
        }
        handles = []

        def hook(store: list[Any]) -> Any:
            def fn(_module: Any, _inp: Any, out: Any) -> None:
                store.append(out.detach())

            return fn

        k_modules, v_modules = self.loaded.k_modules, self.loaded.v_modules
        if "k" in want:
            if not k_modules:
                raise InputError(
                    "--keys pre_rope",
                    f"this model ({type(self.model).__name__}) exposes no pre-RoPE keys",
                    "use --keys post_rope",
                )
            handles += [m.register_forward_hook(hook(rec["k"][i])) for i, m in enumerate(k_modules)]
        if "v" in want and v_modules:
            handles += [m.register_forward_hook(hook(rec["v"][i])) for i, m in enumerate(v_modules)]
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()

    def _gather(
        self,
        rec: dict[str, list[list[Any]]],
        cache: Any,
        want: frozenset[KVField],
        spans: Sequence[tuple[int, int]],
    ) -> list[KVArrays]:
        """Per request (batch row ``i``, positions ``spans[i]``), the wanted K/V arrays."""
        torch = self._torch
        H, D = self.num_kv_heads, self.head_dim
        out: list[KVArrays] = [{"k": None, "k_rope": None, "v": None} for _ in spans]
        for name in ("k", "v"):
            if name not in want:
                continue
            if name == "v" and not self.loaded.v_modules:
                stacked = torch.stack(
                    [layer.values.transpose(1, 2) for layer in cache.layers]
                )  # (L, B, S, H, D)
            else:
                stacked = torch.stack([torch.cat(chunks, dim=1) for chunks in rec[name]])
                stacked = stacked.reshape(*stacked.shape[:3], H, D)
            for i, (a, b) in enumerate(spans):
                out[i][name] = _to_numpy(stacked[:, i, a:b])
        if "k_rope" in want:
            stacked = torch.stack([layer.keys.transpose(1, 2) for layer in cache.layers])
            for i, (a, b) in enumerate(spans):
                out[i]["k_rope"] = _to_numpy(stacked[:, i, a:b])
        return out

    # -- running ---------------------------------------------------------------------------

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.loaded.config)

    def _forward(self, ids: Any, cache: Any, mask: Any = None, pos: Any = None) -> Any:
        """One forward pass that extends ``cache`` and keeps the last position's logits."""
        kw: dict[str, Any] = {"use_cache": True, "logits_to_keep": 1, self.loaded.cache_kw: cache}
        if mask is not None:
            kw.update(attention_mask=mask, position_ids=pos)
        return self.model(input_ids=ids, **kw)

    def _pick(self, logits: Any, settings: GenerationSettings, gen: Any) -> Any:
        torch = self._torch
        if settings.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
        if settings.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cut = sorted_p.cumsum(dim=-1) - sorted_p > settings.top_p
            sorted_p = sorted_p.masked_fill(cut, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def _left_padded(self, prompts: Sequence[list[int]]) -> _Inputs:
        """``prompts`` left-padded with the pad id to the longest, on the CPU."""
        torch = self._torch
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p) :] = 1
        return _Inputs(ids, mask)

    def generate(
        self,
        prompts: Sequence[list[int]],
        settings: GenerationSettings,
        want: frozenset[KVField],
        *,
        batch_seed: int = 0,
    ) -> list[CapturedRequest]:
        """Generate for one left-padded batch (see the module docstring)."""
        torch = self._torch
        lens = [len(p) for p in prompts]
        P = max(lens)
        if min(lens) < 1:
            raise ValueError("every prompt needs at least one token")
        max_new = min(settings.max_new_tokens, self.context_limit - P)
        if max_new < 1:
            raise ValueError(f"prompt of {P} tokens leaves no room under the context limit")
        batch = self._left_padded(prompts)
        batch.ids, batch.mask = batch.ids.to(self.device), batch.mask.to(self.device)
        batch.pos = (batch.mask.cumsum(-1) - 1).clamp(min=0)
        gen = None
        if settings.temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(int(batch_seed))
        run = _Decoded.empty(len(prompts), max_new, self.eos_ids, self.pad_id)
        cache = self._new_cache()
        with self._hooks(want) as rec, torch.inference_mode():
            self._decode(batch, cache, settings, gen, bool(want), run, sum(lens))
            spans = [(P - lens[i], P + len(run.outputs[i])) for i in range(len(prompts))]
            arrays = self._gather(rec, cache, want, spans) if want else [{} for _ in spans]
        return [
            CapturedRequest(
                prompt_ids=list(prompts[i]),
                output_ids=run.outputs[i],
                finish_reason=str(run.finish[i]),
                timings={"ttft_s": run.prefill_s, "e2e_s": run.done_at[i], "batch_s": run.total_s},
                k=a.get("k"),
                k_rope=a.get("k_rope"),
                v=a.get("v"),
            )
            for i, a in enumerate(arrays)
        ]

    def _decode(
        self,
        batch: _Inputs,
        cache: Any,
        settings: GenerationSettings,
        gen: Any,
        feed_last: bool,
        run: _Decoded,
        prompt_tokens: int,
    ) -> None:
        """Prefill, then one token per step into ``run`` until every row finished; with
        ``feed_last`` the final tokens are fed once more (so their KV is in ``cache``)."""
        torch = self._torch
        dev, mask, pos = self.device, batch.mask, batch.pos
        rows = mask.shape[0]
        t0 = time.perf_counter()
        out = self._forward(batch.ids, cache, mask, pos)
        nxt = self._pick(out.logits[:, -1, :], settings, gen)
        run.prefill_s = time.perf_counter() - t0
        while True:
            picked = nxt.tolist()
            now = time.perf_counter() - t0
            if self.token_progress is not None:
                self.token_progress(prompt_tokens + sum(len(o) for o in run.outputs))
            picked = run.take(picked, now)
            all_done = run.done
            if all_done and not feed_last:
                break
            feed = torch.tensor(picked, dtype=torch.long, device=dev)[:, None]
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=dev)], -1)
            pos = pos[:, -1:] + 1
            out = self._forward(feed, cache, mask, pos)
            if all_done:
                break
            nxt = self._pick(out.logits[:, -1, :], settings, gen)
        run.total_s = time.perf_counter() - t0

    def teacher_force(
        self,
        prompt_ids: list[int],
        output_ids: list[int],
        want: frozenset[KVField],
        *,
        chunk_tokens: int = 512,
    ) -> CapturedRequest:
        """Prompt plus output through the model in chunks, the cache carried over."""
        torch = self._torch
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        tokens = list(prompt_ids) + list(output_ids)
        if not tokens:
            raise ValueError("nothing to run: no prompt and no output tokens")
        if len(tokens) > self.context_limit:
            raise ValueError(f"{len(tokens)} tokens exceed the context limit {self.context_limit}")
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        cache = self._new_cache()
        with self._hooks(want) as rec, torch.inference_mode():
            t0 = time.perf_counter()
            for s in range(0, len(tokens), chunk_tokens):
                self._forward(ids[:, s : s + chunk_tokens], cache)
                if self.token_progress is not None:
                    self.token_progress(min(s + chunk_tokens, len(tokens)))
            forward_s = time.perf_counter() - t0
            arrays = self._gather(rec, cache, want, [(0, len(tokens))]) if want else [{}]
        a = arrays[0]
        return CapturedRequest(
            prompt_ids=list(prompt_ids),
            output_ids=list(output_ids),
            finish_reason="text",
            timings={"forward_s": forward_s},
            k=a.get("k"),
            k_rope=a.get("k_rope"),
            v=a.get("v"),
        )

    def plain_generate(
        self, prompts: Sequence[list[int]], settings: GenerationSettings
    ) -> list[list[int]]:
        """``model.generate`` on one left-padded batch, nothing captured (the bench baseline)."""
        torch = self._torch
        P = max(len(p) for p in prompts)
        batch = self._left_padded(prompts)
        kwargs: dict[str, Any] = {"do_sample": settings.temperature > 0}
        if settings.temperature > 0:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        eos = self.eos_ids
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=batch.ids.to(self.device),
                attention_mask=batch.mask.to(self.device),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(eos) or None,
                **kwargs,
            )
        result = []
        for row in out[:, P:].tolist():
            toks: list[int] = []
            for t in row:
                toks.append(int(t))
                if t in eos:
                    break
            result.append(toks)
        return result
