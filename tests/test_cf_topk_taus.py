"""cf-topk's per-layer, per-part thresholds (``--set tau_layers=...``).

Driven through the real manager on the seeded chains of test_cf_topk_reference (many
distances near tau): a table that gives every page the same threshold decides exactly as the
single ``tau`` does; an ``off`` page never shares; every shared layer's distance (reported
in its own threshold's units) lies within that layer's threshold; and bad specs are one
line naming the entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import assert_one_line_error, memshare
from test_cf_topk_reference import drive, make_req, same

from memshare.errors import InputError
from memshare.policies.cf_topk import CfTopK
from memshare.policies.cf_topk_taus import OFF, parse_spec, table


def _reqs(seed: int, tau: float, d: int = 64) -> list:  # type: ignore[type-arg]
    rng = np.random.default_rng([11, seed])
    return [make_req(rng, d, np.float16, tau) for _ in range(3)]


@pytest.mark.parametrize("granularity", ["layer", "block"])
@pytest.mark.parametrize("share", ["k", "kv"])
@pytest.mark.parametrize("tau", [0.0, 0.3, 1.2])
def test_a_uniform_table_decides_as_one_tau(granularity: str, share: str, tau: float) -> None:
    reqs = _reqs(int(tau * 10), tau)
    base = {"granularity": granularity, "share": share, "k": 3, "window": 1}
    want, want_stats = drive(CfTopK(tau=tau, **base), reqs)  # type: ignore[arg-type]
    got, got_stats = drive(CfTopK(tau=0.05, tau_layers=f"*:{tau}", **base), reqs)  # type: ignore[arg-type]
    assert len(want) > 3
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert same(a, b), (a, b)
    assert got_stats.pages_shared == want_stats.pages_shared


@pytest.mark.parametrize("share", ["k", "kv"])
def test_off_pages_never_share_and_each_layer_keeps_its_threshold(share: str) -> None:
    reqs = _reqs(5, 0.4)
    spec = "*:0.4,1:off,3:0.2" if share == "k" else "*:0.4,v1:off,3:0.2"
    policy = CfTopK(granularity="layer", share=share, k=3, window=1, tau=0.4, tau_layers=spec)  # type: ignore[arg-type]
    got, stats = drive(policy, reqs)
    uniform, _ = drive(CfTopK(granularity="layer", share=share, k=3, window=1, tau=0.4), reqs)  # type: ignore[arg-type]
    shares = [d for d in got if d.share_mask is not None]
    assert shares, "the data must give the check something to compare"
    limit = np.array([0.4, 0.0, 0.4, 0.2, 0.4])  # layer 1 off (both parts under kv)
    for d in shares:
        assert d.share_mask is not None and d.layer_distance is not None
        assert not d.share_mask[1].any()
        shared = d.share_mask.any(axis=1)
        assert np.all(d.layer_distance[shared] <= limit[shared] * (1 + 1e-6))
        assert np.all(np.isnan(d.layer_distance[~shared]))
    assert stats.layer_pages_shared is not None
    assert stats.layer_pages_shared[1].sum() == 0
    base = [d for d in uniform if d.share_mask is not None]
    assert any(d.share_mask is not None and d.share_mask[1].any() for d in base)  # it did


def test_spec_entries_apply_in_order() -> None:
    t = table(parse_spec("*:0.5,k0-1:off,v2:0,4:0.25", 100.0), 0.2, 5)
    assert t.tolist() == [
        [OFF, 0.5],
        [OFF, 0.5],
        [0.5, 0.0],
        [0.5, 0.5],
        [0.25, 0.25],
    ]
    assert table(parse_spec("3:0.1", 100.0), 0.2, 5)[:, 0].tolist() == [0.2, 0.2, 0.2, 0.1, 0.2]


def test_a_file_gives_one_threshold_per_layer_and_part(tmp_path: Path) -> None:
    f = tmp_path / "taus.json"
    f.write_text(json.dumps({"k": [0.1, None, 0.3], "v": [0.2, 0.2, None]}))
    t = table(parse_spec(f"@{f}", 100.0), 0.9, 3)
    assert t.tolist() == [[0.1, 0.2], [OFF, 0.2], [0.3, OFF]]


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("0-9", "'0-9'"),
        ("x3:0.2", "'x3:0.2'"),
        ("5-2:0.1", "'5-2:0.1'"),
        ("3:nan", "'3:nan'"),
        ("3:-1", "'3:-1'"),
        ("3:101", "'3:101'"),
        ("@/no/such/file.json", "does not exist"),
    ],
)
def test_bad_specs_name_the_entry(spec: str, names: str) -> None:
    with pytest.raises(InputError) as e:
        CfTopK(tau_layers=spec)
    assert names in str(e.value) and "tau_layers" in str(e.value)


def test_a_layer_past_the_model_is_one_line(smol: Path, tmp_path: Path) -> None:
    r = memshare(
        "simulate", str(smol), "--policy", "cf-topk", "--set", "granularity=layer",
        "--set", "tau_layers=0-99:0.3", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert_one_line_error(r, "tau_layers")
    assert "layer 99" in r.stderr and not (tmp_path / "out").exists()


def test_simulate_passes_a_table_to_the_policy(smol: Path, tmp_path: Path) -> None:
    outs = []
    for i, taus in enumerate((["tau=1.5"], ["tau=0.1", "tau_layers=*:1.5"])):
        out = tmp_path / f"o{i}"
        sets = [a for t in taus for a in ("--set", t)]
        r = memshare(
            "simulate", str(smol), "--policy", "cf-topk", "--set", "granularity=layer",
            *sets, "-o", str(out),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(json.loads((out / "metrics.json").read_text()))
    assert outs[0]["kv"] == outs[1]["kv"] and outs[0]["sharing"] == outs[1]["sharing"]


def test_kvsharer_layers_takes_the_first_accepted_pairs(tmp_path: Path) -> None:
    from memshare.policies.kvsharer import KVSharer

    trials = [
        {"layer": 9, "uses": 2, "accepted": True},
        {"layer": 8, "uses": 1, "accepted": False},
        {"layer": 5, "uses": 4, "accepted": True},
        {"layer": 7, "uses": 3, "accepted": True},
    ]
    lm = list(range(10))
    lm[9], lm[5], lm[7] = 2, 4, 3
    f = tmp_path / "cal.json"
    f.write_text(json.dumps({"layer_map": lm, "trials": trials}))
    assert KVSharer(str(f)).shared_layers == 3
    two = KVSharer(str(f), layers=2)
    assert two.shared_layers == 2 and two.layer_map(10).tolist()[5] == 4
    assert two.layer_map(10).tolist()[7] == 7
    assert KVSharer(str(f), layers=0).shared_layers == 0
    with pytest.raises(InputError, match="4 shared layers asked"):
        KVSharer(str(f), layers=4)
