"""Mooncake (kvcache-ai/Mooncake, FAST'25) JSONL traces.

One JSON object per line: ``timestamp`` (milliseconds), ``input_length``, ``output_length``
and ``hash_ids`` (chained prefix-block hashes, one per 512-token block). Invariants: the hash
ids are kept as they are (``hash_block_size`` = 512); their count is not enforced, but rows
where ``len(hash_ids) != ceil(input_length / 512)`` are counted in the notes. Extra fields
are ignored. Blank lines are skipped (and still counted for line numbers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from memshare.errors import InputError

from ._source import SourceData, SourceRow, no_rows_error, read_lines, where

FORMAT = "mooncake"
HASH_BLOCK_SIZE = 512
_EXAMPLE = '{"timestamp": 0, "input_length": 600, "output_length": 8, "hash_ids": [0, 1]}'


@dataclass(frozen=True, slots=True)
class _Line:
    """One line's JSON object with located, typed field access."""

    path: Path
    line: int  # 1-based line number in the file
    obj: dict[str, Any]

    def error(self, name: str, problem: str) -> InputError:
        """An InputError at this line naming field ``name``."""
        return InputError(
            where(self.path, self.line),
            f"line {self.line}, field '{name}': {problem}",
            f"each line must be a JSON object like {_EXAMPLE}",
        )

    def get(self, name: str) -> Any:
        """The field's value; a missing field is an error."""
        if name not in self.obj:
            raise self.error(name, "missing")
        return self.obj[name]

    def count(self, name: str) -> int:
        """The field as a non-negative integer."""
        value = self.get(name)
        if not _is_int(value) or value < 0:
            raise self.error(name, f"{value!r} is not a non-negative integer")
        return int(value)

    def millis(self, name: str) -> Fraction:
        """The field as a finite number of milliseconds, returned in exact seconds."""
        value = self.get(name)
        if not (_is_int(value) or (isinstance(value, float) and math.isfinite(value))):
            raise self.error(name, f"{value!r} is not a number of milliseconds")
        return Fraction(value) / 1000

    def int_list(self, name: str) -> list[int]:
        """The field as a list of integers."""
        value = self.get(name)
        if not isinstance(value, list):
            raise self.error(name, f"must be a list of integers, got {_short(value)}")
        for k, item in enumerate(value):
            if not _is_int(item):
                raise self.error(name, f"item {k} is {item!r}, not an integer")
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_line(path: Path, number: int, index: int, text: str) -> SourceRow:
    """One non-blank line as a SourceRow; any problem is an InputError naming the line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            where(path, number),
            f"line {number} is not valid JSON ({e.msg} at column {e.colno})",
            f"each line must be a JSON object like {_EXAMPLE}",
        ) from None
    if not isinstance(obj, dict):
        raise InputError(
            where(path, number),
            f"line {number} is a JSON {type(obj).__name__}, not an object",
            f"each line must be a JSON object like {_EXAMPLE}",
        )
    line = _Line(path, number, obj)
    return SourceRow(
        line=number,
        index=index,
        time=line.millis("timestamp"),
        prompt_len=line.count("input_length"),
        output_len=line.count("output_length"),
        hash_ids=line.int_list("hash_ids"),
    )


def read(path: Path, limit: int | None = None) -> SourceData:
    """Parse and validate the first ``limit`` requests (all if None), in file order.

    Notes: ``hash_ids_length_mismatches`` (rows whose hash id count is not
    ``ceil(input_length / 512)``).
    """
    rows: list[SourceRow] = []
    for number, text in enumerate(read_lines(path, FORMAT), start=1):
        if text.strip():
            rows.append(_parse_line(path, number, len(rows), text))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise no_rows_error(path, FORMAT)
    mismatches = sum(
        1
        for r in rows
        if r.hash_ids is not None and len(r.hash_ids) != -(-r.prompt_len // HASH_BLOCK_SIZE)
    )
    return SourceData(rows, {"hash_ids_length_mismatches": mismatches})
