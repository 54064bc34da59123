"""``memshare validate`` on a trace captured from a dataset: answers generated under each
policy, and throughput at a KV budget where ``none`` must queue or preempt.

One real pipeline through the CLI, on the real default model and real GSM8K rows: capture
(``--dataset``, 3 prompts, 48 new tokens) -> simulate under `none`, `prefix`, `exact-dedup`
and `cf-topk` (loose tau 2.0, layer/k, window 1) -> validate. No mocks. Each reported figure
that can be recomputed from the written ``outputs.jsonl`` files is recomputed here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import memshare, ok

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # capture/simulate/validate pipelines on the real model

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "problems" / "gsm8k_test.jsonl"
PROMPTS = 3
NEW_TOKENS = 48
LOSSLESS = ("none", "prefix", "exact-dedup")


@pytest.fixture(scope="module")
def runs(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not GSM8K.is_file():
        pytest.skip(f"public data not found: {GSM8K}")
    folder = tmp_path_factory.mktemp("validate-gen")
    trace = folder / "trace"
    ok(
        memshare(
            "capture", "-o", str(trace), "--dataset", str(GSM8K),
            "--limit", str(PROMPTS), "--max-new-tokens", str(NEW_TOKENS),
        )
    )  # fmt: skip
    out = folder / "runs"
    ok(
        memshare(
            "simulate", str(trace), "--model-config", "smollm2-135m",
            "--policy", "none", "--policy", "prefix", "--policy", "exact-dedup",
            "--policy", "cf-topk", "-o", str(out),
            "--set", "cf-topk.granularity=layer", "--set", "cf-topk.share=k",
            "--set", "cf-topk.tau=2.0", "--set", "cf-topk.window=1",
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def validated(runs: Path) -> dict[str, Any]:
    ok(memshare("validate", str(runs), "--kv-fraction", "0.5"))
    rep: dict[str, Any] = json.loads((runs / "validation.json").read_text())
    return rep


def outputs(runs: Path, name: str, sub: str = "") -> dict[str, dict[str, Any]]:
    path = runs / name / "engine" / sub / "outputs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["request"]: row for row in rows}


def test_lossless_policies_answer_as_none_and_take_the_simulators_steps_at_the_budget(
    validated: dict[str, Any],
) -> None:
    pol = validated["policies"]
    assert set(pol) == {"none", "prefix", "exact-dedup", "cf-topk"}
    for name in LOSSLESS:
        p = pol[name]
        assert p["answer_agreement"] == 1.0, name
        tok = p["token_agreement"]
        assert tok["mean_fraction"] == 1.0 and tok["requests_diverged"] == 0, (name, tok)
        assert tok["first_divergence_mean"] is None and tok["requests"] == PROMPTS
        assert p["accuracy"]["shared"] == p["accuracy"]["base"], name
        b = p["at_budget"]
        assert b["steps_identical"], (name, b["first_differing_step"])
        assert b["steps"]["predicted"] == b["steps"]["measured"] > 0
        for key in ("preemptions", "max_batch", "pages_peak", "pages_shared"):
            assert b[key]["predicted"] == b[key]["measured"], (name, key)
        assert b["output_tokens"] == PROMPTS * NEW_TOKENS  # the trace's outputs, forced
        # the teacher-forced run is still checked as before
        assert p["steps_identical"], name


def test_the_budget_makes_none_queue_or_preempt(validated: dict[str, Any]) -> None:
    budget = validated["budget"]
    assert budget["kv_fraction"] == 0.5
    assert budget["kv_blocks"] == math.ceil(0.5 * budget["all_at_once_blocks"])
    b = validated["policies"]["none"]["at_budget"]
    assert b["preemptions"]["measured"] > 0 or b["max_batch"]["measured"] < PROMPTS, b


def test_generation_at_budget_figures_are_present_and_positive(
    validated: dict[str, Any],
) -> None:
    for name, p in validated["policies"].items():
        for key in ("throughput_tok_s", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s"):
            fig = p[key]
            assert fig["predicted"] > 0 and fig["measured"] > 0, (name, key, fig)
            want = 100 * (fig["predicted"] - fig["measured"]) / fig["measured"]
            assert fig["error_pct"] == pytest.approx(want), (name, key)
        assert p["ttft_p90_s"]["measured"] >= p["ttft_p50_s"]["measured"]
        gain = p["throughput_gain"]
        assert gain["predicted"] > 0 and gain["measured"] > 0, name
        none = validated["policies"]["none"]["throughput_tok_s"]
        assert gain["measured"] == pytest.approx(
            p["throughput_tok_s"]["measured"] / none["measured"]
        )
        assert gain["predicted"] == pytest.approx(
            p["throughput_tok_s"]["predicted"] / none["predicted"]
        )
        # the teacher-forced run's time keeps its own keys
        tf = p["teacher_forced_time"]
        assert tf["prefill_tok_s"]["measured"] > 0 and tf["ttft_p50_s"]["predicted"] > 0
    assert validated["policies"]["none"]["throughput_gain"] == {"predicted": 1.0, "measured": 1.0}


def test_answers_and_agreement_recomputed_from_the_outputs(
    runs: Path, validated: dict[str, Any]
) -> None:
    from memshare.validate.answers import answers_equal

    assert validated["generated"]["max_new_tokens"] == NEW_TOKENS
    base = outputs(runs, "none")
    assert len(base) == PROMPTS
    first = base["gsm8k_test-00000"]  # Janet's ducks: gold 18
    assert first["gold_answer"] == "18"
    for name, p in validated["policies"].items():
        acc = p["accuracy"]
        assert 0.0 <= acc["base"] <= 1.0 and 0.0 <= acc["shared"] <= 1.0, name
        rows = outputs(runs, name)
        assert set(rows) == set(base)
        agree, correct, fractions = [], [], []
        for rid, row in rows.items():
            assert {"answer", "first_share_position", "gold_answer", "correct"} <= set(row)
            assert 1 <= len(row["output_token_ids"]) <= NEW_TOKENS
            a, b = row["answer"], base[rid]["answer"]
            agree.append(a == b or answers_equal(a, b, "gsm8k"))
            correct.append(answers_equal(a, row["gold_answer"], "gsm8k"))
            assert row["correct"] == correct[-1]
            mine, theirs = row["output_token_ids"], base[rid]["output_token_ids"]
            d = next(
                (i for i, (x, y) in enumerate(zip(mine, theirs, strict=False)) if x != y), None
            )
            if d is None and len(mine) != len(theirs):
                d = min(len(mine), len(theirs))
            assert row["first_divergence"] == d
            fractions.append(1.0 if d is None else d / max(len(mine), len(theirs)))
        assert p["answer_agreement"] == pytest.approx(sum(agree) / len(agree)), name
        assert acc["shared"] == pytest.approx(sum(correct) / len(correct)), name
        lo, hi = p["answer_agreement_ci95"]  # exact binomial over the problems
        assert lo <= p["answer_agreement"] <= hi and hi - lo > 0.05  # a few problems: wide
        lo, hi = p["accuracy_ci95"]["shared"]
        assert lo <= acc["shared"] <= hi
        assert p["token_agreement"]["mean_fraction"] == pytest.approx(
            sum(fractions) / len(fractions)
        )
        # the teacher-forced run's files are kept beside the generated run's
        tf = outputs(runs, name, "teacher_forced")
        assert all(row["answer"] is None for row in tf.values())
        assert (runs / name / "engine" / "shares.jsonl").is_file()
    for name in ("none", "prefix"):  # no share is ever applied: no first-share position
        assert all(r["first_share_position"] is None for r in outputs(runs, name).values())
    cf = validated["policies"]["cf-topk"]
    shared_rows = outputs(runs, "cf-topk")
    shares = [
        json.loads(x) for x in (runs / "cf-topk/engine/shares.jsonl").read_text().splitlines()
    ]
    shared_reqs = {s["request"] for s in shares}
    positioned = {
        rid for rid, row in shared_rows.items() if row["first_share_position"] is not None
    }
    assert positioned <= shared_reqs  # a position only where a share was applied
    assert cf["token_agreement"]["requests"] == PROMPTS


def test_bad_kv_fraction_is_one_line(runs: Path) -> None:
    for bad in ("0", "1.5", "nan"):
        res = memshare("validate", str(runs), "--kv-fraction", bad)
        assert res.returncode == 2, (bad, res.stderr)
        assert res.stderr.count("\n") == 1 and "--kv-fraction" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
