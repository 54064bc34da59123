"""The ``memshare`` console script: loads the CLI inside a Ctrl-C guard.

Importing the CLI takes a second or two (typer, rich, numpy); a Ctrl-C in that time ends as
one line and exit status 130, like a Ctrl-C during a command (:mod:`memshare.commands.interrupt`),
not as a traceback. This module imports nothing heavy until it is called.
"""

from __future__ import annotations

import sys

from memshare.commands.interrupt import EXIT_INTERRUPTED


def main() -> None:
    """Run :func:`memshare.cli.main`; a Ctrl-C before a command starts its work is one line
    and status 130.

    Invariant: no ``KeyboardInterrupt`` leaves this function. A command's own work turns a
    Ctrl-C into its own line (what stopped, what is on disk); one that lands anywhere else
    (the imports, typer building the app, rich loading lazily) writes nothing, and says so.
    """
    try:
        from memshare.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        print("memshare: interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
