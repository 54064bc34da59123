"""``capture --backend vllm`` against the HF backend on the same inputs: how far apart their
sketches are (relative distance per block and layer, K and V; pre-RoPE keys, vLLM's un-rotated,
and post-RoPE keys; fp32) and whether the token ids are the same, teacher-forced (R1 texts) and
generated (GSM8K prompts). The tests (tests/test_capture_vllm*.py) check <= 1e-3; this prints
the figures.

    .venv-vllm/bin/python benchmarks/vllm_capture_agreement.py OUT [--texts 4] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from memshare.traces.capture import CaptureOptions, GenerationSettings, capture
from memshare.traces.capture.vllm import VllmBackend
from memshare.traces.reader import TraceReader

R1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "reasoning"
R1 = R1 / "deepseek_r1_aime24_math500.jsonl"


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Relative sketch distances (K, V) between two traces of the same requests."""
    dist: dict[str, list[float]] = {"k": [], "v": []}
    same_ids = True
    with TraceReader(a) as ra, TraceReader(b) as rb:
        for x, y in zip(ra.records(), rb.records(), strict=True):
            same_ids &= x.prompt_ids == y.prompt_ids and x.output_ids == y.output_ids
            sx = np.asarray(ra.kv(x)["sketch"], np.float64)
            sy = np.asarray(rb.kv(y)["sketch"], np.float64)
            rel = np.linalg.norm(sx - sy, axis=-1) / np.maximum(np.linalg.norm(sx, axis=-1), 1e-12)
            dist["k"] += rel[:, :, 0].ravel().tolist()
            dist["v"] += rel[:, :, 1].ravel().tolist()
    out: dict[str, Any] = {"same_token_ids": same_ids, "block_layers": len(dist["k"])}
    for kv, d in dist.items():
        out[kv] = {"max": max(d), "p99": float(np.percentile(d, 99)), "median": float(np.median(d))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    vllm = VllmBackend()
    cases = {
        "teacher_forced": {"texts": R1, "limit": a.texts, "max_tokens": a.tokens},
        "generated": {
            "limit": a.prompts,
            "generation": GenerationSettings(max_new_tokens=a.new_tokens, batch_size=4),
        },
    }
    res: dict[str, Any] = {}
    for name, kw in cases.items():
        for keys in ("pre_rope", "post_rope"):
            v, h = a.out / name / keys / "vllm", a.out / name / keys / "hf"
            capture(CaptureOptions(output=v, keys=keys, backend="vllm", **kw), backend=vllm)
            capture(CaptureOptions(output=h, keys=keys, **kw), backend=vllm.text)
            res[f"{name} {keys}"] = compare(v, h)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
