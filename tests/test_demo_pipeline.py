"""The README's main job, small: real capture of bundled prompts -> simulate four policies ->
validate them on the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memshare.traces.reader import TraceReader

pytestmark = pytest.mark.slow  # capture, simulate and validate on the real model


def test_demo_captures_then_simulates_the_four_policies(model_cache: Path, tmp_path: Path) -> None:
    from memshare.validate.pipeline import DEMO_POLICIES, DemoSettings, run_demo

    out = tmp_path / "demo"
    result = run_demo(out, DemoSettings(prompts=2, max_new_tokens=24, batch_size=2))
    reader = TraceReader(result.trace)
    assert reader.manifest.kind == "kv" and reader.manifest.complete and len(reader) == 2
    assert [r.label for r in result.study.runs] == list(DEMO_POLICIES)
    comparison = json.loads((out / "sim" / "comparison.json").read_text())["policies"]
    assert set(comparison) == set(DEMO_POLICIES)
    for name in DEMO_POLICIES:
        m = comparison[name]
        assert m["requests"]["finished"] == 2
        assert m["requests"]["output_tokens"] == sum(r.output_len for r in reader.records())
    assert comparison["none"]["sharing"]["pages_shared"] == 0
    assert (out / "sim" / "kv_blocks.png").is_file()
    # validated: every simulated run measured on the real model beside its prediction
    val = json.loads((out / "sim" / "validation.json").read_text())
    assert val == result.validation and set(val["policies"]) == set(DEMO_POLICIES)
    for name in ("none", "prefix", "exact-dedup"):
        assert val["policies"][name]["steps_identical"], name
    assert (out / "sim" / "kv_in_use.png").is_file() and result.seconds["validate"] > 0
    # a second run reuses the finished capture and gives the same simulation
    again = run_demo(out, DemoSettings(prompts=2, max_new_tokens=24, batch_size=2))
    assert again.capture is None
    again_cmp = json.loads((out / "sim" / "comparison.json").read_text())["policies"]
    assert again_cmp == comparison
    # more prompts (as --full after the quick demo): the finished capture is resumed, its
    # answers kept, only the missing prompts captured
    before = [r.output_ids for r in TraceReader(result.trace).records()]
    more = run_demo(out, DemoSettings(prompts=3, max_new_tokens=24, batch_size=2))
    assert more.capture is not None and more.capture["captured_now"] == 1
    after = [r.output_ids for r in TraceReader(result.trace).records()]
    assert len(after) == 3 and after[:2] == before
