"""The engine commands' inputs (issue 27): one rule per kind of value in every command, each
refusal one line naming the option and what would be right, and no work or output before it.

Real CLI in process, real files; the model is loaded only where a check needs its real limits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers_cli import assert_one_line_error, memshare, ok
from test_hardening import smol_kv_trace

GSM8K = Path(__file__).resolve().parents[1] / "memshare" / "data" / "gsm8k_prompts.jsonl"
MOONCAKE_DEMO = Path(__file__).resolve().parents[1] / "memshare" / "data" / "mooncake_demo.jsonl"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-inputs")
    kv = smol_kv_trace(root / "kv")
    run = root / "run"
    ok(memshare("simulate", str(kv), "--model-config", "smollm2-135m", "-o", str(run)))
    workload = root / "workload"
    ok(memshare("import", "mooncake", str(MOONCAKE_DEMO), "-o", str(workload), "--limit", "3"))
    texts = root / "texts.jsonl"
    texts.write_text(json.dumps({"text": "Some reasoning. Then more."}) + "\n")
    return {"root": root, "kv": kv, "run": run, "workload": workload, "texts": texts}


def _commands(f: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Each command that takes --limit and --block-size, ready for one more option."""
    return {
        "generate": ["generate", str(GSM8K), "-o", str(out / "g")],
        "capture": ["capture", "--texts", str(f["texts"]), "-o", str(out / "c")],
        "simulate": ["simulate", str(f["kv"]), "-o", str(out / "s")],
        "validate": ["validate", str(f["run"])],
        "import": ["import", "mooncake", str(MOONCAKE_DEMO), "-o", str(out / "i")],
    }


@pytest.mark.parametrize("value", ["0", "-2"])
def test_limit_below_one_is_the_same_refusal_in_every_command(
    files: dict[str, Path], tmp_path: Path, value: str
) -> None:
    for name, args in _commands(files, tmp_path).items():
        res = memshare(*args, "--limit", value)
        assert_one_line_error(res, f"--limit: must be >= 1, got {value}", "leave it out")
        assert not list(tmp_path.iterdir()), name  # refused before any output


@pytest.mark.parametrize("value", ["0", "-1", "100000000"])
def test_an_impossible_block_size_is_the_same_refusal_in_every_command(
    files: dict[str, Path], tmp_path: Path, value: str
) -> None:
    for name, args in _commands(files, tmp_path).items():
        if name == "import":  # import writes a trace without blocks: inspect reads them
            continue
        res = memshare(*args, "--block-size", value)
        assert_one_line_error(res, "--block-size: must be 1..131,072 tokens per block", value)
        assert not list(tmp_path.iterdir()), name


def test_a_file_that_is_not_gguf_is_refused_before_any_work(tmp_path: Path) -> None:
    fake = tmp_path / "x.gguf"
    fake.write_bytes(bytes(range(256)) * 8)
    out = tmp_path / "out"
    res = memshare("generate", str(GSM8K), "--model", str(fake), "-o", str(out))
    assert_one_line_error(res, f"--model {fake}", "is not a GGUF file", "b'GGUF'")
    assert not out.exists()


def test_an_unwritable_output_is_refused_before_the_model_runs(tmp_path: Path) -> None:
    res = memshare("generate", str(GSM8K), "--limit", "1", "-o", "/proc/x")
    assert_one_line_error(res, "-o /proc/x", "cannot write in /proc")


def test_a_run_config_holding_nan_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(memshare("simulate", str(files["kv"]), "--model-config", "smollm2-135m", "-o", str(run)))
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["time_scale"] = math.nan
    (run / "config.json").write_text(json.dumps(cfg))  # json.dumps writes NaN
    assert_one_line_error(memshare("validate", str(run)), "config.json", "NaN")


def test_validate_options_that_do_not_apply_are_refused(files: dict[str, Path]) -> None:
    run = files["run"]
    res = memshare("validate", str(run), "--length-scale", "0.5")
    assert_one_line_error(res, "--length-scale", "workload-only traces", "leave --length-scale out")


def test_validate_refuses_a_cost_model_path_it_cannot_write_before_the_engines_run(
    files: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    ok(memshare("simulate", str(files["kv"]), "--model-config", "smollm2-135m", "-o", str(run)))
    (run / "cost_model.toml").mkdir()  # in the way of the fitted cost model
    (run / "validation.json").write_text("{}")  # an earlier report stays as it was
    before = sorted(p.name for p in run.iterdir())
    res = memshare("validate", str(run), "--fit-cost-model")
    assert_one_line_error(res, "--fit-cost-model", "cost_model.toml", "move it away")
    assert sorted(p.name for p in run.iterdir()) == before  # no engine/ folder was written
    assert (run / "validation.json").read_text() == "{}"


def test_generate_refuses_an_earlier_run_and_replaces_it_whole_with_overwrite(
    model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "g"
    args = ["generate", str(GSM8K), "--limit", "1", "--max-tokens", "2", "-o", str(out)]
    ok(memshare(*args))
    (out / "stale.txt").write_text("from an earlier run")
    (out / ".outputs.jsonl.abc123.tmp").write_text("a killed run's half file")
    assert_one_line_error(memshare(*args), f"-o {out}", "already holds a generate run")
    ok(memshare(*args, "--overwrite"))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["metrics.json", "outputs.jsonl", "reuses.jsonl", "shares.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["g"]  # no staging folder left beside it
    assert (out / "outputs.jsonl").stat().st_mode & 0o044 == 0o044  # readable as traces are
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not memshare's")
    res = memshare("generate", str(GSM8K), "--limit", "1", "-o", str(mine), "--overwrite")
    assert_one_line_error(res, f"-o {mine}", "holds no generate run", "notes.txt")


def test_a_kv_budget_above_every_request_at_once_allocates_only_what_can_be_used(
    model_cache: Path, tmp_path: Path
) -> None:
    small, huge = tmp_path / "small", tmp_path / "huge"
    base = ["generate", str(GSM8K), "--limit", "2", "--max-tokens", "4"]
    ok(memshare(*base, "-o", str(small)))
    ok(memshare(*base, "--kv-blocks", "1000000000", "-o", str(huge)))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (small, huge))
    assert a["kv_pages_total"] == b["kv_pages_total"]  # not a billion blocks' worth
    assert (small / "outputs.jsonl").read_text() == (huge / "outputs.jsonl").read_text()


def test_pages_the_machine_cannot_hold_are_refused_with_the_figure(
    model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "g"
    prompts = tmp_path / "many.jsonl"  # 200 prompts of 131,072-token blocks: terabytes
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(200)))
    res = memshare("generate", str(prompts), "--block-size", "131072", "-o", str(out))
    assert_one_line_error(res, "KV pages", "GiB", "lower --kv-blocks, --block-size")
    assert not out.exists()


def test_calibrate_refuses_texts_past_the_models_context(model_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "map.json"
    res = memshare("calibrate", "-o", str(out), "--max-tokens", "100000", "--limit", "1")
    assert_one_line_error(res, "--max-tokens", "past the model's context of 8,192", "8,192 or less")
    assert not out.exists()
