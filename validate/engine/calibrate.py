"""``memshare calibrate``: KVSharer's layer map, found on the real model.

KVSharer (arXiv 2410.18517), as we run it:

1. Run the calibration texts through the model and take, per layer, the mean K and the mean V
   over all tokens (one vector per layer: mean K and mean V concatenated).
2. Order all layer pairs ``(i, j)``, ``i < j``, by the Euclidean distance of those vectors,
   most *dissimilar* first (the paper's counter-intuitive finding).
3. Walk the pairs: tentatively let layer ``j`` use layer ``i``'s KV (on top of the pairs
   already accepted) and run the model for real with that substitution; accept when the
   cosine similarity of the final hidden state to the unshared model's, averaged over tokens
   and texts, stays ``>= threshold`` (0.5 in the paper). Stop once ``round(target * L)``
   layers are shared (12.5 / 25 / 37.5%) or ``max_trials`` pairs were tried.

A substituted layer's attention reads the K/V projections (pre-RoPE, after ``k_norm`` where
the model has one) that the source layer computed for the same tokens in the same pass;
RoPE then rotates them by the same positions, so this equals reusing the source layer's
cache. Invariants of the map: ``layer_map[l]`` is ``l`` or an earlier layer that keeps its
own KV, so it is exactly what :class:`~memshare.block_pool.BlockPool` accepts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memshare.atomic import write_atomic
from memshare.errors import InputError
from memshare.traces.model.loader import LoadedModel


@dataclass(frozen=True)
class Trial:
    """One tried pair."""

    layer: int  # j: the layer that would reuse another's KV
    uses: int  # i: the earlier layer whose KV it would reuse
    distance: float  # Euclidean distance of the two layers' mean K/V
    cosine: float  # final-hidden-state cosine with this pair added to the accepted ones
    accepted: bool


@dataclass
class Calibration:
    """What ``memshare calibrate`` writes (JSON)."""

    layer_map: list[int]  # layer -> layer whose KV it uses
    shared_layers: int  # S
    num_layers: int  # L
    target_fraction: float
    threshold: float
    final_cosine: float  # cosine of the whole accepted map (1.0 if nothing is shared)
    trials: list[Trial] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Stable JSON text."""
        return json.dumps(asdict(self), indent=2) + "\n"


def _ids(backend: LoadedModel, texts: Sequence[str], max_tokens: int) -> list[Any]:
    torch = backend.torch
    out = []
    for text in texts:
        ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if ids:
            out.append(torch.tensor([ids], device=backend.device))
    return out


@contextlib.contextmanager
def _kv_hooks(
    backend: LoadedModel, layer_map: np.ndarray, record: list[list[Any]] | None = None
) -> Iterator[None]:
    """Substitute K/V projections per ``layer_map``; optionally record every layer's."""
    seen: dict[tuple[int, int], Any] = {}
    handles = []
    for which, modules in enumerate((backend.k_modules, backend.v_modules)):
        for layer, module in enumerate(modules):

            def hook(_m: Any, _i: Any, out: Any, layer: int = layer, which: int = which) -> Any:
                src = int(layer_map[layer])
                if src != layer:
                    out = seen[(src, which)]
                seen[(layer, which)] = out
                if record is not None:
                    record[layer][which] = out
                return out

            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _final_hidden(backend: LoadedModel, ids: Any, layer_map: np.ndarray) -> Any:
    with backend.torch.inference_mode(), _kv_hooks(backend, layer_map):
        return backend.model.model(input_ids=ids).last_hidden_state[0]


def map_cosine(backend: LoadedModel, batches: Sequence[Any], layer_map: np.ndarray) -> float:
    """Mean over texts and tokens of the final hidden state's cosine similarity between the
    model run with ``layer_map`` and the unshared model (the acceptance criterion)."""
    torch = backend.torch
    identity = np.arange(backend.num_layers)
    sims = []
    for ids in batches:
        base = _final_hidden(backend, ids, identity)
        shared = _final_hidden(backend, ids, layer_map)
        sims.append(float(torch.nn.functional.cosine_similarity(base, shared, dim=-1).mean()))
    return float(np.mean(sims))


def layer_means(backend: LoadedModel, batches: Sequence[Any]) -> np.ndarray:
    """(L, 2 * kv_dim): per layer, mean K and mean V over all calibration tokens."""
    L = backend.num_layers
    sums: np.ndarray | None = None
    count = 0
    identity = np.arange(L)
    for ids in batches:
        record: list[list[Any]] = [[None, None] for _ in range(L)]
        with backend.torch.inference_mode(), _kv_hooks(backend, identity, record):
            backend.model.model(input_ids=ids)
        rows = np.stack(
            [
                np.concatenate([r[0][0].float().sum(0).numpy(), r[1][0].float().sum(0).numpy()])
                for r in record
            ]
        )
        sums = rows if sums is None else sums + rows
        count += int(ids.shape[1])
    assert sums is not None
    return sums / count


def calibrate(
    backend: LoadedModel,
    texts: Sequence[str],
    *,
    max_tokens: int = 256,
    target: float = 0.25,
    threshold: float = 0.5,
    max_trials: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Find a KVSharer layer map for ``backend``'s model on ``texts`` (see module doc)."""
    limit = backend.context_limit
    if max_tokens > limit:  # a text is cut to max_tokens: it must fit the model's context
        raise InputError(
            "--max-tokens",
            f"{max_tokens:,} tokens per text are past the model's context of {limit:,}",
            f"give {limit:,} or less, e.g. 256",
        )
    batches = _ids(backend, texts, max_tokens)
    if not batches:
        raise ValueError("no calibration tokens")
    L = backend.num_layers
    means = layer_means(backend, batches)
    pairs = [(i, j) for i in range(L) for j in range(i + 1, L)]
    dist = {p: float(np.linalg.norm(means[p[0]] - means[p[1]])) for p in pairs}
    pairs.sort(key=lambda p: (-dist[p], p))
    want = round(target * L)
    layer_map = np.arange(L)
    trials: list[Trial] = []
    cosine = 1.0
    for i, j in pairs:
        shared = int(np.count_nonzero(layer_map != np.arange(L)))
        if shared >= want or len(trials) >= max_trials:
            break
        used_as_source = np.any((layer_map == j) & (np.arange(L) != j))
        if layer_map[i] != i or layer_map[j] != j or used_as_source:
            continue  # i must own its KV; j must be unshared and nobody's source
        candidate = layer_map.copy()
        candidate[j] = i
        cos = map_cosine(backend, batches, candidate)
        ok = cos >= threshold
        trials.append(Trial(j, i, dist[(i, j)], cos, ok))
        if ok:
            layer_map, cosine = candidate, cos
        if progress is not None:
            progress(int(np.count_nonzero(layer_map != np.arange(L))), want)
    return Calibration(
        layer_map=layer_map.tolist(),
        shared_layers=int(np.count_nonzero(layer_map != np.arange(L))),
        num_layers=L,
        target_fraction=target,
        threshold=threshold,
        final_cosine=cosine,
        trials=trials,
        model=asdict(backend.model_info()),
        inputs={"texts": len(batches), "tokens": int(sum(b.shape[1] for b in batches))},
    )


def write_calibration(cal: Calibration, path: Path) -> None:
    """Write atomically (temp file, fsync, rename): a half-written map never reads as one."""
    write_atomic(path, cal.to_json())
