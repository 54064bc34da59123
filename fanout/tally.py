"""The counts a fan-out's progress bar shows: jobs done, running, retried and failed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from memshare.fanout.jobs import Job, Outcome


@dataclass
class Tally:
    """Live counts over one fan-out's jobs; ``notify`` gets the tally after every change.

    Invariant: ``done + failed + running <= total``; ``resumed`` counts within ``done``."""

    total: int
    done: int = 0  # finished with a result (resumed ones included)
    running: int = 0  # handed to a worker and not finished
    retried: int = 0  # resubmissions after a worker or node died
    failed: int = 0  # refused their input (one line each)
    resumed: int = 0  # taken from the job store (--resume)
    notify: Callable[[Tally], None] | None = field(default=None, repr=False)

    def started(self, job: Job) -> None:
        self.running += 1
        self._tell()

    def retry(self, job: Job) -> None:
        self.retried += 1
        self._tell()

    def finished(self, outcome: Outcome) -> None:
        self.running -= 1
        if outcome.ok:
            self.done += 1
        else:
            self.failed += 1
        self._tell()

    def skipped(self, outcome: Outcome) -> None:
        """A job whose result the store already held."""
        self.done += 1
        self.resumed += 1
        self._tell()

    def line(self) -> str:
        """``12/16 done, 2 running, 1 retried, 0 failed`` (resumed ones named when any)."""
        resumed = f" ({self.resumed} resumed)" if self.resumed else ""
        return (
            f"{self.done}/{self.total} done{resumed}, {self.running} running, "
            f"{self.retried} retried, {self.failed} failed"
        )

    def _tell(self) -> None:
        if self.notify is not None:
            self.notify(self)
