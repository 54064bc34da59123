"""The field tests and fix hints that every check of a trace's files shares.

A problem found in a trace's files is an :class:`~memshare.errors.InputError` whose fix is one
of two hints: :data:`RECREATE` (the file does not describe a valid trace: write it again) or
:data:`RECAPTURE` (the file was damaged after it was written).
"""

from __future__ import annotations

RECREATE = "re-create the trace (memshare capture or memshare import) into a fresh directory"
RECAPTURE = "the file was damaged after it was written; re-capture the trace"
_HEX = frozenset("0123456789abcdef")


def is_int(value: object) -> bool:
    """An integer, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_hex64(value: object) -> bool:
    """A sha256 as text: 64 lower-case hex digits."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX
