"""The one scheduler both executors drive: vLLM-v1-like, over the KV cache manager.

It plans steps over :class:`~memshare.kv_manager.KVCacheManager` (docs/scheduler.md).

The simulator (``memshare.sim``) charges its cost model for each step this scheduler plans;
the paged engine (``memshare.validate.engine``) runs one batched forward pass of the real
model for it. Neither changes a decision: the step plan, every allocation, hit, share and free
come from here and from the manager, so a difference between the two is a measured fact.

One :meth:`Scheduler.schedule` call plans one engine step, as in vLLM v1's
``Scheduler.schedule``: there is no prefill or decode phase, each request has
``num_computed`` tokens and wants to catch up with ``num_tokens`` (prompt plus generated).

1. **Running requests first**, in order: each gets ``num_tokens - num_computed`` tokens (one
   when decoding, the next chunk of its prompt otherwise), capped by
   ``long_prefill_token_threshold`` and the step's token budget. If the manager cannot
   reserve the blocks, the **newest running request is preempted** (its blocks are freed,
   it goes back to the front of the waiting queue and is later recomputed from scratch),
   until the request fits or has preempted itself; then the running pass stops.
2. **Waiting requests** (only if nothing was preempted this step), FCFS, while budget and
   ``max_num_seqs`` allow: the prefix lookup happens here (at admission, as in vLLM); the
   request's chunk is sized by what the hit leaves; it is admitted only if the manager can
   reserve the chunk's blocks, else the pass stops (head-of-line blocking, as in vLLM). A
   preempted request is re-admitted as one prefill of its prompt and generated tokens
   (:func:`~memshare.request.resumed_info`), all of whose blocks must fit at once.
3. The executor runs the step, then calls :meth:`Scheduler.complete` with the tokens it
   sampled (``update_from_output`` in vLLM): the manager first **commits** the blocks that
   filled (the policy decides on them now, from KV the step wrote), then every request whose
   ``num_computed`` reached ``num_tokens`` takes its sampled token; a request that sampled a
   stop id or reached ``max_tokens`` finishes and frees its blocks.

Every allocation, hit, share and free goes through the manager, which executes the policy's
decisions: the scheduler never reasons about cache contents itself. It reads no clock:
executors stamp times.

Invariants: the tokens of one step never exceed ``max_num_batched_tokens``; at most
``max_num_seqs`` requests run; a request is in exactly one of ``waiting`` / ``running``
(or finished); every running request is admitted in the manager and no waiting one is.

Prompt tokens a policy reuses past the prefix hit (KVShare's ``PrefixHit.spans``) take
budget and blocks like any other, but each chunk lists those that fall into it (``spans``,
counted in ``reused`` and in the manager's ``reused_tokens`` when scheduled): their KV is
copied, not computed. The manager holds the spans' source blocks from admission until the step
that copies the last span.

Decode fast path: while a request decodes past its prompt, ``allocate_slots`` has nothing to
do until its next block fills or a new block is needed. The scheduler counts such tokens in
``Request.lag`` and tells the manager the sum when something happens (or before a free),
which is exactly what the manager would have done token by token. When nothing waits and
every running request decodes tokens that are not known, only counted, a cost-model executor
may run many steps at once (:class:`~memshare.decode_burst.DecodeBurst`), touching only the
requests that need the manager or finish in each. Both shortcuts are checked against the
plain path (``fast_decode=False``) for identical files.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from memshare.errors import InputError
from memshare.kv_manager import KVCacheManager
from memshare.policy import PrefixHit, RequestInfo, ReusedSpan
from memshare.request import Request, resumed_info


@dataclass(frozen=True)
class SchedulerConfig:
    """vLLM v1 scheduler limits (``--max-num-batched-tokens`` etc.)."""

    max_num_batched_tokens: int = 8192  # token budget per step
    max_num_seqs: int = 256  # running requests at most
    enable_chunked_prefill: bool = True  # split long prompts over steps
    long_prefill_token_threshold: int = 0  # cap on one request's chunk (0: no cap)
    # admit a waiting request only if all its tokens so far fit, not just its first chunk
    # (vLLM 0.32's scheduler_reserve_full_isl, on by default there)
    reserve_full_prompt: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0:
            raise InputError("--max-num-batched-tokens", "must be > 0", "e.g. 8192")
        if self.max_num_seqs <= 0:
            raise InputError("--max-num-seqs", "must be > 0", "e.g. 256")
        if self.long_prefill_token_threshold < 0:
            raise InputError("--long-prefill-threshold", "must be >= 0", "0 disables it")


@dataclass(slots=True)
class Chunk:
    """One request's share of a step: tokens ``start .. start + num_tokens - 1``."""

    req: Request  # the scheduled request
    start: int  # logical position of its first token this step (= tokens computed before)
    num_tokens: int  # tokens scheduled (computed, or copied where ``reused``)
    reused: int = 0  # of which this many have KV copied by the policy (KVShare): ``spans``
    samples: bool = False  # the chunk reaches ``num_tokens``: a token is sampled after it
    spans: tuple[ReusedSpan, ...] = ()  # the reused positions, clipped to the chunk


