"""The ``memshare`` command line: the typer app, its commands registered from
:mod:`memshare.commands` (a module per stage), and :func:`main`.

Installed as ``memshare.cli`` (``memshare/cli.py`` links here). A command parses, calls one
function and renders; the options several commands take are declared once in
``memshare.commands.options``. Bad input anywhere ends as one line on stderr and exit status 2
(a traceback only with ``--debug``).
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import TYPE_CHECKING, Annotated, Any

import typer

from memshare.commands import bench, capture, demo, engine, simulate, traces, tune, validate
from memshare.commands.interrupt import EXIT_INTERRUPTED, OUTSIDE, Interrupted, interruptible
from memshare.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

app = typer.Typer(
    name="memshare",
    help="KV-cache block sharing: capture traces, simulate policies, validate on a real model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Benchmarks that print figures (never timed tests).", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """memshare: how much KV memory a sharing policy saves, and what it costs."""


COMMANDS: dict[str, Callable[..., None]] = {
    "import": traces.import_cmd,
    "inspect": traces.inspect_cmd,
    "demo": demo.demo_cmd,
    "policies": simulate.policies_cmd,
    "simulate": simulate.simulate_cmd,
    "sweep": simulate.sweep_cmd,
    "capture": capture.capture_cmd,
    "generate": engine.generate_cmd,
    "validate": validate.validate_cmd,
    "calibrate": engine.calibrate_cmd,
    "study": simulate.study_cmd,
    "tune": tune.tune_cmd,
}
BENCH_COMMANDS: dict[str, Callable[..., None]] = {
    "policy": bench.bench_policy_cmd,
    "sim": bench.bench_sim_cmd,
    "engine": bench.bench_engine_cmd,
    "capture": bench.bench_capture_cmd,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(interruptible(_name, _command))
for _name, _command in BENCH_COMMANDS.items():
    bench_app.command(_name)(interruptible(f"bench {_name}", _command))


# ----------------------------------------------------------------------------- entry point
def _tidy_help() -> None:
    """Help that shows what a user types: flags without a ``<bool>`` value (typer 0.29 shows
    one), and at least 120 columns so long option names are never cut (piped help is 80)."""
    import shutil

    import typer.core
    import typer.rich_utils

    if not getattr(typer.core.TyperOption, "_memshare_tidy", False):
        shown = typer.core.TyperOption.display_type_rich

        def display_type_rich(self: Any, ctx: Any) -> str | None:
            return None if getattr(self, "is_flag", False) else shown(self, ctx)

        typer.core.TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
        typer.core.TyperOption._memshare_tidy = True  # type: ignore[attr-defined]
    if typer.rich_utils.MAX_WIDTH is None:
        typer.rich_utils.MAX_WIDTH = max(120, shutil.get_terminal_size((120, 24)).columns)


@functools.cache
def _click_command() -> Any:
    """The app as a click command, built once per process (typer takes ~40 ms to build it;
    in-process callers such as the tests call ``main`` hundreds of times)."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; turn bad input into one line and exit status 2, and Ctrl-C
    into one line (what stopped, what is on disk) and exit status 130."""
    args = sys.argv[1:] if argv is None else argv
    args = args or ["--help"]
    debug = "--debug" in args
    try:
        _tidy_help()  # imports typer's rich help: inside the Ctrl-C guard
        code = _click_command().main(args=args, prog_name="memshare", standalone_mode=False)
    except KeyboardInterrupt:  # while typer loaded, built the app or read the command line
        code = EXIT_INTERRUPTED
    except Interrupted as e:
        if debug:
            traceback.print_exception(e.__cause__)
        print(f"memshare: {e}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except InputError as e:
        if debug:
            raise
        print(f"memshare: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # a path the OS refused (permissions, a file where a folder must be, a full disk):
        # the user's to fix; anything without a path is a bug and keeps its traceback
        if debug or e.filename is None:
            raise
        reason = (e.strerror or type(e).__name__).lower()
        print(
            f"memshare: error: {e.filename}: {reason}; check the path and its permissions",
            file=sys.stderr,
        )
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("memshare: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # typer >= 0.29 vendors click under a private name: match its UsageError by class name
        if debug or not any(c.__name__ == "UsageError" for c in type(e).__mro__):
            raise
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "memshare"
        message = str(e.format_message()).rstrip(".")  # type: ignore[attr-defined]
        print(f"memshare: error: {message}; see `{where} --help`", file=sys.stderr)
        sys.exit(2)
    # typer returns a command's exit status (a Ctrl-C outside a command: 130) without raising
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == EXIT_INTERRUPTED:
            print(f"memshare: {OUTSIDE}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
