"""The in-process executor: every job in order, on one :class:`~memshare.fanout.host.Host`
in this process (today's behaviour, the default)."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from memshare.fanout.host import Host
from memshare.fanout.jobs import Job, Outcome
from memshare.fanout.tally import Tally


class LocalExecutor:
    """Runs jobs one after the other in this process."""

    name = "in-process"

    def __init__(self, host: Host | None = None) -> None:
        self.host = host or Host()
        self.workers = 1

    def run(self, jobs: Sequence[Job], shared: Any, tally: Tally) -> Generator[Outcome, None, None]:
        """Each job's outcome, in job order."""
        for job in jobs:
            tally.started(job)
            outcome = Outcome.of(job, self.host.run(job.fn, shared, job.args))
            tally.finished(outcome)
            yield outcome

    def workers_for(self, cpus: float) -> int:
        """One job at a time."""
        return 1

    def threads_per_job(self, jobs: int) -> int | None:
        """The command's own thread count."""
        return None

    def close(self) -> None:
        """Nothing to release."""
