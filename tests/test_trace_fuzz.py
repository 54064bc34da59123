"""Issue 11, checks: a seeded fuzz test of trace files and command lines.

Mutations: truncation, bit flips, deleted files, wrong JSON types (manifest fields and
``requests.jsonl`` lines), out-of-range and non-finite numbers, in-range edits of manifest
values (a renamed architecture, a seed + 1), reformatted manifests (keys reordered, other white
space and escapes) and mutated command lines.
Every case is a pytest id ``TARGET-MUTATION-sSEED``; its details (offset, bit, field, value)
come from ``random.Random(SEED)`` and are in the failure message, so ``-k`` reruns one case.

What must hold, on real files through the real CLI (``memshare.cli.main`` in process):

- never a traceback (any exception but SystemExit fails), never a Python warning;
- a refusal is exactly one line on stderr, ``memshare: error: ...``, exit status 2;
- a mutated data file (``requests.jsonl``, ``kv-*.bin``, ``fullkv-*.bin``) is always refused,
  by ``inspect`` and by ``simulate`` (and ``study`` on some cases);
- a mutated manifest is refused exactly when its content changed: the manifest carries the
  sha256 of its canonical JSON (``manifest_sha256``, docs/traces.md), so a mutation that
  changes any key or value (after JSON parsing) must be refused, and one that leaves the parsed
  content equal (key order, white space, escapes, number spellings, the last newline cut,
  two bit flips that cancel, a value replaced by itself) must read and run: :func:`same_content`
  decides which, independently of memshare's code;
- a ``requests.jsonl`` re-signed in the manifest (length, sha256 and the manifest's own
  checksum, so the parser, not a checksum, meets the mutation) is refused or, where harmless,
  reads and runs;
- a mutated command line is refused in one line or runs.

Two small traces are built once per module with the repo's own writers: a kv trace shaped like
a capture of the default model (30 layers, sketches, full-KV shards) and a workload trace
(``memshare import mooncake`` of a few bundled rows). A case hard-links the files it does not
mutate into its own folder, so the pristine traces are never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_trace_writer import sign_manifest

from memshare.cli import main
from memshare.traces.capture.fullkv import FullKVWriter, full_kv_dtype
from memshare.traces.schema import Manifest, ModelInfo, RequestRecord, SketchSpec, kv_row_dtype
from memshare.traces.writer import TraceWriter

MOONCAKE_DEMO = Path(__file__).resolve().parents[1] / "memshare" / "data" / "mooncake_demo.jsonl"
SMOL = ModelInfo("SmolLM2-135M-Instruct", "LlamaForCausalLM", 30, 3, 64, "bfloat16")
FULL_KV = {"fields": ["k"], "dtype": "<f4", "files": "fullkv-*.bin"}

Result = tuple[int, str, str]  # exit status, stdout, stderr


# ----------------------------------------------------------------------------- traces
def write_kv_trace(path: Path, n: int = 4) -> Path:
    """A kv trace of the default model's shape (as tests/test_hardening.py writes one), with
    full-KV shards (keys only, to stay small): requests 0/2 and 1/3 hold near-equal KV."""
    template = Manifest(
        kind="kv",
        block_size=4,
        model=SMOL,
        sketch=SketchSpec(dim=8),
        source={"generator": "test_trace_fuzz"},
        capture={"backend": "synthetic", "full_kv": FULL_KV},
    )
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((3, 30, 2, 8)).astype(np.float32) for _ in range(2)]
    dtype = full_kv_dtype(template)
    assert dtype is not None
    path.mkdir(parents=True)
    full = FullKVWriter(path, dtype)
    with TraceWriter(path, template) as w:
        for i in range(n):
            rows = np.zeros(3, dtype=kv_row_dtype(30, 8))
            rows["sketch"] = base[i % 2] + 0.01 * rng.standard_normal(base[0].shape)
            rows["norm"] = 1.0
            tokens = np.zeros(12, dtype=dtype)
            tokens["k"] = rng.standard_normal(tokens["k"].shape)
            ref = full.append(tokens)
            prompt = [1, 2, 3, 4, 5 + i % 2, 6, 7, 8]
            record = RequestRecord(
                f"r{i}", float(i), 8, 4, prompt, [9, 9, 9, 9], text="t", steps=[0, 4],
                finish_reason="stop", timings={"ttft_s": 0.5}, full_kv=ref,
            )  # fmt: skip
            w.add(record, rows)
    full.close()
    return path


def run_cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> Result:
    """``memshare ARGS`` in process; any exception but SystemExit, or any warning, propagates
    (a traceback for the user is a failure here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refusal_problem(result: Result) -> str | None:
    """Why ``result`` is not a clean refusal (one line, exit 2), or None if it is one."""
    code, _, err = result
    lines = err.strip().splitlines()
    if code != 2:
        return f"exit {code}, not a refusal (2)"
    if len(lines) != 1 or not lines[0].startswith("memshare: error: "):
        return "not one 'memshare: error:' line"
    return None


def run_problem(result: Result) -> str | None:
    """Why ``result`` is not a run (exit 0), or None if it is one."""
    return None if result[0] == 0 else f"exit {result[0]}, not a run: {result[2].strip()}"


def outcome_problem(result: Result) -> str | None:
    """A run (exit 0) or a clean refusal is fine; anything else is the problem."""
    return None if result[0] == 0 else refusal_problem(result)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trace-fuzz")
    kv = write_kv_trace(root / "kv")
    src = root / "mc.jsonl"
    src.write_text("".join(MOONCAKE_DEMO.read_text().splitlines(keepends=True)[:6]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["memshare"])
        try:
            main(["import", "mooncake", str(src), "-o", str(root / "mc"), "--json"])
        except SystemExit as e:
            assert not e.code, e.code
    return {"root": root, "kv": kv, "mc": root / "mc"}


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    trace: str  # "kv" or "mc"
    target: str  # file name inside the trace, or "argv"
    mutation: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.trace}/{self.target}-{self.mutation}-s{self.seed}"


DATA_FILES = {
    "kv": ("requests.jsonl", "kv-00000.bin", "fullkv-00000.bin"),
    "mc": ("requests.jsonl",),
}
# (trace, target, mutation, cases): data files must be refused; the manifest must be refused
# unless its parsed content is unchanged (then it must run); re-signed request lines may also
# be harmless; command lines are refused or run.
PLAN: list[tuple[str, str, str, int]] = [
    *[(t, f, "truncate", 14) for t, files in DATA_FILES.items() for f in files],
    *[(t, f, "bitflip", 24) for t, files in DATA_FILES.items() for f in files],
    *[(t, f, "delete", 1) for t, files in DATA_FILES.items() for f in files],
    *[(t, "requests.jsonl", m, 12) for t in DATA_FILES for m in ("wrongtype", "badnumber")],
    *[(t, "requests.jsonl", m, 30) for t in DATA_FILES for m in ("resigned-wrongtype",)],
    *[(t, "requests.jsonl", m, 25) for t in DATA_FILES for m in ("resigned-badnumber",)],
    *[(t, "manifest.json", "truncate", 8) for t in DATA_FILES],
    *[(t, "manifest.json", "bitflip", 25) for t in DATA_FILES],
    *[(t, "manifest.json", "delete", 1) for t in DATA_FILES],
    *[(t, "manifest.json", "wrongtype", 40) for t in DATA_FILES],
    *[(t, "manifest.json", "badnumber", 35) for t in DATA_FILES],
    *[(t, "manifest.json", "editvalue", 30) for t in DATA_FILES],
    *[(t, "manifest.json", "reformat", 6) for t in DATA_FILES],
    ("kv", "argv", "value", 60),
    ("kv", "argv", "token", 30),
    ("mc", "argv", "value", 25),
    ("mc", "argv", "token", 15),
]


def all_cases() -> list[Case]:
    cases = []
    for trace, target, mutation, n in PLAN:
        base = random.Random(f"{trace}/{target}/{mutation}").randrange(1 << 20)
        cases += [Case(trace, target, mutation, base + i) for i in range(n)]
    return cases


CASES = all_cases()


def test_the_fuzz_plan_has_at_least_500_cases() -> None:
    assert len(CASES) >= 500 and len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- mutations
_WRONG: dict[type, list[Any]] = {
    dict: [[1], "x", 3, True],
    list: [{}, "x", 1, {"a": 1}],
    str: [1, [], {}, True, 2.5],
    int: ["1", 1.5, True, [], {}, "x"],
    float: ["1.0", True, [], {}],
    bool: [1, "true", [], 0.0],
    type(None): [1, "x", [], {}, False],
}
_BAD_NUMBERS = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "-1", "0", "-0.5", "1e308", "-1e308",
    "1e-320", "18446744073709551616", "100000000000000000000000000000", "-9223372036854775809",
    "9223372036854775807", "4.5",
]  # fmt: skip
RAW = "\x00raw\x00"  # a placeholder replaced by a raw JSON number token (NaN, 1e400, ...)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a node inside ``node`` (dict keys and list indices)."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        node = node[k]
    return node


