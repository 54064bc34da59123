"""Issue 27's check: a seeded fuzz test of the engine commands' inputs, as
tests/test_trace_fuzz.py fuzzes the trace readers.

Three targets, each mutated from a pristine input with ``random.Random(SEED)``:

- **prompt files** for ``generate`` and ``import tokens``: one field of one line given a value
  that field cannot take (wrong type, out of range, non-finite, past the model's context or
  vocabulary), a line cut inside its JSON, a line that is not an object, a repeated ``id``, a
  line giving its prompt both as text and as ids;
- **run configs** (``config.json`` of a simulate run) for ``validate``: one leaf of the
  ``config`` object given a value of another type, or a number no config holds (NaN,
  +-Infinity, 1e400, -1);
- **option values** of ``generate``, ``validate``, ``sweep`` and ``import tokens``.

Every mutation here makes nonsense by construction (the oracle is this file's, not
memshare's), so each must be **refused**: exit status 2, exactly one line
``memshare: error: ...`` naming the field or option, no traceback, no Python warning, and no
output written. Each case is a pytest id ``TARGET-MUTATION-sSEED``; its details are in the
failure message, so ``-k`` reruns one case.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import memshare, ok
from test_hardening import smol_kv_trace
from test_trace_fuzz import Result, run_cli

VOCAB = 49_152  # SmolLM2-135M's vocabulary (the default model)
CONTEXT = 8_192  # and its context
RAW = "\x00raw\x00"  # replaced by a raw JSON number token (NaN, 1e400, ...) when written

# ----------------------------------------------------------------------------- pristine
PROMPT_LINES: list[dict[str, Any]] = [
    {"id": "q1", "prompt": "What is 2 + 3?", "max_tokens": 2, "output_len": 2},
    {"id": "q2", "prompt_token_ids": [1, 504, 2], "max_tokens": 2, "output_len": 2},
    {"id": 7, "prompt": "Name a colour.", "max_tokens": 2, "output_token_ids": [3, 4]},
]


@pytest.fixture(scope="module")
def pristine(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-fuzz")
    kv = smol_kv_trace(root / "kv")
    run = root / "run"
    ok(
        memshare(
            "simulate", str(kv), "--model-config", "smollm2-135m", "--policy", "cf-topk",
            "--set", "tau=0.5", "-o", str(run),
        )
    )  # fmt: skip
    ids = root / "ids.jsonl"
    ids.write_text(json.dumps({"id": "a", "prompt_token_ids": [1, 2, 3]}) + "\n")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in PROMPT_LINES))
    return {"root": root, "kv": kv, "run": run, "ids": ids, "prompts": prompts}


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    target: str  # "generate", "import" (prompt files), "config", "options"
    mutation: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.target}-{self.mutation}-s{self.seed}"


PLAN: list[tuple[str, str, int]] = [
    ("generate", "field", 24),
    ("generate", "structure", 8),
    ("import", "field", 24),
    ("import", "structure", 8),
    ("config", "wrongtype", 14),
    ("config", "badnumber", 14),
    ("options", "generate", 18),
    ("options", "validate", 12),
    ("options", "sweep", 12),
    ("options", "import", 6),
]


def all_cases() -> list[Case]:
    cases = []
    for target, mutation, n in PLAN:
        base = random.Random(f"{target}/{mutation}").randrange(1 << 20)
        cases += [Case(target, mutation, base + i) for i in range(n)]
    return cases


CASES = all_cases()


# ----------------------------------------------------------------------------- prompt files
LONG = list(range(1, 9_001))  # 9,000 ids: past the context of 8,192
# per field: values that field can never take (the reader's rules, not memshare's code)
BAD_FIELDS: dict[str, list[Any]] = {
    "id": ["", [], {}, True, 1.5, "x" * 1000, "a\nb"],
    "prompt": ["", "   ", 5, [], {}, True, None],
    "prompt_token_ids": [[], [-1], [1.5], ["7"], [True], "1 2", None, {}, [2**70]],
    "max_tokens": [0, -1, 1.5, "3", True, [], 10**12, 10**30],
    "output_len": [-1, 1.5, "3", True, [], 10**12],
    "output_token_ids": [[-1], [1.5], "1", [True], {}, [2**70]],
    "arrival_s": [-1, "0", True, [], RAW + "NaN", RAW + "Infinity", RAW + "1e400"],
}
# the fields each command reads (the others are ignored: a value there is not nonsense to it)
READS = {
    "generate": ("id", "prompt", "prompt_token_ids", "max_tokens"),
    "import": ("id", "prompt", "prompt_token_ids", "output_len", "output_token_ids", "arrival_s"),
}
MODEL_BAD = {"generate": {"prompt_token_ids": [[VOCAB], LONG]}}  # checked against the model


def _dump_line(obj: dict[str, Any]) -> str:
    """A line as JSON, with :data:`RAW` values written as the raw token after the marker."""
    raws = {}
    for k, v in obj.items():
        if isinstance(v, str) and v.startswith(RAW):
            raws[k] = v.removeprefix(RAW)
            obj = {**obj, k: RAW}
    text = json.dumps(obj)
    for _k, raw in raws.items():
        text = text.replace(json.dumps(RAW), raw, 1)
    return text


def mutate_prompts(command: str, kind: str, rng: random.Random) -> tuple[str, str]:
    """The prompt file with one nonsense change for ``command``; what was changed."""
    lines = [dict(x) for x in PROMPT_LINES]
    i = rng.randrange(len(lines))
    if kind == "field":
        given = "prompt_token_ids" if "prompt_token_ids" in lines[i] else "prompt"
        fields = [f for f in READS[command] if f not in ("prompt", "prompt_token_ids")]
        name = rng.choice([given, given, *fields])
        pool = BAD_FIELDS[name] + MODEL_BAD.get(command, {}).get(name, [])
        value = rng.choice(pool)
        lines[i][name] = value
        shown = f"{len(value)} ids" if value is LONG else repr(value)[:40]
        what = f"line {i + 1} {name}: {shown}"
    else:
        choice = rng.choice(["cut", "not-object", "dup-id", "both", "binary"])
        what = f"line {i + 1} {choice}"
        if choice == "dup-id":
            j = (i + 1) % len(lines)
            lines[j]["id"] = lines[i]["id"]
        elif choice == "both":
            lines[i] |= {"prompt": "Hello.", "prompt_token_ids": [1, 2]}
        texts = [_dump_line(x) for x in lines]
        if choice == "cut":
            cut = rng.randrange(1, len(texts[i]) - 1)
            texts[i] = texts[i][:cut]
            what += f" at {cut}"
        elif choice == "not-object":
            texts[i] = rng.choice(["[1, 2]", "3", '"text"', "null", "true"])
            what += f" ({texts[i]})"
        elif choice == "binary":
            texts[i] = bytes(rng.randrange(128, 256) for _ in range(20)).decode("latin-1")
        return "".join(t + "\n" for t in texts), what
    return "".join(_dump_line(x) + "\n" for x in lines), what


# ----------------------------------------------------------------------------- run configs
_WRONG: dict[type, list[Any]] = {
    int: ["1", [], {}, True, "x"],
    float: ["1.0", [], {}, True],
    str: [1, [], {}, True, 2.5],
    bool: [2, "true", [], {}],
}
_BAD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "-1"]


def _leaves(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for k, v in node.items() if isinstance(node, dict) else ():
        out += _leaves(v, (*prefix, k)) if isinstance(v, dict) else [(*prefix, k)]
    return out


def mutate_config(text: str, kind: str, rng: random.Random) -> tuple[str, str]:
    """``config.json`` with one leaf of its ``config`` object given a value of another type,
    or a number no config can hold."""
    obj = json.loads(text)
    cfg = obj["config"]

    def get(path: tuple[str, ...]) -> Any:
        node = cfg
        for k in path:
            node = node[k]
        return node

    def put(path: tuple[str, ...], value: Any) -> None:
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    leaves = [p for p in _leaves(cfg) if get(p) is not None]
    if kind == "wrongtype":
        path = rng.choice(leaves)
        old = get(path)
        value = rng.choice(_WRONG[type(old)])
        put(path, value)
        return json.dumps(obj, indent=2), f"config.{'.'.join(path)}: {old!r} -> {value!r}"
    numeric = [p for p in leaves if type(get(p)) in (int, float)]
    path = rng.choice(numeric)
    old, raw = get(path), rng.choice(_BAD_NUMBERS)
    put(path, RAW)
    text = json.dumps(obj, indent=2).replace(json.dumps(RAW), raw)
    return text, f"config.{'.'.join(path)}: {old!r} -> {raw}"


# ----------------------------------------------------------------------------- option values
# (option, values it can never take); every command line below is a valid one without them
OPTIONS: dict[str, list[tuple[str, list[str]]]] = {
    "generate": [
        ("--max-tokens", ["0", "-1", "x", "1.5", "1000000000000"]),
        ("--kv-blocks", ["0", "-1", "x"]),
        ("--block-size", ["0", "x", "100000000"]),
        ("--temperature", ["-1", "nan", "inf", "x"]),
        ("--top-p", ["0", "1.5", "nan"]),
        ("--seed", ["x", "1.5"]),
        ("--max-num-seqs", ["0", "-1"]),
        ("--max-num-batched-tokens", ["0", "-5"]),
        ("--threads", ["0", "-1", "x"]),
        ("--device", ["tpu", "cuda:x"]),
        ("--dtype", ["float8", "x"]),
        ("--policy", ["nope", "", "prefix+"]),
        ("--set", ["tau=nan", "nokey", "=1", "tau=", "k=-1", "tau=1e308"]),
        ("--limit", ["0", "-1", "x"]),
    ],
    "validate": [
        ("--kv-fraction", ["0", "-1", "1.5", "nan"]),
        ("--gpu", ["nogpu"]),
        ("--engine", ["tpu"]),
        ("--length-scale", ["0", "2", "nan"]),
        ("--threads", ["0", "x"]),
        ("--limit", ["0", "-2"]),
        ("--block-size", ["0", "-3"]),
        ("--device", ["tpu"]),
        ("--dtype", ["x"]),
        ("--model", ["/nonexistent/model.gguf"]),
    ],
    "sweep": [
        ("KEY=A,B,C", ["tau=", "tau=a,b", "=1,2", "colour=1,2", "tau=0.1,,2", "tau", "tau=nan,1"]),
        ("--kv-blocks", ["-1", "x"]),
        ("--limit", ["0"]),
        ("--set", ["tau=0.5"]),  # the swept key given a fixed value too
    ],
    "import": [
        ("--limit", ["0", "-1", "x"]),
        ("--model", ["/nonexistent/model.gguf"]),  # a file of ids has no text to tokenize
    ],
}


def option_argv(
    command: str, f: dict[str, Path], out: Path, rng: random.Random
) -> tuple[list[str], str, str]:
    """A valid command line of ``command`` with one option given a value it can never take:
    (argv, the option, what was done)."""
    option, values = rng.choice(OPTIONS[command])
    value = rng.choice(values)
    if command == "generate":
        base = ["generate", str(f["prompts"]), "-o", str(out), "--max-tokens", "2"]
        if option == "--set":
            base += ["--policy", "cf-topk"]
    elif command == "validate":
        base = ["validate", str(f["run"]), "--limit", "1", "--fidelity-only", "--one-pass"]
    elif command == "sweep":
        param = value if option == "KEY=A,B,C" else "tau=0.1,0.5"
        base = ["sweep", str(f["kv"]), param, "--policy", "cf-topk", "-o", str(out)]
        base += ["--model-config", "smollm2-135m"]
        if option == "KEY=A,B,C":
            return base, option, f"sweep {value!r}"
    else:
        base = ["import", "tokens", str(f["ids"]), "-o", str(out)]
    return [*base, option, value], option, f"{option} {value!r}"


# ----------------------------------------------------------------------------- running
def refusal_problem(result: Result, *needles: str) -> str | None:
    """Why ``result`` is not a clean refusal naming every needle, or None if it is one."""
    code, _, err = result
    lines = err.strip().splitlines()
    if code != 2:
        return f"exit {code}, not a refusal (2): {err.strip()[-300:]}"
    if len(lines) != 1 or not lines[0].startswith("memshare: error: "):
        return f"not one 'memshare: error:' line: {err!r}"
    missing = [n for n in needles if n not in lines[0]]
    return f"the line does not name {missing}: {lines[0]}" if missing else None


def _prompt_case(
    case: Case, f: dict[str, Path], folder: Path
) -> tuple[list[str], str, tuple[str, ...]]:
    text, what = mutate_prompts(case.target, case.mutation, random.Random(case.seed))
    path = folder / "prompts.jsonl"
    path.write_text(text, encoding="latin-1" if "binary" in what else "utf-8")
    out = str(folder / "out")
    if case.target == "generate":
        return ["generate", str(path), "-o", out, "--max-tokens", "2"], what, (str(path),)
    return ["import", "tokens", str(path), "-o", out], what, (str(path),)


def _config_case(
    case: Case, f: dict[str, Path], folder: Path
) -> tuple[list[str], str, tuple[str, ...]]:
    run = folder / "run"
    shutil.copytree(f["run"], run)
    text, what = mutate_config(
        (run / "config.json").read_text(), case.mutation, random.Random(case.seed)
    )
    (run / "config.json").write_text(text)
    argv = ["validate", str(run), "--limit", "1", "--fidelity-only", "--one-pass"]
    return argv, what, ("config.json",)


def _options_case(
    case: Case, f: dict[str, Path], folder: Path
) -> tuple[list[str], str, tuple[str, ...]]:
    argv, option, what = option_argv(case.mutation, f, folder / "out", random.Random(case.seed))
    needles = () if option == "KEY=A,B,C" else (option,)
    return argv, what, needles


BUILD: dict[
    str, Callable[[Case, dict[str, Path], Path], tuple[list[str], str, tuple[str, ...]]]
] = {
    "generate": _prompt_case,
    "import": _prompt_case,
    "config": _config_case,
    "options": _options_case,
}


def test_the_fuzz_plan_covers_every_target() -> None:
    assert len(CASES) >= 140 and len({c.id for c in CASES}) == len(CASES)
    for command, options in OPTIONS.items():  # every option of the table is reachable
        hit = set()
        for c in CASES:
            if c.target == "options" and c.mutation == command:
                rng = random.Random(c.seed)
                hit.add(rng.choice(options)[0])
        assert len(hit) >= len(options) // 2, (command, sorted(hit))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz_case(
    case: Case,
    pristine: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv, what, needles = BUILD[case.target](case, pristine, tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run_cli(capsys, argv)
    problem = refusal_problem(result, *needles)
    assert problem is None, f"{case.id}: {what}: {problem}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, f"{case.id}: wrote output"
