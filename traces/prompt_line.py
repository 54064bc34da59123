"""One line of a JSONL prompt file, read and sized by one set of rules for every reader.

``memshare import tokens`` (traces/importers/tokens.py) and ``memshare generate``
(``read_prompts`` in validate/engine/generate.py) read the same kind of line: an optional
``id``, a prompt given either as token ids (``prompt_token_ids``) or as text, and a number of
output tokens. The rules they share live here, so the same line gets the same answer:

- :func:`request_id`: a given ``id`` (a string, or an integer written in decimal) is kept as
  the request's name everywhere (the trace's ``requests.jsonl``, the simulator's
  ``requests.csv``, the engines' ``outputs.jsonl``); it is 1..:data:`MAX_ID_CHARS` printable
  characters with no blank at either end, so every one of those files carries it unchanged
  (JSON escapes it, CSV quotes a comma or a quote) and it prints on one line.
- :func:`json_object`: a line is one JSON object.
- :func:`prompt_of`: a line gives its prompt one way: ids, or text, never both.
- :func:`check_text_size`, :func:`check_fits`, :func:`check_max_tokens`: sizes against the
  model's context limit (or, before a model is known, :data:`MAX_REQUEST_TOKENS`), so no size
  reaches an allocator unchecked. The text bound is sound for tokenizers that never delete
  text (byte-level BPE, SentencePiece): a token covers at most :func:`max_token_chars`
  characters, so a text of ``c`` characters has at least ``ceil(c / max_token_chars)`` tokens.

Every problem is an :class:`~memshare.errors.InputError` whose ``where`` is the caller's
(``FILE:LINE`` for a line, the option's name for an option).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from typing import Any

from memshare.errors import InputError
from memshare.traces.fields import is_int
from memshare.traces.schema import MAX_REQUEST_TOKENS

IDS_FIELD = "prompt_token_ids"
MAX_TOKEN_ID = (1 << 31) - 1  # past every vocabulary; a loaded model checks its own size
MAX_ID_CHARS = 128


def json_object(where: str, text: str) -> dict[str, Any]:
    """One line's text as a JSON object (an integer of thousands of digits, which Python's
    parser refuses with a ValueError, is refused like any other bad JSON)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            where, f"not valid JSON ({e.msg} at column {e.colno})", "write one JSON object a line"
        ) from None
    except ValueError as e:
        raise InputError(where, f"not valid JSON ({e})", "write one JSON object a line") from None
    if not isinstance(obj, dict):
        raise InputError(
            where, f"a JSON {type(obj).__name__}, not an object", "write one JSON object a line"
        )
    return obj


