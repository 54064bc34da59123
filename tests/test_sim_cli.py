"""``memshare simulate`` / ``sweep`` / ``bench sim`` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from helpers_cli import assert_one_line_error, memshare, ok
from test_hardening import smol_kv_trace

from memshare.cli import app
from memshare.commands.options import SimArgs
from memshare.sim.options import SimOptions
from memshare.traces.importers import import_workload
from memshare.traces.schema import Manifest, ModelInfo, RequestRecord, SketchSpec, kv_row_dtype
from memshare.traces.writer import TraceWriter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOONCAKE = DATA / "workloads" / "mooncake_synthetic_trace.jsonl"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mc") / "mc200"
    import_workload("mooncake", MOONCAKE, path, limit=200)
    return path


def test_simulate_two_policies_writes_runs_table_and_plots(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    res = memshare(
        "simulate", str(small), "--policy", "none", "--policy", "prefix",
        "--kv-blocks", "400", "--plot", "-o", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "prefix hit rate (tokens)" in res.stdout and "none" in res.stdout
    for policy in ("none", "prefix"):
        for name in ("config.json", "metrics.json", "timeline.csv", "requests.csv", "perf.json"):
            assert (out / policy / name).is_file(), (policy, name)
    for png in ("kv_blocks.png", "ttft_cdf.png", "tpot_cdf.png", "throughput.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    comparison = json.loads((out / "comparison.json").read_text())["policies"]
    assert comparison["none"]["prefix_cache"]["hit_tokens"] == 0
    assert comparison["prefix"]["prefix_cache"]["hit_tokens"] > 0
    header = (out / "prefix" / "timeline.csv").read_text().splitlines()[0]
    assert header.startswith("step,time_s,dt_s,running,waiting")


def test_simulate_json_one_policy(small: Path, tmp_path: Path) -> None:
    res = memshare(
        "simulate", str(small), "--gpu", "h200", "--model-config", "qwen2.5-7b",
        "--arrival", "poisson:2.0", "--limit", "50", "--kv-bytes", "20GiB",
        "-o", str(tmp_path / "r"), "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    (run,) = report["runs"]
    assert run["policy"] == "prefix" and run["metrics"]["requests"]["total"] == 50
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["config"]["gpu"]["name"] == "h200"
    assert cfg["config"]["arrival"] == {"mode": "poisson", "rate": 2.0, "clients": None}
    per_block = 2 * 28 * 4 * 128 * 2 * 512  # qwen2.5-7b K+V bytes per 512-token block
    assert cfg["resolved"]["num_blocks"] == 20 * 2**30 // per_block


def test_sweep_command_table_and_plot(small: Path, tmp_path: Path) -> None:
    res = memshare(
        "sweep", str(small), "kv_blocks=150,300,600", "--limit", "100", "--plot",
        "-o", str(tmp_path / "sw"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "memshare sweep kv_blocks" in res.stdout
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"]
    assert [r["kv_blocks"] for r in rows] == ["150", "300", "600"]
    same = memshare("simulate", str(small), "--sweep", "kv_blocks=150,300", "--limit", "20",
                    "-o", str(tmp_path / "sw2"), "--json")  # fmt: skip
    assert same.returncode == 0, same.stderr
    assert len(json.loads(same.stdout)["rows"]) == 2


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--gpu", "tpu9"], ["--gpu", "unknown preset 'tpu9'", "h100"]),
        (["--arrival", "poisson:fast"], ["--arrival", "poisson:RATE"]),
        (["--kv-bytes", "40XB"], ["--kv-bytes", "'40XB' is not a size", "40GiB"]),
        (["--sweep", "colour=1,2"], ["--sweep", "unknown sweep key 'colour'"]),
        (["--policy", "magic"], ["--policy", "unknown policy 'magic'"]),
        (["--model-config", "gpt-9"], ["--model-config", "unknown preset"]),
        (["--kv-blocks", "lots"], ["--kv-blocks", "not a positive integer"]),
        (["--set", "tau"], ["--set", "not key=value"]),
        (["--limit", "abc"], ["--limit", "memshare simulate --help"]),
    ],
)
def test_bad_options_are_one_line_errors(small: Path, args: list[str], needles: list[str]) -> None:
    res = memshare("simulate", str(small), *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["max_num_seqs=8,16", "--gpu", "tpu9"], ["--gpu", "unknown preset 'tpu9'"]),
        (["max_num_seqs=8,16", "--kv-bytes", "40XB"], ["--kv-bytes", "'40XB' is not a size"]),
        (["max_num_seqs=8,16", "--policy", "magic"], ["--policy", "unknown policy 'magic'"]),
        (["max_num_seqs=8,16", "--set", "tau"], ["--set", "not key=value"]),
        (["max_num_seqs=8,16", "--limit", "abc"], ["--limit", "memshare sweep --help"]),
        (["seed=1,2", "--sweep", "seed=3,4"], ["No such option: --sweep"]),
        (["colour=1,2"], ["unknown sweep key 'colour'"]),
        (["kv_blocks=lots,10"], ["--kv-blocks", "not a positive integer"]),
        ([], ["Missing argument 'KEY=A,B,C'"]),
    ],
)
def test_sweep_bad_options_are_one_line_errors(
    small: Path, args: list[str], needles: list[str]
) -> None:
    res = memshare("sweep", str(small), *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # a second --sweep was dropped silently
        (["--sweep", "seed=1,2", "--sweep", "seed=3,4"], ["--sweep", "given 2 times", "seed=3,4"]),
        # the swept key also given as --set (or as its option) was silently overridden
        (["--sweep", "tau=0.1,0.3", "--policy", "cf-topk", "--set", "tau=0.5"],
         ["--set tau=0.5", "--sweep tau=0.1,0.3"]),
        (["--sweep", "tau=0.1,0.3", "--policy", "cf-topk", "--policy", "prefix",
          "--set", "cf-topk.tau=0.5"], ["--set cf-topk.tau=0.5", "--sweep tau=0.1,0.3"]),
        (["--sweep", "seed=1,2", "--seed", "7"], ["--seed 7", "--sweep seed=1,2"]),
        (["--sweep", "kv_bytes=1GiB,2GiB", "--kv-blocks", "5"],
         ["--kv-blocks 5", "--sweep kv_bytes=1GiB,2GiB"]),
        # empty values were dropped
        (["--sweep", "tau=0.1,", "--policy", "cf-topk"],
         ["--sweep tau=0.1,", "value 2 of 2 is empty"]),
        (["--sweep", "tau="], ["--sweep tau=", "no values"]),
        # a swept value's error named --set or the option, not the sweep typed
        (["--sweep", "tau=0.1,1e308", "--policy", "cf-topk"],
         ["--sweep tau=0.1,1e308", "tau=1e308 is outside", "tau <= 100"]),
        (["--sweep", "block_size=0,16"], ["--sweep block_size=0,16", "--block-size", "got 0"]),
    ],
)  # fmt: skip
def test_simulate_sweep_defects_name_the_sweep(
    small: Path, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    res = memshare("simulate", str(small), *args, "-o", str(tmp_path / "o"))
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["tau=0.1,0.3", "--policy", "cf-topk", "--set", "tau=0.5"],
         ["--set tau=0.5", "KEY=A,B,C tau=0.1,0.3"]),
        (["kv_blocks=10,20", "--kv-blocks", "5"], ["--kv-blocks 5", "KEY=A,B,C kv_blocks=10,20"]),
        (["tau=0.1,,0.2", "--policy", "cf-topk"],
         ["KEY=A,B,C tau=0.1,,0.2", "value 2 of 3 is empty"]),
        (["tau=", "--policy", "cf-topk"], ["KEY=A,B,C tau=", "no values"]),
        (["tau=0.1,nan", "--policy", "cf-topk"],
         ["KEY=A,B,C tau=0.1,nan", "tau=nan is not a finite number"]),
        (["limit=0,5"], ["KEY=A,B,C limit=0,5", "--limit must be >= 1, got 0", "leave it out"]),
        (["block_size=16,1000000"], ["KEY=A,B,C block_size=16,1000000", "131,072"]),
        (["seed=-1,2", "--arrival", "poisson:2"], ["KEY=A,B,C seed=-1,2", "--seed", "got -1"]),
        (["gpu_memory_utilization=nan,0.5"], ["gpu_memory_utilization=nan", "got nan"]),
        (["colour=1,2"], ["KEY=A,B,C colour=1,2", "unknown sweep key 'colour'"]),
    ],
)  # fmt: skip
def test_sweep_defects_name_the_key_values_argument(
    small: Path, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    res = memshare("sweep", str(small), *args, "-o", str(tmp_path / "o"))
    assert_one_line_error(res, *needles)
    assert "--sweep" not in res.stderr and ("--set" in needles[0]) == ("--set" in res.stderr)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--kv-bytes", "1e400GiB"], ["--kv-bytes", "too large", "not a finite number", "40GiB"]),
        (["--kv-bytes", "0"], ["--kv-bytes", "'0' is zero", "size > 0"]),
        (["--kv-blocks", "0"], ["--kv-blocks", "not a positive integer"]),
        (["--gpu-memory-utilization", "nan"], ["--gpu-memory-utilization", "(0, 1], got nan"]),
        (["--gpu-memory-utilization", "1e-300"], ["--gpu-memory-utilization", "1e-300"]),
        (["--time-scale", "nan"], ["--time-scale", "finite number > 0, got nan"]),
        (["--time-scale", "-1"], ["--time-scale", "> 0, got -1"]),
        (["--arrival", "poisson:inf"], ["--arrival", "rate must be a number > 0"]),
        (["--arrival", "closed:0"], ["--arrival", "clients must be an integer > 0"]),
        (["--max-num-batched-tokens", "0"], ["--max-num-batched-tokens", "> 0"]),
        (["--max-num-seqs", "-1"], ["--max-num-seqs", "> 0"]),
        (["--long-prefill-threshold", "-1"], ["--long-prefill-threshold", ">= 0"]),
        (["--limit", "0"], ["--limit: must be >= 1, got 0; leave it out"]),
        (["--limit", "-3"], ["--limit: must be >= 1, got -3; leave it out"]),
        (["--block-size", "0"], ["--block-size", "1..131,072", "got 0"]),
        (["--block-size", "100000000"], ["--block-size", "1..131,072", "got 1"]),
        (["--seed", "-1", "--arrival", "poisson:2"], ["--seed", "got -1"]),
    ],
)
def test_bad_numbers_are_refused_naming_the_option_and_range(
    small: Path, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    res = memshare("simulate", str(small), *args, "-o", str(tmp_path / "o"))
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "o").exists()


def test_a_block_larger_than_the_free_memory_names_the_block_size(tmp_path: Path) -> None:
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "output_len": 3}\n')
    ok(memshare("import", "tokens", str(ids), "-o", str(tmp_path / "t")))
    # llama-3.1-8b: 128 KiB a token, so 16 GiB a 131,072-token block; an L4 leaves 6.6 GiB
    res = memshare("simulate", str(tmp_path / "t"), "--block-size", "131072", "--gpu", "l4")
    assert_one_line_error(res, "--block-size", "131,072 tokens", "16.0 GiB", "6.6 GiB left on l4")
    ok(memshare("simulate", str(tmp_path / "t"), "--block-size", "16", "--gpu", "l4",
                "-o", str(tmp_path / "o")))  # fmt: skip


def test_study_tau_is_checked_as_cf_topk_checks_it(tmp_path: Path) -> None:
    kv = smol_kv_trace(tmp_path / "kv")
    for tau, needle in (("nan", "not a finite number"), ("1e308", "outside"), ("-1", "outside")):
        res = memshare("study", str(kv), "--tau", tau, "-o", str(tmp_path / "s"))
        assert_one_line_error(res, "--tau: cf-topk tau=", needle, "e.g. tau=0.2")
    assert not (tmp_path / "s").exists()


def _described(param: Any) -> dict[str, Any]:
    """A click parameter as comparable values: flags, default, help, type, arity, ..."""
    public = {k: v for k, v in vars(param).items() if not k.startswith("_")}
    public.pop("callback")  # typer wraps each command's callbacks anew
    public["type_descriptor"] = param.type_descriptor.annotation  # its info object is a copy
    return {"kind": type(param).__name__, **public}


def test_sweep_takes_every_simulate_option_with_its_help_and_default() -> None:
    # sweep = simulate - its --sweep option + the positional KEY=A,B,C, in the same order
    # and each parameter the same in every respect (a missing option or default drifts here)
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    simulate = [_described(p) for p in commands["simulate"].params]
    sweep = [_described(p) for p in commands["sweep"].params]
    assert [p["name"] for p in simulate if p["name"] != "sweep"] == [
        p["name"] for p in sweep if p["name"] != "param"
    ]
    by_name = {p["name"]: p for p in sweep}
    for p in simulate:
        if p["name"] != "sweep":
            assert by_name[p["name"]] == p, p["name"]
    assert by_name["param"]["kind"] == "TyperArgument" and by_name["param"]["required"]
    arguments = [p["name"] for p in sweep if p["kind"] == "TyperArgument"]
    assert arguments == ["trace", "param"]  # TRACE KEY=A,B,C, in that order
    shared = {f.name for f in fields(SimArgs)}
    assert shared <= {p["name"] for p in simulate}
    assert shared == {f.name for f in fields(SimOptions)}


def test_cli_defaults_are_the_library_defaults() -> None:
    # every option left out on the command line means what SimOptions means by default
    assert SimArgs(trace=Path("t")).options() == SimOptions(trace=Path("t"))
    given = SimArgs(trace=Path("t"), policies=["none", "prefix"], sets=["k=1"], seed=7)
    assert given.options() == SimOptions(
        trace=Path("t"), policies=("none", "prefix"), sets=("k=1",), seed=7
    )
    assert SimArgs(trace=Path("t")).notice is not None and given.notice is None


def test_sweep_and_simulate_run_the_same_configs(small: Path, tmp_path: Path) -> None:
    # every simulate option set away from its default, once through sweep, once per value
    # through simulate: each point's config, metrics and per-request rows are the same files
    cost = tmp_path / "cost.toml"
    cost.write_text("[coefficients]\nstep_overhead_s = 0.004\n")
    common = [
        "--policy", "none", "--policy", "prefix", "--set", "prefix.publish=all",
        "--gpu-memory-utilization", "0.8", "--block-size", "256", "--gpu", "h200",
        "--model-config", "qwen2.5-7b", "--cost-model", str(cost), "--arrival", "poisson:4",
        "--limit", "60", "--time-scale", "2", "--seed", "3", "--max-num-batched-tokens", "4096",
        "--max-num-seqs", "16", "--no-chunked-prefill", "--long-prefill-threshold", "128",
    ]  # fmt: skip
    swept = tmp_path / "sweep"
    res = memshare("sweep", str(small), "kv_blocks=150,300", *common, "-o", str(swept), "--json")
    assert res.returncode == 0, res.stderr
    for blocks in ("150", "300"):
        one = tmp_path / f"simulate{blocks}"
        res = memshare("simulate", str(small), "--kv-blocks", blocks, *common, "-o", str(one))
        assert res.returncode == 0, res.stderr
        for policy in ("none", "prefix"):
            for name in ("config.json", "metrics.json", "requests.csv"):
                a = swept / f"kv_blocks={blocks}" / policy / name
                assert a.read_bytes() == (one / policy / name).read_bytes(), (blocks, a)
        cfg = json.loads((one / "prefix" / "config.json").read_text())["config"]
        assert cfg["kv"] == {
            "blocks": int(blocks), "bytes": None, "unlimited": False,
            "gpu_memory_utilization": 0.8,
        }  # fmt: skip
        assert cfg["scheduler"] == {
            "max_num_batched_tokens": 4096, "max_num_seqs": 16,
            "enable_chunked_prefill": False, "long_prefill_token_threshold": 128,
            "reserve_full_prompt": True,
        }  # fmt: skip
        assert (cfg["policy_params"], cfg["gpu"]["name"], cfg["model"]["name"]) == (
            {"publish": "all"}, "h200", "qwen2.5-7b"
        )  # fmt: skip
        assert cfg["arrival"] == {"mode": "poisson", "rate": 4.0, "clients": None}
        assert cfg["cost"]["step_overhead_s"] == 0.004
        assert (cfg["block_size"], cfg["limit"], cfg["time_scale"], cfg["seed"]) == (
            256, 60, 2.0, 3
        )  # fmt: skip


def test_bad_trace_dir_is_a_one_line_error(tmp_path: Path) -> None:
    for trace in (tmp_path / "missing", tmp_path):
        res = memshare("simulate", str(trace))
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert str(trace) in res.stderr


def test_kv_trace_with_sketches_runs_every_layer(tmp_path: Path) -> None:
    # A trace with sketches: the pool tracks the model's layers; its model must match.
    model = ModelInfo("SmolLM2-135M-Instruct", "LlamaForCausalLM", 30, 3, 64, "bfloat16")
    template = Manifest(kind="kv", block_size=4, model=model, sketch=SketchSpec(dim=8))
    dtype = kv_row_dtype(30, 8)
    rng = np.random.default_rng(0)
    with TraceWriter(tmp_path / "kv", template) as w:
        for i in range(4):
            rows = np.zeros(3, dtype=dtype)
            rows["sketch"] = rng.standard_normal(rows["sketch"].shape)
            rows["norm"] = 1.0
            prompt = [1, 2, 3, 4, 5, 6, 7, 8]
            w.add(RequestRecord(f"r{i}", float(i), 8, 4, prompt, [9, 9, 9, 9]), rows)
    res = memshare("simulate", str(tmp_path / "kv"), "-o", str(tmp_path / "out"), "--json")
    assert res.returncode == 0, res.stderr
    run = json.loads(res.stdout)["runs"][0]
    # r1..r3 hit r0's first block: 8 prompt tokens, 2 whole blocks, looked up within 7 tokens
    assert run["metrics"]["prefix_cache"]["hit_blocks"] == 3 * 1
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["config"]["model"]["name"] == "smollm2-135m"
    assert cfg["resolved"]["pool_layers"] == 30
    bad = memshare("simulate", str(tmp_path / "kv"), "--model-config", "llama-3.1-8b")
    assert bad.returncode == 2 and "--model-config" in bad.stderr


def test_bench_sim_prints_figures(small: Path) -> None:
    res = memshare("bench", "sim", str(small), "--sizes", "5,20", "--steps", "30", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["trace_run"]["requests"] == 200 and report["trace_run"]["sim_per_wall"] > 0
    assert [c["running"] for c in report["per_step"]] == [5, 20]
