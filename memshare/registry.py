"""The one policy registry: its names are the ``--policy`` choices everywhere.

A factory takes keyword parameters (from ``--set key=value`` or a TOML file) and returns a
fresh policy object; one object serves one run (simulation or validation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memshare.errors import InputError
from memshare.policies.none import NoSharing
from memshare.policies.prefix import PrefixCaching
from memshare.policy import Policy

PolicyFactory = Callable[..., Policy]

_REGISTRY: dict[str, PolicyFactory] = {
    "none": NoSharing,
    "prefix": PrefixCaching,
}


def policy_names() -> list[str]:
    """Registered names, in registration order (the CLI's choice list)."""
    return list(_REGISTRY)


def register(name: str, factory: PolicyFactory) -> None:
    """Add a policy under a new name (ValueError if taken)."""
    if name in _REGISTRY:
        raise ValueError(f"policy {name!r} is already registered")
    _REGISTRY[name] = factory


def make_policy(name: str, **params: Any) -> Policy:
    """A fresh policy object; unknown names and parameters are one-line InputErrors."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise InputError(
            "--policy", f"unknown policy {name!r}", f"choose one of: {', '.join(_REGISTRY)}"
        )
    try:
        return factory(**params)
    except TypeError as e:
        raise InputError(
            "--set", f"bad parameter for policy {name!r} ({e})", "check the names"
        ) from None
