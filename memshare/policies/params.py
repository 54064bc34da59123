"""Policy parameters: each one's type, range and meaning, and the one check of a value.

Every policy declares its parameters in a ``PARAMS`` class attribute (name -> :class:`Param`),
one per init field besides ``name``. :func:`check_value` turns a value as given (text from
``--set`` or ``--sweep``, or a typed value from a TOML file or a run's ``config.json``) into
the parameter's type and checks it against the parameter's limits; :func:`check_fields` runs
the same checks on a constructed policy (its ``__post_init__``), so a policy built in Python
holds to the same limits as one built from the command line.

Invariants: a value :func:`check_value` returns has the parameter's type (``int``, ``float``
or ``str``; never ``bool`` for a number), is finite and lies in the parameter's range; a bad
value is one :class:`~memshare.errors.InputError` naming the parameter, the value given and a
value that would be right. No numpy arithmetic happens here, so no numpy warning can.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from memshare.errors import InputError

Kind = Literal["int", "float", "choice", "file", "text"]  # file: a non-empty path
COUNT_MAX = 2**31 - 1  # largest count (steps, blocks): beyond any trace's, and safe for int32
SEED_MAX = 2**64 - 1  # numpy seeds are read as unsigned 64-bit words


@dataclass(frozen=True)
class Param:
    """One parameter: its kind, its closed range ``lo..hi`` (numbers) or its choices, what a
    right value looks like and what it means (both shown in messages)."""

    kind: Kind
    example: object  # a value that would be right (the default, usually)
    meaning: str  # what the value is, in a few words
    lo: float | None = None  # smallest allowed (inclusive)
    hi: float | None = None  # largest allowed (inclusive)
    choices: tuple[str, ...] = ()  # kind "choice": the allowed words
    cost: Callable[[int], int] | None = None  # bytes a value would need (memory-sizing ones)

    def range_text(self, key: str) -> str:
        """``lo <= key <= hi`` (or ``one of: a, b``)."""
        if self.kind == "choice":
            return f"one of: {', '.join(self.choices)}"
        lo = "" if self.lo is None else f"{_num(self.lo)} <= "
        hi = "" if self.hi is None else f" <= {_num(self.hi)}"
        return f"{lo}{key}{hi}"


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"  # as one would type it


def _shown(value: object) -> str:
    """The value as the user gave it (text as typed, quoted when blank or padded; the middle
    of a long one elided)."""
    text = value if isinstance(value, str) and value.strip() == value and value else repr(value)
    return text if len(text) <= 40 else f"{text[:24]}...{text[-8:]} ({len(text)} characters)"


def _size(nbytes: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} bytes"


def _parse(key: str, value: object, spec: Param) -> Any:
    """The value in the parameter's type (text parsed; typed values must already match);
    None where it cannot be."""
    if spec.kind in ("choice", "file", "text"):
        return value if isinstance(value, str) else None
    if isinstance(value, str):
        try:
            return int(value) if spec.kind == "int" else float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's too
        return None
    if spec.kind == "int":
        return int(value) if isinstance(value, numbers.Integral) else None
    try:
        return float(value)
    except OverflowError:  # an integer past float's range
        return math.inf


_EXPECT = {
    "int": "an integer",
    "float": "a number",
    "choice": "a word",
    "file": "a path",
    "text": "text",
}


def allowed_text(key: str, spec: Param) -> str:
    """What ``--set key=...`` accepts, in words: the range or choices, else the kind
    (``a path``, ``text``)."""
    return _EXPECT[spec.kind] if spec.kind in ("file", "text") else spec.range_text(key)


def check_value(policy: str, key: str, value: object, spec: Param, where: str = "--set") -> Any:
    """``value`` typed and checked against ``spec`` (InputError at ``where`` naming ``key``,
    the value given, the range and an example)."""
    fix = f"e.g. {key}={spec.example}"
    given = f"{policy} {key}={_shown(value)}"
    typed = _parse(key, value, spec)
    if typed is None:
        problem = f"{given} is not {_EXPECT[spec.kind]}"
        raise InputError(where, problem, f"give {spec.range_text(key)}, {fix}")
    if isinstance(typed, float) and not math.isfinite(typed):
        problem = f"{given} is not a finite number"
        raise InputError(where, problem, f"give {spec.range_text(key)}, {fix}")
    if spec.kind == "choice" and typed not in spec.choices:
        raise InputError(where, f"{given} is not {spec.range_text(key)}", fix)
    if spec.kind == "file" and not typed.strip():
        raise InputError(where, f"{policy} {key} is empty ({spec.meaning})", fix)
    if spec.kind in ("int", "float"):
        low = spec.lo is not None and typed < spec.lo
        high = spec.hi is not None and typed > spec.hi
        if low or high:
            need = ""
            if high and spec.cost is not None:
                need = f"; its buffers alone would take {_size(spec.cost(typed))}"
            problem = f"{given} is outside {spec.range_text(key)} ({spec.meaning}){need}"
            raise InputError(where, problem, fix)
    return typed


def check_fields(obj: object, params: Mapping[str, Param], policy: str) -> None:
    """Every parameter of a constructed policy, checked in place (its ``__post_init__``)."""
    for key, spec in params.items():
        check_value(policy, key, getattr(obj, key), spec)
