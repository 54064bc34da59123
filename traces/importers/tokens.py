"""A workload given as token ids (or prompt text): JSONL, one request per line.

Fields of each line (extra fields are ignored; blank lines are skipped and still counted):

- ``id``, optional: the request's name (a string or an integer), kept everywhere a request
  is named (the trace, the simulator's ``requests.csv``, validate's ``outputs.jsonl``); unique
  within the file. Lines without one are named ``tokens-<row>`` (the 0-based row, 6 digits);
- ``prompt_token_ids``: the prompt as a list of token ids (non-negative integers), or
  ``prompt``: its text, tokenized by the model's tokenizer (the import's ``tokenize``); never
  both (the rules of a prompt line are :mod:`memshare.traces.prompt_line`'s, as ``generate``'s);
- ``output_token_ids`` (the output, forced as given) or ``output_len`` (its length; ids are
  then drawn by validate's seeded rule), optional: without either the request is prompt-only;
- ``arrival_s``: seconds (a finite number), on every line or on none (then all arrive at 0).

Invariants: every problem is an :class:`~memshare.errors.InputError` naming the file, line and
field; a tokenizer is called only for lines that give text, so a file of ids never loads a
model (and ``--model`` is refused there: it would be ignored). A text line is sized against
the tokenizer's model: a text whose length alone rules it out is refused before it is
tokenized, and its tokens plus its output must fit the model's context. The trace has no hash
ids: the simulator and the engine hash the ids themselves, at whatever block size they run
(exact vLLM prefix hits at any block size).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

from memshare.errors import InputError
from memshare.traces.prompt_line import (
    check_fits,
    check_text_size,
    check_unique,
    json_object,
    prompt_of,
    request_id,
    token_ids,
)

from ._source import SourceData, SourceRow, no_rows_error, read_lines, row_id, where

FORMAT = "tokens"
HASH_BLOCK_SIZE: int | None = None
TEXT_FIELD = "prompt"
_EXAMPLE = '{"id": "q1", "prompt_token_ids": [1, 2, 3], "output_len": 16, "arrival_s": 0.5}'


class Tokenize(Protocol):
    """Prompt text -> token ids, and the facts of the model they belong to (a model is loaded
    on first use: :class:`~memshare.traces.importers.tokenizer.LazyTokenizer`)."""

    model: str | None  # the model asked for (``--model``); None: the default one
    name: str | None  # the loaded model's name (None until loaded)

    def __call__(self, text: str) -> list[int]: ...

    @property
    def context_limit(self) -> int: ...

    @property
    def max_token_chars(self) -> int: ...


def _error(path: Path, line: int, problem: str) -> InputError:
    return InputError(
        where(path, line), f"line {line}, {problem}", f"each line must be like {_EXAMPLE}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt(
    path: Path,
    line: int,
    obj: dict[str, Any],
    tokenize: Tokenize | None,
    output: tuple[int, str],
) -> list[int]:
    """The line's prompt ids; a text is sized against the tokenizer's model before and after
    it is tokenized (with ``output``: the output length and the field that gave it)."""
    at = where(path, line)
    _, prompt = prompt_of(at, obj, (TEXT_FIELD,))
    if not isinstance(prompt, str):
        return prompt
    if tokenize is None:
        raise _error(path, line, f"field '{TEXT_FIELD}' is text and no tokenizer was given")
    limit = tokenize.context_limit
    check_text_size(at, TEXT_FIELD, prompt, limit, tokenize.max_token_chars)
    ids = tokenize(prompt)
    if not ids:
        raise _error(path, line, "the prompt is empty: a request needs at least 1 token")
    check_fits(at, len(ids), output[0], output[1], limit)
    return ids


def _output(path: Path, line: int, obj: dict[str, Any]) -> tuple[int, list[int] | None]:
    ids = token_ids(where(path, line), obj, "output_token_ids")
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


def _row(
    path: Path, number: int, obj: dict[str, Any], index: int, tokenize: Tokenize | None
) -> tuple[SourceRow, bool]:
    """The request of line ``number``, the ``index``-th of the file; named by its ``id``, or
    by :func:`row_id` without one; and whether it gives ``arrival_s``."""
    given = obj.get("id")
    rid = request_id(where(path, number), given) if given is not None else row_id(FORMAT, index)
    out_len, out_ids = _output(path, number, obj)
    out_field = "output_len" if obj.get("output_len") is not None else "output_token_ids"
    prompt = _prompt(path, number, obj, tokenize, (out_len, f"field '{out_field}'"))
    arrival = _arrival(path, number, obj)
    row = SourceRow(
        line=number,
        index=index,
        time=arrival if arrival is not None else Fraction(0),
        prompt_len=len(prompt),
        output_len=out_len,
        prompt_ids=prompt,
        output_ids=out_ids,
        rid=rid,
    )
    return row, arrival is not None


def read(path: Path, limit: int | None = None, tokenize: Tokenize | None = None) -> SourceData:
    """Parse and validate the first ``limit`` requests (all if None), in file order.

    Refused besides a bad line: an id two lines share (naming both lines), and a
    ``tokenize`` whose ``model`` was asked for (``--model``) when no imported line is text.
    Notes: ``text_prompts`` (lines whose prompt was tokenized), ``arrivals`` ("given" or
    "all at 0") and, where text was tokenized, ``tokenizer`` (the tokenizer's ``name``).
    """
    rows: list[SourceRow] = []
    timed: bool | None = None
    texts = 0
    seen: dict[str, int] = {}
    for number, text in enumerate(read_lines(path, FORMAT), start=1):
        if not text.strip():
            continue
        obj = json_object(where(path, number), text)
        row, has_time = _row(path, number, obj, len(rows), tokenize)
        texts += obj.get(TEXT_FIELD) is not None
        if timed is None:
            timed = has_time
        elif timed != has_time:
            raise _error(path, number, "field 'arrival_s': given on some lines and not on others")
        assert row.rid is not None
        check_unique(where(path, number), row.rid, number, seen)
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise no_rows_error(path, FORMAT)
    _check_model_applies(path, texts, tokenize)
    notes: dict[str, Any] = {"text_prompts": texts, "arrivals": "given" if timed else "all at 0"}
    if texts:
        notes["tokenizer"] = getattr(tokenize, "name", None)
    return SourceData(rows, notes)


def _check_model_applies(path: Path, texts: int, tokenize: Tokenize | None) -> None:
    """``--model`` tokenizes text prompts: refused on a file (part) of token ids only, where it
    would be ignored (the ids are checked against a model's vocabulary when one runs them)."""
    model = tokenize.model if tokenize is not None else None
    if model is not None and not texts:
        raise InputError(
            f"--model {model}",
            f"tokenizes '{TEXT_FIELD}' texts, and the imported lines of {path} give token ids only",
            "leave --model out (validate checks the ids against the model it runs)",
        )
