"""Fitting the fidelity model (:mod:`memshare.sim.fidelity_model`) on measured runs.

The data: every position the teacher-forced engines compared, with its features (from the
engine's own share log: the shares that caused what was measured), whether its top-1 token
agreed with the unshared run's, and its KL. The sensitivities are non-negative least squares
(``scipy.optimize.lsq_linear``, bounds ``[0, inf)``) of the disagreement indicator and of the
KL on the features, over every position of every run and text. The interval: each text is
left out in turn, the model refitted on the others and the text's agreement and KL predicted;
the 2.5% and 97.5% quantiles of measured minus predicted over (run, text) pairs are kept.

Invariants: the fit is deterministic (no sampling); an infinite KL (the shared run gave no mass
where the base gave some) enters as ``KL_CAP``; a fit on runs without one share gives zero
sensitivities, which predict exactly the unshared run; a layer and part no share in the data
touched gets the mean sensitivity of the part's touched ones (zero would call it free).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memshare.sim.fidelity_model import FidelityModel, features
from memshare.validate.measure import Measured, Workload

KL_CAP = 50.0  # nats: an infinite KL counts as this much


@dataclass
class FitText:
    """One run's positions of one text."""

    run: str  # the run's label (its policy and parameters)
    text: str  # request id
    x: np.ndarray  # (n, 2L) features
    agree: np.ndarray  # (n,) bool: top-1 agreed with the unshared run
    kl: np.ndarray  # (n,) float64, capped at KL_CAP


def fit_texts(label: str, m: Measured, wl: Workload) -> list[FitText]:
    """The positions ``m`` compared, one :class:`FitText` per request, with the features of
    the shares its engine applied."""
    log = m.engine.manager.share_log
    layers = m.engine.pool.num_layers
    out = []
    for rid in m.fidelity.requests():
        pos, agree, kl = m.fidelity.positions(rid)
        if log is None:
            x = np.zeros((len(pos), 2 * layers))
        else:
            ft, w = log.of(rid).arrays(layers)
            x = features(ft, w, len(wl.texts[rid]), wl.block_size)[pos]
        out.append(
            FitText(label, rid, x, agree, np.minimum(np.nan_to_num(kl, posinf=KL_CAP), KL_CAP))
        )
    return out


def _weights(rows: Sequence[FitText]) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative least squares of disagreement and KL on the features."""
    from scipy.optimize import lsq_linear

    x = np.concatenate([r.x for r in rows])
    width = x.shape[1]
    if not x.any():
        return np.zeros(width), np.zeros(width)
    dis = np.concatenate([~r.agree for r in rows]).astype(np.float64)
    kl = np.concatenate([r.kl for r in rows])
    used = np.asarray(x.any(axis=0), dtype=bool)  # columns some share touched
    a, b = np.zeros(width), np.zeros(width)
    a[used] = lsq_linear(x[:, used], dis, bounds=(0.0, np.inf)).x
    b[used] = lsq_linear(x[:, used], kl, bounds=(0.0, np.inf)).x
    for w in (a, b):  # a page never shared in the data is not free: its part's mean
        for part in (0, 1):
            seen = used[part::2]
            if seen.any():
                w[part::2][~seen] = w[part::2][seen].mean()
    return a, b


def _rates(a: np.ndarray, b: np.ndarray, r: FitText) -> tuple[float, float]:
    """(predicted agreement, predicted mean KL) of one run's text."""
    return float(1.0 - np.minimum(1.0, r.x @ a).mean()), float((r.x @ b).mean())


def fit(rows: Sequence[FitText], layers: int) -> FidelityModel:
    """The model of ``rows`` (see the module docstring)."""
    a, b = _weights(rows)
    texts = sorted({r.text for r in rows})
    res_t: list[float] = []
    res_k: list[float] = []
    for t in texts if len(texts) > 1 else ():
        la, lb = _weights([r for r in rows if r.text != t])
        for r in rows:
            if r.text == t and len(r.agree):
                top1, klm = _rates(la, lb, r)
                res_t.append(float(r.agree.mean()) - top1)
                res_k.append(float(r.kl.mean()) - klm)
    q_t = np.percentile(res_t, [2.5, 97.5]).tolist() if res_t else [0.0, 0.0]
    q_k = np.percentile(res_k, [2.5, 97.5]).tolist() if res_k else [0.0, 0.0]
    exposure = [float(r.x.sum(axis=1).mean()) for r in rows if len(r.x)]
    return FidelityModel(
        layers,
        a,
        b,
        [round(v, 6) for v in q_t],
        [round(v, 6) for v in q_k],
        max(exposure, default=0.0),
        {
            "texts": len(texts),
            "runs": sorted({r.run for r in rows}),
            "positions": int(sum(len(r.agree) for r in rows)),
        },
    )
