"""``kvsharer``: KVSharer-style cross-layer sharing from a calibrated layer map.

``memshare calibrate`` writes a JSON file whose ``layer_map[l]`` is the layer whose KV layer
``l`` uses (itself, or an earlier layer that keeps its own). The policy hands that map to the
pool (:meth:`KVSharer.layer_map`), so every block is allocated with pages for the owner
layers only and costs ``(L - S) / L`` of a full block, where ``S`` layers are shared. It makes
no per-block decisions and composes with the others (``prefix+cf-topk+kvsharer``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from memshare.block_pool import BlockPool, KVBlock
from memshare.errors import InputError
from memshare.policies.params import COUNT_MAX, Param, check_fields
from memshare.policy import BlockDecision, FullBlock, PrefixHit, RequestInfo


def load_layer_map(path: Path, layers: int = -1) -> np.ndarray:
    """The ``layer_map`` array of a calibration file, checked; InputError names the file.
    ``layers >= 0``: the map of the first ``layers`` pairs the calibration accepted, in the
    order it accepted them (its ``trials``), the knob ``memshare tune`` searches."""
    try:
        raw = json.loads(path.read_text())
        lm = np.asarray(raw["layer_map"], dtype=np.int64)
        accepted = [
            (int(t["layer"]), int(t["uses"])) for t in raw.get("trials", []) if t["accepted"]
        ]
    except FileNotFoundError:
        raise InputError(
            f"layer_map_file {path}", "does not exist", "run `memshare calibrate -o FILE` first"
        ) from None
    except OSError as e:
        raise InputError(
            f"layer_map_file {path}",
            f"cannot be read ({(e.strerror or type(e).__name__).lower()})",
            "pass the JSON file `memshare calibrate` wrote",
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(
            str(path), f"not a calibration file ({e})", "re-run `memshare calibrate`"
        ) from None
    ok = lm.ndim == 1 and np.all(lm >= 0) and np.all(lm <= np.arange(len(lm)))
    if not ok or np.any(lm[lm] != lm):
        raise InputError(
            str(path),
            "field 'layer_map' must map each layer to itself or an earlier owner",
            "re-run `memshare calibrate`",
        )
    return lm if layers < 0 else first_pairs(lm, accepted, layers, path)


def first_pairs(
    lm: np.ndarray, accepted: list[tuple[int, int]], layers: int, path: Path
) -> np.ndarray:
    """The map of the first ``layers`` accepted pairs (InputError if the file has fewer)."""
    shared = int(np.count_nonzero(lm != np.arange(len(lm))))
    if layers == shared:
        return lm
    if len(accepted) != shared or layers > shared:
        have = f"{len(accepted)} accepted pairs in order" if accepted else "no trials in order"
        raise InputError(
            "--set layers",
            f"{layers} shared layers asked, {path} has {shared} shared layers ({have})",
            f"give 0..{shared if len(accepted) == shared else 0}, or calibrate with a larger "
            "--target",
        )
    out = np.arange(len(lm))
    for layer, uses in accepted[:layers]:
        out[layer] = uses
    return out


@dataclass
class KVSharer:
    """Cross-layer sharing with a fixed, calibrated layer map."""

    layer_map_file: str = ""  # JSON written by `memshare calibrate`
    layers: int = -1  # shared layers: the first N pairs calibration accepted (-1: all)
    name: str = "kvsharer"
    shares_blocks: ClassVar[bool] = False  # only publishes: asked at reservation
    _map: np.ndarray | None = field(default=None, init=False, repr=False)
    PARAMS: ClassVar[dict[str, Param]] = {
        "layer_map_file": Param(
            "file", "PATH", "the JSON file `memshare calibrate -o PATH` writes"
        ),
        "layers": Param(
            "int",
            -1,
            "shared layers: the first N pairs the calibration accepted (-1: every one)",
            -1,
            COUNT_MAX,
        ),
    }

    def __post_init__(self) -> None:
        if self.layer_map_file == "":
            raise InputError(
                "--set layer_map_file",
                "kvsharer needs a calibrated layer map",
                "pass --set layer_map_file=PATH (written by `memshare calibrate -o PATH`)",
            )
        check_fields(self, self.PARAMS, self.name)
        self._map = load_layer_map(Path(self.layer_map_file), self.layers)

    def layer_map(self, num_layers: int) -> np.ndarray:
        """The map for a pool of ``num_layers`` layers (ValueError if the model differs)."""
        assert self._map is not None
        if len(self._map) != num_layers:
            raise ValueError(
                f"layer map of {self.layer_map_file} has {len(self._map)} layers, "
                f"the model has {num_layers}"
            )
        return self._map

    @property
    def shared_layers(self) -> int:
        """S: layers that use another layer's KV."""
        assert self._map is not None
        return int(np.count_nonzero(self._map != np.arange(len(self._map))))

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """No prefix reuse."""
        return PrefixHit()

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Nothing per block: the layer map does the sharing."""
        return ()

    def on_request_end(self, req_id: str) -> None:
        """No per-request state."""
