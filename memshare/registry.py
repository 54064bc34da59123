"""The one policy registry: its names are the ``--policy`` choices everywhere.

A factory takes keyword parameters (from ``--set key=value`` or a TOML file) and returns a
fresh policy object; one object serves one run (simulation or validation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from memshare.errors import InputError
from memshare.policies.cf_topk import CfTopK
from memshare.policies.composite import Composite
from memshare.policies.dedup import ExactDedup, TokenDedup
from memshare.policies.kvshare import KVShare
from memshare.policies.kvsharer import KVSharer
from memshare.policies.none import NoSharing
from memshare.policies.prefix import PrefixCaching
from memshare.policy import Policy

PolicyFactory = Callable[..., Policy]

_REGISTRY: dict[str, PolicyFactory] = {
    "none": NoSharing,
    "prefix": PrefixCaching,
    "exact-dedup": ExactDedup,
    "token-dedup": TokenDedup,
    "cf-topk": CfTopK,
    "kvshare": KVShare,
    "kvsharer": KVSharer,
}
LOSSY = {"cf-topk", "token-dedup", "exact-dedup"}  # sharers that repoint generated blocks
COMPOSITIONS = ("prefix+cf-topk", "prefix+cf-topk+kvsharer", "prefix+kvsharer")


def _compose(name: str) -> PolicyFactory:
    parts = name.split("+")

    def factory(**params: Any) -> Policy:
        members: list[Policy] = []
        used: set[str] = set()
        for part in parts:
            accepted = param_defaults(part)
            mine = {k: v for k, v in params.items() if k in accepted}
            if part == "prefix" and LOSSY & set(parts):
                mine.setdefault("publish", "prompt")
            used |= mine.keys()
            members.append(_REGISTRY[part](**mine))
        unknown = set(params) - used
        if unknown:
            raise TypeError(f"unexpected parameter(s) {sorted(unknown)}")
        return Composite(tuple(members), name)

    return factory


for _name in COMPOSITIONS:
    _REGISTRY[_name] = _compose(_name)


def policy_names() -> list[str]:
    """Registered names, in registration order (the CLI's choice list)."""
    return list(_REGISTRY)


def register(name: str, factory: PolicyFactory) -> None:
    """Add a policy under a new name (ValueError if taken)."""
    if name in _REGISTRY:
        raise ValueError(f"policy {name!r} is already registered")
    _REGISTRY[name] = factory


def _factory(name: str) -> PolicyFactory:
    factory = _REGISTRY.get(name)
    if factory is None:
        raise InputError(
            "--policy", f"unknown policy {name!r}", f"choose one of: {', '.join(_REGISTRY)}"
        )
    return factory


def make_policy(name: str, **params: Any) -> Policy:
    """A fresh policy object; unknown names and parameters are one-line InputErrors."""
    factory = _factory(name)
    try:
        return factory(**params)
    except (TypeError, ValueError) as e:
        raise InputError(
            "--set", f"bad parameter for policy {name!r} ({e})", "check the names"
        ) from None


def parse_settings(pairs: list[str], where: str = "--set") -> dict[str, str]:
    """``["k=0.2", "tau=0.3"]`` -> ``{"k": "0.2", "tau": "0.3"}`` (values still strings)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(where, f"{pair!r} is not key=value", "write e.g. --set tau=0.2")
        out[key.strip()] = value.strip()
    return out


def param_defaults(name: str) -> dict[str, Any]:
    """A policy's parameters and their defaults (all members' for a composition)."""
    _factory(name)
    out: dict[str, Any] = {}
    for part in name.split("+"):
        factory = _REGISTRY[part]
        if dataclasses.is_dataclass(factory):
            for f in dataclasses.fields(factory):
                if f.init and f.name != "name":
                    out.setdefault(f.name, f.default)
    return out


def coerce_params(name: str, raw: dict[str, Any], where: str = "--set") -> dict[str, Any]:
    """Convert values to the types of the policy's parameters (their defaults' types).

    Strings (``--set``) are parsed; values that are already typed (a TOML file) must have the
    parameter's type. Invariant: every numeric value returned is finite (NaN and infinity are
    refused: as a threshold they would silently share nothing, or everything)."""
    defaults = param_defaults(name)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in defaults:
            known = ", ".join(defaults) or "none"
            raise InputError(where, f"policy {name!r} has no parameter {key!r}", f"known: {known}")
        default = defaults[key]
        bad = InputError(
            where, f"{key}={value!r} is not a {type(default).__name__}", f"e.g. {key}={default}"
        )
        if isinstance(default, str) or default is None:
            if not isinstance(value, str) and default is not None:
                raise bad
            out[key] = value
            continue
        if isinstance(value, str):
            try:
                value = _BOOL[value.lower()] if isinstance(default, bool) else type(default)(value)
            except (KeyError, ValueError):
                raise bad from None
        elif (
            isinstance(default, bool) != isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(default, int) and not isinstance(value, int))
        ):
            raise bad
        elif isinstance(default, float):
            value = float(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(
                where, f"{key}={value!r} is not a finite number", f"e.g. {key}={default}"
            )
        out[key] = value
    return out


_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
