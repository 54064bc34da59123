"""``tune --target``: which fidelity figure must reach what, and the texts split.

Invariants: a target is ``top1=A`` (measured top-1 agreement >= A, 0 < A <= 1), ``kl=K``
(measured mean KL <= K nats, K >= 0) or ``answers=A`` (generated answers agreeing with the
unshared run's, a share >= A, 0 < A <= 1); anything else is one InputError naming ``--target``.
The split is deterministic: held-out texts are the ones named, else every second text of
the trace order (the others calibrate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from memshare.errors import InputError

_FIGURE = {"top1": "top1_agreement", "kl": "kl_mean", "answers": "answer_agreement"}


@dataclass(frozen=True)
class Target:
    """The fidelity a setting must keep."""

    metric: str  # "top1", "kl" or "answers"
    value: float

    @staticmethod
    def parse(text: str) -> Target:
        """``top1=0.99``, ``kl=0.05`` or ``answers=0.95``."""
        key, _, raw = text.partition("=")
        key = key.strip().lower()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        share = key in ("top1", "answers") and 0 < value <= 1
        if not (share or (key == "kl" and 0 <= value < math.inf)):
            raise InputError(
                "--target",
                f"{text!r} is not top1=A, answers=A (0 < A <= 1) or kl=K (K >= 0)",
                "e.g. top1=0.99",
            )
        return Target(key, value)

    @property
    def generated(self) -> bool:
        """Whether it is measured on generated answers (else on teacher-forced texts)."""
        return self.metric == "answers"

    def met(self, measured: Mapping[str, Any]) -> bool:
        """Whether measured (or predicted) figures meet the target: ``top1_agreement``,
        ``kl_mean`` or ``answer_agreement`` (a missing or None figure does not)."""
        got = measured.get(_FIGURE[self.metric])
        if got is None:
            return False
        return bool(got <= self.value if self.metric == "kl" else got >= self.value)

    def predicted_met(self, c: Any) -> bool:
        """Whether a candidate's prediction meets it (``c.top1``, ``c.kl_mean``)."""
        return self.met({"top1_agreement": c.top1, "kl_mean": c.kl_mean})

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
