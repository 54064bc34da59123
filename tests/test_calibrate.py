"""``memshare calibrate`` on the default model: a real KVSharer layer map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from memshare.block_pool import BlockPool
from memshare.policy import policy_layer_map
from memshare.registry import make_policy

if TYPE_CHECKING:
    from memshare.traces.model.loader import LoadedModel

pytestmark = pytest.mark.slow  # calibration trials on the real model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
R1 = DATA / "reasoning" / "deepseek_r1_aime24_math500.jsonl"


def test_calibrate_accepts_pairs_that_keep_the_cosine_when_rerun(
    loaded_model: LoadedModel, tmp_path: Path
) -> None:
    from memshare.validate.engine.calibrate import _ids, calibrate, map_cosine, write_calibration

    texts = [json.loads(line)["reasoning"] for line in R1.read_text().splitlines()[:3]]
    cal = calibrate(loaded_model, texts, max_tokens=96, target=0.125, threshold=0.5)
    lm = np.asarray(cal.layer_map)
    assert cal.num_layers == 30 and cal.shared_layers == round(0.125 * 30) == 4
    assert np.all(lm <= np.arange(30)) and np.all(lm[lm] == lm)  # owners keep their own KV
    accepted = [t for t in cal.trials if t.accepted]
    assert len(accepted) == cal.shared_layers
    assert all(t.cosine >= 0.5 for t in accepted)
    assert all(t.cosine < 0.5 for t in cal.trials if not t.accepted)
    # most dissimilar first: accepted distances are in non-increasing order of trial
    distances = [t.distance for t in cal.trials]
    assert distances == sorted(distances, reverse=True)
    # rerun the model for real with the whole map: the criterion still holds
    rerun = map_cosine(loaded_model, _ids(loaded_model, texts, 96), lm)
    assert rerun >= 0.5
    assert abs(rerun - cal.final_cosine) < 1e-4
    # sharing a layer for real changes the output: the check can fail
    assert rerun < 0.9999

    path = tmp_path / "map.json"
    write_calibration(cal, path)
    policy = make_policy("kvsharer", layer_map_file=str(path))
    pool = BlockPool(num_blocks=4, num_layers=30, layer_map=policy_layer_map(policy, 30))
    assert pool.pages_per_block == 2 * (30 - 4)
