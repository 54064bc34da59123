"""A policy parameter swept (``memshare sweep tau=...``) and the whole sweep validated.

Real default model, real R1 text, through the CLI: a tight and a loose ``tau`` of ``cf-topk``
(per layer, keys only). A fidelity figure must move when it must: the loose run saves more KV
and agrees less with the unshared run (lower top-1, higher KL). Also the frontier plot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import memshare

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # capture/simulate/validate pipelines on the real model

R1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "reasoning"


@pytest.fixture(scope="module")
def swept(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = R1 / "deepseek_r1_aime24_math500.jsonl"
    if not path.is_file():
        pytest.skip(f"public data not found: {path}")
    folder = tmp_path_factory.mktemp("vsweep")
    trace = folder / "trace"
    res = memshare("capture", "-o", str(trace), "--texts", str(path), "--field", "reasoning",
                   "--limit", "2", "--max-tokens", "224")  # fmt: skip
    assert res.returncode == 0, res.stderr
    runs = folder / "runs"
    res = memshare("sweep", str(trace), "tau=0.1,2.0", "--policy", "cf-topk",
                   "--set", "granularity=layer", "--set", "share=k", "--set", "window=1",
                   "--model-config", "smollm2-135m", "-o", str(runs))  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = memshare("validate", str(runs), "--plot", "--json")
    assert res.returncode == 0, res.stderr
    return runs, json.loads(res.stdout)


def test_sweep_of_a_policy_parameter_writes_one_run_per_value(swept: tuple[Path, Any]) -> None:
    runs, _ = swept
    for tau in ("0.1", "2.0"):
        cfg = json.loads((runs / f"tau={tau}" / "cf-topk" / "config.json").read_text())
        assert cfg["config"]["policy_params"]["tau"] == float(tau)
        assert cfg["config"]["policy_params"]["granularity"] == "layer"


def test_a_looser_tau_saves_more_and_agrees_less(swept: tuple[Path, Any]) -> None:
    runs, rep = swept
    pol = rep["policies"]
    assert set(pol) == {"tau=0.1/cf-topk", "tau=2.0/cf-topk"}
    tight, loose = pol["tau=0.1/cf-topk"], pol["tau=2.0/cf-topk"]
    assert loose["kv_saved"]["measured"] > tight["kv_saved"]["measured"]
    assert loose["kv_saved"]["predicted"] > tight["kv_saved"]["predicted"]
    assert loose["top1_agreement"] < tight["top1_agreement"]
    assert loose["kl_mean"] > tight["kl_mean"]
    assert loose["ppl"]["shared"] > tight["ppl"]["shared"]
    for p in (tight, loose):  # the first decision is the simulator's: same first share step
        assert p["first_differing_step"] is None or p["first_differing_step"] > 0
    assert (runs / "frontier.png").stat().st_size > 10_000
    assert (runs / "kv_in_use.png").is_file()


def test_sweeping_a_parameter_no_policy_has_is_one_line(swept: tuple[Path, Any]) -> None:
    runs, _ = swept
    trace = runs.parent / "trace"
    res = memshare("sweep", str(trace), "colour=1,2", "--policy", "cf-topk", "-o",
                   str(runs.parent / "bad"))  # fmt: skip
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "KEY=A,B,C colour=1,2" in res.stderr and "unknown sweep key" in res.stderr


def test_one_pass_measures_what_each_run_measures_alone(swept: tuple[Path, Any]) -> None:
    """``--one-pass``: the sweep's engines share each step's forward pass (one arena); each
    still decides alone, so pages and shares are the same, and fidelity up to rounding."""
    runs, rep = swept
    res = memshare("validate", str(runs), "--fidelity-only", "--one-pass", "--json")
    assert res.returncode == 0, res.stderr
    one = json.loads(res.stdout)
    assert one["policies"].keys() == rep["policies"].keys()
    for label, alone in rep["policies"].items():
        together = one["policies"][label]
        for key in ("steps", "pages_peak", "pages_mean", "pages_shared", "first_differing_step"):
            assert together[key] == alone[key], (label, key)
        assert together["top1_agreement"] == pytest.approx(alone["top1_agreement"], abs=0.005)
        assert together["kl_mean"] == pytest.approx(alone["kl_mean"], rel=0.05, abs=1e-6)
        timed, untimed = alone["teacher_forced_time"], together["teacher_forced_time"]
        assert timed["prefill_tok_s"]["measured"] > 0 and not timed["one_pass"]
        assert untimed["prefill_tok_s"]["measured"] is None and untimed["one_pass"]
    res = memshare("validate", str(runs), "--fidelity-only", "--one-pass", "--fit-cost-model")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "--fit-cost-model" in res.stderr
