"""The import rules (docs/layout.md) and the installed layout (everything under ``memshare``)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "vllm", "accelerate", "gguf"}
CORE_ALLOWED = {"numpy", "memshare"} | set(sys.stdlib_module_names)
# validate/ files that read or run the simulator: the demo pipeline runs both stages, the cost
# fit reads the cost model, and `memshare validate` reads a run directory and re-simulates its
# workload beside the engine. The paged engine itself (engine.py and what it imports) never.
VALIDATE_READS_SIM = {
    "pipeline.py",
    "cost_fit.py",
    "runs.py",
    "measure.py",
    "validation.py",
    "generated.py",
    "trace.py",  # a workload run's model config and the trace type
    "engine.py",  # vllm/engine.py  # the batch shape of vLLM's steps (the cost fit's input)
    "validate.py",  # the simulator's prediction beside vLLM's measurement
}


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Top-level module names imported by a file (module-level statements only if asked)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _py_files(folder: str) -> list[Path]:
    return [p for p in (ROOT / folder).rglob("*.py") if not p.is_symlink()]


@pytest.mark.parametrize("path", _py_files("memshare"), ids=lambda p: p.name)
def test_core_imports_only_numpy_and_stdlib(path: Path) -> None:
    bad = _imports(path, top_level_only=False) - CORE_ALLOWED
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def _memshare_subpackages(path: Path) -> set[str]:
    """``memshare.X`` modules a file imports (anywhere in it), as ``X``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        mods: list[str] = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        names |= {m.split(".")[1] for m in mods if m.startswith("memshare.")}
    return names


@pytest.mark.parametrize("path", _py_files("memshare"), ids=lambda p: p.name)
def test_core_imports_none_of_the_executors(path: Path) -> None:
    """The core (pool, manager, policies, scheduler) sits below sim/, traces/ and validate/."""
    bad = _memshare_subpackages(path) & {"sim", "traces", "validate", "cli"}
    assert not bad, f"{path.relative_to(ROOT)} imports memshare.{sorted(bad)}"


@pytest.mark.parametrize("path", _py_files("validate"), ids=lambda p: p.name)
def test_validate_imports_no_simpy(path: Path) -> None:
    """The paged engine is the second executor: it stands beside the simulator, not on it."""
    assert "simpy" not in _imports(path, top_level_only=False), path.name
    assert "sim" not in _memshare_subpackages(path) or path.name in VALIDATE_READS_SIM, path.name


def _assert_import_loads_none(modules: str, banned: set[str]) -> None:
    """Importing ``modules`` (comma-separated) in a fresh interpreter loads none of ``banned``."""
    code = f"import sys, {modules}; bad = {banned!r} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scheduler_pulls_in_neither_simpy_nor_torch() -> None:
    _assert_import_loads_none(
        "memshare.scheduler, memshare.request, memshare.kv_manager",
        {"torch", "simpy", "transformers", "memshare.sim", "memshare.validate"},
    )


@pytest.mark.parametrize("path", _py_files("sim"), ids=lambda p: p.name)
def test_sim_imports_no_torch(path: Path) -> None:
    bad = _imports(path, top_level_only=False) & HEAVY
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _py_files("traces"), ids=lambda p: p.name)
def test_traces_import_heavy_stacks_lazily(path: Path) -> None:
    bad = _imports(path, top_level_only=True) & (HEAVY | {"simpy"})
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} at module level"


def test_core_and_cli_load_without_torch_or_simpy() -> None:
    _assert_import_loads_none(
        "memshare, memshare.block_pool, memshare.kv_manager, memshare.registry, "
        "memshare.traces.reader, memshare.traces.writer, memshare.traces.importers, memshare.cli",
        {"torch", "simpy", "transformers"},
    )


def test_wheel_installs_nothing_top_level_but_memshare(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("memshare-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"memshare"}, tops
    for module in (
        "memshare/cli.py",
        "memshare/sim/__init__.py",
        "memshare/traces/reader.py",
        "memshare/validate/__init__.py",
        "memshare/data/mooncake_demo.jsonl",
    ):
        assert module in names, module
