"""Simulator parts: option parsing, presets, cost model, decode fast path, config round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memshare.block_pool import BlockPool
from memshare.errors import InputError
from memshare.kv_manager import KVCacheManager
from memshare.registry import make_policy
from memshare.scheduler import Scheduler
from memshare.sim.config import (
    ArrivalSpec,
    CostCoefficients,
    KVBudget,
    SimConfig,
    cost_toml,
    gpu_presets,
    load_cost,
    load_gpu,
    load_model,
    match_model_preset,
    model_presets,
    parse_arrival,
    parse_bytes,
    parse_kv_blocks,
)
from memshare.sim.config_file import read_config
from memshare.sim.cost_model import BatchShape, CostModel
from memshare.sim.engine import Engine
from memshare.sim.options import SimOptions, build_configs, parse_sweep, policy_params
from memshare.sim.run import (
    LoadedTrace,
    requests_csv,
    resolve,
    run_config,
    timeline_csv,
    write_run,
)
from memshare.sim.workload import build_requests
from memshare.traces.schema import Manifest, RequestRecord

WORKLOAD = Manifest(kind="workload", block_size=16)


def records(n: int = 40, seed: int = 0) -> list[RequestRecord]:
    """Requests with shared prefixes (4 system prompts) and varied lengths."""
    out = []
    for i in range(n):
        system = [1000 + i % 4] * (64 + 16 * (i % 4))
        prompt = system + [i] * (10 + (7 * i + seed) % 50)
        out.append(
            RequestRecord(f"r{i}", 0.05 * i, len(prompt), 5 + (11 * i) % 90, prompt_ids=prompt)
        )
    return out


# --------------------------------------------------------------------------- options
def test_parse_arrival() -> None:
    assert parse_arrival("trace") == ArrivalSpec()
    assert parse_arrival("poisson:2.5") == ArrivalSpec("poisson", rate=2.5)
    assert parse_arrival("closed:4") == ArrivalSpec("closed", clients=4)
    for bad in ("poisson", "poisson:-1", "poisson:x", "closed:0", "closed:1.5", "burst:3"):
        with pytest.raises(InputError, match="--arrival"):
            parse_arrival(bad)


def test_parse_bytes_and_blocks() -> None:
    assert parse_bytes("40GiB") == 40 * 2**30
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1e9") == 10**9
    for bad in ("40XB", "GiB", "-3GiB", "0", ""):
        with pytest.raises(InputError, match="--kv-bytes"):
            parse_bytes(bad)
    assert parse_kv_blocks("20000") == (20000, False)
    assert parse_kv_blocks("unlimited") == (None, True)
    with pytest.raises(InputError, match="--kv-blocks"):
        parse_kv_blocks("many")


def test_parse_sweep() -> None:
    spec = parse_sweep("kv-blocks=100,200,400")
    assert spec.key == "kv_blocks" and spec.values == ("100", "200", "400")
    assert parse_sweep("max_num_seqs=8,16").values == (8, 16)
    # a key that is no simulate option is a policy parameter, checked against the policies
    # when the sweep runs (tests/test_sim_cli.py: one line naming --sweep)
    colour = parse_sweep("colour=1,2")
    assert colour.policy_param and colour.values == ("1", "2")
    assert not spec.policy_param
    for bad, needle in (
        ("col our=1,2", "unknown sweep key"),
        ("tau=0.1,0.1", "repeats a value"),
        ("max_num_seqs=8", "fewer than 2"),
        ("max_num_seqs=a,b", "int values"),
        ("kv_blocks", "not key=a,b,c"),
    ):
        with pytest.raises(InputError, match=needle):
            parse_sweep(bad)


def test_presets_and_files(tmp_path: Path) -> None:
    assert {"h100", "h200", "a100-80g", "l4", "cpu"} <= set(gpu_presets())
    assert {"smollm2-135m", "llama-3.1-8b", "qwen2.5-7b", "qwq-32b"} <= set(model_presets())
    smol = load_model("smollm2-135m")
    assert (smol.num_layers, smol.hidden_size, smol.num_kv_heads, smol.head_dim) == (30, 576, 3, 64)
    assert smol.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert match_model_preset("SmolLM2-135M-Instruct") == "smollm2-135m"
    with pytest.raises(InputError, match="--gpu: unknown preset 'tpu'"):
        load_gpu("tpu")
    f = tmp_path / "mine.toml"
    f.write_text("[b200]\npeak_flops = 2.25e15\nmem_bandwidth = 8e12\nmemory = 1000\n")
    assert load_gpu(str(f)).name == "b200"
    cost = tmp_path / "fit.toml"
    cost.write_text("[coefficients]\nstep_overhead_s = 0.01\n")
    assert load_cost(str(cost)).step_overhead_s == 0.01
    fitted = CostCoefficients(gemm_efficiency=0.55, step_overhead_s=0.0042)
    cost.write_text(cost_toml(fitted, "fitted by validate"))
    assert load_cost(str(cost)) == fitted
    cost.write_text("[coefficients]\nwarp_speed = 9\n")
    with pytest.raises(InputError, match="unknown field"):
        load_cost(str(cost))


def test_policy_params_scoping() -> None:
    assert policy_params(("prefix",), ()) == [{}]
    assert policy_params(("none", "prefix"), ("prefix.publish=prompt",)) == [
        {},
        {"publish": "prompt"},
    ]
    assert policy_params(("none", "prefix"), ("publish=prompt",)) == [{}, {"publish": "prompt"}]
    with pytest.raises(InputError, match="no given policy has a parameter"):
        policy_params(("none", "prefix"), ("tau=0.2",))
    with pytest.raises(InputError, match="not run"):
        policy_params(("prefix",), ("none.x=1",))


def test_build_configs_checks_everything(tmp_path: Path) -> None:
    opts = SimOptions(trace=tmp_path, policies=("none", "prefix"))
    configs = build_configs(opts, WORKLOAD)
    assert [c.policy for c in configs] == ["none", "prefix"]
    assert configs[0].model.name == "llama-3.1-8b"  # workload traces name no model
    with pytest.raises(InputError, match="--policy"):
        build_configs(SimOptions(trace=tmp_path, policies=("nope",)), WORKLOAD)
    with pytest.raises(InputError, match="--kv-bytes"):
        build_configs(SimOptions(trace=tmp_path, kv_blocks="10", kv_bytes="1GiB"), WORKLOAD)
    with pytest.raises(InputError, match="--max-num-seqs"):
        build_configs(SimOptions(trace=tmp_path, max_num_seqs=0), WORKLOAD)


def test_kv_budget_resolution() -> None:
    trace = LoadedTrace.of(records(), WORKLOAD)
    base = SimConfig(trace="<memory>", model=load_model("llama-3.1-8b"), block_size=16)
    per_block = base.model.kv_bytes_per_token * 16
    assert resolve(base.with_(kv=KVBudget(bytes=10 * per_block + 5)), trace).num_blocks == 10
    auto = resolve(base, trace).num_blocks
    expect = (base.gpu.memory * 0.9 - base.model.weight_bytes) // per_block
    assert auto == expect
    with pytest.raises(InputError, match="--gpu"):
        resolve(base.with_(model=load_model("qwq-32b"), gpu=load_gpu("l4")), trace)


# --------------------------------------------------------------------------- cost model
def test_cost_model_terms() -> None:
    cfg = SimConfig(trace="x")
    cost = CostModel(cfg.model, cfg.gpu, cfg.cost)
    decode = [
        cost.step_time(BatchShape(1, 1, 1, decode_seqs=1, decode_kv_tokens=c))
        for c in (
            1_000,
            10_000,
            100_000,
        )
    ]
    assert decode[0] < decode[1] < decode[2]  # attention grows with context
    big = BatchShape()
    for _ in range(64):
        big.add(1, 2000, True, decode=True)
    small = BatchShape()
    small.add(1, 2000, True, decode=True)
    assert cost.step_time(big) < 64 * cost.step_time(small)  # weights are read once per step
    prefill = BatchShape()
    prefill.add(8192, 0, True, decode=False)
    b = cost.breakdown(prefill)
    assert b.total_s == pytest.approx(cost.step_time(prefill))
    # a big prefill is compute-bound: linear FLOPs over achieved FLOP/s
    flops = 2 * cfg.model.linear_params * 8192 + 2 * cfg.model.lm_head_params
    assert b.linear_s == pytest.approx(flops / (cfg.gpu.peak_flops * cfg.cost.gemm_efficiency))


# --------------------------------------------------------------------------- engine
def _engine_run(fast: bool, blocks: int, arrival: str) -> tuple[str, str, object, int]:
    trace = LoadedTrace.of(records(60), WORKLOAD)
    cfg = SimConfig(
        trace="<memory>",
        kv=KVBudget(blocks=blocks),
        block_size=16,
        arrival=parse_arrival(arrival),
        model=load_model("smollm2-135m"),
    )
    res = resolve(cfg, trace)
    reqs = build_requests(trace.records, WORKLOAD, 16)
    pool = BlockPool(res.num_blocks)
    mgr = KVCacheManager(pool, make_policy("prefix"), 16)
    engine = Engine(
        reqs,
        Scheduler(cfg.scheduler, mgr, fast_decode=fast),
        CostModel(cfg.model, cfg.gpu, cfg.cost),
        cfg.arrival,
        trace_times=[r.arrival_s for r in trace.records],
        check_invariants=True,
    )
    out = engine.run()
    return timeline_csv(out), requests_csv(out), mgr.stats, out.preemptions


@pytest.mark.parametrize(
    ("blocks", "arrival"),
    [(40, "trace"), (2000, "trace"), (2000, "poisson:30"), (2000, "closed:7"), (40, "closed:7")],
)
def test_decode_fast_path_and_bursts_change_nothing(blocks: int, arrival: str) -> None:
    # The fast path skips manager calls that would do nothing, and quiet decode bursts run
    # several steps at once; with both off every step visits every request. Same files.
    fast, slow = _engine_run(True, blocks, arrival), _engine_run(False, blocks, arrival)
    assert fast == slow
    assert (fast[3] > 0) == (blocks == 40)  # the small budget preempts


def test_config_json_reruns_the_same_run(tmp_path: Path) -> None:
    trace = LoadedTrace.of(records(), WORKLOAD)
    cfg = SimConfig(trace="<memory>", kv=KVBudget(blocks=50), arrival=parse_arrival("poisson:4"))
    first = run_config(cfg, trace)
    write_run(first, tmp_path / "a")
    again = read_config(tmp_path / "a")
    assert again == cfg
    write_run(run_config(again, trace), tmp_path / "b")
    for name in ("metrics.json", "timeline.csv", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["requests"]["finished"] == 40


def test_closed_loop_bounds_concurrency() -> None:
    trace = LoadedTrace.of(records(30), WORKLOAD)
    out = run_config(SimConfig(trace="<memory>", arrival=parse_arrival("closed:3")), trace)
    tl = out.result.timeline
    assert max(r + w for r, w in zip(tl.running, tl.waiting, strict=True)) <= 3
    assert out.metrics["requests"]["finished"] == 30


def test_sim_imports_no_torch() -> None:
    code = (
        "import sys, memshare.sim.run, memshare.sim.study, memshare.sim.report, "
        "memshare.sim.bench, memshare.sim.plots;"
        "bad = {'torch', 'transformers', 'vllm'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
