"""Pre-RoPE keys from ``capture --backend vllm`` (issue 28): vLLM's cached keys un-rotated with
each layer's own rotary module (``traces/capture/vllm_rope.py``).

Checked against the HF backend, whose pre-RoPE keys are the ``k_proj`` (or ``k_norm``)
outputs themselves: on the default model (Llama-type) and on a tiny seeded Qwen3 model saved
to a folder (keys normalised by ``k_norm`` before rotation), token by token through
``--full-kv`` and block by block through the sketches; and ``cf-topk`` (layer/k, tau 0.5)
shares the same pages on the vLLM trace as on the HF trace of the same text, and next to
nothing on a post-RoPE trace, which the simulator warns about.

Every capture runs as its own ``memshare`` process (one vLLM engine each). Marker ``vllm``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from helpers_cli import memshare_process as memshare
from helpers_cli import ok

from memshare.traces.capture.fullkv import read_full_kv
from memshare.traces.reader import TraceReader

pytestmark = pytest.mark.vllm

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
R1 = DATA / "reasoning" / "deepseek_r1_aime24_math500.jsonl"
TOKEN_TOLERANCE = 1e-4  # relative error of one token's K or V, fp32 (measured: 4e-7 .. 2e-5)
SKETCH_TOLERANCE = 1e-3  # relative distance of two sketches of one block and layer


@pytest.fixture(scope="module")
def tiny_qwen3(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random-weight Qwen3 (2 layers, head_dim 32, ``k_norm``) in a safetensors
    folder with the default model's tokenizer."""
    import torch
    import transformers

    from memshare.traces.model.loader import load_model

    tokenizer = load_model().tokenizer
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _capture(out: Path, *args: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(
        ok(memshare("capture", "--texts", str(R1), "-o", str(out), "--json", *args))
    )
    return summary


def _traces(tmp: Path, *args: str) -> tuple[Path, Path]:
    """The same capture through vLLM and through HF."""
    _capture(tmp / "vllm", "--backend", "vllm", *args)
    _capture(tmp / "hf", *args)
    return tmp / "vllm", tmp / "hf"


DEFAULT_FLAGS = ("--limit", "2", "--max-tokens", "600", "--block-size", "16", "--full-kv")


@pytest.fixture(scope="module")
def default_traces(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two R1 texts of 600 tokens on the default model, with full KV: ``vllm`` and ``hf``
    (pre-RoPE keys, the default) and ``post`` (vLLM, ``--keys post_rope``)."""
    tmp = tmp_path_factory.mktemp("default")
    _traces(tmp, *DEFAULT_FLAGS)
    _capture(tmp / "post", "--backend", "vllm", "--keys", "post_rope", *DEFAULT_FLAGS)
    return tmp


def _rel(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _token_errors(out_v: Path, out_h: Path) -> dict[str, float]:
    """Largest relative error per full-KV field (``k``, ``k_rope``, ``v``) over requests."""
    worst = {"k": 0.0, "k_rope": 0.0, "v": 0.0}
    with TraceReader(out_v) as rv, TraceReader(out_h) as rh:
        for a, b in zip(rv.records(), rh.records(), strict=True):
            assert a.prompt_ids == b.prompt_ids and a.output_ids == b.output_ids
            fa = read_full_kv(out_v, rv.manifest, a)
            fb = read_full_kv(out_h, rh.manifest, b)
            for name in worst:
                worst[name] = max(worst[name], _rel(fa[name], fb[name]))
    return worst


def _sketch_distance(out_v: Path, out_h: Path) -> float:
    """Largest relative distance of two sketches of one block and layer (K and V)."""
    worst = 0.0
    with TraceReader(out_v) as rv, TraceReader(out_h) as rh:
        for a, b in zip(rv.records(), rh.records(), strict=True):
            sa = np.array(rv.kv(a))["sketch"].astype(np.float64)
            sb = np.array(rh.kv(b))["sketch"].astype(np.float64)
            num = np.linalg.norm(sa - sb, axis=-1)
            worst = max(worst, float((num / np.linalg.norm(sa, axis=-1)).max()))
    return worst


def _check_agreement(out_v: Path, out_h: Path, label: str) -> None:
    """Same ids; every token's K (pre- and post-RoPE) and V, and every sketch, agree."""
    errors = _token_errors(out_v, out_h)
    print(f"{label}: largest relative error per field {errors}")
    assert max(errors.values()) <= TOKEN_TOLERANCE, errors
    assert _sketch_distance(out_v, out_h) <= SKETCH_TOLERANCE
    with TraceReader(out_v) as reader:
        m = reader.manifest
    assert m.sketch is not None and m.sketch.keys == "pre_rope"  # the default on vllm too
    assert m.source["model"]["unrope_round_trip_error"] < 1e-6
    assert m.source["model"]["keys_from"].startswith("vllm kv cache")


def test_vllm_pre_rope_keys_equal_hf_token_by_token(default_traces: Path) -> None:
    _check_agreement(default_traces / "vllm", default_traces / "hf", "default model")


def test_on_qwen3_the_keys_are_those_after_k_norm(tiny_qwen3: Path, tmp_path: Path) -> None:
    flags = ["--limit", "1", "--max-tokens", "300", "--block-size", "16", "--full-kv"]
    out_v, out_h = _traces(tmp_path, *flags, "--model", str(tiny_qwen3))
    _check_agreement(out_v, out_h, "tiny qwen3")
    with TraceReader(out_h) as reader:
        assert reader.manifest.source["model"]["keys_from"] == "k_norm"


def _page_shares(trace: Path, out: Path) -> tuple[int, int, str]:
    """cf-topk (layer/k, tau 0.5) on ``trace``: pages shared, pages written, stderr."""
    res = memshare(
        "simulate", str(trace), "--policy", "cf-topk", "--set", "granularity=layer",
        "--set", "share=k", "--set", "tau=0.5", "-o", str(out),
    )  # fmt: skip
    ok(res)
    sharing = json.loads((out / "metrics.json").read_text())["sharing"]
    return int(sharing["pages_shared"]), int(sharing["pages_written"]), res.stderr


def test_cf_topk_shares_the_same_pages_on_the_vllm_and_the_hf_trace(
    default_traces: Path, tmp_path: Path
) -> None:
    out_v, out_h, post = (default_traces / n for n in ("vllm", "hf", "post"))
    shared_v, written_v, err_v = _page_shares(out_v, tmp_path / "sim-v")
    shared_h, written_h, err_h = _page_shares(out_h, tmp_path / "sim-h")
    shared_p, written_p, err_p = _page_shares(post, tmp_path / "sim-p")
    print(f"pages shared: vllm {shared_v}/{written_v}, hf {shared_h}/{written_h}, ", end="")
    print(f"vllm post-RoPE {shared_p}/{written_p}")
    assert written_v == written_h == written_p
    assert abs(shared_v - shared_h) <= 0.01 * written_h  # within 1 point (measured: equal)
    assert shared_h >= 0.05 * written_h  # pre-RoPE keys give cf-topk something to share
    assert shared_p <= 0.01 * written_p
    assert "warning" not in err_v + err_h
    assert "post-RoPE" in err_p and "--keys pre_rope" in err_p
