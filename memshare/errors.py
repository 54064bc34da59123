"""Errors that reach the user as one line.

Invariant: every ``InputError`` message names the offending file, field or option and says
how to fix it; the CLI prints it on one line and exits with status 2 (a traceback only
with ``--debug``).
"""

from __future__ import annotations


class InputError(Exception):
    """Bad user input (a file, field or option). The message is shown to the user as is."""

    def __init__(self, where: str, problem: str, fix: str) -> None:
        self.where = where
        self.problem = problem
        self.fix = fix
        super().__init__(f"{where}: {problem}; {fix}")


class TraceEmptyError(InputError):
    """The trace directory holds no committed request (e.g. killed before its first commit)."""
