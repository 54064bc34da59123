"""What ``simulate``, ``sweep`` and ``study`` leave in ``-o``: one run, written whole.

A folder holds the results of one run: a second run into it is refused before any work
unless ``--overwrite``, which replaces the earlier run whole (a sweep's old points go with
it); a run that fails or is interrupted leaves the earlier one as it was and nothing hidden
beside it; no file records the hidden folder a run is written in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_cli import assert_one_line_error, memshare, ok

from memshare.sim.options import SimOptions, parse_sweep
from memshare.sim.study import simulate, sweep

MOONCAKE_DEMO = Path(__file__).resolve().parents[1] / "memshare" / "data" / "mooncake_demo.jsonl"
RESULT_FILES = ("config.json", "metrics.json", "requests.csv", "timeline.csv")  # not perf.json


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    ok(memshare("import", "mooncake", str(MOONCAKE_DEMO), "-o", str(out)))
    return out


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def results(folder: Path) -> dict[str, bytes]:
    """The result files of the runs under ``folder`` (timings left out)."""
    return {k: v for k, v in tree(folder).items() if Path(k).name in RESULT_FILES}


def test_a_second_sweep_replaces_the_first_whole_only_with_overwrite(
    smol: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sw"
    ok(memshare("sweep", str(smol), "kv_blocks=10,20", "-o", str(out)))
    first = tree(out)
    assert {"kv_blocks=10/prefix/config.json", "kv_blocks=20/prefix/config.json"} <= set(first)
    for again in (
        ["sweep", str(smol), "kv_blocks=30,40", "-o", str(out)],
        ["simulate", str(smol), "--sweep", "max_num_seqs=8,16", "-o", str(out)],
        ["simulate", str(smol), "-o", str(out)],
    ):
        assert_one_line_error(
            memshare(*again), f"-o {out}", "already holds a sweep run", "--overwrite"
        )
        assert tree(out) == first  # refused before any work: nothing touched
    ok(memshare("sweep", str(smol), "kv_blocks=30,40", "-o", str(out), "--overwrite"))
    points = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert points == ["kv_blocks=30", "kv_blocks=40"]  # the first sweep's points are gone
    table = json.loads((out / "sweep.json").read_text())
    assert table["values"] == ["30", "40"]
    assert [r["kv_blocks"] for r in table["rows"]] == ["30", "40"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sw"]  # nothing hidden beside it


def test_the_default_output_is_not_mixed_silently(
    smol: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ok(memshare("simulate", str(smol), "--policy", "none", "--policy", "prefix"))
    runs = tmp_path / "runs" / "kv"
    assert (runs / "comparison.json").is_file()
    res = memshare("simulate", str(smol), "--policy", "prefix")
    assert_one_line_error(res, "-o runs/kv", "already holds a simulate run", "--overwrite")
    ok(memshare("simulate", str(smol), "--policy", "prefix", "--overwrite"))
    names = sorted(p.name for p in runs.iterdir())
    assert names == sorted((*RESULT_FILES, "perf.json"))  # one run: none/, prefix/ are gone
    ok(memshare("sweep", str(smol), "max_num_seqs=8,16"))  # a sweep's default folder is its own
    assert (tmp_path / "runs" / "kv-sweep-max_num_seqs" / "sweep.json").is_file()


def test_a_folder_of_something_else_is_refused_even_with_overwrite(
    smol: Path, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    trace = str(smol)
    for cmd in (["simulate", trace], ["sweep", trace, "max_num_seqs=8,16"], ["study", trace]):
        for extra in ([], ["--overwrite"]):
            res = memshare(*cmd, "-o", str(mine), *extra)
            assert_one_line_error(res, f"-o {mine}", "is not empty", "notes.txt")
    assert tree(mine) == {"notes.txt": b"precious"}


def test_a_run_replaced_in_place_has_the_same_bytes(demo: Path, tmp_path: Path) -> None:
    # staging changes where files are written, not what: a fresh folder and a replaced one
    # hold the same bytes, and no file names the hidden staging folder
    args = ["simulate", str(demo), "--policy", "none", "--policy", "prefix", "--kv-blocks", "300"]
    ok(memshare(*args, "-o", str(tmp_path / "fresh"), "--plot"))
    out = tmp_path / "again"
    ok(memshare(*args[:4], "--kv-blocks", "100", "-o", str(out)))  # another run first
    report = json.loads(ok(memshare(*args, "-o", str(out), "--overwrite", "--plot", "--json")))
    assert results(out) == results(tmp_path / "fresh")
    assert set(tree(out)) == set(tree(tmp_path / "fresh"))
    assert report["output"] == str(out)
    assert [r["directory"] for r in report["runs"]] == [str(out / "none"), str(out / "prefix")]
    assert report["plots"] and all(Path(p).parent == out for p in report["plots"])
    for name, data in tree(out).items():
        assert b".staging-" not in data and b".replaced-" not in data, name
    swept = ["sweep", str(demo), "kv_blocks=100,300", *args[2:6], "-o", str(out), "--overwrite"]
    sweep_report = json.loads(ok(memshare(*swept, "--plot", "--json")))
    assert sweep_report["output"] == str(out) and sweep_report["plots"] == [str(out / "sweep.png")]
    for name, data in tree(out).items():
        assert b".staging-" not in data and b".replaced-" not in data, name
    assert results(out / "kv_blocks=300") == results(tmp_path / "fresh")


class Stop(Exception):
    """Raised from a progress callback: a run that fails part way."""


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Stop])
def test_a_run_that_fails_midway_leaves_the_earlier_run_intact(
    demo: Path, tmp_path: Path, interrupt: type[BaseException]
) -> None:
    out = tmp_path / "run"
    ok(memshare("simulate", str(demo), "--policy", "none", "--kv-blocks", "200", "-o", str(out)))
    before = tree(out)

    def stop(label: str, done: int, _total: int) -> None:
        if label.endswith("prefix") and done > 0:  # the last run, after others finished
            raise interrupt

    opts = SimOptions(trace=demo, policies=("none", "prefix"))
    with pytest.raises(interrupt):
        simulate(opts, out, overwrite=True, progress=stop)
    assert tree(out) == before
    with pytest.raises(interrupt):
        sweep(opts, parse_sweep("kv_blocks=100,300"), out, overwrite=True, progress=stop)
    assert tree(out) == before
    # no staging folder left; the job store keeps the finished run (none), whole, for --resume
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.jobs", "run"]
    assert [p.suffix for p in (tmp_path / ".run.jobs").iterdir()] == [".pkl"]


def test_a_sweep_point_refused_late_writes_nothing(demo: Path, tmp_path: Path) -> None:
    # every point is checked before the first runs: a block size the trace's hash ids cannot
    # take, arrival times past the horizon; the folder never appears
    out = tmp_path / "sw"
    for arg, needles in (
        ("block_size=16,3", ["KEY=A,B,C block_size=16,3", "block_size=3", "does not divide"]),
        ("time_scale=1,1e308", ["KEY=A,B,C time_scale=1,1e308", "--time-scale", "stretches"]),
    ):
        res = memshare("sweep", str(demo), arg, "-o", str(out), "--limit", "20")
        assert_one_line_error(res, *needles)
        assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_a_second_study_needs_overwrite(smol: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    ok(memshare("study", str(smol), "--tau", "0.3", "-o", str(out)))
    first = tree(out)
    res = memshare("study", str(smol), "--tau", "0.5", "-o", str(out))
    assert_one_line_error(res, f"-o {out}", "already holds a study run", "--overwrite")
    assert tree(out) == first
    ok(memshare("study", str(smol), "--tau", "0.5", "-o", str(out), "--overwrite"))
    labels = [r["label"] for r in json.loads((out / "study.json").read_text())["rows"]]
    assert any("tau=0.5" in label for label in labels)
    assert not any("tau=0.3" in label for label in labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]


@pytest.mark.parametrize(
    ("sweep", "extra", "why"),
    [
        ("seed=1,2", [], "--arrival trace draws nothing at random"),
        ("time_scale=1,2", ["--arrival", "poisson:2"], "does not use trace times"),
        ("gpu_memory_utilization=0.5,0.9", ["--kv-blocks", "500"], "set the KV budget"),
    ],
)
def test_a_sweep_of_an_option_without_effect_is_refused(
    sweep: str, extra: list[str], why: str, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    ok(memshare("import", "mooncake", str(MOONCAKE_DEMO), "-o", str(trace), "--limit", "5"))
    res = memshare("sweep", str(trace), sweep, *extra, "-o", str(tmp_path / "out"))
    assert_one_line_error(res, f"KEY=A,B,C {sweep}", "has no effect here", why)
    assert not (tmp_path / "out").exists()
