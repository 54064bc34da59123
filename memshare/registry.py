"""The one policy registry: its names are the ``--policy`` choices everywhere.

A factory takes keyword parameters (from ``--set key=value`` or a TOML file) and returns a
fresh policy object; one object serves one run (simulation or validation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from memshare.errors import InputError
from memshare.policies.cf_topk import CfTopK
from memshare.policies.composite import Composite
from memshare.policies.dedup import ExactDedup, TokenDedup
from memshare.policies.kvshare import KVShare
from memshare.policies.kvsharer import KVSharer
from memshare.policies.none import NoSharing
from memshare.policies.params import Param, check_value
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
    """A fresh policy object; unknown names and parameters, and values outside a parameter's
    limits, are one-line InputErrors (the policies check their fields when built)."""
    factory = _factory(name)
    specs = param_specs(name)
    for key in params:
        if key not in specs:
            raise _unknown(name, key, specs, "--set")
    try:
        return factory(**params)
    except (TypeError, ValueError) as e:
        raise InputError(
            "--set", f"bad parameter for policy {name!r} ({e})", "see `memshare policies`"
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


def _specs_of(part: str) -> dict[str, Param]:
    """One registered policy's parameter table: its ``PARAMS``, or (a factory added with
    :func:`register` without one) specs derived from its defaults' types."""
    table: dict[str, Param] | None = getattr(_REGISTRY[part], "PARAMS", None)
    defaults = param_defaults(part)
    if table is not None:
        return {key: table[key] for key in defaults}
    return {key: _derived(default) for key, default in defaults.items()}


def param_specs(name: str) -> dict[str, tuple[str, Param]]:
    """A policy's parameters: name -> (the first member policy that takes it, its
    :class:`Param`), in :func:`param_defaults`' order (InputError for an unknown policy)."""
    _factory(name)
    out: dict[str, tuple[str, Param]] = {}
    for part in name.split("+"):
        for key, spec in _specs_of(part).items():
            out.setdefault(key, (part, spec))
    return out


def _derived(default: Any) -> Param:
    """A spec from a default alone: its type, any finite value."""
    if isinstance(default, bool) or not isinstance(default, int | float):
        return Param("text", default, "text")
    return Param("int" if isinstance(default, int) else "float", default, "a number")


def _unknown(name: str, key: str, specs: dict[str, tuple[str, Param]], where: str) -> InputError:
    known = ", ".join(specs) or "none"
    return InputError(where, f"policy {name!r} has no parameter {key!r}", f"known: {known}")


def coerce_params(name: str, raw: dict[str, Any], where: str = "--set") -> dict[str, Any]:
    """``raw`` in the types of the policy's parameters, each checked against its limits
    (:func:`memshare.policies.params.check_value`): the one check of a policy parameter,
    for ``--set``, a sweep's values (``where="--sweep"``) and a TOML file alike.

    Strings (``--set``) are parsed; values that are already typed (a TOML file) must have the
    parameter's type. A key may be scoped, ``POLICY.key``, by the policy or one member of a
    composition (as ``simulate`` takes it). Invariant: every value returned has its
    parameter's type and lies in its range (numbers finite), under its bare key; nothing is
    built, so this is cheap and runs before any work.
    """
    specs = param_specs(name)
    parts = name.split("+")
    members = [(part, _specs_of(part)) for part in parts]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        scope, dot, bare = key.rpartition(".")
        if dot and scope not in (name, *parts):
            raise InputError(
                where, f"{key!r} names policy {scope!r}, which is not run", "check --policy"
            )
        if bare not in specs:
            raise _unknown(name, bare, specs, where)
        for part, table in members:  # every member that takes it (all get the value)
            if bare in table and scope in ("", name, part):
                out[bare] = check_value(part, bare, value, table[bare], where)
        if bare not in out:
            raise _unknown(scope, bare, {k: v for k, v in specs.items() if v[0] == scope}, where)
    return out


def check_block_size(
    name: str, params: dict[str, Any], block_size: int, where: str = "--set"
) -> None:
    """The checks of a policy's (typed) parameters that need the run's block size, such as
    kvshare's ``window <= block_size`` (each member's optional ``check_block_size`` hook)."""
    for part in name.split("+"):
        hook = getattr(_REGISTRY[part], "check_block_size", None)
        if hook is not None:
            table = _specs_of(part)
            hook({k: v for k, v in params.items() if k in table}, block_size, where)
