"""Arrival processes (SimPy generators): trace timestamps, Poisson, closed loop.

Each process hands requests to ``submit`` in trace order. Trace and Poisson arrivals are open
loop (times fixed in advance, :func:`arrival_times`); a closed loop of ``n`` clients sends a
client's next request the moment its previous one finishes (no think time), so at most ``n``
requests are in the system. Times are seconds of simulated time from 0.

Invariant: the same (spec, trace, seed) always gives the same times (a seeded
:class:`numpy.random.Generator`); :func:`open_loop` takes requests sorted by time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np
import simpy

from memshare.errors import InputError
from memshare.sim.config import ArrivalSpec
from memshare.sim.workload import SimRequest
from memshare.traces.schema import MAX_ARRIVAL_S

Submit = Callable[[SimRequest], None]
MAX_SIM_TIME_S = MAX_ARRIVAL_S  # open-loop arrivals past this are refused


def arrival_times(
    spec: ArrivalSpec, trace_times: Sequence[float], time_scale: float, seed: int
) -> np.ndarray:
    """Open-loop arrival times (s) for requests in trace order; ``trace_times`` are theirs.

    ``trace``: the trace's own times relative to the first, times ``time_scale``;
    ``poisson``: the first at 0, then exponential gaps at ``spec.rate`` per second.
    """
    n = len(trace_times)
    if spec.mode == "trace":
        t = np.asarray(trace_times, dtype=np.float64)
        if n == 0:
            return t
        with np.errstate(over="ignore"):  # refused just below, with its cause
            span = float(t.max() - t.min())
        if not math.isfinite(span) or span > MAX_SIM_TIME_S:
            raise InputError(
                "trace field arrival_s",
                f"arrivals span {span:g} s, past {MAX_SIM_TIME_S:g} s",
                "fix the trace's timestamps (seconds, not ns?)",
            )
        if span * time_scale > MAX_SIM_TIME_S:
            raise InputError(
                "--time-scale",
                f"{time_scale:g} stretches the trace's {span:g} s of arrivals past "
                f"{MAX_SIM_TIME_S:g} s of simulated time",
                "use a smaller --time-scale",
            )
        return np.asarray((t - t.min()) * time_scale, dtype=np.float64)
    if spec.mode == "poisson":
        assert spec.rate is not None
        if (n - 1) / spec.rate > MAX_SIM_TIME_S / 100:
            raise InputError(
                "--arrival",
                f"poisson:{spec.rate:g} spreads {n} requests past {MAX_SIM_TIME_S / 100:g} s "
                "of simulated time",
                "use a higher rate",
            )
        rng = np.random.default_rng(seed)
        gaps = rng.exponential(1.0 / spec.rate, size=max(0, n - 1))
        return np.concatenate([[0.0], np.cumsum(gaps)])
    raise ValueError(f"{spec.mode} arrivals are closed-loop (no fixed times)")


def open_loop(
    env: simpy.Environment, reqs: Sequence[SimRequest], times: np.ndarray, submit: Submit
) -> Generator[Any, Any, None]:
    """Submit ``reqs[i]`` at ``times[i]`` (``times`` non-decreasing)."""
    for req, t in zip(reqs, times.tolist(), strict=True):
        if t > env.now:
            yield env.timeout(t - env.now)
        submit(req)


def closed_loop_client(
    env: simpy.Environment, source: Iterator[SimRequest], submit: Submit
) -> Generator[Any, Any, None]:
    """One client: take the next request, submit it, wait until it is done; repeat."""
    for req in source:
        req.done = env.event()
        submit(req)
        yield req.done
