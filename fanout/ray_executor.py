"""The Ray executor: jobs on worker actors, each holding one :class:`RayHost` (a model and a
trace loaded once serve every job the actor runs), placed as the jobs' resources say.

Invariants:

- Every instance memshare starts (``--ray auto``) listens and connects on 127.0.0.1 only
  (:func:`connect`); ``--ray ADDRESS`` joins the cluster there as it is.
- A job whose actor or node dies is resubmitted to the actors left (to a fresh actor, placed
  by Ray on a live node, when none is left: a replacement beside live ones could wait forever
  for the lost node's room) up to :data:`MAX_ATTEMPTS` times, counted in the tally as
  retried; a job that refused its input comes back once with its one line; any other
  exception in a job is a bug and is raised with its traceback.
- Leaving :meth:`RayExecutor.run` early (Ctrl-C, an error) kills the actors, which cancels
  their running jobs; nothing is written by a worker.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Generator, Sequence
from typing import Any

from memshare.errors import InputError
from memshare.fanout.host import Host, Reply
from memshare.fanout.jobs import Job, Outcome, Where
from memshare.fanout.loopback import loopback_first
from memshare.fanout.tally import Tally

loopback_first()  # before ray is imported: see memshare.fanout.loopback

import ray  # noqa: E402
import ray.exceptions  # noqa: E402

MAX_ATTEMPTS = 4  # a job is run at most this often when its workers keep dying


class RayHost(Host):
    """A :class:`Host` inside a Ray actor: it knows its node, and reads the fan-out's shared
    object from the object store once."""

    def run_shared(self, fn: Any, shared: list[Any], args: tuple[Any, ...]) -> Reply:
        """``fn`` on the shared object behind ``shared[0]`` (an object ref, kept in a list so
        Ray does not resolve it per call): fetched once per actor."""
        ref = shared[0]
        value = self.cached(("shared", ref.hex()), lambda: ray.get(ref))
        return self.run(fn, value, args)

    def where(self) -> Where:
        ctx = ray.get_runtime_context()
        return Where(ctx.get_node_id(), ray.util.get_node_ip_address(), os.getpid())


def connect(address: str) -> bool:
    """Join the Ray instance at ``address`` ("auto": a local one, started if none runs, on
    127.0.0.1 only); True if this call started it (then :meth:`RayExecutor.close` stops it)."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address == "auto":
        ray.init(**quiet)
        exposed = sorted({n["NodeManagerAddress"] for n in ray.nodes()} - {"127.0.0.1"})
        if exposed:  # ray was imported before LOOPBACK_ENV was set (see loopback_first)
            ray.shutdown()
            raise RuntimeError(f"--ray auto: the local Ray instance listens on {exposed}")
        return True
    fix = "start one with `ray start --head --node-ip-address 127.0.0.1`, or use --ray auto"
    reachable(address, fix)  # ray.init retries an unreachable address for minutes
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        problem = f"cannot join a Ray cluster there ({first})"
        raise InputError(f"--ray {address}", problem, fix) from None
    return False


def reachable(address: str, fix: str, timeout_s: float = 5.0) -> None:
    """Refuse, in one line, a ``HOST:PORT`` that is malformed or takes no connection."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    where = f"--ray {address}"
    if not colon or not host or not port.isdigit():
        raise InputError(where, "is not auto or HOST:PORT", f"e.g. --ray 127.0.0.1:6379; {fix}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = (e.strerror or type(e).__name__).lower()
        raise InputError(where, f"no Ray cluster answers there ({reason})", fix) from None


class RayExecutor:
    """Runs jobs on ``workers`` actors of the cluster it joined."""

    name = "ray"

    def __init__(self, address: str, workers: int | None = None) -> None:
        self.address = address
        self.started = connect(address)
        self.requested = workers
        self.workers = workers or 1

    def cluster_cpus(self) -> float:
        """CPUs the cluster has in all."""
        return float(ray.cluster_resources().get("CPU", 1.0))

    def workers_for(self, cpus: float) -> int:
        """``--workers``, else as many jobs of ``cpus`` CPUs as the cluster holds."""
        return self.requested or max(1, int(self.cluster_cpus() // max(cpus, 1e-9)))

    def threads_per_job(self, jobs: int) -> int | None:
        """The cluster's CPUs shared by the jobs that run at once (``--workers``, else one
        CPU per job)."""
        if self.requested is None:
            return 1
        return max(1, int(self.cluster_cpus() // min(jobs, self.requested)))

    def run(self, jobs: Sequence[Job], shared: Any, tally: Tally) -> Generator[Outcome, None, None]:
        """The jobs' outcomes as they finish (see the module's invariants)."""
        if not jobs:
            return
        cpus, gpus = jobs[0].cpus, jobs[0].gpus
        self.workers = min(len(jobs), self.workers_for(cpus))
        actor_class = ray.remote(RayHost).options(
            num_cpus=cpus, num_gpus=gpus, scheduling_strategy="SPREAD", max_restarts=0
        )
        ref = [ray.put(shared)]
        idle = [actor_class.remote() for _ in range(self.workers)]
        pending: list[tuple[Job, int]] = [(j, 1) for j in reversed(jobs)]  # next job last
        running: dict[Any, tuple[Job, Any, int]] = {}
        try:
            while pending or running:
                while pending and idle:
                    job, attempts = pending.pop()
                    actor = idle.pop()
                    running[actor.run_shared.remote(job.fn, ref, job.args)] = (job, actor, attempts)
                    if attempts == 1:
                        tally.started(job)
                [done], _ = ray.wait(list(running), num_returns=1)
                job, actor, attempts = running.pop(done)
                try:
                    reply = ray.get(done)
                except ray.exceptions.RayTaskError as e:
                    raise e.as_instanceof_cause() from None  # a bug in the job: its traceback
                except ray.exceptions.RayError as e:  # its actor, worker or node died
                    ray.kill(actor, no_restart=True)
                    if attempts >= MAX_ATTEMPTS:
                        raise RuntimeError(f"{job.label}: lost its worker {attempts} times") from e
                    if not idle and not running:  # the last worker: a fresh one, where Ray
                        idle.append(actor_class.remote())  # finds room (else: fewer workers)
                    pending.append((job, attempts + 1))
                    tally.retry(job)
                    continue
                idle.append(actor)
                outcome = Outcome.of(job, reply, attempts)
                tally.finished(outcome)
                yield outcome
        finally:
            for actor in [*idle, *(a for _, a, _ in running.values())]:
                ray.kill(actor, no_restart=True)

    def close(self) -> None:
        """Stop the local instance this executor started, if it did."""
        if self.started:
            ray.shutdown()
