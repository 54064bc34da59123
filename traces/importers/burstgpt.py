"""BurstGPT (HPMLL/BurstGPT) CSVs.

Columns: ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``.

``Timestamp`` is seconds (a decimal number) relative to the trace start. Invariants: every row
is kept; ``Model`` and ``Log Type`` go to ``RequestRecord.meta`` as ``model`` and
``log_type``; a row with ``Response tokens == 0`` is a failed request and carries
``meta['failed'] = True`` (False otherwise). ``Total tokens`` is validated as a count but
not trusted: rows where it differs from request + response tokens are counted in the notes.
"""

from __future__ import annotations

from pathlib import Path

from ._csv import CsvRow, read_csv
from ._source import SourceData, SourceRow

FORMAT = "burstgpt"
COLUMNS = (
    "Timestamp",
    "Model",
    "Request tokens",
    "Response tokens",
    "Total tokens",
    "Log Type",
)
HASH_BLOCK_SIZE: int | None = None


def _row(row: CsvRow) -> tuple[SourceRow, bool]:
    """The parsed row and whether its ``Total tokens`` matches request + response tokens."""
    prompt_len = row.count("Request tokens")
    output_len = row.count("Response tokens")
    total = row.count("Total tokens")
    meta = {
        "model": row.text("Model"),
        "log_type": row.text("Log Type"),
        "failed": output_len == 0,
    }
    parsed = SourceRow(
        line=row.line,
        index=row.index,
        time=row.number("Timestamp"),
        prompt_len=prompt_len,
        output_len=output_len,
        meta=meta,
    )
    return parsed, total == prompt_len + output_len


def read(path: Path, limit: int | None = None) -> SourceData:
    """Parse and validate the first ``limit`` data rows (all if None), in file order.

    Notes: ``failed_rows`` (Response tokens == 0) and ``total_tokens_mismatches``.
    """
    rows: list[SourceRow] = []
    mismatches = 0
    for csv_row in read_csv(path, FORMAT, COLUMNS, limit):
        row, total_ok = _row(csv_row)
        rows.append(row)
        mismatches += not total_ok
    failed = sum(1 for r in rows if r.output_len == 0)
    return SourceData(rows, {"failed_rows": failed, "total_tokens_mismatches": mismatches})
