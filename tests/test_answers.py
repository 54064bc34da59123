"""Answer extraction and comparison on the real GSM8K, MATH-500 and Sky-T1 files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memshare.validate.answers import (
    answers_equal,
    detect_kind,
    extract_answer,
    gold_answer,
    last_boxed,
    normalize_math,
    number_value,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_gsm8k_gold_of_every_row_is_a_number() -> None:
    data = rows(DATA / "problems" / "gsm8k_test.jsonl")
    assert len(data) == 1319
    for row in data:
        assert detect_kind(row) == "gsm8k"
        gold = gold_answer(row, "gsm8k")
        assert number_value(gold) is not None, gold
        assert "," not in gold and "$" not in gold
    # the commas and dollar signs of "#### 1,000"-style golds are dropped
    assert gold_answer({"answer": "so\n#### $1,200"}, "gsm8k") == "1200"


def test_math500_solution_boxes_match_the_answer_field() -> None:
    data = rows(DATA / "problems" / "math500_test.jsonl")
    assert len(data) == 500
    assert {detect_kind(r) for r in data} == {"math500"}
    misses = [
        (extract_answer(r["solution"], "math500"), r["answer"])
        for r in data
        if not answers_equal(
            extract_answer(r["solution"], "math500"), gold_answer(r, "math500"), "math500"
        )
    ]
    rate = 1 - len(misses) / len(data)
    print(f"MATH-500 solution vs answer: {rate:.1%} agree; misses: {misses}")
    assert rate >= 0.97


def test_skyt1_scores_agree_with_ours() -> None:
    data = rows(DATA / "reasoning" / "skyt1_27b_math500.jsonl")
    assert len(data) == 500
    ours = [
        answers_equal(extract_answer(r["code"][0], "math500"), r["gt"], "math500") for r in data
    ]
    theirs = [bool(r["score"][0]) for r in data]
    rate = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(data)
    print(f"Sky-T1 score agreement: {rate:.1%} (ours correct {sum(ours)}, theirs {sum(theirs)})")
    assert rate >= 0.90
    assert sum(ours) > 250  # the scorer is not trivially "all wrong"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("She makes 9 * 2 = $18 every day.", "18"),
        ("He made a profit of $70,000.", "70000"),
        ("It costs $18.00 in total.", "18.00"),
        ("The temperature fell to -5 degrees.", "-5"),
        ("She read pages 3-4", "4"),  # a hyphen between numbers is no minus sign
        ("x = -4", "-4"),
        ("so it is 3.5.", "3.5"),
        ("She ate 3/4 of the pie", "3/4"),
        ("It is 1, 2, and then 3", "3"),
        ("The answer is 42. Check: 40 + 2 = 42, with 7 left over", "42"),
        ("The answer is: $1,234. Yes 5", "1234"),
        ("So \\boxed{17} and then 99 more words 5", "17"),
        ("\\boxed{\\$1,500}", "1500"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("No digits here", None),
    ],
)
def test_gsm8k_extraction_rules(text: str, want: str | None) -> None:
    got = extract_answer(text, "gsm8k")
    assert got == want


@pytest.mark.parametrize(
    ("model", "gold", "equal"),
    [
        ("18.00", "18", True),
        ("70,000", "70000", True),
        ("$5", "5", True),
        ("3/4", "0.75", True),
        ("-5", "5", False),
        ("17", "18", False),
    ],
)
def test_gsm8k_comparison(model: str, gold: str, equal: bool) -> None:
    assert answers_equal(model, gold, "gsm8k") is equal
    assert answers_equal(gold, model, "gsm8k") is equal


def test_last_boxed_balances_braces() -> None:
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1,\\sqrt{2}\\}}") == "\\{1,\\sqrt{2}\\}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("so $\\boxed 5$") == "5"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # never closes
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("10,\\!080", "10080"),
        ("\\dfrac{17}{50}", "\\frac{17}{50}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("\\frac 59", "\\frac{5}{9}"),
        ("\\frac9{19}", "\\frac{9}{19}"),
        ("30^\\circ", "30"),
        ("55^{\\circ}.", "55"),
        ("15\\mbox{ cm}^2", "15"),
        ("864 \\text{ inches}^2", "864"),
        ("\\text{Evelyn}", "Evelyn"),
        ("\\text{(C)}", "C"),
        ("x = 5", "5"),
        ("y = 2x + 3", "2x+3"),
        ("11\\sqrt2", "11\\sqrt{2}"),
        ("4210_{5}", "4210_5"),
        ("10\\%", "10"),
        ("\\$32,\\!348", "32348"),
        ("x \\in [-2,7]", "[-2,7]"),
    ],
)
def test_math_normalization_rules(raw: str, norm: str) -> None:
    assert normalize_math(raw) == norm


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac12", "1/2", True),
        ("-\\frac{3}{8}", "-0.375", True),
        ("137 \\frac{1}{2}", "\\frac{275}{2}", True),
        (".35625", "0.35625", True),
        ("(1, \\frac{1}{2})", "\\left(1,0.5\\right)", True),
        ("(2,1)", "(1,2)", False),  # a tuple is ordered
        ("1,-2", "-2, 1", True),  # a list of solutions is not
        ("[-2,7)", "[-2,7]", False),
        (
            "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",
            "\\begin{pmatrix}-\\frac13\\\\\\frac{2}{3}\\end{pmatrix}",
            True,
        ),
        (
            "\\begin{pmatrix} 1 & 2 \\end{pmatrix}",
            "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
            False,
        ),
        ("\\frac{1}{3}", "0.33", False),
        ("\\sqrt{2}", "2", False),
        ("p - q", "p-q", True),
        ("\\pi", "3.14", False),
    ],
)
def test_math_comparison(a: str, b: str, equal: bool) -> None:
    assert answers_equal(a, b, "math500") is equal
    assert answers_equal(b, a, "math500") is equal


def test_math_extraction_fallbacks() -> None:
    text = "We get $x=\\boxed{\\left(\\frac{1}{2}, 3\\right)}$. Then 7."
    assert extract_answer(text, "math500") == "\\left(\\frac{1}{2}, 3\\right)"
    assert extract_answer("So the answer is $\\frac{3}{4}$.", "math500") == "\\frac{3}{4}"
    assert extract_answer("The answer is indeed 12 apples", "math500") == "12"
    assert extract_answer("The answer is correct. It was 9", "math500") == "9"  # a verdict
    assert extract_answer("ends with 326.5", "math500") == "326.5"


def test_none_and_bad_kinds() -> None:
    assert not answers_equal(None, "1", "math500")
    assert not answers_equal("1", None, "gsm8k")
    with pytest.raises(ValueError, match="kind"):
        extract_answer("1", "aime")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fields"):
        detect_kind({"text": "1"})
    with pytest.raises(ValueError, match="####"):
        gold_answer({"answer": "no marker"}, "gsm8k")
    sky = {"question": "q", "gt": "\\frac{1}{2}"}
    assert detect_kind(sky) == "math500"
    assert gold_answer(sky, "math500") == "\\frac{1}{2}"


def test_answers_and_fidelity_import_without_torch() -> None:
    code = (
        "import sys, memshare.validate.answers, memshare.validate.fidelity; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
