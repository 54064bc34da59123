"""The positions a fidelity model was fitted on, as one ``.npz`` file (``tune`` writes
``fit_positions.npz`` beside its model), so a model can be refitted or checked offline
(e.g. fitted on some texts and scored on the others) without running the model again.

Invariant: :func:`load_positions` of what :func:`save_positions` wrote gives the same rows,
in order, with equal arrays; a file that is not one gives InputError naming it.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memshare.errors import InputError
from memshare.sim.fidelity_model import FitText

FORMAT = "memshare-fit-positions/1"


def save_positions(rows: Sequence[FitText], path: Path) -> None:
    """Write ``rows`` (all with the same feature width) to ``path``."""
    width = rows[0].x.shape[1] if rows else 0
    sizes = np.array([len(r.agree) for r in rows], dtype=np.int64)
    labels = {"format": FORMAT, "runs": [r.run for r in rows], "texts": [r.text for r in rows]}
    with path.open("wb") as f:
        np.savez_compressed(
            f,
            meta=np.frombuffer(json.dumps(labels).encode(), dtype=np.uint8),
            sizes=sizes,
            x=np.concatenate([r.x for r in rows]) if rows else np.zeros((0, width)),
            agree=np.concatenate([r.agree for r in rows]) if rows else np.zeros(0, bool),
            kl=np.concatenate([r.kl for r in rows]) if rows else np.zeros(0),
        )


def load_positions(path: Path) -> list[FitText]:
    """The rows :func:`save_positions` wrote to ``path``."""
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            sizes, x, agree, kl = z["sizes"], z["x"], z["agree"], z["kl"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(str(path), f"is not a fit-positions file ({e})", "give tune's file") from e
    if meta.get("format") != FORMAT or len(meta["runs"]) != len(sizes):
        raise InputError(str(path), f"is not {FORMAT}", "give tune's fit_positions.npz")
    ends = np.cumsum(sizes)
    starts = ends - sizes
    return [
        FitText(run, text, x[a:b], agree[a:b], kl[a:b])
        for run, text, a, b in zip(meta["runs"], meta["texts"], starts, ends, strict=True)
    ]
