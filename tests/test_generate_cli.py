"""``memshare generate`` end to end through the CLI, and the scheduler-driven engine on the
other architectures (tiny seeded Qwen2 / Qwen3 against HF ``generate``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from helpers_cli import assert_one_line_error, memshare
from helpers_models import tiny_model

from memshare.cli import main
from memshare.traces.model.loader import LoadedModel
from memshare.traces.prompt_line import max_token_chars

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GSM8K = Path(__file__).resolve().parents[1] / "memshare" / "data" / "gsm8k_prompts.jsonl"


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    got = capsys.readouterr()
    return code, got.out, got.err


@pytest.mark.slow  # generates on the real model
def test_generate_writes_outputs_shares_and_metrics(
    model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["generate", str(GSM8K), "--limit", "3", "--max-tokens", "12", "-o", str(out)]
    code, stdout, err = cli([*args, "--policy", "exact-dedup", "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(stdout)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    rows = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert [r["request"] for r in rows] == ["p0", "p1", "p2"]
    for r in rows:
        assert set(r) == {
            "request",
            "policy",
            "prompt_token_ids",
            "output_token_ids",
            "text",
            "finish_reason",
        }
        assert r["policy"] == "exact-dedup" and r["finish_reason"] in ("length", "stop")
        assert 1 <= len(r["output_token_ids"]) <= 12 and r["text"]
    assert metrics["kv_store_bytes"] == metrics["kv_pool_bytes"]
    assert metrics["pages_in_use"]["peak"] > 0 and metrics["tokens_generated"] <= 36
    assert (out / "shares.jsonl").exists() and (out / "reuses.jsonl").exists()
    code, _, err = cli(args, capsys)  # the same folder again: refused, nothing overwritten
    assert code == 2 and "already holds a generate run" in err


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        (["--model", "/nonexistent/model"], "--model"),
        pytest.param(["--kv-blocks", "3"], "--kv-blocks", marks=pytest.mark.slow),  # model load
        (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], "--device"),
        (["--device", "tpu"], "--device"),
        (["--policy", "nope"], "--policy"),
        (["--policy", "kvshare", "TEXTS"], "--policy kvshare"),
        (["--set", "tau=nan", "--policy", "cf-topk"], "--set"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["BAD_LINE"], ":2"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    extra: list[str],
    where: str,
    model_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    good = json.dumps({"prompt": "What is 2 + 3?"})
    prompts.write_text(good + "\n" + (good[:-3] if "BAD_LINE" in extra else good) + "\n")
    if "TEXTS" in extra:  # teacher-forced texts instead of the prompts
        texts = tmp_path / "texts.txt"
        texts.write_text("Some reasoning text. Then more of it.\n")
        prompts = texts
        extra = ["--texts", str(texts)] + [e for e in extra if e != "TEXTS"]
    extra = [e for e in extra if e != "BAD_LINE"]
    if where == "--device" and torch.cuda.is_available() and extra[-1] == "cuda:7":
        pytest.skip("a machine with 8 CUDA devices")
    out = tmp_path / "run"
    given = [] if "--texts" in extra else [str(prompts)]
    code, _, err = cli(["generate", *given, "-o", str(out), *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and where in err, err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_engine_on_qwen_matches_hf_generate(kind: str) -> None:
    """Qwen2 (the R1 distills' family) and Qwen3 (k_norm before RoPE), tiny and seeded,
    through the whole engine: scheduler, manager, a budget that preempts, and `prefix`."""
    from memshare.registry import make_policy
    from memshare.scheduler import SchedulerConfig
    from memshare.validate.engine.paged_engine import EngineOptions, EngineSpec, PagedEngine

    model = tiny_model(kind)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 256, (32,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 19, 40)]
    ref = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)
            ref.append(out[0, len(p) :].tolist())
    specs = [EngineSpec(f"q{i}", p, 24) for i, p in enumerate(prompts)]
    for budget in (None, 10):
        opts = EngineOptions(kv_blocks=budget, scheduler=SchedulerConfig(max_num_batched_tokens=48))
        engine = PagedEngine(copy.deepcopy(model), make_policy("prefix"), specs, opts)
        engine.run()
        assert [r.output_ids for r in engine.requests] == ref
        if budget is not None:
            assert engine.scheduler.num_preemptions > 0
        assert engine.manager.stats.hit_tokens > 0  # the shared 32-token prefix hit


@pytest.mark.slow  # runs the real model
def test_generate_teacher_forced_text_runs_block_by_block(
    model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "chain.txt"
    text.write_text(
        "First, compute 12 times 7, which is 84.\n\nWait, let me check that: 12 times 7 is "
        "70 plus 14, so 84. Then add 16 to get 100.\n\nLet me verify: 84 + 16 = 100. Yes."
    )
    out = tmp_path / "tf"
    code, stdout, err = cli(["generate", "--texts", str(text), "-o", str(out), "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(stdout)
    (row,) = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    n = len(row["prompt_token_ids"])
    assert n > 32 and len(row["output_token_ids"]) == 1 and row["finish_reason"] == "length"
    assert metrics["steps"] == -(-n // 16)  # one block per step: later blocks see the cache
    assert metrics["tokens_computed"] == n


def _lines(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("rows", "extra", "needles"),
    [
        ([{"prompt": "hi", "prompt_token_ids": [1, 2]}], [], [":1:", "'prompt_token_ids' and"]),
        ([{"question": "hi", "prompt_token_ids": [1]}], [], [":1:", "'question'"]),
        (
            [{"question": "hi", "prompt_token_ids": [1]}],
            ["--field", "question"],
            [":1:", "'prompt_token_ids' and 'question'"],
        ),
        (
            [{"id": "a", "prompt": "x"}, {"prompt": "y"}, {"id": "a", "prompt": "z"}],
            [],
            [":3:", "'a'", "line 1", "line 3"],
        ),
        ([{"id": "p1", "prompt": "x"}, {"prompt": "y"}], [], [":2:", "'p1'", "line 1", "line 2"]),
        ([{"id": "a\nb", "prompt": "x"}], [], [":1:", "field 'id'", "U+000A"]),
        ([{"id": None, "prompt": "x"}, {"id": {}, "prompt": "x"}], [], [":2:", "field 'id'"]),
        (
            [{"prompt": "x", "max_tokens": 10**12}],
            [],
            [":1", "field 'max_tokens'", "1,000,000,000,000"],
        ),
        ([{"prompt": "x", "max_tokens": 1.5}], [], [":1", "field 'max_tokens'", "1.5"]),
        (['{"prompt": "x", "max_tokens": 1' + "0" * 5000 + "}"], [], [":1:", "not valid JSON"]),
        ([{"prompt_token_ids": [1, -1]}], [], [":1:", "item 1"]),
        ([{"prompt_token_ids": []}], [], [":1:", "empty"]),
        ([{"prompt_token_ids": [1]}], ["--field", "question"], ["--field question", "token ids"]),
    ],
)
def test_bad_prompt_lines_are_refused_before_the_model_loads(
    tmp_path: Path, rows: list[object], extra: list[str], needles: list[str]
) -> None:
    """The rules of a prompt line (shared with import tokens), checked while reading the
    file: no model is loaded for these (the test has no model cache)."""
    src = _lines(tmp_path / "p.jsonl", *rows)
    out = tmp_path / "run"
    res = memshare("generate", str(src), "-o", str(out), *extra)
    assert_one_line_error(res, str(src), *needles)
    assert not out.exists() or not any(out.iterdir())


def test_a_line_separator_inside_a_prompt_text_is_text(tmp_path: Path) -> None:
    """Lines are split at newlines only: U+2028 inside a JSON string does not cut the line,
    so the error on line 2 is named line 2."""
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n[1]\n")
    res = memshare("generate", str(src), "-o", str(tmp_path / "run"))
    assert_one_line_error(res, f"{src}:2:", "not an object")


@pytest.mark.slow  # loads the real model (its context limit and tokenizer)
def test_prompts_past_the_models_context_are_refused(
    loaded_model: LoadedModel, tmp_path: Path
) -> None:
    limit = loaded_model.context_limit
    longest = max_token_chars(loaded_model.tokenizer)
    words = "word " * limit
    n_words = len(loaded_model.chat_prompt(words))
    near = limit - 100  # a prompt with room for 100 output tokens
    cases: list[tuple[list[object], list[str], list[str]]] = [
        ([{"prompt_token_ids": [1] * (limit + 5)}], [], [":1:", f"{limit + 5:,} tokens"]),
        ([{"prompt": "x" * (limit * longest)}], [], [":1:", f"{limit * longest:,} characters"]),
        ([{"prompt": "hi"}, {"prompt": words}], [], [":2:", f"{n_words:,} tokens"]),
        (
            [{"prompt_token_ids": [1] * (near - 50)}, {"prompt_token_ids": [1] * near}],
            ["--max-tokens", "256"],
            [":2:", "--max-tokens 256", "give --max-tokens 100 or less"],
        ),
        (
            [{"prompt": "hi"}, {"prompt_token_ids": [1] * near, "max_tokens": 101}],
            [],
            [":2:", "field 'max_tokens' 101", "give field 'max_tokens' 100 or less"],
        ),
    ]
    assert n_words >= limit
    for k, (rows, extra, needles) in enumerate(cases):
        src = _lines(tmp_path / f"p{k}.jsonl", *rows)
        out = tmp_path / f"run{k}"
        res = memshare("generate", str(src), "-o", str(out), *extra)
        assert_one_line_error(res, str(src), f"{limit:,}", *needles)
        assert not out.exists() or not any(out.iterdir())
