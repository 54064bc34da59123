"""Hardening (issue 11): every input path refuses bad input in one line, never a traceback.

Real files on disk, the real CLI in a subprocess; no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import assert_one_line_error, memshare
from helpers_trace_writer import sign_manifest

from memshare.registry import policy_names
from memshare.traces.capture.base import KeyMode
from memshare.traces.schema import Manifest, ModelInfo, RequestRecord, SketchSpec, kv_row_dtype
from memshare.traces.writer import TraceWriter

SMOL = ModelInfo("SmolLM2-135M-Instruct", "LlamaForCausalLM", 30, 3, 64, "bfloat16")


def smol_kv_trace(path: Path, n: int = 6, keys: KeyMode = "pre_rope") -> Path:
    """A kv trace shaped like a capture of the default model: 30 layers, sketches, repeats
    (requests 0/2/4 and 1/3/5 share content, so sharing policies have something to find);
    ``keys`` is what its manifest says the keys are."""
    sketch = SketchSpec(dim=8, keys=keys)
    template = Manifest(kind="kv", block_size=4, model=SMOL, sketch=sketch)
    dtype = kv_row_dtype(30, 8)
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((3, 30, 2, 8)).astype(np.float32) for _ in range(2)]
    with TraceWriter(path, template) as w:
        for i in range(n):
            rows = np.zeros(3, dtype=dtype)
            rows["sketch"] = base[i % 2] + 0.01 * rng.standard_normal(base[0].shape)
            rows["norm"] = 1.0
            prompt = [1, 2, 3, 4, 5 + i % 2, 6, 7, 8]
            w.add(RequestRecord(f"r{i}", float(i), 8, 4, prompt, [9, 9, 9, 9]), rows)
    return path


@pytest.fixture(scope="module")
def layer_map_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lm = list(range(30))
    lm[5], lm[7] = 4, 6  # two shared layers
    path = tmp_path_factory.mktemp("lm") / "kvsharer.json"
    path.write_text(json.dumps({"layer_map": lm}))
    return path


# trace fixture -> (requests it holds, extra --set items for cf-topk members)
TRACES = {"smol": (6, []), "captured": (2, ["--set", "tau=0.5"])}


@pytest.mark.parametrize(
    "trace", [pytest.param("smol"), pytest.param("captured", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("policy", policy_names())
def test_every_registered_policy_runs_through_the_cli(
    policy: str, trace: str, layer_map_file: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Defect 1: compositions (prefix+cf-topk) crashed on the composite's None layer map. Runs
    # on a written trace shaped like the default model's and on a real capture of it.
    path: Path = request.getfixturevalue(trace)
    finished, cf_sets = TRACES[trace]
    args = ["simulate", str(path), "--policy", policy, "-o", str(tmp_path / "o"), "--json"]
    args += cf_sets if "cf-topk" in policy else []
    if "kvsharer" in policy:
        args += ["--set", f"layer_map_file={layer_map_file}"]
    res = memshare(*args)
    assert res.returncode == 0, res.stderr
    run = json.loads(res.stdout)["runs"][0]
    assert run["policy"] == policy
    assert run["metrics"]["requests"]["finished"] == finished


def edit_manifest(trace: Path, **changes: object) -> None:
    m = json.loads((trace / "manifest.json").read_text())
    for key, value in changes.items():
        target = m
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    (trace / "manifest.json").write_text(json.dumps(sign_manifest(m)))  # re-signed: the
    # field checks, not the manifest's checksum, are what these tests meet


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("block_size", 0, "'block_size'"),
        ("block_size", -1, "'block_size'"),
        ("block_size", 2, "'block_size'"),  # disagrees with the rows per request
        ("block_size", 8, "'block_size'"),
        ("block_size", "4", "'block_size'"),
        ("model.num_layers", 0, "'model.num_layers'"),
        ("sketch.dim", -3, "'sketch.dim'"),
        ("sketch.keys", "sideways", "'sketch.keys'"),
        ("counts.requests", -1, "'counts.requests'"),
        ("source", "text", "'source'"),
        ("requests_sha256", 7, "'requests_sha256'"),
    ],
)
def test_out_of_range_manifest_values_are_one_line_errors(
    field: str, value: object, needle: str, tmp_path: Path
) -> None:
    # Defect 3: block_size 0 raised ValueError in inspect and blamed the GPU in simulate.
    trace = smol_kv_trace(tmp_path / "kv")
    edit_manifest(trace, **{field: value})
    for cmd in ("inspect", "simulate"):
        assert_one_line_error(memshare(cmd, str(trace)), "manifest.json", needle)


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ('{"timestamp": 5, "input_length": 0, "output_length": 0, "hash_ids": []}', "0"),
        ('{"timestamp": 5, "input_length": 0, "output_length": 7, "hash_ids": []}', "0"),
        (
            '{"timestamp": 5, "input_length": 100000000000, "output_length": 1, "hash_ids": [1]}',
            "limit",
        ),
    ],
)
def test_empty_or_absurd_requests_are_refused_on_import(
    row: str, needle: str, tmp_path: Path
) -> None:
    # Defect 7: a 0 + 0 token request was imported silently and simulated as 1 output token.
    src = tmp_path / "mc.jsonl"
    good = '{"timestamp": 0, "input_length": 600, "output_length": 8, "hash_ids": [0, 1]}'
    src.write_text(good + "\n" + row + "\n")
    res = memshare("import", "mooncake", str(src), "-o", str(tmp_path / "t"))
    assert_one_line_error(res, f"{src}:2", "input_length", needle)
    assert not (tmp_path / "t" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--policy", "cf-topk", "--set", "tau=nan"], ["--set", "tau"]),
        (["--policy", "cf-topk", "--set", "tau=inf"], ["--set", "tau"]),
        (["--policy", "cf-topk", "--set", "k=1e400"], ["--set", "k"]),
        (["--time-scale", "nan"], ["--time-scale"]),
        (["--gpu-memory-utilization", "inf"], ["--gpu-memory-utilization"]),
        (["--arrival", "poisson:nan"], ["--arrival"]),
        (["--arrival", "closed:100000000000"], ["--arrival", "at most closed:6"]),
    ],
)
def test_non_finite_and_absurd_numbers_are_refused(
    args: list[str], needles: list[str], smol: Path
) -> None:
    # Defect 5 / 4: NaN as a threshold silently shared nothing; 10^11 clients never finished.
    assert_one_line_error(memshare("simulate", str(smol), *args), *needles)


def test_help_shows_flags_plainly_full_names_and_the_default_policy(
    smol: Path, tmp_path: Path
) -> None:
    # For the user: `--json <bool>`, names cut at 80 columns, a silent default policy.
    res = memshare("simulate", "--help")
    assert res.returncode == 0
    assert "<bool>" not in res.stdout
    assert "--gpu-memory-utilization" in res.stdout and "--max-num-batched-tokens" in res.stdout
    assert "default: prefix" in res.stdout
    run = memshare("simulate", str(smol), "--json", "--limit", "1", "-o", str(tmp_path / "o"))
    assert run.returncode == 0, run.stderr
    assert "no --policy given: ran prefix" in run.stderr


@pytest.fixture(scope="module")
def captured(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real capture: the default model teacher-forcing two short reasoning texts."""
    folder = tmp_path_factory.mktemp("captured")
    texts = folder / "texts.jsonl"
    step = "Let me check: 12 times 7 is 84, and 84 plus 16 is 100. "
    rows = [{"reasoning": step * 4 + "Wait, so the answer is 100."} for _ in range(2)]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = folder / "trace"
    res = memshare("capture", "-o", str(out), "--texts", str(texts), "--field", "reasoning")
    assert res.returncode == 0, res.stderr
    return out
