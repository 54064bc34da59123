"""What the CLI tells a user while it works, all on stderr: :class:`Bar`, the one rich
progress bar every command draws, :func:`status_lines` (a line per stage, for benchmarks) and
:func:`warn`.

stdout stays the command's result (one JSON object under ``--json``): a bar draws only when
stderr is a terminal and the command is not quiet, and is transient (gone when it stops).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType


def warn(line: str) -> None:
    """A warning: one line on stderr (stdout stays the result, one JSON object with --json)."""
    print(line, file=sys.stderr)


def status_lines(quiet: bool) -> Callable[[str], None] | None:
    """A benchmark's stages as one dim line each on stderr, drawn on a terminal and piped
    alike (None under ``--json``)."""
    if quiet:
        return None
    console = Console(stderr=True)
    return lambda message: console.print(f"[dim]{message}[/dim]")


class Bar:
    """One transient rich progress bar on stderr: stage, bar, done/total, elapsed time (with
    ``rate``: a rate field, elapsed time and ETA instead), drawn only when stderr is a
    terminal and ``quiet`` (``--json``) is off; otherwise every method does nothing.

    With a ``label`` the bar has one row from the start, fed by :meth:`tick`, :meth:`status`,
    :meth:`progress` or :meth:`capture`; without one it gets a row per run as
    :meth:`run` reports them. :attr:`notice` is printed after the bar stops, unless the block
    raised (an error stays the only line)."""

    def __init__(self, quiet: bool, label: str | None = "starting", *, rate: bool = False) -> None:
        console = Console(stderr=True)
        self.live = not quiet and console.is_terminal
        rated = (TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"))
        tail = (*rated, TimeRemainingColumn()) if rate else (TimeElapsedColumn(),)
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            *tail,
            console=console,
            transient=True,
            disable=not self.live,
        )
        self.task = None if label is None else self.bar.add_task(label, total=None, rate="")
        self.runs: dict[str, TaskID] = {}
        self.notice: str | None = None
        self.jobs_task: TaskID | None = None
        self.tally: Any = None  # the last fan-out tally (:meth:`jobs`)

    def tick(self, done: int) -> None:
        """``done`` items so far (of an unknown total)."""
        if self.live and self.task is not None:
            self.bar.update(self.task, completed=done)

    def status(self, message: str) -> None:
        """Show ``message`` as the stage."""
        if self.live and self.task is not None:
            self.bar.update(self.task, description=message)

    def progress(self, what: str, done: int, total: int) -> None:
        """``done`` of ``total`` (``what``: a new stage name, or "" to keep the current one)."""
        if what:
            self.status(what)
        if self.live and self.task is not None:
            self.bar.update(self.task, completed=done, total=total)

    def run(self, label: str, done: int, total: int) -> None:
        """Run ``label`` has served ``done`` of its ``total`` requests (a row per run)."""
        if not self.live:
            return
        if label not in self.runs:
            self.runs[label] = self.bar.add_task(f"simulating {label}", total=total, rate="")
        self.bar.update(self.runs[label], completed=done)

    def jobs(self, tally: Any) -> None:
        """Take a fan-out's :class:`~memshare.fanout.tally.Tally`: one row over all jobs
        (finished of total; running, retried, failed beside it); kept for :meth:`summary`."""
        self.tally = tally
        if not self.live or tally.total < 2:
            return
        if self.jobs_task is None:
            self.jobs_task = self.bar.add_task("jobs", total=tally.total, rate="")
        what = f"jobs: {tally.running} running, {tally.retried} retried, {tally.failed} failed"
        self.bar.update(self.jobs_task, description=what, completed=tally.done + tally.failed)

    def summary(self, executor: str | None) -> None:
        """After a fan-out on ``executor`` (None: in-process, nothing said): one line on stderr
        with the jobs' final tally."""
        if executor is not None and self.tally is not None:
            self.notice = f"memshare: {self.tally.total} jobs on {executor}: {self.tally.line()}"

    def capture(self, p: Any) -> None:
        """Take a :class:`~memshare.traces.capture.run.CaptureProgress`: a status line while
        loading, then requests done with the tokens/s rate."""
        if not self.live or self.task is None:
            return
        if p.phase == "status":
            self.bar.update(self.task, description=p.message)
            return
        rate = f"{p.tokens_done / p.elapsed_s:,.0f} tok/s" if p.elapsed_s > 0 else ""
        self.bar.update(
            self.task,
            description="capturing" if p.requests_done or p.tokens_done else "first batch",
            total=p.requests_total,
            completed=p.requests_done,
            rate=rate,
        )

    def __enter__(self) -> Bar:
        if self.live:
            self.bar.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.live:
            self.bar.stop()
        if self.notice is not None and kind is None:
            print(self.notice, file=sys.stderr)
