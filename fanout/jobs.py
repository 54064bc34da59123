"""What a fan-out runs: :class:`Job` (a module-level function and its arguments) and what
comes back, :class:`Outcome` (its value or its one-line error, and where it ran).

Invariants: a job's function is a module-level callable (Ray ships it by reference) whose
first parameter is the :class:`~memshare.fanout.host.Host` running it; a job's ``key`` names
its inputs (:func:`job_key`), so a result stored under it (``--resume``) is reused only for
the same inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memshare import __version__


@dataclass(frozen=True)
class Job:
    """One independent unit of a fan-out."""

    key: str  # stable and unique in its fan-out: the job store's file name (job_key)
    label: str  # what the progress bar and messages call it: "kv_blocks=500 prefix"
    fn: Callable[..., Any]  # module-level; called as fn(host, shared, *args)
    args: tuple[Any, ...] = ()  # picklable
    cpus: float = 1.0  # CPUs the job keeps busy (its torch threads for an engine job)
    gpus: float = 0.0  # GPUs it holds (1 with --device cuda)


@dataclass(frozen=True)
class Where:
    """Where a job ran: recorded beside its result."""

    node: str  # the Ray node id, or "local" in-process
    address: str  # the node's IP address ("local" in-process)
    pid: int  # the worker process

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "address": self.address, "pid": self.pid}


@dataclass
class Outcome:
    """A finished job: its value, or its one-line error (bad input), never both."""

    job: Job
    value: Any = None
    error: str | None = None  # an InputError's one line: the job failed on bad input
    where: Where | None = None  # None: taken from the job store (--resume)
    attempts: int = 1  # 1 + the times it was resubmitted after its worker or node died
    resumed: bool = False  # taken from the job store, not run

    @staticmethod
    def of(job: Job, reply: tuple[bool, Any, Where], attempts: int = 1) -> Outcome:
        """The outcome of a host's reply ``(ok, value or one-line error, where)``."""
        ok, value, where = reply
        return Outcome(job, value if ok else None, None if ok else value, where, attempts)

    @property
    def ok(self) -> bool:
        return self.error is None

    def ran_on(self) -> dict[str, Any] | None:
        """Where the job ran, how often, and whether its result came from the job store
        (``perf.json``'s and ``validation.json``'s ``ran_on``)."""
        if self.where is None:
            return None
        return self.where.to_dict() | {"attempts": self.attempts, "resumed": self.resumed}


def job_key(kind: str, spec: Any) -> str:
    """``kind-<digest>``: the digest of ``spec`` (a JSON-able description of every input that
    shapes the result) and of the memshare version, so a stored result is reused only for the
    same inputs under the same code release."""
    text = json.dumps([__version__, kind, spec], sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"
