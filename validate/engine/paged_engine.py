"""The real executor: the scheduler's steps run as batched forward passes of the real model
over paged KV (docs/scheduler.md, docs/paged-kv.md).

The loop is the simulator's with the cost model replaced by the model: the same
:class:`~memshare.scheduler.Scheduler`, :class:`~memshare.kv_manager.KVCacheManager` and
registry policy plan a step and reserve its blocks; :class:`~memshare.validate.engine.model.
PagedModel` computes it, writing each new token's pre-RoPE K and V into the request's own
pages (the manager's page table, ``(blocks, layers, 2)``); the engine samples; then
:meth:`Scheduler.complete` commits the blocks that filled (the policy decides on sketches of
the live KV) and takes the sampled tokens. A share repoints a table entry only after its own
pass wrote it, so no step writes a page another entry reads. A step is :meth:`PagedEngine.
begin_step` (schedule, lay out the chunks), a forward pass, and :meth:`PagedEngine.finish_step`
(sample, commit), so engines whose pages are parts of one arena can share the pass
(:mod:`~memshare.validate.engine.group`).

Invariants: the store holds ``pool.num_pages`` pages, so the KV bytes the pool accounts
(pages x page size) are the bytes preallocated in tensors; every share the manager applies is
recorded once in ``PagedRunResult.shares`` (:mod:`~memshare.validate.engine.records`), with
its exact distance on the live KV measured before the share; requests finish in the
scheduler's order; same inputs and seed give the same tokens and page counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.block_pool import BlockPool, KVBlock
from memshare.errors import InputError
from memshare.kv_manager import KVCacheManager, blocks_for_all, cdiv
from memshare.policy import BlockDecision, Policy, policy_layer_map
from memshare.request import Request, new_request
from memshare.scheduler import Scheduler, SchedulerConfig, StepPlan
from memshare.share_log import ShareLog
from memshare.sketch import DEFAULT_DIM, DEFAULT_SEED
from memshare.traces.segment import SegmenterConfig
from memshare.validate.engine.batch import reusing_chunk
from memshare.validate.engine.live_blocks import StepBoundaries, TokenStarts, live_block_source
from memshare.validate.engine.model import PagedModel, SeqChunk
from memshare.validate.engine.records import (
    PagedRunResult,
    ReuseRecord,
    ShareRecord,
    StepRecord,
    share_records,
)
from memshare.validate.engine.store import PageStore

# request id, first position, [n, vocab] logits: teacher-forced, every position of a chunk;
# generating, a chunk's last position only (n = 1)
LogitsSink = Callable[[str, int, Any], None]
Progress = Callable[[int, int], None]  # tokens generated so far, of at most this many


@dataclass(frozen=True)
class EngineSpec:
    """One request for the engine."""

    rid: str
    prompt_ids: list[int]  # prompt tokens (teacher-forced: the whole text)
    max_tokens: int  # tokens to generate at most (>= 1)
    steps: list[int] | None = None  # known step starts (teacher-forced), else found live
    forced: list[int] | None = None  # tokens to "sample" in order (a trace's output): replay


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs (the scheduler limits are the simulator's)."""

    block_size: int = 16
    kv_blocks: int | None = None  # KV budget in blocks; None: every request fits at once
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    seed: int = 0  # sampling seed (per request: seed and the request's index)
    sketch_dim: int = DEFAULT_DIM
    sketch_seed: int = DEFAULT_SEED
    teacher_forced: bool = False  # chunks of one block; logits of every position to the sink
    stop_on_eos: bool = True
    rotated_keys: bool = True  # keep keys rotated at write (PagedModel); False: at every read


@dataclass
class PendingStep:
    """A scheduled step waiting for its forward pass (:meth:`PagedEngine.begin_step`)."""

    plan: StepPlan
    chunks: list[SeqChunk]  # the pass's work, page ids of this engine's store
    live_pages: int  # pool pages pinned once scheduled (as the simulator records)
    used_pages: int  # pool pages held at all, at the same point
    schedule_s: float  # time spent scheduling and laying out


