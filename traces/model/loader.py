"""A real model loaded for memshare: :func:`load_model` and the :class:`LoadedModel` it returns.

One loader for every command that runs a real model (capture, the paged engine, ``generate``,
``calibrate``, ``validate``, the vLLM executor's text side and the benchmarks): it checks
``--dtype``, ``--device`` (:mod:`~memshare.traces.model.device`) and ``--threads``, finds the
model (:mod:`~memshare.traces.model.source`), converts a GGUF file once into the safetensors
cache (:mod:`~memshare.traces.model.gguf_cache`) and loads the folder with transformers.

torch and transformers are imported inside functions, so importing this module stays light.
``HF_HUB_OFFLINE=1`` is set before transformers is imported and every load passes
``local_files_only``: nothing reaches a model hub. A GGUF conversion takes tens of seconds
once; a converted copy loads in under a second afterwards.

Invariants of a :class:`LoadedModel`: the model is in eval mode on ``device``; it is a
decoder-only causal LM with ``model.layers`` (else :class:`~memshare.errors.InputError`);
its forward takes a KV cache under ``cache_kw``; ``k_modules``/``v_modules`` are one module
per layer (pre-RoPE keys and values) or both empty when the attention has no
``k_proj``/``v_proj``. Text goes through the tokenizer exactly as capture records it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.traces.files import file_sha256
from memshare.traces.model.device import check_device, resolve_threads
from memshare.traces.model.gguf_cache import ensure_converted
from memshare.traces.model.source import ModelSource, resolve_model
from memshare.traces.schema import ModelInfo

DTYPES = ("float32", "bfloat16", "float16")

Status = Callable[[str], None]


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


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A loaded causal LM with its tokenizer and facts (see the module docstring)."""

    source: ModelSource
    folder: Path  # the HF folder the weights were loaded from (a GGUF file's converted copy)
    model: Any  # the transformers model, eval mode, on ``device``
    tokenizer: Any
    torch: Any  # the torch module
    device: str
    dtype: str
    threads: int  # torch CPU threads in use
    load_s: float  # conversion (first time) plus loading
    gguf_sha256: str | None  # of the GGUF file; None for an HF folder
    transformers_version: str
    cache_kw: str  # the forward's KV cache keyword: "cache" or "past_key_values"
    k_modules: tuple[Any, ...]  # per layer: k_norm (if the model normalises keys) or k_proj
    v_modules: tuple[Any, ...]  # per layer: v_proj
    keys_from: str  # "k_norm", "k_proj" or "cache" (no pre-RoPE keys)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    pad_id: int
    eos_ids: frozenset[int]  # generation config, model config and tokenizer together

    # -- facts ---------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        """The model's transformers config."""
        return self.model.config

    @property
    def context_limit(self) -> int:
        """``max_position_embeddings`` of the model config."""
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer and the embedding both know: ``[0, vocab_size)``."""
        return min(len(self.tokenizer), int(self.config.vocab_size))

    @property
    def special_ids(self) -> frozenset[int]:
        """The tokenizer's special token ids (never synthesized as text)."""
        return frozenset(int(i) for i in self.tokenizer.all_special_ids) | self.eos_ids

    def model_info(self) -> ModelInfo:
        """The model as a trace records it."""
        arch = (self.config.architectures or [type(self.model).__name__])[0]
        return ModelInfo(
            name=self.source.name,
            architecture=str(arch),
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
        )

    def describe(self) -> dict[str, Any]:
        """Where the model came from and how it runs (the provenance a capture records)."""
        d: dict[str, Any] = {
            "model": self.source.name,
            "model_format": self.source.kind,
            "model_path": str(self.source.path),
            "model_sha256": self.gguf_sha256,
            "model_package": self.source.package,
            "context_limit": self.context_limit,
            "keys_from": self.keys_from,
            "attn_implementation": str(getattr(self.config, "_attn_implementation", "?")),
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "device": self.device,
        }
        if self.source.package:
            d["model_package_version"] = importlib.metadata.version(self.source.package)
        return d

    def versions(self) -> dict[str, str]:
        """Library versions (recorded, never compared on resume)."""
        return {"torch": str(self.torch.__version__), "transformers": self.transformers_version}

    # -- text ----------------------------------------------------------------------------

    def chat_prompt(self, text: str) -> list[int]:
        """``text`` as a user turn with the generation prompt (plain text without a template)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return list(tok(rendered, add_special_tokens=False)["input_ids"])
        return list(tok(text, add_special_tokens=True)["input_ids"])

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and each token's start offset in it."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special))

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


def load_model(
    model: str | Path | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int | None = None,
    status: Status | None = None,
) -> LoadedModel:
    """Check the options, find the model (the default without ``model``) and load it.

    ``status`` hears what takes long (importing torch, a first GGUF conversion). Every
    problem with the options or the model is an :class:`InputError` naming the option.
    """
    check_dtype(dtype)
    check_device(device)
    threads = resolve_threads(threads)
    source = resolve_model(model)
    _offline_env()
    if status is not None:
        status("loading torch and transformers")
    import torch
    import transformers

    _quiet_transformers()
    if threads is not None:
        torch.set_num_threads(threads)
    threads_used = int(torch.get_num_threads())
    t_load = time.perf_counter()
    folder, sha256 = _local_folder(source, status)
    tok, lm = _from_pretrained(folder, dtype)
    lm.eval()
    lm.to(device)
    cache_kw = _cache_keyword(lm)
    load_s = time.perf_counter() - t_load
    cfg = lm.config
    k_modules, v_modules, keys_from = _kv_modules(_decoder_layers(lm, source))
    num_heads = int(cfg.num_attention_heads)
    return LoadedModel(
        source=source,
        folder=folder,
        model=lm,
        tokenizer=tok,
        torch=torch,
        device=device,
        dtype=dtype,
        threads=threads_used,
        load_s=load_s,
        gguf_sha256=sha256,
        transformers_version=transformers.__version__,
        cache_kw=cache_kw,
        k_modules=k_modules,
        v_modules=v_modules,
        keys_from=keys_from,
        num_layers=int(cfg.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or num_heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads),
        pad_id=_pad_id(tok),
        eos_ids=_eos_ids(lm, tok),
    )


def check_dtype(dtype: str) -> None:
    """``--dtype``: one of :data:`DTYPES`."""
    if dtype not in DTYPES:
        raise InputError(
            "--dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}", "e.g. float32"
        )


def _local_folder(source: ModelSource, status: Status | None) -> tuple[Path, str | None]:
    """The HF folder to load and the GGUF file's sha256 (converting a GGUF file once)."""
    if source.kind != "gguf":
        return source.path, None
    sha256 = file_sha256(source.path)

    def convert(gguf: Path, out: Path) -> dict[str, Any]:
        if status is not None:
            status(f"converting {gguf.name} once into the model cache (about 30 s)")
        return convert_gguf(gguf, out)

    folder, _ = ensure_converted(source.path, convert, sha256=sha256)
    return folder, sha256


