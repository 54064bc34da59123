"""Azure LLM inference trace 2023 (Splitwise, ISCA'24): ``TIMESTAMP,ContextTokens,GeneratedTokens``.

``TIMESTAMP`` is a wall-clock time such as ``2023-11-16 18:17:03.9799600`` (seven fractional
digits: ticks of 100 ns). Invariant: it is parsed to integer nanoseconds, never through a
float, so arrival offsets are exact until the final rounding to float seconds. The trace has
no prefix hashes (``hash_block_size`` is None).
"""

from __future__ import annotations

import re
from datetime import date
from fractions import Fraction
from pathlib import Path

from ._csv import CsvRow, read_csv
from ._source import SourceData, SourceRow

FORMAT = "azure"
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
HASH_BLOCK_SIZE: int | None = None

_TS_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[ T]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
)
_NS_PER_S = 10**9


def parse_timestamp_ns(text: str) -> int | None:
    """``YYYY-MM-DD HH:MM:SS[.fffffffff]`` as integer nanoseconds since 0001-01-01, else None.

    Up to nine fractional digits are kept exactly; no time zone is applied (the trace's
    times share one clock, and only differences are used).
    """
    m = _TS_RE.fullmatch(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if hour > 23 or minute > 59 or second > 59:
        return None
    try:
        days = date(year, month, day).toordinal()
    except ValueError:
        return None
    frac = (m.group(7) or "").ljust(9, "0")
    seconds = days * 86400 + hour * 3600 + minute * 60 + second
    return seconds * _NS_PER_S + int(frac)


def _row(row: CsvRow) -> SourceRow:
    ns = parse_timestamp_ns(row.cells["TIMESTAMP"])
    if ns is None:
        raise row.error(
            "TIMESTAMP",
            f"{row.cells['TIMESTAMP']!r} is not a timestamp like 2023-11-16 18:17:03.9799600",
            "write it as YYYY-MM-DD HH:MM:SS[.fraction], or delete the row",
        )
    return SourceRow(
        line=row.line,
        index=row.index,
        time=Fraction(ns, _NS_PER_S),
        prompt_len=row.count("ContextTokens"),
        output_len=row.count("GeneratedTokens"),
    )


def read(path: Path, limit: int | None = None) -> SourceData:
    """Parse and validate the first ``limit`` data rows (all if None), in file order.

    ``notes['time_origin']`` is the TIMESTAMP text of the earliest row (arrival 0).
    """
    rows: list[SourceRow] = []
    origin: tuple[Fraction, str] | None = None
    for csv_row in read_csv(path, FORMAT, COLUMNS, limit):
        row = _row(csv_row)
        if origin is None or row.time < origin[0]:
            origin = (row.time, csv_row.text("TIMESTAMP"))
        rows.append(row)
    return SourceData(rows, {"time_origin": origin[1] if origin else None})
