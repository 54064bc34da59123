"""Cost-model fit: recovers known coefficients, holds out, keeps priors, writes loadable TOML."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from memshare.errors import InputError
from memshare.sim.config import CostCoefficients, GpuSpec, load_cost, load_gpu, load_model
from memshare.sim.cost_model import BatchShape, CostModel
from memshare.validate.cost_fit import (
    CostFit,
    Step,
    fit_cost_model,
    split_steps,
    step_error,
    write_cost_fit,
)

MODEL = load_model("smollm2-135m")
NAMES = [f.name for f in fields(CostCoefficients)]
# far from the defaults (0.6, 0.4, 0.8, 3e-3, 2e-5); overheads sized so each term matters
TRUTH = {
    "cpu": CostCoefficients(0.3, 0.15, 0.5, 0.02, 2e-3),
    "h100": CostCoefficients(0.3, 0.15, 0.5, 1e-3, 8e-5),
}


def decode(batch: int, ctx: int) -> BatchShape:
    b = BatchShape()
    for i in range(batch):
        b.add(1, ctx + 7 * i, True, True)
    return b


def shapes(decode_only: bool = False, max_batch: int = 256) -> list[BatchShape]:
    """Pure decode with growing context, prefill chunks of many sizes, mixed batches."""
    out = [
        decode(bs, ctx)
        for bs in (1, 2, 4, 8, 16, 32, 64, 128, 256)
        if bs <= max_batch
        for ctx in (16, 128, 512, 2048, 8192)
    ]
    if decode_only:
        return out
    for n in (2, 8, 32, 128, 512, 1024, 2048, 4096):
        for c in (0, 256, 4096):
            b = BatchShape()
            b.add(n, c, True, False)
            out.append(b)
            mixed = decode(3 + n % 7, 300 + c)
            mixed.add(n, c, False, False)
            mixed.add(n // 2 + 1, c // 2, True, False)
            out.append(mixed)
    return out


def measure(
    gpu: GpuSpec, coef: CostCoefficients, batch: list[BatchShape], noise: float = 0.0, seed: int = 0
) -> list[Step]:
    """Step times from the cost model itself, times seeded multiplicative noise."""
    cm, rng = CostModel(MODEL, gpu, coef), np.random.default_rng(seed)
    return [(b, cm.step_time(b) * (1.0 + noise * float(rng.standard_normal()))) for b in batch]


def rel_errors(fit: CostFit, truth: CostCoefficients) -> dict[str, float]:
    return {n: abs(getattr(fit.coefficients, n) / getattr(truth, n) - 1) for n in NAMES}


@pytest.mark.parametrize("gpu_name", ["cpu", "h100"])
def test_recovers_known_coefficients_exactly_generated(gpu_name: str) -> None:
    gpu, truth = load_gpu(gpu_name), TRUTH[gpu_name]
    train, test = split_steps(measure(gpu, truth, shapes()), every=4)
    fit = fit_cost_model(train, test, MODEL, gpu)
    assert fit.fitted == tuple(NAMES) and fit.not_fitted == () and fit.at_bound == ()
    errors = rel_errors(fit, truth)
    assert max(errors.values()) < 0.01, errors
    assert fit.converged and fit.train_steps == len(train)
    assert fit.before.mape_pct > 20 and fit.after.mape_pct < 1e-6  # the fit's model is CostModel
    assert fit.before.steps == fit.after.steps == len(test)


@pytest.mark.parametrize("gpu_name", ["cpu", "h100"])
def test_noisy_steps_fit_within_ten_percent_and_beat_the_prior_on_held_out(gpu_name: str) -> None:
    gpu, truth = load_gpu(gpu_name), TRUTH[gpu_name]
    batch = shapes()
    train = measure(gpu, truth, batch * 8, noise=0.05, seed=1)  # 8 measurements per shape
    test = measure(gpu, truth, batch, noise=0.05, seed=2)  # measured apart, never fitted
    fit = fit_cost_model(train, test, MODEL, gpu)
    assert fit.after.mape_pct < fit.before.mape_pct / 5, (fit.before, fit.after)
    assert fit.after.median_ape_pct < fit.before.median_ape_pct
    assert fit.after.mape_pct < 6.0  # about the noise: E|N(0, 5%)| = 4%
    errors = rel_errors(fit, truth)
    assert max(errors.values()) < 0.10, errors


def test_decode_only_data_keeps_the_prior_for_what_it_cannot_see() -> None:
    gpu = load_gpu("h100")  # decode attention is bandwidth-bound here; small batches too
    truth, prior = TRUTH["h100"], CostCoefficients(0.55, 0.35, 0.7, 2e-3, 3e-5)
    train, test = split_steps(measure(gpu, truth, shapes(decode_only=True, max_batch=32)))
    fit = fit_cost_model(train, test, MODEL, gpu, prior=prior)
    assert fit.not_fitted == ("gemm_efficiency", "attn_efficiency")
    assert fit.fitted == ("bandwidth_efficiency", "step_overhead_s", "seq_overhead_s")
    assert fit.coefficients.gemm_efficiency == prior.gemm_efficiency
    assert fit.coefficients.attn_efficiency == prior.attn_efficiency
    for n in fit.fitted:
        assert math.isclose(getattr(fit.coefficients, n), getattr(truth, n), rel_tol=0.01), n
    assert fit.after.mape_pct < 1e-6  # the unseen terms are in the memory-bound regime


def test_one_sequence_per_step_cannot_split_the_two_overheads() -> None:
    gpu, truth = load_gpu("h100"), TRUTH["h100"]
    train, test = split_steps(measure(gpu, truth, [decode(1, c) for c in range(16, 8192, 97)]))
    fit = fit_cost_model(train, test, MODEL, gpu)
    assert "seq_overhead_s" in fit.not_fitted and "step_overhead_s" in fit.fitted
    assert fit.coefficients.seq_overhead_s == CostCoefficients().seq_overhead_s
    per_step = fit.coefficients.step_overhead_s + fit.coefficients.seq_overhead_s
    assert math.isclose(per_step, truth.step_overhead_s + truth.seq_overhead_s, rel_tol=1e-6)
    assert fit.after.mape_pct < 1e-6


def test_efficiencies_above_one_are_clipped_to_the_loaders_bound() -> None:
    gpu = load_gpu("cpu")
    fast = [
        (b, s / 3) for b, s in measure(gpu, CostCoefficients(0.9, 0.9, 0.9, 0.0, 0.0), shapes())
    ]
    train, test = split_steps(fast)
    fit = fit_cost_model(train, test, MODEL, gpu)
    assert {"gemm_efficiency", "attn_efficiency", "bandwidth_efficiency"} <= set(fit.at_bound)
    for n in NAMES[:3]:
        assert getattr(fit.coefficients, n) == 1.0
    assert fit.coefficients.step_overhead_s >= 0 and fit.coefficients.seq_overhead_s >= 0


def test_written_toml_round_trips_through_simulates_loader(tmp_path: Path) -> None:
    gpu = load_gpu("h100")
    train, test = split_steps(measure(gpu, TRUTH["h100"], shapes(), noise=0.05))
    fit = fit_cost_model(train, test, MODEL, gpu)
    path = tmp_path / "out" / "cost.toml"
    write_cost_fit(fit, path, source="steps.jsonl\nH100, 4 requests held out")
    assert load_cost(str(path)) == fit.coefficients
    text = path.read_text(encoding="utf-8")
    assert "[coefficients]" in text and "# source: steps.jsonl" in text
    assert "# fitted: gemm_efficiency" in text and "docs/cost-fit.md" in text
    assert [p.name for p in path.parent.iterdir()] == ["cost.toml"]  # no temp file left
    write_cost_fit(fit, path)  # replaces
    assert load_cost(str(path)) == fit.coefficients


def test_module_loads_neither_simpy_nor_torch() -> None:
    code = "import sys, memshare.validate.cost_fit; assert not {'simpy', 'torch'} & {*sys.modules}"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("train", "test", "where"),
    [
        ([], None, "train"),
        (None, [], "test"),
        ("zero", None, "train[1] seconds"),
        ("negative", None, "train[1] seconds"),
        ("nan", None, "train[1] seconds"),
        (None, "inf", "test[1] seconds"),
    ],
)
def test_bad_steps_raise_input_error(train: object, test: object, where: str) -> None:
    gpu = load_gpu("cpu")
    good = measure(gpu, CostCoefficients(), shapes()[:3])
    bad = {"zero": 0.0, "negative": -1e-3, "nan": math.nan, "inf": math.inf}

    def steps(kind: object) -> list[Step]:
        if kind is None:
            return good
        if isinstance(kind, list):
            return kind
        return [good[0], (good[1][0], bad[str(kind)]), good[2]]

    with pytest.raises(InputError) as e:
        fit_cost_model(steps(train), steps(test), MODEL, gpu)
    assert e.value.where == where and e.value.fix
    with pytest.raises(InputError):
        step_error([], MODEL, gpu, CostCoefficients())
    with pytest.raises(InputError):
        split_steps(good, every=1)


def test_split_holds_out_every_kth_step() -> None:
    steps = measure(load_gpu("cpu"), CostCoefficients(), shapes()[:10])
    train, test = split_steps(steps, every=5)
    assert test == [steps[4], steps[9]] and len(train) == 8
