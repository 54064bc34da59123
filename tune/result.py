"""What ``tune`` is asked and what it finds (shared by the loop and its report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memshare.sim.config import SimConfig
from memshare.sim.fidelity_model import FidelityModel
from memshare.tune.points import PointResult
from memshare.tune.search import Candidate
from memshare.tune.target import Target
from memshare.validate.jobs import ModelSpec


@dataclass
class TuneOptions:
    """What ``tune`` was asked (checked by :func:`tune`)."""

    config: SimConfig  # the trace, the policy and its fixed parameters
    target: Target
    budget: int  # validate runs of frontier points, at most
    holdout: list[str] | None
    limit: int | None  # texts of the trace used (its first N)
    spec: ModelSpec
    gpu: str = "cpu"
    compare: list[Path] = field(default_factory=list)  # earlier tunes drawn on frontier.png


@dataclass
class TuneResult:
    """What ``tune`` found."""

    calibration: list[PointResult]
    validated: list[tuple[Candidate, PointResult]]
    single_tau: list[Candidate]
    frontier: list[Candidate]
    best: tuple[Candidate, PointResult] | None
    model: FidelityModel | None  # the last fit (None: a one-knob policy's search)
    texts: dict[str, list[str]] = field(default_factory=dict)
    compared: list[dict[str, Any]] = field(default_factory=list)  # --compare's tune.json
