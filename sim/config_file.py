"""A run's ``config.json`` read back (:func:`read_config`): every field of its ``config``
object checked for its type, then for its range, before a :class:`SimConfig` is made.

Invariants: a config.json that memshare wrote reads back to the :class:`SimConfig` that wrote
it (``to_dict`` inverted); anything else (a field of the wrong type, a number that is not
finite, ``NaN``/``Infinity`` tokens, a value out of range, an unknown or missing field) is one
:class:`~memshare.errors.InputError` naming the file and the field, never a traceback and
never a run made from nonsense.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from memshare.errors import InputError
from memshare.registry import coerce_params
from memshare.sim.config import (
    ArrivalSpec,
    CostCoefficients,
    GpuSpec,
    KVBudget,
    ModelConfig,
    SchedulerConfig,
    SimConfig,
)
from memshare.sim.run import CONFIG
from memshare.traces.schema import loads_strict

FIX = "simulate the trace again to rewrite it"
T = TypeVar("T")
NESTED: dict[str, type] = {
    "model": ModelConfig,
    "gpu": GpuSpec,
    "cost": CostCoefficients,
    "scheduler": SchedulerConfig,
    "kv": KVBudget,
    "arrival": ArrivalSpec,
}


def read_config(directory: Path) -> SimConfig:
    """The config of an earlier run (``DIR/config.json``), to rerun or validate it."""
    path = directory / CONFIG if directory.is_dir() else directory
    try:
        raw = loads_strict(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(str(path), f"cannot read a run config ({e})", "pass a run dir") from None
    except ValueError as e:  # NaN, Infinity or 1e400: memshare never writes them
        raise InputError(str(path), str(e), FIX) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise InputError(str(path), "not a simulation config.json", "pass a run directory")
    return config_from_dict(raw["config"], str(path))


def config_from_dict(raw: dict[str, Any], where: str = "config.json") -> SimConfig:
    """``SimConfig.to_dict`` inverted, each field typed and then range-checked (the range
    checks are the dataclasses' own, as for options; their option names are kept in the
    message beside the field)."""
    values = _typed(SimConfig, raw, "config", where, skip=NESTED)
    for name, cls in NESTED.items():
        if name in raw:
            values[name] = _build(cls, _typed(cls, raw[name], f"config.{name}", where), where)
    values["policy_params"] = _policy_params(values, where)
    return _build(SimConfig, values, where)


def _policy_params(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The policy's parameters checked by the registry (the one check of each, as for
    ``--set``), and typed as the registry types them: a number or a flag written as a string
    was not written by memshare."""
    given = values.get("policy_params", {})
    at = f"{where}: field config.policy_params"
    typed = coerce_params(values["policy"], given, where=at)
    for key, value in given.items():
        want = typed[key.rpartition(".")[2]]
        if isinstance(value, str | bool) and type(value) is not type(want):
            raise InputError(at, f"{key}: {_shown(value)} is not {type(want).__name__}", FIX)
    return dict(given)


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """``cls(**values)``, its own range checks' refusals said of the file."""
    try:
        return cls(**values)
    except InputError as e:
        raise InputError(where, f"{e.where}: {e.problem}", FIX) from None


def _typed(
    cls: type[Any], raw: Any, path: str, where: str, skip: dict[str, type] | None = None
) -> dict[str, Any]:
    """``raw``'s fields of dataclass ``cls``, each of its declared type (a float must be
    finite; an int is not a bool); unknown fields refused, missing required ones too."""
    if not isinstance(raw, dict):
        raise InputError(where, f"field {path}: {_shown(raw)} is not an object", FIX)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(where, f"field {path}.{unknown[0]} is not a run config field", FIX)
    out: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InputError(where, f"field {path}.{name} is missing", FIX)
            continue
        if skip is not None and name in skip:
            continue
        value = raw[name]
        if not _is(value, hints[name]):
            kind = _kind(hints[name])
            raise InputError(where, f"field {path}.{name}: {_shown(value)} is not {kind}", FIX)
        out[name] = float(value) if hints[name] is float else value
    return out


def _is(value: Any, hint: Any) -> bool:
    """Whether ``value`` (parsed JSON) is of type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return False  # a type a config.json cannot hold


def _kind(hint: Any) -> str:
    """``hint`` in words, for a message."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    names = {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}
    return "an object" if origin is dict else names.get(hint, "null")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
