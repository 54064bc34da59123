"""The one CSV reader that all CSV importers (Azure, BurstGPT) use.

Invariants: the first non-blank line is the header and must hold every required column (extra
columns are allowed and ignored); every data row has exactly as many fields as the header;
blank lines are skipped but still counted, so :attr:`CsvRow.line` is the true line number.
Every problem is an :class:`~memshare.errors.InputError` at ``"<file>:<line>"`` whose problem
names the data row and the column.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from memshare.errors import InputError

from ._source import no_rows_error, parse_count, parse_number, read_lines, where


@dataclass(frozen=True, slots=True)
class CsvRow:
    """One data row, addressed by column name; its accessors raise located InputErrors."""

    path: Path
    fmt: str  # format name, for messages
    line: int  # 1-based line of the file where the row ends
    index: int  # 0-based data row index (row 1 in messages is index 0)
    cells: dict[str, str]

    def error(self, column: str, problem: str, fix: str) -> InputError:
        """An InputError at this row naming ``column``."""
        return InputError(
            where(self.path, self.line),
            f"data row {self.index + 1}, column '{column}': {problem}",
            fix,
        )

    def text(self, column: str) -> str:
        """The cell's text with surrounding blanks removed."""
        return self.cells[column].strip()

    def count(self, column: str) -> int:
        """The cell as a non-negative integer token count."""
        value = parse_count(self.cells[column])
        if value is None:
            raise self.error(
                column,
                f"{self.cells[column]!r} is not a non-negative integer",
                "write token counts as whole numbers, or delete the row",
            )
        return value

    def number(self, column: str) -> Fraction:
        """The cell as an exact finite decimal number."""
        value = parse_number(self.cells[column])
        if value is None:
            raise self.error(
                column,
                f"{self.cells[column]!r} is not a number",
                "write it as a decimal number (e.g. 12.5), or delete the row",
            )
        return value


def read_csv(
    path: Path, fmt: str, columns: Sequence[str], limit: int | None = None
) -> Iterator[CsvRow]:
    """Yield the data rows of a CSV file with header ``columns`` (at most ``limit`` rows).

    Raises InputError for a missing column (naming it and listing ``columns``), a row with
    the wrong number of fields, or a file with a header but no data rows.
    """
    reader = csv.reader(read_lines(path, fmt))
    expected = ",".join(columns)
    header: list[str] | None = None
    index = 0
    try:
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if header is None:
                header = _check_header(path, fmt, fields, columns, reader.line_num)
                continue
            if len(fields) != len(header):
                raise InputError(
                    where(path, reader.line_num),
                    f"data row {index + 1} has {len(fields)} fields, the header has "
                    f"{len(header)} ({','.join(header)})",
                    f"give every row one value per column ({expected}), or delete the row",
                )
            yield CsvRow(path, fmt, reader.line_num, index, dict(zip(header, fields, strict=True)))
            index += 1
            if limit is not None and index >= limit:
                return
    except csv.Error as e:
        raise InputError(
            where(path, reader.line_num),
            f"malformed CSV at data row {index + 1} ({e})",
            f"fix the quoting of that row (expected columns: {expected})",
        ) from None
    if index == 0:
        raise no_rows_error(path, fmt)


def _check_header(
    path: Path, fmt: str, fields: list[str], columns: Sequence[str], line: int
) -> list[str]:
    """The header's column names (blanks stripped); every one of ``columns`` must be there."""
    header = [name.strip() for name in fields]
    for column in columns:
        if column not in header:
            raise InputError(
                where(path, line),
                f"header has no column '{column}' (header: {','.join(header)})",
                f"a CSV file in {fmt} format needs the columns {','.join(columns)}",
            )
    return header
