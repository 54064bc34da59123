"""Whole-file writes: a file is either its old self or the complete new text, never half.

Invariant: the text goes to a temporary file in the same folder, is fsynced (unless the caller
opts out: a cache), optionally checked, then renamed over ``path`` (atomic on POSIX); on any
failure the temporary file is removed and ``path`` is untouched. The file gets the mode any
``open(path, "w")`` would give it (0666 less the umask), not ``mkstemp``'s 0600. A writer
killed with SIGKILL leaves its hidden ``.NAME.XXXX.tmp``; :func:`memshare.outdir.remove_litter`
removes it on the next run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(
    path: Path,
    text: str | bytes,
    verify: Callable[[Path], None] | None = None,
    *,
    durable: bool = True,
) -> None:
    """Write ``text`` (UTF-8 text, or bytes as they are) to ``path`` whole; ``verify(tmp)``
    may raise to keep ``path`` as it was. ``durable=False`` skips the fsync: the file is
    still whole or absent if the writer is killed, but may be lost (or, if it is renamed
    before its data reach the disk, read as damaged) after a crash of the machine; for a
    cache whose reader treats a damaged file as missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        data = text.encode() if isinstance(text, str) else text
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if verify is not None:
            verify(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