class PagedEngine:
    """Drives the scheduler with real forward passes (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        policy: Policy,
        specs: Sequence[EngineSpec],
        opts: EngineOptions,
        *,
        eos_ids: frozenset[int] = frozenset(),
        token_starts: TokenStarts | None = None,
        logits_sink: LogitsSink | None = None,
        segmenter: SegmenterConfig | None = None,
        store: PageStore | None = None,
    ) -> None:
        """``store``: this engine's pages (``pool.num_pages`` of them, e.g. a part of an
        :class:`~memshare.validate.engine.group.EngineGroup`'s arena); default: its own."""
        import torch

        self._torch = torch
        bs = opts.block_size
        if opts.teacher_forced:
            opts = _with_threshold(opts, bs)
        layers = int(model.config.num_hidden_layers)
        self.pool = _pool(layers, policy, specs, opts, fit=store is None)
        self.manager = KVCacheManager(
            self.pool, policy, bs, observer=self._observe, share_log=ShareLog()
        )
        self.scheduler = Scheduler(opts.scheduler, self.manager)
        self.store = _checked_store(store, model, self.pool.num_pages, bs)
        self._hf_model = model
        self._model: PagedModel | None = None  # built at the first own forward pass
        self.opts = opts
        self.logits_sink = logits_sink
        self.shares: list[ShareRecord] = []
        self.reuses: list[ReuseRecord] = []
        self.steps: list[StepRecord] = []
        self._started = False
        self._sampled = 0  # tokens sampled so far
        self.clock = 0.0  # seconds spent in this engine's own steps (its time line)
        self.first_token_s: dict[str, float] = {}  # request -> clock at its first token
        self.finish_s: dict[str, float] = {}  # request -> clock when it finished
        self.last_plan: StepPlan | None = None  # the plan of the latest step (batch shape)
        self._owner: dict[int, tuple[str, int]] = {}  # page id -> (request, block) that wrote it
        self._sketch_s = 0.0
        self.requests: list[Request] = []
        self._gens: dict[str, Any] = {}
        self._forced: dict[str, list[int]] = {}
        stops = eos_ids if opts.stop_on_eos else frozenset()
        seg = segmenter or SegmenterConfig()
        for i, s in enumerate(specs):
            bounds = StepBoundaries(len(s.prompt_ids), token_starts, seg, s.steps)
            self._add_request(i, s, stops, bounds)

    def _add_request(
        self, i: int, s: EngineSpec, stops: frozenset[int], bounds: StepBoundaries
    ) -> None:
        """Request ``i`` of the specs, its live blocks read from this engine's store (its
        forced tokens and, when sampling, its seeded generator kept)."""
        opts = self.opts
        if s.forced is not None:
            if len(s.forced) != s.max_tokens:
                raise ValueError(f"{s.rid}: {len(s.forced)} forced tokens, max {s.max_tokens}")
            self._forced[s.rid] = list(s.forced)
        req = new_request(
            s.rid,
            s.prompt_ids,
            opts.block_size,
            s.max_tokens,
            stop_ids=frozenset() if s.forced is not None else stops,
        )
        req.block_info = live_block_source(
            req,
            self._pages_fn(req),
            self._block_kv,
            bounds,
            sketch_dim=opts.sketch_dim,
            sketch_seed=opts.sketch_seed,
            on_block=self._record_owner,
            # asked at reservation (no KV written yet): no sketch
            with_kv=self.manager.after_step,
        )
        self.requests.append(req)
        if opts.temperature > 0:
            gen = self._torch.Generator(device=self.store.device)
            gen.manual_seed(opts.seed * 1_000_003 + i)
            self._gens[s.rid] = gen

    @property
    def model(self) -> PagedModel:
        """The forward pass over this engine's own store (built on first use: an engine of an
        :class:`~memshare.validate.engine.group.EngineGroup` never runs its own)."""
        if self._model is None:
            lm, rotated = self.pool.layer_map, self.opts.rotated_keys
            self._model = PagedModel(self._hf_model, self.store, layer_map=lm, rotated_keys=rotated)
        return self._model

    # ----------------------------------------------------------------- running
    def run(self, progress: Progress | None = None) -> PagedRunResult:
        """Run every request to completion."""
        total = sum(r.max_tokens for r in self.requests)
        while self.step():
            if progress is not None:
                progress(self._sampled, total)
        return self.result()

    def result(self) -> PagedRunResult:
        """What the run produced so far (``wall_s``: the engine's own step time)."""
        return PagedRunResult(
            self.requests,
            self.shares,
            self.reuses,
            self.steps,
            self.clock,
            self.scheduler.num_preemptions,
            self.store.page_bytes,
            self.store.nbytes,
            self.store.num_pages,
            self.pool.num_pages,
            self._sketch_s,
        )

    def step(self) -> bool:
        """Run one scheduler step (schedule, forward pass, sample, complete); False when
        every request has finished."""
        pending = self.begin_step()
        if pending is None:
            return False
        t = time.perf_counter()
        logits = self.model.step(pending.chunks)
        self.finish_step(pending, logits, time.perf_counter() - t)
        return True

    def begin_step(self) -> PendingStep | None:
        """Schedule a step and lay out its forward pass (``None``: every request finished).
        The caller runs ``chunks`` through the model (this engine's, or one pass shared with
        other engines whose stores are slices of one arena) and hands the logits, in chunk
        order, to :meth:`finish_step`."""
        sched = self.scheduler
        if not self._started:
            for req in self.requests:
                sched.add(req)
            self._started = True
        if sched.idle:
            return None
        t_step = time.perf_counter()
        plan = sched.schedule()
        if plan.empty:
            raise RuntimeError(
                f"scheduler made no progress: {len(sched.running)} running, "
                f"{len(sched.waiting)} waiting"
            )
        live, used = self.pool.pinned_pages, self.pool.used_pages  # as the simulator records
        chunks = self._chunks(plan)
        return PendingStep(plan, chunks, live, used, time.perf_counter() - t_step)

    def finish_step(self, pending: PendingStep, logits: Sequence[Any], forward_s: float) -> None:
        """Sample from ``logits`` (one per chunk), complete the step and record it; the step's
        wall time is its scheduling, ``forward_s`` and its commit."""
        plan = pending.plan
        t_sample = time.perf_counter()
        sampled = self._take(plan, logits)
        t_commit = time.perf_counter()
        finished = self.scheduler.complete(plan, sampled)
        now = time.perf_counter()
        wall = pending.schedule_s + forward_s + (now - t_sample)
        self.last_plan = plan
        self.clock += wall
        for c in plan.chunks:
            if c.samples:
                self.first_token_s.setdefault(c.req.rid, self.clock)
        for req in finished:
            self.finish_s[req.rid] = self.clock
        self.steps.append(
            StepRecord(
                len(plan.chunks),
                plan.num_tokens,
                plan.num_tokens - sum(c.reused for c in plan.chunks),
                wall,
                now - t_commit,
                pending.live_pages,
                pending.used_pages,
            )
        )
        self._sampled += sum(1 for t in sampled if t is not None)

    def _chunks(self, plan: StepPlan) -> list[SeqChunk]:
        """The forward pass's work for ``plan``, one chunk per scheduled request."""
        bs = self.opts.block_size
        chunks: list[SeqChunk] = []
        for c in plan.chunks:
            req = c.req
            assert req.token_ids is not None
            end = c.start + c.num_tokens
            pages = self.manager.page_table(req.rid)[: cdiv(end, bs)]
            if not c.spans:
                chunks.append(
                    SeqChunk(
                        req.token_ids[c.start : end],
                        c.start,
                        pages,
                        all_logits=self.opts.teacher_forced,
                    )
                )
                continue
            if self.opts.teacher_forced:
                raise InputError(
                    "--policy kvshare",
                    "reused prompt positions have no logits in a teacher-forced run",
                    "run kvshare on prompts (generation)",
                )
            chunks.append(reusing_chunk(req.token_ids, c, pages, bs))
            for sp in c.spans:
                src_rid, src_block = self._owner.get(int(sp.source.pages[0, 0]), ("?", -1))
                self.reuses.append(
                    ReuseRecord(
                        req.rid,
                        sp.start,
                        sp.length,
                        src_rid,
                        src_block * bs + sp.offset,
                        len(self.steps),
                    )
                )
        return chunks

    def _take(self, plan: StepPlan, logits: Sequence[Any]) -> list[int | None]:
        """Hand the logits to the sink; the sampled token per chunk (None: no sample)."""
        out: list[int | None] = []
        for c, lg in zip(plan.chunks, logits, strict=True):
            if self.logits_sink is not None:
                if self.opts.teacher_forced:
                    self.logits_sink(c.req.rid, c.start, lg)
                else:  # the chunk's last position only
                    self.logits_sink(c.req.rid, c.start + c.num_tokens - 1, lg[None])
            if not c.samples:
                out.append(None)
                continue
            forced = self._forced.get(c.req.rid)
            if forced is not None:
                out.append(forced[c.req.num_output])
                continue
            last = lg[-1] if lg.dim() == 2 else lg
            out.append(self._sample(c.req.rid, last))
        return out

    def _sample(self, rid: str, logits: Any) -> int:
        """Greedy, or seeded temperature / nucleus sampling per request."""
        torch = self._torch
        opts = self.opts
        if opts.temperature <= 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / opts.temperature, dim=-1)
        if opts.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < opts.top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self._gens[rid]).item())

    # ----------------------------------------------------------------- live blocks
    @property
    def sketch_s(self) -> float:
        """Seconds spent reading and sketching live blocks so far."""
        return self._sketch_s

    def _pages_fn(self, req: Request) -> Callable[[int], npt.NDArray[np.int64]]:
        manager = self.manager

        def pages_of(i: int) -> npt.NDArray[np.int64]:
            state = manager.requests[req.rid]
            pages: npt.NDArray[np.int64] = state.table[i].pages
            return pages

        return pages_of

    def _block_kv(self, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        t = time.perf_counter()
        kv = self.store.block_kv_numpy(pages)
        self._sketch_s += time.perf_counter() - t
        return kv

    def _record_owner(self, rid: str, index: int, pages: npt.NDArray[np.int64]) -> None:
        """A block was reported full with these pages: they hold what ``rid`` wrote."""
        for p in np.unique(pages).tolist():  # a reported entry holds its own fresh pages
            self._owner[p] = (rid, index)

    def _observe(self, rid: str, d: BlockDecision, own: KVBlock, mask: np.ndarray) -> None:
        """Audit one share before the manager applies it (own pages still hold own KV): one
        record per source block (:func:`~memshare.validate.engine.records.share_records`), as a
        per-layer share may take different layers from different blocks (and ``exact-dedup``
        even K and V of one layer)."""
        if d.share_block is not None:
            target = self.pool.block(d.share_block).pages
        else:
            assert d.share_source is not None
            target = np.where(mask, d.share_source, own.pages)
        dist = self.store.exact_distance(own.pages, target)  # (L, 2)
        sketch = None if d.distance is None or math.isnan(d.distance) else float(d.distance)
        self.shares += share_records(
            rid, d.index, sketch, mask, target, dist, self._owner, len(self.steps)
        )


def _pool(
    layers: int, policy: Policy, specs: Sequence[EngineSpec], opts: EngineOptions, *, fit: bool
) -> BlockPool:
    """The engine's block pool: ``opts.kv_blocks`` (default: every request at once, as the
    simulator sizes it) under the policy's layer map; every request must fit in it alone.

    With ``fit`` (the engine allocates its own pages), a budget above what every request needs
    at once is cut to that: no step can use more, so the run is the same, and the page store
    holds only pages that can be used. (A store given by the caller was sized by it.)"""
    bs = opts.block_size
    all_at_once = blocks_for_all((len(s.prompt_ids) + s.max_tokens for s in specs), bs)
    num_blocks = all_at_once if opts.kv_blocks is None else opts.kv_blocks
    if fit:
        num_blocks = min(num_blocks, all_at_once)
    try:
        layer_map = policy_layer_map(policy, layers)
    except ValueError as e:
        raise InputError("--set layer_map_file", str(e), "calibrate this model") from None
    pool = BlockPool(num_blocks=num_blocks, num_layers=layers, layer_map=layer_map)
    capacity = pool.num_pages // pool.pages_per_block
    for s in specs:
        need = cdiv(len(s.prompt_ids) + s.max_tokens, bs)
        if need > capacity:
            raise InputError(
                "--kv-blocks",
                f"request {s.rid!r} needs {need} blocks of {bs} tokens, the budget holds "
                f"{capacity}",
                f"give at least {need} (or leave it out to fit every request)",
            )
    return pool


def _checked_store(store: PageStore | None, model: Any, num_pages: int, bs: int) -> PageStore:
    """``store`` if it holds ``num_pages`` pages of ``bs`` tokens; ``None``: a new one."""
    if store is None:
        return PageStore.for_model(model, num_pages, bs)
    if (store.num_pages, store.block_size) != (num_pages, bs):
        raise ValueError(
            f"store holds {store.num_pages} pages of {store.block_size} tokens, the engine "
            f"needs {num_pages} of {bs}"
        )
    return store


def _with_threshold(opts: EngineOptions, block_size: int) -> EngineOptions:
    """Teacher-forced texts run block by block: chunks of at most one block."""
    return replace(opts, scheduler=replace(opts.scheduler, long_prefill_token_threshold=block_size))
