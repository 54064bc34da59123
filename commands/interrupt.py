"""What Ctrl-C does to a command: :func:`interruptible` turns the ``KeyboardInterrupt`` into
:class:`Interrupted`, whose one line says which command stopped and what is on disk; the CLI
prints it and exits with status 130, as a shell expects; :mod:`memshare.launch` does the same for a
Ctrl-C while Python loads the CLI.

typer turns a ``KeyboardInterrupt`` inside a command into a returned exit code, which the CLI
would otherwise lose (exit 0, no word): catching it inside the command keeps it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

EXIT_INTERRUPTED = 130  # 128 + SIGINT
OUTSIDE = (
    "interrupted (Ctrl-C) outside the command's work (reading options, or exiting); any file "
    "it wrote is whole"
)
UNCHANGED = "{where} is as it was: a run's folder is moved into place only when the run finishes"
RESUMABLE = f"{UNCHANGED}; its finished runs are kept for the same command with --resume"
ON_DISK: dict[str, str] = {
    "capture": "{where} holds the requests committed so far; the same command resumes there",
    "import": "{where} holds no finished trace (no reader accepts it); import again",
    "simulate": RESUMABLE,
    "sweep": RESUMABLE,
    "study": RESUMABLE,
    "generate": UNCHANGED,
    "validate": "{where} holds no validation.json of this run; its finished jobs are kept for "
    "the same command with --resume",
    "calibrate": "{where} is as it was: the layer map is written whole when calibration ends",
    "demo": "{where} holds the stages finished so far; `memshare demo` again redoes the rest",
}


class Interrupted(Exception):
    """A command stopped by Ctrl-C; ``str(self)`` is the line for the user."""

    def __init__(self, command: str, where: Any) -> None:
        self.command = command
        template = ON_DISK.get(command)
        on_disk = "nothing was written" if template is None or where is None else template
        super().__init__(f"{command} interrupted (Ctrl-C); {on_disk.format(where=where)}")


def interruptible(name: str, command: Callable[..., None]) -> Callable[..., None]:
    """``command`` raising :class:`Interrupted` instead of ``KeyboardInterrupt``; ``where``
    is the folder it writes (its ``output``, or ``run`` for validate)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt as e:
            where = kwargs.get("output", kwargs.get("run"))
            raise Interrupted(name, where) from e

    return run
