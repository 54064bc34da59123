"""``memshare import tokens``: a workload given as token ids (or text), through the simulator
and the real engine.

A shared-preamble workload (the shape of few-shot prompts behind one long preamble) with
block-aligned exact repeats: the simulator's per-request prefix hits must follow vLLM's rule
(whole blocks within the first P - 1 tokens), and validate must run the ids as given and
measure the hits the simulator predicted, request by request.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import assert_one_line_error, memshare, ok

from memshare.traces.model.loader import LoadedModel
from memshare.traces.prompt_line import max_token_chars
from memshare.traces.reader import TraceReader

BS = 16
PREAMBLE = list(range(1000, 1064))  # 64 tokens: 4 whole blocks


def _rows() -> list[dict[str, Any]]:
    """6 requests: preamble + own question (not aligned), and two block-aligned repeats."""
    rows: list[dict[str, Any]] = []
    for i in range(4):
        question = [2000 + 50 * i + j for j in range(20 + 3 * i)]
        rows.append({"prompt_token_ids": PREAMBLE + question, "output_len": 6 + i})
    aligned = PREAMBLE + list(range(3000, 3032))  # 96 tokens: 6 whole blocks
    rows.append({"prompt_token_ids": aligned, "output_token_ids": [7, 8, 9, 10]})
    rows.append({"prompt_token_ids": aligned, "output_len": 5})
    for t, r in enumerate(rows):
        r["arrival_s"] = 10.0 * t  # one at a time: each sees every earlier one cached
    for r, rid in zip(rows, GIVEN_IDS, strict=False):  # the user's ids, on the first lines only
        r["id"] = rid
    return rows


GIVEN_IDS: list[str | int] = ["q-0", 17, 'gsm8k/é, "2"']  # a CSV comma and quotes, non-ASCII


def _names(n: int) -> list[str]:
    """The request names of ``_rows()``: a given id as its text, else ``tokens-<row>``."""
    return [str(GIVEN_IDS[i]) if i < len(GIVEN_IDS) else f"tokens-{i:06d}" for i in range(n)]


def _expected_hits(rows: list[dict[str, Any]]) -> list[int]:
    """vLLM's rule, from the ids alone: the longest run of whole blocks some earlier prompt
    also began with, within the first P - 1 tokens."""
    out = []
    for i, r in enumerate(rows):
        p = r["prompt_token_ids"]
        best = 0
        for q in (x["prompt_token_ids"] for x in rows[:i]):
            k = 0
            while (k + 1) * BS <= min(len(p) - 1, len(q)) and p[: (k + 1) * BS] == q[
                : (k + 1) * BS
            ]:
                k += 1
            best = max(best, k)
        out.append(best * BS)
    return out


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokens")
    out = folder / "trace"
    ok(memshare("import", "tokens", str(_write(folder / "w.jsonl", _rows())), "-o", str(out)))
    return out


def test_ids_are_kept_as_given(trace: Path) -> None:
    rows = _rows()
    with TraceReader(trace) as reader:
        recs = reader.records()
        assert reader.manifest.kind == "workload" and reader.manifest.hash_block_size is None
        assert reader.manifest.source["format"] == "tokens"
        assert "tokenizer" not in reader.manifest.source  # ids only: no model was loaded
    assert [r.prompt_ids for r in recs] == [r["prompt_token_ids"] for r in rows]
    assert [r.id for r in recs] == _names(len(rows))
    assert [r.output_len for r in recs] == [6, 7, 8, 9, 4, 5]
    assert recs[4].output_ids == [7, 8, 9, 10] and recs[5].output_ids is None
    assert [r.arrival_s for r in recs] == [10.0 * i for i in range(6)]


def test_simulated_prefix_hits_follow_vllms_rule(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok(
        memshare(
            "simulate", str(trace), "--policy", "prefix", "--block-size", str(BS), "-o", str(out)
        )
    )
    with (out / "requests.csv").open(newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    hits = [int(r["hit_tokens"]) for r in table]
    assert [r["id"] for r in table] == _names(len(_rows()))  # the user's ids, unchanged
    want = _expected_hits(_rows())
    assert hits == want
    assert want == [0, 64, 64, 64, 64, 80]  # the aligned repeat: 80 of 96, not 95


@pytest.mark.slow  # loads the real model's tokenizer
def test_text_prompts_use_the_models_tokenizer(model_cache: Path, tmp_path: Path) -> None:
    src = _write(tmp_path / "t.jsonl", [{"prompt": "What is 2 + 3?", "output_len": 4}])
    ok(memshare("import", "tokens", str(src), "-o", str(tmp_path / "tr")))
    with TraceReader(tmp_path / "tr") as reader:
        (rec,) = reader.records()
        assert reader.manifest.source["tokenizer"] == "SmolLM2-135M-Instruct.Q4_1"
    from memshare.traces.capture.hf import HFBackend

    assert rec.prompt_ids == HFBackend().tok("What is 2 + 3?")["input_ids"]


@pytest.mark.parametrize(
    ("line", "names"),
    [
        ('{"output_len": 3}', "prompt_token_ids"),
        ('{"prompt_token_ids": "1 2 3"}', "prompt_token_ids"),
        ('{"prompt_token_ids": [1, -2]}', "item 1"),
        ('{"prompt_token_ids": [1, true]}', "item 1"),
        ('{"prompt_token_ids": []}', "empty"),
        ('{"prompt_token_ids": [1], "prompt": "x"}', "'prompt_token_ids' and 'prompt'"),
        ('{"prompt": "  "}', "blank"),
        ('{"prompt_token_ids": [1], "output_len": -1}', "output_len"),
        ('{"prompt_token_ids": [1], "output_len": 2, "output_token_ids": [5]}', "output_len"),
        ('{"prompt_token_ids": [1], "arrival_s": NaN}', "arrival_s"),
        ('{"prompt_token_ids": [1], "arrival_s": -1}', "arrival_s"),
        ("[1, 2]", "not an object"),
        ('{"prompt_token_ids": [1]', "not valid JSON"),
        ('{"prompt_token_ids": [1], "output_len": 1' + "0" * 5000 + "}", "not valid JSON"),
        ('{"prompt_token_ids": [1], "id": ""}', "field 'id'"),
        ('{"prompt_token_ids": [1], "id": " a"}', "blank"),
        ('{"prompt_token_ids": [1], "id": "a\\nb"}', "U+000A"),
        ('{"prompt_token_ids": [1], "id": "a\\u2028b"}', "U+2028"),
        ('{"prompt_token_ids": [1], "id": "' + "x" * 129 + '"}', "129 characters"),
        ('{"prompt_token_ids": [1], "id": [1]}', "field 'id'"),
        ('{"prompt_token_ids": [1], "id": true}', "field 'id'"),
        ('{"prompt_token_ids": [1], "id": 1.5}', "field 'id'"),
    ],
)
def test_bad_lines_get_one_line_naming_line_and_field(
    tmp_path: Path, line: str, names: str
) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt_token_ids": [1, 2]}\n' + line + "\n")
    res = memshare("import", "tokens", str(src), "-o", str(tmp_path / "out"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"{src}:2" in res.stderr and names in res.stderr, res.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_arrival_on_some_lines_only_and_model_for_another_format(tmp_path: Path) -> None:
    src = _write(
        tmp_path / "w.jsonl", [{"prompt_token_ids": [1], "arrival_s": 0}, {"prompt_token_ids": [2]}]
    )
    res = memshare("import", "tokens", str(src), "-o", str(tmp_path / "a"))
    assert res.returncode == 2 and "arrival_s" in res.stderr and f"{src}:2" in res.stderr
    res = memshare("import", "mooncake", str(src), "-o", str(tmp_path / "b"), "--model", "x")
    assert res.returncode == 2 and "--model" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("lines", "first", "second"),
    [
        (
            [
                '{"id": "a", "prompt_token_ids": [1]}',
                '{"prompt_token_ids": [2]}',
                '{"id": "a", "prompt_token_ids": [3]}',
            ],
            1,
            3,
        ),
        (['{"id": 7, "prompt_token_ids": [1]}', '{"id": "7", "prompt_token_ids": [2]}'], 1, 2),
        (['{"prompt_token_ids": [1]}', '{"id": "tokens-000000", "prompt_token_ids": [2]}'], 1, 2),
    ],
)
def test_a_request_id_two_lines_share_is_refused_naming_both(
    tmp_path: Path, lines: list[str], first: int, second: int
) -> None:
    src = tmp_path / "dup.jsonl"
    src.write_text("\n".join(lines) + "\n")
    res = memshare("import", "tokens", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, f"{src}:{second}", f"line {first}", f"line {second}", "id")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_model_is_refused_for_a_file_of_ids(tmp_path: Path) -> None:
    """--model tokenizes text prompts: on ids only it would be ignored, so it is refused
    (before any model is looked up: the name given does not exist)."""
    src = _write(tmp_path / "w.jsonl", [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}])
    res = memshare("import", "tokens", str(src), "-o", str(tmp_path / "o"), "--model", "nope")
    assert_one_line_error(res, "--model", str(src), "token ids only")
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.slow  # loads the real model's tokenizer
def test_text_prompts_are_sized_against_the_models_context(
    loaded_model: LoadedModel, tmp_path: Path
) -> None:
    limit = loaded_model.context_limit
    longest = max_token_chars(loaded_model.tokenizer)
    words = "word " * limit  # few characters a token: passes the length bound, then too long
    n_words = len(loaded_model.tokenizer(words)["input_ids"])
    n_hello = len(loaded_model.tokenizer("Hello there.")["input_ids"])
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"prompt": "x" * (limit * longest)}, [f"{limit * longest:,} characters", f"{limit:,}"]),
        ({"prompt": words}, [f"{n_words:,} tokens", f"{limit:,}"]),
        (
            {"prompt": "Hello there.", "output_len": limit},
            ["'output_len'", f"{limit:,}", f"{limit - n_hello:,} or less"],
        ),
    ]
    assert n_words >= limit > n_hello
    for k, (row, needles) in enumerate(cases):
        src = _write(tmp_path / f"{k}.jsonl", [{"prompt": "a fine one"}, row])
        res = memshare("import", "tokens", str(src), "-o", str(tmp_path / f"o{k}"))
        assert_one_line_error(res, f"{src}:2", *needles)
        assert not (tmp_path / f"o{k}" / "manifest.json").exists()


@pytest.fixture(scope="module")
def validated(
    trace: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    pytest.importorskip("torch")
    runs = tmp_path_factory.mktemp("runs") / "tok"
    pols = [a for p in ("none", "prefix") for a in ("--policy", p)]
    ok(memshare("simulate", str(trace), *pols, "--block-size", str(BS), "-o", str(runs)))
    rep: dict[str, Any] = json.loads(ok(memshare("validate", str(runs), "--json")))
    rep["outputs"] = sorted(runs.rglob("outputs.jsonl"))  # the engine's, one per policy run
    return rep


@pytest.mark.slow  # validate on the real model
def test_validate_runs_the_ids_as_given_and_measures_the_predicted_hits(
    validated: dict[str, Any],
) -> None:
    assert validated["requests"] == 6 and validated["block_size"] == BS
    assert validated["workload_tokens"]["length_scale"] is None
    for name, p in validated["policies"].items():
        assert p["steps_identical"], (name, p["first_differing_step"])
        assert p["at_budget"]["steps_identical"], (name, p["at_budget"]["first_differing_step"])
    hits = validated["policies"]["prefix"]["at_budget"]["prefix_hit_tokens"]
    assert hits["predicted"] == hits["measured"] > 0
    assert validated["policies"]["none"]["at_budget"]["prefix_hit_tokens"]["measured"] == 0
    assert validated["outputs"], "validate wrote no outputs.jsonl"
    for path in validated["outputs"]:  # the user's ids name the engine's requests too
        names = [json.loads(x)["request"] for x in path.read_text(encoding="utf-8").splitlines()]
        assert sorted(names) == sorted(_names(6)), path


@pytest.mark.slow  # loads the real model
def test_token_ids_outside_the_models_vocabulary_are_refused(
    model_cache: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    src = _write(tmp_path / "w.jsonl", [{"prompt_token_ids": [1, 2, 10**6], "output_len": 2}])
    ok(memshare("import", "tokens", str(src), "-o", str(tmp_path / "tr")))
    ok(memshare("simulate", str(tmp_path / "tr"), "--policy", "none", "-o", str(tmp_path / "r")))
    res = memshare("validate", str(tmp_path / "r"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "1000000" in res.stderr and "vocabulary" in res.stderr