@dataclass(slots=True)
class StepPlan:
    """What one step computes; executors derive their batch (or batch shape) from it."""

    chunks: list[Chunk] = field(default_factory=list)  # scheduled requests, in order
    preempted: int = 0  # requests preempted while building this step
    admitted: int = 0  # waiting requests admitted this step
    # Compact decodes (``Scheduler(compact_decodes=True)``): requests decoding one token of
    # which nothing is known and with which nothing happens (no block, no finish) are listed
    # here instead of as chunks, each a decode chunk ``Chunk(req, c, 1, 0, True)``; their
    # context tokens in all (``sum c + 1``) are ``quiet_kv``.
    quiet: list[Request] = field(default_factory=list)
    quiet_kv: int = 0

    @property
    def empty(self) -> bool:
        """Nothing scheduled."""
        return not self.chunks and not self.quiet

    @property
    def num_tokens(self) -> int:
        """Tokens scheduled in all."""
        return sum(c.num_tokens for c in self.chunks) + len(self.quiet)


class Scheduler:
    """Continuous batching with chunked prefill, FCFS and preemption by recompute."""

    def __init__(
        self,
        cfg: SchedulerConfig,
        manager: KVCacheManager,
        *,
        fast_decode: bool = True,
        compact_decodes: bool = False,
    ) -> None:
        self.cfg = cfg
        self.manager = manager
        self.fast_decode = fast_decode  # use the decode fast path (same results, faster)
        # list quiet decodes of token-less requests in ``StepPlan.quiet`` (cost-model executors)
        self.compact_decodes = compact_decodes and fast_decode
        self.block_size = manager.block_size
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests go to the front
        self.running: list[Request] = []  # admission order (newest last)
        self.num_preemptions = 0  # total over the run

    def add(self, req: Request) -> None:
        """A new request joins the back of the waiting queue."""
        self.waiting.append(req)

    @property
    def idle(self) -> bool:
        """No request is waiting or running."""
        return not self.waiting and not self.running

    # ----------------------------------------------------------------- one step
    def schedule(self) -> StepPlan:
        """Choose this step's requests and tokens; reserve their blocks (see module doc):
        running requests first, then (if none was preempted) waiting ones."""
        plan = StepPlan()
        budget = self._schedule_running(plan, self.cfg.max_num_batched_tokens)
        self._schedule_waiting(plan, budget)
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        """Step 1: the running requests' chunks, in order, preempting the newest where the
        blocks do not fit; returns the token budget left."""
        thr = self.cfg.long_prefill_token_threshold
        running = self.running
        compact = self.compact_decodes
        quiet = plan.quiet
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            c = req.num_computed
            want = req.prompt_len + req.num_output
            n = want - c
            if 0 < thr < n:
                n = thr
            if n > budget:
                n = budget
            if n <= req.quiet - req.lag:  # decode fast path: nothing for the manager to do
                req.lag += n
                if (  # a token-less decode that does not finish: counted, no chunk
                    compact
                    and n == 1
                    and c + 1 == want
                    and req.num_output + 1 < req.max_tokens
                    and req.token_ids is None
                    and not req.stop_ids
                    and not req.reuse_spans
                ):
                    req.num_computed = want
                    quiet.append(req)
                    plan.quiet_kv += want
                    budget -= 1
                    i += 1
                    continue
            else:
                ok = self._allocate(req, n)
                while not ok:
                    victim = running.pop()
                    self._preempt(victim)
                    plan.preempted += 1
                    if victim is req:
                        break
                    ok = self._allocate(req, n)
                if not ok:
                    break
            self._add_chunk(plan, req, c, n, want)
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        """Step 2: admit waiting requests FCFS (prefix lookup at admission) while nothing was
        preempted this step and budget and ``max_num_seqs`` allow; stop at the first that
        does not fit (head-of-line blocking)."""
        mgr = self.manager
        running = self.running
        waiting = self.waiting
        while not plan.preempted:
            head = self._head_chunk(budget)
            if head is None:
                break
            req, info, hit, n = head
            full = req.num_tokens if self.cfg.reserve_full_prompt else None
            if mgr.admit(info, n, req.block_info, hit=hit, reserve_tokens=full) is None:
                break
            waiting.popleft()
            running.append(req)
            req.state = mgr.requests[req.rid]
            req.lag = 0
            self._set_quiet(req)
            req.reuse_spans = hit.spans
            c = hit.num_tokens
            if req.hit_tokens < 0:
                req.hit_tokens = c
                req.hit_blocks = len(hit.blocks)
            self._add_chunk(plan, req, c, n, req.num_tokens)
            budget -= n
            plan.admitted += 1

    def _head_chunk(self, budget: int) -> tuple[Request, RequestInfo, PrefixHit, int] | None:
        """The head of the waiting queue, what it admits (prompt, or prompt and generated
        tokens after a preemption), its prefix hit and the tokens its first chunk takes; None
        where budget, ``max_num_seqs`` or chunking rules out an admission this step."""
        cfg = self.cfg
        if not self.waiting or budget <= 0 or len(self.running) >= cfg.max_num_seqs:
            return None
        req = self.waiting[0]
        info = req.info if req.num_output == 0 else resumed_info(req)
        hit = self.manager.lookup(info)
        n = req.num_tokens - hit.num_tokens
        thr = cfg.long_prefill_token_threshold
        if 0 < thr < n:
            n = thr
        if not cfg.enable_chunked_prefill and n > budget and req.num_output == 0:
            return None
        return req, info, hit, min(n, budget)

    def admissible(self, budget: int) -> bool:
        """Whether step 2 would admit the head of the waiting queue now, with ``budget``
        tokens left and nothing preempted (changes nothing; a policy's lookup is read-only)."""
        head = self._head_chunk(budget)
        if head is None:
            return False
        req, info, hit, n = head
        full = req.num_tokens if self.cfg.reserve_full_prompt else None
        return self.manager.admits(info, n, hit, full)

    def _add_chunk(self, plan: StepPlan, req: Request, c: int, n: int, want: int) -> None:
        """Schedule ``n`` tokens of ``req`` after its ``c`` computed ones into ``plan``."""
        end = c + n
        req.num_computed = end
        if not req.reuse_spans:
            plan.chunks.append(Chunk(req, c, n, 0, end == want))
            return
        spans: list[ReusedSpan] = []
        for sp in req.reuse_spans:
            if sp.start >= end:
                break
            a, b = max(sp.start, c), min(sp.start + sp.length, end)
            if a < b:
                spans.append(ReusedSpan(a, b - a, sp.source, sp.offset + a - sp.start))
        req.reuse_spans = tuple(sp for sp in req.reuse_spans if sp.start + sp.length > end)
        reused = sum(sp.length for sp in spans)
        self.manager.stats.reused_tokens += reused
        plan.chunks.append(Chunk(req, c, n, reused, end == want, tuple(spans)))

    def complete(
        self, plan: StepPlan, sampled: Sequence[int | None] | None = None
    ) -> list[Request]:
        """After the step ran: commit the blocks it filled, take the sampled tokens, finish
        requests; returns the finished, in plan order.

        ``sampled[j]`` is the token chunk ``j`` of ``plan`` sampled (read only where the chunk
        ``samples``); ``None`` (or no list) means the token is not known and only counted.
        """
        mgr = self.manager
        if mgr.after_step:  # else the policy was asked at reservation: nothing to commit
            for chunk in plan.chunks:
                req = chunk.req
                if req.lag == 0 and req.state is not None:
                    mgr.commit(req.rid)
        for req in plan.quiet:  # their tokens are only counted; none finishes
            req.num_output += 1
        finished: list[Request] = []
        for j, chunk in enumerate(plan.chunks):
            req = chunk.req
            st = req.state
            if st is not None and st.reuse_pins and not req.reuse_spans:
                mgr.release_reuse(req.rid)  # every reused span has been copied
            if req.num_computed == req.prompt_len + req.num_output:
                req.append_token(None if sampled is None else sampled[j])
                if req.finish_reason:
                    finished.append(req)
        return self._retire(finished)

    # ----------------------------------------------------------------- internals
    def _retire(self, finished: list[Request]) -> list[Request]:
        """Free ``finished`` requests' blocks (in order) and take them off ``running``."""
        for req in finished:
            self._release(req)
        if finished:
            self.running = [r for r in self.running if not r.finish_reason]
        return finished

    def _allocate(self, req: Request, n: int) -> bool:
        """Tell the manager about ``req``'s lagging tokens plus ``n`` new ones."""
        if not self.manager.allocate_slots(req.rid, req.lag + n):
            return False
        req.lag = 0
        self._set_quiet(req)
        return True

    def _set_quiet(self, req: Request) -> None:
        """How many tokens ``allocate_slots`` could now take with no effect but a count.

        Only past the prompt (no copy-on-write or hashed tail pending): until the table needs
        a new block, or the current last block becomes full where the policy must hear of it
        (:meth:`~memshare.kv_manager.KVCacheManager.asks_from`; else its fill only moves
        counters, caught up at the next call or at the request's release).
        """
        st = req.state
        assert st is not None
        if st.cow_tail or st.num_tokens < req.prompt_len or not self.fast_decode:
            req.quiet = 0
            return
        bs = self.block_size
        room = len(st.table) * bs - st.num_tokens  # tokens that fit without a new block
        full = st.num_tokens // bs
        if st.num_full > full:
            full = st.num_full
        quiet = room
        if self.manager.asks_from(st, full):
            to_full = (full + 1) * bs - st.num_tokens - 1
            if to_full < quiet:
                quiet = to_full
        req.quiet = quiet if quiet > 0 else 0

    def _release(self, req: Request) -> None:
        """Free a request's blocks in the manager. Lagging tokens are told first: they need
        no block, but may have filled blocks the manager counts (nobody is asked about them)."""
        if req.lag:
            self.manager.allocate_slots(req.rid, req.lag)
        self.manager.free(req.rid)
        req.state = None
        req.lag = req.quiet = 0

    def _preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and put it at the front of the waiting queue (recompute)."""
        self._release(req)
        req.num_computed = 0
        req.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
