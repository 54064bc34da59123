"""How a command fans out (``--ray``, ``--workers``, ``--resume``): :class:`FanOut`, checked
once, and the executor it names."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from memshare.errors import InputError
from memshare.fanout.local import LocalExecutor
from memshare.fanout.run import Executor
from memshare.fanout.store import JobStore, store_path

RAY_INSTALL = "pip install 'memshare[ray]' (Ray 2.60)"


@dataclass(frozen=True)
class FanOut:
    """Where a command's independent jobs run, and whether stored results are reused."""

    ray: str | None = None  # None: in-process; "auto": a local instance; else an address
    workers: int | None = None  # jobs at once on Ray (default: the cluster's CPUs / a job's)
    resume: bool = False  # skip jobs whose results an interrupted run stored

    def check(self) -> None:
        """Refuse, in one line, options that do not go together or cannot run here."""
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers {self.workers}", "must be at least 1", "give e.g. 2")
        if self.workers is not None and self.ray is None:
            raise InputError(
                f"--workers {self.workers}",
                "sets how many Ray workers run jobs at once; in-process jobs run one at a time",
                "add --ray auto (or --ray ADDRESS), or leave --workers out",
            )
        if self.ray is not None:
            if not self.ray.strip():
                raise InputError("--ray", "is empty", "give auto or a cluster's ADDRESS")
            if importlib.util.find_spec("ray") is None:
                raise InputError(f"--ray {self.ray}", "Ray is not installed", RAY_INSTALL)

    def executor(self) -> Executor:
        """The executor these options name (Ray: joined or started now)."""
        self.check()
        if self.ray is None:
            return LocalExecutor()
        from memshare.fanout.ray_executor import RayExecutor

        return RayExecutor(self.ray, self.workers)

    def store(self, output: Path) -> JobStore:
        """The job store of a command that writes ``output`` (emptied unless resuming)."""
        return JobStore(store_path(output), resume=self.resume)

    @staticmethod
    def forget(output: Path) -> None:
        """Remove the job store of ``output``, once ``output`` is written whole."""
        shutil.rmtree(store_path(output), ignore_errors=True)


IN_PROCESS = FanOut()
