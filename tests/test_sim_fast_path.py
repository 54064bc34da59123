"""The simulator's shortcuts change no result: the fast path (decode fast path, decode bursts
across block boundaries and finishes, whole-block pool accounting, policies not asked where
they would answer nothing) against the plain path (``run_config(..., plain=True)``: every
step through ``schedule``/``complete``, every page counted, every full block reported), on
real workloads (the bundled Mooncake slice, Azure conversation rows from ../shared/data) and
on a kv trace under sharing policies. Same config, metrics, timeline and request files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from memshare.scheduler import SchedulerConfig
from memshare.sim.config import (
    CostCoefficients,
    KVBudget,
    SimConfig,
    gpu_presets,
    load_gpu,
    load_model,
    model_presets,
    parse_arrival,
)
from memshare.sim.cost_model import BatchShape, CostModel
from memshare.sim.run import (
    LoadedTrace,
    RunOutput,
    config_json,
    requests_csv,
    run_config,
    timeline_csv,
)
from memshare.traces.importers import import_workload
from memshare.traces.schema import Manifest, ModelInfo, RequestRecord, SketchSpec, kv_row_dtype
from memshare.traces.writer import TraceWriter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AZURE_CONV = DATA / "workloads" / "azure_llm_2023_conv.csv"
MOONCAKE_DEMO = Path(__file__).resolve().parents[1] / "memshare" / "data" / "mooncake_demo.jsonl"


def files(out: RunOutput) -> tuple[str, str, str, str]:
    """What a run directory holds but ``perf.json`` (wall time)."""
    return (
        json.dumps(config_json(out), sort_keys=True),
        json.dumps(out.metrics, sort_keys=True),
        timeline_csv(out.result),
        requests_csv(out.result),
    )


def both(cfg: SimConfig, trace: LoadedTrace) -> RunOutput:
    """Run ``cfg`` on both paths, assert identical files; return the fast run."""
    fast = run_config(cfg, trace)
    plain = run_config(cfg, trace, plain=True)
    for got, want, name in zip(
        files(fast), files(plain), ("config", "metrics", "timeline", "requests"), strict=True
    ):
        assert got == want, f"{name} differs between the fast and the plain path"
    return fast


@pytest.fixture(scope="module")
def mooncake(tmp_path_factory: pytest.TempPathFactory) -> LoadedTrace:
    path = tmp_path_factory.mktemp("mc") / "trace"
    import_workload("mooncake", MOONCAKE_DEMO, path, limit=150)
    return LoadedTrace.load(path)


@pytest.fixture(scope="module")
def azure(tmp_path_factory: pytest.TempPathFactory) -> LoadedTrace:
    path = tmp_path_factory.mktemp("az") / "trace"
    import_workload("azure", AZURE_CONV, path, limit=250)
    return LoadedTrace.load(path)


@pytest.mark.parametrize("policy", ["none", "prefix"])
@pytest.mark.parametrize(
    ("blocks", "arrival"),
    [(120, "trace"), (None, "trace"), (300, "closed:6"), (None, "poisson:3")],
)
def test_mooncake_fast_and_plain_paths_give_the_same_files(
    mooncake: LoadedTrace, policy: str, blocks: int | None, arrival: str
) -> None:
    kv = KVBudget(unlimited=True) if blocks is None else KVBudget(blocks=blocks)
    cfg = SimConfig(trace=str(mooncake.path), policy=policy, kv=kv, arrival=parse_arrival(arrival))
    out = both(cfg, mooncake)
    assert out.metrics["requests"]["finished"] == 150
    if blocks == 120:  # the tight budget preempts: bursts must stop before a preemption
        assert out.metrics["preemptions"] > 0


@pytest.mark.parametrize("policy", ["none", "prefix"])
@pytest.mark.parametrize(
    ("blocks", "arrival"),
    [(400, "trace"), (None, "trace"), (3000, "poisson:2"), (None, "closed:9")],
)
def test_azure_fast_and_plain_paths_give_the_same_files(
    azure: LoadedTrace, policy: str, blocks: int | None, arrival: str
) -> None:
    # block size 16 and many requests in flight: bursts cross block boundaries and finishes
    kv = KVBudget(unlimited=True) if blocks is None else KVBudget(blocks=blocks)
    cfg = SimConfig(trace=str(azure.path), policy=policy, kv=kv, arrival=parse_arrival(arrival))
    out = both(cfg, azure)
    assert out.metrics["requests"]["finished"] == 250
    if blocks == 400:
        assert out.metrics["preemptions"] > 0


@pytest.mark.parametrize("policy", ["none", "prefix"])
@pytest.mark.parametrize("budget", [600, 2048])
def test_azure_small_token_budget_gives_the_same_files(
    azure: LoadedTrace, policy: str, budget: int
) -> None:
    # a token budget that arrivals fill: the step a burst hands over admits with the budget
    # its decodes (chunks and compact decodes alike) leave, and long prompts are chunked
    cfg = SimConfig(
        trace=str(azure.path),
        policy=policy,
        arrival=parse_arrival("poisson:4"),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget),
    )
    out = both(cfg, azure)
    assert out.metrics["requests"]["finished"] == 250


@pytest.mark.parametrize("model", model_presets())
@pytest.mark.parametrize("gpu", gpu_presets())
def test_decode_step_time_is_the_cost_models_to_the_bit(model: str, gpu: str) -> None:
    # bursts time their steps with decode_time; a step's duration must be the very float
    # step_time gives the same batch shape (timeline.csv prints it to 9 decimals)
    cost = CostModel(load_model(model), load_gpu(gpu), CostCoefficients())
    for r in (1, 2, 7, 64, 255, 256, 1000):
        for kv in (r, r * 17 + 3, r * 4096 + 11, 10**7 + r):
            shape = BatchShape(r, r, r, decode_seqs=r, decode_kv_tokens=kv)
            assert cost.decode_time(r, kv) == cost.step_time(shape)


@pytest.fixture(scope="module")
def kv_trace(tmp_path_factory: pytest.TempPathFactory) -> LoadedTrace:
    """A kv trace shaped like the default model's: 10 requests in flight together, whose
    blocks repeat two patterns (with noise), so sharing policies find shares while the
    others decode; blocks of 4 tokens, so decodes cross block boundaries often."""
    path = tmp_path_factory.mktemp("kv") / "kv"
    model = ModelInfo("SmolLM2-135M-Instruct", "LlamaForCausalLM", 30, 3, 64, "bfloat16")
    template = Manifest(kind="kv", block_size=4, model=model, sketch=SketchSpec(dim=8))
    rng = np.random.default_rng(0)
    pattern = rng.standard_normal((2, 30, 2, 8)).astype(np.float32)
    with TraceWriter(path, template) as w:
        for i in range(10):
            out = 40 + 3 * i  # staggered finishes
            rows = np.zeros(-(-(8 + out) // 4), dtype=kv_row_dtype(30, 8))
            for b in range(len(rows)):  # reasoning steps of 8 tokens: two blocks each
                rows["sketch"][b] = pattern[b % 2] + 0.01 * rng.standard_normal((30, 2, 8))
            rows["norm"] = np.linalg.norm(rows["sketch"].astype(np.float32), axis=-1)
            prompt = [1, 2, 3, 4, 5 + i % 2, 6, 7, 8]
            output = [11 + j % 8 for j in range(out)]
            steps = list(range(8, 8 + out, 8))
            w.add(RequestRecord(f"r{i}", 0.01 * i, 8, out, prompt, output, steps=steps), rows)
    return LoadedTrace.load(path)


@pytest.mark.parametrize(
    ("policy", "params"),
    [
        ("none", {}),
        ("prefix", {}),
        ("exact-dedup", {}),
        ("cf-topk", {"granularity": "layer", "share": "k", "tau": 0.5, "window": 1}),
        ("prefix+cf-topk", {"tau": 0.5, "window": 1}),
    ],
)
@pytest.mark.parametrize("blocks", [None, 60])
def test_kv_trace_fast_and_plain_paths_give_the_same_files(
    kv_trace: LoadedTrace, policy: str, params: dict[str, object], blocks: int | None
) -> None:
    trace = kv_trace
    kv = KVBudget(unlimited=True) if blocks is None else KVBudget(blocks=blocks)
    cfg = SimConfig(
        trace=str(trace.path),
        policy=policy,
        policy_params=params,
        kv=kv,
        model=load_model("smollm2-135m"),
    )
    out = both(cfg, trace)
    if policy.endswith("cf-topk"):  # page-level shares: the pool switches to page accounting
        assert out.metrics["sharing"]["pages_shared"] > 0