def _from_pretrained(folder: Path, dtype: str) -> tuple[Any, Any]:
    """Tokenizer and model of an HF folder; a folder transformers cannot load is an
    :class:`InputError`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=getattr(torch, dtype)
        )
    except (OSError, ValueError, KeyError) as e:
        raise InputError(
            f"--model {folder}",
            f"transformers cannot load it ({str(e).splitlines()[0][:200]})",
            "pass a causal LM folder that transformers supports, or a .gguf file",
        ) from None
    return tok, lm


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


def _decoder_layers(model: Any, source: ModelSource) -> list[Any]:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise InputError(
            f"--model {source.path}",
            f"unsupported architecture {type(model).__name__} (no model.layers)",
            "use a decoder-only causal LM of the Llama family (Llama, Qwen2/3, Mistral)",
        )
    return list(layers)


def _kv_modules(layers: list[Any]) -> tuple[tuple[Any, ...], tuple[Any, ...], str]:
    """Per layer the module whose output is the pre-RoPE key (``k_norm`` where the
    architecture normalises keys, as Qwen3 does, else ``k_proj``) and the value (``v_proj``),
    and which one the keys come from; none (``"cache"``) without ``k_proj``/``v_proj``."""
    attns: list[Any] = [getattr(layer, "self_attn", None) for layer in layers]
    if not all(a is not None and hasattr(a, "k_proj") and hasattr(a, "v_proj") for a in attns):
        return (), (), "cache"
    norm = all(hasattr(a, "k_norm") for a in attns)
    keys = tuple(a.k_norm if norm else a.k_proj for a in attns)
    return keys, tuple(a.v_proj for a in attns), "k_norm" if norm else "k_proj"


def _pad_id(tok: Any) -> int:
    """The tokenizer's pad id, else its end-of-sequence id, else 0."""
    pad = tok.pad_token_id
    if pad is None:
        pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    return int(pad)


def _eos_ids(model: Any, tok: Any) -> frozenset[int]:
    """End-of-sequence ids of the generation config, the model config and the tokenizer."""
    eos: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tok):
        value = getattr(src, "eos_token_id", None)
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list | tuple):
            eos |= {int(v) for v in value}
    return frozenset(eos)