def _set(node: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(node, path[:-1])[path[-1]] = value


def _dump(obj: Any, raw: str | None, compact: bool) -> str:
    text = json.dumps(obj, separators=(",", ":") if compact else None, ensure_ascii=False)
    return text if raw is None else text.replace(json.dumps(RAW), raw)


def mutate_json(text: str, kind: str, rng: random.Random, compact: bool) -> tuple[str, str]:
    """A JSON document with one node replaced by a wrong type or a bad number."""
    obj = json.loads(text)
    if kind == "wrongtype":
        path = rng.choice(_paths(obj))
        old = _get(obj, path)
        value = rng.choice(_WRONG[type(old)] + [None])
        _set(obj, path, value)
        return _dump(obj, None, compact), f"{'.'.join(map(str, path))}: {old!r} -> {value!r}"
    numeric = [p for p in _paths(obj) if type(_get(obj, p)) in (int, float)]
    path = rng.choice(numeric)
    old = _get(obj, path)
    raw = rng.choice([r for r in _BAD_NUMBERS if r != json.dumps(old)])
    _set(obj, path, RAW)
    return _dump(obj, raw, compact), f"{'.'.join(map(str, path))}: {old!r} -> {raw}"


def edit_value(text: str, rng: random.Random) -> tuple[str, str]:
    """A manifest with one leaf changed in range and type (a string one character off, an int
    + or - 1, a bool negated, a float doubled, null made 0): what only a checksum can catch."""
    obj = json.loads(text)
    path = rng.choice([p for p in _paths(obj) if not isinstance(_get(obj, p), dict | list)])
    old = _get(obj, path)
    new: Any
    if isinstance(old, bool):
        new = not old
    elif isinstance(old, int):
        new = old + rng.choice([-1, 1])
    elif isinstance(old, float):
        new = old * 2 + 1
    elif isinstance(old, str) and old:
        i = rng.randrange(len(old))
        new = old[:i] + chr(ord(old[i]) ^ 1) + old[i + 1 :]  # MlamaForCausalLM, a hex digit
    else:
        new = 0 if old is None else "x"
    _set(obj, path, new)
    return json.dumps(obj, indent=2), f"{'.'.join(map(str, path))}: {old!r} -> {new!r}"


def reformat(text: str, rng: random.Random) -> tuple[str, str]:
    """The same manifest content written differently: keys reversed at every level, compact or
    wide white space, non-ASCII escaped or not, ``1e2``-style spellings left to json."""
    obj = json.loads(text)

    def reverse(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: reverse(v) for k, v in reversed(list(node.items()))}
        return [reverse(v) for v in node] if isinstance(node, list) else node

    indent = rng.choice([None, 0, 1, 4, "\t"])
    escaped = rng.choice([True, False])
    new = json.dumps(reverse(obj), indent=indent, ensure_ascii=escaped)
    return new, f"keys reversed, indent {indent!r}, ensure_ascii {escaped}"


def same_content(before: bytes, after: bytes) -> bool:
    """Whether two manifest texts parse (as strict JSON: no NaN, no 1e400) to the same content,
    compared as canonical JSON (sorted keys, so 1 and 1.0 or true differ). Not memshare's code:
    what a manifest checksum over canonical JSON must accept, and all it may accept."""

    def canonical(data: bytes) -> str | None:
        def no_constant(name: str) -> Any:
            raise ValueError(name)

        try:
            obj = json.loads(data.decode("utf-8"), parse_constant=no_constant)
        except ValueError:  # also JSONDecodeError and UnicodeDecodeError
            return None
        if _has_inf(obj):
            return None
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    a, b = canonical(before), canonical(after)
    return a is not None and a == b


def _has_inf(node: Any) -> bool:
    if isinstance(node, float):
        return node != node or node in (float("inf"), float("-inf"))
    items = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return any(_has_inf(v) for v in items)


def mutate_bytes(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated to {cut} of {len(data)} bytes"
    flips = rng.choice([1, 1, 1, 2, 8])
    out = bytearray(data)
    where = []
    for _ in range(flips):
        pos, bit = rng.randrange(len(out)), rng.randrange(8)
        out[pos] ^= 1 << bit
        where.append(f"byte {pos} bit {bit}")
    if bytes(out) == data:  # two flips cancelled out
        out[0] ^= 1
        where.append("byte 0 bit 0")
    return bytes(out), "flipped " + ", ".join(where)


def mutate_lines(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """One line of requests.jsonl with a wrong type or a bad number."""
    lines = data.decode("utf-8").splitlines(keepends=True)
    i = rng.randrange(len(lines))
    text, what = mutate_json(lines[i], kind.removeprefix("resigned-"), rng, compact=True)
    lines[i] = text + "\n"
    return "".join(lines).encode("utf-8"), f"line {i + 1} {what}"


def make_case(case: Case, src: Path, dst: Path) -> str:
    """``dst``: the trace ``src`` with the case's mutation; returns what was done."""
    rng = random.Random(case.seed)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != case.target:
            os.link(f, dst / f.name)  # read-only use: nothing writes into a trace
    target = src / case.target
    data = target.read_bytes()
    kind = case.mutation
    if kind == "delete":
        return f"deleted {case.target}"
    if case.target == "manifest.json" and kind in ("wrongtype", "badnumber"):
        text, what = mutate_json(data.decode("utf-8"), kind, rng, compact=False)
        (dst / case.target).write_text(text, encoding="utf-8")
        return what
    if kind in ("editvalue", "reformat"):
        edit = edit_value if kind == "editvalue" else reformat
        text, what = edit(data.decode("utf-8"), rng)
        (dst / case.target).write_text(text, encoding="utf-8")
        return what
    if kind in ("truncate", "bitflip"):
        new, what = mutate_bytes(data, kind, rng)
    else:
        new, what = mutate_lines(data, kind, rng)
    (dst / case.target).write_bytes(new)
    if kind.startswith("resigned-"):  # the manifest commits the new bytes: the parser sees them
        manifest = json.loads((src / "manifest.json").read_text())
        manifest["requests_bytes"] = len(new)
        manifest["requests_sha256"] = hashlib.sha256(new).hexdigest()
        os.unlink(dst / "manifest.json")
        (dst / "manifest.json").write_text(json.dumps(sign_manifest(manifest), indent=2))
        what += " (re-signed in manifest.json)"
    return what


# ----------------------------------------------------------------------------- command lines
_VALUES = [
    "nan", "inf", "-inf", "-1", "0", "1e400", "1e308", "-1e308", "99999999999999999999999",
    "", " ", "abc", "1.5", "-0", "0x10", "1e-320", "unlimited", "closed:0", "poisson:nan",
    "poisson:1e308", "closed:99999999999", "tau=nan", "tau=1e400", "k=-1", "none", "prefix+",
    "h200", "cpu", "qwq-32b", "/nonexistent", "é", "\u202e", "1,2", "=",
]  # fmt: skip


def base_commands(f: dict[str, Path], trace: Path, out: Path) -> list[tuple[list[str], set[int]]]:
    """(argv, indices of tokens a mutation may touch): tiny runs; outputs never mutated."""
    o = str(out)
    lines: list[list[str]] = [
        ["inspect", str(trace)],
        ["inspect", str(trace), "--block-size", "16", "--json"],
        [
            "simulate", str(trace), "--limit", "2", "--policy", "prefix", "--kv-blocks", "100",
            "--time-scale", "1", "--arrival", "trace", "--max-num-seqs", "8",
            "--max-num-batched-tokens", "2048", "--seed", "0", "--gpu", "h100",
            "--gpu-memory-utilization", "0.9", "--long-prefill-threshold", "0", "-o", o, "--json",
        ],
        [
            "simulate", str(trace), "--limit", "3", "--kv-bytes", "40GiB", "--arrival",
            "poisson:2", "--block-size", "16" if trace.name == "mc" else "4", "-o", o,
        ],
        ["sweep", str(trace), "kv_blocks=50,100", "--limit", "2", "-o", o, "--json"],
    ]  # fmt: skip
    if trace.name == "kv":
        lines += [
            [
                "simulate", str(trace), "--limit", "2", "--policy", "cf-topk", "--set",
                "tau=0.3", "--set", "granularity=layer", "-o", o, "--json",
            ],
            ["study", str(trace), "--limit", "2", "--tau", "0.5", "-o", o, "--json"],
        ]  # fmt: skip
    out_idx = {i + 1 for line in lines for i, t in enumerate(line) if t == "-o"}
    return [(line, set(range(1, len(line))) - out_idx - {i - 1 for i in out_idx}) for line in lines]


def mutate_argv(case: Case, f: dict[str, Path], out: Path) -> tuple[list[str], str]:
    rng = random.Random(case.seed)
    argv, mutable = rng.choice(base_commands(f, f[case.trace], out))
    argv = list(argv)
    i = rng.choice(sorted(mutable))
    if case.mutation == "value":
        how = rng.choice(["pool", "pool", "pool", "bitflip", "cut", "file"])
        if how == "pool":
            argv[i] = rng.choice(_VALUES)
        elif how == "bitflip" and argv[i]:
            j = rng.randrange(len(argv[i]))
            c = chr((ord(argv[i][j]) ^ (1 << rng.randrange(7))) or 1)  # argv holds no NUL
            argv[i] = argv[i][:j] + c + argv[i][j + 1 :]
        elif how == "cut":
            argv[i] = argv[i][: rng.randrange(len(argv[i]) + 1)]
        else:
            argv[i] = str(f[case.trace] / rng.choice(["manifest.json", "requests.jsonl", "x"]))
        return argv, f"{argv[0]}: token {i} -> {argv[i]!r}"
    how = rng.choice(["delete", "truncate", "duplicate"])
    if how == "delete":
        del argv[i]
    elif how == "truncate":
        argv = argv[:i]
    else:
        argv.insert(i, argv[i])
    return argv, f"{how} at token {i}"


# ----------------------------------------------------------------------------- the test
def commands_for(case: Case, trace: Path, out: Path) -> list[list[str]]:
    cmds = [
        ["inspect", str(trace)],
        ["simulate", str(trace), "--limit", "2", "--policy", "none", "-o", str(out), "--json"],
    ]
    if case.trace == "kv" and case.seed % 8 == 0:  # study: 10 runs, so on some cases only
        cmds.append(["study", str(trace), "--limit", "2", "--tau", "0.5", "-o", str(out / "s")])
    return cmds


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fuzz_case(
    case: Case,
    pristine: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # a default output (runs/...) lands here, not in the checkout
    out = tmp_path / "out"
    if case.target == "argv":
        argv, what = mutate_argv(case, pristine, out)
        result = run_cli(capsys, argv)
        problem = outcome_problem(result)
        assert problem is None, f"{case.id} {argv}: {what}: {problem}\n{result[2]}"
        return
    trace = tmp_path / case.trace
    what = make_case(case, pristine[case.trace], trace)
    check: Callable[[Result], str | None] = refusal_problem
    if case.mutation.startswith("resigned-"):
        check = outcome_problem  # the parser may find the mutation harmless
    elif case.target == "manifest.json" and case.mutation != "delete":
        before = (pristine[case.trace] / case.target).read_bytes()
        if same_content(before, (trace / case.target).read_bytes()):
            check = run_problem  # the same manifest, written differently
            what += " (same content)"
    for argv in commands_for(case, trace, out):
        result = run_cli(capsys, argv)
        problem = check(result)
        assert problem is None, (
            f"{case.id} ({case.target}: {what}) {argv[0]}: {problem}\n{result[2]}"
        )


@pytest.mark.parametrize(
    ("target", "edit", "needle"),
    [
        ("manifest.json", lambda m: m["source"].update(generator=RAW), "NaN is not a JSON number"),
        ("manifest.json", lambda m: m.update(complete=None), "'complete'"),
        ("manifest.json", lambda m: m.update(complete=[]), "'complete'"),
        ("manifest.json", lambda m: m.update(tool_version=3), "'tool_version'"),
        ("manifest.json", lambda m: m["source"].update(sha256=2.5), "'source.sha256'"),
        ("manifest.json", lambda m: m["capture"]["full_kv"].update(dtype="<i8"), "full_kv"),
        ("requests.jsonl", lambda r: r.update(arrival_s=RAW), "not valid JSON"),
        ("requests.jsonl", lambda r: r["timings"].update(ttft_s={}), "'timings'"),
        ("requests.jsonl", lambda r: r["full_kv"].update(row="0"), "'full_kv'"),
        ("requests.jsonl", lambda r: r["full_kv"].update(file="../kv-00000.bin"), "full_kv.file"),
        ("requests.jsonl", lambda r: r.pop("full_kv"), "'full_kv'"),
    ],
)
def test_what_the_fuzzer_found_is_refused_in_one_line(
    target: str,
    edit: Callable[[dict[str, Any]], Any],
    needle: str,
    pristine: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Found by test_fuzz_case: full-KV shards were never checked (a truncated or flipped one
    # passed inspect), NaN/Infinity/1e400 entered from JSON, 'complete' and 'tool_version' of
    # any type were coerced, 'timings' values and 'full_kv' fields were not typed.
    trace = tmp_path / "kv"
    shutil.copytree(pristine["kv"], trace)
    manifest = json.loads((trace / "manifest.json").read_text())
    if target == "requests.jsonl":
        lines = (trace / target).read_text().splitlines()
        record = json.loads(lines[1])
        edit(record)
        lines[1] = _dump(record, "1e400", compact=True)
        data = ("\n".join(lines) + "\n").encode()
        (trace / target).write_bytes(data)
        manifest["requests_bytes"] = len(data)
        manifest["requests_sha256"] = hashlib.sha256(data).hexdigest()
        (trace / "manifest.json").write_text(json.dumps(sign_manifest(manifest)))
    else:  # re-signed: the field checks, not the manifest's checksum, meet the edit
        edit(manifest)
        (trace / "manifest.json").write_text(_dump(sign_manifest(manifest), "NaN", compact=False))
    for argv in (["inspect", str(trace)], ["simulate", str(trace), "-o", str(tmp_path / "o")]):
        code, _, err = run_cli(capsys, argv)
        assert refusal_problem((code, "", err)) is None, err
        assert needle in err, (needle, err)
