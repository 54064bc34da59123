"""The job store: each finished job's result, kept while a fan-out runs so that ``--resume``
skips jobs whose results are complete on disk.

Layout: a hidden folder (``.OUT.jobs`` beside a command's output ``OUT``) with one
``<job key>.pkl`` per finished job. Invariants: each file is written whole
(:func:`~memshare.atomic.write_atomic`), so a driver killed with SIGKILL leaves only complete
results; a key names the job's inputs and the memshare version (:func:`~memshare.fanout.jobs.
job_key`), so a result is reused only for the same job; a run without ``--resume`` starts
from an empty store; the command removes the store once its output is written whole.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

from memshare.atomic import write_atomic
from memshare.fanout.jobs import Job, Outcome

SUFFIX = ".jobs"  # .OUT.jobs: not litter to memshare.outdir (its results outlive a kill)


def store_path(output: Path) -> Path:
    """Where the jobs of a command writing ``output`` keep their results."""
    output = output.absolute()
    return output.parent / f".{output.name}{SUFFIX}"


class JobStore:
    """Finished jobs' outcomes under :attr:`folder`, by job key."""

    def __init__(self, folder: Path, *, resume: bool) -> None:
        self.folder = folder
        if not resume:
            self.clear()

    def get(self, job: Job) -> Outcome | None:
        """The stored outcome of ``job`` (marked resumed), or None."""
        path = self._path(job)
        if not path.is_file():
            return None
        try:
            saved: dict[str, Any] = pickle.loads(path.read_bytes())
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError):
            return None  # not a result this release can read (or damaged): run it again
        if saved.get("key") != job.key:
            return None
        return Outcome(job, saved["value"], None, saved["where"], saved["attempts"], True)

    def put(self, outcome: Outcome) -> None:
        """Keep a successful outcome (failed ones are run again on ``--resume``)."""
        if not outcome.ok:
            return
        saved = {
            "key": outcome.job.key,
            "value": outcome.value,
            "where": outcome.where,
            "attempts": outcome.attempts,
        }
        # not fsynced: a result lost or damaged in a crash of the machine is run again
        data = pickle.dumps(saved, pickle.HIGHEST_PROTOCOL)
        write_atomic(self._path(outcome.job), data, durable=False)

    def clear(self) -> None:
        """Forget every stored result."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, job: Job) -> Path:
        return self.folder / f"{job.key}.pkl"
