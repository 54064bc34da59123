"""Local Ray instances on the loopback address only.

Ray binds its services to the machine's network address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is in the environment when ``ray`` is first imported
(it reads it into a constant) and when its processes start (they inherit it): then every node
listens and connects on 127.0.0.1. :func:`loopback_first` sets it before memshare imports
ray, unless the user set it (``--ray ADDRESS`` joins a cluster as that cluster runs).
"""

from __future__ import annotations

import os

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": every Ray service on 127.0.0.1


def loopback_first() -> None:
    """Ask Ray for loopback-only local instances (a value the user set is kept)."""
    os.environ.setdefault(LOOPBACK_ENV, "0")
