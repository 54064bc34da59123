"""The test command's skip rule (tests/conftest.py): under ``MEMSHARE_STRICT_SKIPS=1`` only a
skip whose reason names CUDA may skip; any other skip, of a test or of a whole module at
collection, fails the run. Without the variable skips stay skips.

Each case runs pytest in a subprocess on a small test folder holding a copy of the real
``tests/conftest.py``, so what is checked is the hook the suite itself runs under.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

TESTS = """
import pytest

def test_runs():
    pass

def test_missing_data():
    pytest.skip("public data not found: /nowhere")

@pytest.mark.skipif(True, reason="glibc's mallopt only")
def test_marked():
    pass

def test_no_cuda():
    pytest.skip("no CUDA device")

@pytest.mark.xfail(reason="a known defect", strict=True)
def test_known():
    assert False
"""
MODULE_SKIP = (
    'import pytest\n\npytest.importorskip("no_such_module_h1")\n\ndef test_x():\n    pass\n'
)
CUDA_MODULE = 'import pytest\n\npytest.skip("needs CUDA", allow_module_level=True)\n'


def _run(pytester: pytest.Pytester, strict: bool, **files: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(**files)
    env = "1" if strict else ""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMSHARE_STRICT_SKIPS", env)
        return pytester.runpytest_subprocess("-rfEs", "-p", "no:cacheprovider")


def test_a_non_cuda_skip_fails_under_the_variable(pytester: pytest.Pytester) -> None:
    res = _run(pytester, True, test_cases=TESTS)
    res.assert_outcomes(passed=1, failed=1, errors=1, skipped=1, xfailed=1)
    out = res.stdout.str()
    assert "FAILED test_cases.py::test_missing_data" in out
    assert "ERROR test_cases.py::test_marked" in out  # a skipif fires at setup
    assert "public data not found: /nowhere" in out and "glibc's mallopt only" in out
    assert "SKIPPED [1] test_cases.py" in out and "no CUDA device" in out  # -rs: the reason
    assert res.ret == pytest.ExitCode.TESTS_FAILED


def test_a_module_skip_at_collection_fails_under_the_variable(pytester: pytest.Pytester) -> None:
    res = _run(pytester, True, test_mod=MODULE_SKIP, test_cuda_mod=CUDA_MODULE)
    res.assert_outcomes(errors=1, skipped=1)
    out = res.stdout.str()
    assert "ERROR collecting test_mod.py" in out and "no_such_module_h1" in out
    assert "needs CUDA" in out
    assert res.ret == pytest.ExitCode.INTERRUPTED  # a collection error stops the run


def test_without_the_variable_skips_stay_skips(pytester: pytest.Pytester) -> None:
    res = _run(pytester, False, test_cases=TESTS, test_mod=MODULE_SKIP, test_cuda_mod=CUDA_MODULE)
    res.assert_outcomes(passed=1, skipped=5, xfailed=1)
    assert res.ret == pytest.ExitCode.OK


def test_the_test_command_runs_both_pytest_parts_strict() -> None:
    """``scripts/test.sh`` (what CI runs) exports the variable before either pytest part (the
    main suite and the vLLM one in ``.venv-vllm``) and prints every skip's reason."""
    lines = (CONFTEST.parents[1] / "scripts" / "test.sh").read_text().splitlines()
    runs = [
        i
        for i, line in enumerate(lines)
        if line.startswith((".venv/bin/pytest", ".venv-vllm/bin/pytest"))
    ]
    assert len(runs) == 2, runs
    strict = lines.index("export MEMSHARE_STRICT_SKIPS=1")
    assert all(strict < i and " -rfEs " in lines[i] for i in runs)
