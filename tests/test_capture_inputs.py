"""Capture inputs: field auto-detection on the real public files, dotted paths, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memshare.errors import InputError
from memshare.traces.inputs import (
    bundled_prompts,
    get_path,
    parse_path,
    read_problems,
    read_texts,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("gsm8k_test.jsonl", "question"),
        ("math500_test.jsonl", "problem"),
        ("aime24.jsonl", "prompt"),
        ("aime25.jsonl", "prompt"),
    ],
)
def test_problem_sets_detect_their_prompt_field(name: str, field: str) -> None:
    inputs = read_problems(DATA / "problems" / name, limit=3)
    assert inputs.source["prompt_field"] == field
    assert [it.id for it in inputs.items] == [f"{Path(name).stem}-{i:05d}" for i in range(3)]
    first = json.loads((DATA / "problems" / name).open(encoding="utf-8").readline())
    assert inputs.items[0].prompt == first[field]
    assert "answer" in inputs.items[0].meta


def test_reasoning_files_detect_text_and_problem_fields() -> None:
    r1 = read_texts(DATA / "reasoning" / "deepseek_r1_aime24_math500.jsonl")
    assert r1.source["text_field"] == "reasoning" and r1.source["prompt_field"] == "problem"
    assert len(r1.items) == 45
    sky = read_texts(DATA / "reasoning" / "skyt1_27b_math500.jsonl", limit=2)
    assert sky.source["text_field"] == "code[0]" and sky.source["prompt_field"] == "question"
    first = json.loads((DATA / "reasoning" / "skyt1_27b_math500.jsonl").open().readline())
    assert sky.items[0].text == first["code"][0]
    same = read_texts(DATA / "reasoning" / "skyt1_27b_math500.jsonl", field="code.0", limit=2)
    assert same.items == sky.items


def test_dotted_paths() -> None:
    assert parse_path("code[0]") == ("code", 0) == parse_path("code.0")
    assert parse_path("a.b[2].c") == ("a", "b", 2, "c")
    assert get_path({"a": [{"b": "x"}]}, parse_path("a[0].b")) == "x"
    for bad in ("", "a..b", "a[x]", "a]"):
        with pytest.raises(ValueError):
            parse_path(bad)
    with pytest.raises(KeyError, match=r"code\[5\]: index out of range"):
        get_path({"code": ["x"]}, ("code", 5))


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    gsm = DATA / "problems" / "gsm8k_test.jsonl"
    with pytest.raises(InputError, match=r"--field .nope.*not found.*fields: answer, question"):
        read_problems(gsm, field="nope")
    with pytest.raises(InputError, match="holds a list, not text"):
        read_texts(DATA / "reasoning" / "skyt1_27b_math500.jsonl", field="code")
    with pytest.raises(InputError, match="does not exist"):
        read_texts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\nnot json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        read_problems(bad)
    with pytest.raises(InputError, match="no text field found"):
        read_texts(gsm)
    with pytest.raises(InputError, match="--limit"):
        read_problems(gsm, limit=0)


def test_bundled_prompts_are_gsm8k_rows() -> None:
    path = bundled_prompts()
    rows = path.read_text(encoding="utf-8").splitlines()
    gsm = (DATA / "problems" / "gsm8k_test.jsonl").read_text(encoding="utf-8").splitlines()
    assert rows == gsm[: len(rows)] and len(rows) == 8
    assert read_problems(path).source["prompt_field"] == "question"
