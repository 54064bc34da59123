"""Output folders that hold one run each: claimed before any work (:func:`claim_output`),
written in a hidden sibling and swapped into place whole (:func:`staged_output`).

Invariants:

- A folder a command writes holds the results of one run of that command: before any work,
  ``-o`` must be absent, empty, or hold an earlier run of the same command (its marker file),
  which only ``--overwrite`` may replace, and then whole: nothing of the earlier run survives.
- A run's files appear at ``-o`` only when the run finished: they are written in a hidden
  sibling ``.NAME.staging-*`` that replaces ``-o`` in two renames; an interrupted or failed
  run removes its staging folder, and a run killed with SIGKILL leaves one that the next run
  into the same ``-o`` removes (:func:`remove_litter`), as it does the hidden temporary files
  of :func:`memshare.atomic.write_atomic`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from memshare.atomic import current_umask
from memshare.errors import InputError

STAGING = ".staging-"  # infix of a run's hidden staging folder: .NAME.staging-XXXX
REPLACED = ".replaced-"  # infix of an earlier run moved aside while the new one moves in


@dataclass(frozen=True)
class OutputKind:
    """What a command writes to its ``-o`` folder."""

    command: str  # the command, as the user types it: "simulate", "generate"
    marker: str  # a file every finished run of this command holds: "config.json"


def _is_litter(entry: Path) -> bool:
    """A hidden leftover of an interrupted writer: a staging or replaced folder, or a
    temporary file of :func:`memshare.atomic.write_atomic` (``.NAME.XXXX.tmp``)."""
    name = entry.name
    if not name.startswith("."):
        return False
    return STAGING in name or REPLACED in name or name.endswith(".tmp")


def remove_litter(folder: Path, name: str | None = None) -> None:
    """Remove what a killed writer left in ``folder``: every hidden temporary file, and the
    staging and replaced folders of output ``name`` (all of them when ``name`` is None)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not _is_litter(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if name is None or entry.name.startswith(f".{name}."):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                entry.unlink()


def claim_output(path: Path, option: str, kind: OutputKind, *, overwrite: bool) -> None:
    """Refuse, in one line, an output folder this run may not write, before any work.

    Accepted: an absent path under a writable folder, an empty folder (litter aside), or a
    folder holding an earlier run of ``kind`` when ``overwrite`` is set."""
    check_out(path, option, folder=True)
    where = f"{option} {path}"
    if path.is_dir():
        entries = [e for e in path.iterdir() if not _is_litter(e)]
        if entries and not (path / kind.marker).is_file():
            raise InputError(
                where,
                f"is not empty and holds no {kind.command} run ({entries[0].name})",
                f"give {option} a new or empty folder",
            )
        if entries and not overwrite:
            raise InputError(
                where,
                f"already holds a {kind.command} run",
                "pass --overwrite to replace it whole, or give a new folder",
            )


def check_writable(path: Path, where: str, option: str) -> None:
    """The nearest existing folder at or above ``path`` takes a new entry: probed by making
    and removing a hidden folder there (permission bits say too little: root, /proc, a
    read-only mount)."""
    for above in (path, *path.parents):
        if above.exists():
            if not above.is_dir():
                fix = f"give {option} a path under a folder"
                raise InputError(where, f"{above} is a file, not a folder", fix)
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".memshare-probe-", dir=above))
            except OSError as e:
                reason = (e.strerror or type(e).__name__).lower()
                fix = f"give {option} a folder you may write"
                raise InputError(where, f"cannot write in {above} ({reason})", fix) from None
            return


def check_out(path: Path, option: str, *, folder: bool) -> None:
    """An output path the command can create: refused before any work, in one line."""
    where = f"{option} {path}"
    if path.exists():
        if folder and not path.is_dir():
            raise InputError(where, "exists and is not a folder", f"give {option} a folder path")
        if not folder and path.is_dir():
            raise InputError(where, "is a folder", f"give {option} a file path, e.g. DIR/map.json")
        return
    check_writable(path.absolute(), where, option)


@contextlib.contextmanager
def staged_output(path: Path) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``path`` to write a run into; when the block ends
    normally it replaces ``path`` whole (the earlier run, if any, is removed), and when it
    raises (Ctrl-C included) it is removed and ``path`` is as it was.

    The caller claimed ``path`` first (:func:`claim_output`). Files written in the staging
    folder must not record its own path: they are read at ``path`` afterwards."""
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_litter(path.parent, path.name)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}{STAGING}", dir=path.parent))
    stage.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700: as any mkdir would instead
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if path.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}{REPLACED}", dir=path.parent))
        os.replace(path, aside / path.name)
        os.replace(stage, path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(stage, path)
