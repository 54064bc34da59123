"""The fan-out options of ``sweep``, ``simulate``, ``study`` and ``validate``: ``--ray``,
``--workers``, ``--resume`` (:class:`FanOutArgs`, spread by
:func:`~memshare.commands.options.spread`)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from memshare.fanout.options import FanOut


@dataclasses.dataclass(frozen=True)
class FanOutArgs:
    """Where the command's independent jobs run; field names are
    :class:`~memshare.fanout.options.FanOut`'s."""

    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="auto|ADDRESS",
            help="Run the jobs on Ray: auto starts or joins a local instance (127.0.0.1 "
            "only); ADDRESS joins a cluster (needs the ray extra: docs/fanout.md).",
        ),
    ] = None
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="With --ray: jobs at once (default: CPUs / job's)."),
    ] = None
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Skip jobs whose results an interrupted run of the same command kept.",
        ),
    ] = False

    def fan_out(self) -> FanOut:
        """The checked :class:`FanOut`."""
        f = FanOut(self.ray, self.workers, self.resume)
        f.check()
        return f
