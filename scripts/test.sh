#!/usr/bin/env bash
# Set up (a .venv beside the checkout) and run every check: ruff, mypy --strict, pytest.
# Needs Python 3.11+ and the package registry; ../shared/data beside the checkout for the
# tests that read the public data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict (on the installed layout: memshare.sim etc. are mapped folders)"
rm -rf .typecheck
.venv/bin/python -m pip install -q --no-deps --no-build-isolation --target .typecheck .
(cd .typecheck && MYPYPATH=. ../.venv/bin/mypy --strict -p memshare && MYPYPATH=. ../.venv/bin/mypy --strict ../tests)
echo "== pytest"
.venv/bin/pytest "$@"
