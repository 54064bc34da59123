"""The fidelity model: its features, its fit, its file, and the simulator's prediction.

The features are checked against a position-by-position count; the fit against data drawn
from a known model (it must predict what the data hold and rank the layers as they do, none
negative; layers that always share together must split the cost); the file round-trips
and a bad one is one line; ``simulate --fidelity-model`` adds the prediction, exactly 1.0 and 0
without a share, and the search's pieces (settings of a layer table, the spec text) are exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import assert_one_line_error, memshare

from memshare.errors import InputError
from memshare.policy import BlockDecision
from memshare.share_log import ShareLog
from memshare.sim.fidelity_model import FidelityModel, FitText, conformal_bounds, features, fit
from memshare.tune.search import LayerTable, settings, spec_of
from memshare.tune.target import Target, split

L, BS = 3, 4


def _log(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    ft = np.sort(rng.integers(BS, n + 2, size=6))
    w = (rng.random((6, L, 2)) * (rng.random((6, L, 2)) < 0.5)).astype(np.float32)
    return ft, w


def test_features_count_the_shares_each_position_reads() -> None:
    rng = np.random.default_rng(1)
    n = 37
    ft, w = _log(rng, n)
    x = features(ft, w, n, BS)
    for p in range(n):
        want = w[ft <= p].sum(axis=0).reshape(-1) / (p // BS + 1)
        assert np.allclose(x[p], want)
    none = features(np.zeros(0, np.int64), np.zeros((0, L, 2)), 5, BS)
    assert none.shape == (5, 2 * L) and not none.any()


def test_the_fit_finds_known_sensitivities_again() -> None:
    rng = np.random.default_rng(2)
    a = np.array([0.0, 0.3, 0.05, 0.0, 0.6, 0.1])  # disagreement per unit, some zero
    b = 2 * a
    rows = []
    for t in range(6):
        for run in range(2):
            ft, w = _log(rng, 400)
            x = features(ft, w * (run + 1), 400, BS)
            dis = rng.random(400) < np.minimum(1.0, x @ a)
            kl = x @ b + rng.normal(0, 0.01, 400)
            rows.append(FitText(f"run{run}", f"t{t}", x, ~dis, kl))
    model = fit(rows, L)
    assert np.all(model.top1 >= 0) and np.all(model.kl >= 0)
    x = np.concatenate([r.x for r in rows])  # what it predicts is what the data hold
    assert np.mean(x @ model.kl) == pytest.approx(np.mean(x @ b), rel=0.02)
    assert np.mean(x @ model.top1) == pytest.approx(np.mean(x @ a), abs=0.005)
    # the layers the data say matter more come out higher (pulled towards their part's mean)
    assert np.corrcoef(model.kl, b)[0, 1] > 0.9 and np.corrcoef(model.top1, a)[0, 1] > 0.8
    lo, hi = model.residual_top1
    assert lo <= 0 <= hi and model.fitted_on["texts"] == 6


def test_layers_that_always_share_together_split_the_cost() -> None:
    # every share touches layers 0 and 1 alike: the data cannot tell them apart, so neither
    # may be called free (plain NNLS gave one all the weight)
    rng = np.random.default_rng(3)
    rows = []
    for t in range(4):
        ft, w = _log(rng, 300)
        w[:, 1] = w[:, 0]
        x = features(ft, w, 300, BS)
        dis = rng.random(300) < np.minimum(1.0, x[:, 0] * 0.4 + x[:, 2] * 0.4)
        rows.append(FitText("run", f"t{t}", x, ~dis, x[:, 0] + x[:, 2]))
    model = fit(rows, L)
    k0, k1 = model.top1[0], model.top1[2]
    assert k0 > 0.1 and k1 > 0.1 and abs(k0 - k1) < 0.1 * max(k0, k1)
    assert model.kl[0] == pytest.approx(model.kl[2], rel=0.01)


def test_a_run_without_shares_predicts_no_loss(tmp_path: Path) -> None:
    model = FidelityModel(L, np.ones(2 * L), np.ones(2 * L), [-0.1, 0.1], [-1, 1], 1.0)
    p = model.predict(ShareLog(), {"a": 10, "b": 5}, BS)
    assert (p.top1_agreement, p.kl_mean, p.exposure) == (1.0, 0.0, 0.0)
    log = ShareLog()
    d = BlockDecision(1, layer_distance=np.array([0.5, np.nan, 0.2], np.float32))
    log.record("a", 8, np.array([[True, False], [False, False], [True, True]]), d)
    p = model.predict(log, {"a": 10, "b": 5}, BS)
    # positions 8, 9 of a read the share: (0.5 + 0.2 + 0.2) / 3 blocks each
    assert p.kl_mean == pytest.approx(2 * 0.9 / 3 / 15)
    assert p.top1_agreement == pytest.approx(1 - 2 * 0.3 / 15)
    model.save(tmp_path / "m.json")
    again = FidelityModel.load(tmp_path / "m.json")
    assert np.array_equal(again.top1, model.top1) and again.residual_kl == [-1, 1]


def test_the_interval_is_relative_to_the_predicted_loss_andconformal_bounds() -> None:
    # residuals -0.5 .. +1.0 of the predicted disagreement: at 2% predicted, one text,
    # the measured disagreement is expected within [1%, 4%]; over 4 texts, half as wide
    model = FidelityModel(L, np.ones(2 * L), np.ones(2 * L), [-0.5, 1.0], [-1, 1], 1.0)
    assert model.interval(0.98, 1) == pytest.approx([0.96, 0.99])
    assert model.interval(0.98, 4) == pytest.approx([0.97, 0.985])
    # near 100% the floor (half a point of disagreement) keeps it from collapsing
    assert model.interval(1.0, 1) == pytest.approx([0.995, 1.0])
    assert model.interval_kl(0.1, 1) == pytest.approx([0.0, 0.2])
    # conformal ranks: under 39 residuals the extremes, from 79 the 2nd from each end
    assert conformal_bounds(list(range(20))) == [0.0, 19.0]
    assert conformal_bounds(list(range(79))) == [1.0, 77.0]
    assert conformal_bounds([]) == [0.0, 0.0]


@pytest.mark.parametrize(
    ("text", "why"),
    [("{", "is not JSON"), ('{"format": "x"}', "is not a memshare-fidelity-model/2 file")],
)
def test_a_bad_model_file_is_one_line(text: str, why: str, tmp_path: Path, smol: Path) -> None:
    f = tmp_path / "m.json"
    f.write_text(text)
    with pytest.raises(InputError, match=why):
        FidelityModel.load(f)
    r = memshare("simulate", str(smol), "--policy", "cf-topk", "--fidelity-model", str(f),
                 "-o", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(r, "--fidelity-model")
    assert not (tmp_path / "o").exists()


def test_simulate_adds_the_prediction(tmp_path: Path, smol: Path) -> None:
    f = tmp_path / "m.json"
    FidelityModel(30, np.full(60, 0.01), np.full(60, 0.1), [-0.01, 0.01], [0, 0], 1.0).save(f)
    out = tmp_path / "o"
    r = memshare(
        "simulate", str(smol), "--policy", "none", "--policy", "token-dedup",
        "--arrival", "closed:6", "--fidelity-model", str(f), "-o", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    none = json.loads((out / "none" / "metrics.json").read_text())["fidelity_predicted"]
    dedup = json.loads((out / "token-dedup" / "metrics.json").read_text())["fidelity_predicted"]
    assert none["top1_agreement"] == 1.0 and none["kl_mean"] == 0.0
    assert dedup["top1_agreement"] < 1.0 and dedup["kl_mean"] > 0.0
    assert "top-1 agreement, predicted" in r.stdout


def test_settings_walk_from_everything_to_nothing() -> None:
    pages = np.array([[0.1, 0.2, 0.0], [0.3, 0.25, 0.1]])  # grid (2) x layers (3)
    loss = np.array([[1.0, 0.1, 0.0], [5.0, 0.2, 0.3]])
    table = LayerTable((0.2, 0.5), pages, loss, [])
    got = settings(table)
    assert got[0] == [0.5, 0.5, 0.5]  # free: every layer takes its largest saving
    assert got[-1] == [None, None, None]  # prohibitive: nothing shares
    assert spec_of([None, None, 0.2, 0.5, 0.5]) == "0-1:off,2:0.2,3-4:0.5"


def test_targets_and_splits() -> None:
    assert Target.parse("top1=0.99").met({"top1_agreement": 0.991})
    assert not Target.parse("kl=0.05").met({"kl_mean": 0.06})
    assert Target.parse("answers=0.9").met({"answer_agreement": 0.9, "top1_agreement": None})
    assert not Target.parse("answers=0.9").met({"top1_agreement": 1.0})
    for bad in ("top1=1.5", "kl=-1", "x=1", "top1", "answers=0", "answers=1.2"):
        with pytest.raises(InputError, match="--target"):
            Target.parse(bad)
    assert split(["a", "b", "c", "d", "e"], None) == (["a", "c", "e"], ["b", "d"])
    assert split(["a", "b", "c"], ["a"]) == (["b", "c"], ["a"])
    with pytest.raises(InputError, match="--holdout"):
        split(["a", "b"], ["z"])
