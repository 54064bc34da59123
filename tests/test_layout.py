"""The import rules (docs/layout.md) and the installed layout (everything under ``memshare``)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
LAZILY = " (lazily)"


@dataclass(frozen=True)
class Row:
    """One row of docs/layout.md's table: a package and what its modules may import."""

    folder: str  # "traces/model/", or "cli.py" for the one top-level module
    name: str  # the import name, "memshare.traces.model"
    eager: frozenset[str]  # packages (memshare.*) and third-party names allowed anywhere
    lazy: frozenset[str]  # those allowed inside functions only


def _cells(line: str) -> list[str]:
    return [c.strip().strip("`") for c in line.strip().strip("|").split("|")]


def _layout_rows() -> list[Row]:
    """The table in docs/layout.md, parsed; it is the only source of the import rules."""
    lines = (ROOT / "docs" / "layout.md").read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| folder |"))
    rows: list[Row] = []
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        folder, name, _, may = _cells(line)
        allowed = [t.strip() for t in may.split(",")]
        eager = {t for t in allowed if not t.endswith(LAZILY)}
        lazy = {t.removesuffix(LAZILY) for t in allowed if t.endswith(LAZILY)}
        rows.append(Row(folder, name, frozenset(eager), frozenset(lazy)))
    return rows


ROWS = _layout_rows()
PACKAGES = {r.name: r for r in ROWS}


def _row_of(path: Path) -> Row:
    """The row that owns a source file: the deepest folder of the table that holds it."""
    rel = path.relative_to(ROOT).as_posix()
    owners = [
        r for r in ROWS if rel == r.folder or (r.folder.endswith("/") and rel.startswith(r.folder))
    ]
    assert owners, f"{rel}: no row of docs/layout.md holds it (add one)"
    return max(owners, key=lambda r: len(r.folder))


def _package_of(module: str) -> str | None:
    """The table package a ``memshare.*`` module belongs to (the longest matching name)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in PACKAGES and (n == len(parts) or name != module):
            return name
    return None


def _imports_of(path: Path) -> list[tuple[str, bool]]:
    """Every absolute import of a file as (module, at module level)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from memshare.validate import engine` names a package: resolve the names too
            subs = [f"{node.module}.{a.name}" for a in node.names]
            named = [m for m in subs if m in PACKAGES or _module_file(m) is not None]
            found += [(m, id(node) in top) for m in (named or [node.module])]
    return found


def _mapped_folders() -> dict[str, list[str]]:
    """Each top folder pyproject.toml maps to an import name: ``{"traces": ["traces"]}`` for
    ``memshare.traces = traces`` (the core, ``memshare/``, maps to ``[]``)."""
    import tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {folder: name.split(".")[1:] for name, folder in table["package-dir"].items()}


MAPPED = _mapped_folders() | {"cli": ["cli"]}


def _source_files() -> list[Path]:
    files = [ROOT / "cli.py"]
    for folder in MAPPED:
        if folder != "cli":
            files += [p for p in (ROOT / folder).rglob("*.py") if not p.is_symlink()]
    return sorted(files)


def _module_name(path: Path) -> str:
    """``memshare.traces.model.loader`` for traces/model/loader.py."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    names = ["memshare", *MAPPED[parts[0]], *parts[1:]]
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def _module_file(module: str) -> Path | None:
    return MODULES.get(module)


MODULES: dict[str, Path] = {}
MODULES.update({_module_name(p): p for p in _source_files()})


def test_every_package_has_a_row() -> None:
    """Each installed package (a folder with __init__.py) is a row of its own, or a part of
    the row above it; each row's folder exists and installs as its import name."""
    for row in ROWS:
        assert (ROOT / row.folder).exists(), row.folder
        if row.folder.endswith("/"):
            assert _module_name(ROOT / row.folder / "__init__.py") == row.name, row


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_imports_what_its_row_allows(path: Path) -> None:
    row = _row_of(path)
    where = path.relative_to(ROOT).as_posix()
    for module, at_top in _imports_of(path):
        top = module.split(".")[0]
        if top in STDLIB:
            continue
        name = _package_of(module) if top == "memshare" else top
        assert name is not None, f"{where}: {module} is in no row of docs/layout.md"
        if name == row.name:
            continue
        allowed = row.eager if at_top else row.eager | row.lazy
        assert name in allowed, (
            f"{where} imports {module}{'' if at_top else ' (in a function)'}: docs/layout.md "
            f"lets {row.name} import {sorted(row.eager)} and lazily {sorted(row.lazy)}"
        )


def test_the_table_has_no_circle() -> None:
    graph = {r.name: {p for p in r.eager | r.lazy if p.startswith("memshare")} for r in ROWS}
    assert not _circles(graph), _circles(graph)


def test_no_two_modules_import_each_other() -> None:
    """No circle among the modules, counting imports inside functions too."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        graph[name] = {m for m, _ in _imports_of(path) if m in MODULES and m != name}
    assert not _circles(graph), _circles(graph)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_docstring_says_what_it_holds(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.strip(), f"{path.relative_to(ROOT)} has no module docstring"


def _assert_import_loads_none(modules: str, banned: set[str]) -> None:
    """Importing ``modules`` (comma-separated) in a fresh interpreter loads none of ``banned``."""
    code = f"import sys, {modules}; bad = {banned!r} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scheduler_pulls_in_neither_simpy_nor_torch() -> None:
    _assert_import_loads_none(
        "memshare.scheduler, memshare.request, memshare.kv_manager",
        {"torch", "simpy", "transformers", "memshare.sim", "memshare.validate"},
    )


def test_core_and_cli_load_without_torch_or_simpy() -> None:
    _assert_import_loads_none(
        "memshare, memshare.block_pool, memshare.kv_manager, memshare.registry, "
        "memshare.traces.reader, memshare.traces.writer, memshare.traces.importers, memshare.cli",
        {"torch", "simpy", "transformers"},
    )


@pytest.mark.slow  # builds the wheel
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
