"""Decode bursts: many scheduler steps at once while every running request decodes.

A cost-model executor (the simulator) knows no tokens, only counts, so a step in which nothing
waits and every running request decodes one token is decided by very little: which requests
need the manager this step (their ``quiet`` tokens ran out: a block filled or a new one is
needed) and which finish. :class:`DecodeBurst` runs such steps one by one but touches only
those requests; every other request is caught up lazily, in one addition, when it next needs
the manager, finishes, or the burst ends.

Invariant: after :meth:`DecodeBurst.close`, the scheduler, the manager, the pool and every
request are exactly as the same number of :meth:`~memshare.scheduler.Scheduler.schedule` /
:meth:`~memshare.scheduler.Scheduler.complete` pairs (with unknown tokens) would leave them,
and the manager saw the same calls in the same order: within a step, reservations in running
order, then commits, then frees of the finished in running order. A step whose reservations
the pool could not all supply is not run (:meth:`DecodeBurst.schedule` returns False and
changes nothing): the plain path preempts there.
"""

from __future__ import annotations

import heapq

from memshare.request import Request
from memshare.scheduler import Chunk, Scheduler, StepPlan


class DecodeBurst:
    """Quiet-decode steps of every running request, run lazily (module doc).

    ``r`` and ``kv`` are the running requests and their context tokens in all (``sum c + 1``)
    of the next step; ``j`` counts the steps run.
    """

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.j = 0  # steps run so far
        reqs = list(sched.running)
        self._reqs = reqs  # running order at the start: a request's rank is its index
        self._base = [0] * len(reqs)  # first step not yet applied to each request
        self._due: dict[int, list[int]] = {}  # step -> ranks whose quiet tokens run out then
        self._ends: dict[int, list[int]] = {}  # step -> ranks that finish at its end
        self._now: list[int] = []  # ranks that reserved blocks in the current step
        self._steps: list[int] = []  # heap of the steps in ``_due`` or ``_ends`` (stale ok)
        self._dirty = True  # the pool changed since the last admission check (or none yet)
        self._handed = False  # the burst ended inside a step (:meth:`handover`)
        self.check = False  # this step must check whether the waiting head is admitted
        self.r = len(reqs)
        kv = 0
        due, ends = self._due, self._ends
        for rank, req in enumerate(reqs):
            kv += req.num_computed + 1
            last = req.max_tokens - req.num_output - 1  # the step whose token is its last
            ends.setdefault(last, []).append(rank)
            if req.quiet - req.lag <= last:
                due.setdefault(req.quiet - req.lag, []).append(rank)
        self.kv = kv
        self._steps = list(due.keys() | ends.keys())
        heapq.heapify(self._steps)

    def _add(self, book: dict[int, list[int]], step: int, rank: int) -> None:
        """Note that ``rank`` acts at ``step`` (in ``_due`` or ``_ends``)."""
        ranks = book.get(step)
        if ranks is None:
            book[step] = [rank]
            heapq.heappush(self._steps, step)
        else:
            ranks.append(rank)

    def next_event(self) -> int:
        """The first step (``>= j``) in which some request needs the manager or finishes;
        the steps before it are quiet (:meth:`skip`)."""
        steps, j, due, ends = self._steps, self.j, self._due, self._ends
        if self._dirty and self.sched.waiting:  # this step checks the waiting queue's head
            return j
        while steps and (steps[0] < j or (steps[0] not in due and steps[0] not in ends)):
            heapq.heappop(steps)
        return steps[0] if steps else 1 << 62

    def skip(self, k: int) -> None:
        """Run ``k`` quiet steps (none of them reaches :meth:`next_event`): every request
        decodes one token, nothing else happens."""
        self.j += k
        self.kv += k * self.r

    @staticmethod
    def start(sched: Scheduler) -> DecodeBurst | None:
        """A burst from the scheduler's state, or ``None`` where its next step is not one: a
        request waits, or a running one is not a pure decode of unknown tokens (prefill,
        known tokens, stop ids, reused spans held), or the fast path is off."""
        running = sched.running
        if not running or not sched.fast_decode or len(running) > sched.cfg.max_num_batched_tokens:
            return None
        for req in reversed(running):  # the newest (still prefilling, if any) first
            st = req.state
            if (
                req.num_computed != req.prompt_len + req.num_output - 1
                or req.token_ids is not None
                or req.stop_ids
                or st is None
                or st.reuse_pins
            ):
                return None
        return DecodeBurst(sched)

    def _catch_up(self, rank: int, step: int) -> Request:
        """Apply the quiet steps ``base .. step - 1`` of one request: what ``schedule`` (``lag``
        and ``num_computed``) and ``complete`` (``num_output``) did to it in each."""
        req = self._reqs[rank]
        d = step - self._base[rank]
        if d:
            req.num_computed += d
            req.lag += d
            req.num_output += d
            self._base[rank] = step
        return req

    def schedule(self) -> bool:
        """Reserve this step's blocks, in running order, for the requests whose quiet tokens
        ran out; False (nothing changed) if the pool cannot supply them all."""
        j = self.j
        due = self._due.pop(j, None)
        self._now = []
        self.check = self._dirty
        self._dirty = False
        if not due:
            return True
        sched = self.sched
        mgr = sched.manager
        if len(due) > 1:  # all of the step's reservations must fit, or none is made
            due.sort()
            # each needs at most 2 blocks: one for the token past its quiet run (which ended
            # where its table did, or earlier), one copy-on-write; count exactly only if the
            # pool could not supply that many
            if not mgr.pool.can_allocate(2 * len(due)):
                need = 0
                for rank in due:
                    req = self._reqs[rank]
                    need += mgr.num_blocks_needed(req.rid, req.lag + j - self._base[rank] + 1)
                if need and not mgr.pool.can_allocate(need):
                    self._due[j] = due
                    return False
        elif not mgr.allocate_slots(
            self._reqs[due[0]].rid, self._reqs[due[0]].lag + j - self._base[due[0]] + 1
        ):  # one reservation: it fails changing nothing
            self._due[j] = due
            return False
        else:  # it is made: only the scheduler's side is left
            req = self._catch_up(due[0], j)
            req.lag = 0
            sched._set_quiet(req)
            req.num_computed += 1
            nxt = j + 1 + req.quiet
            if nxt < req.max_tokens - req.num_output + j:  # before it finishes
                self._add(self._due, nxt, due[0])
            self._now = due
            self.check = True
            return True
        for rank in due:
            req = self._catch_up(rank, j)
            if not sched._allocate(req, 1):  # the pool check above admitted it
                raise RuntimeError(f"the pool refused blocks it admitted for {req.rid!r}")
            req.num_computed += 1  # its token of this step, sampled at completion
            nxt = j + 1 + req.quiet
            if nxt < req.max_tokens - req.num_output + j:  # before it finishes
                self._add(self._due, nxt, rank)
        self._now = due
        self.check = True
        return True

    def complete(self) -> list[Request]:
        """Finish this step: commit the blocks it filled (policies deciding after the step),
        finish the requests whose last token it was (freed in running order); returns them."""
        j = self.j
        sched = self.sched
        mgr = sched.manager
        if mgr.after_step:
            for rank in self._now:
                mgr.commit(self._reqs[rank].rid)
            self._dirty = bool(self._now)
        for rank in self._now:
            self._reqs[rank].num_output += 1
            self._base[rank] = j + 1
        self.j = j + 1
        self.kv += self.r
        ranks = self._ends.pop(j, None)
        if not ranks:
            return []
        self._dirty = True
        ranks.sort()
        finished: list[Request] = []
        for rank in ranks:
            req = self._catch_up(rank, j + 1)
            req.finish_reason = "length"
            finished.append(req)
            self.kv -= req.num_computed + 1
        self.r -= len(finished)
        return sched._retire(finished)

    def resume(self) -> None:
        """Go on after a pause in which requests may have joined the waiting queue (nothing
        else changed): the next step checks whether the queue's head is admitted."""
        self._dirty = True

    def close(self) -> None:
        """Catch every request up to the steps run (the burst ends here)."""
        if self._handed:
            return
        for rank, req in enumerate(self._reqs):
            if not req.finish_reason:
                self._catch_up(rank, self.j)

    def handover(self) -> StepPlan:
        """End the burst inside its current step, whose reservations :meth:`schedule` made:
        schedule the step's quiet tokens, admit waiting requests (step 2) and return the
        step's plan, for the executor to run and complete as a plain step. A quiet token of a
        request that does not finish with it is listed in ``StepPlan.quiet`` (the scheduler
        of a burst compacts decodes), the others are chunks: only the order of the chunks
        is observable (finishes), and it is the running order either way."""
        j = self.j
        now = set(self._now)
        ends = set(self._ends.get(j, ()))
        plan = StepPlan()
        chunks, quiet = plan.chunks, plan.quiet
        compact = self.sched.compact_decodes
        for rank, req in enumerate(self._reqs):
            if req.finish_reason:
                continue
            if rank in now:  # reserved this step: its token is counted already
                chunks.append(Chunk(req, req.num_computed - 1, 1, 0, True))
                continue
            # a quiet token, as ``_schedule_running`` counts it in ``lag``
            self._catch_up(rank, j)
            c = req.num_computed
            req.num_computed = c + 1
            req.lag += 1
            if rank in ends or not compact:  # its last token: a chunk, which finishes it
                chunks.append(Chunk(req, c, 1, 0, True))
            else:  # a compact decode (``StepPlan.quiet``), as ``schedule`` lists it
                quiet.append(req)
                plan.quiet_kv += c + 1
        self._handed = True
        sched = self.sched
        budget = sched.cfg.max_num_batched_tokens - len(chunks) - len(quiet)  # a token each
        sched._schedule_waiting(plan, budget)
        return plan
