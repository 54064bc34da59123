"""The ``memshare`` command as a user runs it: real files, real subprocesses, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import assert_one_line_error
from helpers_cli import memshare_process as memshare

from memshare.traces.schema import Manifest, ModelInfo, RequestRecord, SketchSpec, kv_row_dtype
from memshare.traces.writer import TraceWriter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOONCAKE = DATA / "workloads" / "mooncake_synthetic_trace.jsonl"


def kv_trace(path: Path, n: int = 3) -> Path:
    model = ModelInfo("tiny", "LlamaForCausalLM", 2, 1, 4, "float16")
    template = Manifest(kind="kv", block_size=4, model=model, sketch=SketchSpec(dim=8))
    dtype = kv_row_dtype(2, 8)
    rng = np.random.default_rng(0)
    with TraceWriter(path, template) as w:
        for i in range(n):
            rows = np.zeros(2, dtype=dtype)
            rows["sketch"] = rng.standard_normal(rows["sketch"].shape)
            rows["norm"] = 1.0
            w.add(RequestRecord(f"r{i}", float(i), 5, 3, list(range(5)), [7, 8, 9]), rows)
    return path


def test_mooncake_prefix_reuse_matches_the_data_readme(tmp_path: Path) -> None:
    res = memshare("import", "mooncake", str(MOONCAKE), "-o", str(tmp_path / "mc"), "--json")
    assert res.returncode == 0, res.stderr
    reuse = json.loads(res.stdout)["prefix_reuse"]
    assert reuse["policy"] == "prefix" and reuse["block_size"] == 512
    assert round(100 * reuse["token_hit_rate"], 2) == 65.12
    assert round(100 * reuse["block_hit_rate"], 2) == 63.96


def test_demo_runs_on_the_bundled_workload(tmp_path: Path) -> None:
    res = memshare("demo", "--workload", "-o", str(tmp_path / "demo"), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["summary"]["requests"] == 400
    assert report["verify"]["complete"] is True
    assert 0 < report["prefix_reuse"]["token_hit_rate"] < 1


def test_inspect_table_output(tmp_path: Path) -> None:
    res = memshare("inspect", str(kv_trace(tmp_path / "t")))
    assert res.returncode == 0, res.stderr
    assert "requests" in res.stdout and "prefix reuse" in res.stdout


def test_wrong_schema_version(tmp_path: Path) -> None:
    trace = kv_trace(tmp_path / "t")
    m = json.loads((trace / "manifest.json").read_text())
    m["schema_version"] = 99
    (trace / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(memshare("inspect", str(trace)), "manifest.json", "schema_version")


def test_missing_manifest_field(tmp_path: Path) -> None:
    trace = kv_trace(tmp_path / "t")
    m = json.loads((trace / "manifest.json").read_text())
    del m["block_size"]
    (trace / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(memshare("inspect", str(trace)), "manifest.json", "block_size")


def test_truncated_shard(tmp_path: Path) -> None:
    trace = kv_trace(tmp_path / "t")
    (shard,) = trace.glob("kv-*.bin")
    shard.write_bytes(shard.read_bytes()[:-10])
    assert_one_line_error(memshare("inspect", str(trace)), shard.name, "truncated")


def test_flipped_byte_in_shard(tmp_path: Path) -> None:
    trace = kv_trace(tmp_path / "t")
    (shard,) = trace.glob("kv-*.bin")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert_one_line_error(memshare("inspect", str(trace)), shard.name, "checksum")


def test_malformed_csv_row(tmp_path: Path) -> None:
    csv = tmp_path / "azure.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
        "2023-11-16 18:17:04.0319600,lots,8\n"
    )
    res = memshare("import", "azure", str(csv), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "azure.csv", ":3", "ContextTokens")
    assert not (tmp_path / "out").exists()


def test_jsonl_line_that_is_not_json(tmp_path: Path) -> None:
    src = tmp_path / "mc.jsonl"
    src.write_text(MOONCAKE.read_text().splitlines()[0] + "\n{not json\n")
    res = memshare("import", "mooncake", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "mc.jsonl", ":2", "JSON")


def test_directory_that_is_not_a_trace(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(memshare("inspect", str(tmp_path)), str(tmp_path), "not a memshare trace")


def test_bad_option_value_is_one_line(tmp_path: Path) -> None:
    res = memshare("inspect", str(kv_trace(tmp_path / "t")), "--block-size", "0")
    assert_one_line_error(res, "--block-size")
    assert_one_line_error(memshare("import", "nosuch", str(MOONCAKE), "-o", "x"), "nosuch")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = memshare("--debug", "inspect", str(tmp_path / "missing"))
    assert res.returncode != 0 and "Traceback" in res.stderr


@pytest.mark.parametrize("name", ["none", "prefix"])
def test_policies_lists_the_registry(name: str) -> None:
    res = memshare("policies", "--json")
    assert name in json.loads(res.stdout)["policies"]


def test_policies_show_each_parameters_range_and_meaning() -> None:
    from memshare.policies.cf_topk import TAU_MAX

    allowed = json.loads(memshare("policies", "--json").stdout)["allowed"]
    tau = allowed["cf-topk"]["tau"]
    assert tau["default"] == 0.2 and tau["allowed"] == f"0 <= tau <= {TAU_MAX:g}"
    assert "relative sketch distance" in tau["meaning"]
    assert allowed["cf-topk"]["share"]["allowed"] == "one of: kv, k"
    assert allowed["kvsharer"]["layer_map_file"]["allowed"] == "a path"
    assert allowed["none"] == {} and not any("+" in name for name in allowed)
    res = memshare("policies")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "parameters" in text and "one of: kv, k" in text
