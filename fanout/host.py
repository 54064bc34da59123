"""Where a job runs: a :class:`Host` keeps what jobs load (a model, a trace) for the next job
it runs, so a worker loads a model once and serves several jobs. In-process there is one
host; on Ray each worker actor holds one (:mod:`memshare.fanout.ray_executor`).

Invariant: a job that fails on bad input (:class:`~memshare.errors.InputError`) comes back as
its one line, not as an exception, so an executor tells it apart from a dead worker (retried)
and from a bug (raised with its traceback).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from memshare.errors import InputError
from memshare.fanout.jobs import Where

T = TypeVar("T")

Reply = tuple[bool, Any, Where]  # (ok, value or the one-line error, where it ran)


class Host:
    """Runs jobs one at a time and keeps a cache for them (:meth:`cached`)."""

    def __init__(self) -> None:
        self._cache: dict[Any, Any] = {}
        # (label, done, total) of a job's own progress: set in-process, None on Ray workers
        self.report: Callable[[str, int, int], None] | None = None

    def ticker(self, label: str, total: int) -> Callable[[int], None] | None:
        """A job's progress callback (``done`` of ``total``) under ``label``, or None."""
        report = self.report
        if report is None:
            return None
        report(label, 0, total)
        return lambda done: report(label, done, total)

    def cached(self, key: Any, make: Callable[[], T]) -> T:
        """``make()``'s value, made once per host and key (a hashable description of it)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]  # type: ignore[no-any-return]

    def run(self, fn: Callable[..., Any], shared: Any, args: tuple[Any, ...]) -> Reply:
        """``fn(self, shared, *args)``: ``(True, value, where)``, or ``(False, line, where)``
        when it refused its input."""
        try:
            return True, fn(self, shared, *args), self.where()
        except InputError as e:
            return False, str(e), self.where()

    def where(self) -> Where:
        """This host's node, address and process."""
        return Where("local", "local", os.getpid())
