"""A vLLM-v1-like scheduler over :class:`~memshare.kv_manager.KVCacheManager`.

One call of :meth:`Scheduler.schedule` is one engine step, as in vLLM v1's
``Scheduler.schedule``: there is no prefill or decode phase, each request has
``num_computed`` tokens and wants to catch up with ``num_tokens`` (prompt plus generated).

1. **Running requests first**, in order: each gets ``num_tokens - num_computed`` tokens (one
   when decoding, the next chunk of its prompt otherwise), capped by
   ``long_prefill_token_threshold`` and the step's token budget. If the manager cannot
   allocate the blocks, the **newest running request is preempted** (its blocks are freed,
   it goes back to the front of the waiting queue and is later recomputed from scratch),
   until the request fits or has preempted itself; then the running pass stops.
2. **Waiting requests** (only if nothing was preempted this step), FCFS, while budget and
   ``max_num_seqs`` allow: the prefix lookup happens here (at admission, as in vLLM); the
   request's chunk is sized by what the hit leaves; it is admitted only if the manager can
   allocate the chunk's blocks, else the pass stops (head-of-line blocking, as in vLLM). A
   preempted request is re-admitted as one prefill of its prompt and generated tokens
   (:func:`~memshare.sim.workload.resumed_info`), all of whose blocks must fit at once.
3. After the step's simulated time (:meth:`Scheduler.complete`), every request whose
   ``num_computed`` reached ``num_tokens`` samples one token; a request whose last token was
   sampled finishes and frees its blocks.

Every allocation, hit, share and free goes through the manager, which executes the policy's
decisions: the scheduler never reasons about cache contents itself.

Invariants: the tokens of one step never exceed ``max_num_batched_tokens``; at most
``max_num_seqs`` requests run; a request is in exactly one of ``waiting`` / ``running``
(or finished); every running request is admitted in the manager and no waiting one is.

Prompt tokens a policy reuses past the prefix hit (KVShare's ``PrefixHit.reused_tokens``)
take budget and blocks like any other, but the cost model sees them as not computed (their KV
is copied): they are taken off the first chunks after the hit.

Decode fast path: while a request decodes past its prompt, ``allocate_slots`` has nothing to
do until its next block fills or a new block is needed. The scheduler counts such tokens in
``SimRequest.lag`` and tells the manager the sum when something happens (or before a free),
which is exactly what the manager would have done token by token. When nothing waits and
every running request is in that state, :meth:`Scheduler.quiet_burst` says how many such
steps lie ahead and the engine runs them back to back (:meth:`Scheduler.run_burst`): one
timeline row and one simulated step each, without visiting every request every step. Both
shortcuts are checked against the plain path (``fast_decode=False``) for identical files.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from memshare.kv_manager import KVCacheManager
from memshare.sim.config import SchedulerConfig
from memshare.sim.cost_model import BatchShape
from memshare.sim.workload import SimRequest, resumed_info


@dataclass(slots=True)
class StepPlan:
    """What one step computes."""

    reqs: list[SimRequest] = field(default_factory=list)  # scheduled requests, in order
    tokens: list[int] = field(default_factory=list)  # tokens scheduled for each
    shape: BatchShape = field(default_factory=BatchShape)  # aggregates for the cost model
    preempted: int = 0  # requests preempted while building this step
    admitted: int = 0  # waiting requests admitted this step

    @property
    def empty(self) -> bool:
        """Nothing scheduled."""
        return not self.reqs


class Scheduler:
    """Continuous batching with chunked prefill, FCFS and preemption by recompute."""

    def __init__(
        self, cfg: SchedulerConfig, manager: KVCacheManager, *, fast_decode: bool = True
    ) -> None:
        self.cfg = cfg
        self.manager = manager
        self.fast_decode = fast_decode  # use the decode fast path (same results, faster)
        self.block_size = manager.block_size
        self.waiting: deque[SimRequest] = deque()  # FCFS; preempted requests go to the front
        self.running: list[SimRequest] = []  # admission order (newest last)
        self.num_preemptions = 0  # total over the run

    def add(self, req: SimRequest) -> None:
        """A new request joins the back of the waiting queue."""
        self.waiting.append(req)

    @property
    def idle(self) -> bool:
        """No request is waiting or running."""
        return not self.waiting and not self.running

    # ----------------------------------------------------------------- one step
    def schedule(self, now: float) -> StepPlan:
        """Choose this step's requests and tokens; allocate their blocks (see module doc)."""
        cfg = self.cfg
        mgr = self.manager
        budget = cfg.max_num_batched_tokens
        thr = cfg.long_prefill_token_threshold
        plan = StepPlan()
        running = self.running

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
            self._count(plan, req, c, n, want)
            budget -= n
            i += 1

        waiting = self.waiting
        while not plan.preempted and waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            req = waiting[0]
            info = req.info if req.num_output == 0 else resumed_info(req)
            hit = mgr.lookup(info)
            c = hit.num_tokens
            want = req.prompt_len + req.num_output
            n = want - c
            if 0 < thr < n:
                n = thr
            if not cfg.enable_chunked_prefill and n > budget and req.num_output == 0:
                break
            if n > budget:
                n = budget
            if mgr.admit(info, n, req.block_info, hit=hit) is None:
                break
            waiting.popleft()
            running.append(req)
            req.state = mgr.requests[req.rid]
            req.lag = 0
            self._set_quiet(req)
            req.reuse_left = hit.reused_tokens
            if req.hit_tokens < 0:
                req.hit_tokens = c
                req.hit_blocks = len(hit.blocks)
                req.first_scheduled = now
            self._count(plan, req, c, n, want)
            budget -= n
            plan.admitted += 1

        return plan

    @staticmethod
    def _count(plan: StepPlan, req: SimRequest, c: int, n: int, want: int) -> None:
        """Schedule ``n`` tokens of ``req`` after its ``c`` computed ones into ``plan``.

        Tokens whose KV a policy reuses (KVShare) take budget and blocks but are not computed.
        """
        end = c + n
        req.num_computed = end
        plan.reqs.append(req)
        plan.tokens.append(n)
        take = min(n, req.reuse_left)
        req.reuse_left -= take
        plan.shape.add(n - take, c + take, end == want, decode=n == 1 and take == 0)

    def complete(self, plan: StepPlan, now: float) -> list[SimRequest]:
        """End of the step at ``now``: sample tokens, finish requests; returns the finished."""
        finished: list[SimRequest] = []
        for req in plan.reqs:
            if req.num_computed == req.prompt_len + req.num_output:
                req.num_output += 1
                if req.num_output == 1:
                    req.first_token = now
                if req.num_output >= req.output_len:
                    finished.append(req)
        return self._retire(finished, now)

    # ----------------------------------------------------------------- decode bursts
    def quiet_burst(self) -> tuple[int, int]:
        """``(k, kv)``: the next ``k`` steps are pure fast-path decodes of every running request.

        That holds while nothing waits, every running request decodes one token a step within
        its ``quiet`` tokens (the manager and the pool are untouched) and none finishes before
        step ``k``. ``kv`` is the first of those steps' ``decode_kv_tokens``; step ``j``
        (from 0) has ``kv + j * len(running)``. ``(0, 0)`` when no such step is ahead.
        """
        running = self.running
        if self.waiting or not running or len(running) > self.cfg.max_num_batched_tokens:
            return 0, 0
        k = 1 << 62
        kv = 0
        for req in running:
            c = req.num_computed
            if c != req.prompt_len + req.num_output - 1:
                return 0, 0
            room = req.quiet - req.lag
            if room < k:
                k = room
            left = req.output_len - req.num_output
            if left < k:
                k = left
            if k <= 0:
                return 0, 0
            kv += c + 1
        return k, kv

    def run_burst(self, k: int, now: float) -> list[SimRequest]:
        """Apply ``k`` steps of :meth:`quiet_burst` at once, the last ending at ``now``.

        Exactly what ``k`` calls of :meth:`schedule` and :meth:`complete` would do: every
        running request computes ``k`` tokens (counted in ``lag``) and samples ``k``; those
        whose last token that is finish at ``now``.
        """
        finished: list[SimRequest] = []
        for req in self.running:
            req.num_computed += k
            req.lag += k
            req.num_output += k
            if req.num_output >= req.output_len:
                finished.append(req)
        return self._retire(finished, now)

    # ----------------------------------------------------------------- internals
    def _retire(self, finished: list[SimRequest], now: float) -> list[SimRequest]:
        """Finish ``finished`` at ``now`` (in order): free their blocks, leave ``running``."""
        for req in finished:
            req.finish = now
            self._release(req)
        if finished:
            self.running = [r for r in self.running if r.num_output < r.output_len]
        return finished

    def _allocate(self, req: SimRequest, n: int) -> bool:
        """Tell the manager about ``req``'s lagging tokens plus ``n`` new ones."""
        if not self.manager.allocate_slots(req.rid, req.lag + n):
            return False
        req.lag = 0
        self._set_quiet(req)
        return True

    def _set_quiet(self, req: SimRequest) -> None:
        """How many tokens ``allocate_slots`` could now take with no effect but a count.

        Only past the prompt (no copy-on-write or hashed tail pending): until the table needs
        a new block, or the current last block becomes full (the policy must hear of it).
        """
        st = req.state
        if st.cow_tail or st.num_tokens < req.prompt_len or not self.fast_decode:
            req.quiet = 0
            return
        bs = self.block_size
        room = len(st.table) * bs - st.num_tokens  # tokens that fit without a new block
        to_full = (max(st.num_full, st.num_tokens // bs) + 1) * bs - st.num_tokens - 1
        req.quiet = max(0, min(room, to_full))

    def _release(self, req: SimRequest) -> None:
        """Free a request's blocks in the manager (lagging tokens need no telling)."""
        self.manager.free(req.rid)
        req.state = None
        req.lag = req.quiet = 0

    def _preempt(self, req: SimRequest) -> None:
        """Free ``req``'s blocks and put it at the front of the waiting queue (recompute)."""
        self._release(req)
        req.num_computed = 0
        req.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
