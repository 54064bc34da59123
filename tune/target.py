"""``tune --target``: which fidelity figure must reach what, and the texts split.

Invariants: a target is ``top1=A`` (measured top-1 agreement >= A, 0 < A <= 1) or ``kl=K``
(measured mean KL <= K nats, K >= 0); anything else is one InputError naming ``--target``.
The split is deterministic: held-out texts are the ones named, else every second text of
the trace order (the others calibrate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memshare.errors import InputError


@dataclass(frozen=True)
class Target:
    """The fidelity a setting must keep."""

    metric: str  # "top1" or "kl"
    value: float

    @staticmethod
    def parse(text: str) -> Target:
        """``top1=0.99`` or ``kl=0.05``."""
        key, _, raw = text.partition("=")
        key = key.strip().lower()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if key == "answers":
            raise InputError(
                "--target",
                "answers=... needs generated answers, which tune does not run yet",
                "use top1=0.99 or kl=0.05 (validate measures answers of a setting)",
            )
        ok = (key == "top1" and 0 < value <= 1) or (key == "kl" and 0 <= value < math.inf)
        if not ok:
            raise InputError(
                "--target",
                f"{text!r} is not top1=A (0 < A <= 1) or kl=K (K >= 0)",
                "e.g. top1=0.99",
            )
        return Target(key, value)

    def met(self, top1: float | None, kl: float | None) -> bool:
        """Whether the figures meet the target."""
        if self.metric == "top1":
            return top1 is not None and top1 >= self.value
        return kl is not None and kl <= self.value

    def predicted_met(self, c: Any) -> bool:
        """Whether a candidate's prediction meets it (``c.top1``, ``c.kl_mean``)."""
        return self.met(c.top1, c.kl_mean)

    def text(self) -> str:
        """As typed."""
        return f"{self.metric}={self.value:g}"


def split(ids: Sequence[str], holdout: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``(calibration, held out)`` texts (module docstring); InputError for an unknown id or
    a split that leaves either side empty."""
    if holdout:
        unknown = [h for h in holdout if h not in ids]
        if unknown:
            raise InputError("--holdout", f"no request {unknown[0]!r} in the trace", "name its ids")
        held = [i for i in ids if i in set(holdout)]
    else:
        held = list(ids[1::2])
    cal = [i for i in ids if i not in set(held)]
    if not cal or not held:
        raise InputError(
            "--holdout" if holdout else "--limit",
            f"{len(ids)} texts leave {len(cal)} to calibrate and {len(held)} held out",
            "use at least 2 texts, and hold out some but not all",
        )
    return cal, held
