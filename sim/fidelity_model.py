"""The fidelity model: what the shares of a run cost in top-1 agreement and KL, predicted from
the shares alone (docs/fidelity-model.md), so that the simulator can say it beside KV saved.

Features: at position ``p`` of a request, for each layer ``l`` and part ``c`` (K, V), the
distance-weighted count of shared pages the position reads, over the blocks it reads:
``x[l, c](p) = sum(w_e[l, c] for shares e applied before p) / (p // block_size + 1)``, where
``w_e`` is the share's distance at that page (:mod:`memshare.share_log`). Model: the chance
that position ``p``'s top-1 token differs from the unshared run's is ``min(1, x(p) . a)``, its
KL ``x(p) . b``, with ``a, b >= 0`` one sensitivity per layer and part, fitted on measured
runs (:func:`fit`). A run's prediction is the mean over its
positions; its 95% interval comes from the fit's leave-one-text-out residuals, taken relative
to the predicted loss and scaled by ``1 / sqrt(texts)`` (:meth:`FidelityModel.interval`).

The fit: non-negative least squares (``scipy.optimize.lsq_linear``, bounds ``[0, inf)``) of
the disagreement indicator and of the KL on the features of every position compared (the
features from the engine's own share log: the shares that caused what was measured), each
layer's sensitivity pulled towards its part's pooled one (:func:`_nnls_pooled`); a layer and
part no share in the data touched takes the pooled value (zero would call it free). The
interval: each text is left out in turn, the model refitted on the others and the text's
disagreement and KL predicted; the residual of each (run, text) pair is measured minus
predicted over ``max(predicted, floor)``, and the split-conformal order statistics of those
residuals (ranks ``floor(0.025 (n + 1))`` and ``ceil(0.975 (n + 1))``, clipped to the smallest
and largest) are kept (:func:`conformal_bounds`).

Invariants: the fit is deterministic; no share gives a prediction of exactly 1.0 agreement
and 0 KL; the prediction is a pure function of the share log and the request lengths; a file
that is not a model is one InputError naming it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memshare.atomic import write_atomic
from memshare.errors import InputError
from memshare.share_log import ShareLog

FORMAT = "memshare-fidelity-model/2"
KL_CAP = 50.0  # nats: an infinite KL counts as this much in a fit
RIDGE = 3.0  # pull of each layer's sensitivity towards its part's pooled one (_nnls_pooled)
FLOOR_TOP1 = 0.005  # residuals are relative to max(predicted disagreement, this)
FLOOR_KL = 0.005  # nats: residuals are relative to max(predicted mean KL, this)


def features(
    from_token: np.ndarray, weight: np.ndarray, positions: int, block_size: int
) -> np.ndarray:
    """``(positions, 2L)`` float64 features of one request (module docstring) from its shares:
    ``from_token (E,)`` and ``weight (E, L, 2)``."""
    layers = weight.shape[1] if weight.ndim == 3 else 0
    acc = np.zeros((positions + 1, 2 * layers), np.float64)
    if len(from_token):
        np.add.at(acc, np.minimum(from_token, positions), weight.reshape(len(weight), -1))
    out = np.cumsum(acc[:positions], axis=0)
    out /= (np.arange(positions) // block_size + 1)[:, None]
    return out


@dataclass(frozen=True)
class Prediction:
    """A run's predicted fidelity against the unshared run."""

    positions: int
    texts: int
    top1_agreement: float
    top1_agreement_ci95: list[float]
    kl_mean: float
    kl_mean_ci95: list[float]
    exposure: float  # mean over positions of the features' sum (what the fit's range bounds)
    outside_fit: bool  # exposure beyond the largest the model was fitted on: extrapolated

    def to_json(self) -> dict[str, Any]:
        """Plain numbers, rounded to 6 places."""
        return {
            "positions": self.positions,
            "texts": self.texts,
            "top1_agreement": round(self.top1_agreement, 6),
            "top1_agreement_ci95": [round(v, 6) for v in self.top1_agreement_ci95],
            "kl_mean": round(self.kl_mean, 6),
            "kl_mean_ci95": [round(v, 6) for v in self.kl_mean_ci95],
            "exposure": round(self.exposure, 6),
            "outside_fit": self.outside_fit,
        }


