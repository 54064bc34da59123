"""``cf-topk``'s per-layer, per-part thresholds (``--set tau_layers=...``).

A spec is a comma list of entries ``[k|v]LAYERS:TAU``, applied in order (a later entry
overrides an earlier one): ``LAYERS`` is a layer ``3``, a range ``0-9`` or ``*`` (every
layer); a leading ``k`` or ``v`` sets keys' or values' threshold alone (both without it);
``TAU`` is a number in ``0..TAU_MAX`` or ``off`` (that layer/part never shares). Layers and
parts no entry names keep the policy's ``tau``. ``@PATH`` reads a JSON file instead:
``{"k": [...], "v": [...]}``, one threshold (or ``null``: off) per layer (each list as
long as the model is deep). Examples: ``0-9:0.4,10-29:0.1``; a layer subset: ``*:off,4-7:0.5``.

How the policy applies a table (:func:`scales`): a page's threshold ``t`` is folded into
the norm the distance is divided by, ``||x - c|| / (||x|| t / t_ref) <= t_ref``, where
``t_ref`` is the largest threshold in the table; an ``off`` page gets a zero norm, so its
distance is infinite (or NaN) and never confirms, and a threshold of 0 a tiny one, so only
an identical page confirms. Every comparison, bound and tie-break of the policy then runs
unchanged on the scaled distances. Invariant: without a spec the policy never scales, so its
decisions are bit for bit those of a single ``tau``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from memshare.errors import InputError
from memshare.policies.cf_topk_index import Limits
from memshare.policy import BlockDecision

OFF = -1.0  # a page that never shares
_ENTRY = re.compile(r"^(?P<part>[kv]?)(?P<layers>\*|\d+(?:-\d+)?):(?P<tau>.+)$")
_ZERO_SCALE = np.float32(1e-30)  # a threshold of 0: only identical pages confirm
WHERE = "--set tau_layers"
Entry = tuple[str, int, int | None, float]  # parts ("k", "v", "kv"), first, last (None: end), tau


def parse_spec(spec: str, tau_max: float) -> list[Entry]:
    """``(parts, first layer, last layer or None for '*' / to the end, tau)`` per entry,
    checked for syntax and range (InputError naming the entry); ``@PATH`` is read as a file."""
    text = spec.strip()
    if text.startswith("@"):
        return _from_file(Path(text[1:]), tau_max)
    out: list[Entry] = []
    for raw in text.split(","):
        entry = raw.strip()
        m = _ENTRY.match(entry)
        if m is None:
            raise InputError(
                WHERE,
                f"entry {entry!r} is not [k|v]LAYERS:TAU",
                "e.g. tau_layers=0-9:0.4,10-29:0.1 (or *:off,4-7:0.5 for a layer subset)",
            )
        parts = m["part"] or "kv"
        tau = _tau(m["tau"], entry, tau_max)
        if m["layers"] == "*":
            out.append((parts, 0, None, tau))
            continue
        lo, _, hi = m["layers"].partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise InputError(WHERE, f"entry {entry!r}: range ends before it starts", "e.g. 0-9")
        out.append((parts, first, last, tau))
    return out


def _tau(text: str, entry: str, tau_max: float) -> float:
    if text.strip().lower() == "off":
        return OFF
    try:
        tau = float(text)
    except ValueError:
        tau = math.nan
    if not (math.isfinite(tau) and 0.0 <= tau <= tau_max):
        raise InputError(
            WHERE, f"entry {entry!r}: {text!r} is not off or 0..{tau_max:g}", "e.g. 3:0.25 or 3:off"
        )
    return tau


def _from_file(path: Path, tau_max: float) -> list[Entry]:
    """The entries of a ``{"k": [...], "v": [...]}`` file (one per layer and part)."""
    where = f"tau_layers file {path}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(where, "does not exist", "check the path after @") from None
    except (OSError, ValueError) as e:
        problem = f"cannot be read as JSON ({e})"
        raise InputError(where, problem, 'give {"k": [...], "v": [...]}') from None
    if not isinstance(raw, dict) or not raw.keys() <= {"k", "v"} or not raw:
        raise InputError(where, 'must hold "k" and/or "v": lists of thresholds', "see docs")
    out: list[Entry] = []
    for part, values in raw.items():
        if not isinstance(values, list):
            raise InputError(where, f"field {part!r} must be a list", "one threshold a layer")
        for layer, value in enumerate(values):
            text = "off" if value is None else str(value)
            if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
                raise InputError(where, f"{part}[{layer}] = {value!r}", "give a number or null")
            out.append((part, layer, layer, _tau(text, f"{part}[{layer}]", tau_max)))
    return out


def table(entries: list[tuple[str, int, int | None, float]], tau: float, layers: int) -> np.ndarray:
    """The ``(layers, 2)`` thresholds (K, V) the entries give a model of ``layers`` layers
    (``OFF`` where a page never shares); InputError if an entry names a layer past the model."""
    out = np.full((layers, 2), tau, dtype=np.float64)
    for parts, first, last, value in entries:
        end = layers - 1 if last is None else last
        if end >= layers:
            raise InputError(
                WHERE,
                f"names layer {end}, but the model has {layers} layers (0-{layers - 1})",
                f"name layers 0-{layers - 1}",
            )
        cols = [c for c, p in enumerate("kv") if p in parts]
        out[first : end + 1, cols] = value
    return out


def scales(thresholds: np.ndarray) -> tuple[np.ndarray, float]:
    """``(scale (L, 2) float32, t_ref)``: a page's threshold over ``t_ref`` (the largest in
    the table; 0 for ``off`` pages, tiny for a threshold of 0), see the module docstring."""
    on = thresholds[thresholds >= 0]
    ref = float(on.max()) if on.size and on.max() > 0 else 1.0
    scale = np.where(thresholds >= 0, thresholds / ref, 0.0).astype(np.float32)
    scale[(thresholds == 0)] = _ZERO_SCALE
    return scale, ref


def unscaled(d: BlockDecision, limits: Limits, keys_only: bool) -> BlockDecision:
    """``d`` with its distances back in the units of the pages' own thresholds (scaled
    distance x scale; with different K and V thresholds on a layer, the larger scale's)."""
    if d.layer_distance is None or limits.scale is None:
        return d
    per = limits.scale[:, 0] if keys_only else limits.scale.max(axis=1)
    ld = (d.layer_distance * per).astype(np.float32)
    if np.array_equal(ld, d.layer_distance, equal_nan=True):  # scale 1 where it shared
        return d
    shared = ld[np.isfinite(ld)]
    d.layer_distance = ld
    d.distance = float(shared.mean()) if shared.size else d.distance
    return d
