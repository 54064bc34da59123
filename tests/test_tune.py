"""``memshare tune`` end to end on the real model: a small kv trace captured from R1 texts,
calibration, the simulator's search, validation on held-out texts, and the files it writes;
``kill -9`` mid-run and ``--resume`` give the same ``tune.json``; bad options are one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import assert_one_line_error, memshare, ok

from memshare.sim.fidelity_model import fit
from memshare.sim.fit_positions import load_positions

pytestmark = pytest.mark.slow  # the real model, several teacher-forced runs

R1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "reasoning"
R1 = R1 / "deepseek_r1_aime24_math500.jsonl"


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 short R1 texts (their first 1,000 characters), captured with sketches."""
    folder = tmp_path_factory.mktemp("tune")
    rows = [json.loads(line) for line in R1.read_text().splitlines()[:4]]
    texts = folder / "texts.jsonl"
    texts.write_text("".join(json.dumps({"reasoning": r["reasoning"][:1000]}) + "\n" for r in rows))
    out = folder / "trace"
    ok(memshare("capture", "-o", str(out), "--texts", str(texts), "--field", "reasoning"))
    return out


@pytest.fixture(scope="module")
def layer_map(trace: Path) -> Path:
    """A KVSharer layer map calibrated on the calibration texts (0 and 2)."""
    rows = [json.loads(line) for line in R1.read_text().splitlines()[:4]]
    texts = trace.parent / "cal_texts.jsonl"
    texts.write_text("".join(json.dumps({"r": rows[i]["reasoning"][:1000]}) + "\n" for i in (0, 2)))
    out = trace.parent / "map.json"
    ok(
        memshare(
            "calibrate", "-o", str(out), "--texts", str(texts), "--field", "r", "--limit", "2",
            "--max-tokens", "128", "--target", "0.5", "--threads", "1",
        )
    )  # fmt: skip
    return out


