"""What every importer shares: the parsed row, source-file checks and value checks.

Invariants:

- A reader (``read`` of a :class:`~memshare.traces.importers.WorkloadFormat`) validates the
  whole requested part of its file before anything is written, so bad data never leaves a
  partial trace behind, and every problem is an :class:`~memshare.errors.InputError` whose
  ``where`` is ``"<file>:<line>"`` and whose problem names the row and the column or field.
- :attr:`SourceRow.time` is exact (a :class:`~fractions.Fraction` of seconds on the source's
  own clock); arrival offsets are formed by exact subtraction and rounded to float only once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from memshare.errors import InputError

_INT_RE = re.compile(r"[0-9]+")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One request as read from a source file, before ordering and id assignment."""

    line: int  # 1-based line of the source file where the row ends
    index: int  # 0-based data row index in the file (blank lines and the header not counted)
    time: Fraction  # arrival on the source's clock, in seconds (exact)
    prompt_len: int  # >= 0
    output_len: int  # >= 0
    hash_ids: list[int] | None = None  # chained prefix-block hashes, if the source has them
    meta: dict[str, Any] | None = None  # source-specific extras kept in RequestRecord.meta
    prompt_ids: list[int] | None = None  # the prompt's token ids (the tokens format)
    output_ids: list[int] | None = None  # the output's token ids, where the source gives them
    rid: str | None = None  # the request's id where the source names it, else row_id(...)


@dataclass(frozen=True)
class SourceData:
    """All rows a reader took from one file, in file order, plus notes for manifest.source."""

    rows: list[SourceRow]
    notes: dict[str, Any] = field(default_factory=dict)


def check_source(path: Path, fmt: str) -> None:
    """Fail with an :class:`InputError` unless ``path`` is an existing, non-empty file."""
    if not path.exists():
        raise InputError(
            str(path), "file does not exist", f"give the path of a {fmt} workload file"
        )
    if not path.is_file():
        raise InputError(
            str(path), "is not a regular file", f"give the path of a {fmt} workload file"
        )
    if path.stat().st_size == 0:
        raise InputError(
            str(path), "file is empty", f"give a {fmt} workload file that holds requests"
        )


def no_rows_error(path: Path, fmt: str) -> InputError:
    """The error for a file that has no data rows (only blank lines, or only a header)."""
    return InputError(
        str(path), "holds no requests (no data rows)", f"give a {fmt} workload file with requests"
    )


def row_id(fmt: str, index: int) -> str:
    """The id of a request its source does not name: ``"<format>-<row>"``, the 0-based data
    row index zero-padded to six digits."""
    return f"{fmt}-{index:06d}"


def where(path: Path, line: int) -> str:
    """The ``where`` of an error at a line of a source file: ``"<file>:<line>"``."""
    return f"{path}:{line}"


def parse_count(text: str) -> int | None:
    """A token count written as plain decimal digits (surrounding blanks allowed), else None."""
    s = text.strip()
    return int(s) if _INT_RE.fullmatch(s) else None


def parse_number(text: str) -> Fraction | None:
    """A finite decimal number (``12``, ``-0.5``, ``1.5e3``) as an exact Fraction, else None."""
    s = text.strip()
    return Fraction(s) if _NUMBER_RE.fullmatch(s) else None


def read_lines(path: Path, fmt: str) -> Iterator[str]:
    """The file's lines as text (line endings kept), decoding each line on its own.

    Invariant: the n-th string yielded is line n of the file, so a consumer's line count is
    exact; a line that is not UTF-8 or a read failure becomes an :class:`InputError` naming
    that line. A UTF-8 byte order mark at the start is dropped.
    """
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(
                        where(path, number),
                        f"line {number} is not UTF-8 text (byte {e.start + 1} of the line)",
                        f"save the {fmt} file as UTF-8 text",
                    ) from None
    except OSError as e:
        raise InputError(
            str(path), f"cannot be read ({e.strerror or e})", "check the path and permissions"
        ) from None