@dataclass
class FidelityModel:
    """Per-layer, per-part sensitivities (see the module docstring)."""

    layers: int
    top1: np.ndarray  # (2L,) disagreement per unit of feature, layer-major (K, V)
    kl: np.ndarray  # (2L,) KL (nats) per unit of feature
    residual_top1: list[float]  # (lo, hi) of (measured - predicted disagreement) / max(pred, floor)
    residual_kl: list[float]  # (lo, hi) of (measured - predicted KL) / max(pred, floor)
    max_exposure: float  # the largest run exposure the fit saw
    fitted_on: dict[str, Any] = field(default_factory=dict)  # texts, runs, positions, policies

    def predict_request(
        self, from_token: np.ndarray, weight: np.ndarray, positions: int, block_size: int
    ) -> tuple[float, float, float]:
        """``(disagreeing, KL sum, exposure sum)`` over one request's positions."""
        if not len(from_token) or positions <= 0:
            return 0.0, 0.0, 0.0
        if weight.shape[1] != self.layers:
            raise InputError(
                "--fidelity-model",
                f"fitted on a {self.layers}-layer model, the run's has {weight.shape[1]}",
                "fit a model on validate runs of this model",
            )
        x = features(from_token, weight, positions, block_size)
        dis = np.minimum(1.0, x @ self.top1)
        return float(dis.sum()), float((x @ self.kl).sum()), float(x.sum())

    def predict(self, log: ShareLog, lengths: dict[str, int], block_size: int) -> Prediction:
        """The pooled prediction over requests ``lengths`` (request -> positions compared)."""
        dis = kl = exp = 0.0
        for rid, n in lengths.items():
            ft, w = log.of(rid).arrays(self.layers)
            a, b, c = self.predict_request(ft, w, n, block_size)
            dis, kl, exp = dis + a, kl + b, exp + c
        n = max(1, sum(lengths.values()))
        texts = max(1, len(lengths))
        top1, klm, exposure = 1.0 - dis / n, kl / n, exp / n
        return Prediction(
            positions=sum(lengths.values()),
            texts=len(lengths),
            top1_agreement=top1,
            top1_agreement_ci95=self.interval(top1, texts),
            kl_mean=klm,
            kl_mean_ci95=self.interval_kl(klm, texts),
            exposure=exposure,
            outside_fit=exposure > self.max_exposure * (1 + 1e-9),
        )

    def interval(self, top1: float, texts: int) -> list[float]:
        """95% interval of the measured top-1 agreement pooled over ``texts`` texts, around a
        prediction ``top1``: the residual bounds times ``max(1 - top1, FLOOR_TOP1)``, over
        ``sqrt(texts)`` (text errors taken as independent); within [0, 1], ordered."""
        dis = 1.0 - top1
        s = max(dis, FLOOR_TOP1) / math.sqrt(max(1, texts))
        lo, hi = (max(0.0, min(1.0, 1.0 - (dis + q * s))) for q in self.residual_top1[::-1])
        return [lo, hi]

    def interval_kl(self, klm: float, texts: int) -> list[float]:
        """95% interval of the measured mean KL, as :meth:`interval` (at least 0)."""
        s = max(klm, FLOOR_KL) / math.sqrt(max(1, texts))
        return [max(0.0, klm + q * s) for q in self.residual_kl]

    # ----------------------------------------------------------------- files
    def to_json(self) -> dict[str, Any]:
        """The file's object."""
        return {
            "format": FORMAT,
            "layers": self.layers,
            "feature": "distance-weighted shared pages read, over the blocks read, per layer/part",
            "top1_disagreement_per_unit": _pairs(self.top1),
            "kl_per_unit": _pairs(self.kl),
            "residual_top1_relative": self.residual_top1,
            "residual_kl_relative": self.residual_kl,
            "max_exposure": self.max_exposure,
            "fitted_on": self.fitted_on,
        }

    def save(self, path: Path) -> None:
        """Write atomically."""
        write_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @staticmethod
    def load(path: Path) -> FidelityModel:
        """Read a model file (InputError naming the file and what is wrong)."""
        where = f"--fidelity-model {path}"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(
                where, "does not exist", "fit one: memshare tune, or validate --fit-fidelity-model"
            ) from None
        except (OSError, ValueError) as e:
            raise InputError(where, f"is not JSON ({e})", "pass a fidelity model file") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise InputError(where, f"is not a {FORMAT} file", "pass a fidelity model file")
        try:
            layers = int(raw["layers"])
            top1 = np.asarray(raw["top1_disagreement_per_unit"], np.float64).reshape(-1)
            kl = np.asarray(raw["kl_per_unit"], np.float64).reshape(-1)
            model = FidelityModel(
                layers,
                top1,
                kl,
                [float(v) for v in raw["residual_top1_relative"]],
                [float(v) for v in raw["residual_kl_relative"]],
                float(raw["max_exposure"]),
                dict(raw.get("fitted_on", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(where, f"field missing or malformed ({e})", "fit it again") from None
        ok = top1.shape == kl.shape == (2 * layers,) and len(model.residual_top1) == 2
        if not ok or not (np.all(np.isfinite(top1)) and np.all(np.isfinite(kl))):
            raise InputError(where, f"weights are not 2 x {layers} finite numbers", "fit it again")
        return model


@dataclass
class FitText:
    """One run's positions of one text."""

    run: str  # the run's label (its policy and parameters)
    text: str  # request id
    x: np.ndarray  # (n, 2L) features
    agree: np.ndarray  # (n,) bool: top-1 agreed with the unshared run
    kl: np.ndarray  # (n,) float64, capped at KL_CAP


# ----------------------------------------------------------------------------- the fit
def _weights(rows: Sequence[FitText]) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivities of disagreement and of KL (see :func:`_nnls_pooled`)."""
    x = np.concatenate([r.x for r in rows])
    width = x.shape[1]
    if not x.any():
        return np.zeros(width), np.zeros(width)
    dis = np.concatenate([~r.agree for r in rows]).astype(np.float64)
    kl = np.concatenate([r.kl for r in rows])
    return _nnls_pooled(x, dis), _nnls_pooled(x, kl)


def _nnls_pooled(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of ``y`` on ``x``'s columns, each pulled towards its part's
    pooled sensitivity (one number for all layers' K, one for V, fitted first).

    Layers share at nearly the same positions, so their features move together and plain
    NNLS can put all the weight on a few layers and call the rest free (measured on R1: 2 of
    30 layers carried it), which the per-layer search then exploits. The pull is a ridge
    penalty ``RIDGE x mean(column sum of squares) x ||w - pooled||^2``: the data move a
    layer away from its part's value only as far as they can tell layers apart. A layer and
    part the data never touched takes the pooled value. At 0.1, 3 of 30 layers still came
    out free on R1's calibration (tau 0.4, 0.5, each third at 0.7) and tune's search chose
    exactly those (predicted 100%, measured 94.95%); at 3 none is free and leave-one-text-out
    errors are no worse."""
    from scipy.optimize import lsq_linear

    width = x.shape[1]
    used = np.asarray(x.any(axis=0), dtype=bool)
    parts = np.stack([x[:, 0::2].sum(axis=1), x[:, 1::2].sum(axis=1)], axis=1)
    pooled = lsq_linear(parts, y, bounds=(0.0, np.inf)).x  # (K, V)
    prior = np.tile(pooled, width // 2)
    scale = float(np.square(x[:, used]).sum(axis=0).mean()) if used.any() else 0.0
    lam = np.sqrt(RIDGE * scale)
    if lam <= 0:
        return prior
    a = np.vstack([x[:, used], lam * np.eye(int(used.sum()))])
    b = np.concatenate([y, lam * prior[used]])
    w = prior.copy()
    w[used] = lsq_linear(a, b, bounds=(0.0, np.inf)).x
    return w


def rates(a: np.ndarray, b: np.ndarray, r: FitText) -> tuple[float, float]:
    """(predicted agreement, predicted mean KL) of one run's text under sensitivities ``a``
    (disagreement) and ``b`` (KL), e.g. a model's ``top1`` and ``kl``."""
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
                top1, klm = rates(la, lb, r)
                dis = 1.0 - top1
                res_t.append((float(1.0 - r.agree.mean()) - dis) / max(dis, FLOOR_TOP1))
                res_k.append((float(r.kl.mean()) - klm) / max(klm, FLOOR_KL))
    exposure = [float(r.x.sum(axis=1).mean()) for r in rows if len(r.x)]
    return FidelityModel(
        layers,
        a,
        b,
        conformal_bounds(res_t),
        conformal_bounds(res_k),
        max(exposure, default=0.0),
        {
            "texts": len(texts),
            "runs": sorted({r.run for r in rows}),
            "positions": int(sum(len(r.agree) for r in rows)),
        },
    )


def conformal_bounds(residuals: Sequence[float]) -> list[float]:
    """Split-conformal 95% bounds of ``residuals`` (n of them): the order statistics of rank
    ``floor(0.025 (n + 1))`` and ``ceil(0.975 (n + 1))``, clipped to the smallest and largest
    (under 39 residuals the exact rule would be unbounded: the extremes are kept instead);
    ``[0, 0]`` with none. Rounded to 6 places."""
    if not len(residuals):
        return [0.0, 0.0]
    s = np.sort(np.asarray(residuals, np.float64))
    n = len(s)
    lo = s[max(1, math.floor(0.025 * (n + 1))) - 1]
    hi = s[min(n, math.ceil(0.975 * (n + 1))) - 1]
    return [round(float(lo), 6), round(float(hi), 6)]


def _pairs(w: np.ndarray) -> list[list[float]]:
    return [[round(float(k), 9), round(float(v), 9)] for k, v in w.reshape(-1, 2)]
