"""``memshare validate``'s options (:class:`ValidateOptions`) and what is checked before any
work: the options themselves, and every file validate will write in ``RUN``.

Invariant: a validation that cannot finish for a reason known in advance (a bad option, a
report or cost model it could not write) is refused before the model loads, so it writes no
engine output; and an earlier report is removed before the engines write theirs
(:func:`forget_earlier_validation`), so ``RUN`` never shows an older ``validation.json``
beside newer engine outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from memshare.errors import InputError
from memshare.limits import check_limit
from memshare.outdir import check_writable
from memshare.sim.config import load_gpu
from memshare.sim.fidelity_model import FidelityModel
from memshare.validate.budget import DEFAULT_KV_FRACTION, check_fraction
from memshare.validate.cost_fit import COST_TOML
from memshare.validate.runs.workload import DEFAULT_LENGTH_SCALE

VALIDATION = "validation.json"  # the report, written whole in RUN when every run was measured


@dataclass(frozen=True)
class ValidateOptions:
    """What ``memshare validate`` was asked."""

    run: Path  # a run directory, or a folder of them
    model: str | None = None  # local HF folder or .gguf (default: the packaged SmolLM2)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    limit: int | None = None  # first N requests of the trace
    gpu: str = "cpu"  # cost-model preset the predicted times use
    fit_cost_model: bool = False
    plot: bool = False  # RUN/kv_in_use.png
    kv_fraction: float = DEFAULT_KV_FRACTION  # throughput budget: F x all requests at once
    fidelity_only: bool = False  # only the teacher-forced part: no budget runs, no answers
    one_pass: bool = False  # teacher-forced part: all runs' steps in one forward pass
    length_scale: float = DEFAULT_LENGTH_SCALE  # workload-only traces: synthesized lengths
    block_size: int | None = None  # workload-only traces: the engine's (default 16)
    engine: str = "torch"  # torch (validate) or vllm (validate/vllm/validate.py: validate_vllm)
    replay_arrivals: bool = False  # vllm: requests arrive as the run's --arrival (else at 0 s)
    fidelity_model: Path | None = None  # predict each run's fidelity beside the measurement
    fit_fidelity_model: Path | None = None  # fit one on the measured positions, write it here


ENGINES = ("torch", "vllm")


def check_options(o: ValidateOptions) -> None:
    """The options that fail before any run is read (a torch-only clash only for torch)."""
    check_fraction(o.kv_fraction)
    check_limit(o.limit)
    load_gpu(o.gpu)  # the cost-model preset (or TOML) of the predicted times
    if o.engine not in ENGINES:
        raise InputError("--engine", f"must be one of {', '.join(ENGINES)}, got {o.engine!r}",
                         "e.g. --engine vllm")  # fmt: skip
    if o.replay_arrivals and o.engine != "vllm":
        raise InputError(
            "--replay-arrivals",
            "the torch engine runs every request at 0 s",
            "add --engine vllm, or leave out --replay-arrivals",
        )
    if o.engine == "vllm" and (o.fidelity_model or o.fit_fidelity_model):
        raise InputError(
            "--fidelity-model" if o.fidelity_model else "--fit-fidelity-model",
            "applies to the torch engine's teacher-forced runs",
            "leave it out with --engine vllm",
        )
    if o.fidelity_model is not None:
        FidelityModel.load(o.fidelity_model)  # a bad file fails before any work
    if o.fit_fidelity_model is not None:
        where = f"--fit-fidelity-model {o.fit_fidelity_model}"
        if o.fit_fidelity_model.is_dir():
            raise InputError(where, "is a folder", "give the model file's path, e.g. model.json")
        check_writable(o.fit_fidelity_model.absolute().parent, where, "--fit-fidelity-model")
    if o.engine != "vllm" and o.fit_cost_model and o.one_pass and o.fidelity_only:
        raise InputError(
            "--fit-cost-model",
            "needs timed steps: under --one-pass and --fidelity-only no run is timed on its own",
            "leave out --one-pass or --fidelity-only",
        )


def _outputs(o: ValidateOptions, num_runs: int) -> list[tuple[str, str]]:
    """The files validate writes in ``RUN`` (beside the engines' folders), each with the
    option that asks for it."""
    files = [(VALIDATION, "RUN")]
    if o.fit_cost_model:
        files.append((COST_TOML, "--fit-cost-model"))
    if o.plot:
        files += [("kv_in_use.png", "--plot")] + ([("frontier.png", "--plot")] * (num_runs > 1))
    return files


def check_outputs(o: ValidateOptions, num_runs: int) -> None:
    """Every file validate will write in ``RUN`` can be written: checked before the model
    loads, so no engine output is written by a validation that cannot finish."""
    for name, option in _outputs(o, num_runs):
        path = o.run / name
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            raise InputError(
                f"{option}: {path}", "is in the way: validate writes this file", "move it away"
            )
    check_writable(o.run, f"RUN {o.run}", "RUN")


def forget_earlier_validation(o: ValidateOptions) -> None:
    """Remove an earlier validation's report before the engines write their outputs, so that
    ``RUN`` never shows an older ``validation.json`` beside newer engine outputs (a validation
    that stops half way leaves no report, and reads as not validated)."""
    (o.run / VALIDATION).unlink(missing_ok=True)
