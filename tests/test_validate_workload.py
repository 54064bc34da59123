"""``memshare validate`` on a workload-only trace: seeded tokens for a Mooncake-format file.

A small Mooncake-format file (real importer, real simulator, the real default model) whose
requests share prefix hash blocks: under ``none``, ``prefix`` and ``kvshare`` the simulator and
the engine must take the same steps on the synthesized tokens, prefix hits and KVShare's reused
tokens must be equal, and a policy that decides on KV is refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import memshare, ok

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # capture/simulate/validate pipelines on the real model

# (hash ids, output tokens): 512 tokens per hash block in the file, 32 after --length-scale
ROWS = [
    ([0, 1, 2, 3], 96),
    ([0, 1, 2, 4], 64),
    ([5, 6, 7], 80),
    ([0, 1, 8, 9], 64),
    ([5, 6, 10], 96),
    ([0, 1, 2, 3], 64),
]
SCALE = "0.0625"


@pytest.fixture(scope="module")
def trace(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("workload")
    src = folder / "mooncake.jsonl"
    src.write_text(
        "".join(
            json.dumps(
                {
                    "timestamp": 1000 * i,
                    "input_length": 512 * len(ids) - 100,
                    "output_length": out,
                    "hash_ids": ids,
                }
            )
            + "\n"
            for i, (ids, out) in enumerate(ROWS)
        )
    )
    out = folder / "trace"
    ok(memshare("import", "mooncake", str(src), "-o", str(out)))
    return out


@pytest.fixture(scope="module")
def validated(trace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runs = tmp_path_factory.mktemp("runs") / "mc"
    pols = [a for p in ("none", "prefix", "kvshare") for a in ("--policy", p)]
    ok(memshare("simulate", str(trace), *pols, "-o", str(runs)))
    rep: dict[str, Any] = json.loads(
        ok(
            memshare(
                "validate", str(runs), "--length-scale", SCALE, "--kv-fraction", "0.4", "--json"
            )
        )
    )
    assert json.loads((runs / "validation.json").read_text()) == rep
    return rep


def test_tokens_are_synthesized_at_the_scale(validated: dict[str, Any]) -> None:
    assert validated["requests"] == len(ROWS)
    assert validated["workload_tokens"]["length_scale"] == float(SCALE)
    assert validated["block_size"] == 16


def test_simulator_and_engine_take_the_same_steps(validated: dict[str, Any]) -> None:
    for name, p in validated["policies"].items():
        assert p["steps_identical"], (name, p["first_differing_step"])
        assert p["at_budget"]["steps_identical"], (name, p["at_budget"]["first_differing_step"])
        assert p["pages_peak"]["predicted"] == p["pages_peak"]["measured"]
        for key in ("prefix_hit_tokens", "reused_tokens", "preemptions", "pages_peak"):
            pm = p["at_budget"][key]
            assert pm["predicted"] == pm["measured"], (name, key, pm)


def test_prefix_hits_and_kvshare_reuse_happen_where_the_hash_ids_say(
    validated: dict[str, Any],
) -> None:
    pol = validated["policies"]
    assert pol["none"]["at_budget"]["prefix_hit_tokens"]["measured"] == 0
    hits = pol["prefix"]["at_budget"]["prefix_hit_tokens"]["measured"]
    # at most 3 shared hash blocks of 32 tokens per request after the first
    assert 0 < hits <= 3 * 32 * (len(ROWS) - 1) and hits % 16 == 0
    assert pol["prefix"]["top1_agreement"] == 1.0 and pol["prefix"]["kl_mean"] == 0.0
    ks = pol["kvshare"]["at_budget"]
    assert ks["prefix_hit_tokens"]["measured"] + ks["reused_tokens"]["measured"] >= hits


def test_policy_deciding_on_kv_is_refused_in_one_line(trace: Path, tmp_path: Path) -> None:
    runs = tmp_path / "cf"
    ok(memshare("simulate", str(trace), "--policy", "cf-topk", "-o", str(runs)))
    res = memshare("validate", str(runs))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "config.json: policy" in res.stderr and "cf-topk" in res.stderr
    assert "Traceback" not in res.stderr
    res = memshare("validate", str(runs.parent / "none-missing"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
