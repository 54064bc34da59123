"""The SimPy serving simulator with block identity (docs/simulator.md).

``memshare simulate`` replays a trace through the vLLM-v1-like scheduler over the same
:class:`~memshare.kv_manager.KVCacheManager`, :class:`~memshare.block_pool.BlockPool` and
registry policy that the paged engine (``memshare.validate.engine``) drives, so block counts
and hit/share decisions are the policy's own; time comes from a roofline cost model.

Modules, one job each: :mod:`~memshare.sim.config` (settings, presets),
:mod:`~memshare.sim.options` (CLI values -> configs), :mod:`~memshare.sim.workload` (trace
records -> requests), :mod:`~memshare.sim.arrivals`, :mod:`~memshare.sim.cost_model`,
:mod:`~memshare.sim.engine` (SimPy), :mod:`~memshare.sim.metrics`, :mod:`~memshare.sim.run`
(one run and its directory), :mod:`~memshare.sim.study` (comparisons and sweeps),
:mod:`~memshare.sim.results` (what those return), :mod:`~memshare.sim.report` (tables),
:mod:`~memshare.sim.plots` (PNGs), :mod:`~memshare.sim.sharing_study` (``memshare study``),
:mod:`~memshare.sim.bench` (``memshare bench sim``).
"""
