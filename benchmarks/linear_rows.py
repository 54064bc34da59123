"""The default model's linear layers at a decode step's few rows: ``F.linear`` against
``PackedLinear`` (oneDNN on a weight packed once, the paged engine's), in ms for all of them.

Every ``nn.Linear`` of SmolLM2-135M (211 layers, 538 MB of fp32 weights) multiplies a random
``[rows, in]`` input; median of 5 passes over all layers, the two alternating. Prints a table
(docs/paged-kv.md, "Linear layers").

    .venv/bin/python benchmarks/linear_rows.py [--rows 1,2,4,8,16,32,512]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from memshare.traces.model.loader import load_model
from memshare.validate.engine.packed_linear import use_packed_linears


def _pass(layers: list[nn.Module], inputs: list[torch.Tensor], plain: bool) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for layer, x in zip(layers, inputs, strict=True):
            if plain:
                F.linear(x, layer.weight, layer.bias)
            else:
                layer(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,512")
    a = ap.parse_args()
    model = load_model().model
    packed = copy.deepcopy(model)
    use_packed_linears(packed)
    plain_layers = [m for m in model.modules() if type(m) is nn.Linear]
    packed_layers = [m for m in packed.modules() if isinstance(m, nn.Linear)]
    print(f"{len(plain_layers)} linear layers; ms for all of them (median of 5)")
    print("| rows | F.linear | PackedLinear | ratio |\n| --- | --- | --- | --- |")
    for rows in (int(r) for r in a.rows.split(",")):
        inputs = [torch.randn(rows, m.in_features) for m in plain_layers]
        _pass(plain_layers, inputs, True)
        _pass(packed_layers, inputs, False)  # packs the weights once
        plain, mine = [], []
        for _ in range(5):
            plain.append(_pass(plain_layers, inputs, True))
            mine.append(_pass(packed_layers, inputs, False))
        p, m = 1e3 * statistics.median(plain), 1e3 * statistics.median(mine)
        print(f"| {rows} | {p:.1f} | {m:.1f} | {p / m:.2f}x |")


if __name__ == "__main__":
    main()
