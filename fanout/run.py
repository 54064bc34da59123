"""The driver's side of a fan-out: :func:`fan_out` takes stored results, hands the rest to
an executor and returns every outcome in job order.

Invariants: outcomes come back in the order of ``jobs`` whatever order they finished in; every
successful outcome is in the store before the next is awaited (a killed driver loses at most
the jobs running); a job that refused its input is an outcome with its one line, and the
other jobs still run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol

from memshare.errors import InputError
from memshare.fanout.jobs import Job, Outcome
from memshare.fanout.store import JobStore
from memshare.fanout.tally import Tally


class Executor(Protocol):
    """Runs jobs: in-process (:class:`~memshare.fanout.local.LocalExecutor`) or on Ray
    (:class:`~memshare.fanout.ray_executor.RayExecutor`)."""

    name: str  # "in-process" or "ray"
    workers: int  # jobs it runs at once

    def run(self, jobs: Sequence[Job], shared: Any, tally: Tally) -> Generator[Outcome, None, None]:
        """An iterator of the jobs' outcomes, in the order they finish."""

    def workers_for(self, cpus: float) -> int:
        """How many jobs of ``cpus`` CPUs each it runs at once."""

    def threads_per_job(self, jobs: int) -> int | None:
        """CPU threads each of ``jobs`` jobs may use (None in-process: the command's own)."""

    def close(self) -> None:
        """Release the workers (Ray: the actors; the instance it started, if any)."""


def fan_out(
    jobs: Sequence[Job],
    executor: Executor,
    *,
    shared: Any = None,
    store: JobStore | None = None,
    progress: Callable[[Tally], None] | None = None,
) -> list[Outcome]:
    """Run ``jobs`` (``shared``: one object every job reads, shipped once) and return their
    outcomes in job order; with a ``store``, a job whose result it holds is not run again."""
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("fan_out: two jobs share a key")
    tally = Tally(len(jobs), notify=progress)
    outcomes: dict[str, Outcome] = {}
    todo = []
    for job in jobs:
        kept = store.get(job) if store is not None else None
        if kept is None:
            todo.append(job)
        else:
            outcomes[job.key] = kept
            tally.skipped(kept)
    if todo:
        with contextlib.closing(executor.run(todo, shared, tally)) as finished:
            for outcome in finished:
                if store is not None:
                    store.put(outcome)
                outcomes[outcome.job.key] = outcome
    return [outcomes[k] for k in keys]


def failures(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """The outcomes that refused their input."""
    return [o for o in outcomes if not o.ok]


def raise_failures(outcomes: Sequence[Outcome], resume_hint: str) -> None:
    """One InputError naming every failed job (its label and one line), if any failed."""
    bad = failures(outcomes)
    if not bad:
        return
    lines = "; ".join(f"[{o.job.label}] {o.error}" for o in bad)
    raise InputError(
        f"{len(bad)} of {len(outcomes)} jobs",
        f"failed: {lines}",
        f"the other jobs' results are kept; fix the input and rerun with {resume_hint}",
    )
