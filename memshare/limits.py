"""The rules of the values every command takes in the same sense, one function each: a
number of items to read (``--limit``) and tokens per KV block (``--block-size``).

The CLI's option callbacks, the library's option dataclasses (the simulator's config, capture,
validate's workload tokens) and config files all call these, so the same value gets the same
answer and the same words in every command.
"""

from __future__ import annotations

from memshare.errors import InputError

MAX_BLOCK_SIZE = 131_072  # tokens per block: the longest context of any preset (128 Ki)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_limit(value: object, where: str = "--limit") -> None:
    """A limit on the items read: an integer >= 1, or None (all of them)."""
    if value is not None and (not _is_int(value) or value < 1):  # type: ignore[operator]
        raise InputError(where, f"must be >= 1, got {value!r}", "leave it out to take all")


def check_tokens_per_block(value: object, where: str = "--block-size") -> None:
    """Tokens per KV block: an integer in 1..:data:`MAX_BLOCK_SIZE`."""
    if not _is_int(value) or not 1 <= value <= MAX_BLOCK_SIZE:  # type: ignore[operator]
        raise InputError(
            where,
            f"must be 1..{MAX_BLOCK_SIZE:,} tokens per block, got {value!r}",
            "e.g. 16 (vLLM's default)",
        )
