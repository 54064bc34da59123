"""``memshare tune``: a policy's memory/fidelity frontier, predicted cheaply by the simulator
with a fitted fidelity model, measured where it counts (docs/tune.md)."""