def _args(trace: Path, out: Path) -> list[str]:
    return [
        "tune", str(trace), "--target", "top1=0.95", "--budget", "2", "--threads", "1",
        "--set", "window=1", "-o", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tuned(trace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("tuned") / "out"
    r = memshare(*_args(trace, out))
    assert r.returncode == 0, r.stderr
    return out, json.loads((out / "tune.json").read_text())


def test_tune_writes_every_point_with_predictions_and_intervals(
    tuned: tuple[Path, dict[str, Any]],
) -> None:
    out, t = tuned
    assert (out / "frontier.png").stat().st_size > 10_000
    assert (out / "fidelity_model.json").is_file()
    cal, held = ["texts-00000", "texts-00002"], ["texts-00001", "texts-00003"]
    assert t["texts"] == {"calibration": cal, "held_out": held}
    cal_params = [p["params"] for p in t["calibration"]]
    assert [p["tau"] for p in cal_params[:2]] == [0.4, 0.5]  # every layer
    tables = [p.get("tau_layers") for p in cal_params]
    assert tables[2:] == ["*:off,0-9:0.7", "*:off,10-19:0.7", "*:off,20-29:0.7"]
    assert 1 <= len(t["validated"]) <= 2
    for p in t["calibration"] + t["validated"]:
        rate = p["page_share_rate"]
        assert rate["ci95_texts"] is None or rate["ci95_texts"][0] <= rate["measured"]
        lo, hi = p["top1"]["measured_ci95"]
        assert lo <= p["top1"]["measured"] <= hi
        assert p["kv_saved"]["predicted"] == pytest.approx(p["kv_saved"]["measured"], abs=0.01)
    for p in t["validated"]:  # predicted by the model fitted before it was measured
        assert p["top1"]["predicted"] is not None and p["texts"] == held
        assert "tau_layers" in p["params"] or "tau" in p["params"]
    front = [c["kv_saved"] for c in t["frontier_predicted"]]
    assert front == sorted(front) and len(front) >= 2
    if t["best"] is not None:
        assert t["best"]["top1"]["measured"] >= 0.95
        assert t["command"].startswith("memshare simulate ")


def test_the_fit_positions_refit_to_the_written_model(tuned: tuple[Path, dict[str, Any]]) -> None:
    out, t = tuned
    rows = load_positions(out / "fit_positions.npz")
    runs = len(t["calibration"]) + len(t["validated"])
    assert len(rows) == 2 * runs  # a run's positions per text, two texts each
    model = fit(rows, 30)
    assert model.to_json() == json.loads((out / "fidelity_model.json").read_text())


def test_the_winning_line_simulates(tuned: tuple[Path, dict[str, Any]], trace: Path) -> None:
    out, t = tuned
    params = (t["best"] or t["validated"][0])["params"]
    sets = [a for k, v in params.items() for a in ("--set", f"{k}={v}")]
    sim = out.parent / "sim"
    r = memshare(
        "simulate", str(trace), "--policy", "cf-topk", *sets, "--model-config", "smollm2-135m",
        "--fidelity-model", str(out / "fidelity_model.json"), "-o", str(sim),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "fidelity_predicted" in json.loads((sim / "metrics.json").read_text())


def test_kill_9_and_resume_give_the_same_tune_json(
    trace: Path, tuned: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    _, want = tuned
    out = tmp_path / "out"
    store = tmp_path / ".out.jobs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "memshare.cli", *_args(trace, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list(store.glob("*.pkl")):  # calibrated
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(store.glob("*.pkl")))
    assert kept >= 1 and not (out / "tune.json").exists()
    r = memshare(*_args(trace, out), "--resume")
    assert r.returncode == 0, r.stderr
    got = json.loads((out / "tune.json").read_text())
    assert got == want
    assert not store.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--target", "top1=2"], "--target"),
        (["--policy", "prefix"], "--policy"),
        (["--set", "granularity=block"], "granularity"),
        (["--holdout", "nope"], "--holdout"),
        (["--budget", "0"], "--budget"),
    ],
)
def test_bad_options_are_one_line(
    extra: list[str], needle: str, trace: Path, tmp_path: Path
) -> None:
    r = memshare("tune", str(trace), *extra, "-o", str(tmp_path / "o"))
    assert_one_line_error(r, needle)
    assert not (tmp_path / "o").exists()


def test_validate_fits_a_model_and_predicts_beside_the_measurement(
    trace: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    ok(
        memshare(
            "simulate", str(trace), "--model-config", "smollm2-135m", "--policy", "none",
            "--policy", "cf-topk", "--set", "cf-topk.granularity=layer", "--set", "cf-topk.share=k",
            "--set", "cf-topk.tau=0.8", "--set", "cf-topk.window=1", "-o", str(runs),
        )
    )  # fmt: skip
    model = tmp_path / "model.json"
    args = ["validate", str(runs), "--fidelity-only", "--threads", "1"]
    ok(memshare(*args, "--fit-fidelity-model", str(model)))
    fitted = json.loads(model.read_text())
    assert fitted["fitted_on"]["runs"] == ["cf-topk"] and fitted["fitted_on"]["texts"] == 4
    r = memshare(*args, "--fidelity-model", str(model))
    assert r.returncode == 0, r.stderr
    assert "top-1 predicted" in r.stdout
    rep = json.loads((runs / "validation.json").read_text())["policies"]
    cf = rep["cf-topk"]["fidelity_predicted"]
    top = cf["top1_agreement"]
    assert top["measured"] == rep["cf-topk"]["top1_agreement"] < 1.0
    assert abs(top["error_points"]) < 5.0  # predicted on the texts it was fitted on
    assert isinstance(top["inside_ci95"], bool)
    assert rep["none"]["fidelity_predicted"]["top1_agreement"]["predicted"] == 1.0
    lo, hi = rep["cf-topk"]["page_share_rate_ci95_texts"]  # over the 4 texts
    assert lo <= rep["cf-topk"]["page_share_rate"]["measured"] <= hi and lo < hi
    bad = memshare(*args, "--fidelity-model", str(tmp_path / "missing.json"))
    assert_one_line_error(bad, "--fidelity-model")


def test_kvsharer_bisects_its_layers_and_compares_on_one_plot(
    trace: Path, layer_map: Path, tuned: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    cf_out, cf = tuned
    out = tmp_path / "ksr"
    r = memshare(
        "tune", str(trace), "--policy", "kvsharer", "--set", f"layer_map_file={layer_map}",
        "--target", "top1=0.95", "--budget", "3", "--threads", "1",
        "--compare", str(cf_out), "-o", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    t = json.loads((out / "tune.json").read_text())
    assert t["calibration"] == [] and t["fidelity_model"] is None
    assert t["texts"] == cf["texts"]
    values = [c["params"]["layers"] for c in t["frontier_predicted"]]
    assert values == list(range(len(values))) and len(values) >= 4
    saved = [c["kv_saved"] for c in t["frontier_predicted"]]
    assert saved[0] == 0 and saved == sorted(saved) and saved[-1] > 0.1
    lo, hi = 0, len(values)  # replay the bisection on the measured outcomes
    assert 1 <= len(t["validated"]) <= 3
    for p in t["validated"]:
        mid = (lo + hi) // 2
        assert p["params"]["layers"] == values[mid] and p["texts"] == cf["texts"]["held_out"]
        assert p["kv_saved"]["measured"] == pytest.approx(saved[mid], abs=1e-9)
        met = p["top1"]["measured"] >= 0.95
        lo, hi = (mid, hi) if met else (lo, mid)
    if t["best"] is not None:
        assert t["best"]["params"]["layers"] == values[lo]
    assert (out / "frontier.png").stat().st_size > 10_000
    assert not (out / "fidelity_model.json").exists()


def test_compare_refuses_a_tune_of_other_texts(
    trace: Path, tuned: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    cf_out, _ = tuned
    r = memshare(
        "tune", str(trace), "--holdout", "texts-00000", "--compare", str(cf_out),
        "-o", str(tmp_path / "o"),
    )  # fmt: skip
    assert_one_line_error(r, "--compare")
    assert not (tmp_path / "o").exists()
