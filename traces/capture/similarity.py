"""``memshare inspect DIR --similarity``: how close each KV block lies to an earlier one.

For every request of a kv trace, every full block ``b >= 1`` and every layer, the relative
distance of ``b``'s sketch to the nearest sketch of an earlier full block ``c < b`` of the same
request: ``min_c ||s_b - s_c|| / ||x_b||`` (the numerator estimated from the JL sketches, the
denominator the stored exact block norm), separately for K and for V. This is the observation
MemShare rests on: a block that lies within ``tau`` of an earlier block could point at that
block's memory. The report gives, per layer, the share of blocks under 0.1 / 0.2 / 0.3 and
percentiles; :func:`plot_similarity` draws the per-layer histograms as a PNG.

Partial last blocks (zero-padded in the trace) are left out: a sharing policy only ever sees
full blocks. Whether keys are pre- or post-RoPE is the trace's ``sketch.keys``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from memshare.errors import InputError
from memshare.sketch import pairwise_distances

THRESHOLDS = (0.1, 0.2, 0.3)
PERCENTILES = (10, 50, 90)
KINDS = ("k", "v")


def nearest_earlier(sketches: npt.ArrayLike, norms: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Relative distance of each row to its nearest earlier row (``nan`` for the first).

    ``sketches``: ``(n, d)``; ``norms``: ``(n,)`` exact norms of the unprojected blocks.
    """
    s = np.asarray(sketches, dtype=np.float64)
    n = s.shape[0]
    out = np.full(n, np.nan)
    if n < 2:
        return out
    d = pairwise_distances(s)
    d[np.triu_indices(n)] = np.inf  # only earlier blocks (j < i) count
    nearest = d.min(axis=1)[1:]
    norm = np.asarray(norms, dtype=np.float64)[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        out[1:] = np.where(norm > 0, nearest / norm, np.inf)
    return out


@dataclass
class SimilarityData:
    """Per layer and kind (``k``/``v``), the nearest-earlier distances of all blocks."""

    keys: str  # "pre_rope" or "post_rope"
    block_size: int
    requests: int
    distances: dict[str, list[npt.NDArray[np.float64]]]  # kind -> per layer, all blocks


def collect(trace: Path) -> SimilarityData:
    """Nearest-earlier distances of every full block (``b >= 1``) of every request."""
    from memshare.traces.reader import TraceReader

    with TraceReader(trace) as reader:
        m = reader.manifest
        if m.kind != "kv" or m.model is None or m.sketch is None:
            raise InputError(
                str(trace),
                "--similarity needs a kv trace (KV sketches); this is a workload trace",
                "capture one with `memshare capture`",
            )
        layers, bs = m.model.num_layers, m.block_size
        per: dict[str, list[list[npt.NDArray[np.float64]]]] = {
            kind: [[] for _ in range(layers)] for kind in KINDS
        }
        used = 0
        for record in reader:
            if record.kv is None:
                continue
            full = min(record.total_len // bs, record.kv.rows)
            if full < 2:
                continue
            rows = reader.kv(record)[:full]
            used += 1
            for j, kind in enumerate(KINDS):
                sk = np.asarray(rows["sketch"][:, :, j, :], dtype=np.float32)  # (n, L, d)
                nm = np.asarray(rows["norm"][:, :, j], dtype=np.float32)  # (n, L)
                for layer in range(layers):
                    per[kind][layer].append(nearest_earlier(sk[:, layer], nm[:, layer])[1:])
        distances = {
            kind: [np.concatenate(x) if x else np.zeros(0) for x in per[kind]] for kind in KINDS
        }
        return SimilarityData(m.sketch.keys, bs, used, distances)


def _stats(d: npt.NDArray[np.float64], thresholds: Sequence[float]) -> dict[str, Any]:
    if d.size == 0:
        return {"blocks": 0}
    finite = d[np.isfinite(d)]
    out: dict[str, Any] = {
        "blocks": int(d.size),
        "share_under": {f"{t:g}": float(np.mean(d < t)) for t in thresholds},
    }
    if finite.size:
        out["mean"] = float(finite.mean())
        out["min"] = float(finite.min())
        out.update({f"p{p}": float(np.percentile(finite, p)) for p in PERCENTILES})
    return out


def report(data: SimilarityData, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
    """Per-layer and overall statistics (JSON-ready)."""
    layers = len(data.distances["k"])
    return {
        "keys": data.keys,
        "block_size": data.block_size,
        "requests": data.requests,
        "thresholds": list(thresholds),
        "definition": "per full block b >= 1: min over earlier full blocks c of the same "
        "request of ||sketch_b - sketch_c|| / ||block_b||",
        "overall": {
            kind: _stats(
                np.concatenate(data.distances[kind]) if layers else np.zeros(0), thresholds
            )
            for kind in KINDS
        },
        "layers": [
            {"layer": i, **{kind: _stats(data.distances[kind][i], thresholds) for kind in KINDS}}
            for i in range(layers)
        ],
    }


def plot_similarity(
    data: SimilarityData, path: Path, thresholds: Sequence[float] = THRESHOLDS
) -> Path:
    """Per-layer histograms (heat maps: layer x relative distance) for K and V, plus the share
    of blocks under each threshold per layer; saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = len(data.distances["k"])
    edges = np.linspace(0.0, 1.5, 61)
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.18 * max(layers, 10) + 2.5))
    for ax, kind in zip(axes[:2], KINDS, strict=True):
        grid = np.zeros((layers, len(edges) - 1))
        for i, d in enumerate(data.distances[kind]):
            if d.size:
                h, _ = np.histogram(np.clip(d[np.isfinite(d)], 0, edges[-1] - 1e-9), bins=edges)
                grid[i] = h / d.size
        im = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            extent=(float(edges[0]), float(edges[-1]), -0.5, layers - 0.5),
            cmap="viridis",
        )
        for t in thresholds:
            ax.axvline(t, color="white", lw=0.8, ls="--")
        label = "K (" + data.keys.replace("_", "-") + ")" if kind == "k" else "V"
        ax.set_title(f"{label}: nearest earlier block")
        ax.set_xlabel("relative distance ||x_b - x_c|| / ||x_b||")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="share of blocks")
    ax = axes[2]
    for kind, style in (("k", "-"), ("v", ":")):
        for t in thresholds:
            shares = [float(np.mean(d < t)) if d.size else 0.0 for d in data.distances[kind]]
            ax.plot(range(layers), shares, style, label=f"{kind.upper()} < {t:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of blocks")
    ax.set_ylim(0, 1)
    ax.set_title(f"{data.requests} requests, block {data.block_size}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def similarity(trace: Path, plot: Path | None = None) -> dict[str, Any]:
    """The ``--similarity`` report of a trace; with ``plot``, also the PNG (path in the
    report)."""
    data = collect(trace)
    rep = report(data)
    if plot is not None:
        rep["plot"] = str(plot_similarity(data, plot))
    return rep
