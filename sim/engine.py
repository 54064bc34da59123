"""The SimPy engine: arrival processes feed the scheduler; one process runs the steps.

The engine loop is one SimPy process: while requests remain, it asks the scheduler for a step
(:meth:`~memshare.scheduler.Scheduler.schedule`), holds for the step's cost-model time,
then completes the step (tokens sampled, requests finished and freed). When nothing is waiting
or running it sleeps until the next arrival. Every step appends one row to the timeline.

Invariants: simulated time only moves forward; each step's duration is the cost model's for
the batch that step ran; a request that can never fit the KV budget (more blocks than the
whole pool) is rejected at arrival and counted, never run; the run ends when every request is
finished or rejected. Nothing here reads a wall clock except to report wall time.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from memshare.block_pool import BlockPool
from memshare.decode_burst import DecodeBurst
from memshare.kv_manager import cdiv
from memshare.request import Request
from memshare.scheduler import Scheduler, StepPlan
from memshare.sim.arrivals import arrival_times, closed_loop_client, open_loop
from memshare.sim.config import ArrivalSpec
from memshare.sim.cost_model import BatchShape, CostModel, plan_shape
from memshare.sim.sparse_gc import sparse_gc
from memshare.sim.workload import SimRequest

Progress = Callable[[int], None]  # called with the number of requests done so far
TIMELINE_COLUMNS = (
    "step",
    "time_s",
    "dt_s",
    "running",
    "waiting",
    "scheduled_seqs",
    "scheduled_tokens",
    "prefill_tokens",
    "decode_seqs",
    "admitted",
    "preempted",
    "finished",
    "kv_blocks_live",
    "kv_blocks_cached",
)


@dataclass
class Timeline:
    """One row per step (columns as lists while running)."""

    time_s: list[float] = field(default_factory=list)  # simulated time the step starts
    dt_s: list[float] = field(default_factory=list)  # the step's duration
    running: list[int] = field(default_factory=list)  # running requests after scheduling
    waiting: list[int] = field(default_factory=list)  # waiting requests after scheduling
    scheduled_seqs: list[int] = field(default_factory=list)  # sequences in the batch
    scheduled_tokens: list[int] = field(default_factory=list)  # tokens in the batch
    prefill_tokens: list[int] = field(default_factory=list)  # of which in multi-token chunks
    decode_seqs: list[int] = field(default_factory=list)  # sequences computing one token
    admitted: list[int] = field(default_factory=list)  # waiting requests admitted
    preempted: list[int] = field(default_factory=list)  # requests preempted
    finished: list[int] = field(default_factory=list)  # requests finished at the step's end
    live_pages: list[int] = field(default_factory=list)  # pages held by running requests
    cached_pages: list[int] = field(default_factory=list)  # pages only the prefix cache holds

    def __len__(self) -> int:
        return len(self.time_s)


@dataclass
class EngineResult:
    """What one run produced (metrics are computed from it)."""

    requests: list[SimRequest]  # every request, trace order
    timeline: Timeline  # one row per step
    sim_time_s: float  # simulated time at the end of the last step
    wall_s: float  # wall-clock seconds the run took
    steps: int  # engine steps
    preemptions: int  # preemptions in all
    pages_per_block: int  # pages of one full block (2 x layers of the pool)
    request_pages_shared: dict[str, int]  # request -> pages its shares repointed (if any)


@dataclass
class BurstRows:
    """The timeline rows of a decode burst's steps, the columns that vary (``seqs``: the
    running requests, each decoding one token); :meth:`flush` appends them all at once."""

    times: list[float] = field(default_factory=list)
    dts: list[float] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    live: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)

    def flush(self, tl: Timeline, waiting: int) -> None:
        """Append the rows to ``tl``: every running request decodes one token, nothing is
        admitted or preempted, ``waiting`` requests wait throughout."""
        k = len(self.times)
        zeros = [0] * k
        tl.time_s += self.times
        tl.dt_s += self.dts
        for col in (tl.running, tl.scheduled_seqs, tl.scheduled_tokens, tl.decode_seqs):
            col += self.seqs
        tl.waiting += [waiting] * k
        tl.prefill_tokens += zeros
        tl.admitted += zeros
        tl.preempted += zeros
        tl.finished += self.finished
        tl.live_pages += self.live
        tl.cached_pages += self.cached


class Engine:
    """Wires arrivals, scheduler and cost model into one SimPy environment."""

    def __init__(
        self,
        requests: Sequence[SimRequest],
        scheduler: Scheduler,
        cost: CostModel,
        arrival: ArrivalSpec,
        *,
        time_scale: float = 1.0,
        seed: int = 0,
        trace_times: Sequence[float] | None = None,
        progress: Progress | None = None,
        check_invariants: bool = False,
    ) -> None:
        self.requests = list(requests)
        self.sched = scheduler
        self.cost = cost
        self.pool: BlockPool = scheduler.manager.pool
        self.env = simpy.Environment()
        self.timeline = Timeline()
        self.progress = progress
        self.check_invariants = check_invariants
        self.n_done = 0
        self._wake: simpy.Event | None = None
        self._times: list[float] = []  # open loop: arrival times in order (closed loop: none)
        self._next = 0  # open loop: index of the next arrival
        self._resubmit_at = -math.inf  # closed loop: when a client last got its answer
        self._answered = False  # closed loop: a client got its answer since the last yield
        self._handed: StepPlan | None = None  # a step a decode burst began, to run plainly
        # a decode burst that stopped before an arrival, its requests not caught up (only
        # the waiting queue changes until the next step, which goes on with it)
        self._paused: DecodeBurst | None = None
        pool = self.pool
        self._capacity = pool.num_pages // pool.pages_per_block  # blocks the pool can hold
        self._chunked = scheduler.cfg.enable_chunked_prefill
        self._budget = scheduler.cfg.max_num_batched_tokens
        env = self.env
        self._closed = arrival.mode == "closed"
        if self._closed:
            assert arrival.clients is not None
            source = iter(self.requests)
            for _ in range(arrival.clients):
                env.process(closed_loop_client(env, source, self._submit_now))
        else:
            times = arrival_times(
                arrival,
                trace_times if trace_times is not None else [0.0] * len(self.requests),
                time_scale,
                seed,
            )
            order = np.argsort(times, kind="stable")
            reqs = [self.requests[i] for i in order.tolist()]
            sorted_times = times[order]
            for req, t in zip(reqs, sorted_times.tolist(), strict=True):
                req.arrival = t
            self._times = sorted_times.tolist()
            env.process(open_loop(env, reqs, sorted_times, self._submit_open))
        env.process(self._loop())

    def run(self) -> EngineResult:
        """Run to completion; return the requests, timeline and totals."""
        t0 = time.perf_counter()
        with sparse_gc():
            self.env.run()
        wall = time.perf_counter() - t0
        if self.progress is not None:
            self.progress(self.n_done)
        if self.n_done != len(self.requests):
            raise RuntimeError(f"simulation stalled: {self.n_done}/{len(self.requests)} done")
        return EngineResult(
            self.requests,
            self.timeline,
            float(self.env.now),
            wall,
            len(self.timeline),
            self.sched.num_preemptions,
            2 * self.pool.num_layers,
            dict(self.sched.manager.stats.request_pages_shared),
        )

    # ----------------------------------------------------------------- arrivals
    def _submit_open(self, req: SimRequest) -> None:
        self._next += 1
        self._submit(req)

    def _submit_now(self, req: SimRequest) -> None:
        req.arrival = float(self.env.now)
        self._submit(req)

    def _submit(self, req: SimRequest) -> None:
        reason = self._rejection(req)
        if reason:
            req.rejected = reason
            self._done(req)
        else:
            self.sched.add(req)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _rejection(self, req: SimRequest) -> str:
        """Why ``req`` can never run under this budget (``""`` if it can)."""
        bs = self.sched.block_size
        need = cdiv(req.prompt_len + req.output_len - 1, bs) + 1  # + a copy-on-write block
        if need > self._capacity:
            return f"needs {need} KV blocks, the budget holds {self._capacity}"
        if not self._chunked and req.prompt_len > self._budget:
            return f"prompt of {req.prompt_len} tokens > max_num_batched_tokens without chunking"
        return ""

    def _finish(self, finished: list[Request]) -> None:
        """Stamp the requests the scheduler finished at the end of this step, then count
        them done."""
        now = self.env.now
        for r in finished:
            req = _sim(r)
            req.finish = now
            self._done(req)

    def _done(self, req: SimRequest) -> None:
        self.n_done += 1
        if req.done is not None:
            req.done.succeed()
            self._resubmit_at = self.env.now  # its client sends the next once we yield
            self._answered = True

    # ----------------------------------------------------------------- decode bursts
    def _next_arrival(self, now: float) -> float:
        """When the next request arrives (open loop), or a closed-loop client answered during
        the step that ends now submits its next; ``inf`` if none is known."""
        nxt = self._times[self._next] if self._next < len(self._times) else math.inf
        if self._resubmit_at >= now:  # a closed-loop client submits during this step
            nxt = min(nxt, self._resubmit_at)
        return nxt

    def _burst(self, burst: DecodeBurst, now: float) -> Generator[Any, Any, bool]:
        """Run quiet decode steps back to back (:class:`~memshare.decode_burst.DecodeBurst`):
        the same rows, times and outcome as one :meth:`Scheduler.schedule` /
        :meth:`Scheduler.complete` pair per step. Stops before a step that would start at or
        after the next arrival (which that step must see), before one that would preempt, and
        after one that answers a closed-loop client; False if no step ran."""
        sched, pool, tl = self.sched, self.pool, self.timeline
        nxt = self._next_arrival(now)
        step_time = self.cost.decode_time
        closed = self._closed
        rows = BurstRows()
        waiting = len(sched.waiting)  # no arrival lands inside a burst (a handover admits)
        t = now
        last: list[Request] = []  # closed loop: requests the last step finished
        while sched.running and (t < nxt or not rows.times):
            quiet = burst.next_event() - burst.j
            if quiet > 0:
                t = self._quiet_steps(burst, rows, t, nxt, quiet)
                continue
            if not burst.schedule():
                break
            r = burst.r
            if burst.check and sched.waiting and sched.admissible(self._budget - r):
                self._handed = burst.handover()  # this step admits: a plain step from here
                break
            dt = step_time(r, burst.kv)
            rows.times.append(t)
            rows.dts.append(dt)
            rows.seqs.append(r)
            live = pool.pinned_pages
            rows.live.append(live)
            rows.cached.append(pool.used_pages - live)
            t = t + dt  # what SimPy's clock will read at the step's end
            finished = burst.complete()
            rows.finished.append(len(finished))
            if finished and closed:
                last = finished
                break
            for req in finished:  # open loop: nobody waits on them
                _sim(req).finish = t
                self._done(_sim(req))
        if sched.running and t >= nxt and not closed and self._handed is None and rows.times:
            self._paused = burst  # stopped for an arrival: the next step goes on with it
        else:
            burst.close()
        if not rows.times:
            return False
        rows.flush(tl, waiting)
        if now + (t - now) == t:  # one event instead of one per step, same clock
            yield self.env.timeout(t - now)
        else:
            for dt in rows.dts:
                yield self.env.timeout(dt)
        self._finish(last)
        if self.check_invariants:
            pool.check(sched.manager.table_refs())
        return True

    def _quiet_steps(
        self, burst: DecodeBurst, rows: BurstRows, t: float, nxt: float, m: int
    ) -> float:
        """Run up to ``m`` quiet steps of ``burst`` from ``t`` (the first always, the others
        only while they start before ``nxt``) into ``rows``; their rows differ only in time
        and duration. Returns the time the last one ends."""
        pool = self.pool
        step_time = self.cost.decode_time
        r, kv = burst.r, burst.kv
        times, dts = rows.times, rows.dts
        k0 = len(times)
        while True:
            dt = step_time(r, kv)
            times.append(t)
            dts.append(dt)
            t = t + dt  # what SimPy's clock will read at the step's end
            kv += r
            if len(times) - k0 == m or t >= nxt:
                break
        k = len(times) - k0
        burst.skip(k)
        live = pool.pinned_pages
        rows.seqs += [r] * k
        rows.live += [live] * k
        rows.cached += [pool.used_pages - live] * k
        rows.finished += [0] * k
        return t

    # ----------------------------------------------------------------- steps
    def _row(self, now: float, dt: float, shape: BatchShape, plan: StepPlan) -> None:
        """Append a step's timeline row (all columns but ``finished``), before it runs."""
        sched, tl = self.sched, self.timeline
        tl.time_s.append(now)
        tl.dt_s.append(dt)
        tl.running.append(len(sched.running))
        tl.waiting.append(len(sched.waiting))
        tl.scheduled_seqs.append(shape.num_seqs)
        tl.scheduled_tokens.append(shape.num_tokens)
        tl.prefill_tokens.append(shape.prefill_tokens)
        tl.decode_seqs.append(shape.decode_seqs)
        tl.admitted.append(plan.admitted)
        tl.preempted.append(plan.preempted)
        live = self.pool.pinned_pages
        tl.live_pages.append(live)
        tl.cached_pages.append(self.pool.used_pages - live)

    def _loop(self) -> Generator[Any, Any, None]:
        env, sched, cost, pool, tl = self.env, self.sched, self.cost, self.pool, self.timeline
        n_total = len(self.requests)
        for step in itertools.count():
            if self.n_done >= n_total:
                return
            if self._answered:  # let the clients answered by the last step send their next
                self._answered = False  # request now, so that the next step sees it (a
                yield env.timeout(0)  # server schedules what has arrived by its start)
                continue
            if sched.idle:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            now = env.now
            burst, self._paused = self._paused, None
            if burst is not None:
                burst.resume()
            else:
                burst = DecodeBurst.start(sched)
            if burst is not None and (yield from self._burst(burst, now)):
                if self._handed is None:
                    continue
                now = env.now  # the burst ended inside a step that starts now
            plan = self._handed if self._handed is not None else sched.schedule()
            self._handed = None
            if plan.empty:
                raise RuntimeError(
                    f"scheduler made no progress at t={now}: {len(sched.running)} running, "
                    f"{len(sched.waiting)} waiting"
                )
            for chunk in plan.chunks[len(plan.chunks) - plan.admitted :]:  # admitted last
                req = _sim(chunk.req)
                if math.isnan(req.first_scheduled):
                    req.first_scheduled = now
            shape = plan_shape(plan)
            q = len(plan.quiet)
            if q:  # compact decodes: one-token chunks, each sampling (ints: order-free)
                shape.num_seqs += q
                shape.num_tokens += q
                shape.num_sampled += q
                shape.decode_seqs += q
                shape.decode_kv_tokens += plan.quiet_kv
            dt = cost.step_time(shape)
            self._row(now, dt, shape, plan)
            yield env.timeout(dt)
            finished = sched.complete(plan)
            end = env.now
            for chunk in plan.chunks:
                if chunk.samples and chunk.req.num_output == 1:
                    req = _sim(chunk.req)
                    if math.isnan(req.first_token):
                        req.first_token = end
            tl.finished.append(len(finished))
            self._finish(finished)
            if self.check_invariants:
                pool.check(sched.manager.table_refs())
            if self.progress is not None and step % 512 == 0:
                self.progress(self.n_done)


def _sim(req: Request) -> SimRequest:
    """The simulator schedules only its own requests."""
    assert isinstance(req, SimRequest)
    return req
