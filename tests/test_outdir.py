"""Output folders (memshare.outdir): one run per folder, swapped in whole, no litter left."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from memshare.atomic import current_umask, write_atomic
from memshare.errors import InputError
from memshare.outdir import OutputKind, claim_output, remove_litter, staged_output

RUN = OutputKind("simulate", "config.json")


def test_absent_and_empty_folders_are_claimed(tmp_path: Path) -> None:
    claim_output(tmp_path / "new" / "deeper", "-o", RUN, overwrite=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".config.json.abc.tmp").write_text("litter")  # litter does not count
    claim_output(tmp_path / "empty", "-o", RUN, overwrite=False)


def test_an_earlier_run_needs_overwrite_and_foreign_files_are_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"already holds a simulate run.*--overwrite"):
        claim_output(run, "-o", RUN, overwrite=False)
    claim_output(run, "-o", RUN, overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"-o .*mine: is not empty .*thesis\.tex"):
            claim_output(mine, "-o", RUN, overwrite=overwrite)
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        claim_output(tmp_path / "f", "-o", RUN, overwrite=True)
    with pytest.raises(InputError, match="is a file, not a folder"):
        claim_output(tmp_path / "f" / "sub", "-o", RUN, overwrite=False)


def test_a_folder_that_cannot_be_written_is_refused_before_work(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"-o /proc/x: cannot write in /proc \("):
        claim_output(Path("/proc/x"), "-o", RUN, overwrite=False)
    assert not list(tmp_path.iterdir())


def test_a_finished_run_replaces_the_earlier_one_whole(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("old")
    (run / "stale-policy").mkdir()
    with staged_output(run) as stage:
        assert not (stage / "config.json").exists()
        write_atomic(stage / "config.json", "new")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert (run / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing hidden left beside it
    mode = stat.S_IMODE(run.stat().st_mode)
    assert mode == 0o777 & ~current_umask()
    assert stat.S_IMODE((run / "config.json").stat().st_mode) == 0o666 & ~current_umask()


def test_an_interrupted_run_leaves_the_earlier_one_and_no_litter(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_output(run) as stage:
        (stage / "config.json").write_text("half")
        raise KeyboardInterrupt
    assert (run / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_what_a_killed_run_left_is_removed_by_the_next_run(tmp_path: Path) -> None:
    (tmp_path / ".run.staging-abc").mkdir()
    (tmp_path / ".run.staging-abc" / "config.json").write_text("half")
    (tmp_path / ".run.replaced-xyz").mkdir()
    (tmp_path / ".other.staging-abc").mkdir()  # another output's: not this run's to remove
    with staged_output(tmp_path / "run") as stage:
        (stage / "config.json").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.staging-abc", "run"]
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / ".outputs.jsonl.k2j3.tmp").write_text("half")
    (folder / "outputs.jsonl").write_text("whole")
    remove_litter(folder)
    assert [p.name for p in folder.iterdir()] == ["outputs.jsonl"]
