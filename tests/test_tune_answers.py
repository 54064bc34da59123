"""``memshare tune --target answers=A`` end to end on the real model: a trace of answers
generated from GSM8K prompts that share solved examples (the passage workload of
benchmarks/passage_workload.py, small), ``kvshare``'s recompute share and ``cf-topk``'s one
tau bisected on generated answers, both on one plot; what is refused is one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import assert_one_line_error, memshare, ok

from memshare.tune.knob import RECOMPUTE

pytestmark = pytest.mark.slow  # the real model, generation under several settings

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PROMPTS = 6
TARGET = 0.6


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 GSM8K questions, each behind 2 of a pool of 2 solved examples in a seeded order,
    48 new tokens each."""
    folder = tmp_path_factory.mktemp("tune-answers")
    problems = folder / "problems.jsonl"
    spec = importlib.util.spec_from_file_location("passage_workload", BENCH / "passage_workload.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    GSM8K, build = bench.GSM8K, bench.build
    if not GSM8K.is_file():
        pytest.skip(f"public data not found: {GSM8K}")
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:20]]
    args = argparse.Namespace(requests=PROMPTS, pool=2, shots=2, first=0, seed=0)
    problems.write_text("".join(json.dumps(r) + "\n" for r in build(rows, args)))
    out = folder / "trace"
    ok(
        memshare(
            "capture", "-o", str(out), "--dataset", str(problems), "--max-new-tokens", "48",
            "--threads", "1",
        )
    )  # fmt: skip
    return out


def _tune(trace: Path, out: Path, *extra: str) -> dict[str, Any]:
    r = memshare(
        "tune", str(trace), "--target", f"answers={TARGET}", "--budget", "2", "--threads", "1",
        "--max-num-seqs", "1", "-o", str(out), *extra,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    t: dict[str, Any] = json.loads((out / "tune.json").read_text())
    return t


def _replay(t: dict[str, Any], param: str, values: list[Any]) -> int:
    """Replays the bisection on the measured answers; the index of the last value met."""
    lo, hi = 0, len(values)
    assert 1 <= len(t["validated"]) <= 2
    for p in t["validated"]:
        mid = (lo + hi) // 2
        assert p["params"][param] == values[mid] and p["texts"] == t["texts"]["held_out"]
        a = p["answers"]
        assert a["measured_ci95"][0] <= a["measured"] <= a["measured_ci95"][1]
        assert a["token_agreement"]["requests"] == len(p["texts"])
        lo, hi = (mid, hi) if a["measured"] >= TARGET else (lo, mid)
    return lo


@pytest.fixture(scope="module")
def kvshare(trace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("kvshare") / "out"
    return out, _tune(trace, out, "--policy", "kvshare")


def test_kvshare_bisects_its_recompute_share_on_generated_answers(
    kvshare: tuple[Path, dict[str, Any]],
) -> None:
    _, t = kvshare
    assert t["calibration"] == [] and t["fidelity_model"] is None
    assert [c["params"]["recompute"] for c in t["frontier_predicted"]] == list(RECOMPUTE)
    lo = _replay(t, "recompute", list(RECOMPUTE))
    for p in t["validated"]:
        cache = p["prompt_cache"]
        # one request at a time: later prompts find the examples an earlier one computed
        assert cache["kv_hit_rate"] > cache["prefix_hit_rate"]
        reused = cache["reused_share"] - cache["prefix_hit_rate"]
        matched = cache["kv_hit_rate"] - cache["prefix_hit_rate"]
        assert reused == pytest.approx(matched * (1 - p["params"]["recompute"]), abs=0.02)
        # copies are not shares: kvshare saves no more memory than its prefix hits
        assert p["kv_saved"]["measured"] == pytest.approx(p["kv_saved"]["predicted"], abs=0.02)
    if t["best"] is not None:
        assert t["best"]["params"]["recompute"] == RECOMPUTE[lo]
        assert t["command"].endswith("--max-num-seqs 1")


def test_cf_topk_bisects_one_tau_on_answers_and_compares(
    trace: Path, kvshare: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    ks_out, ks = kvshare
    out = tmp_path / "cf"
    t = _tune(trace, out, "--set", "window=1", "--compare", str(ks_out))
    taus = [c["params"]["tau"] for c in t["frontier_predicted"]]
    assert taus[0] == 0.0 and taus == sorted(taus)
    saved = [c["kv_saved"] for c in t["frontier_predicted"]]
    assert saved[0] == 0 and saved[-1] > 0  # generated blocks share at the loosest tau
    _replay(t, "tau", taus)
    assert t["texts"] == ks["texts"]
    assert (out / "frontier.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--policy", "kvshare", "--target", "top1=0.99"], "--policy kvshare"),
        (["--policy", "kvshare", "--target", "answers=0.9", "--set", "recompute=0.2"], "--set"),
        (["--target", "answers=0.9", "--set", "tau_layers=0-29:0.3"], "--set tau_layers"),
    ],
)
def test_what_answers_cannot_tune_is_one_line(
    extra: list[str], needle: str, trace: Path, tmp_path: Path
) -> None:
    r = memshare("tune", str(trace), *extra, "-o", str(tmp_path / "o"))
    assert_one_line_error(r, needle)
    assert not (tmp_path / "o").exists()


def test_answers_need_a_generated_trace(smol: Path, tmp_path: Path) -> None:
    r = memshare("tune", str(smol), "--target", "answers=0.9", "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "--target answers=")


def test_compare_refuses_a_tune_of_another_figure(
    trace: Path, kvshare: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    ks_out, _ = kvshare
    r = memshare(
        "tune", str(trace), "--target", "top1=0.9", "--compare", str(ks_out),
        "-o", str(tmp_path / "o"),
    )  # fmt: skip
    assert_one_line_error(r, "--compare")