def request_id(where: str, value: object) -> str:
    """A line's ``id`` as the request's name: a string, or an integer as its decimal text.

    Refused: another type, an empty or over-long name, a blank at either end, and characters
    that are not printable (control and format characters, line and paragraph separators)."""
    fix = f'give each line a unique id of 1..{MAX_ID_CHARS} printable characters, e.g. "q-17"'
    if not (isinstance(value, str) or is_int(value)):
        raise InputError(
            where, f"field 'id' must be a string or an integer, got {type(value).__name__}", fix
        )
    rid = str(value)
    if not rid.strip():
        raise InputError(where, f"field 'id' is {rid!r}: an id must not be blank", fix)
    if len(rid) > MAX_ID_CHARS:
        raise InputError(
            where, f"field 'id' has {len(rid):,} characters, over the {MAX_ID_CHARS} allowed", fix
        )
    if rid != rid.strip():
        raise InputError(where, f"field 'id' {rid!r} begins or ends with a blank", fix)
    bad = next((c for c in rid if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029"), None)
    if bad is not None:
        raise InputError(
            where, f"field 'id' {rid!r} holds the unprintable character U+{ord(bad):04X}", fix
        )
    return rid


def check_unique(where: str, rid: str, line: int, seen: dict[str, int]) -> None:
    """Record that line ``line`` names request ``rid``; refuse a name an earlier line took."""
    first = seen.setdefault(rid, line)
    if first != line:
        raise InputError(
            where,
            f"request id {rid!r} is taken twice: by line {first} and by line {line}",
            "give every line its own id",
        )


def token_ids(where: str, obj: dict[str, Any], name: str) -> list[int] | None:
    """Field ``name`` of ``obj`` as a list of token ids (0..:data:`MAX_TOKEN_ID`), or None
    when absent (or null)."""
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise InputError(
            where,
            f"field '{name}' must be a list of token ids, got {type(value).__name__}",
            "e.g. [1, 2, 3]",
        )
    for k, item in enumerate(value):
        if not is_int(item) or not 0 <= item <= MAX_TOKEN_ID:
            raise InputError(
                where,
                f"field '{name}': item {k} is {item!r}, not a token id",
                f"token ids are integers in 0..{MAX_TOKEN_ID}",
            )
    return list(value)


def prompt_of(
    where: str, obj: dict[str, Any], text_fields: Sequence[str]
) -> tuple[str, list[int] | str]:
    """The line's prompt as ``(field, ids)`` or ``(field, text)``.

    The text field is the first of ``text_fields`` the line has (null counts as absent). A
    line with both ``prompt_token_ids`` and that text field is refused, as is one with
    neither, a text that is not a string or is blank, and an empty list of ids."""
    ids = token_ids(where, obj, IDS_FIELD)
    name = next((f for f in text_fields if obj.get(f) is not None), None)
    if ids is not None and name is not None:
        raise InputError(
            where,
            f"the line gives both '{IDS_FIELD}' and '{name}'",
            "give the prompt one way: its token ids or its text, not both",
        )
    if ids is not None:
        if not ids:
            raise InputError(
                where, f"field '{IDS_FIELD}' is empty", "a request needs at least 1 prompt token"
            )
        return IDS_FIELD, ids
    if name is None:
        names = " or ".join(f"'{f}'" for f in (IDS_FIELD, *text_fields))
        raise InputError(where, f"the line has no prompt (field {names})", "give a prompt")
    text = obj[name]
    if not isinstance(text, str) or not text.strip():
        got = "blank" if isinstance(text, str) else f"a {type(text).__name__}"
        raise InputError(where, f"field '{name}' is {got}, not a prompt text", "give the text")
    return name, text


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` can stand for: its longest vocabulary
    entry, added tokens included (a byte-level entry spells one byte per character, so this
    bounds the characters of text it covers from above)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def check_text_size(where: str, name: str, text: str, context_limit: int, token_chars: int) -> None:
    """Refuse, before tokenizing, a text whose length alone proves it cannot fit the context:
    ``ceil(len(text) / token_chars)`` tokens at the least (see the module docstring)."""
    least = -(-len(text) // token_chars)
    if least >= context_limit:
        raise InputError(
            where,
            f"field '{name}' holds {len(text):,} characters: at least {least:,} tokens (no "
            f"token is longer than {token_chars} characters), past the model's context of "
            f"{context_limit:,} tokens",
            f"shorten the prompt to under {context_limit:,} tokens",
        )


def check_fits(
    where: str, prompt_len: int, out_len: int, out_name: str, context_limit: int
) -> None:
    """Prompt and output fit the context: ``prompt_len < context_limit`` (room for one
    output token) and ``prompt_len + out_len <= context_limit``. ``out_name`` names where
    ``out_len`` came from (``--max-tokens``, ``field 'max_tokens'``, ``field 'output_len'``),
    and the fix says the largest value of it that fits."""
    if prompt_len >= context_limit:
        raise InputError(
            where,
            f"the prompt has {prompt_len:,} tokens, past the model's context of "
            f"{context_limit:,} tokens (with room for 1 output token)",
            f"shorten the prompt to at most {context_limit - 1:,} tokens",
        )
    if prompt_len + out_len > context_limit:
        raise InputError(
            where,
            f"the prompt ({prompt_len:,} tokens) plus {out_name} {out_len:,} gives "
            f"{prompt_len + out_len:,} tokens, past the model's context of {context_limit:,}",
            f"give {out_name} {context_limit - prompt_len:,} or less",
        )


def check_max_tokens(where: str, value: object, context_limit: int | None) -> int:
    """A number of output tokens (``--max-tokens``, or a line's ``max_tokens``): an integer
    in ``1..context_limit - 1`` (a prompt needs one token of the context), or, before the
    model is known (``context_limit`` None), in ``1..MAX_REQUEST_TOKENS - 1``. ``where`` names
    the option or ``FILE:LINE field 'max_tokens'``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(where, f"must be a positive integer, got {value!r}", "e.g. 64")
    if context_limit is None and value >= MAX_REQUEST_TOKENS:
        raise InputError(
            where,
            f"{value:,} output tokens are past any model's context (a request holds at most "
            f"{MAX_REQUEST_TOKENS:,} tokens)",
            "give at most the model's context less the prompt, e.g. 256",
        )
    if context_limit is not None and value >= context_limit:
        raise InputError(
            where,
            f"{value:,} output tokens cannot fit the model's context of {context_limit:,} "
            "tokens beside a prompt",
            f"give {context_limit - 1:,} or less (prompt + output tokens must fit the context)",
        )
    return value
