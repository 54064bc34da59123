"""The simulator on the public Mooncake synthetic trace (../shared/data): hit rates, budget
sweeps, determinism and pool invariants under preemption."""

from __future__ import annotations

from pathlib import Path

import pytest

from memshare.sim.config import KVBudget, SchedulerConfig, SimConfig, parse_arrival
from memshare.sim.options import SimOptions, parse_sweep
from memshare.sim.run import LoadedTrace, run_config, write_run
from memshare.sim.study import sweep
from memshare.traces.importers import import_workload

pytestmark = pytest.mark.slow  # simulations of the whole Mooncake trace

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOONCAKE = DATA / "workloads" / "mooncake_synthetic_trace.jsonl"


@pytest.fixture(scope="module")
def mooncake(tmp_path_factory: pytest.TempPathFactory) -> LoadedTrace:
    path = tmp_path_factory.mktemp("mc") / "trace"
    import_workload("mooncake", MOONCAKE, path)
    return LoadedTrace.load(path)


def cfg(trace: LoadedTrace, **kw: object) -> SimConfig:
    return SimConfig(trace=str(trace.path), policy="prefix", **kw)  # type: ignore[arg-type]


def test_prefix_unlimited_one_client_matches_the_data_readme(mooncake: LoadedTrace) -> None:
    # The data README's figure: every request sees all earlier requests' blocks. One closed-loop
    # client runs the requests one after the other in trace order, so that holds exactly.
    out = run_config(
        cfg(mooncake, kv=KVBudget(unlimited=True), arrival=parse_arrival("closed:1")), mooncake
    )
    pc = out.metrics["prefix_cache"]
    assert round(100 * pc["token_hit_rate"], 2) == 65.12
    assert round(100 * pc["block_hit_rate"], 2) == 63.96
    assert (
        out.metrics["preemptions"] == 0
        and pc["all_admissions"]["token_hit_rate"] == (pc["token_hit_rate"])
    )


def test_prefix_unlimited_trace_timestamps(mooncake: LoadedTrace) -> None:
    # With the trace's own timestamps and real concurrency the figure is the same, 65.12% /
    # 63.96%. One might expect less (a request admitted before an earlier one with the same
    # prefix has published its blocks), but that cannot happen here: blocks are published when
    # they are allocated, at scheduling, as in vLLM v1; running requests are scheduled before
    # waiting ones; so a waiting request is admitted only in a step whose token budget was not
    # used up, i.e. after every earlier request has had its whole prompt scheduled.
    out = run_config(cfg(mooncake, kv=KVBudget(unlimited=True)), mooncake)
    pc = out.metrics["prefix_cache"]
    assert round(100 * pc["token_hit_rate"], 2) == 65.12
    assert round(100 * pc["block_hit_rate"], 2) == 63.96
    # Capping a request's chunk (vLLM's long_prefill_token_threshold) breaks that: the budget
    # can be left over while an earlier request is mid-prefill, so a later request sharing its
    # prefix is admitted before those blocks exist. Measured: 64.17% of tokens at 512.
    capped = run_config(
        cfg(
            mooncake,
            kv=KVBudget(unlimited=True),
            scheduler=SchedulerConfig(long_prefill_token_threshold=512),
        ),
        mooncake,
    )
    assert capped.metrics["prefix_cache"]["token_hit_rate"] < pc["token_hit_rate"]


def test_hit_rate_never_rises_as_the_budget_shrinks(mooncake: LoadedTrace, tmp_path: Path) -> None:
    opts = SimOptions(trace=mooncake.path, policies=("prefix",), limit=1000)
    result = sweep(opts, parse_sweep("kv_blocks=8000,4000,2000,1000,500"), tmp_path / "sw")
    rates = [runs[0].out.metrics["prefix_cache"] for _, runs in result.points]
    tokens = [r["token_hit_rate"] for r in rates]
    blocks = [r["block_hit_rate"] for r in rates]
    assert tokens == sorted(tokens, reverse=True) and tokens[0] > tokens[-1]
    assert blocks == sorted(blocks, reverse=True) and blocks[0] > blocks[-1]
    preemptions = [runs[0].out.metrics["preemptions"] for _, runs in result.points]
    assert preemptions[-1] > 0  # the small budgets do preempt
    # Counted over every admission (as vLLM's metric does), the rate can rise as the budget
    # shrinks: a preempted request's recompute hits its own blocks. That is why the headline
    # rate counts each request once, at its first admission.
    assert (tmp_path / "sw" / "sweep.csv").read_text().count("\n") == 6
    assert (tmp_path / "sw" / "kv_blocks=500" / "prefix" / "metrics.json").is_file()


def test_same_inputs_and_seed_give_identical_files(mooncake: LoadedTrace, tmp_path: Path) -> None:
    def go(seed: int, name: str) -> Path:
        c = cfg(
            mooncake,
            kv=KVBudget(blocks=600),
            arrival=parse_arrival("poisson:3"),
            seed=seed,
            limit=300,
        )
        write_run(run_config(c, mooncake), tmp_path / name)
        return tmp_path / name

    a, b, c = go(7, "a"), go(7, "b"), go(8, "c")
    for name in ("metrics.json", "timeline.csv", "requests.csv", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "timeline.csv").read_bytes() != (c / "timeline.csv").read_bytes()


def test_pool_invariants_hold_every_step_under_preemption(mooncake: LoadedTrace) -> None:
    out = run_config(
        cfg(mooncake, kv=KVBudget(blocks=300), limit=120, check_invariants=True), mooncake
    )
    assert out.metrics["preemptions"] > 0
    assert out.metrics["requests"]["finished"] + out.metrics["requests"]["rejected"] == 120
