"""A workload given as token ids (or prompt text): JSONL, one request per line.

Fields of each line (extra fields are ignored; blank lines are skipped and still counted):

- ``prompt_token_ids``: the prompt as a list of token ids (non-negative integers), or
  ``prompt``: its text, tokenized by the model's tokenizer (the import's ``tokenize``);
- ``output_token_ids`` (the output, forced as given) or ``output_len`` (its length; ids are
  then drawn by validate's seeded rule), optional: without either the request is prompt-only;
- ``arrival_s``: seconds (a finite number), on every line or on none (then all arrive at 0).

Invariants: every problem is an :class:`~memshare.errors.InputError` naming the file, line and
field; a tokenizer is called only for lines that give text, so a file of ids never loads a
model. The trace has no hash ids: the simulator and the engine hash the ids themselves, at
whatever block size they run (exact vLLM prefix hits at any block size).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from memshare.errors import InputError

from ._source import SourceData, SourceRow, no_rows_error, read_lines, where

FORMAT = "tokens"
HASH_BLOCK_SIZE: int | None = None
MAX_TOKEN_ID = (1 << 31) - 1  # past every vocabulary; the engine checks its own size
_EXAMPLE = '{"prompt_token_ids": [1, 2, 3], "output_len": 16, "arrival_s": 0.5}'
Tokenize = Callable[[str], list[int]]  # prompt text -> token ids


def _error(path: Path, line: int, problem: str) -> InputError:
    return InputError(
        where(path, line), f"line {line}, {problem}", f"each line must be like {_EXAMPLE}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids(path: Path, line: int, obj: dict[str, Any], name: str) -> list[int] | None:
    """Field ``name`` as a list of token ids, or None when absent."""
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _error(path, line, f"field '{name}': must be a list of token ids")
    for k, item in enumerate(value):
        if not _is_int(item) or not 0 <= item <= MAX_TOKEN_ID:
            raise _error(path, line, f"field '{name}': item {k} is {item!r}, not a token id")
    return list(value)


def _prompt(path: Path, line: int, obj: dict[str, Any], tokenize: Tokenize | None) -> list[int]:
    ids = _ids(path, line, obj, "prompt_token_ids")
    text = obj.get("prompt")
    if ids is not None and text is not None:
        raise _error(path, line, "give 'prompt_token_ids' or 'prompt', not both")
    if ids is None:
        if text is None:
            raise _error(path, line, "field 'prompt_token_ids' (or 'prompt'): missing")
        if not isinstance(text, str):
            raise _error(path, line, f"field 'prompt': must be text, got {type(text).__name__}")
        if tokenize is None:
            raise _error(path, line, "field 'prompt' is text and no tokenizer was given")
        ids = tokenize(text)
    if not ids:
        raise _error(path, line, "the prompt is empty: a request needs at least 1 token")
    return ids


def _output(path: Path, line: int, obj: dict[str, Any]) -> tuple[int, list[int] | None]:
    ids = _ids(path, line, obj, "output_token_ids")
    n = obj.get("output_len")
    if n is not None and (not _is_int(n) or n < 0):
        raise _error(path, line, f"field 'output_len': {n!r} is not a non-negative integer")
    if ids is not None and n is not None and n != len(ids):
        raise _error(path, line, f"'output_len' is {n} but 'output_token_ids' holds {len(ids)} ids")
    return (len(ids) if ids is not None else int(n or 0)), ids


def _arrival(path: Path, line: int, obj: dict[str, Any]) -> Fraction | None:
    value = obj.get("arrival_s")
    if value is None:
        return None
    finite = _is_int(value) or (isinstance(value, float) and math.isfinite(value))
    if not finite or value < 0:
        raise _error(path, line, f"field 'arrival_s': {value!r} is not a time >= 0 in seconds")
    return Fraction(value)


def read(path: Path, limit: int | None = None, tokenize: Tokenize | None = None) -> SourceData:
    """Parse and validate the first ``limit`` requests (all if None), in file order.

    Notes: ``text_prompts`` (lines whose prompt was tokenized), ``arrivals`` ("given" or
    "all at 0") and, where text was tokenized, ``tokenizer`` (the tokenizer's ``name``).
    """
    rows: list[SourceRow] = []
    timed: bool | None = None
    texts = 0
    for number, text in enumerate(read_lines(path, FORMAT), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _error(path, number, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _error(path, number, f"a JSON {type(obj).__name__}, not an object")
        texts += "prompt" in obj
        prompt = _prompt(path, number, obj, tokenize)
        out_len, out_ids = _output(path, number, obj)
        arrival = _arrival(path, number, obj)
        if timed is None:
            timed = arrival is not None
        elif timed != (arrival is not None):
            raise _error(path, number, "field 'arrival_s': given on some lines and not on others")
        rows.append(
            SourceRow(
                line=number,
                index=len(rows),
                time=arrival or Fraction(0),
                prompt_len=len(prompt),
                output_len=out_len,
                prompt_ids=prompt,
                output_ids=out_ids,
            )
        )
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise no_rows_error(path, FORMAT)
    notes: dict[str, Any] = {"text_prompts": texts, "arrivals": "given" if timed else "all at 0"}
    if texts:
        notes["tokenizer"] = getattr(tokenize, "name", None)
    return SourceData(rows, notes)
