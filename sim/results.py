"""The results of a ``simulate`` call: labelled runs, a comparison's and a sweep's result.

:mod:`~memshare.sim.study` makes them; :mod:`~memshare.sim.plots` and
:mod:`~memshare.sim.report` draw them (so neither imports the other's maker).

Invariant: a result lists its runs in ``--policy`` order (per swept value for a sweep).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memshare.sim.options import SweepSpec
from memshare.sim.run import RunOutput


@dataclass
class LabeledRun:
    """One run of a study with where it was written."""

    label: str  # the policy name (a sweep adds nothing: the point is in SweepResult)
    out: RunOutput  # config, metrics, engine result
    directory: Path  # its run directory


@dataclass
class StudyResult:
    """The runs of one ``simulate`` call and the files written."""

    runs: list[LabeledRun]  # in --policy order
    output: Path  # OUT
    plots: list[Path] = field(default_factory=list)  # PNGs written (--plot)


@dataclass
class SweepResult:
    """A sweep: per value, the runs of every policy."""

    spec: SweepSpec  # key and values
    points: list[tuple[Any, list[LabeledRun]]]  # (value, runs in --policy order)
    output: Path  # OUT
    plots: list[Path] = field(default_factory=list)  # PNGs written (--plot)
