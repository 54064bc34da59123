"""One simulation run end to end, and its run directory.

:func:`run_config` loads the trace (once per path, :class:`LoadedTrace`), resolves the block
size and KV budget, builds the pool, the manager and the policy from the registry, runs the
engine and computes the metrics. :func:`write_run` writes the run directory:

- ``config.json``: the :class:`~memshare.sim.config.SimConfig` plus what it resolved to (block
  size, KV blocks, pool layers, trace identity);
  :func:`~memshare.sim.config_file.read_config` reads it back, so ``simulate`` can rerun it
  and ``validate`` can set up the same run.
- ``metrics.json``: :func:`~memshare.sim.metrics.compute_metrics`.
- ``timeline.csv``: one row per engine step.
- ``requests.csv``: one row per request.
- ``perf.json``: wall time and the simulated/wall ratio (the only non-deterministic file).

Invariant: the same config and trace give byte-identical ``config.json``, ``metrics.json``,
``timeline.csv`` and ``requests.csv`` (floats are written with fixed formats).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memshare import __version__
from memshare.block_pool import BlockPool
from memshare.errors import InputError
from memshare.kv_manager import KVCacheManager, blocks_for_all
from memshare.policy import policy_judges_keys, policy_layer_map
from memshare.registry import check_block_size, make_policy
from memshare.scheduler import Scheduler
from memshare.share_log import ShareLog
from memshare.sim.arrivals import arrival_times
from memshare.sim.config import SimConfig
from memshare.sim.cost_model import CostModel
from memshare.sim.engine import TIMELINE_COLUMNS, Engine, EngineResult, Progress
from memshare.sim.fidelity_model import FidelityModel
from memshare.sim.metrics import compute_metrics
from memshare.sim.workload import build_requests, served_output_len
from memshare.traces.reader import KVRows, TraceReader
from memshare.traces.request_blocks import default_block_size, request_info
from memshare.traces.schema import Manifest, RequestRecord


@dataclass
class LoadedTrace:
    """A trace read once and shared by the runs over it."""

    path: Path  # trace directory
    manifest: Manifest  # its committed manifest
    records: list[RequestRecord]  # committed requests, file order
    kv_rows: dict[str, KVRows] | None  # request id -> KV rows (traces with sketches)

    def identity(self) -> dict[str, Any]:
        """The committed manifest as JSON (its data files' sha256 included): what names this
        trace's content, e.g. in a fan-out job's key."""
        return dict(json.loads(self.manifest.to_json()))

    @property
    def has_sketches(self) -> bool:
        """Whether requests carry per-block KV sketches (sharing policies need them)."""
        return self.kv_rows is not None

    @staticmethod
    def load(path: Path) -> LoadedTrace:
        """Open and verify a trace directory (InputError on anything wrong)."""
        reader = TraceReader(Path(path))
        records = reader.records()
        if not records:
            raise InputError(str(path), "the trace holds no request", "capture or import again")
        rows: dict[str, KVRows] | None = None
        if reader.row_dtype is not None and any(r.kv is not None for r in records):
            rows = {r.id: reader.kv(r) for r in records if r.kv is not None}
        return LoadedTrace(Path(path).resolve(), reader.manifest, records, rows)

    @staticmethod
    def of(
        records: Sequence[RequestRecord], manifest: Manifest, path: str = "<memory>"
    ) -> LoadedTrace:
        """An in-memory workload (tests, benchmarks): no KV rows."""
        return LoadedTrace(Path(path), manifest, list(records), None)


@dataclass(frozen=True)
class Resolved:
    """What a config resolved to against its trace."""

    block_size: int  # tokens per KV block
    num_blocks: int  # KV budget in blocks
    pool_layers: int  # layers the block pool tracks pages for: the model's, for every trace
    requests: int  # requests simulated (after --limit)
    trace_bytes: int = 0  # committed length of the trace's requests.jsonl (its identity)
    trace_source_sha256: str | None = None  # sha256 of the imported source file, if any
    trace_sha256: str = ""  # sha256 of the committed requests.jsonl (validate checks it)


@dataclass
class RunOutput:
    """One finished run."""

    config: SimConfig  # what was asked
    resolved: Resolved  # what it resolved to
    metrics: dict[str, Any]  # metrics.json
    result: EngineResult  # requests and timeline
    shares: ShareLog | None = None  # every share applied (runs with a fidelity model)


def resolve(cfg: SimConfig, trace: LoadedTrace) -> Resolved:
    """Block size, KV budget and pool layers for ``cfg`` on ``trace`` (InputError if bad:
    also a block size the trace's block identity cannot take, or arrival times past the
    simulator's horizon, so that every check of a run is done before any run starts).

    The pool always has the model's layer count (L x 2 pages per block), for every trace, so
    its page ids and page counts are the ones the paged engine holds for the same run
    (docs/scheduler.md); a trace with sketches must come from a model with that many layers.
    """
    m = trace.manifest
    bs = cfg.block_size or default_block_size(m)
    check_block_size(cfg.policy, cfg.policy_params, bs)  # e.g. kvshare's window <= block
    records = trace.records[: cfg.limit] if cfg.limit else trace.records
    layers = cfg.model.num_layers
    if trace.has_sketches:
        assert m.model is not None
        if bs != m.block_size:
            raise InputError(
                "--block-size",
                f"{bs} differs from the trace's KV block size {m.block_size}",
                f"leave it out or use {m.block_size} (sketches are per block)",
            )
        if cfg.model.num_layers != m.model.num_layers:
            raise InputError(
                "--model-config",
                f"{cfg.model.name} has {cfg.model.num_layers} layers, the trace's model "
                f"{m.model.name} has {m.model.num_layers}",
                "pass the model the trace was captured with",
            )
        layers = m.model.num_layers
    per_block = cfg.model.kv_bytes_per_token * bs
    kv = cfg.kv
    if kv.unlimited:
        n = blocks_for_all((r.prompt_len + served_output_len(r.output_len) for r in records), bs)
    elif kv.blocks is not None:
        n = kv.blocks
    elif kv.bytes is not None:
        n = kv.bytes // per_block
        if n <= 0:
            raise InputError(
                "--kv-bytes", f"{kv.bytes} bytes hold no {per_block}-byte block", "give more"
            )
    else:
        n = _default_blocks(cfg, per_block, bs)
    if records:  # the trace's block identity takes this block size (every record alike)
        request_info(records[0], m, bs)
    if cfg.arrival.mode != "closed":  # times past the simulator's horizon fail here, not mid-run
        arrival_times(cfg.arrival, [r.arrival_s for r in records], cfg.time_scale, cfg.seed)
    sha = m.source.get("sha256")
    return Resolved(
        bs,
        int(n),
        layers,
        len(records),
        m.requests_bytes,
        sha if isinstance(sha, str) else None,
        m.requests_sha256,
    )


def _default_blocks(cfg: SimConfig, per_block: int, block_size: int) -> int:
    """Blocks of ``per_block`` bytes in the GPU memory share left after the weights (vLLM's
    sizing); InputError naming what to change when not one fits."""
    share = cfg.kv.gpu_memory_utilization
    free = cfg.gpu.memory * share - cfg.model.weight_bytes
    if free <= 0:
        raise InputError(
            "--gpu",
            f"{cfg.model.name} weights ({cfg.model.weight_bytes / 2**30:.1f} GiB) leave no "
            f"KV memory in {share:g} of {cfg.gpu.name}'s {cfg.gpu.memory / 2**30:,.0f} GiB "
            "(--gpu-memory-utilization)",
            "choose a larger GPU, a larger --gpu-memory-utilization, or set --kv-blocks",
        )
    n = int(free // per_block)
    if n <= 0:
        raise InputError(
            "--block-size",
            f"one block of {block_size:,} tokens takes {per_block / 2**30:,.1f} GiB of "
            f"{cfg.model.name} KV, more than the {free / 2**30:,.1f} GiB left on {cfg.gpu.name}",
            "use a smaller --block-size, a larger GPU, or set --kv-blocks",
        )
    return n


def budget_warning(cfg: SimConfig, res: Resolved) -> str | None:
    """One line when a budget the user set (``--kv-blocks``/``--kv-bytes``) plus the model's
    weights exceed the GPU preset's memory (the run goes on: the simulator does not need the
    memory, but its figures then describe a GPU that does not exist); else ``None``."""
    kv = cfg.kv
    if kv.unlimited or (kv.blocks is None and kv.bytes is None):
        return None  # the default budget is sized from the GPU; unlimited is asked for
    budget = res.num_blocks * cfg.model.kv_bytes_per_token * res.block_size
    weights = cfg.model.weight_bytes
    if budget + weights <= cfg.gpu.memory:
        return None
    option = "--kv-blocks" if kv.blocks is not None else "--kv-bytes"
    return (
        f"memshare: warning: {option}: a KV budget of {res.num_blocks:,} blocks "
        f"({budget / 2**30:,.1f} GiB) plus {weights / 2**30:,.1f} GiB of {cfg.model.name} "
        f"weights exceeds the {cfg.gpu.memory / 2**30:,.0f} GiB of GPU preset {cfg.gpu.name}; "
        "simulated as given (pick a larger --gpu or a smaller budget)"
    )


# measured on 8 R1 texts of 2,048 tokens captured by vLLM both ways (docs/vllm.md)
POST_ROPE_SHARES = "20.6% of pages shared on pre-RoPE keys, 0.01% on post-RoPE"


def keys_warning(cfg: SimConfig, trace: LoadedTrace) -> str | None:
    """One line when ``cfg``'s policy compares key sketches (:func:`policy_judges_keys`) and
    the trace's keys are post-RoPE (``sketch.keys``): the policy then finds next to nothing
    to share for a reason that is not its own, and says what to do; else ``None``."""
    sketch = trace.manifest.sketch
    if sketch is None or sketch.keys != "post_rope":
        return None
    if not policy_judges_keys(make_policy(cfg.policy, **cfg.policy_params)):
        return None
    return (
        f"memshare: warning: {cfg.trace}: {cfg.policy} compares key sketches, but this trace's "
        "keys are post-RoPE (manifest sketch.keys): rotated by position, equal content at "
        "another position no longer matches (R1 texts, the default model, cf-topk layer/k at "
        f"tau 0.5: {POST_ROPE_SHARES}); capture again with --keys pre_rope (the default, "
        "hf and vllm backends)"
    )


def run_config(
    cfg: SimConfig,
    trace: LoadedTrace | None = None,
    progress: Progress | None = None,
    *,
    plain: bool = False,
    fidelity: FidelityModel | None = None,
) -> RunOutput:
    """Simulate ``cfg`` (loading its trace unless given) and compute its metrics.

    ``fidelity``: also log every share and add the model's prediction of the run's top-1
    agreement and KL against the unshared run (``fidelity_predicted`` in the metrics; each
    request's compared positions: its prompt and output tokens but the last).

    ``plain``: take no shortcut (no decode fast path or bursts, page-by-page pool accounting,
    the policy asked about every full block): the same files, slower; what the tests check
    the shortcuts against."""
    trace = trace or LoadedTrace.load(Path(cfg.trace))
    policy = make_policy(cfg.policy, **cfg.policy_params)
    try:  # cross-layer sharing (kvsharer): the pool allocates owner layers only
        layer_map = policy_layer_map(policy, cfg.model.num_layers)
    except ValueError as e:
        raise InputError("--model-config", str(e), "simulate the calibrated model") from None
    res = resolve(cfg, trace)
    records = trace.records[: cfg.limit] if cfg.limit else trace.records
    requests = build_requests(records, trace.manifest, res.block_size, trace.kv_rows)
    pool = BlockPool(
        num_blocks=res.num_blocks,
        num_layers=res.pool_layers,
        layer_map=layer_map,
        page_accounting=plain,
    )
    log = None if fidelity is None else ShareLog()
    manager = KVCacheManager(pool, policy, res.block_size, ask_all=plain, share_log=log)
    engine = Engine(
        requests,
        Scheduler(cfg.scheduler, manager, fast_decode=not plain, compact_decodes=not plain),
        CostModel(cfg.model, cfg.gpu, cfg.cost),
        cfg.arrival,
        time_scale=cfg.time_scale,
        seed=cfg.seed,
        trace_times=[r.arrival_s for r in records],
        progress=progress,
        check_invariants=cfg.check_invariants,
    )
    result = engine.run()
    metrics = compute_metrics(
        result,
        manager.stats,
        pool.stats,
        policy=cfg.policy,
        model=cfg.model,
        block_size=res.block_size,
        num_blocks=res.num_blocks,
    )
    if fidelity is not None:
        metrics["fidelity_predicted"] = _predicted(fidelity, manager, records, res.block_size)
    return RunOutput(cfg, res, metrics, result, manager.share_log)


def _predicted(
    model: FidelityModel, manager: KVCacheManager, records: list[Any], block_size: int
) -> dict[str, Any]:
    """The model's prediction over ``records`` (each: its prompt and output tokens but the
    last, the positions whose next token a run computes)."""
    assert manager.share_log is not None
    lengths = {r.id: r.prompt_len + r.output_len - 1 for r in records}
    return model.predict(manager.share_log, lengths, block_size).to_json()


# --------------------------------------------------------------------------- files
CONFIG, METRICS, TIMELINE, REQUESTS, PERF = (
    "config.json",
    "metrics.json",
    "timeline.csv",
    "requests.csv",
    "perf.json",
)


def perf(out: RunOutput) -> dict[str, Any]:
    """Wall-clock figures of a run (not deterministic: kept out of metrics.json)."""
    r = out.result
    return {
        "wall_s": round(r.wall_s, 6),
        "sim_s": round(r.sim_time_s, 6),
        "sim_per_wall": round(r.sim_time_s / r.wall_s, 3) if r.wall_s > 0 else None,
        "steps": r.steps,
        "us_per_step": round(1e6 * r.wall_s / r.steps, 3) if r.steps else None,
    }


def config_json(out: RunOutput) -> dict[str, Any]:
    """The ``config.json`` object."""
    res = out.resolved
    return {
        "memshare_version": __version__,
        "config": out.config.to_dict(),
        "resolved": {
            "block_size": res.block_size,
            "num_blocks": res.num_blocks,
            "pool_layers": res.pool_layers,
            "requests": res.requests,
            "trace_bytes": res.trace_bytes,
            "trace_source_sha256": res.trace_source_sha256,
            "trace_sha256": res.trace_sha256,
        },
    }


def write_run(out: RunOutput, directory: Path, ran_on: dict[str, Any] | None = None) -> None:
    """Write the run directory (created if missing; files replaced); ``ran_on`` (where its
    job ran: :func:`memshare.sim.jobs.ran_on`) goes to ``perf.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / CONFIG, config_json(out))
    _write_json(directory / METRICS, out.metrics)
    _write_json(directory / PERF, perf(out) | ({} if ran_on is None else {"ran_on": ran_on}))
    (directory / TIMELINE).write_text(timeline_csv(out.result), encoding="utf-8")
    (directory / REQUESTS).write_text(requests_csv(out.result), encoding="utf-8")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def timeline_csv(r: EngineResult) -> str:
    """``timeline.csv`` text: one row per step, fixed float formats (one ``%`` format per
    row; page counts, which repeat, formatted once per distinct value)."""
    tl = r.timeline
    ppb = r.pages_per_block
    f3 = "{:.3f}".format
    live = {p: f3(p / ppb) for p in set(tl.live_pages)}
    cached = {p: f3(p / ppb) for p in set(tl.cached_pages)}
    row = "%d,%.9f,%.9f" + ",%d" * 9 + ",%s,%s"
    rows = zip(
        range(len(tl.time_s)),
        tl.time_s,
        tl.dt_s,
        tl.running,
        tl.waiting,
        tl.scheduled_seqs,
        tl.scheduled_tokens,
        tl.prefill_tokens,
        tl.decode_seqs,
        tl.admitted,
        tl.preempted,
        tl.finished,
        map(live.__getitem__, tl.live_pages),
        map(cached.__getitem__, tl.cached_pages),
        strict=True,
    )
    return "\n".join([",".join(TIMELINE_COLUMNS), *[row % x for x in rows]]) + "\n"


REQUEST_COLUMNS = (
    "id",
    "arrival_s",
    "prompt_len",
    "output_len",
    "hit_tokens",
    "preemptions",
    "first_scheduled_s",
    "first_token_s",
    "finish_s",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "queue_s",
    "rejected",
)


def _f(x: float) -> str:
    return f"{x:.9f}" if math.isfinite(x) else ""


def requests_csv(r: EngineResult) -> str:
    """``requests.csv`` text: one row per request in trace order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REQUEST_COLUMNS)
    for q in r.requests:
        tpot = (q.finish - q.first_token) / (q.output_len - 1) if q.output_len > 1 else math.nan
        w.writerow(
            [
                q.rid,
                _f(q.arrival),
                q.prompt_len,
                q.recorded_output_len,
                q.hit_tokens,
                q.preemptions,
                _f(q.first_scheduled),
                _f(q.first_token),
                _f(q.finish),
                _f(q.first_token - q.arrival),
                _f(tpot),
                _f(q.finish - q.arrival),
                _f(q.first_scheduled - q.arrival),
                q.rejected,
            ]
        )
    return buf.getvalue()
